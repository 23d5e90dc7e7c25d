"""CachedExpertSource: the runtime behind the expert seam.

Per MoE layer (compute thread), with the routing ids already on the host:
  _admit()   marks the layer's chosen experts needed, drops this layer's pending guesses, hands the
             router input to the prefetcher. promoe: early preemption (every miss queued as a precise
             copy at once). lru/static (the reactive baselines): each miss requested only when compute
             reaches it. What the policy counts (hits, misses, decayed uses) goes to a per-step log
             settled once per step (settle_uses), not per layer on the compute thread; a prefill
             step's uses, weighted by token, count at once (its later evictions need them).
  acquire()  fused path (few tokens): with CPU experts on, the cost model first sends misses that the
             CPU finishes sooner than a copy would land to the CPU pool (their hidden rows go to the
             host, their outputs come back); waits (bounded) until every other chosen expert is in a
             slot, pins them, returns the arena as an ExpertStack, the layer's slot table (expert ->
             slot, -1: not on the device) and the CPU jobs. cpu_result() collects a job (None if the CPU failed:
             the expert seam then computes it on the device through matrices()).
  order()    per-expert path (prefill): misses with few tokens that the CPU finishes sooner than the
             link would land them go to the CPU pool (cpu_jobs() hands them to the seam); of the
             rest promoe yields resident experts first, then the most copied (reordered
             execution); the baselines yield plain order. matrices() waits for one expert.
  release() / done()  unpin (on CUDA after recording an event the next copy into the slot waits for).
Waits on copies are stall time. The device finds the layer's experts through the table acquire
returned, which the step copies to the device with the routing's other inputs (model/experts.py).
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

from ..backends import FUSED_MAX_TOKENS, ExpertStack, StackedMatrix, matrix_at
from ..backends.base import expert_part, split_unit
from ..errors import ModelError
from ..format.expert_index import MATRICES
from .cache import READY
from .placement import Miss, Placement, place
from .transfer import ADMIT, HIGH

log = logging.getLogger("promoe.runtime")


STAGING_SLOTS = 2          # a split expert's device part: consecutive layers use them in turn


def staging_slots(store, n_slots: int, n_used: int, cpu_experts: str) -> int:
    """Slots of the cache's budget to keep for split experts' device parts: STAGING_SLOTS when misses
    may split (cpu_experts auto, some expert to miss, the experts' types splittable) and the rest
    still holds a layer's top-k, else 0."""
    if cpu_experts != "auto" or n_slots >= len(store.keys) or n_slots - STAGING_SLOTS < n_used:
        return 0
    mats = [m for m, _ in store.layout[store.keys[0]]]
    unit = split_unit(mats)
    return STAGING_SLOTS if unit and mats[2].shape[1] // unit >= 2 else 0


class CachedExpertSource:
    """An expert cache behind the seam (model.experts.ExpertSource)."""
    resident = False
    fuse_any = False

    def __init__(self, model, device, store, cache, transfer, stats, prefetcher=None, wait_timeout: float = 60.0,
                 cpu_pool=None, cpu_experts: str = "off", cost=None):
        self.model, self.device = model, torch.device(device)
        self.store, self.expert_cache, self.transfer, self.counters = store, cache, transfer, stats
        self.prefetcher, self.wait_timeout = prefetcher, wait_timeout
        self.cpu_pool, self.cpu_experts, self.cost = cpu_pool, cpu_experts, cost
        self.link_ratio = None                     # --link ratio=R: the emulated link, calibrated by attach
        self.calibration: dict = {}                # what that calibration measured
        self._degraded = False
        self._pinned: list = []
        self._step_t0 = None
        self._step_tokens = 0
        self._uses: list = []                      # (layer, needed keys, misses, uses recorded?) of the step
        self._staged: list = []                    # the layer's split experts' keys
        self._jobs: dict = {}                      # layer -> the CPU jobs of its per-expert step
        self._next_staging = 0
        self.stacks = {layer: self._arena_stack(layer) for layer in model.config.moe_layers}
        self.nbytes = cache.capacity_bytes
        self.split_parts = {}                      # layer -> row groups an expert splits into (reserve_staging)

    def reserve_staging(self) -> int:
        """Once the cost model is known: keep STAGING_SLOTS of the cache for split experts when a split
        can pay. The device computes a split expert's whole slot (zeros where the CPU's rows are), so
        a split finishes sooner than the CPU alone only if the device computes an expert in well under
        the CPU's time (any GPU; not the CPU standing in for one). Returns the slots kept."""
        cache, cost = self.expert_cache, self.cost
        n = staging_slots(self.store, len(cache.slots), self.model.config.n_experts_used, self.cpu_experts)
        if not n or cost is None or not any(sig in cost.device_s and 2 * cost.device_s[sig][0] < one
                                            for sig, (one, _) in cost.cpu_s.items()):
            return 0
        with cache.cv:
            if not cache.take_staging(n, keep_free=self.model.config.n_experts_used):
                return 0
        for layer in self.model.config.moe_layers:
            mats = [m for m, _ in self.store.layout[(layer, 0)]]
            unit = split_unit(mats)
            self.split_parts[layer] = mats[2].shape[1] // unit if unit else 0
        return n

    def _arena_stack(self, layer: int) -> ExpertStack:
        """Layer `layer`'s experts as the fused call sees them: slot i at arena + i * slot_bytes."""
        arena = self.expert_cache.arena
        mats = self.store.layout[(layer, 0)]
        sm = [StackedMatrix(m.qtype, m.shape[0], m.shape[1], arena.data_ptr() + off, arena.shape[1], arena.shape[0])
              for m, off in mats]
        return ExpertStack(*sm, owners=(arena, arena, arena))

    def table(self, layer: int):
        raise ModelError("a cached source has no fixed slot table: each step's comes from acquire")

    def begin_step(self, positions):
        now = time.perf_counter()
        if self._step_t0 is not None and self._step_tokens == 1:      # the last step was a decode step
            self.counters.decode_steps += 1
            self.counters.decode_s += now - self._step_t0
        self._step_t0, self._step_tokens = now, len(positions)
        self.settle_uses()
        with self.expert_cache.cv:
            self.expert_cache.begin_step(len(positions))
        if self.prefetcher is not None:
            self.prefetcher.begin_step(positions)

    def reset_sequence(self) -> None:
        """An independent sequence starts: the predictor forgets the last one's state."""
        if self.prefetcher is not None:
            self.prefetcher.reset()
        self._step_t0 = None

    def _admit(self, layer: int, x, ids: np.ndarray, on_cpu=lambda needed, ids: Placement(),
               static: bool = False) -> tuple[list, Placement]:
        """(compute thread, once per layer) The layer's chosen experts, and where on_cpu places the
        misses that do not go over the link whole (the CPU pool, or split); the misses the policy
        copies at once are queued. static: x and ids are the step's own host buffers (the prefetcher
        reads them on its thread)."""
        needed = [(layer, e) for e in sorted(set(ids.ravel().tolist()))]
        cache = self.expert_cache
        with cache.cv:
            cache.mark_needed(needed)
            misses = sum(1 for key in needed if (slot := cache.where.get(key)) is None or slot.state != READY)
            self.transfer.drop_speculative(layer)
            prefill = len(ids) > 1
            if prefill:
                cache.record_step_uses(layer, ids)
        self._uses.append((layer, needed, misses, prefill))
        cpu = on_cpu(needed, ids)
        if not cache.policy.reactive:                # early preemption: all of the layer's copies queued now
            for key in needed:
                if key not in cpu.cpu and key not in cpu.split:
                    self.transfer.request(key, HIGH)
        if self.prefetcher is not None:
            self.prefetcher.layer(layer, x, ids, static)
        return needed, cpu

    def settle_uses(self) -> None:
        """The policy's counts for the steps logged so far: hits and misses per layer, and in decode each
        needed expert's decayed use (once per step, under one lock; also before stats are read)."""
        uses, self._uses = self._uses, []
        if not uses:
            return
        with self.expert_cache.cv:
            for layer, needed, misses, recorded in uses:
                self.counters.add(layer, "hits", len(needed) - misses)
                self.counters.add(layer, "misses", misses)
                if not recorded:
                    for key in needed:
                        self.expert_cache.record_use(key)

    # ---- fused path ----------------------------------------------------------------------------
    def acquire(self, layer, x, ids):
        """None (take the per-expert path) when the step needs more experts than one token's top-k:
        pinned together they might not fit the layer's share of a small cache. Resident experts are
        pinned at once, under one lock; misses are all queued before the first wait."""
        if len(set(ids.ravel().tolist())) > self.model.config.n_experts_used and len(self.expert_cache.slots) < len(self.store.keys):
            return None
        needed, placed = self._admit(layer, x, ids, self._place, static=True)
        cpu, split = placed.cpu, placed.split
        device = [key for key in needed if key not in cpu and key not in split]
        cache = self.expert_cache
        table = np.full(self.model.config.n_experts, -1, dtype=np.int32)     # expert -> slot this layer
        missing = []
        with cache.cv:
            cache.hold_layer()
            for key in device:
                slot = cache.where.get(key)
                if slot is not None and slot.state == READY:
                    self._pin(slot)
                    self._pinned.append(key)
                    table[key[1]] = slot.index
                else:
                    missing.append(key)
        unit = {key: self.store.layout[key][2][0].shape[1] // self.split_parts[key[0]] for key in split}
        jobs = {key[1]: self.cpu_job(key, x, ids) for key in cpu}
        jobs.update({key[1]: self.cpu_job(key, x, ids, part=(0, j * unit[key])) for key, j in split.items()})
        if jobs:
            self.cpu_pool.submit(list(jobs.values()))  # one hand-off to the worker for the layer
        for key in missing:                           # every copy queued before the first wait
            self.transfer.request(key, HIGH)
        parts = {}
        for key, j in split.items():                  # a split's share last on the link, as placement counts it
            staging = cache.staging[self._next_staging]
            self._next_staging = (self._next_staging + 1) % len(cache.staging)
            parts[key] = self.transfer.request_part(key, j * unit[key], staging), j * unit[key]
        try:
            for key, (task, _) in parts.items():
                self.wait_until_staged(task)
                with cache.cv:
                    cache.stage(key, task.slot)
                self._staged.append(key)
                table[key[1]] = task.slot.index
                self.counters.add(layer, "split_experts")
            for key in missing:
                slot = self.wait_until_copied(key)
                self._pinned.append(key)
                table[key[1]] = slot.index
        except BaseException:
            self.release(layer)
            raise
        return self.stacks[layer], table, jobs

    def release(self, layer):
        """The layer's pinned experts may go once the work queued so far has read them (CUDA: an
        event the next copy into their slots waits for)."""
        cache = self.expert_cache
        event = None
        if self._pinned and cache.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(cache.device))
        with cache.cv:
            freed = False
            for key in self._pinned:
                freed |= cache.unpin(cache.where[key], event)
            self._pinned = []
            for key in self._staged:
                cache.staged[key].free_event = event
                cache.unstage(key)
            self._staged = []
            cache.release_layer()
            if freed and self.transfer.starved:
                cache.cv.notify_all()                 # a copy was waiting for a slot

    # ---- CPU experts ---------------------------------------------------------------------------
    def _place(self, needed: list, ids: np.ndarray, prefill: bool = False) -> Placement:
        """Where the misses run (placement.place), from the cache's and the link's state. An expert
        splits only if nothing of it is on the device or on its way (cpu_experts auto).

        prefill (the per-expert path): only misses with at most FUSED_MAX_TOKENS tokens in the step
        (the range the cost model measured) may go to the CPU, fewest tokens first, whole; the
        others are copied and count as queued ahead of them on the link. An expert with many tokens
        is cheaper per token on the device; one with few costs the CPU about its bytes, in parallel
        with the link."""
        pool = self.cpu_pool
        if pool is None or not pool.alive or self.cpu_experts == "off":
            return Placement()
        everything = self.cpu_experts == "all" or not self.transfer.alive    # no copy thread: the CPU it is
        misses = []
        with self.expert_cache.cv:
            missing = [(key, slot) for key in needed
                       if (slot := self.expert_cache.where.get(key)) is None or slot.state != READY]
            if everything:
                return Placement({key for key, _ in missing})
            splits = self.cpu_experts == "auto" and not prefill
            queued = self.transfer.ahead_of_new()             # once per layer: the queue does not move here
            tokens = {key: int((ids == key[1]).sum()) for key, _ in missing}
            if prefill:
                many = [(key, slot) for key, slot in missing if tokens[key] > FUSED_MAX_TOKENS]
                queued += sum(self._left(key, slot) for key, slot in many)
                missing = sorted(((key, slot) for key, slot in missing if tokens[key] <= FUSED_MAX_TOKENS),
                                 key=lambda ks: (tokens[ks[0]], ks[0]))
            for key, slot in missing:
                T = tokens[key]
                sig = self.cost.signature(m for m, _ in self.store.layout[key])
                parts = self.split_parts.get(key[0], 0) if (splits and slot is None and key not in self.transfer.tasks
                                                            and not self.stacks[key[0]].fn.bias) else 0
                misses.append(Miss(key, self.cost.cpu_seconds(sig, T), self._left(key, slot),
                                   self.cost.device_seconds(sig, T), queued - self.transfer.queued_bytes_of(key, HIGH),
                                   parts))
        return place(misses, self.cost.copy_seconds, self.cost.cpu_handoff_s)

    def _left(self, key, slot) -> int:
        """(cv held) Bytes of `key` still to cross the link (a copy under way has landed some)."""
        return sum(n for _, n in self.store.chunks(key)[slot.ready_chunks if slot else 0:])

    def cpu_job(self, key, x, ids, part=None):
        """A CPU pool job for `key` over its tokens' rows of x (the router input, on the host); the
        caller hands a layer's jobs to the pool together. part: (lo, hi), only those intermediate rows
        (a split expert: the device computes the rest)."""
        from .cpu_pool import CpuJob
        rows, cols = np.nonzero(ids == key[1])
        # one token (decode): its row as it is (the seam's buffer is not rewritten before the job is
        # collected); more: the tokens' rows gathered
        xr = x[:1] if ids.shape[0] == 1 else x[torch.from_numpy(rows)]
        mats = self.store.matrices(key)
        if part is not None:
            mats = expert_part(mats, *part)
        job = CpuJob(key, xr, mats, self.stacks[key[0]].fn.of(key[1], host=True))
        job.rows, job.cols, job.part = rows, cols, part
        return job

    def cpu_result(self, layer: int, expert: int, job) -> torch.Tensor | None:
        """The job's output rows (on the host), or None if the CPU failed or hung (said once, with a
        warning: the pool is off from then on); the caller then computes the expert on the device."""
        key = (layer, expert)
        t0 = time.perf_counter()
        T = len(job.rows)               # the cost model measured up to FUSED_MAX_TOKENS: scaled beyond
        bound = max(1.0, 50 * self.cost.cpu_seconds(self.cost.signature(m for m, _ in self.store.layout[key]), T)
                    * max(1.0, T / FUSED_MAX_TOKENS)) if self.cost else self.wait_timeout
        out = job.wait(min(bound, self.wait_timeout))
        waited = time.perf_counter() - t0
        self.counters.add(layer, "wait_cpu_s", waited)
        if self._step_tokens == 1:
            self.counters.decode_wait_cpu_s += waited
        if out is not None:
            self.counters.add(layer, "cpu_s", job.seconds)
            if job.part is None:
                self.counters.add(layer, "cpu_experts")
                self.counters.add(layer, "copies_avoided")
            self.transfer.request(key, ADMIT)        # admission: a valuable expert may take a slot in idle time
            return out
        if job.error is None:
            self.cpu_pool.mark_hung(job, waited)
        return None

    # ---- per-expert path -----------------------------------------------------------------------
    def order(self, layer, x, ids):
        """The device's experts of a many-token step, one at a time; misses with few tokens that the
        CPU finishes sooner (_place, prefill) go to the pool first, collected through cpu_jobs."""
        needed, placed = self._admit(layer, x, ids, lambda needed, ids: self._place(needed, ids, prefill=True))
        jobs = {}
        if placed.cpu:
            xh = x.cpu() if isinstance(x, torch.Tensor) else x        # the rows the pool reads, gathered once
            jobs = {key[1]: self.cpu_job(key, xh, ids) for key in sorted(placed.cpu)}
            self.cpu_pool.submit(list(jobs.values()))
        self._jobs[layer] = jobs
        device = [key for key in needed if key not in placed.cpu]
        if self.expert_cache.policy.reactive:                # baseline: plain order, each miss loaded when reached
            yield from (e for _, e in device)
            return
        remaining = set(device)
        cv = self.expert_cache.cv
        while remaining:                              # reordered: resident first, then most chunks landed
            with cv:
                def readiness(key):
                    slot = self.expert_cache.where.get(key)
                    if slot is None:
                        return (-1, -key[1])
                    return (1 << 30 if slot.state == READY else slot.ready_chunks, -key[1])
                key = max(remaining, key=readiness)
            remaining.discard(key)
            yield key[1]

    def cpu_jobs(self, layer: int) -> dict:
        """The CPU jobs order() handed to the pool for this layer's step (expert -> job), once."""
        return self._jobs.pop(layer, {})

    def matrices(self, layer, expert):
        key = (layer, expert)
        slot = self.wait_until_copied(key)
        arena = self.expert_cache.arena
        base = slot.index * arena.shape[1]
        return tuple(matrix_at(arena.view(-1), base + off, name, m.qtype, m.shape)
                     for (m, off), name in zip(self.store.layout[key], MATRICES))

    def done(self, layer, expert):
        self._unpin((layer, expert))

    def end_layer(self, layer):
        with self.expert_cache.cv:
            self.expert_cache.release_layer()

    # ---- waiting and pinning -------------------------------------------------------------------
    def wait_until_staged(self, task) -> None:
        """Block until a split expert's device part has landed in its staging slot."""
        cv = self.expert_cache.cv
        t0 = time.perf_counter()
        deadline = t0 + self.wait_timeout
        with cv:
            while not task.landed and self.transfer.alive:
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"the device part of expert {task.key[1]} of layer {task.key[0]} was not "
                                       f"copied within {self.wait_timeout:.0f} s (transfer engine stalled)")
                cv.wait(0.05)
        if not task.landed:
            self.transfer.load_part_now(task)
        waited = time.perf_counter() - t0
        self.counters.add(task.key[0], "stall_s", waited)
        if self._step_tokens == 1:
            self.counters.decode_wait_copy_s += waited

    def wait_until_copied(self, key):
        """Block until every chunk of `key` is on the device; returns its slot, pinned."""
        cv = self.expert_cache.cv
        t0 = time.perf_counter()
        self.transfer.request(key, HIGH)              # a miss (no-op when resident or already queued)
        n_chunks = len(self.store.chunks(key))
        deadline = t0 + self.wait_timeout
        with cv:
            while True:
                slot = self.expert_cache.where.get(key)
                if slot is not None and slot.ready_chunks >= n_chunks:
                    break
                if slot is None and key not in self.transfer.tasks:
                    self.transfer.request(key, HIGH)  # copied, then evicted before this thread pinned it
                if not self.transfer.alive:
                    break
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"expert {key[1]} of layer {key[0]} was not copied within "
                                       f"{self.wait_timeout:.0f} s (transfer engine stalled)")
                cv.wait(0.05)
        if slot is None or slot.ready_chunks < n_chunks:
            if not self._degraded:
                self._degraded = True
                log.warning("copy thread is gone: experts are now loaded reactively on the compute thread")
            self.transfer.load_now(key)
            slot = self.expert_cache.where[key]
        with cv:
            self._pin(slot)
        self._waited(key, time.perf_counter() - t0)
        return slot

    def _waited(self, key, seconds: float) -> None:
        """The compute thread waited `seconds` for `key`'s copy (on the wall clock, or the simulator's)."""
        self.counters.add(key[0], "stall_s", seconds)
        if self._step_tokens == 1:
            self.counters.decode_wait_copy_s += seconds

    def _pin(self, slot) -> None:
        """(cv held) The compute thread reads `slot` from now on: a use (and a useful prefetch)."""
        if slot.speculative:
            self.counters.add(slot.key[0], "prefetch_useful")
        self.expert_cache.pin(slot)

    def _unpin(self, key) -> None:
        with self.expert_cache.cv:
            ev = None
            if self.expert_cache.device.type == "cuda":
                ev = torch.cuda.Event()
                ev.record(torch.cuda.current_stream(self.expert_cache.device))
            self.expert_cache.unpin(self.expert_cache.where[key], ev)
            self.expert_cache.cv.notify_all()

    def stats(self) -> dict:
        self.settle_uses()
        with self.expert_cache.cv:
            snap = self.counters.snapshot(self.expert_cache.slots)
        snap["link"] = self.transfer.link.describe()
        snap["cache_slots"] = len(self.expert_cache.slots)
        snap["slot_bytes"] = self.store.slot_bytes
        snap["policy"] = self.expert_cache.policy.name
        snap["predictor"] = "none" if self.prefetcher is None else self.prefetcher.predictor.name
        snap["link_bandwidth"] = self.calibration.get("bandwidth", 0.0)
        snap["cpu_experts_mode"] = self.cpu_experts if self.cpu_pool is not None else "off"
        if self.cost is not None:
            snap["cost_model"] = self.cost.describe()
        return snap

    def close(self):
        if self.prefetcher is not None:
            self.prefetcher.close()
        if self.cpu_pool is not None:
            self.cpu_pool.close()
        self.transfer.close()
        self.store.close()
