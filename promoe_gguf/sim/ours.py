"""Our runtime on a virtual clock: the REAL cache, policies, admission, placement and prefetch logic.

What is reused unchanged (promoe_gguf.runtime), as subclasses that call their base's constructor:
ExpertCache and its policies (victims, values, protection); CopyQueue (two priorities, a slot taken at
a copy's first chunk; TransferEngine is it plus the copy thread); CachedExpertSource whole (hit/miss,
early preemption, placement.place for CPU and split experts, the fused decode path, reordered
prefill), with its three hooks, `wait_until_copied`, `wait_until_staged` and `cpu_job`, run on the clock; Predictions (protection,
prediction values, speculative requests; Prefetcher is it plus the predictor thread); CostModel,
Stats, and memory.fit_cache for the budget.

What is simulated: time. Copies take latency + bytes / h2d per chunk on one link; device work and CPU
experts take their roofline time (costs.py); the predictor answers predictor_us after a layer's
router; a waiting compute thread steps the clock until its expert has landed (stall).
The arena is a `meta` tensor: no memory is allocated for slots.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

from ..backends import FUSED_MAX_TOKENS
from ..errors import ModelError
from ..predict.base import Predictor
from ..runtime.cache import ExpertCache, make_policy
from ..runtime.cost import CostModel
from ..runtime.prefetcher import Predictions, voted_order
from ..runtime.placement import CPU_EXPERTS
from ..runtime.source import CachedExpertSource
from ..runtime.stats import Stats
from ..runtime.transfer import ADMIT, HIGH, CopyQueue
from .clock import Clock
from .costs import SimModel, cpu_expert_s, gpu_expert_s, layer_gpu_s, roofline

KV_BYTES = 2               # our CUDA KV cache is float16, as llama.cpp's (memory.kv_cache_bytes)


class SimStore:
    """The host store's layout without its bytes (what the cache, the queues and _place read)."""

    def __init__(self, layout):
        self.keys, self.layout, self.slot_bytes = layout.keys, layout.matrices, layout.slot_bytes
        self.store_layout = layout
        self.expert_bytes = {k: sum(m.nbytes for m, _ in mats) for k, mats in layout.matrices.items()}

    def chunks(self, key) -> list:
        return self.store_layout.chunks(key)


class SimLink:
    def __init__(self, prof):
        self.bandwidth, self.latency = prof.h2d_bw, prof.h2d_latency_us * 1e-6

    def describe(self) -> str:
        return f"simulated link: {self.bandwidth / 1e9:.3g} GB/s, {self.latency * 1e6:.0f} us per copy"


class SimTransfer(CopyQueue):
    """The runtime's copy queue, its copy thread replaced by clock events."""

    def __init__(self, store, cache, stats, clock: Clock, prof):
        super().__init__(store, cache, stats)
        self.clock, self.link, self.busy = clock, SimLink(prof), False

    def request(self, key, priority: int) -> None:
        super().request(key, priority)
        self.kick()

    def request_part(self, key, lo: int, staging):
        task = super().request_part(key, lo, staging)
        self.kick()
        return task

    def kick(self) -> None:
        """Start the next chunk if the link is idle (the choice is remade after every chunk)."""
        if self.busy:
            return
        with self.cache.cv:
            task = self.next_task()
        if task is None:
            return
        nbytes = self.pieces(task)[task.next_chunk].wire_bytes
        self.busy, self.on_wire = True, nbytes
        wire = self.link.latency + nbytes / self.link.bandwidth if nbytes else 0.0   # zeros: a device memset
        self.clock.at(self.clock.now + wire, lambda: self._land(task, nbytes))

    def _land(self, task, nbytes: int) -> None:
        self.busy, self.on_wire = False, 0
        with self.cache.cv:
            self.landed(task, nbytes)
        self.kick()

    def close(self) -> None:
        pass


class SimPredictor(Predictor):
    """Scores from the routing source: the trace's gate or the truth (oracle), one-hot top-k sets."""

    def __init__(self, routing, kind: str, seq: int, lookahead: int):
        super().__init__(None, lookahead)
        self.routing, self.name, self.seq = routing, kind, seq
        self.index = {layer: i for i, layer in enumerate(routing.moe_layers)}

    def start_sequence(self, seq: int) -> None:
        """The Engine resets the predictor per sequence (reset_sequence); the routing moves on."""
        self.seq = seq
        self.reset()

    def predict(self, layer, x):
        rows = list(x)
        out = {}
        for r, row in enumerate(rows):
            for t, experts in self.routing.predict(self.name, self.seq, int(row), self.index[layer], self.lookahead).items():
                out.setdefault(t, torch.zeros((len(rows), self.routing.E)))[r, experts] = 1.0
        return out


class SimPrefetcher(Predictions):
    """The runtime's predictions, answered on the clock predictor_us after each router (one predictor thread)."""

    def __init__(self, predictor, transfer, cache, stats, n_layers: int, n_used: int, clock: Clock, prof):
        super().__init__(predictor, transfer, cache, stats, n_layers, n_used)
        self.clock, self.cost, self.free_at, self.rows = clock, prof.predictor_us * 1e-6, 0.0, []

    def reset(self) -> None:
        self.predictor.reset()

    def begin_step(self, positions) -> None:
        self.step += 1
        self.progress = (self.step, -1)
        self.rows = list(positions)

    def layer(self, layer: int, x, ids, static: bool = False) -> None:
        self.progress = (self.step, layer)
        step, rows = self.step, self.rows
        self.free_at = max(self.clock.now, self.free_at) + self.cost

        def answer():
            self.predictor.begin_step(rows)
            self.apply(step, layer, x, ids, None)
        self.clock.at(self.free_at, answer)

    def pick(self, scores: torch.Tensor) -> list[int]:
        """Predictions.pick with numpy's top-k (same sets for one-hot top-k scores, 50x faster)."""
        a = scores.numpy()
        k = min(self.n_used, a.shape[-1])
        top = np.argsort(-a, axis=-1, kind="stable")[:, :k].reshape(-1)
        return voted_order(np.bincount(top, minlength=a.shape[-1]))

    def close(self) -> None:
        pass


@dataclass
class SimJob:
    key: tuple
    tokens: int
    seconds: float
    finish: float
    part: tuple | None = None        # a split expert's intermediate rows (lo, hi)


class SimPool:
    """The CPU expert pool: one worker, jobs in submission order (SimSource.cpu_job times them)."""
    alive = True

    def __init__(self):
        self.free_at = 0.0

    def submit(self, jobs) -> None:
        pass


class SimSource(CachedExpertSource):
    """CachedExpertSource itself; waiting for a copy and running a CPU job happen on the clock."""

    def __init__(self, m: SimModel, prof, store, cache, transfer, stats, prefetcher, pool, cpu_experts, cost, clock):
        model = SimpleNamespace(config=SimpleNamespace(n_experts_used=m.k, n_experts=m.E, moe_layers=m.moe_layers))
        super().__init__(model, "meta", store, cache, transfer, stats, prefetcher, cpu_pool=pool,
                         cpu_experts=cpu_experts, cost=cost)
        self.m, self.prof, self.clock = m, prof, clock
        self.handoff = prof.cpu_handoff_us * 1e-6          # a job to the pool and its rows back
        self.wait_copy = self.wait_cpu = self.cpu_bytes = 0.0

    def wait_until_copied(self, key):
        """Step the clock until every chunk of `key` has landed; pin it (as the runtime does)."""
        t0, n = self.clock.now, len(self.store.chunks(key))
        self.transfer.request(key, HIGH)
        missed = False
        while True:
            slot = self.expert_cache.where.get(key)
            if slot is not None and slot.ready_chunks >= n:
                break
            if slot is None and key not in self.transfer.tasks:
                self.transfer.request(key, HIGH)
            missed = True
            if not self.clock.step():
                raise ModelError(f"simulation stuck: expert {key[1]} of layer {key[0]} can never be copied "
                                 f"(every slot is pinned; the cache is smaller than one step's experts)")
        with self.expert_cache.cv:
            self._pin(slot)
        waited = self.clock.now - t0
        self._waited(key, waited)
        self.wait_copy += waited
        if missed:                                    # the compute thread wakes, re-checks, pins
            self.clock.advance(self.clock.now + self.prof.miss_us * 1e-6)
        return slot

    def wait_until_staged(self, task) -> None:
        """Step the clock until a split expert's device part has landed."""
        t0 = self.clock.now
        while not task.landed:
            if not self.clock.step():
                raise ModelError(f"simulation stuck: the device part of expert {task.key[1]} of layer {task.key[0]} "
                                 "can never be copied")
        self.counters.add(task.key[0], "stall_s", self.clock.now - t0)
        self.wait_copy += self.clock.now - t0

    def cpu_job(self, key, x, ids, part=None):
        T = int((ids == key[1]).sum())
        share = 1.0 if part is None else (part[1] - part[0]) / self.store.layout[key][2][0].shape[1]
        secs = share * cpu_expert_s(self.m, self.prof, key[0], T) + self.prof.expert_call_us * 1e-6
        start = max(self.clock.now + self.handoff / 2, self.cpu_pool.free_at)
        self.cpu_pool.free_at = start + secs
        return SimJob(key, T, secs, start + secs, part)


def make_cost(m: SimModel, prof, store) -> CostModel:
    """The cost model the runtime would measure at start-up, if this profile is right."""
    cost = CostModel(link_bps=prof.h2d_bw, link_latency_s=prof.h2d_latency_us * 1e-6,
                     cpu_handoff_s=prof.cpu_handoff_us * 1e-6)           # what runtime/cost.py measures
    call = prof.expert_call_us * 1e-6
    for layer in m.moe_layers:
        sig = CostModel.signature(mat for mat, _ in store.layout[(layer, 0)])
        cost.cpu_s[sig] = tuple(cpu_expert_s(m, prof, layer, T) + call for T in (1, FUSED_MAX_TOKENS))
        cost.device_s[sig] = tuple(gpu_expert_s(m, prof, layer, T) for T in (1, FUSED_MAX_TOKENS))
    return cost


@dataclass
class Phase:
    tokens: int = 0
    seconds: float = 0.0
    hits: int = 0
    misses: int = 0
    wait_copy_s: float = 0.0
    wait_cpu_s: float = 0.0
    h2d_bytes: float = 0.0
    cpu_bytes: float = 0.0           # expert weights the CPU read
    gpu_bytes: float = 0.0           # weights the device read
    cpu_experts: int = 0
    split_experts: int = 0           # misses split by rows between the CPU and the device
    miss_bytes: float = 0.0          # experts needed that were not on the device (the bound's host side)
    prefetch_useful: int = 0
    prefetch_wasted: int = 0

    def add(self, other: "Phase") -> None:
        for k in self.__dataclass_fields__:
            setattr(self, k, getattr(self, k) + getattr(other, k))


class OursSim:
    """One configuration of our runtime, run over every sequence of a routing source."""

    def __init__(self, m: SimModel, prof, routing, policy="lru", predictor="none", cpu_experts="auto",
                 n_slots: int | None = None, lookahead: int = 1, n_batch: int = 64):
        if cpu_experts not in CPU_EXPERTS:
            raise ModelError(f"--cpu-experts {cpu_experts!r}: one of {', '.join(CPU_EXPERTS)}")
        if predictor not in ("none", "gate", "oracle"):
            raise ModelError(f"--predictor {predictor!r}: the simulator models none, gate and oracle")
        self.m, self.prof, self.routing = m, prof, routing
        self.policy_name, self.predictor, self.cpu_experts = policy, predictor, cpu_experts
        self.store = SimStore(m.layout)
        self.n_slots = len(self.store.keys) if n_slots is None else int(n_slots)
        self.all_resident = self.n_slots >= len(self.store.keys)
        self.lookahead, self.n_batch = int(lookahead), int(n_batch)
        self.use_counts = routing.use_counts() if policy == "static" else None
        self.mean_expert_bytes = float(np.mean([m.expert_bytes[i] for i in m.moe_layers]))

    def run(self, progress=None, warm: bool = False) -> dict:
        """Every sequence from a cold cache; or `warm`: one cache for all (a server), the first sequence
        only warming it (not counted)."""
        if warm and len(self.routing.sequences) < 2:
            raise ModelError("a warm run needs at least two sequences (the first only warms the cache)")
        pre, dec = Phase(), Phase()
        for s in range(len(self.routing.sequences)):
            if not warm or s == 0:
                self._setup(s)
            if self.src.prefetcher is not None:
                self.src.prefetcher.predictor.start_sequence(s)
            p, d = self._sequence(s)
            if not warm or s > 0:
                pre.add(p)
                dec.add(d)
            if progress is not None:
                progress.update(1)
        return {"prefill": pre, "decode": dec}

    def _setup(self, s: int) -> None:
        """A fresh runtime: empty cache (the static hot set, or everything when all fit, preloaded)."""
        m, prof = self.m, self.prof
        clock, stats = Clock(), Stats()
        hybrid = self.cpu_experts != "off" and not self.all_resident
        cache = ExpertCache(
            self.n_slots, self.store.slot_bytes, "meta", make_policy(self.policy_name, m.k, self.use_counts),
            m.moe_layers)
        transfer = SimTransfer(self.store, cache, stats, clock, prof)
        prefetcher = None
        if self.predictor != "none" and not self.all_resident:
            prefetcher = SimPrefetcher(SimPredictor(self.routing, self.predictor, s, self.lookahead), transfer,
                                       cache, stats, m.n_layers, m.k, clock, prof)
        self.src = src = SimSource(m, prof, self.store, cache, transfer, stats, prefetcher,
                                   SimPool() if hybrid else None, self.cpu_experts, make_cost(m, prof, self.store), clock)
        self._preload(src)
        src.reserve_staging()

    def _sequence(self, s: int):
        src, clock = self.src, self.src.clock
        seq = self.routing.sequences[s]
        rows = np.arange(len(seq.ids))
        phases = []
        for lo, hi, step in ((0, seq.n_prompt, self.n_batch), (seq.n_prompt, len(rows), 1)):
            ph, snap0 = Phase(), self._snap(src)
            t0 = clock.now
            for i in range(lo, hi, step):
                ph.gpu_bytes += self._step(seq, rows[i:min(i + step, hi)])
            ph.tokens, ph.seconds = hi - lo, clock.now - t0
            self._diff(ph, snap0, self._snap(src))
            ph.miss_bytes = ph.misses * self.mean_expert_bytes
            phases.append(ph)
        return phases[0], phases[1]

    def _preload(self, src) -> None:
        """All resident: every expert in its slot. static: the hot set, copied before the run (start-up)."""
        cache = src.expert_cache
        keys = self.store.keys if self.all_resident else cache.policy.hot_set(self.store.keys, self.n_slots)
        if not keys:
            return
        with cache.cv:
            for key in keys:
                slot = cache.allocate(key, src.counters.on_evict)
                cache.chunk_landed(slot, len(self.store.chunks(key)))
                cache.mark_present(slot)
                cache.keep(slot)

    def _snap(self, src) -> dict:
        src.settle_uses()
        st = src.counters.snapshot()
        return {**{k: st[k] for k in ("hits", "misses", "bytes_h2d", "cpu_experts", "split_experts", "prefetch_useful",
                                      "prefetch_wasted")},
                "wait_copy": src.wait_copy, "wait_cpu": src.wait_cpu, "cpu_bytes": src.cpu_bytes}

    @staticmethod
    def _diff(ph: Phase, a: dict, b: dict) -> None:
        ph.hits, ph.misses = b["hits"] - a["hits"], b["misses"] - a["misses"]
        ph.h2d_bytes, ph.cpu_experts = b["bytes_h2d"] - a["bytes_h2d"], b["cpu_experts"] - a["cpu_experts"]
        ph.split_experts = b["split_experts"] - a["split_experts"]
        ph.prefetch_useful = b["prefetch_useful"] - a["prefetch_useful"]
        ph.prefetch_wasted = b["prefetch_wasted"] - a["prefetch_wasted"]
        ph.wait_copy_s, ph.wait_cpu_s = b["wait_copy"] - a["wait_copy"], b["wait_cpu"] - a["wait_cpu"]
        ph.cpu_bytes = b["cpu_bytes"] - a["cpu_bytes"]

    # ---- one forward step (a prefill chunk or a decoded token) ----------------------------------------
    def _step(self, seq, rows) -> float:
        m, prof, src = self.m, self.prof, self.src
        clock, T = src.clock, len(rows)
        src.begin_step(rows)
        overhead = (prof.ours_layer_us if T == 1 else prof.ours_prefill_layer_us) * 1e-6
        ctx = rows[0] + T / 2
        gpu_bytes = 0.0
        for layer in range(m.n_layers):
            clock.advance(clock.now + layer_gpu_s(m, prof, layer, T, ctx, KV_BYTES) + overhead)
            gpu_bytes += m.layer_bytes[layer]
            if layer in src.stacks:
                i = m.moe_layers.index(layer)
                gpu_bytes += self._moe(layer, seq.ids[rows, i], rows)
        # the head: logits of every position of the step (as Engine computes them)
        clock.advance(clock.now + roofline(m.out_bytes, 2 * m.out_params * T, prof.gpu_bw, prof.gpu_flops))
        return gpu_bytes + m.out_bytes

    def _moe(self, layer: int, ids: np.ndarray, rows) -> float:
        """One MoE layer through the real source logic; returns device weight bytes read."""
        src, m, prof, clock = self.src, self.m, self.prof, self.src.clock
        T = len(rows)
        if T <= FUSED_MAX_TOKENS:
            placed = src.acquire(layer, rows, ids)
            if placed is not None:
                _, table, jobs = placed
                index = table[ids]
                dev = index[index >= 0]
                n_dev = len(np.unique(dev))
                t_dev = clock.now + len(jobs) * prof.cpu_job_us * 1e-6 + roofline(n_dev * m.expert_bytes[layer], 2 * m.expert_params[layer] * dev.size,
                                             prof.gpu_bw, prof.gpu_flops)
                self._collect(layer, jobs)
                clock.advance(max(clock.now, t_dev))
                src.release(layer)
                return n_dev * m.expert_bytes[layer]
        nbytes = 0.0
        call = prof.expert_call_us * 1e-6
        for e in src.order(layer, rows, ids):        # per-expert path: resident first (promoe), each waited for
            src.wait_until_copied((layer, e))
            nbytes += m.expert_bytes[layer]
            clock.advance(clock.now + gpu_expert_s(m, prof, layer, int((ids == e).sum())) + call)
            src.done(layer, e)
        jobs = src.cpu_jobs(layer)                   # the misses order() gave the CPU, collected last
        clock.advance(clock.now + len(jobs) * prof.cpu_job_us * 1e-6)
        self._collect(layer, jobs)
        src.end_layer(layer)
        return nbytes

    def _collect(self, layer: int, jobs: dict) -> None:
        """The layer's CPU jobs, as cpu_result collects them: wait, count, admit at low priority."""
        src, clock = self.src, self.src.clock
        for job in jobs.values():
            done = job.finish + src.handoff / 2
            if done > clock.now:
                src.wait_cpu += done - clock.now
                clock.advance(done)
            src.counters.add(layer, "cpu_s", job.seconds)
            if job.part is None:
                src.counters.add(layer, "cpu_experts")
                src.counters.add(layer, "copies_avoided")
            share = 1.0 if job.part is None else (job.part[1] - job.part[0]) / src.store.layout[job.key][2][0].shape[1]
            src.cpu_bytes += share * self.m.expert_bytes[layer]
            src.transfer.request(job.key, ADMIT)
