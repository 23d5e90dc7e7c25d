"""The CUDA kernels built for the CPU: host/emulate.cpp compiles every kernel of cuda/*.cu with
host/cuda_emu.h (a CUDA stand-in: one fiber per CUDA thread, loads bounds- and alignment-checked),
behind the launcher's interface. `Emu.launcher` stands in for CuPy, so the CUDA backend's whole code
path (launch plans, routing on the device, recorded graphs) runs on a machine without a GPU: the
tests do, and `promoe bench --device cuda-emulated` counts a decode step's dispatches with it.
`Emu.run(launches, readable)` runs plans with only `readable` buffers loadable (kernel tests).

Needs a C++20 compiler (g++); the library is built once per source version into
$PROMOE_CACHE_DIR (default ~/.cache/promoe-gguf).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelError
from . import launch

HOST = Path(__file__).resolve().parent / "host"


def cache_dir() -> Path:
    return Path(os.environ.get("PROMOE_CACHE_DIR") or Path.home() / ".cache" / "promoe-gguf")


def build_emulator() -> Path:
    """The emulation library for the current sources (built on first use)."""
    cxx = shutil.which("g++")
    if cxx is None:
        raise ModelError("the CPU emulation of the CUDA kernels needs a C++20 compiler: g++ is not installed")
    sources = launch.kernels_dir()
    srcs = [HOST / "emulate.cpp", HOST / "cuda_emu.h", *sorted(sources.glob("*.cu*"))]
    key = hashlib.sha256(b"".join(p.read_bytes() for p in srcs)).hexdigest()[:16]
    out = cache_dir() / f"kemu-{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp.so")
        cmd = [cxx, "-std=c++20", "-O2", "-ffp-contract=off", "-fPIC", "-shared", "-pthread",
               "-Wall", "-Wno-unknown-pragmas", f"-I{sources}", "-o", str(tmp), str(HOST / "emulate.cpp")]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise ModelError(f"building the CPU emulation of the CUDA kernels failed:\n{r.stderr[-4000:]}")
        tmp.rename(out)
    return out


class Emu:
    """The host build of the kernels behind the launcher's interface. `seconds`: wall time spent
    running emulated kernels (the emulated device's busy time, for host-time accounting)."""

    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))
        L = self.lib
        L.emu_set_readable.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_longlong), ctypes.c_int]
        L.emu_take_errors.argtypes = [ctypes.c_char_p, ctypes.c_int]
        L.emu_take_errors.restype = ctypes.c_longlong
        L.emu_has_kernel.argtypes = [ctypes.c_char_p]
        L.emu_traits.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_int)]
        L.emu_matvec_rows_per_group.argtypes = [ctypes.c_int]
        L.emu_launch.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
                                 ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int), ctypes.c_int]
        self.launched = 0
        self.seconds = 0.0

    @staticmethod
    def _cargs(args) -> list:
        out = []
        for a in args:
            if isinstance(a, np.uint64):
                out.append(ctypes.c_void_p(int(a)))
            elif isinstance(a, np.int64):
                out.append(ctypes.c_longlong(int(a)))
            elif isinstance(a, np.int32):
                out.append(ctypes.c_int(int(a)))
            elif isinstance(a, np.float32):
                out.append(ctypes.c_float(float(a)))
            else:
                raise TypeError(f"unexpected kernel argument {a!r} ({type(a)})")
        return out

    def run(self, launches: list[launch.Launch], readable: list[torch.Tensor | np.ndarray]):
        """Run launch plans; `readable` = the buffers loads may touch."""
        ptrs, sizes = [], []
        for b in readable:
            if isinstance(b, torch.Tensor):
                ptrs.append(b.data_ptr()); sizes.append(b.numel() * b.element_size())
            else:
                ptrs.append(b.ctypes.data); sizes.append(b.nbytes)
        self.lib.emu_set_readable((ctypes.c_void_p * len(ptrs))(*ptrs), (ctypes.c_longlong * len(sizes))(*sizes), len(ptrs))
        self._launch_all(launches)
        err = self.take_errors()
        if err:
            raise RuntimeError(err)

    def _launch_all(self, launches) -> None:
        t0 = time.perf_counter()
        for ln in launches:
            self.launched += 1
            if not self.lib.emu_has_kernel(ln.name.encode()):
                raise RuntimeError(f"the emulation has no entry point {ln.name}")
            if ln.block[1:] != (1, 1):
                raise RuntimeError(f"{ln.name}: the emulation runs one-dimensional blocks, got {ln.block}")
            vals = self._cargs(ln.args)
            n = len(vals)
            ptrs = (ctypes.c_void_p * n)(*[ctypes.addressof(v) for v in vals])
            sizes = (ctypes.c_int * n)(*[ctypes.sizeof(v) for v in vals])
            rc = self.lib.emu_launch(ln.name.encode(), *ln.grid, ln.block[0], ptrs, sizes, n)
            if rc != 0:
                raise RuntimeError(f"emulated launch of {ln.name} failed ({rc}: -2 wrong argument count, -3 - i "
                                   f"argument i of the wrong size)")
        self.seconds += time.perf_counter() - t0

    def take_errors(self) -> str | None:
        buf = ctypes.create_string_buffer(512)
        n = self.lib.emu_take_errors(buf, 512)
        return f"{n} errors in emulated kernels, first: {buf.value.decode()}" if n else None

    def launcher(self, launches, device) -> None:
        """Stands in for launch.run: any host address may be read (the CUDA backend's buffers are
        CPU tensors here); alignment is still checked, and any kernel error fails loudly."""
        self.lib.emu_set_readable((ctypes.c_void_p * 1)(16), (ctypes.c_longlong * 1)(2**62), 1)
        self._launch_all(launches)
        err = self.take_errors()
        if err:
            raise RuntimeError(err)
