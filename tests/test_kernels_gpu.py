"""The CUDA backend's calls, the ones the Engine makes (linear / linears, embed, rope, store_kv,
attention, moe, moe_pairs + moe_combine, rms_norm), against float64 references built from the CPU
dequantizer (dequantize_torch, bit-equal to gguf-py).

Each test runs twice: on a CUDA GPU with CuPy (marked `gpu`: `pytest -m gpu`, scripts/gpu_check.sh;
skipped without one) and on the CPU build of the same kernels (tests/kernel_emu.py), so the test
code itself is exercised on every machine. Outputs the kernels write are poisoned with NaN first
where the backend lets a test give them (an element a kernel forgets fails the test).
"""
from __future__ import annotations

import importlib.util

import pytest
import torch
from gguf import GGMLQuantizationType as T

from kernel_emu import Emu, build_emulator
from promoe_gguf.backends import ExpertStack, QMatrix, StackedMatrix
from promoe_gguf.backends.cuda import CudaBackend
from promoe_gguf.backends.torch_ops import RopeSpec
from promoe_gguf.format.quants import dequantize_torch, quant_type
from promoe_gguf.kernels.testdata import REL_L2_BOUND, random_blocks, reference_matmul, rel_l2
from promoe_gguf.model.common import KVCache
from promoe_gguf.backends import kv_layout

GPU = torch.cuda.is_available() and importlib.util.find_spec("cupy") is not None


@pytest.fixture(scope="module", params=["emulated", pytest.param("cuda", marks=pytest.mark.gpu)])
def where(request):
    if request.param == "cuda":
        if not GPU:
            pytest.skip("no CUDA device with CuPy (torch.cuda.is_available() and cupy importable)")
        return "cuda", None
    return "cpu", Emu(build_emulator()).launcher


def _backend(where, **kw) -> CudaBackend:
    device, launcher = where
    return CudaBackend(device, launcher=launcher, **kw)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _matrix(be, qtype, shape, seed, name="w") -> tuple[QMatrix, torch.Tensor]:
    raw = random_blocks(qtype, shape, _gen(seed))
    return QMatrix(name, quant_type(qtype).ggml_type, tuple(shape), raw.to(be.device)), raw


@pytest.mark.parametrize("activations", ["f32", "q8"])
@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K, T.Q8_0, T.Q5_0, T.IQ4_XS, T.Q2_K, T.IQ2_XXS, T.IQ1_M, T.MXFP4],
                         ids=lambda t: t.name)
def test_linears_decode_and_prefill(where, qtype, activations):
    """q, k and v through one linears call (1, 3 and 12 tokens: matvec, then the tiled GEMM),
    against float64 products; q8 within its own bound (8-bit activations, as llama.cpp's mmvq)."""
    be = _backend(where, activations=activations)
    cols = 4 * quant_type(qtype).block_size if quant_type(qtype).block_size == 256 else 1024
    ws = [_matrix(be, qtype, (r, cols), 10 * r + int(qtype)) for r in (48, 16, 16)]
    bound = REL_L2_BOUND[qtype] if activations == "f32" else 2e-2
    for ntok in (1, 3, 12):
        x = torch.randn(ntok, cols, generator=_gen(ntok))
        ys = be.linears(x.to(be.device), [w for w, _ in ws])
        for (w, raw), y in zip(ws, ys):
            err = rel_l2(y.cpu(), reference_matmul(raw, qtype, w.shape, x))
            assert err < (REL_L2_BOUND[qtype] if ntok > 8 else bound), (qtype.name, activations, ntok, err)
    assert not be.failed, be.failed


def test_embed_reads_token_ids_on_the_device(where):
    be = _backend(where)
    w, raw = _matrix(be, T.Q6_K, (300, 512), 3, "token_embd.weight")
    ids = torch.tensor([299, 0, 17], dtype=torch.int32)
    got = be.embed(ids.to(be.device), w).cpu()
    assert torch.equal(got, dequantize_torch(raw, T.Q6_K, (300, 512))[ids.long()])


@pytest.mark.parametrize("kv_type", ["f16", "f32"])
def test_rope_store_and_attention_decode(where, kv_type):
    """A decode step's attention: q and k rotated at the positions on the device, k and v stored in
    the cache there, attention over every earlier position (grouped heads), against float64."""
    be = _backend(where, kv_type=kv_type)
    H, hkv, D, n_ctx = 8, 2, 64, 300
    cache = KVCache(1, n_ctx, (hkv, D), (hkv, D), be.device, kv_layout("cuda", kv_type))
    g = _gen(1)
    past = 270
    cache.k[0][:, :past] = torch.randn(hkv, past, D, generator=g).to(cache.dtype).to(be.device)
    cache.v[0][:, :past] = torch.randn(hkv, past, D, generator=g).to(cache.dtype).to(be.device)
    spec = RopeSpec(kind="neox", n_dims=D, base=10000.0)

    class Step:
        pos = torch.tensor([past], dtype=torch.int32, device=be.device)
        n_past = None
    Step.cache = cache
    q, k, v = (torch.randn(1, h, D, generator=g) for h in (H, hkv, hkv))
    qr, kr = be.rope_many((q.to(be.device), k.to(be.device)), spec, Step)
    be.store_kv(cache, 0, kr, v.to(be.device), Step)
    out = be.attention(qr, cache, 0, Step, D ** -0.5).cpu()
    theta, _ = spec.theta("cpu")
    ang = past * theta.double()
    c, s = torch.cos(ang), torch.sin(ang)

    def rot(x):
        a, b = x[..., :D // 2].double(), x[..., D // 2:].double()
        return torch.cat((a * c - b * s, a * s + b * c), -1)
    assert rel_l2(qr.cpu(), rot(q)) < 1e-6 and rel_l2(kr.cpu(), rot(k)) < 1e-6
    K = cache.k[0][:, :past + 1].cpu().double()
    V = cache.v[0][:, :past + 1].cpu().double()
    assert torch.equal(cache.k[0][:, past].cpu(), kr[0].to(cache.dtype).cpu())
    ref = torch.stack([torch.softmax(K[h // 4] @ rot(q)[0, h] * D ** -0.5, 0) @ V[h // 4] for h in range(H)]).reshape(1, -1)
    assert rel_l2(out, ref) < 1e-5
    assert not be.failed, be.failed


def _stack(be, n_exp: int, d: int, f: int, types, seed: int):
    """n_exp experts packed per slot (gate, up, down at fixed offsets) and their float weights."""
    g = _gen(seed)
    mats = (("gate", (f, d)), ("up", (f, d)), ("down", (d, f)))
    sizes = [quant_type(t).row_bytes(s[1]) * s[0] for t, (_, s) in zip(types, mats)]
    offs = [0, -(-sizes[0] // 256) * 256]
    offs.append(offs[1] + -(-sizes[1] // 256) * 256)
    stride = -(-(offs[2] + sizes[2]) // 4096) * 4096
    arena = torch.zeros((n_exp, stride), dtype=torch.uint8)
    dense = []
    for e in range(n_exp):
        de = {}
        for (which, shape), t, off, n in zip(mats, types, offs, sizes):
            raw = random_blocks(t, shape, g, scale=0.05)
            arena[e, off:off + n] = raw
            de[which] = dequantize_torch(raw, t, shape).double()
        dense.append(de)
    arena = arena.to(be.device)
    st = ExpertStack(*(StackedMatrix(quant_type(t).ggml_type, s[0], s[1], arena.data_ptr() + off, stride, n_exp)
                       for t, (_, s), off in zip(types, mats, offs)), owners=(arena, arena, arena))
    return st, dense


@pytest.mark.parametrize("activations", ["f32", "q8"])
@pytest.mark.parametrize("types", [(T.Q4_K, T.Q4_K, T.Q6_K), (T.Q8_0, T.Q8_0, T.Q8_0), (T.Q4_K, T.Q5_K, T.Q4_K)],
                         ids=lambda ts: "/".join(t.name for t in ts))
def test_moe_routed_and_hybrid_pairs(where, types, activations):
    """The fused MoE from the router's ids on the device (a permuted slot table), against float64;
    the hybrid route (some experts skipped, their rows from the CPU) gives the same bits for the
    pairs it computes and adds w * ext (the CPU's rows, zero elsewhere) to every pair."""
    be = _backend(where, activations=activations)
    d, f, E = 256, 512, 6
    st, dense = _stack(be, E, d, f, types, 7)
    perm = torch.randperm(E, generator=_gen(2))                     # expert e sits in slot perm[e]
    dense = [dense[int(perm[e])] for e in range(E)]                 # _stack's weights are by slot
    table = perm.to(torch.int32).to(be.device)
    ids = torch.tensor([[4, 1], [2, 4], [0, 5]])
    x = torch.randn(3, d, generator=_gen(3))
    w = torch.rand(3, 2, generator=_gen(4))
    out = be.moe(x.to(be.device), st, ids.to(be.device), w.to(be.device), table).cpu()
    ref = torch.stack([sum(float(w[t, s]) * (dense[int(ids[t, s])]["down"] @ (
        torch.nn.functional.silu(dense[int(ids[t, s])]["gate"] @ x[t].double()) *
        (dense[int(ids[t, s])]["up"] @ x[t].double()))) for s in range(2)) for t in range(3)])
    assert rel_l2(out, ref) < (2e-5 if activations == "f32" else 3e-2)
    skip = torch.zeros(E, dtype=torch.int32)
    skip[4] = 1
    y, done = be.moe_pairs(x.to(be.device), st, ids.to(be.device), w.to(be.device), table, skip.to(be.device))
    assert done.cpu().tolist() == [0, 1, 1, 0, 1, 1]
    ext = torch.randn(3, 2, d, generator=_gen(5)) * (1 - done.cpu().view(3, 2, 1))   # zero where the CPU took no part
    got = be.moe_combine(y, done, ext.to(be.device), w.to(be.device)).cpu()
    full, _ = be.moe_pairs(x.to(be.device), st, ids.to(be.device), w.to(be.device), table, None)
    parts = torch.where(done.cpu().view(3, 2, 1).bool(), full.cpu().view(3, 2, d), w.unsqueeze(-1) * ext)
    assert torch.equal(got, parts[:, 0] + parts[:, 1])
    none = be.moe_combine(full, torch.ones(6, dtype=torch.int32, device=be.device), None, w.to(be.device)).cpu()
    assert torch.equal(none, out), "per pair + combine must equal the fused launch"
    assert not be.failed, be.failed


def test_decode_kernels_are_deterministic(where):
    be = _backend(where)
    w, _ = _matrix(be, T.Q4_K, (512, 4096), 9)
    x = torch.randn(1, 4096, generator=_gen(1)).to(be.device)
    first = be.linear(x, w).cpu()
    for _ in range(3):
        assert torch.equal(be.linear(x, w).cpu(), first)
