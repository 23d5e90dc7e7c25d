"""Thin launcher for the CUDA kernels in ``promoe_gguf/kernels/cuda/`` (shipped as package data).

Host code only picks the kernel and the launch shape; everything else is in the .cu files.

* Each (operation, quant type) pair is one ``cupy.RawModule`` compiled lazily by NVRTC from the
  .cu file with its ``#include "..."`` headers inlined (so CuPy's on-disk kernel cache, keyed by
  the source text, sees header edits) and ``-DPROMOE_QTYPE=<ggml id>`` (only that type's kernels
  are instantiated). Entry points are plain ``extern "C"`` names, e.g. ``matvec_q4_k_ncols4``, so
  no name expressions are needed. :func:`module_source` returns exactly what is given to CuPy;
  tests/test_kernels_compile.py compiles the same thing with NVRTC on machines without a GPU.
* Launches go to torch's current CUDA stream (``cupy.cuda.ExternalStream``); tensors are passed
  by ``data_ptr()``. Nothing on the decode path synchronises with the host.
* CuPy is imported on first use only: this module imports fine without it (and without a GPU).

The ``plan_*`` functions are pure Python (no CuPy, no torch device calls): they validate shapes
and return the :class:`Launch` list the public functions run. The CPU emulation test runs the same
plans against the kernels built for the host.
"""
from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from ..errors import ModelError
from ..format.quants import quant_type

# --- mirrors of compile-time constants in cuda/*.cu (checked by the emulation test) -----------
THREADS = 128                # PROMOE_THREADS: 4 warps per CTA (matvec, moe)
DEQUANT_THREADS = 256        # DEQUANT_THREADS
MAX_NCOLS = 8                # matvec_<type>_ncols1 .. ncols8
MOE_GATE_UP_ROWS = 2         # rows of gate (and of up) per CTA
MOE_MATVEC_ROWS = 4


def matvec_rows_per_cta(ncols: int) -> int:
    """Rows of W per CTA of matvec_<type>_ncols<ncols> (cuda/matvec.cu)."""
    return 4 if ncols <= 2 else 2


# kernel-name spelling, threads per block (nchunk) and the base alignment each type's loads need
SUPPORTED: dict[T, str] = {
    T.Q4_0: "q4_0", T.Q4_1: "q4_1", T.Q5_0: "q5_0", T.Q5_1: "q5_1", T.Q8_0: "q8_0",
    T.Q2_K: "q2_k", T.Q3_K: "q3_k", T.Q4_K: "q4_k", T.Q5_K: "q5_k", T.Q6_K: "q6_k",
    T.IQ4_NL: "iq4_nl", T.IQ4_XS: "iq4_xs",
}
NCHUNK: dict[T, int] = {t: 2 for t in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.IQ4_NL)} | {
    t: 8 for t in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_XS)}
ALIGNMENT: dict[T, int] = {t: 2 for t in SUPPORTED} | {
    T.Q4_1: 4, T.Q5_1: 4, T.Q2_K: 4, T.IQ4_XS: 8, T.Q4_K: 16, T.Q5_K: 16}

OPS = {"matvec": "matvec.cu", "moe": "moe_fused.cu", "dequant": "dequant.cu", "norm": "norm.cu"}
UNTYPED_OPS = {"norm"}       # compiled once, without -DPROMOE_QTYPE
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


def kernel_names(op: str, qtype=None) -> tuple[str, ...]:
    if op == "norm":
        return ("rms_norm_f32", "add_rms_norm_f32")
    name = SUPPORTED[supported_qtype(qtype)]
    if op == "matvec":
        return tuple(f"matvec_{name}_ncols{n}" for n in range(1, MAX_NCOLS + 1))
    if op == "moe":
        return (f"moe_gate_up_{name}", f"moe_matvec_{name}", "moe_combine")
    if op == "dequant":
        return (f"dequant_{name}_f32", f"dequant_{name}_f16")
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


def _ptr(p: int) -> np.uint64:
    return np.uint64(p)


def _i32(v: int) -> np.int32:
    if not -2**31 <= v < 2**31:
        raise ModelError(f"kernel argument {v} does not fit in 32 bits")
    return np.int32(v)


# --- plans (pure Python) --------------------------------------------------------------------------------

def _matrix(qtype, shape) -> tuple[T, int, int, int, int]:
    t = supported_qtype(qtype)
    if len(shape) != 2:
        raise ModelError(f"expected a 2-D (rows, cols) weight shape, got {tuple(shape)}")
    rows, cols = (int(s) for s in shape)
    if rows <= 0 or cols <= 0:
        raise ModelError(f"empty weight shape {tuple(shape)}")
    qt = quant_type(t)
    row_bytes = qt.row_bytes(cols)
    return t, rows, cols, cols // qt.block_size, row_bytes


def _check_align(t: T, ptr: int, what: str) -> None:
    a = ALIGNMENT[t]
    if ptr % a:
        raise ModelError(f"{what}: {t.name} kernels need a {a}-byte aligned base address, got {ptr:#x}")


def plan_matvec(qtype, shape, ntok: int, w_ptr: int, x_ptr: int, x_stride: int,
                y_ptr: int, y_stride: int) -> list[Launch]:
    """y[t, :rows] = W @ x[t, :cols] for t < ntok; groups of up to 8 tokens per launch."""
    t, rows, cols, nblocks, row_bytes = _matrix(qtype, shape)
    _check_align(t, w_ptr, "matvec weight")
    if x_ptr % 16 or x_stride % 4:
        raise ModelError("matvec activations must be 16-byte aligned with a row stride that is a multiple of 4")
    out = []
    for t0 in range(0, ntok, MAX_NCOLS):
        n = min(MAX_NCOLS, ntok - t0)
        rpc = matvec_rows_per_cta(n)
        out.append(Launch("matvec", t, f"matvec_{SUPPORTED[t]}_ncols{n}", ((rows + rpc - 1) // rpc, 1, 1),
                          (THREADS, 1, 1),
                          (_ptr(w_ptr), np.int64(row_bytes), _i32(rows), _i32(nblocks),
                           _ptr(x_ptr + 4 * t0 * x_stride), _i32(x_stride),
                           _ptr(y_ptr + 4 * t0 * y_stride), _i32(y_stride))))
    return out


def plan_dequant(qtype, shape, w_ptr: int, y_ptr: int, y_stride: int, fp16: bool) -> list[Launch]:
    t, rows, cols, nblocks, row_bytes = _matrix(qtype, shape)
    _check_align(t, w_ptr, "dequant weight")
    if y_ptr % (8 if fp16 else 16) or y_stride % 4:
        raise ModelError("dequant output must be 16-byte (fp32) / 8-byte (fp16) aligned, row stride a multiple of 4")
    n = rows * nblocks * NCHUNK[t]
    return [Launch("dequant", t, f"dequant_{SUPPORTED[t]}_{'f16' if fp16 else 'f32'}",
                   ((n + DEQUANT_THREADS - 1) // DEQUANT_THREADS, 1, 1), (DEQUANT_THREADS, 1, 1),
                   (_ptr(w_ptr), np.int64(row_bytes), _i32(rows), _i32(nblocks), _ptr(y_ptr), np.int64(y_stride)))]


@dataclass(frozen=True)
class ExpertLayout:
    """Quant types and sizes of one layer's routed experts: gate/up [n_ff, n_embd], down [n_embd, n_ff]
    (numpy order: rows, cols), each row-major GGUF blocks."""
    n_embd: int
    n_ff: int
    gate: T
    up: T
    down: T

    def __post_init__(self):
        for f in ("gate", "up", "down"):
            object.__setattr__(self, f, supported_qtype(getattr(self, f)))
        for f, cols in (("gate", self.n_embd), ("up", self.n_embd), ("down", self.n_ff)):
            quant_type(getattr(self, f)).row_bytes(cols)     # raises if cols is not a block multiple

    def row_bytes(self, which: str) -> int:
        return quant_type(getattr(self, which)).row_bytes(self.n_ff if which == "down" else self.n_embd)

    def nbytes(self, which: str) -> int:
        return (self.n_embd if which == "down" else self.n_ff) * self.row_bytes(which)

    @property
    def expert_bytes(self) -> int:
        return self.nbytes("gate") + self.nbytes("up") + self.nbytes("down")


def plan_moe_gate_up(layout: ExpertLayout, n_pairs: int, n_slots: int, table_ptr: int,
                     x_ptr: int, x_stride: int, h_ptr: int, h_stride: int) -> list[Launch]:
    """h[p] = silu(gate_p . x[p // n_slots]) * (up_p . x[p // n_slots]); fused when gate and up share
    a quant type. Otherwise two moe_matvec launches write gate into h and up into h[n_pairs:]: the
    caller then computes silu(g) * u (see moe_gate_up)."""
    n_ff = layout.n_ff
    if x_ptr % 16 or x_stride % 4:
        raise ModelError("moe activations must be 16-byte aligned with a row stride that is a multiple of 4")
    if not 0 < n_pairs < 65536:
        raise ModelError(f"moe: {n_pairs} (token, slot) pairs: must be 1..65535")
    if layout.gate == layout.up:
        t = layout.gate
        return [Launch("moe", t, f"moe_gate_up_{SUPPORTED[t]}",
                       ((n_ff + MOE_GATE_UP_ROWS - 1) // MOE_GATE_UP_ROWS, n_pairs, 1), (THREADS, 1, 1),
                       (_ptr(table_ptr), _i32(n_slots), _i32(n_ff), _i32(layout.n_embd // quant_type(t).block_size),
                        np.int64(layout.row_bytes("gate")), _ptr(x_ptr), _i32(x_stride), _ptr(h_ptr), _i32(h_stride)))]
    out = []
    for which, dst in ((0, h_ptr), (1, h_ptr + 4 * n_pairs * h_stride)):
        t = layout.gate if which == 0 else layout.up
        out.append(_moe_matvec(t, which, n_ff, layout.n_embd, n_pairs, table_ptr, x_ptr, x_stride, n_slots, 0, dst, h_stride))
    return out


def _moe_matvec(t: T, which: int, nrows: int, ncols: int, n_pairs: int, table_ptr: int, x_ptr: int,
                x_stride: int, x_div: int, scale_ptr: int, y_ptr: int, y_stride: int) -> Launch:
    qt = quant_type(t)
    return Launch("moe", t, f"moe_matvec_{SUPPORTED[t]}",
                  ((nrows + MOE_MATVEC_ROWS - 1) // MOE_MATVEC_ROWS, n_pairs, 1), (THREADS, 1, 1),
                  (_ptr(table_ptr), _i32(which), _i32(nrows), _i32(ncols // qt.block_size), np.int64(qt.row_bytes(ncols)),
                   _ptr(x_ptr), _i32(x_stride), _i32(x_div), _ptr(scale_ptr), _ptr(y_ptr), _i32(y_stride)))


def plan_moe_down(layout: ExpertLayout, n_pairs: int, table_ptr: int, h_ptr: int, h_stride: int,
                  w_ptr: int, y_ptr: int, y_stride: int) -> list[Launch]:
    """y[p] = w[p] * (down_p . h[p])  (w_ptr 0: no scaling)."""
    if h_ptr % 16 or h_stride % 4:
        raise ModelError("moe hidden activations must be 16-byte aligned with a row stride that is a multiple of 4")
    if not 0 < n_pairs < 65536:
        raise ModelError(f"moe: {n_pairs} (token, slot) pairs: must be 1..65535")
    return [_moe_matvec(layout.down, 2, layout.n_embd, layout.n_ff, n_pairs, table_ptr, h_ptr, h_stride, 1,
                        w_ptr, y_ptr, y_stride)]


def plan_moe_combine(qtype, n_tokens: int, n_slots: int, n: int, src_ptr: int, out_ptr: int) -> list[Launch]:
    total = n_tokens * n
    return [Launch("moe", supported_qtype(qtype), "moe_combine", ((total + 255) // 256, 1, 1), (256, 1, 1),
                   (_ptr(src_ptr), _i32(n_tokens), _i32(n_slots), _i32(n), _ptr(out_ptr)))]


def _f32_arg(v: float) -> np.float32:
    return np.float32(v)


def plan_rms_norm(n_rows: int, n: int, x_ptr: int, x_stride: int, w_ptr: int, y_ptr: int, y_stride: int,
                  eps: float) -> list[Launch]:
    """y[t] = x[t] * (1 / sqrt(mean(x[t]^2) + eps)) * w for rows t < n_rows (cuda/norm.cu)."""
    return [Launch("norm", None, "rms_norm_f32", (n_rows, 1, 1), (THREADS, 1, 1),
                   (_ptr(x_ptr), _i32(x_stride), _ptr(w_ptr), _ptr(y_ptr), _i32(y_stride), _i32(n), _f32_arg(eps)))]


def plan_add_rms_norm(n_rows: int, n: int, x_ptr: int, r_ptr: int, r_scale: float, sum_ptr: int, w_ptr: int,
                      y_ptr: int, eps: float) -> list[Launch]:
    """sum = x + r * r_scale; y = rms_norm(sum) * w (rows of n contiguous floats)."""
    return [Launch("norm", None, "add_rms_norm_f32", (n_rows, 1, 1), (THREADS, 1, 1),
                   (_ptr(x_ptr), _ptr(r_ptr), _f32_arg(r_scale), _ptr(sum_ptr), _ptr(w_ptr), _ptr(y_ptr), _i32(n),
                    _f32_arg(eps)))]


# --- public API (torch tensors on a CUDA device) --------------------------------------------------------

def _cuda_u8(w: torch.Tensor, nbytes: int, what: str) -> torch.Tensor:
    if not isinstance(w, torch.Tensor) or not w.is_cuda or w.dtype != torch.uint8:
        raise ModelError(f"{what}: expected a uint8 CUDA tensor of raw quantized bytes")
    if not w.is_contiguous():
        raise ModelError(f"{what}: raw quantized bytes must be contiguous")
    if w.numel() != nbytes:
        raise ModelError(f"{what}: expected {nbytes} bytes, got {w.numel()}")
    return w


def _activations(x: torch.Tensor, cols: int, device: torch.device, what: str) -> torch.Tensor:
    """fp32, contiguous, 16-byte aligned [T, cols] on `device` (copies only when needed)."""
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if x.dim() != 2 or x.shape[1] != cols:
        raise ModelError(f"{what}: expected activations of shape [tokens, {cols}], got {tuple(x.shape)}")
    if x.device != device:
        raise ModelError(f"{what}: activations on {x.device}, weights on {device}")
    x = x.to(torch.float32).contiguous()
    if x.data_ptr() % 16:
        x = x.clone()
    return x


def _out(out: torch.Tensor | None, shape: tuple, dtype, device, what: str) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ModelError(f"{what}: out must be a contiguous {dtype} tensor of shape {tuple(shape)} on {device}")
    return out


def matvec(w_raw: torch.Tensor, qtype, shape, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T for a quantized W of `shape` (rows, cols): x [T, cols] (fp32, or cast to it),
    returns fp32 [T, rows]. Meant for decode (T <= 8 per launch; more tokens run in groups of 8)."""
    t, rows, cols, _, row_bytes = _matrix(qtype, shape)
    _cuda_u8(w_raw, rows * row_bytes, "matvec weight")
    x = _activations(x, cols, w_raw.device, "matvec")
    y = _out(out, (x.shape[0], rows), torch.float32, w_raw.device, "matvec")
    run(plan_matvec(t, (rows, cols), x.shape[0], w_raw.data_ptr(), x.data_ptr(), cols, y.data_ptr(), rows),
        w_raw.device)
    return y


def dequantize_cuda(raw: torch.Tensor, qtype, shape, dtype: torch.dtype = torch.float16,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Quantized matrix -> torch.float16 or torch.float32 tensor of `shape` on the same device."""
    t, rows, cols, _, row_bytes = _matrix(qtype, shape)
    _cuda_u8(raw, rows * row_bytes, "dequantize_cuda")
    if dtype not in (torch.float16, torch.float32):
        raise ModelError(f"dequantize_cuda: dtype must be torch.float16 or torch.float32, not {dtype}")
    y = _out(out, (rows, cols), dtype, raw.device, "dequantize_cuda")
    run(plan_dequant(t, (rows, cols), raw.data_ptr(), y.data_ptr(), cols, dtype == torch.float16), raw.device)
    return y


def linear(w_raw: torch.Tensor, qtype, shape, x: torch.Tensor, dequant_dtype: torch.dtype = torch.float32,
           scratch: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W.T for any number of tokens: matvec up to 8 tokens, else dequantize W into `scratch`
    (or a fresh tensor) and run one cuBLAS GEMM (prefill: the tokens routed to one expert)."""
    rows, cols = (int(s) for s in shape)
    x2 = x.unsqueeze(0) if x.dim() == 1 else x
    if x2.shape[0] <= MAX_NCOLS:
        return matvec(w_raw, qtype, shape, x2)
    wd = dequantize_cuda(w_raw, qtype, shape, dequant_dtype, out=scratch)
    return (x2.to(dequant_dtype) @ wd.T).float()


def _table(slot_ptrs: torch.Tensor, n_pairs: int) -> torch.Tensor:
    if not slot_ptrs.is_cuda or slot_ptrs.dtype not in (torch.int64, torch.uint64):
        raise ModelError("slot_ptrs: expected an int64 CUDA tensor of device addresses (gate, up, down per slot)")
    if slot_ptrs.numel() != 3 * n_pairs or not slot_ptrs.is_contiguous():
        raise ModelError(f"slot_ptrs: expected a contiguous [n_tokens, n_slots, 3] tensor ({3 * n_pairs} addresses), "
                         f"got shape {tuple(slot_ptrs.shape)}")
    return slot_ptrs


def moe_gate_up(slot_ptrs: torch.Tensor, layout: ExpertLayout, x: torch.Tensor, n_slots: int,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """h[t * n_slots + s] = silu(gate_(t,s) . x[t]) * (up_(t,s) . x[t]) -> fp32 [n_tokens * n_slots, n_ff]."""
    x = _activations(x, layout.n_embd, slot_ptrs.device, "moe_gate_up")
    n_pairs = x.shape[0] * n_slots
    _table(slot_ptrs, n_pairs)
    if layout.gate == layout.up:
        h = _out(out, (n_pairs, layout.n_ff), torch.float32, x.device, "moe_gate_up")
        run(plan_moe_gate_up(layout, n_pairs, n_slots, slot_ptrs.data_ptr(), x.data_ptr(), layout.n_embd,
                             h.data_ptr(), layout.n_ff), x.device)
        return h
    gu = torch.empty((2 * n_pairs, layout.n_ff), dtype=torch.float32, device=x.device)
    run(plan_moe_gate_up(layout, n_pairs, n_slots, slot_ptrs.data_ptr(), x.data_ptr(), layout.n_embd,
                         gu.data_ptr(), layout.n_ff), x.device)
    g, u = gu[:n_pairs], gu[n_pairs:]
    h = torch.nn.functional.silu(g) * u
    if out is not None:
        _out(out, (n_pairs, layout.n_ff), torch.float32, x.device, "moe_gate_up").copy_(h)
        return out
    return h


def moe_down(slot_ptrs: torch.Tensor, layout: ExpertLayout, h: torch.Tensor, weights: torch.Tensor | None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """out_slot[p] = weights[p] * (down_p . h[p]) -> fp32 [n_pairs, n_embd] (weights None: unscaled)."""
    n_pairs = h.shape[0]
    _table(slot_ptrs, n_pairs)
    h = _activations(h, layout.n_ff, slot_ptrs.device, "moe_down")
    w_ptr = 0
    if weights is not None:
        weights = weights.reshape(-1).to(torch.float32).contiguous()
        if weights.numel() != n_pairs or weights.device != h.device:
            raise ModelError(f"moe_down: expected {n_pairs} routing weights on {h.device}")
        w_ptr = weights.data_ptr()
    y = _out(out, (n_pairs, layout.n_embd), torch.float32, h.device, "moe_down")
    run(plan_moe_down(layout, n_pairs, slot_ptrs.data_ptr(), h.data_ptr(), layout.n_ff, w_ptr,
                      y.data_ptr(), layout.n_embd), h.device)
    return y


def moe_combine(slot_out: torch.Tensor, out: torch.Tensor | None = None, qtype=T.Q8_0) -> torch.Tensor:
    """out[t] = slot_out[t, 0] + slot_out[t, 1] + ... in slot order (fp32 [n_tokens, n_slots, n] -> [n_tokens, n]).
    `qtype` only picks which compiled module hosts the (type-independent) kernel."""
    if slot_out.dim() != 3 or slot_out.dtype != torch.float32 or not slot_out.is_cuda:
        raise ModelError("moe_combine: expected a fp32 CUDA tensor [n_tokens, n_slots, n]")
    slot_out = slot_out.contiguous()
    nt, ns, n = slot_out.shape
    y = _out(out, (nt, n), torch.float32, slot_out.device, "moe_combine")
    run(plan_moe_combine(qtype, nt, ns, n, slot_out.data_ptr(), y.data_ptr()), slot_out.device)
    return y


def moe_decode(slot_ptrs: torch.Tensor, layout: ExpertLayout, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One MoE layer's routed experts for a few tokens: x [T, n_embd], slot_ptrs int64 [T, S, 3]
    (device addresses of each selected expert's gate, up, down), weights [T, S] routing weights.
    Returns fp32 [T, n_embd] = sum over s in slot order of weights[t, s] * down(silu(gate x) * up x).
    Three (four if gate and up differ in type) launches, no host synchronisation."""
    if slot_ptrs.dim() != 3 or slot_ptrs.shape[2] != 3:
        raise ModelError(f"moe_decode: slot_ptrs must be [n_tokens, n_slots, 3], got {tuple(slot_ptrs.shape)}")
    nt, ns = int(slot_ptrs.shape[0]), int(slot_ptrs.shape[1])
    x2 = x.unsqueeze(0) if x.dim() == 1 else x
    if x2.shape[0] != nt:
        raise ModelError(f"moe_decode: {x2.shape[0]} tokens of activations but slot_ptrs has {nt}")
    if tuple(weights.shape) != (nt, ns):
        raise ModelError(f"moe_decode: weights must be [{nt}, {ns}], got {tuple(weights.shape)}")
    h = moe_gate_up(slot_ptrs, layout, x2, ns)
    y = moe_down(slot_ptrs, layout, h, weights)
    return moe_combine(y.view(nt, ns, layout.n_embd), qtype=layout.down)
