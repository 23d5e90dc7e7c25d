"""CachedExpertSource: the runtime behind the expert seam.

Per MoE layer (compute thread), with the routing ids already on the host:
  _admit()   counts hits/misses, drops this layer's pending guesses, hands the router input to the
             prefetcher. promoe: early preemption (every miss queued as a precise copy at once).
             lru/static (the reactive baselines): each miss requested only when compute reaches it.
  acquire()  fused path (few tokens): waits (bounded) until every chosen expert is in a slot, pins
             them, returns the arena as an ExpertStack and each (token, slot)'s slot index.
  order()    per-expert path (prefill): promoe yields resident experts first, then the most copied
             (reordered execution); the baselines yield plain order. matrices() waits for one expert.
  release() / done()  unpin (on CUDA after recording an event the next copy into the slot waits for).
Waits on copies are stall time.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

from ..backends import ExpertStack, StackedMatrix, matrix_at
from ..format.expert_index import MATRICES
from ..model.experts import ExpertSource
from .cache import READY
from .transfer import HIGH

log = logging.getLogger("promoe.runtime")


class CachedExpertSource(ExpertSource):
    def __init__(self, model, device, store, cache, transfer, stats, prefetcher=None, wait_timeout: float = 60.0):
        self.model, self.device = model, torch.device(device)
        self.store, self.cache, self.transfer, self.counters = store, cache, transfer, stats
        self.prefetcher, self.wait_timeout = prefetcher, wait_timeout
        self._degraded = False
        self._pinned: list = []
        self.stacks = {layer: self._arena_stack(layer) for layer in model.config.moe_layers}
        self.nbytes = cache.capacity_bytes

    def _arena_stack(self, layer: int) -> ExpertStack:
        """Layer `layer`'s experts as the fused call sees them: slot i at arena + i * slot_bytes."""
        arena = self.cache.arena
        mats = self.store.layout[(layer, 0)]
        sm = [StackedMatrix(m.qtype, m.shape[0], m.shape[1], arena.data_ptr() + off, arena.shape[1], arena.shape[0])
              for m, off in mats]
        return ExpertStack(*sm, owners=(arena, arena, arena))

    def begin_step(self, positions):
        with self.cache.cv:
            self.cache.begin_step()
        if self.prefetcher is not None:
            self.prefetcher.begin_step(positions)

    def _admit(self, layer: int, x, ids: np.ndarray) -> list:
        needed = [(layer, int(e)) for e in np.unique(ids)]
        with self.cache.cv:
            self.cache.needed = set(needed)
            for key in needed:
                slot = self.cache.where.get(key)
                self.counters.add(layer, "hits" if slot is not None and slot.state == READY else "misses")
        self.transfer.drop_speculative(layer)
        if not self.cache.policy.reactive:           # early preemption: all of the layer's misses queued now
            for key in needed:
                self.transfer.request(key, HIGH)
        if self.prefetcher is not None:
            self.prefetcher.layer(layer, x, ids)
        return needed

    # ---- fused path ----------------------------------------------------------------------------
    def acquire(self, layer, x, ids):
        """None (take the per-expert path) when the step needs more experts than one token's top-k:
        pinned together they might not fit the layer's share of a small cache."""
        if len(np.unique(ids)) > self.model.config.n_experts_used and len(self.cache.slots) < len(self.store.keys):
            return None
        needed = self._admit(layer, x, ids)
        with self.cache.cv:
            self.cache.hold_needed = True             # co-resident for one launch: no needed expert evicts another
        slot_of = {}
        for key in needed:                            # every miss queued before the first wait
            self.transfer.request(key, HIGH)
        try:
            for key in needed:
                slot = self._wait(key)
                self._pinned.append(key)
                slot_of[key[1]] = slot.index
        except BaseException:
            self.release(layer)
            raise
        index = np.vectorize(slot_of.__getitem__, otypes=[np.int64])(ids)
        return self.stacks[layer], index

    def release(self, layer):
        for key in self._pinned:
            self._unpin(key)
        self._pinned = []
        self.end_layer(layer)

    # ---- per-expert path -----------------------------------------------------------------------
    def order(self, layer, x, ids):
        needed = self._admit(layer, x, ids)
        if self.cache.policy.reactive:                # baseline: plain order, each miss loaded when reached
            yield from (e for _, e in needed)
            return
        remaining = set(needed)
        cv = self.cache.cv
        while remaining:                              # reordered: resident first, then most chunks landed
            with cv:
                def readiness(key):
                    slot = self.cache.where.get(key)
                    if slot is None:
                        return (-1, -key[1])
                    return (4 if slot.state == READY else slot.ready_chunks, -key[1])
                key = max(remaining, key=readiness)
            remaining.discard(key)
            yield key[1]

    def matrices(self, layer, expert):
        key = (layer, expert)
        slot = self._wait(key)
        arena = self.cache.arena
        base = slot.index * arena.shape[1]
        return tuple(matrix_at(arena.view(-1), base + off, name, m.qtype, m.shape)
                     for (m, off), name in zip(self.store.layout[key], MATRICES))

    def done(self, layer, expert):
        self._unpin((layer, expert))

    def end_layer(self, layer):
        with self.cache.cv:
            self.cache.needed = set()
            self.cache.hold_needed = False

    # ---- waiting and pinning -------------------------------------------------------------------
    def _wait(self, key):
        """Block until every chunk of `key` is on the device; returns its slot, pinned."""
        cv = self.cache.cv
        t0 = time.perf_counter()
        self.transfer.request(key, HIGH)              # a miss (no-op when resident or already queued)
        n_chunks = len(self.store.chunks(key))
        deadline = t0 + self.wait_timeout
        with cv:
            while True:
                slot = self.cache.where.get(key)
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
            slot = self.cache.where[key]
        with cv:
            slot.pins += 1
            if slot.speculative:
                slot.speculative = False
                self.counters.add(key[0], "prefetch_useful")
            self.cache.touch(slot)
        self.counters.add(key[0], "stall_s", time.perf_counter() - t0)
        return slot

    def _unpin(self, key) -> None:
        with self.cache.cv:
            slot = self.cache.where[key]
            if self.cache.device.type == "cuda":
                ev = torch.cuda.Event()
                ev.record(torch.cuda.current_stream(self.cache.device))
                slot.free_event = ev
            slot.pins -= 1
            self.cache.needed.discard(key)
            self.cache.cv.notify_all()

    def stats(self) -> dict:
        with self.cache.cv:
            snap = self.counters.snapshot(self.cache.slots)
        snap["link"] = self.transfer.link.describe()
        snap["cache_slots"] = len(self.cache.slots)
        snap["slot_bytes"] = self.store.slot_bytes
        snap["policy"] = self.cache.policy.name
        snap["predictor"] = getattr(getattr(self.prefetcher, "predictor", None), "name", "none")
        return snap

    def close(self):
        if self.prefetcher is not None:
            self.prefetcher.close()
        self.transfer.close()
        self.store.close()
