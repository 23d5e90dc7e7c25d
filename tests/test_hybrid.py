"""Hybrid execution: misses computed on the CPU pool (ggml) while the device computes hits.

On this CPU machine the "device" is the CPU too (emulated link), and both sides compute with
llama.cpp's reference kernels, so a hybrid run is bitwise equal to the all-resident run without
weight repacking: the oracle. With the
CUDA backend's code path (its kernels' host build standing in for the GPU: fp32 activations) the
CPU's 8-bit activations make a placement-dependent difference, bounded by the native-quantized
bound (5e-2) and deterministic for a placement.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

import oracle
from kernel_emu import Emu, build_emulator
from promoe_gguf import Engine, ModelError, open_model
from promoe_gguf.cli.info import gpu_plan

TOKENS = np.random.default_rng(11).integers(0, 256, 24).tolist()
SLOW_LINK = "ratio=10"                   # one expert's copy = 10 layers of decode compute


@pytest.fixture(scope="module")
def model_path(test_models):
    return test_models[("llama", "Q4_K_M", "default")]


@pytest.fixture(scope="module")
def reference(model_path):
    eng = Engine(model_path, n_ctx=128, n_batch=16, cpu_repack=False)     # the cache keeps the GGUF layout
    return eng.logits(TOKENS), list(eng.generate(TOKENS[:8], max_tokens=24, temperature=0, ignore_eos=True))


def _run(path, **kw):
    eng = Engine(path, n_ctx=128, n_batch=16, cache_rate=0.5, policy="promoe", **kw)
    try:
        return eng.logits(TOKENS), list(eng.generate(TOKENS[:8], max_tokens=24, temperature=0, ignore_eos=True)), eng.stats
    finally:
        eng.close()


@pytest.mark.parametrize("mode", ["auto", "all"])
def test_hybrid_is_exact_when_both_sides_run_ggml(model_path, reference, mode):
    logits, gen, st = _run(model_path, cpu_experts=mode, link=SLOW_LINK, predictor="gate")
    assert np.array_equal(logits, reference[0])
    assert gen == reference[1]
    assert st["cpu_experts"] > 0 and st["copies_avoided"] == st["cpu_experts"]
    assert st["decode_wait_copy_share"] < 0.5
    assert set(st["cost_model"]) >= {"link_GBps", "cpu_GBps_1tok", "device_ms_per_expert"}


def test_prefill_computes_few_token_misses_on_the_cpu(model_path):
    """A 48-token prefill step on the slow link: the misses with at most FUSED_MAX_TOKENS tokens in the
    step run on the CPU pool while the rest are copied (experts with more tokens stay on the device),
    and the logits are those of the all-resident run, bitwise (both sides run ggml)."""
    from promoe_gguf.backends import FUSED_MAX_TOKENS
    prompt = np.random.default_rng(5).integers(0, 256, 48).tolist()
    want = Engine(model_path, n_ctx=128, n_batch=48, cpu_repack=False).logits(prompt)
    eng = Engine(model_path, n_ctx=128, n_batch=48, cache_rate=0.5, policy="promoe", cpu_experts="auto",
                 link=SLOW_LINK)
    src, on_cpu, crowded = eng.experts.source, [], []
    real = src.cpu_job

    def recorded(key, x, ids, part=None):
        on_cpu.append(int((ids == key[1]).sum()))
        return real(key, x, ids, part)
    src.cpu_job = recorded
    real_order = src.order

    def order(layer, x, ids):
        crowded.extend(int(n) for n in np.bincount(ids.ravel()) if n > FUSED_MAX_TOKENS)
        return real_order(layer, x, ids)
    src.order = order
    try:
        got = eng.logits(prompt)
        st = eng.stats
    finally:
        eng.close()
    assert np.array_equal(got, want)
    assert on_cpu and max(on_cpu) <= FUSED_MAX_TOKENS and st["cpu_experts"] == len(on_cpu)
    assert crowded                                 # the step had experts the CPU was never given


def test_auto_copies_when_the_link_is_fast(model_path, reference):
    """An unthrottled link lands a copy before the CPU could finish: the cost model copies."""
    logits, gen, st = _run(model_path, cpu_experts="auto")
    assert np.array_equal(logits, reference[0]) and gen == reference[1]
    assert st["cpu_experts"] <= st["misses"] // 4, (st["cpu_experts"], st["misses"])


def test_cpu_worker_that_raises_falls_back_to_copying(model_path, reference, caplog):
    calls = []

    def fault():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated ggml failure")
    with caplog.at_level("WARNING", logger="promoe.runtime"):
        logits, gen, st = _run(model_path, cpu_experts="all", link=SLOW_LINK, cpu_fault=fault)
    assert np.array_equal(logits, reference[0]) and gen == reference[1]
    assert "CPU expert worker failed" in caplog.text and "copied" in caplog.text
    # the jobs queued before the failure was seen still run (a prefill step hands the pool several
    # at once) and count; nothing is handed over after it: every later miss is copied
    assert st["cpu_experts"] == len(calls) - 1 >= 2 and st["misses"] > len(calls)


def test_cpu_worker_that_hangs_is_bounded(model_path, reference, caplog):
    def fault():
        time.sleep(3.0)                                    # far beyond 50x an expert's measured time
    t0 = time.perf_counter()
    with caplog.at_level("WARNING", logger="promoe.runtime"):
        logits, gen, st = _run(model_path, cpu_experts="all", link=SLOW_LINK, cpu_fault=fault)
    assert np.array_equal(logits, reference[0]) and gen == reference[1]
    assert "did not finish" in caplog.text
    assert time.perf_counter() - t0 < 60


def test_dead_copy_thread_sends_misses_to_the_cpu(model_path, reference, caplog):
    def fault():
        raise RuntimeError("simulated DMA error")
    with caplog.at_level("WARNING", logger="promoe.runtime"):
        logits, gen, st = _run(model_path, cpu_experts="auto", link=SLOW_LINK, fault=fault)
    assert np.array_equal(logits, reference[0]) and gen == reference[1]
    assert st["cpu_experts"] > 0


def test_close_stops_every_thread(model_path):
    before = {t.name for t in threading.enumerate()}
    eng = Engine(model_path, n_ctx=64, cache_rate=0.5, policy="promoe", predictor="gate", cpu_experts="all",
                 link=SLOW_LINK)
    list(eng.generate(TOKENS[:4], max_tokens=4, temperature=0, ignore_eos=True))
    assert {"promoe-cpu-experts", "promoe-copy", "promoe-predict"} <= {t.name for t in threading.enumerate()}
    eng.close()
    left = {t.name for t in threading.enumerate()} - before
    assert not {n for n in left if n.startswith("promoe")}, left


def test_predictor_state_resets_between_sequences(test_models):
    """A new generate() starts the predictor from scratch: the MLP's per-sequence state is emptied."""
    from promoe_gguf import DEFAULT_MODEL
    from promoe_gguf.predict.mlp import MLPPredictor
    path = DEFAULT_MODEL.replace("-q4_k_m.gguf", ".predictor.pt")
    eng = Engine(DEFAULT_MODEL, n_ctx=128, cache_rate=0.5, policy="promoe", predictor=f"mlp:{path}", cpu_experts="off")
    try:
        pred = eng.source.prefetcher.predictor
        assert isinstance(pred, MLPPredictor)
        list(eng.generate("import os\n", max_tokens=6, temperature=0))
        deadline = time.monotonic() + 10
        while eng.source.prefetcher.q.qsize() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pred.prev                                   # state from the first sequence
        eng._new_sequence()
        while eng.source.prefetcher.q.qsize() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        assert pred.prev == {} and not pred.ema.any()
    finally:
        eng.close()


def test_gpu_mem_fit_plan_equals_allocation(model_path):
    """Engine(gpu_mem=...) allocates what `promoe info --gpu-mem` plans, within the budget."""
    model = open_model(model_path)
    full = gpu_plan(model, 1 << 40, "cpu", 96)
    assert full["experts_on_device"] == full["experts_total"]           # everything fits: no cache
    budget = full["total"] - full["expert_arena"] // 2
    plan = gpu_plan(model, budget, "cpu", 96)
    eng = Engine(model_path, n_ctx=96, gpu_mem=budget)
    try:
        mem = eng.memory
        assert mem == {k: plan[k] for k in mem}
        assert mem["total"] <= budget
        assert len(eng.source.expert_cache.slots) == plan["experts_on_device"] < plan["experts_total"]
    finally:
        eng.close()
    with pytest.raises(ModelError, match="before any expert"):
        Engine(model_path, n_ctx=96, gpu_mem=full["resident"])


@pytest.fixture(scope="module")
def emu():
    return Emu(build_emulator())


def test_hybrid_with_fp32_device_is_deterministic_and_bounded(test_models, emu):
    """CUDA code path (fp32 activations) for hits, ggml (8-bit activations) on the CPU for misses:
    two runs agree bit for bit, and stay within 5e-2 of the all-resident CUDA-path run."""
    path = test_models[("llama", "Q4_K_M", "default")]
    tokens = TOKENS[:6]

    def decode(**kw):
        eng = Engine(path, n_ctx=32, launcher=emu.launcher, **kw)
        try:
            kv = eng.decoder.new_cache(32)
            eng.decoder.forward(torch.tensor(tokens[:2]), kv)
            out = torch.cat([eng.decoder.forward(torch.tensor([t]), kv) for t in tokens[2:]]).numpy()
            return out, eng.stats
        finally:
            eng.close()
    ref, _ = decode()
    a, st = decode(cache_rate=0.5, policy="promoe", cpu_experts="all")
    b, _ = decode(cache_rate=0.5, policy="promoe", cpu_experts="all")
    assert st["cpu_experts"] > 0
    assert np.array_equal(a, b)
    err = oracle.rel_l2(a, ref)
    print(f"hybrid (CPU ggml misses, fp32 device hits) vs all on the device: {err:.2e}")
    assert 0 < err <= 5e-2


def test_glm4moe_through_cache_and_cpu_pool_is_exact(test_models):
    """GLM-4.5's layout (a dense first layer, a shared expert, sigmoid routing with exp_probs_b, a NextN
    block in the file) through the expert cache, the gate predictor and the CPU pool: bitwise equal to
    the all-resident run, and the NextN block's experts are never indexed, cached or copied."""
    path = test_models[("glm4moe", "Q4_K_M", "default")]
    model = open_model(path)
    assert model.config.n_nextn_layers == 1 and model.config.moe_layers == [1, 2]
    assert {layer for layer, _ in model.expert_keys} == {1, 2}
    assert not any(n.startswith("blk.3.") for n in model.resident_names)
    ref = Engine(path, n_ctx=128, n_batch=16, cpu_repack=False)
    want = ref.logits(TOKENS), list(ref.generate(TOKENS[:8], max_tokens=24, temperature=0, ignore_eos=True))
    logits, gen, st = _run(path, cpu_experts="auto", link=SLOW_LINK, predictor="gate")
    assert np.array_equal(logits, want[0]) and gen == want[1]
    assert st["cpu_experts"] > 0 and st["predictor_calls"] > 0
    assert set(st["per_layer"]) == {1, 2}


def _run_pair(eng) -> tuple:
    """The logits of TOKENS and 16 greedy tokens after their first 8."""
    return eng.logits(TOKENS), list(eng.generate(TOKENS[:8], max_tokens=16, temperature=0, ignore_eos=True))


def _cache_modes_match(path, want) -> None:
    """Copy mode (lru) and hybrid (every miss on the CPU, promoe + gate) at cache rate 0.5: bitwise `want`."""
    for kw in (dict(cpu_experts="off", policy="lru"), dict(cpu_experts="all", policy="promoe", predictor="gate",
                                                           link=SLOW_LINK)):
        eng = Engine(path, n_ctx=128, n_batch=16, cache_rate=0.5, **kw)
        try:
            got, st = _run_pair(eng), eng.stats
        finally:
            eng.close()
        assert np.array_equal(got[0], want[0]) and got[1] == want[1], kw
        assert st["misses"] > 0 and (kw["cpu_experts"] == "off" or st["cpu_experts"] > 0)


def test_gpt_oss_biases_follow_experts_into_slots_and_the_cpu_pool(test_models):
    """gpt-oss's expert biases stay resident and are picked by expert id wherever the expert runs (a
    cache slot, the CPU pool): copy mode and hybrid are bitwise equal to the all-resident run."""
    path = test_models[("gpt-oss", "MXFP4_MOE", "default")]
    _cache_modes_match(path, _run_pair(Engine(path, n_ctx=128, n_batch=16, cpu_repack=False)))


def test_qwen35moe_recurrent_state_with_a_cache_and_across_sequences(test_models):
    """qwen35moe's gated delta net carries a state through the sequence: with an expert cache (misses
    copied, or computed on the CPU) the logits and tokens are bitwise the all-resident run's, and a
    second sequence on the same Engine starts from a zero state (the same tokens again)."""
    path = test_models[("qwen35moe", "Q4_K_M", "default")]
    ref = Engine(path, n_ctx=128, n_batch=16, cpu_repack=False)
    want = _run_pair(ref)
    again = _run_pair(ref)
    assert np.array_equal(again[0], want[0]) and again[1] == want[1]
    _cache_modes_match(path, want)
