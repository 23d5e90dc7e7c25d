"""Launch plans: which entry point, grid and arguments each kernel call takes (pure Python).

A plan validates shapes and alignment and returns the :class:`~.launch.Launch` list that
``launch.run`` enqueues on a GPU, or that the host build of the same kernels runs in tests
(kernels/emulator.py), so the CUDA backend's whole code path is exercised without a GPU.
Pointers are plain ints (``tensor.data_ptr()``); nothing here touches a device.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T

from ..errors import ModelError
from ..format.quants import quant_type
from .launch import ALIGNMENT, MAX_NCOLS, NCHUNK, SUPPORTED, Launch, supported_qtype

# mirrors of compile-time constants in cuda/*.cu (checked by tests/test_kernels_emulated.py)
THREADS = 128                # PROMOE_THREADS: 4 warps per CTA
DEQUANT_THREADS = 256        # DEQUANT_THREADS
Q8_BLOCK = 32                # PROMOE_Q8_BLOCK: activation values per q8 scale
MOE_GATE_UP_ROWS = 2         # rows of gate (and of up) per thread group
MOE_MATVEC_ROWS = 4          # rows per thread group of moe_matvec / moe_down_combine
ATTN_SPLIT = 256             # positions per attention split
ATTN_MAX_DK = 576            # the largest key head the attention kernel holds in shared memory


def matvec_rows_per_group(ncols: int) -> int:
    """Rows of W per thread group of matvec_<type>_ncols<ncols> (cuda/matvec.cu)."""
    return 4 if ncols <= 2 else 2


def threads_per_row(qtype, cols: int) -> int:
    """Threads that share one row (a power of two, 8..128): the fewest idle threads over the row's
    (block, chunk) items, ties to the larger group (fewer rows in flight, more coalesced loads).
    A 4096-wide Q4_K row has 128 items: 128 threads; 768 wide: 24 items, 8 threads of 3 items."""
    t = supported_qtype(qtype)
    items = cols // quant_type(t).block_size * NCHUNK[t]
    best, best_idle = THREADS, 1.0
    for tpr in (128, 64, 32, 16, 8):
        rounds = -(-items // tpr)
        idle = 1.0 - items / (rounds * tpr)
        if idle < best_idle - 1e-9:
            best, best_idle = tpr, idle
    return best


def _ptr(p: int) -> np.uint64:
    return np.uint64(p)


def _i32(v: int) -> np.int32:
    if not -2**31 <= v < 2**31:
        raise ModelError(f"kernel argument {v} does not fit in 32 bits")
    return np.int32(v)


def _f32(v: float) -> np.float32:
    return np.float32(v)


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


# --- activations -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class F32Act:
    """fp32 activations: row t at ptr + 4 * t * stride (16-byte aligned, stride a multiple of 4)."""
    ptr: int
    stride: int

    def check(self, what: str) -> None:
        if self.ptr % 16 or self.stride % 4:
            raise ModelError(f"{what}: fp32 activations must be 16-byte aligned with a row stride that is a "
                             f"multiple of 4")

    def rows(self, t0: int) -> "F32Act":
        return F32Act(self.ptr + 4 * t0 * self.stride, self.stride)

    def args(self) -> tuple:
        return (_ptr(self.ptr), _i32(self.stride))


@dataclass(frozen=True)
class Q8Act:
    """q8 activations (quantize.cu): int8 row t at q_ptr + t * q_stride, its scales (one per 32
    values) at d_ptr + 4 * t * d_stride."""
    q_ptr: int
    q_stride: int
    d_ptr: int
    d_stride: int

    def check(self, what: str) -> None:
        if self.q_ptr % 16 or self.q_stride % 16 or self.d_ptr % 4:
            raise ModelError(f"{what}: q8 activations must be 16-byte aligned rows")

    def rows(self, t0: int) -> "Q8Act":
        return Q8Act(self.q_ptr + t0 * self.q_stride, self.q_stride, self.d_ptr + 4 * t0 * self.d_stride, self.d_stride)

    def args(self) -> tuple:
        return (_ptr(self.q_ptr), _i32(self.q_stride), _ptr(self.d_ptr), _i32(self.d_stride))


def plan_quantize_q8(x: F32Act, n: int, ntok: int, out: Q8Act) -> list[Launch]:
    """x [ntok, n] fp32 -> int8 + one scale per 32 values, rows of n bytes / n/32 scales."""
    if n % Q8_BLOCK:
        raise ModelError(f"q8 activations need a width that is a multiple of {Q8_BLOCK}, got {n}")
    x.check("quantize")
    out.check("quantize")
    if out.q_stride != n or out.d_stride != n // Q8_BLOCK:
        raise ModelError("quantize: q8 rows must be packed (n bytes, n / 32 scales per row)")
    nb = n // Q8_BLOCK
    return [Launch("quantize", None, "quantize_q8_f32", (-(-nb // THREADS), ntok, 1), (THREADS, 1, 1),
                   (*x.args(), _i32(n), _ptr(out.q_ptr), _ptr(out.d_ptr)))]


# --- dense products ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class MatvecTarget:
    """One matrix of a matvec launch: W at w_ptr ([rows, cols] GGUF blocks), y rows of y_stride floats."""
    w_ptr: int
    rows: int
    y_ptr: int
    y_stride: int


def plan_matvec(qtype, cols: int, ntok: int, targets: list[MatvecTarget], x) -> list[Launch]:
    """y_i[t, :rows_i] = W_i @ x[t] for t < ntok, for up to three matrices of one quant type and
    width sharing the input x (F32Act or Q8Act): one launch per group of up to 8 tokens."""
    if not 1 <= len(targets) <= 3:
        raise ModelError(f"matvec: 1 to 3 matrices per launch, got {len(targets)}")
    t, _, cols, nblocks, row_bytes = _matrix(qtype, (1, cols))
    for tg in targets:
        _check_align(t, tg.w_ptr, "matvec weight")
        if tg.rows <= 0:
            raise ModelError(f"matvec: empty matrix ({tg.rows} rows)")
    x.check("matvec")
    q8 = isinstance(x, Q8Act)
    tpr = threads_per_row(t, cols)
    pad = list(targets) + [MatvecTarget(targets[0].w_ptr, 0, targets[0].y_ptr, 0)] * (3 - len(targets))
    out = []
    for t0 in range(0, ntok, MAX_NCOLS):
        n = min(MAX_NCOLS, ntok - t0)
        rpc = THREADS // tpr * matvec_rows_per_group(n)
        nb = [-(-tg.rows // rpc) for tg in pad]
        args = (*(_ptr(tg.w_ptr) for tg in pad), *(_i32(tg.rows) for tg in pad), _i32(nb[0]), _i32(nb[1]),
                np.int64(row_bytes), _i32(nblocks), *x.rows(t0).args(),
                *(_ptr(tg.y_ptr + 4 * t0 * tg.y_stride) for tg in pad), *(_i32(tg.y_stride) for tg in pad),
                _i32(tpr))
        out.append(Launch("matvec", t, f"matvec{'_q8' if q8 else ''}_{SUPPORTED[t]}_ncols{n}", (sum(nb), 1, 1),
                          (THREADS, 1, 1), args))
    return out


def plan_dequant(qtype, shape, w_ptr: int, y_ptr: int, y_stride: int, fp16: bool) -> list[Launch]:
    t, rows, cols, nblocks, row_bytes = _matrix(qtype, shape)
    _check_align(t, w_ptr, "dequant weight")
    if y_ptr % (8 if fp16 else 16) or y_stride % 4:
        raise ModelError("dequant output must be 16-byte (fp32) / 8-byte (fp16) aligned, row stride a multiple of 4")
    n = rows * nblocks * NCHUNK[t]
    return [Launch("dequant", t, f"dequant_{SUPPORTED[t]}_{'f16' if fp16 else 'f32'}",
                   (-(-n // DEQUANT_THREADS), 1, 1), (DEQUANT_THREADS, 1, 1),
                   (_ptr(w_ptr), np.int64(row_bytes), _i32(rows), _i32(nblocks), _ptr(y_ptr), np.int64(y_stride)))]


def plan_get_rows(qtype, shape, w_ptr: int, ids_ptr: int, n_ids: int, y_ptr: int, y_stride: int) -> list[Launch]:
    """y[r] = dequantized row ids[r] of W (int32 ids on the device): the token embedding."""
    t, rows, cols, nblocks, row_bytes = _matrix(qtype, shape)
    _check_align(t, w_ptr, "get_rows weight")
    if y_ptr % 16 or y_stride % 4 or ids_ptr % 4:
        raise ModelError("get_rows: output must be 16-byte aligned with a row stride that is a multiple of 4")
    n = n_ids * nblocks * NCHUNK[t]
    return [Launch("dequant", t, f"get_rows_{SUPPORTED[t]}_f32", (-(-n // DEQUANT_THREADS), 1, 1),
                   (DEQUANT_THREADS, 1, 1),
                   (_ptr(w_ptr), np.int64(row_bytes), _ptr(ids_ptr), _i32(n_ids), _i32(nblocks), _ptr(y_ptr),
                    np.int64(y_stride)))]


def plan_rms_norm(n_rows: int, n: int, x_ptr: int, x_stride: int, w_ptr: int, y_ptr: int, y_stride: int,
                  eps: float) -> list[Launch]:
    """y[t] = x[t] * (1 / sqrt(mean(x[t]^2) + eps)) * w for rows t < n_rows (cuda/norm.cu)."""
    return [Launch("norm", None, "rms_norm_f32", (n_rows, 1, 1), (THREADS, 1, 1),
                   (_ptr(x_ptr), _i32(x_stride), _ptr(w_ptr), _ptr(y_ptr), _i32(y_stride), _i32(n), _f32(eps)))]


def plan_add_rms_norm(n_rows: int, n: int, x_ptr: int, r_ptr: int, r_scale: float, sum_ptr: int, w_ptr: int,
                      y_ptr: int, eps: float) -> list[Launch]:
    """sum = x + r * r_scale; y = rms_norm(sum) * w (rows of n contiguous floats)."""
    return [Launch("norm", None, "add_rms_norm_f32", (n_rows, 1, 1), (THREADS, 1, 1),
                   (_ptr(x_ptr), _ptr(r_ptr), _f32(r_scale), _ptr(sum_ptr), _ptr(w_ptr), _ptr(y_ptr), _i32(n),
                    _f32(eps)))]


# --- routed experts ------------------------------------------------------------------------------------

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


@dataclass(frozen=True)
class Route:
    """Where a layer's pairs go, all on the device: ids [n_pairs] int64 (the router's top-k, pair p =
    token p // n_slots, slot p % n_slots), table [E] int32 (expert -> slot, -1 absent), skip [E]
    int32 (non-zero: computed elsewhere) or 0 for none."""
    ids_ptr: int
    table_ptr: int
    skip_ptr: int
    n_slots: int

    def args(self) -> tuple:
        return (_ptr(self.ids_ptr), _ptr(self.table_ptr), _ptr(self.skip_ptr))


def _pairs(n_pairs: int) -> None:
    if not 0 < n_pairs < 65536:
        raise ModelError(f"moe: {n_pairs} (token, slot) pairs: must be 1..65535")


def plan_moe_gate_up(layout: ExpertLayout, route: Route, n_pairs: int, gate_base: int, up_base: int, stride: int,
                     x, h_ptr: int, h_stride: int) -> list[Launch]:
    """h[p] = silu(gate_p . x[p // n_slots]) * (up_p . x[p // n_slots]) for the pairs this route
    computes; gate and up must share a quant type (else plan_moe_matvec twice)."""
    if layout.gate != layout.up:
        raise ModelError("moe_gate_up: gate and up differ in quant type")
    _pairs(n_pairs)
    x.check("moe_gate_up")
    t = layout.gate
    tpr = threads_per_row(t, layout.n_embd)
    rpc = THREADS // tpr * MOE_GATE_UP_ROWS
    q8 = isinstance(x, Q8Act)
    return [Launch("moe", t, f"moe_gate_up_{SUPPORTED[t]}{'_q8' if q8 else ''}", (-(-layout.n_ff // rpc), n_pairs, 1),
                   (THREADS, 1, 1),
                   (*route.args(), _ptr(gate_base), _ptr(up_base), np.int64(stride), _i32(route.n_slots),
                    _i32(layout.n_ff), _i32(layout.n_embd // quant_type(t).block_size),
                    np.int64(layout.row_bytes("gate")), *x.args(), _ptr(h_ptr), _i32(h_stride), _i32(tpr)))]


def plan_moe_matvec(qtype, rows: int, cols: int, route: Route, n_pairs: int, base: int, stride: int, x, x_div: int,
                    scale_ptr: int, y_ptr: int, y_stride: int, done_ptr: int = 0) -> list[Launch]:
    """y[p] = scale[p] * (W_p . x[p // x_div]) (scale_ptr 0: unscaled); done[p] = whether pair p was
    computed (done_ptr 0: not recorded)."""
    t, rows, cols, nblocks, row_bytes = _matrix(qtype, (rows, cols))
    _pairs(n_pairs)
    x.check("moe_matvec")
    tpr = threads_per_row(t, cols)
    rpc = THREADS // tpr * MOE_MATVEC_ROWS
    q8 = isinstance(x, Q8Act)
    return [Launch("moe", t, f"moe_matvec_{SUPPORTED[t]}{'_q8' if q8 else ''}", (-(-rows // rpc), n_pairs, 1),
                   (THREADS, 1, 1),
                   (*route.args(), _ptr(base), np.int64(stride), _i32(rows), _i32(nblocks), np.int64(row_bytes),
                    *x.args(), _i32(x_div), _ptr(scale_ptr), _ptr(y_ptr), _i32(y_stride), _ptr(done_ptr), _i32(tpr)))]


def plan_moe_down_combine(layout: ExpertLayout, route: Route, n_tokens: int, down_base: int, stride: int, h,
                          w_ptr: int, out_ptr: int, out_stride: int) -> list[Launch]:
    """out[t] = sum over slots in order of w[t, s] * (down_(t,s) . h[t * n_slots + s]): every expert
    of the route on the device (skip is not read)."""
    _pairs(n_tokens * route.n_slots)
    h.check("moe_down_combine")
    t = layout.down
    tpr = threads_per_row(t, layout.n_ff)
    rpc = THREADS // tpr * MOE_MATVEC_ROWS
    q8 = isinstance(h, Q8Act)
    return [Launch("moe", t, f"moe_down_combine_{SUPPORTED[t]}{'_q8' if q8 else ''}",
                   (-(-layout.n_embd // rpc), n_tokens, 1), (THREADS, 1, 1),
                   (_ptr(route.ids_ptr), _ptr(route.table_ptr), _ptr(down_base), np.int64(stride),
                    _i32(route.n_slots), _i32(layout.n_embd), _i32(layout.n_ff // quant_type(t).block_size),
                    np.int64(layout.row_bytes("down")), *h.args(), _ptr(w_ptr), _ptr(out_ptr), _i32(out_stride),
                    _i32(tpr)))]


def plan_moe_combine(done_ptr: int, y_ptr: int, ext_ptr: int, w_ptr: int, n_tokens: int, n_slots: int, n: int,
                     out_ptr: int) -> list[Launch]:
    """out[t] = slot-ordered sum of y[t, s] (done) or w[t, s] * ext[t, s] (computed elsewhere)."""
    total = n_tokens * n
    return [Launch("moe_combine", None, "moe_combine", (-(-total // 256), 1, 1), (256, 1, 1),
                   (_ptr(done_ptr), _ptr(y_ptr), _ptr(ext_ptr), _ptr(w_ptr), _i32(n_tokens), _i32(n_slots), _i32(n),
                    _ptr(out_ptr)))]


# --- attention ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Heads:
    """A [T, H, D] fp32 tensor by pointer and strides (floats)."""
    ptr: int
    n_heads: int
    tstride: int
    hstride: int


def plan_rope(xs: list[Heads], outs: list[Heads], n_tokens: int, head_dim: int, n_dims: int, neox: bool, pos_ptr: int,
              cos_ptr: int, sin_ptr: int) -> list[Launch]:
    """outs[i] = RoPE(xs[i]) (one or two tensors: q and k) at positions pos[t] (int32 on the device),
    angles from tables [n_pos, n_dims / 2]; dims past n_dims are copied."""
    if not 1 <= len(xs) <= 2 or len(xs) != len(outs):
        raise ModelError("rope: one or two tensors per launch")
    if n_dims % 2 or head_dim % 2 or n_dims > head_dim:
        raise ModelError(f"rope: {n_dims} rotated dims of a {head_dim}-wide head")
    pad_in = list(xs) + [Heads(xs[0].ptr, 0, 0, 0)] * (2 - len(xs))
    pad_out = list(outs) + [Heads(outs[0].ptr, 0, 0, 0)] * (2 - len(outs))
    total = n_tokens * sum(x.n_heads for x in xs) * (head_dim // 2)
    args = []
    for x, y in zip(pad_in, pad_out):
        args += [_ptr(x.ptr), _i32(x.n_heads), _i32(x.tstride), _i32(x.hstride), _ptr(y.ptr), _i32(y.tstride),
                 _i32(y.hstride)]
    return [Launch("rope", None, "rope_f32", (-(-total // THREADS), 1, 1), (THREADS, 1, 1),
                   (*args, _i32(n_tokens), _i32(head_dim), _i32(n_dims), _i32(int(neox)), _ptr(pos_ptr),
                    _ptr(cos_ptr), _ptr(sin_ptr)))]


def _cache_kind(elt: int) -> str:
    if elt not in (2, 4):
        raise ModelError(f"KV cache elements of {elt} bytes: the kernels hold fp16 or fp32")
    return "f16" if elt == 2 else "f32"


def plan_kv_store(k: Heads, v: Heads, n_tokens: int, dk: int, dv: int, pos_ptr: int, kc_ptr: int, vc_ptr: int,
                  n_alloc: int, elt: int) -> list[Launch]:
    """k [T, Hkv, dk], v [T, Hkv, dv] into the cache (K [Hkv, n_alloc, dk], V [Hkv, n_alloc, dv]) at pos[t]."""
    total = n_tokens * k.n_heads * (dk + dv)
    return [Launch("attention", None, f"kv_store_{_cache_kind(elt)}", (-(-total // 256), 1, 1), (256, 1, 1),
                   (_ptr(k.ptr), _i32(k.tstride), _i32(k.hstride), _ptr(v.ptr), _i32(v.tstride), _i32(v.hstride),
                    _i32(n_tokens), _i32(k.n_heads), _i32(dk), _i32(dv), _ptr(pos_ptr), _ptr(kc_ptr), _ptr(vc_ptr),
                    _i32(n_alloc)))]


def attention_splits(n_alloc: int) -> int:
    return -(-n_alloc // ATTN_SPLIT)


def plan_attention(q: Heads, n_tokens: int, hkv: int, dk: int, dv: int, kc_ptr: int, vc_ptr: int, n_alloc: int,
                   elt: int, pos_ptr: int, scale: float, part_o_ptr: int, part_ml_ptr: int, out_ptr: int,
                   out_tstride: int) -> list[Launch]:
    """softmax(scale * q K[:pos[t] + 1]^T) V per query t and head, grouped heads sharing K/V: a
    split pass over the whole cache (splits past pos[t] exit at once) and a merge. Workspace:
    part_o [T, H, n_split, dv], part_ml [T, H, n_split, 2] floats."""
    if dk > ATTN_MAX_DK:
        raise ModelError(f"attention: key heads of {dk} exceed the kernel's {ATTN_MAX_DK}")
    if q.n_heads % hkv:
        raise ModelError(f"attention: {q.n_heads} query heads over {hkv} KV heads")
    n_split = attention_splits(n_alloc)
    return [Launch("attention", None, f"attn_split_{_cache_kind(elt)}", (n_split, q.n_heads, n_tokens),
                   (THREADS, 1, 1),
                   (_ptr(q.ptr), _i32(q.tstride), _i32(q.hstride), _ptr(kc_ptr), _ptr(vc_ptr), _i32(q.n_heads),
                    _i32(hkv), _i32(dk), _i32(dv), _i32(n_alloc), _ptr(pos_ptr), _f32(scale), _ptr(part_o_ptr),
                    _ptr(part_ml_ptr))),
            Launch("attention", None, "attn_merge", (q.n_heads, n_tokens, 1), (THREADS, 1, 1),
                   (_ptr(part_o_ptr), _ptr(part_ml_ptr), _i32(n_split), _i32(q.n_heads), _i32(dv), _ptr(out_ptr),
                    _i32(out_tstride)))]
