"""GPU numerics of the CUDA kernels (kernels/*.cu through promoe_gguf.kernels) against the CPU
dequantizer: dequantize_torch on the CPU (float64 matmul as the reference).

Run with `pytest -m gpu` on a machine with a CUDA GPU and CuPy (scripts/gpu_check.sh does);
skipped elsewhere. Every output buffer is poisoned with NaN before the launch, so an element a
kernel forgets to write fails the test.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from promoe_gguf.format.quants import dequantize_torch, quant_type
from promoe_gguf.kernels import launch
from promoe_gguf.kernels.launch import ExpertLayout, SUPPORTED
from promoe_gguf.kernels.testdata import REL_L2_BOUND, random_blocks, reference_matmul, reference_moe, rel_l2

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() is False)"),
    pytest.mark.skipif(importlib.util.find_spec("cupy") is None,
                       reason="CuPy not installed (pip install cupy-cuda12x or cupy-cuda13x)"),
]

TYPES = list(SUPPORTED)
TARGETS = (T.Q4_K, T.Q6_K, T.Q8_0, T.Q5_0)     # the types of real Q4_K_M expert tensors
DEV = torch.device("cuda")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _nan(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEV)


def _placed(raw: torch.Tensor, align: int) -> torch.Tensor:
    """raw on the GPU at an address that is `align`-aligned but no more (as misaligned as allowed)."""
    buf = torch.zeros(raw.numel() + 64, dtype=torch.uint8, device=DEV)
    off = next(o for o in range(64) if (buf.data_ptr() + o) % align == 0 and (buf.data_ptr() + o) % (2 * align))
    view = buf[off:off + raw.numel()]
    view.copy_(raw)
    return view


def _shapes(qt) -> list[tuple[int, int]]:
    bs = quant_type(qt).block_size
    return [(37, 7 * bs if bs == 256 else 45 * bs), (1001, 4096), (3, bs)]


# --- dequant ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequant_matches_cpu_bit_for_bit(qtype):
    for i, shape in enumerate(_shapes(qtype)):
        raw = random_blocks(qtype, shape, _gen(i * 31 + int(qtype)))
        ref = dequantize_torch(raw, qtype, shape)
        w = _placed(raw, launch.ALIGNMENT[qtype])
        y32 = launch.dequantize_cuda(w, qtype, shape, torch.float32, out=_nan(*shape))
        y16 = launch.dequantize_cuda(w, qtype, shape, torch.float16, out=_nan(*shape, dtype=torch.float16))
        got32, got16 = y32.cpu(), y16.cpu()
        assert not torch.isnan(got32).any(), f"{qtype.name} {shape}: values left unwritten"
        assert torch.equal(got32.view(torch.int32), ref.view(torch.int32)), \
            f"{qtype.name} {shape}: fp32 dequant differs from dequantize_torch (max |diff| {(got32 - ref).abs().max():.3g})"
        assert torch.equal(got16.view(torch.int16), ref.half().view(torch.int16)), f"{qtype.name} {shape}: fp16 dequant"


# --- matvec ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matvec_1_to_8_tokens(qtype):
    for i, shape in enumerate(_shapes(qtype)):
        raw = random_blocks(qtype, shape, _gen(1000 + i * 31 + int(qtype)))
        w = _placed(raw, launch.ALIGNMENT[qtype])
        for ntok in range(1, 9):
            x = torch.randn(ntok, shape[1], generator=_gen(ntok))
            y = launch.matvec(w, qtype, shape, x.to(DEV), out=_nan(ntok, shape[0])).cpu()
            assert not torch.isnan(y).any(), f"{qtype.name} {shape} ncols={ntok}: rows left unwritten"
            err = rel_l2(y, reference_matmul(raw, qtype, shape, x))
            assert err < REL_L2_BOUND[qtype], f"{qtype.name} {shape} ncols={ntok}: rel L2 {err:.2e}"


@pytest.mark.parametrize("qtype", TARGETS, ids=lambda t: t.name)
def test_matvec_mixtral_sized(qtype):
    """Mixtral expert matrices (14336 x 4096 and 4096 x 14336). The float64 reference uses the same
    torch dequantizer, run on the GPU for speed (it is bit-identical to the CPU run: checked above)."""
    for rows, cols in ((14336, 4096), (4096, 14336)):
        raw = random_blocks(qtype, (rows, cols), torch.Generator(device=DEV).manual_seed(rows), device=DEV)
        x = torch.randn(8, cols, device=DEV)
        ref = x.double() @ dequantize_torch(raw, qtype, (rows, cols)).double().T
        for ntok in (1, 8):
            y = launch.matvec(raw, qtype, (rows, cols), x[:ntok], out=_nan(ntok, rows))
            err = rel_l2(y, ref[:ntok])
            assert err < REL_L2_BOUND[qtype], f"{qtype.name} {rows}x{cols} ncols={ntok}: rel L2 {err:.2e}"


def test_matvec_more_than_8_tokens_and_fp16_input():
    raw = random_blocks(T.Q4_K, (300, 512), _gen(9))
    x = torch.randn(19, 512, generator=_gen(2))
    y = launch.matvec(raw.to(DEV), T.Q4_K, (300, 512), x.half().to(DEV)).cpu()
    assert rel_l2(y, reference_matmul(raw, T.Q4_K, (300, 512), x.half().float())) < REL_L2_BOUND[T.Q4_K]


@pytest.mark.parametrize("qtype", TARGETS, ids=lambda t: t.name)
def test_linear_prefill_path(qtype):
    shape = (640, 1024)
    raw = random_blocks(qtype, shape, _gen(11))
    x = torch.randn(37, 1024, generator=_gen(12))
    y = launch.linear(raw.to(DEV), qtype, shape, x.to(DEV)).cpu()      # dequant fp32 + cuBLAS
    assert rel_l2(y, reference_matmul(raw, qtype, shape, x)) < 1e-5


def test_matvec_deterministic():
    raw = random_blocks(T.Q6_K, (4096, 4096), _gen(13)).to(DEV)
    x = torch.randn(3, 4096, device=DEV)
    a = launch.matvec(raw, T.Q6_K, (4096, 4096), x)
    b = launch.matvec(raw, T.Q6_K, (4096, 4096), x)
    assert torch.equal(a, b)


# --- MoE ------------------------------------------------------------------------------------------------

MOE_LAYOUTS = [
    (T.Q4_K, T.Q4_K, T.Q6_K, 1024, 768),       # Qwen3-MoE-like, Q4_K_M
    (T.Q4_K, T.Q4_K, T.Q5_0, 2048, 1408),      # DeepSeek-V2-Lite / Qwen1.5-MoE: down falls back to Q5_0
    (T.Q4_K, T.Q4_K, T.Q8_0, 1024, 1408),
    (T.Q8_0, T.Q8_0, T.Q8_0, 512, 352),
    (T.IQ4_XS, T.IQ4_XS, T.Q2_K, 512, 512),
    (T.Q4_K, T.Q5_K, T.Q3_K, 512, 512),        # gate and up of different types: unfused path
]


def _experts(layout: ExpertLayout, n_exp: int, seed: int):
    g = _gen(seed)
    mats, dev = [], []
    for e in range(n_exp):
        m, d = {}, {}
        for which, shape in (("gate", (layout.n_ff, layout.n_embd)), ("up", (layout.n_ff, layout.n_embd)),
                             ("down", (layout.n_embd, layout.n_ff))):
            qt = getattr(layout, which)
            raw = random_blocks(qt, shape, g, scale=0.03)
            m[which] = dequantize_torch(raw, qt, shape)
            d[which] = _placed(raw, launch.ALIGNMENT[qt])
        mats.append(m)
        dev.append(d)
    return mats, dev


def _table(dev_experts, ids: torch.Tensor) -> torch.Tensor:
    """slot table built on the GPU from expert ids, as the runtime does (no host round trip)."""
    ptrs = torch.tensor([[d[w].data_ptr() for w in ("gate", "up", "down")] for d in dev_experts],
                        dtype=torch.int64, device=DEV)
    return ptrs[ids].contiguous()


@pytest.mark.parametrize("gate,up,down,n_embd,n_ff", MOE_LAYOUTS, ids=lambda v: getattr(v, "name", str(v)))
def test_moe_decode(gate, up, down, n_embd, n_ff):
    layout = ExpertLayout(n_embd=n_embd, n_ff=n_ff, gate=gate, up=up, down=down)
    mats, dev = _experts(layout, 8, int(gate) * 7 + int(down))
    g = _gen(3)
    for nt, ns in ((1, 2), (3, 8), (4, 6)):
        ids = torch.stack([torch.randperm(8, generator=g)[:ns] for _ in range(nt)])
        if nt > 1:
            ids[1] = ids[0]                                   # two tokens with the same experts
        x = torch.randn(nt, n_embd, generator=g)
        w = torch.rand(nt, ns, generator=g)
        table = _table(dev, ids.to(DEV))
        prev = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")               # no host synchronisation on the decode path
        try:
            out = launch.moe_decode(table, layout, x.to(DEV), w.to(DEV))
            again = launch.moe_decode(table, layout, x.to(DEV), w.to(DEV))
        finally:
            torch.cuda.set_sync_debug_mode(prev)
        ref = reference_moe(mats, ids.tolist(), x, w)
        err = rel_l2(out, ref)
        assert not torch.isnan(out).any()
        assert err < 1e-4, f"nt={nt} ns={ns}: rel L2 {err:.2e}"
        assert torch.equal(out, again), "moe_decode is not deterministic"


SUBSET_LAYOUT = dict(n_embd=1024, n_ff=768, gate=T.Q4_K, up=T.Q4_K, down=T.Q6_K)


def test_moe_slot_subsets_are_bitwise_equal():
    """Running a subset of the slots (e.g. cached experts first) gives bitwise the same per-slot
    outputs, and combining them in slot order gives bitwise the same result."""
    layout = ExpertLayout(**SUBSET_LAYOUT)
    n = layout.n_embd
    _, dev = _experts(layout, 4, 77)
    ids = torch.tensor([[3, 0, 2, 1]], device=DEV)
    x = torch.randn(1, n, device=DEV)
    w = torch.rand(1, 4, device=DEV)
    table = _table(dev, ids)
    full = launch.moe_down(table.view(-1, 3), layout, launch.moe_gate_up(table, layout, x, 4), w.view(-1))
    parts = []
    for s in (2, 0, 3, 1):                                    # another execution order, one slot at a time
        t1 = table[:, s:s + 1].contiguous()
        parts.append((s, launch.moe_down(t1.view(-1, 3), layout, launch.moe_gate_up(t1, layout, x, 1), w[:, s])))
    per_slot = torch.cat([p for _, p in sorted(parts, key=lambda sp: sp[0])])
    assert torch.equal(per_slot, full)
    assert torch.equal(launch.moe_combine(per_slot.view(1, 4, n)), launch.moe_combine(full.view(1, 4, n)))


# --- real GGUF expert tensors ---------------------------------------------------------------------------------

def _real_models(request) -> dict:
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("the test models are quantized by llama-cpp-python, which is not installed here")
    try:
        return request.getfixturevalue("test_models")
    except pytest.FixtureLookupError:
        pytest.skip("no test_models fixture (tests/conftest.py)")


def test_real_expert_tensors(request):
    import gguf
    models = _real_models(request)
    seen = {}
    for key, path in sorted(models.items(), key=lambda kv: str(kv[0])):
        if not str(path).endswith(".gguf") or "twin" in str(path):
            continue
        reader = gguf.GGUFReader(str(path))
        for t in reader.tensors:
            if not any(f"ffn_{w}_exps" in t.name for w in ("gate", "up", "down")):
                continue
            try:
                qt = T(int(t.tensor_type))
            except ValueError:
                continue
            if qt not in SUPPORTED or len(t.shape) != 3:
                continue
            n_exp, rows, cols = int(t.shape[2]), int(t.shape[1]), int(t.shape[0])
            data = np.asarray(t.data).reshape(n_exp, -1)
            for e in sorted({0, n_exp - 1}):
                raw = torch.from_numpy(np.ascontiguousarray(data[e]))
                for ntok in (1, 5):
                    x = torch.randn(ntok, cols, generator=_gen(ntok))
                    y = launch.matvec(raw.to(DEV), qt, (rows, cols), x.to(DEV), out=_nan(ntok, rows)).cpu()
                    err = rel_l2(y, reference_matmul(raw, qt, (rows, cols), x))
                    assert err < REL_L2_BOUND[qt], f"{path} {t.name} expert {e} ncols={ntok}: rel L2 {err:.2e}"
                y = launch.dequantize_cuda(raw.to(DEV), qt, (rows, cols), torch.float32).cpu()
                assert torch.equal(y, dequantize_torch(raw, qt, (rows, cols))), f"{path} {t.name} dequant"
            seen[qt.name] = seen.get(qt.name, 0) + 1
    if not seen:
        pytest.skip("the test models hold no quantized routed-expert tensors of a supported type")
