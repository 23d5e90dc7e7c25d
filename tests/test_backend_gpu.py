"""The CUDA backend on a real GPU (skipped without one): Engine(device="cuda") on the embedded default
model, whose Q4_K_M file ships with the package (the GPU machine has no llama.cpp to quantize with).

Oracle: the same code path on the CPU with every kernel replaced by torch's dequantize + matmul
(the backend's own fallback, fp32 like the kernels; dequantization bit-equal to gguf-py)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from promoe_gguf import DEFAULT_MODEL, Engine

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("cupy")

TOKENS = np.random.default_rng(5).integers(0, 256, 24).tolist()


def _no_kernels(launches, device):
    raise RuntimeError("reference run: torch only")


def test_logits_match_torch_reference():
    ref = Engine(DEFAULT_MODEL, launcher=_no_kernels, n_ctx=64).logits(TOKENS)     # CPU, all fallbacks
    eng = Engine(DEFAULT_MODEL, device="cuda", n_ctx=64)
    got = eng.logits(TOKENS)
    assert not eng.backend.failed, eng.backend.failed
    err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    print(f"CUDA vs torch reference: {err:.2e}")
    assert err < 1e-4


def test_cache_does_not_change_tokens():
    want = list(Engine(DEFAULT_MODEL, device="cuda", n_ctx=128).generate(TOKENS[:8], max_tokens=24, temperature=0,
                                                                         ignore_eos=True))
    for kw in ({"cache_rate": 0.25, "policy": "lru"}, {"cache_rate": 0.5, "policy": "promoe", "predictor": "gate"}):
        eng = Engine(DEFAULT_MODEL, device="cuda", n_ctx=128, **kw)
        try:
            assert list(eng.generate(TOKENS[:8], max_tokens=24, temperature=0, ignore_eos=True)) == want, kw
            assert eng.stats["misses"] > 0
        finally:
            eng.close()


def test_decode_launches_and_syncs_per_layer():
    """Profiler-counted kernels and sync-debug-mode syncs of decode tokens: <= 30 and 1 per MoE layer."""
    from torch.profiler import ProfilerActivity, profile
    eng = Engine(DEFAULT_MODEL, device="cuda", n_ctx=64)
    gen = eng.generate(TOKENS[:8], max_tokens=6, temperature=0, ignore_eos=True)
    next(gen)
    next(gen)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught, profile(activities=[ProfilerActivity.CUDA]) as prof:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            n = sum(1 for _ in gen)
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    layers = len(eng.config.moe_layers)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    per_layer = len(kernels) / n / layers
    print(f"{per_layer:.1f} kernels and {len(syncs) / n / layers:.2f} syncs per MoE layer per token")
    assert per_layer <= 30 + 40 / layers            # + the step's embedding, RoPE tables, head and sampler
    assert len(syncs) / n <= layers + 2             # routing ids per layer, + the sampler's read of the logits
