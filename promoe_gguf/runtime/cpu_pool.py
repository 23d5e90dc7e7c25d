"""The CPU expert pool: routed experts the device does not hold, computed on the CPU from the host
store with llama.cpp's kernels (ggml), while the device computes the rest.

One worker thread with its own CPU backend (ggml parallelizes each product over `threads`); jobs
run in submission order. Tokens move, weights do not: a job gets the expert's hidden rows on the host
(the seam copies a layer's router input to a page-locked buffer once) and returns its output rows. A job that raises, or a worker that hangs past the caller's bound or dies,
turns the pool off with a warning; callers then copy the expert to the device instead.
"""
from __future__ import annotations

import logging
import queue
import threading
import time

import torch

from ..backends.base import SWIGLU

log = logging.getLogger("promoe.runtime")


class CpuJob:
    """One expert over its tokens: out = down(silu(gate x) * up x), x on the host; `fn` the expert's
    own activation and bias rows (on the host) where the family has them."""

    def __init__(self, key, x, mats, fn=SWIGLU):
        self.key, self.x, self.mats, self.fn = key, x, mats, fn
        self.part: tuple | None = None       # (lo, hi): a split expert's intermediate rows (mats are that part)
        self.out: torch.Tensor | None = None
        self.error: BaseException | None = None
        self.seconds = 0.0
        self.done = threading.Event()

    def wait(self, timeout: float) -> torch.Tensor | None:
        """The output rows, or None if the job failed or did not finish within `timeout` seconds."""
        if not self.done.wait(timeout) or self.error is not None:
            return None
        return self.out


class CpuExpertPool:
    def __init__(self, threads: int = 1, fault=None):
        from ..backends.cpu import CpuBackend
        self.backend = CpuBackend(n_threads=threads)
        self.threads = threads
        self.q: queue.Queue = queue.Queue()
        self.alive = True
        self.fault = fault                   # tests: called in the worker before each job
        self.thread = threading.Thread(target=self._run, name="promoe-cpu-experts", daemon=True)
        self.thread.start()

    def submit(self, jobs: list[CpuJob]) -> None:
        """Queue a layer's jobs at once (one wake-up of the worker, which runs them in order)."""
        self.q.put(jobs)

    def round_trip(self, timeout: float = 10.0) -> float:
        """Seconds for an empty job through the worker (queued, woken, handed back): what a CPU expert
        costs beyond its compute."""
        job = CpuJob(None, None, None)
        t0 = time.perf_counter()
        self.submit([job])
        if not job.done.wait(timeout):
            raise RuntimeError(f"the CPU expert worker did not answer an empty job within {timeout:.0f} s")
        return time.perf_counter() - t0

    def run_now(self, x, mats) -> torch.Tensor:
        """Synchronous, on the caller's thread (start-up probes, before the worker gets jobs)."""
        return self.backend.expert_ffn(x, *mats)

    def _run(self) -> None:
        while True:
            jobs = self.q.get()
            if jobs is None:
                return
            for job in jobs:
                self._one(job)

    def _one(self, job: CpuJob) -> None:
        if job.mats is None:                 # round_trip's empty job: no compute
            job.done.set()
            return
        try:
            if self.fault is not None:
                self.fault()
            t0 = time.perf_counter()
            job.out = self.backend.expert_ffn(job.x, *job.mats, job.fn)
            job.seconds = time.perf_counter() - t0
        except BaseException as e:  # noqa: BLE001 - reported to the waiting caller, pool turned off
            job.error = e
            if self.alive:
                self.alive = False
                log.warning("CPU expert worker failed on expert %s of layer %s (%s: %s); misses are copied "
                            "to the device from now on", job.key[1], job.key[0], type(e).__name__, e)
        finally:
            job.done.set()

    def mark_hung(self, job: CpuJob, waited: float) -> None:
        if self.alive:
            self.alive = False
            log.warning("CPU expert worker did not finish expert %s of layer %s within %.1f s; misses are copied "
                        "to the device from now on", job.key[1], job.key[0], waited)

    def close(self) -> None:
        self.alive = False
        self.q.put(None)
        self.thread.join(timeout=10)
        if self.thread.is_alive():
            log.warning("CPU expert worker did not stop within 10 s")
        self.backend.close()
