"""CachedExpertSource: the runtime behind the expert seam.

Per MoE layer (compute thread):
  order()  counts hits/misses, drops this layer's pending guesses, hands the router input to the
           prefetcher, then yields the experts to compute. promoe: early preemption (every miss of
           the layer queued as a precise copy at once) and reordered execution (resident first, then
           partly copied, most chunks first). lru/static (the reactive baselines): plain order, each
           miss requested only when compute reaches it.
  matrix() waits (bounded) only until the chunk it needs has landed; that wait is stall time.
  done()   unpins the slot (on CUDA after recording an event the next copy into it waits for).
"""
from __future__ import annotations

import logging
import time

import torch

from ..model.experts import ExpertSource
from .cache import READY
from .transfer import HIGH

log = logging.getLogger("promoe.runtime")


class CachedExpertSource(ExpertSource):
    def __init__(self, model, device, store, cache, transfer, stats, prefetcher=None, wait_timeout: float = 60.0):
        super().__init__(model, device)
        self.store, self.cache, self.transfer, self.counters = store, cache, transfer, stats
        self.prefetcher, self.wait_timeout = prefetcher, wait_timeout
        self._degraded = False

    def begin_step(self, positions):
        with self.cache.cv:
            self.cache.begin_step()
        if self.prefetcher is not None:
            self.prefetcher.begin_step(positions)

    def order(self, layer, x, ids):
        needed = [(layer, e) for e in torch.unique(ids).tolist()]
        cv = self.cache.cv
        with cv:
            self.cache.needed = set(needed)
            for key in needed:
                slot = self.cache.where.get(key)
                self.counters.add(layer, "hits" if slot is not None and slot.state == READY else "misses")
        self.transfer.drop_speculative(layer)
        reactive = self.cache.policy.reactive
        if not reactive:                      # early preemption: all of the layer's misses queued now
            for key in needed:
                self.transfer.request(key, HIGH)
        if self.prefetcher is not None:
            self.prefetcher.layer(layer, x, ids)
        if reactive:                          # baseline: plain order, each miss loaded when reached
            yield from (e for _, e in needed)
            return
        remaining = set(needed)
        while remaining:                      # reordered: resident first, then most chunks landed
            with cv:
                def readiness(key):
                    slot = self.cache.where.get(key)
                    if slot is None:
                        return (-1, -key[1])
                    return (4 if slot.state == READY else slot.ready_chunks, -key[1])
                key = max(remaining, key=readiness)
            remaining.discard(key)
            yield key[1]

    def _wait(self, key, chunk: int):
        """Block until chunk `chunk` of `key` is on the device; returns its slot, pinned."""
        cv = self.cache.cv
        t0 = time.perf_counter()
        if chunk == 0:
            self.transfer.request(key, HIGH)      # a miss (no-op when resident or already queued)
        deadline = t0 + self.wait_timeout
        with cv:
            while True:
                slot = self.cache.where.get(key)
                if slot is not None and slot.ready_chunks > chunk:
                    break
                if not self.transfer.alive:
                    break
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"expert {key[1]} of layer {key[0]} was not copied within "
                                       f"{self.wait_timeout:.0f} s (transfer engine stalled)")
                cv.wait(0.05)
        if slot is None or slot.ready_chunks <= chunk:
            if not self._degraded:
                self._degraded = True
                log.warning("copy thread is gone: experts are now loaded reactively on the compute thread")
            self.transfer.load_now(key)
            slot = self.cache.where[key]
        with cv:
            if chunk == 0:
                slot.pins += 1
                if slot.speculative:
                    slot.speculative = False
                    self.counters.add(key[0], "prefetch_useful")
                self.cache.touch(slot)
        self.counters.add(key[0], "stall_s", time.perf_counter() - t0)
        return slot

    def matrix(self, layer, expert, index):
        key = (layer, expert)
        slot = self._wait(key, index)
        m, offset = self.store.layout[key][index]
        return self.cache.view(slot, offset, m.nbytes), m

    def done(self, layer, expert):
        key = (layer, expert)
        with self.cache.cv:
            slot = self.cache.where[key]
            if self.cache.device.type == "cuda":
                ev = torch.cuda.Event()
                ev.record(torch.cuda.current_stream(self.cache.device))
                slot.free_event = ev
            slot.pins -= 1
            self.cache.needed.discard(key)
            self.cache.cv.notify_all()

    def end_layer(self, layer):
        with self.cache.cv:
            self.cache.needed = set()

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
