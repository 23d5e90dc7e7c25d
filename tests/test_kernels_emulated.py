"""The CUDA kernels of promoe_gguf/kernels/cuda/*.cu run on the CPU (tests/kernels_host: one fiber per
CUDA thread), driven by the launcher's own plans (kernels/plans.py), against independent oracles:
gguf-py-equal dequantization (dequantize_torch, itself checked against gguf-py), gguf-py's Q8_0
quantizer, float64 products and attention, llama.cpp's RoPE (ggml through the CPU backend).

No GPU needed (only g++). What this proves: element order of every block decoder, fp32 dequant bit
for bit, the matvec / MoE / attention index math, thread groups of every width, tails, the
reductions, routing on the device (ids, slot tables, skip masks), every load in bounds and naturally
aligned (weights placed at the least alignment the launcher accepts). What it cannot: GPU-only
behaviour (the real PTX of the built-ins, timing): scripts/gpu_check.sh does that on a GPU.
"""
from __future__ import annotations

import ctypes

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from kernel_emu import Emu, build_emulator
from promoe_gguf.errors import ModelError
from promoe_gguf.format.quants import dequantize_torch, quant_type
from promoe_gguf.kernels import launch
from promoe_gguf.kernels import plans as P
from promoe_gguf.kernels.testdata import REL_L2_BOUND, random_blocks, reference_matmul, reference_moe, rel_l2

TYPES = list(launch.SUPPORTED)


@pytest.fixture(scope="module")
def emu() -> Emu:
    return Emu(build_emulator())


def _placed(raw: torch.Tensor, align: int) -> tuple[torch.Tensor, torch.Tensor]:
    """raw copied into a buffer at an address that is `align`-aligned but not 2*align-aligned (as
    misaligned as the launcher allows). Returns (backing buffer, the placed view)."""
    buf = torch.zeros(raw.numel() + 64, dtype=torch.uint8)
    base = buf.data_ptr()
    off = next(o for o in range(64) if (base + o) % align == 0 and ((base + o) % (2 * align) or align >= 32))
    view = buf[off:off + raw.numel()]
    view.copy_(raw)
    return buf, view


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _q8(emu, x: torch.Tensor):
    """x [T, n] quantized by the kernel: (xq int8, xd float32, Q8Act)."""
    T, n = x.shape
    xq, xd = torch.empty(T, n, dtype=torch.int8), torch.empty(T, n // 32)
    act = P.Q8Act(xq.data_ptr(), n, xd.data_ptr(), n // 32)
    emu.run(P.plan_quantize_q8(P.F32Act(x.data_ptr(), n), n, T, act), [x])
    return xq, xd, act


def _dq8(xq: torch.Tensor, xd: torch.Tensor) -> torch.Tensor:
    """The values the q8 kernels multiply with: xq * its block's scale (exact in float64)."""
    T, n = xq.shape
    return (xq.double().view(T, -1, 32) * xd.double().view(T, -1, 1)).view(T, n)


# --- consistency of the constants mirrored in plans.py ------------------------------------------------

def test_launcher_constants_match_kernels(emu):
    L = emu.lib
    assert L.emu_threads() == P.THREADS
    assert L.emu_dequant_threads() == P.DEQUANT_THREADS
    assert L.emu_moe_gate_up_rows() == P.MOE_GATE_UP_ROWS
    assert L.emu_moe_matvec_rows() == P.MOE_MATVEC_ROWS
    assert L.emu_q8_block() == P.Q8_BLOCK
    assert L.emu_attn_split() == P.ATTN_SPLIT
    assert L.emu_attn_max_dk() == P.ATTN_MAX_DK
    for n in range(1, launch.MAX_NCOLS + 1):
        assert L.emu_matvec_rows_per_group(n) == P.matvec_rows_per_group(n)
    for t, name in launch.SUPPORTED.items():
        out = (ctypes.c_int * 5)()
        assert L.emu_traits(name.encode(), out) == 0
        qk, ts, nchunk, nrun, rps = list(out)
        qt = quant_type(t)
        assert (qk, ts) == (qt.block_size, qt.type_size), t.name
        assert nchunk == launch.NCHUNK[t], t.name
        assert nchunk * nrun * 4 == qk, f"{t.name}: the chunks must cover the block"
        assert nrun % rps == 0 and 4 * rps <= 32, f"{t.name}: a scale group must fit one q8 block"
        for op in launch.OPS:
            if op not in launch.UNTYPED_OPS:
                for k in launch.kernel_names(op, t):
                    assert L.emu_has_kernel(k.encode()), k
    for op in launch.UNTYPED_OPS:
        for k in launch.kernel_names(op):
            assert L.emu_has_kernel(k.encode()), k


# --- dequant, get_rows, quantize -----------------------------------------------------------------------

@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequant_bit_exact(emu, qtype):
    qt = quant_type(qtype)
    rows, cols = 5, 3 * qt.block_size
    raw = random_blocks(qtype, (rows, cols), _gen(int(qtype)))
    buf, w = _placed(raw, P.ALIGNMENT[qtype])
    ref = dequantize_torch(raw, qtype, (rows, cols))
    for fp16 in (False, True):
        y = torch.full((rows + 1, cols), float("nan"), dtype=torch.float16 if fp16 else torch.float32)
        emu.run(P.plan_dequant(qtype, (rows, cols), w.data_ptr(), y.data_ptr(), cols, fp16), [buf])
        got, want = y[:rows], (ref.half() if fp16 else ref)
        assert torch.isnan(y[rows].float()).all(), "wrote past the output"
        bad = (got.view(torch.int16) != want.view(torch.int16)) if fp16 else (got.view(torch.int32) != want.view(torch.int32))
        assert not bad.any(), (f"{qtype.name} {'f16' if fp16 else 'f32'}: {int(bad.sum())} values differ, first at "
                               f"{tuple(bad.nonzero()[0].tolist())}: {got[bad][0].item()} vs {want[bad][0].item()}")


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K, T.Q8_0, T.IQ4_XS], ids=lambda t: t.name)
def test_get_rows_bit_exact(emu, qtype):
    """The embedding kernel: rows picked by int32 ids on the device, dequantized bit for bit."""
    qt = quant_type(qtype)
    rows, cols = 9, 2 * qt.block_size
    raw = random_blocks(qtype, (rows, cols), _gen(11))
    buf, w = _placed(raw, P.ALIGNMENT[qtype])
    ids = torch.tensor([7, 0, 7, 3], dtype=torch.int32)
    y = torch.full((5, cols), float("nan"))
    emu.run(P.plan_get_rows(qtype, (rows, cols), w.data_ptr(), ids.data_ptr(), 4, y.data_ptr(), cols), [buf, ids])
    assert torch.isnan(y[4]).all()
    assert torch.equal(y[:4], dequantize_torch(raw, qtype, (rows, cols))[ids.long()])


@pytest.mark.parametrize("scale", [1.0, 1e-3, 50.0])
def test_quantize_q8_equals_gguf_q8_0(emu, scale):
    """The activation quantizer rounds exactly as ggml's reference Q8_0 (gguf-py's port of it): the
    same int8 values; its scale is the fp32 one (Q8_0 stores it rounded to fp16). An all-zero
    block gives zeros."""
    x = torch.randn(3, 256, generator=_gen(4)) * scale
    x[1, 64:96] = 0.0
    xq, xd, _ = _q8(emu, x)
    blocks = gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType.Q8_0).reshape(3, 8, 34)
    assert np.array_equal(xq.numpy().reshape(3, 8, 32), blocks[..., 2:].view(np.int8))
    assert np.array_equal(xd.numpy().astype(np.float16), blocks[..., :2].copy().view(np.float16)[..., 0])
    assert (xq[1, 64:96] == 0).all() and xd[1, 2] == 0


# --- matvec -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matvec_all_ncols(emu, qtype):
    """1..9 tokens (9 = a launch of 8, then 1), fp32 and q8 activations, against float64 products
    (q8: with the quantized activations, so only the kernel's own arithmetic is measured)."""
    qt = quant_type(qtype)
    rows, cols = 7, (3 if qt.block_size == 256 else 5) * qt.block_size
    raw = random_blocks(qtype, (rows, cols), _gen(100 + int(qtype)))
    buf, w = _placed(raw, P.ALIGNMENT[qtype])
    g = _gen(7)
    for ntok in range(1, 10):
        x = torch.randn(ntok, cols, generator=g)
        xq, xd, q8 = _q8(emu, x)
        for act, xref in ((P.F32Act(x.data_ptr(), cols), x), (q8, _dq8(xq, xd))):
            y = torch.full((ntok + 1, rows), float("nan"))
            emu.run(P.plan_matvec(qtype, cols, ntok, [P.MatvecTarget(w.data_ptr(), rows, y.data_ptr(), rows)], act),
                    [buf, x, xq, xd])
            assert torch.isnan(y[ntok]).all(), "wrote past the output"
            assert not torch.isnan(y[:ntok]).any(), f"{qtype.name} ncols={ntok}: rows left unwritten"
            err = rel_l2(y[:ntok], reference_matmul(raw, qtype, (rows, cols), xref))
            assert err < REL_L2_BOUND[qtype], f"{qtype.name} ncols={ntok} {type(act).__name__}: rel L2 {err:.2e}"


@pytest.mark.parametrize("qtype,cols", [(T.Q4_K, 768), (T.Q4_K, 2048), (T.Q8_0, 2880), (T.Q6_K, 14336),
                                        (T.Q5_0, 4096)], ids=str)
def test_matvec_three_matrices_every_group_width(emu, qtype, cols):
    """q, k and v in one launch (different row counts, one input), at widths whose rows take 8 to
    128 threads: every output row written once, each within the bound."""
    g = _gen(cols)
    sizes = (6, 3, 5)
    raws = [random_blocks(qtype, (r, cols), g) for r in sizes]
    x = torch.randn(2, cols, generator=g)
    ys = [torch.full((2, r), float("nan")) for r in sizes]
    plan = P.plan_matvec(qtype, cols, 2, [P.MatvecTarget(w.data_ptr(), r, y.data_ptr(), r)
                                          for w, r, y in zip(raws, sizes, ys)], P.F32Act(x.data_ptr(), cols))
    assert len(plan) == 1
    emu.run(plan, [*raws, x])
    for raw, r, y in zip(raws, sizes, ys):
        err = rel_l2(y, reference_matmul(raw, qtype, (r, cols), x))
        assert err < REL_L2_BOUND[qtype] / 5, f"{qtype.name} {cols}: rel L2 {err:.2e} (tpr {P.threads_per_row(qtype, cols)})"


def test_threads_per_row_keeps_threads_busy():
    assert P.threads_per_row(T.Q4_K, 4096) == 128            # 128 items
    assert P.threads_per_row(T.Q4_K, 768) == 8               # Qwen3-30B-A3B's expert width: 24 items
    assert P.threads_per_row(T.Q4_K, 2048) == 64             # 64 items
    for qt, cols in ((T.Q4_K, 768), (T.Q8_0, 2880), (T.Q6_K, 14336), (T.Q4_0, 2048)):
        items = cols // quant_type(qt).block_size * launch.NCHUNK[qt]
        tpr = P.threads_per_row(qt, cols)
        assert items / (-(-items // tpr) * tpr) >= 0.9, (qt.name, cols, tpr)


def test_plans_reject_bad_input():
    raw = random_blocks(T.Q4_K, (2, 256))
    x = P.F32Act(0, 256)
    with pytest.raises(ModelError, match="16-byte aligned"):
        P.plan_matvec(T.Q4_K, 256, 1, [P.MatvecTarget(raw.data_ptr() + 4, 2, 0, 2)], x)
    with pytest.raises(ModelError, match="activations"):
        P.plan_matvec(T.Q6_K, 256, 1, [P.MatvecTarget(raw.data_ptr(), 2, 0, 2)], P.F32Act(8, 256))
    with pytest.raises(ModelError, match="no CUDA kernel"):
        P.plan_matvec(T.F16, 256, 1, [P.MatvecTarget(0, 2, 0, 2)], x)
    with pytest.raises(ModelError, match="1 to 3 matrices"):
        P.plan_matvec(T.Q4_K, 256, 1, [P.MatvecTarget(0, 2, 0, 2)] * 4, x)
    with pytest.raises(ModelError, match="multiple of 32"):
        P.plan_quantize_q8(x, 100, 1, P.Q8Act(0, 100, 0, 3))
    with pytest.raises(ModelError, match="key heads"):
        P.plan_attention(P.Heads(0, 1, 600, 600), 1, 1, 600, 512, 0, 0, 8, 2, 0, 1.0, 0, 0, 0, 512)


# --- MoE, routed on the device -------------------------------------------------------------------------

MOE_LAYOUTS = [
    # gate, up, down, n_embd, n_ff, expert ids per token (slot order)
    (T.Q8_0, T.Q8_0, T.Q8_0, 64, 96, [[0, 2, 1], [3, 3, 0], [1, 0, 2]]),   # token 1 uses expert 3 twice
    (T.Q4_K, T.Q4_K, T.Q6_K, 256, 768, [[0, 2], [1, 1]]),                 # Q4_K_M style, a 768-wide down
    (T.Q4_K, T.Q4_K, T.Q5_0, 256, 96, [[2, 0], [3, 2]]),                  # down falls back to Q5_0
    (T.IQ4_XS, T.IQ4_XS, T.Q2_K, 256, 256, [[1, 3]]),
    (T.Q4_K, T.Q5_K, T.Q3_K, 256, 256, [[0, 1]]),                         # gate, up types differ: unfused
    (T.IQ2_XXS, T.IQ2_XXS, T.IQ3_S, 256, 512, [[0, 2], [3, 1]]),          # a 2-3-bit "dynamic" mix
    (T.IQ1_M, T.IQ1_S, T.IQ2_S, 256, 256, [[1, 0]]),
    (T.MXFP4, T.MXFP4, T.MXFP4, 64, 96, [[2, 1], [0, 2]]),                # gpt-oss's experts (17-byte blocks)
]


class _Layer:
    """n_exp experts packed in slots (gate, up, down at fixed offsets, a slot stride), placed in an
    arena in shuffled slot order, with the slot table saying where each expert is."""

    def __init__(self, layout: P.ExpertLayout, n_exp: int, g, absent=()):
        self.layout = layout
        mats = [("gate", (layout.n_ff, layout.n_embd)), ("up", (layout.n_ff, layout.n_embd)),
                ("down", (layout.n_embd, layout.n_ff))]
        self.offs, pos = {}, 0
        for which, shape in mats:
            self.offs[which] = pos
            pos = -(-(pos + layout.nbytes(which)) // 256) * 256
        self.stride = -(-pos // 4096) * 4096
        slots = torch.randperm(n_exp, generator=g).tolist()
        self.arena = torch.zeros((n_exp, self.stride), dtype=torch.uint8)
        self.dense = []
        self.table = torch.full((n_exp,), -1, dtype=torch.int32)
        for e in range(n_exp):
            d = {}
            for which, shape in mats:
                qt = getattr(layout, which)
                raw = random_blocks(qt, shape, g, scale=0.05)
                off = self.offs[which]
                self.arena[slots[e], off:off + raw.numel()] = raw
                d[which] = dequantize_torch(raw, qt, shape)
            self.dense.append(d)
            if e not in absent:
                self.table[e] = slots[e]

    def base(self, which: str) -> int:
        return self.arena.data_ptr() + self.offs[which]


def _gate_up(emu, lay: _Layer, route: P.Route, n_pairs: int, act, readable: list) -> torch.Tensor:
    L = lay.layout
    h = torch.full((n_pairs + 1, L.n_ff), float("nan"))
    readable = [lay.arena, lay.table, *readable]
    if L.gate == L.up:
        emu.run(P.plan_moe_gate_up(L, route, n_pairs, lay.base("gate"), lay.base("up"), lay.stride, act, h.data_ptr(),
                                   L.n_ff), readable)
        assert torch.isnan(h[n_pairs]).all()
        return h[:n_pairs].clone()
    gu = torch.full((2, n_pairs, L.n_ff), float("nan"))
    for i, which in enumerate(("gate", "up")):
        emu.run(P.plan_moe_matvec(getattr(L, which), L.n_ff, L.n_embd, route, n_pairs, lay.base(which), lay.stride, act,
                                  route.n_slots, 0, gu[i].data_ptr(), L.n_ff), readable)
    return torch.nn.functional.silu(gu[0]) * gu[1]


@pytest.mark.parametrize("q8", [False, True], ids=["f32", "q8"])
@pytest.mark.parametrize("gate,up,down,n_embd,n_ff,slots", MOE_LAYOUTS,
                         ids=lambda v: getattr(v, "name", None) or (str(v) if isinstance(v, int) else "slots"))
def test_moe_routed_on_device(emu, gate, up, down, n_embd, n_ff, slots, q8):
    """gate+up+SiLU, down x routing weight with the slot-ordered sum in one launch, from the router's
    ids and a slot table on the device, against float64; per pair (moe_matvec + moe_combine) gives
    the same bits as the fused down+combine."""
    layout = P.ExpertLayout(n_embd=n_embd, n_ff=n_ff, gate=gate, up=up, down=down)
    g = _gen(int(gate) * 100 + int(down))
    lay = _Layer(layout, 4, g)
    nt, ns = len(slots), len(slots[0])
    ids = torch.tensor(slots, dtype=torch.int64)
    x = torch.randn(nt, n_embd, generator=g)
    w = torch.rand(nt, ns, generator=g)
    route = P.Route(ids.data_ptr(), lay.table.data_ptr(), 0, ns)
    xq = xd = None
    act = P.F32Act(x.data_ptr(), n_embd)
    if q8:
        xq, xd, act = _q8(emu, x)
    rd = [ids, x, w] + ([xq, xd] if q8 else [])
    h = _gate_up(emu, lay, route, nt * ns, act, rd)
    assert not torch.isnan(h).any()
    xref = _dq8(xq, xd) if q8 else x.double()
    for p in range(nt * ns):
        t, s = divmod(p, ns)
        e = lay.dense[slots[t][s]]
        href = torch.nn.functional.silu(e["gate"].double() @ xref[t]) * (e["up"].double() @ xref[t])
        assert rel_l2(h[p], href) < 1e-4, f"pair {p}"
    hact = P.F32Act(h.data_ptr(), n_ff)
    hq = hd = None
    if q8:
        hq, hd, hact = _q8(emu, h)
    rd += [lay.arena, lay.table, h] + ([hq, hd] if q8 else [])
    out = torch.full((nt + 1, n_embd), float("nan"))
    emu.run(P.plan_moe_down_combine(layout, route, nt, lay.base("down"), lay.stride, hact, w.data_ptr(), out.data_ptr(),
                                    n_embd), rd)
    assert torch.isnan(out[nt]).all()
    href = _dq8(hq, hd) if q8 else h.double()
    ref = torch.stack([sum(float(w[t, s]) * (lay.dense[slots[t][s]]["down"].double() @ href[t * ns + s])
                           for s in range(ns)) for t in range(nt)])
    assert rel_l2(out[:nt], ref) < 2e-5
    # the same pairs one by one (the hybrid route), then moe_combine: bitwise the fused result
    y = torch.full((nt * ns, n_embd), float("nan"))
    done = torch.full((nt * ns,), -7, dtype=torch.int32)
    emu.run(P.plan_moe_matvec(down, n_embd, n_ff, route, nt * ns, lay.base("down"), lay.stride, hact, 1, w.data_ptr(),
                              y.data_ptr(), n_embd, done.data_ptr()), rd)
    assert (done == 1).all()
    out2 = torch.empty(nt, n_embd)
    emu.run(P.plan_moe_combine(done.data_ptr(), y.data_ptr(), 0, w.data_ptr(), nt, ns, n_embd, out2.data_ptr()),
            [done, y, w])
    assert torch.equal(out2, out[:nt]), "per pair + combine must give the fused launch's bits"
    if not q8:
        full = reference_moe(lay.dense, slots, x, w)
        assert rel_l2(out[:nt], full) < 2e-4


def test_moe_absent_and_skipped_pairs_come_from_the_cpu_rows(emu):
    """An expert absent from the table or marked skip is not computed (done = 0, its y untouched);
    moe_combine takes w * ext for it, in slot order, with every other pair's y; a pair with both (an
    expert split by rows: the device's share in y, the CPU's in ext) gets their sum."""
    layout = P.ExpertLayout(n_embd=64, n_ff=32, gate=T.Q8_0, up=T.Q8_0, down=T.Q8_0)
    g = _gen(9)
    lay = _Layer(layout, 4, g, absent=(2,))
    slots = [[0, 2, 1], [3, 1, 0]]
    ids = torch.tensor(slots, dtype=torch.int64)
    skip = torch.tensor([0, 0, 0, 1], dtype=torch.int32)          # expert 3 runs elsewhere this step
    x, w = torch.randn(2, 64, generator=g), torch.rand(2, 3, generator=g)
    route = P.Route(ids.data_ptr(), lay.table.data_ptr(), skip.data_ptr(), 3)
    act = P.F32Act(x.data_ptr(), 64)
    rd = [lay.arena, lay.table, ids, skip, x, w]
    h = torch.full((6, 32), 123.0)
    emu.run(P.plan_moe_gate_up(layout, route, 6, lay.base("gate"), lay.base("up"), lay.stride, act, h.data_ptr(), 32), rd)
    assert (h[1] == 123.0).all() and (h[3] == 123.0).all(), "absent and skipped pairs must not be computed"
    y, done = torch.full((6, 64), 5.0), torch.full((6,), -1, dtype=torch.int32)
    emu.run(P.plan_moe_matvec(T.Q8_0, 64, 32, route, 6, lay.base("down"), lay.stride, P.F32Act(h.data_ptr(), 32), 1,
                              w.data_ptr(), y.data_ptr(), 64, done.data_ptr()), rd + [h])
    assert done.tolist() == [1, 0, 1, 0, 1, 1]
    ext = torch.randn(2, 3, 64, generator=g) * (1 - done.view(2, 3, 1))     # the CPU's rows where it ran...
    ext[1, 2] = torch.randn(64, generator=g)                                   # ...and a split pair's share
    out = torch.empty(2, 64)
    emu.run(P.plan_moe_combine(done.data_ptr(), y.data_ptr(), ext.data_ptr(), w.data_ptr(), 2, 3, 64, out.data_ptr()),
            [done, y, ext, w])
    y3, wx = y.view(2, 3, 64), w.unsqueeze(-1) * ext
    parts = torch.where(done.view(2, 3, 1).bool(), y3, wx)
    parts[1, 2] = y3[1, 2] + wx[1, 2]
    want = (parts[:, 0] + parts[:, 1]) + parts[:, 2]
    assert torch.equal(out, want)
    assert not torch.equal(out[1], ((parts[1, 0] + parts[1, 1]) + y3[1, 2]))


def test_moe_pair_result_independent_of_other_pairs(emu):
    """A (token, slot) pair's output does not depend on the other pairs in the launch, nor on where
    its expert sits: a subset of the pairs, in another slot order, gives bitwise the same rows."""
    layout = P.ExpertLayout(n_embd=64, n_ff=32, gate=T.Q5_0, up=T.Q5_0, down=T.Q8_0)
    lay = _Layer(layout, 3, _gen(5))
    x = torch.randn(1, 64, generator=_gen(6))
    act = P.F32Act(x.data_ptr(), 64)
    outs = []
    for slots in ([[0, 1, 2]], [[2]]):
        ids = torch.tensor(slots, dtype=torch.int64)
        n = len(slots[0])
        outs.append(_gate_up(emu, lay, P.Route(ids.data_ptr(), lay.table.data_ptr(), 0, n), n, act, [ids, x]))
    assert torch.equal(outs[0][2], outs[1][0])


# --- RoPE, the KV cache, attention -----------------------------------------------------------------------

@pytest.mark.parametrize("kind,n_dims,head_dim", [("norm", 64, 64), ("neox", 64, 64), ("neox", 32, 64),
                                                  ("norm", 64, 192)])
def test_rope_equals_llama_cpp(emu, kind, n_dims, head_dim):
    """rope_f32 on q and k at positions read on the device, against ggml_rope_ext (llama.cpp's RoPE,
    through the CPU backend): NORM and NEOX pairs, partial rotation (the rest copied)."""
    from promoe_gguf.backends.cpu import CpuBackend
    from promoe_gguf.backends.torch_ops import RopeSpec
    spec = RopeSpec(kind=kind, n_dims=n_dims, base=10000.0)
    pos = torch.tensor([0, 5, 17], dtype=torch.int32)
    g = _gen(n_dims + head_dim)
    q, k = torch.randn(3, 4, head_dim, generator=g), torch.randn(3, 2, head_dim, generator=g)
    theta, mscale = spec.theta("cpu")
    ang = torch.arange(32, dtype=torch.float64)[:, None] * theta[None, :]
    cos, sin = (torch.cos(ang) * mscale).float(), (torch.sin(ang) * mscale).float()
    yq, yk = torch.empty_like(q), torch.empty_like(k)
    heads = [P.Heads(t.data_ptr(), t.shape[1], t.stride(0), t.stride(1)) for t in (q, k, yq, yk)]
    emu.run(P.plan_rope(heads[:2], heads[2:], 3, head_dim, n_dims, kind == "neox", pos.data_ptr(), cos.data_ptr(),
                        sin.data_ptr()), [q, k, pos, cos, sin])

    class _Step:
        pass
    step = _Step()
    step.pos = pos
    rq, rk = CpuBackend().rope_many((q, k), spec, step)
    assert rel_l2(yq, rq) < 1e-6 and rel_l2(yk, rk) < 1e-6
    assert torch.equal(yq[..., n_dims:], q[..., n_dims:])


def _attention_ref(q, K, V, pos, scale):
    """float64 softmax attention: query t sees positions 0..pos[t]; grouped heads share K/V."""
    T, H, _ = q.shape
    hkv = K.shape[0]
    out = torch.zeros(T, H, V.shape[-1], dtype=torch.float64)
    for t in range(T):
        n = int(pos[t]) + 1
        for h in range(H):
            kv = h // (H // hkv)
            s = (K[kv, :n].double() @ q[t, h].double()) * scale
            out[t, h] = torch.softmax(s, 0) @ V[kv, :n].double()
    return out.reshape(T, -1)


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.float32], ids=["f16", "f32"])
@pytest.mark.parametrize("H,hkv,dk,dv,n_alloc,pos", [(8, 2, 64, 64, 40, [0, 21, 39]),     # GQA, one split
                                                    (4, 4, 128, 128, 600, [299, 598]),   # three splits
                                                    (16, 1, 576, 512, 300, [260])],      # MLA's latent head
                         ids=["gqa", "splits", "mla"])
def test_kv_store_and_attention(emu, cache_dtype, H, hkv, dk, dv, n_alloc, pos):
    """kv_store writes K/V at the positions read on the device; the split attention and its merge
    equal float64 attention over the cache as stored."""
    g = _gen(H * dk + n_alloc)
    T = len(pos)
    K = torch.randn(hkv, n_alloc, dk, generator=g).to(cache_dtype)
    V = torch.randn(hkv, n_alloc, dv, generator=g).to(cache_dtype)
    k, v = torch.randn(T, hkv, dk, generator=g), torch.randn(T, hkv, dv, generator=g)
    posd = torch.tensor(pos, dtype=torch.int32)
    elt = K.element_size()
    emu.run(P.plan_kv_store(P.Heads(k.data_ptr(), hkv, k.stride(0), k.stride(1)),
                            P.Heads(v.data_ptr(), hkv, v.stride(0), v.stride(1)), T, dk, dv, posd.data_ptr(),
                            K.data_ptr(), V.data_ptr(), n_alloc, elt), [k, v, posd])
    for t, p in enumerate(pos):
        assert torch.equal(K[:, p], k[t].to(cache_dtype)) and torch.equal(V[:, p], v[t].to(cache_dtype))
    q = torch.randn(T, H, dk, generator=g)
    n_split = P.attention_splits(n_alloc)
    part_o, part_ml = torch.empty(T, H, n_split, dv), torch.empty(T, H, n_split, 2)
    out = torch.full((T, H * dv), float("nan"))
    scale = dk ** -0.5
    emu.run(P.plan_attention(P.Heads(q.data_ptr(), H, q.stride(0), q.stride(1)), T, hkv, dk, dv, K.data_ptr(),
                             V.data_ptr(), n_alloc, elt, posd.data_ptr(), scale, part_o.data_ptr(), part_ml.data_ptr(),
                             out.data_ptr(), H * dv), [q, K, V, posd, part_o, part_ml])
    err = rel_l2(out, _attention_ref(q, K, V, pos, scale))
    assert err < 1e-6, err


@pytest.mark.parametrize("n", [256, 4096, 100])
def test_rms_norm_kernels(emu, n):
    """rms_norm_f32 and add_rms_norm_f32 against a float64 reference (fp32 CTA reduction: <= 1e-6)."""
    g = _gen(n)
    x = torch.randn(3, n, generator=g) * 3 + 1
    r = torch.randn(3, n, generator=g)
    w = torch.randn(n, generator=g)
    eps = 1e-5

    def ref(v):
        v = v.double()
        return (v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + eps) * w.double()).float()
    y = torch.empty_like(x)
    emu.run(P.plan_rms_norm(3, n, x.data_ptr(), n, w.data_ptr(), y.data_ptr(), n, eps), [x, w, y])
    assert rel_l2(y, ref(x)) < 1e-6
    s, y2 = torch.empty_like(x), torch.empty_like(x)
    emu.run(P.plan_add_rms_norm(3, n, x.data_ptr(), r.data_ptr(), 0.5, s.data_ptr(), w.data_ptr(), y2.data_ptr(), eps),
            [x, r, s, w, y2])
    assert torch.equal(s, x + r * 0.5)
    assert rel_l2(y2, ref(x + r * 0.5)) < 1e-6


def test_iq_grid_header_is_gguf_pys_grids():
    """The committed codebooks (cuda/iq_grids.cuh) are gguf-py's: regenerated, byte for byte; and one
    entry decoded by hand (IQ2_XXS entry 1: a 43, then seven 8s, element 0 in byte 0; IQ1S entry 0:
    eight -1, stored + 1)."""
    from promoe_gguf.kernels.iq_grids import packed, render
    assert (launch.kernels_dir() / "iq_grids.cuh").read_text() == render()
    assert packed(gguf.quants.IQ2_XXS, 0)[1] == 0x080808080808082B and packed(gguf.quants.IQ1_S, 1)[0] == 0
