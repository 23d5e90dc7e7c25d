"""The CUDA kernels of promoe_gguf/kernels/cuda/*.cu run on the CPU (tests/kernels_host: a small CUDA stand-in, one
OS thread per CUDA thread), driven by the launcher's own launch plans, against dequantize_torch.

No GPU needed (only g++). What this proves: element order of every block decoder, fp32 dequant bit
for bit, the matvec / MoE index math, tails (rows not a multiple of the CTA's rows), the CTA
reduction, the slot table, every load in bounds and naturally aligned (with weights placed at the
least alignment the launcher accepts). What it cannot: GPU-only behaviour (the real PTX of the
built-ins, timing) -- tests/test_kernels_gpu.py does that on a GPU.
"""
from __future__ import annotations

import ctypes
import hashlib
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from promoe_gguf.errors import ModelError
from promoe_gguf.format.quants import dequantize_torch, quant_type
from promoe_gguf.kernels import launch
from promoe_gguf.kernels.launch import ExpertLayout, SUPPORTED
from promoe_gguf.kernels.testdata import REL_L2_BOUND, random_blocks, reference_matmul, reference_moe, rel_l2
from kernel_emu import Emu, build_emulator

REPO = Path(__file__).resolve().parent.parent
HOST = REPO / "tests" / "kernels_host"
TYPES = list(SUPPORTED)


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


# --- consistency of the constants mirrored in launch.py --------------------------------------------

def test_launcher_constants_match_kernels(emu):
    L = emu.lib
    assert L.emu_threads() == launch.THREADS
    assert L.emu_dequant_threads() == launch.DEQUANT_THREADS
    assert L.emu_moe_gate_up_rows() == launch.MOE_GATE_UP_ROWS
    assert L.emu_moe_matvec_rows() == launch.MOE_MATVEC_ROWS
    for n in range(1, launch.MAX_NCOLS + 1):
        assert L.emu_matvec_rows_per_cta(n) == launch.matvec_rows_per_cta(n)
    for t, name in SUPPORTED.items():
        out = (ctypes.c_int * 5)()
        assert L.emu_traits(name.encode(), out) == 0
        qk, ts, nchunk, nrun, rps = list(out)
        qt = quant_type(t)
        assert (qk, ts) == (qt.block_size, qt.type_size), t.name
        assert nchunk == launch.NCHUNK[t], t.name
        assert nchunk * nrun * 4 == qk, f"{t.name}: the chunks must cover the block"
        assert nrun % rps == 0
        for op in launch.OPS:
            for k in launch.kernel_names(op, t):
                assert L.emu_has_kernel(k.encode()) or k == "moe_combine", k


# --- dequant -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequant_bit_exact(emu, qtype):
    qt = quant_type(qtype)
    rows, cols = 5, 3 * qt.block_size
    raw = random_blocks(qtype, (rows, cols), _gen(int(qtype)))
    buf, w = _placed(raw, launch.ALIGNMENT[qtype])
    ref = dequantize_torch(raw, qtype, (rows, cols))
    for fp16 in (False, True):
        y = torch.full((rows + 1, cols), float("nan"), dtype=torch.float16 if fp16 else torch.float32)
        emu.run(launch.plan_dequant(qtype, (rows, cols), w.data_ptr(), y.data_ptr(), cols, fp16), [buf])
        got, want = y[:rows], (ref.half() if fp16 else ref)
        assert torch.isnan(y[rows].float()).all(), "wrote past the output"
        bad = (got.view(torch.int16) != want.view(torch.int16)) if fp16 else (got.view(torch.int32) != want.view(torch.int32))
        assert not bad.any(), (f"{qtype.name} {'f16' if fp16 else 'f32'}: {int(bad.sum())} values differ, first at "
                               f"{tuple(bad.nonzero()[0].tolist())}: {got[bad][0].item()} vs {want[bad][0].item()}")


# --- matvec ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matvec_all_ncols(emu, qtype):
    qt = quant_type(qtype)
    rows, cols = 7, (3 if qt.block_size == 256 else 5) * qt.block_size
    raw = random_blocks(qtype, (rows, cols), _gen(100 + int(qtype)))
    buf, w = _placed(raw, launch.ALIGNMENT[qtype])
    g = _gen(7)
    for ntok in range(1, 10):               # 9 = a group of 8 then 1
        x = torch.randn(ntok, cols, generator=g)
        y = torch.full((ntok + 1, rows), float("nan"))
        emu.run(launch.plan_matvec(qtype, (rows, cols), ntok, w.data_ptr(), x.data_ptr(), cols, y.data_ptr(), rows),
                [buf, x])
        assert torch.isnan(y[ntok]).all(), "wrote past the output"
        assert not torch.isnan(y[:ntok]).any(), f"{qtype.name} ncols={ntok}: rows left unwritten"
        err = rel_l2(y[:ntok], reference_matmul(raw, qtype, (rows, cols), x))
        assert err < REL_L2_BOUND[qtype], f"{qtype.name} ncols={ntok}: rel L2 {err:.2e}"


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matvec_long_rows_error_bound(emu, qtype):
    """Rows of 4096 values (many iterations of the thread loop): the error stays inside the bound the
    GPU test uses, with margin."""
    rows, cols = 6, 4096
    raw = random_blocks(qtype, (rows, cols), _gen(200 + int(qtype)))
    x = torch.randn(2, cols, generator=_gen(3))
    y = torch.full((2, rows), float("nan"))
    emu.run(launch.plan_matvec(qtype, (rows, cols), 2, raw.data_ptr(), x.data_ptr(), cols, y.data_ptr(), rows), [raw, x])
    err = rel_l2(y, reference_matmul(raw, qtype, (rows, cols), x))
    assert err < REL_L2_BOUND[qtype] / 5, f"{qtype.name}: rel L2 {err:.2e} (bound {REL_L2_BOUND[qtype]:.0e})"


def test_matvec_rejects_misaligned_weights():
    raw = random_blocks(T.Q4_K, (2, 256))
    with pytest.raises(ModelError, match="16-byte aligned"):
        launch.plan_matvec(T.Q4_K, (2, 256), 1, raw.data_ptr() + 4, 0, 256, 0, 2)
    with pytest.raises(ModelError, match="activations"):
        launch.plan_matvec(T.Q6_K, (2, 256), 1, raw.data_ptr(), 8, 256, 0, 2)
    with pytest.raises(ModelError, match="no CUDA kernel"):
        launch.plan_matvec(T.F16, (2, 256), 1, 0, 0, 256, 0, 2)


# --- MoE ----------------------------------------------------------------------------------------------------

MOE_LAYOUTS = [
    # gate, up, down, n_embd, n_ff, expert ids per token (slot order)
    (T.Q8_0, T.Q8_0, T.Q8_0, 64, 96, [[0, 2, 1], [3, 3, 0], [1, 0, 2]]),   # token 1 uses expert 3 twice
    (T.Q4_K, T.Q4_K, T.Q6_K, 256, 256, [[0, 2], [1, 1]]),                 # Q4_K_M style
    (T.Q4_K, T.Q4_K, T.Q5_0, 256, 96, [[2, 0], [3, 2]]),                  # down falls back to Q5_0
    (T.IQ4_XS, T.IQ4_XS, T.Q2_K, 256, 256, [[1, 3]]),
    (T.Q4_K, T.Q5_K, T.Q3_K, 256, 256, [[0, 1]]),                         # gate, up types differ: unfused
]


@pytest.mark.parametrize("gate,up,down,n_embd,n_ff,slots", MOE_LAYOUTS,
                         ids=lambda v: getattr(v, "name", None) or (str(v) if isinstance(v, int) else "slots"))
def test_moe_pipeline(emu, gate, up, down, n_embd, n_ff, slots):
    layout = ExpertLayout(n_embd=n_embd, n_ff=n_ff, gate=gate, up=up, down=down)
    n_exp, nt, ns = 4, len(slots), len(slots[0])
    g = _gen(int(gate) * 100 + int(down))
    experts, raws = [], []
    for e in range(n_exp):
        mats = {}
        for which, shape in (("gate", (n_ff, n_embd)), ("up", (n_ff, n_embd)), ("down", (n_embd, n_ff))):
            qt = getattr(layout, which)
            raw = random_blocks(qt, shape, g, scale=0.05)
            buf, v = _placed(raw, launch.ALIGNMENT[qt])
            raws.append(buf)
            mats[which] = (v, dequantize_torch(raw, qt, shape))
        experts.append(mats)
    table = torch.tensor([[[experts[e][w][0].data_ptr() for w in ("gate", "up", "down")] for e in ids]
                          for ids in slots], dtype=torch.int64)
    x = torch.randn(nt, n_embd, generator=g)
    weights = torch.rand(nt, ns, generator=g)
    n_pairs = nt * ns
    readable = raws + [table, x, weights]

    # 1. gate/up (+ silu * mul here when unfused, as moe_gate_up does on the GPU)
    if gate == up:
        h = torch.full((n_pairs + 1, n_ff), float("nan"))
        emu.run(launch.plan_moe_gate_up(layout, n_pairs, ns, table.data_ptr(), x.data_ptr(), n_embd,
                                        h.data_ptr(), n_ff), readable)
        assert torch.isnan(h[n_pairs]).all()
        h = h[:n_pairs].clone()
    else:
        gu = torch.full((2 * n_pairs, n_ff), float("nan"))
        emu.run(launch.plan_moe_gate_up(layout, n_pairs, ns, table.data_ptr(), x.data_ptr(), n_embd,
                                        gu.data_ptr(), n_ff), readable)
        h = torch.nn.functional.silu(gu[:n_pairs]) * gu[n_pairs:]
    assert not torch.isnan(h).any()
    # h against the reference, pair by pair
    for p in range(n_pairs):
        t, s = divmod(p, ns)
        e = experts[slots[t][s]]
        href = torch.nn.functional.silu(e["gate"][1].double() @ x[t].double()) * (e["up"][1].double() @ x[t].double())
        assert rel_l2(h[p], href) < 1e-4, f"pair {p}"

    # 2. down, scaled by the routing weights
    y = torch.full((n_pairs + 1, n_embd), float("nan"))
    emu.run(launch.plan_moe_down(layout, n_pairs, table.data_ptr(), h.data_ptr(), n_ff, weights.data_ptr(),
                                 y.data_ptr(), n_embd), readable + [h])
    assert torch.isnan(y[n_pairs]).all() and not torch.isnan(y[:n_pairs]).any()

    # 3. combine in slot order
    out = torch.full((nt + 1, n_embd), float("nan"))
    emu.run(launch.plan_moe_combine(down, nt, ns, n_embd, y.data_ptr(), out.data_ptr()), readable + [y])
    assert torch.isnan(out[nt]).all()
    ys = y[:n_pairs].view(nt, ns, n_embd)
    manual = ys[:, 0].clone()
    for k in range(1, ns):
        manual = manual + ys[:, k]
    assert torch.equal(out[:nt], manual), "moe_combine must add the slots in slot order"

    ref = reference_moe([{k: v[1] for k, v in e.items()} for e in experts], slots, x, weights)
    err = rel_l2(out[:nt], ref)
    assert err < 2e-4, f"moe rel L2 {err:.2e}"


def test_moe_pair_result_independent_of_other_pairs(emu):
    """A (token, slot) pair's output does not depend on the other pairs in the launch: a subset of
    the table gives bitwise the same rows (so cached-first / reordered execution is exact)."""
    layout = ExpertLayout(n_embd=64, n_ff=32, gate=T.Q5_0, up=T.Q5_0, down=T.Q8_0)
    g = _gen(5)
    mats, bufs = [], []
    for e in range(3):
        row = []
        for which, shape in (("gate", (32, 64)), ("up", (32, 64)), ("down", (64, 32))):
            buf, v = _placed(random_blocks(getattr(layout, which), shape, g), 2)
            bufs.append(buf); row.append(v.data_ptr())
        mats.append(row)
    x = torch.randn(1, 64, generator=g)
    full = torch.tensor([[mats[0], mats[1], mats[2]]], dtype=torch.int64)
    sub = torch.tensor([[mats[2]]], dtype=torch.int64)
    outs = []
    for table, ns in ((full, 3), (sub, 1)):
        h = torch.empty(ns, 32)
        emu.run(launch.plan_moe_gate_up(layout, ns, ns, table.data_ptr(), x.data_ptr(), 64, h.data_ptr(), 32),
                bufs + [table, x])
        outs.append(h)
    assert torch.equal(outs[0][2], outs[1][0])


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
    emu.run(launch.plan_rms_norm(3, n, x.data_ptr(), n, w.data_ptr(), y.data_ptr(), n, eps), [x, w, y])
    assert rel_l2(y, ref(x)) < 1e-6
    s, y2 = torch.empty_like(x), torch.empty_like(x)
    emu.run(launch.plan_add_rms_norm(3, n, x.data_ptr(), r.data_ptr(), 0.5, s.data_ptr(), w.data_ptr(), y2.data_ptr(), eps),
            [x, r, s, w, y2])
    assert torch.equal(s, x + r * 0.5)
    assert rel_l2(y2, ref(x + r * 0.5)) < 1e-6
