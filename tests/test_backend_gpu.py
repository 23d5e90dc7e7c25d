"""Engine(device="cuda") on a real GPU (skipped without one), on the embedded default model (its
Q4_K_M file ships with the package).

Oracles: stock llama.cpp (llama-cpp-python, carried to the GPU machine as a wheel) on the dequantized
twin of the same file (gguf-py's dequantization) for the fp32 path, and on the file itself for the
default path (8-bit activations, fp16 KV cache); without llama-cpp-python those two tests skip. The
structural checks need no oracle: graphs and eager give bitwise-equal logits, the cache never
changes tokens when misses are copied, and a decode token costs one host sync with every expert
resident (torch.cuda.set_sync_debug_mode counts them) and one per MoE layer with a cache."""
from __future__ import annotations

import collections
import importlib.util
import os
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
NATIVE_BOUND = 5e-2          # as tests/test_cuda_path.py: q8 activations + fp16 KV vs llama.cpp native


def _ours(**kw) -> np.ndarray:
    """A 9-token prefill, then decode steps one token at a time, as logits [T, vocab]."""
    eng = Engine(DEFAULT_MODEL, device="cuda", n_ctx=64, **kw)
    try:
        eng._new_sequence()
        out = [eng._prefill(eng.kv_cache, torch.tensor(TOKENS[:9])).float().cpu().numpy()]
        out += [eng.decoding.step(t).numpy()[None].copy() for t in TOKENS[9:]]
        assert not eng.backend.failed, eng.backend.failed
        assert eng.decoding.counts.mode == "graphs", eng.decoding.counts.why_eager
        return np.concatenate(out)
    finally:
        eng.close()


def _llama(path: str) -> np.ndarray:
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    import oracle
    return oracle.logits(path, TOKENS, n_ctx=64, chunk=9, n_prefill=9, repack=False)


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed")
def test_fp32_path_matches_llama_cpp_on_the_twin(tmp_path, factory):
    got = _ours(activations="f32", kv_type="f32")
    ref = _llama(factory.dequantized_twin(DEFAULT_MODEL, str(tmp_path / "twin-f32.gguf")))
    err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    print(f"CUDA fp32 path vs llama.cpp on the dequantized twin: {err:.2e}")
    assert err <= 1e-3


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed")
def test_default_path_matches_llama_cpp_native():
    got = _ours()
    ref = _llama(DEFAULT_MODEL)
    err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    print(f"CUDA q8/f16 path vs llama.cpp native: {err:.2e}")
    assert err <= NATIVE_BOUND


def test_graphs_equal_eager_and_the_cache_never_changes_tokens():
    def run(**kw):
        eng = Engine(DEFAULT_MODEL, device="cuda", n_ctx=128, **kw)
        try:
            eng._new_sequence()
            eng._prefill(eng.kv_cache, torch.tensor(TOKENS[:8]), last_only=True)
            steps = [eng.decoding.step(t).clone() for t in TOKENS[8:20]]
            toks = list(eng.generate(TOKENS[:8], max_tokens=16, temperature=0, ignore_eos=True))
            return steps, toks, eng.stats
        finally:
            eng.close()
    graphs, eager = run(), run(graphs=False)
    assert all(torch.equal(a, b) for a, b in zip(graphs[0], eager[0]))
    for kw in ({"cache_rate": 0.25, "policy": "lru", "cpu_experts": "off"},
               {"cache_rate": 0.5, "policy": "promoe", "predictor": "gate", "cpu_experts": "off"}):
        steps, toks, st = run(**kw)
        assert toks == graphs[1], kw
        assert all(torch.equal(a, b) for a, b in zip(steps, graphs[0])), kw
        assert st["misses"] > 0
    steps, toks, st = run(cache_rate=0.5, policy="promoe", predictor="gate", cpu_experts="all")
    assert st["cpu_experts"] > 0, "hybrid must run experts on the CPU"


@pytest.mark.parametrize("cache", [{}, {"cache_rate": 0.5, "policy": "lru", "cpu_experts": "off"}],
                         ids=["resident", "cache"])
def test_decode_syncs_per_token(cache):
    """torch's sync debug mode sees one host sync per decode token with every expert resident, and
    one per MoE layer plus one with a cache."""
    eng = Engine(DEFAULT_MODEL, device="cuda", n_ctx=64, **cache)
    try:
        gen = eng.generate(TOKENS[:8], max_tokens=12, temperature=0, ignore_eos=True)
        for _ in range(4):
            next(gen)                         # prefill, eager step, recording
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                n = sum(1 for _ in gen)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
        sites = collections.Counter(f"{os.path.basename(w.filename)}:{w.lineno}" for w in syncs)
        moe = len(eng.config.moe_layers)
        print(f"{len(syncs) / n:.2f} syncs per token ({eng.decoding.counts.mode}), made at {dict(sites)}")
        assert len(syncs) / n <= (1 if not cache else moe + 1) + 0.01, f"{len(syncs)} syncs in {n} tokens, at {dict(sites)}"
    finally:
        eng.close()
