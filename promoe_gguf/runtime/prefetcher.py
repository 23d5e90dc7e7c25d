"""The predictor thread: turns predictions into speculative (LOW) copy requests, off the critical path.

The compute thread only enqueues (step starts, each MoE layer's router input and choice); this
thread runs the predictor and asks the transfer engine for the predicted experts of later layers.
In decode the router input and choice are the step's own host buffers (the expert seam's per-layer
log, rewritten only by the next step): the compute thread passes them as they are and this thread
copies them, then drops them if the next step has begun meanwhile (a torn read, and too late anyway).
A predictor that raises is switched off with a warning (reactive loading goes on); a slow one only
makes its guesses late, and guesses for a layer already computed are discarded.
"""
from __future__ import annotations

import logging
import queue
import threading
import time

import numpy as np
import torch

from .transfer import LOW

log = logging.getLogger("promoe.runtime")
MAX_BACKLOG = 64


def voted_order(votes: np.ndarray) -> list[int]:
    """Experts with votes (each token's predicted top-k), most-voted first."""
    return [int(e) for e in np.argsort(-votes, kind="stable") if votes[e] > 0]


class Predictions:
    """What a layer's predictions change, with no thread: the next layer's predicted experts protected,
    every predicted expert valued until its step has run and requested as a speculative copy. The
    Prefetcher runs it on its thread; promoe simulate on its clock."""

    def __init__(self, predictor, transfer, cache, stats, n_layers: int, n_used: int):
        self.predictor, self.transfer, self.cache, self.stats = predictor, transfer, cache, stats
        self.n_layers, self.n_used = n_layers, n_used
        self.step = 0                     # compute thread's step counter
        self.progress = (0, -1)           # (step, layer) the compute thread has reached
        self.enabled = True

    def apply(self, step: int, layer: int, x, ids, ready) -> None:
        if ready is not None:
            ready.synchronize()               # this thread waits for the copy of x, not the compute thread
        t0 = time.perf_counter()
        scores = self.predictor.predict(layer, x)
        self.predictor.observe(layer, x, ids)
        self.stats.predictor_calls += 1
        self.stats.predictor_s += time.perf_counter() - t0
        cur_step, cur_layer = self.progress
        protect, expected = set(), {}
        for target, s in sorted(scores.items()):
            t_step, t_layer = step + target // self.n_layers, target % self.n_layers
            if (t_step, t_layer) <= (cur_step, cur_layer):
                continue                       # that layer has already run: too late
            experts = self.pick(s)
            if target == layer + 1:
                protect.update((t_layer, e) for e in experts)
            expected.update(((t_layer, e), t_step) for e in experts)
        with self.cache.cv:
            self.cache.expect(protect, expected)      # valued by the cache until that step has run
        for key in expected:
            self.transfer.request(key, LOW)

    def pick(self, scores: torch.Tensor) -> list[int]:
        """Experts to fetch from scores [T, E]: each token's top-k (voted_order)."""
        k = min(self.n_used, scores.shape[-1])
        top = scores.float().topk(k, dim=-1).indices.reshape(-1)
        return voted_order(torch.bincount(top, minlength=scores.shape[-1]).numpy())


class Prefetcher(Predictions):
    """Predictions on the predictor thread, fed by a queue from the compute thread."""

    def __init__(self, predictor, transfer, cache, stats, n_layers: int, n_used: int):
        super().__init__(predictor, transfer, cache, stats, n_layers, n_used)
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="promoe-predict", daemon=True)
        self.thread.start()

    # ---- compute thread side ------------------------------------------------------------------
    def reset(self) -> None:
        """A new, independent sequence starts: the predictor forgets the last one (on its thread)."""
        self._put(("reset",))

    def begin_step(self, positions) -> None:
        self.step += 1
        self.progress = (self.step, -1)
        self._put(("step", self.step, positions))

    def layer(self, layer: int, x, ids, static: bool = False) -> None:
        """x [T, d] the router input, ids [T, k] the routing (numpy, on the host). static: both are
        host buffers the next step rewrites (read on the predictor thread). Otherwise x may be on the
        device: on CUDA its copy is enqueued without waiting; the predictor thread waits for it."""
        self.progress = (self.step, layer)
        if not self.enabled:
            return
        if static:
            self._put(("logged", self.step, layer, x, ids))
            return
        ids_t = torch.from_numpy(np.array(ids, copy=True))
        if x.device.type == "cuda":
            host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            host.copy_(x, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(x.device))     # the engine's device, not the current one
            self._put(("layer", self.step, layer, host, ids_t, ready))
        else:
            self._put(("layer", self.step, layer, x.detach().clone(), ids_t, None))

    def _put(self, item) -> None:
        if self.q.qsize() > MAX_BACKLOG:    # the predictor is far behind: its guesses would be stale
            try:
                self.q.get_nowait()
                self.stats.dropped_predictions += 1
            except queue.Empty:
                pass
        self.q.put(item)

    # ---- predictor thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            if not self.enabled:
                continue
            try:
                if item[0] == "reset":
                    self.predictor.reset()
                elif item[0] == "step":
                    self.predictor.begin_step(item[2])
                elif item[0] == "logged":
                    self._logged(*item[1:])
                else:
                    self.apply(*item[1:])
            except Exception as e:  # noqa: BLE001 - a broken predictor must not break inference
                self.enabled = False
                self.stats.predictor_errors += 1
                log.warning("predictor %s failed (%s: %s); prefetching is off, experts load on demand",
                            getattr(self.predictor, "name", "?"), type(e).__name__, e)

    def _logged(self, step: int, layer: int, x_log, ids_log) -> None:
        """A decode layer's inputs read from the step's buffers; dropped if the next step began."""
        if self.step != step:
            self.stats.dropped_predictions += 1
            return
        x, ids = x_log.clone(), torch.from_numpy(np.array(ids_log, copy=True))
        if self.step != step:                          # the next step may have rewritten them while copying
            self.stats.dropped_predictions += 1
            return
        self.apply(step, layer, x, ids, None)

    def close(self) -> None:
        self.q.put(None)
        self.thread.join(timeout=10)
