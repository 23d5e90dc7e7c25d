"""The launcher for the CUDA kernels in ``promoe_gguf/kernels/cuda/`` (shipped as package data).

Host code only picks the kernel and the launch shape (``plans.py``); everything else is in the .cu files.

* Each (operation, quant type) pair is one ``cupy.RawModule`` compiled lazily by NVRTC from the
  .cu file with its ``#include "..."`` headers inlined (so CuPy's on-disk kernel cache, keyed by
  the source text, sees header edits) and ``-DPROMOE_QTYPE=<ggml id>`` (only that type's kernels
  are instantiated); type-independent operations compile once. Entry points are plain
  ``extern "C"`` names, e.g. ``matvec_q4_k_ncols4``, so no name expressions are needed.
  :func:`module_source` returns exactly what is given to CuPy; tests/test_kernels_compile.py
  compiles the same thing with NVRTC on machines without a GPU.
* Launches go to torch's current CUDA stream (``cupy.cuda.ExternalStream``), so a launch made
  while torch captures a CUDA graph is captured with it; tensors are passed by ``data_ptr()``.
* CuPy is imported on first use only: this module imports fine without it (and without a GPU).
"""
from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from gguf import GGMLQuantizationType as T

from ..errors import ModelError
from ..format.quants import quant_type

# kernel-name spelling, threads per block (nchunk) and the base alignment each type's loads need
SUPPORTED: dict[T, str] = {
    T.Q4_0: "q4_0", T.Q4_1: "q4_1", T.Q5_0: "q5_0", T.Q5_1: "q5_1", T.Q8_0: "q8_0",
    T.Q2_K: "q2_k", T.Q3_K: "q3_k", T.Q4_K: "q4_k", T.Q5_K: "q5_k", T.Q6_K: "q6_k",
    T.IQ4_NL: "iq4_nl", T.IQ4_XS: "iq4_xs",
    T.IQ2_XXS: "iq2_xxs", T.IQ2_XS: "iq2_xs", T.IQ2_S: "iq2_s", T.IQ3_XXS: "iq3_xxs", T.IQ3_S: "iq3_s",
    T.IQ1_S: "iq1_s", T.IQ1_M: "iq1_m", T.MXFP4: "mxfp4",
}
NCHUNK: dict[T, int] = {t: 2 for t in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.IQ4_NL, T.MXFP4)} | {
    t: 8 for t in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_XS, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS,
                   T.IQ3_S, T.IQ1_S, T.IQ1_M)}
ALIGNMENT: dict[T, int] = {t: 2 for t in SUPPORTED} | {
    T.Q4_1: 4, T.Q5_1: 4, T.Q2_K: 4, T.IQ4_XS: 8, T.Q4_K: 16, T.Q5_K: 16, T.MXFP4: 1}

OPS = {"matvec": "matvec.cu", "moe": "moe_fused.cu", "dequant": "dequant.cu", "norm": "norm.cu",
       "quantize": "quantize.cu", "moe_combine": "moe_combine.cu", "rope": "rope.cu", "attention": "attention.cu"}
UNTYPED_OPS = {"norm", "quantize", "moe_combine", "rope", "attention"}   # compiled once, without -DPROMOE_QTYPE
MAX_NCOLS = 8                # matvec_<type>_ncols1 .. ncols8
NVRTC_OPTIONS = ("--std=c++17",)


def supported_qtype(qtype) -> T:
    """GGML type of `qtype` (type, id or name) if the kernels handle it, else ModelError."""
    t = quant_type(qtype).ggml_type
    if t not in SUPPORTED:
        raise ModelError(f"no CUDA kernel for quant type {t.name} "
                         f"(kernels exist for {', '.join(x.name for x in SUPPORTED)})")
    return t


# --- sources ----------------------------------------------------------------------------------------

def kernels_dir() -> Path:
    """The CUDA sources: $PROMOE_KERNELS_DIR if set, else the package's cuda/ directory (package data,
    so a wheel install finds them as a source checkout does)."""
    env = os.environ.get("PROMOE_KERNELS_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parent / "cuda")
    for c in candidates:
        if (c / "blocks.cuh").is_file():
            return c
    raise ModelError("CUDA kernel sources not found: looked for blocks.cuh in "
                     + ", ".join(str(c) for c in candidates)
                     + " (reinstall promoe-gguf, or set PROMOE_KERNELS_DIR to a directory holding the .cu files)")


_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([^"]+)"[ \t]*$', re.M)


def inline_includes(path: Path, _seen: set | None = None) -> str:
    """Source of `path` with every `#include "x"` replaced by x's text (once per file, like
    `#pragma once`), with #line markers so compiler messages name the original files."""
    seen = set() if _seen is None else _seen
    path = path.resolve()
    seen.add(path)
    text = path.read_text()
    out, pos = [], 0
    for m in _INCLUDE.finditer(text):
        out.append(text[pos:m.start()])
        inc = (path.parent / m.group(1)).resolve()
        if inc not in seen:
            if not inc.is_file():
                raise ModelError(f"{path.name}: included file {m.group(1)} not found")
            line = text.count("\n", 0, m.end()) + 2
            out.append(f'#line 1 "{inc.name}"\n{inline_includes(inc, seen)}\n#line {line} "{path.name}"')
        pos = m.end()
    out.append(text[pos:])
    return "".join(out).replace("#pragma once\n", "")


@dataclass(frozen=True)
class ModuleSource:
    code: str
    options: tuple[str, ...]
    name_expressions: tuple[str, ...] | None    # None: entry points are extern "C"
    kernel_names: tuple[str, ...]


UNTYPED_NAMES = {
    "norm": ("rms_norm_f32", "add_rms_norm_f32"),
    "quantize": ("quantize_q8_f32",),
    "moe_combine": ("moe_combine",),
    "rope": ("rope_f32",),
    "attention": ("kv_store_f16", "kv_store_f32", "attn_split_f16", "attn_split_f32", "attn_merge"),
}


def kernel_names(op: str, qtype=None) -> tuple[str, ...]:
    if op in UNTYPED_NAMES:
        return UNTYPED_NAMES[op]
    name = SUPPORTED[supported_qtype(qtype)]
    if op == "matvec":
        return tuple(f"matvec{q}_{name}_ncols{n}" for q in ("", "_q8") for n in range(1, MAX_NCOLS + 1))
    if op == "moe":
        return tuple(f"moe_{k}_{name}{q}" for q in ("", "_q8") for k in ("gate_up", "matvec", "down_combine"))
    if op == "dequant":
        return (f"dequant_{name}_f32", f"dequant_{name}_f16", f"get_rows_{name}_f32")
    raise ValueError(f"unknown kernel op {op!r} (one of {', '.join(OPS)})")


@lru_cache(maxsize=None)
def module_source(op: str, qtype=None) -> ModuleSource:
    """Exactly what the launcher hands to cupy.RawModule for (op, qtype); qtype None for untyped ops."""
    if op not in OPS:
        raise ValueError(f"unknown kernel op {op!r} (one of {', '.join(OPS)})")
    code = inline_includes(kernels_dir() / OPS[op])
    if op in UNTYPED_OPS:
        return ModuleSource(code=code, options=NVRTC_OPTIONS, name_expressions=None, kernel_names=kernel_names(op))
    t = supported_qtype(qtype)
    return ModuleSource(code=code, options=NVRTC_OPTIONS + (f"-DPROMOE_QTYPE={int(t)}",),
                        name_expressions=None, kernel_names=kernel_names(op, t))


# --- CuPy plumbing ------------------------------------------------------------------------------------

_lock = threading.Lock()
_kernels: dict = {}
_streams: dict = {}


def _cupy():
    try:
        import cupy
    except ImportError as e:
        raise ModelError("the CUDA kernels need CuPy: pip install cupy-cuda12x (CUDA 12) "
                         "or cupy-cuda13x (CUDA 13)") from e
    return cupy


def get_kernel(op: str, qtype, name: str, device_index: int):
    """The cupy.RawKernel `name` of the (op, qtype) module on a device (compiled on first use)."""
    key = (op, None if op in UNTYPED_OPS else int(supported_qtype(qtype)), name, device_index)
    k = _kernels.get(key)
    if k is None:
        with _lock:
            k = _kernels.get(key)
            if k is None:
                cupy = _cupy()
                src = module_source(op, qtype)
                with cupy.cuda.Device(device_index):
                    mod = cupy.RawModule(code=src.code, options=src.options,
                                         name_expressions=src.name_expressions)
                    k = mod.get_function(name)
                _kernels[key] = k
    return k


def _stream(device: torch.device):
    cupy = _cupy()
    ptr = torch.cuda.current_stream(device).cuda_stream
    key = (device.index, ptr)
    s = _streams.get(key)
    if s is None:
        try:
            s = cupy.cuda.ExternalStream(ptr, device.index)
        except TypeError:          # older CuPy: no device_id argument
            s = cupy.cuda.ExternalStream(ptr)
        _streams[key] = s
    return s


@dataclass(frozen=True)
class Launch:
    """One kernel launch: module (op, qtype), entry point, grid, block and typed arguments."""
    op: str
    qtype: T | None
    name: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    args: tuple


def run(launches: list[Launch], device: torch.device) -> None:
    """Enqueue `launches` on torch's current stream of `device` (asynchronous)."""
    cupy = _cupy()
    idx = device.index if device.index is not None else torch.cuda.current_device()
    dev = torch.device("cuda", idx)
    with cupy.cuda.Device(idx), _stream(dev):
        for ln in launches:
            get_kernel(ln.op, ln.qtype, ln.name, idx)(ln.grid, ln.block, ln.args)
