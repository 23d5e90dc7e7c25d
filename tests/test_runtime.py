"""The expert cache runtime on CPU (emulated link): results, budgets, failures, stress.

The oracle for every result here is the all-resident run of the same engine: the cache must not
change a single bit of the logits, whatever the policy, budget, predictor, link speed or failure.
These tests exercise the copy machinery, so misses are copied (cpu_experts="off"); the CPU expert
pool has its own tests (tests/test_hybrid.py).
"""
import gc
import logging
import threading
import time

import numpy as np
import pytest
import torch

from promoe_gguf import Engine, ModelError
from promoe_gguf.predict.base import Predictor
from promoe_gguf.predict.oracle import RoutingRecorder
from promoe_gguf.runtime.cache import ExpertCache, Policy, PromoePolicy, use_weights
from promoe_gguf.runtime.stats import Stats
from promoe_gguf.runtime.transfer import HIGH, CopyQueue, Task
from promoe_gguf.sim import load_inputs, simulate

TOKENS = np.random.default_rng(7).integers(0, 256, 40).tolist()


@pytest.fixture(scope="module")
def model_path(test_models):
    return test_models[("qwen2moe", "Q4_K_M", "default")]


@pytest.fixture(scope="module")
def reference(model_path):
    """All-resident logits (prefill) and greedy continuation (decode through the KV cache)."""
    eng = Engine(model_path, n_ctx=128, n_batch=16, cpu_repack=False)      # the cache keeps the GGUF layout
    rec = RoutingRecorder()
    eng.experts.observers.append(rec)
    logits = eng.logits(TOKENS)
    gen = list(eng.generate(TOKENS[:12], max_tokens=12, temperature=0))
    return logits, gen, rec.routes


def _run(model_path, **kw):
    kw.setdefault("cpu_experts", "off")
    eng = Engine(model_path, n_ctx=128, n_batch=16, **kw)
    try:
        logits = eng.logits(TOKENS)
        gen = list(eng.generate(TOKENS[:12], max_tokens=12, temperature=0))
        return logits, gen, eng.stats, eng
    finally:
        eng.close()


@pytest.mark.parametrize("policy", ["lru", "static", "promoe"])
@pytest.mark.parametrize("predictor", ["none", "gate", "oracle"])
def test_bitwise_identical_whatever_the_cache(model_path, reference, policy, predictor):
    ref_logits, ref_gen, routes = reference
    for rate, link in ((0.25, "200MB/s"), (0.5, None), (1.0, "1GB/s,50us")):
        logits, gen, stats, _ = _run(model_path, cache_rate=rate, policy=policy, predictor=predictor, link=link,
                                     routes=routes if predictor == "oracle" else None)
        assert np.array_equal(logits, ref_logits), (policy, predictor, rate)
        assert gen == ref_gen, (policy, predictor, rate)
        assert stats["hits"] + stats["misses"] > 0 and stats["bytes_h2d"] > 0


class _DistinctPerStep:
    """Counts each step's distinct chosen experts per layer: what the policy must have counted as
    hits plus misses."""

    def __init__(self):
        self.per_layer: dict[int, int] = {}

    def begin_step(self, positions):
        pass

    def observe(self, layer, x, chosen, logits=None):
        self.per_layer[layer] = self.per_layer.get(layer, 0) + len(set(chosen.reshape(-1).tolist()))


def test_policy_counts_settled_per_step_equal_the_routing(model_path):
    """Hits and misses are logged per layer and settled once per step (and before stats are read):
    per layer they add up to the distinct experts the all-resident run's router chose, step by step.
    The gate predictor reads each decode layer's inputs from the step's own buffers: it was called."""
    ref = Engine(model_path, n_ctx=128, n_batch=16, cpu_repack=False)
    count = _DistinctPerStep()
    ref.experts.observers.append(count)
    ref.logits(TOKENS)
    list(ref.generate(TOKENS[:12], max_tokens=12, temperature=0))
    eng = Engine(model_path, n_ctx=128, n_batch=16, cache_rate=0.5, policy="lru", predictor="gate", cpu_experts="off")
    try:
        eng.logits(TOKENS)
        list(eng.generate(TOKENS[:12], max_tokens=12, temperature=0))
        st = eng.stats
        got = {layer: v["hits"] + v["misses"] for layer, v in st["per_layer"].items() if v["hits"] + v["misses"]}
        assert got == count.per_layer
        # the predictor thread works behind the compute thread: wait (bounded) for it to catch up
        deadline = time.monotonic() + 20
        while (st["predictor_calls"] + st["dropped_predictions"] < 12 * len(count.per_layer) // 2
               and time.monotonic() < deadline):
            time.sleep(0.05)
            st = eng.stats
        assert st["predictor_calls"] + st["dropped_predictions"] >= 12 * len(count.per_layer) // 2
        assert st["predictor_calls"] > 0
    finally:
        eng.close()


def test_oracle_prefetch_is_useful_and_cuts_misses(model_path):
    """Decode with the true future known (the oracle replays a recorded routing): in the Engine its
    prefetches are issued and used and the tokens stay the resident run's; on the simulator's clock
    (the same cache, queue and prediction code, the predictor's latency modelled) it misses less and
    waits less than the same policy without a predictor. The Engine's own miss counts are not
    compared: whether a prediction on the predictor thread lands before its layer on this shared
    2-core machine is timing (fresh-clone CI saw 105 against 105 where a quiet run sees 95 to 104)."""
    prompt, n = TOKENS[:8], 48
    ref = Engine(model_path, n_ctx=128, cpu_repack=False)
    rec = RoutingRecorder()
    ref.experts.observers.append(rec)
    want = list(ref.generate(prompt, max_tokens=n, temperature=0, ignore_eos=True))
    runs = {}
    for predictor in ("none", "oracle"):
        eng = Engine(model_path, n_ctx=128, cache_rate=0.5, policy="promoe", predictor=predictor, link="500MB/s",
                     cpu_experts="off",
                     routes=rec.routes, lookahead=4)
        try:
            assert list(eng.generate(prompt, max_tokens=n, temperature=0, ignore_eos=True)) == want
            runs[predictor] = eng.stats
        finally:
            eng.close()
    assert runs["oracle"]["prefetch_useful"] > 0
    assert runs["none"]["prefetch_useful"] == 0
    inp = load_inputs(shape="qwen3-30b-a3b", profile="rtx4070ti-12g", prompt=64, decode=48)
    sim = {p: simulate(engine="promoe", inputs=inp, cache_rate=0.5, policy="promoe", predictor=p, cpu_experts="off")
           for p in ("none", "oracle")}
    assert sim["oracle"]["decode_hit_rate"] > sim["none"]["decode_hit_rate"]
    assert sim["oracle"]["decode_stall_share"] < sim["none"]["decode_stall_share"]


def test_static_policy_keeps_the_experts_counted_most(model_path):
    """use_counts (`profile`, its earlier name, is still taken) decides the static policy's hot set:
    the experts counted most are copied at start-up and never evicted; both at once are refused."""
    from promoe_gguf import open_model
    from promoe_gguf.errors import ParameterError
    keys = open_model(model_path).expert_keys
    counts = {key: 3 * i % len(keys) for i, key in enumerate(keys)}
    for kw in (dict(use_counts=counts), dict(profile=counts)):
        eng = Engine(model_path, n_ctx=64, cache_rate=0.5, policy="static", cpu_experts="off", **kw)
        try:
            hot = {s.key for s in eng.source.expert_cache.slots if s.permanent}
            list(eng.generate(TOKENS[:4], max_tokens=4, temperature=0))
            assert hot and hot == {s.key for s in eng.source.expert_cache.slots if s.permanent}
        finally:
            eng.close()
        assert hot == set(sorted(keys, key=lambda k: (-counts[k], k))[:len(hot)]), kw
    with pytest.raises(ParameterError, match="given twice"):
        Engine(model_path, n_ctx=64, cache_rate=0.5, policy="static", use_counts=counts, profile=counts)


def test_budget_never_exceeded_and_too_small_refused(model_path):
    from promoe_gguf.runtime.host_store import HostStore
    from promoe_gguf import open_model
    store = HostStore(open_model(model_path))
    budget = 5 * store.slot_bytes + store.slot_bytes // 2
    eng = Engine(model_path, n_ctx=128, cache_mem=budget, cpu_experts="off")
    try:
        assert eng.source.expert_cache.capacity_bytes <= budget
        eng.logits(TOKENS[:20])
        assert len(eng.source.expert_cache.where) <= 5
    finally:
        eng.close()
    k = eng.config.n_experts_used
    with pytest.raises(ModelError, match=f"top-{k} working set"):
        Engine(model_path, cache_mem=(k - 1) * store.slot_bytes + 1)
    with pytest.raises(ModelError, match="cache_rate must be a number in"):
        Engine(model_path, cache_rate=1.5)


def _three_ready(policy):
    cache = ExpertCache(3, 16, "cpu", policy, moe_layers=(0,))
    for i, key in enumerate([(0, 0), (0, 1), (0, 2)]):
        s = cache.allocate(key, lambda s: None)
        s.state, s.last_use = "ready", i
    cache.where[(0, 0)].pins = 1                  # being read by a kernel
    cache.needed = {(0, 1)}                       # the current layer still needs it
    return cache


def test_pinned_and_needed_slots_are_never_victims():
    cache = _three_ready(PromoePolicy())
    victim = cache.allocate((1, 0), lambda s: None)
    assert victim.index == 2                      # the only evictable one, though not the oldest
    victim.state = "ready"
    cache.needed = {(0, 1), (1, 0)}
    assert cache.allocate((1, 1), lambda s: None) is None


@pytest.mark.parametrize("policy", [Policy(), PromoePolicy()], ids=["lru", "promoe"])
def test_a_prefill_guess_takes_a_slot_of_a_layer_already_run(policy):
    """Three layers at their share, every expert used once. In a prefill step at layer 1, a guess for
    layer 2 takes the lowest-ranked slot of layer 0 (already run this step, next needed next step),
    never one of its own layer (the chunk needs them) nor of the layer computing; in a decode step
    the same guess finds nothing worth its slot and is dropped, as before. While the arena still has
    an empty slot the guess takes that and evicts nothing (evicting there left a warm cache with
    empty slots, and cost the next step copies)."""
    def cache_at_layer_1(prefill, n_slots=6):
        cache = ExpertCache(n_slots, 16, "cpu", policy, moe_layers=(0, 1, 2))
        cache.begin_step(512 if prefill else 1)
        for i, key in enumerate([(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]):
            slot = cache.allocate(key, lambda s: None)
            slot.state = "ready"
            cache.record_use(key)
            cache.touch(slot)
        cache.where[(0, 1)].last_use = 0                # layer 0's least recently used
        cache.uses[(0, 1)] = (0.5, cache.tokens)        # and least valued
        cache.mark_needed([(1, 0), (1, 1)])
        cache.expect({(2, 0), (2, 1), (2, 2)}, {(2, 2): cache.step})
        return cache
    cache = cache_at_layer_1(prefill=True)
    before = dict(cache.where)
    slot = cache.allocate((2, 2), lambda s: None, speculative=True)
    assert slot is before[(0, 1)] and (0, 1) not in cache.where
    assert all(cache.where.get(k) is before[k] for k in [(0, 0), (1, 0), (1, 1), (2, 0), (2, 1)])
    assert cache_at_layer_1(prefill=False).allocate((2, 2), lambda s: None, speculative=True) is None
    roomy = cache_at_layer_1(prefill=True, n_slots=7)
    before = dict(roomy.where)
    slot = roomy.allocate((2, 2), lambda s: None, speculative=True)
    assert slot.index == 6 and all(roomy.where.get(k) is v for k, v in before.items())


def test_a_prefill_step_values_its_experts_as_its_tokens_would_one_by_one():
    """A T-token step adds each chosen expert's uses decayed per token to the step's end (what T decode
    steps would add), and earlier values decay by USE_DECAY per token, not per step: after a prompt the
    experts its last tokens chose rank first. By hand: tokens [0, 1], [1, 2], [1, 3] give expert 0
    0.9^2, expert 1 0.9^2 + 0.9 + 1, expert 2 0.9, expert 3 1."""
    assert use_weights(np.array([[0, 1], [1, 2], [1, 3]])) == pytest.approx({0: 0.81, 1: 2.71, 2: 0.9, 3: 1.0})
    cache = ExpertCache(4, 16, "cpu", PromoePolicy(), moe_layers=(0,))
    cache.begin_step(1)
    cache.record_use((0, 5))                              # a decode step: one use
    cache.begin_step(3)
    for e, w in use_weights(np.array([[0, 1], [1, 2], [1, 3]])).items():
        cache.record_use((0, e), w)
    assert cache.value((0, 5)) == pytest.approx(0.9 ** 3)    # three tokens later
    assert cache.value((0, 1)) > cache.value((0, 3)) > cache.value((0, 2)) > cache.value((0, 0)) > cache.value((0, 5))
    cache.begin_step(1)
    assert cache.value((0, 1)) == pytest.approx(2.71 * 0.9)


@pytest.mark.parametrize("policy", [Policy(), PromoePolicy()], ids=["lru", "promoe"])
def test_a_prefill_miss_takes_a_slot_of_a_layer_already_run_before_one_ahead(policy):
    """Layer 1 under its share (2 of 7 slots) with no empty slot, layers 0 and 2 over it. In a prefill step a miss of
    layer 1 takes layer 0's slot (that layer has run; layer 2 still needs its experts in this step),
    even where layer 2's is ranked lower; in a decode step it takes the lowest-ranked, layer 2's."""
    def cache_at_layer_1(prefill):
        cache = ExpertCache(7, 16, "cpu", policy, moe_layers=(0, 1, 2))
        cache.begin_step(512 if prefill else 1)
        keys = [(2, 0), (2, 1), (2, 2), (0, 0), (0, 1), (0, 2), (1, 0)]     # layer 2's least recent
        for key in keys:
            cache.mark_needed([k for k in keys if k[0] == key[0]])         # a layer needing more than its share
            cache.hold_layer()
            slot = cache.allocate(key, lambda s: None)
            slot.state = "ready"
            cache.touch(slot)
            cache.record_use(key, 0.5 if key[0] == 2 else 1.0)            # and least valued
        cache.release_layer()
        cache.mark_needed([(1, 0), (1, 1)])
        assert [cache.layer_count[layer] for layer in (0, 1, 2)] == [3, 1, 3] and cache.first_empty() is None
        return cache
    cache = cache_at_layer_1(prefill=True)
    before = dict(cache.where)
    assert cache.allocate((1, 1), lambda s: None) is before[(0, 0)]
    decode = cache_at_layer_1(prefill=False)
    before = dict(decode.where)
    assert decode.allocate((1, 1), lambda s: None) is before[(2, 0)]


def test_a_copy_holding_a_slot_advances_while_the_first_waits_for_one(model_path, reference):
    """A guess upgraded to a certainty keeps its slot (part copied) but queues behind a precise copy
    that has none; with nothing evictable the copy thread must still advance the one holding a slot
    (the compute thread may wait for it), not sleep: `promoe bench` stalled 60 s here at cache rate
    0.25 with promoe + gate. The queue alone, then the Engine case that hit it."""
    cache = ExpertCache(4, 16, "cpu", PromoePolicy(), moe_layers=(0, 1))
    for i, key in enumerate([(0, 0), (0, 1), (1, 2)]):
        slot = cache.allocate(key, lambda s: None)
        slot.state, slot.last_use = "ready", i
    cache.needed = {(0, 0), (0, 1), (1, 2), (1, 0), (1, 1)}       # nothing may be evicted
    guess = Task((1, 1), HIGH, slot=cache.allocate((1, 1), lambda s: None), next_chunk=1)
    assert guess.slot is not None and len(cache.where) == 4                 # every slot taken
    q = CopyQueue(None, cache, Stats())
    first = Task((1, 0), HIGH)
    q.queues[HIGH].extend([first, guess])
    q.tasks.update({first.key: first, guess.key: guess})
    assert q.next_task() is guess and q.starved and first.slot is None

    eng = Engine(model_path, n_ctx=328, n_batch=328, link="ratio=10", cache_rate=0.25, policy="promoe",
                 predictor="gate", cpu_experts="off", cpu_repack=False)
    eng.experts.source.wait_timeout = 10.0                          # a stall fails in 10 s, not 60
    try:
        want = Engine(model_path, n_ctx=328, n_batch=328, cpu_repack=False)
        prompt = list(range(5, 13))
        assert list(eng.generate(prompt, max_tokens=4, temperature=0, ignore_eos=True)) == \
            list(want.generate(prompt, max_tokens=4, temperature=0, ignore_eos=True))
    finally:
        eng.close()


def test_reactive_lru_may_evict_needed_but_never_pinned():
    cache = _three_ready(Policy())
    assert cache.allocate((1, 0), lambda s: None).index == 1   # LRU among unpinned, needed or not
    cache.where[(1, 0)].pins = 1
    cache.where[(0, 2)].pins = 1
    assert cache.allocate((1, 1), lambda s: None) is None


class WrongPredictor(Predictor):
    """Always predicts the experts that will NOT be used... as far as it can tell: random."""
    name = "wrong"

    def predict(self, layer, x):
        E = self.model.config.n_experts
        return {layer + 1: torch.rand(x.shape[0], E)}


class SlowPredictor(WrongPredictor):
    name = "slow"

    def predict(self, layer, x):
        time.sleep(0.02)
        return super().predict(layer, x)


class BrokenPredictor(Predictor):
    name = "broken"

    def predict(self, layer, x):
        raise ValueError("predictor exploded")


@pytest.mark.parametrize("cls", [WrongPredictor, SlowPredictor, BrokenPredictor])
def test_bad_predictors_degrade_to_reactive(model_path, reference, cls, caplog):
    from promoe_gguf import open_model
    pred = cls(open_model(model_path))
    with caplog.at_level(logging.WARNING, logger="promoe.runtime"):
        logits, gen, stats, _ = _run(model_path, cache_rate=0.25, policy="promoe", predictor=pred, link="300MB/s")
    assert np.array_equal(logits, reference[0]) and gen == reference[1]
    if cls is BrokenPredictor:
        assert stats["predictor_errors"] == 1 and stats["predictor_calls"] == 0
        assert "predictor broken failed" in caplog.text
    else:                                   # it ran, and nothing it said was an error
        assert stats["predictor_calls"] > 0 and stats["predictor_errors"] == 0



def test_dead_copy_thread_degrades_to_reactive(model_path, reference, caplog):
    calls = {"n": 0}

    def fault():
        calls["n"] += 1
        if calls["n"] == 7:
            raise OSError("DMA engine on fire")
    with caplog.at_level(logging.WARNING, logger="promoe.runtime"):
        logits, gen, stats, eng = _run(model_path, cache_rate=0.25, policy="lru", fault=fault)
    assert np.array_equal(logits, reference[0]) and gen == reference[1]
    assert not eng.source.transfer.alive
    assert "copy thread died" in caplog.text and "reactively" in caplog.text


def test_stress_many_decode_steps_random_delays(model_path):
    """Thousands of decode steps, tiny cache, jittery link: no deadlock, no leak, same tokens."""
    n_seq, n_steps = 4, 260                       # 1040 decode steps (the test models' context is 512)
    threads_before = threading.active_count()
    ref = Engine(model_path, n_ctx=n_steps + 8, cpu_repack=False)
    eng = Engine(model_path, n_ctx=n_steps + 8, cache_rate=0.25, policy="promoe", predictor="gate", cpu_experts="off",
                 link="2GB/s,5us,jitter=200us")
    try:
        for seq in range(n_seq):
            prompt = [1 + seq, 2, 3]
            want = list(ref.generate(prompt, max_tokens=n_steps, temperature=0.9, seed=seq, ignore_eos=True))
            got = list(eng.generate(prompt, max_tokens=n_steps, temperature=0.9, seed=seq, ignore_eos=True))
            assert got == want, seq
            cache = eng.source.expert_cache
            assert len(cache.where) <= len(cache.slots)
            assert all(s.pins == 0 for s in cache.slots)
            assert eng.source.prefetcher.q.qsize() <= 70
            if seq == 0:
                threads_mid = threading.active_count()
        assert threading.active_count() == threads_mid
    finally:
        eng.close()
    gc.collect()
    assert threading.active_count() <= threads_before
