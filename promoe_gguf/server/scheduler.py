"""One engine thread runs requests one at a time in arrival order, behind a bounded queue.

The expert cache is one shared resource, so requests never interleave. A request handler (asyncio) submits a
`Job`; the engine thread drains the job's work (an iterator) item by item into the job's asyncio queue, and
stops between items when the job is cancelled (client gone, server closing). A job that raises leaves the
thread serving the next one.
"""
from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections import Counter
from collections.abc import Generator
from typing import Callable, Iterable

log = logging.getLogger("promoe.server")


class QueueFull(Exception):
    """The queue is at its bound: the client should retry after `retry_after` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy; retry after {retry_after} s")
        self.retry_after = retry_after


class ServerClosing(Exception):
    """The server is shutting down: the job will not run."""


class Job:
    """`work()` -> iterable of items, run on the engine thread. Items arrive on `items` as ("item", x), then one
    ("end", None) or ("error", exception). `cancel` may be shared with the work (a Generation's)."""

    def __init__(self, work: Callable[[], Iterable], loop: asyncio.AbstractEventLoop,
                 cancel: threading.Event | None = None, on_done: Callable[[], None] | None = None):
        self.work, self.loop, self.on_done = work, loop, on_done
        self.cancel = cancel or threading.Event()
        self.items: asyncio.Queue = asyncio.Queue()

    def emit(self, kind: str, value) -> bool:
        """Hand an event to the requester's event loop; False (and cancelled) when that loop is gone."""
        try:
            self.loop.call_soon_threadsafe(self.items.put_nowait, (kind, value))
            return True
        except RuntimeError:
            self.cancel.set()
            return False


class Scheduler:
    def __init__(self, max_queue: int = 8):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.max_queue = max_queue
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._closing = threading.Event()
        self.running: Job | None = None
        self.outcomes: Counter = Counter()  # completed / failed / cancelled / rejected
        self.busy_s = 0.0
        self._mean_job_s = 1.0
        self._thread = threading.Thread(target=self._loop, name="promoe-engine", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Requests waiting (not counting the one running)."""
        return self._queue.qsize()

    def retry_after(self) -> int:
        return max(1, math.ceil(self._mean_job_s * (self.depth + 1)))

    def submit(self, job: Job) -> None:
        if self._closing.is_set():
            raise ServerClosing("the server is shutting down")
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.outcomes["rejected"] += 1
            raise QueueFull(self.retry_after()) from None

    def _loop(self) -> None:
        while not self._closing.is_set():
            try:
                job = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            self._run(job)
        while True:  # tell whoever still waits that their job will not run
            try:
                self._queue.get_nowait().emit("error", ServerClosing("the server is shutting down"))
            except queue.Empty:
                break

    def _run(self, job: Job) -> None:
        if job.cancel.is_set():  # its client left while it waited
            self.outcomes["cancelled"] += 1
            job.emit("end", None)
            return
        self.running = job
        t0 = time.perf_counter()
        items = None
        try:
            items = iter(job.work())
            for item in items:
                if not job.emit("item", item) or job.cancel.is_set() or self._closing.is_set():
                    break
            outcome = "cancelled" if job.cancel.is_set() else "completed"
            if self._closing.is_set():      # cut short by shutdown: the client gets an error, not a clean end
                job.emit("error", ServerClosing("the server is shutting down"))
            else:
                job.emit("end", None)
        except Exception as e:  # the request failed; the engine thread carries on with the next one
            log.exception("request failed")
            outcome = "failed"
            job.emit("error", e)
        finally:
            if isinstance(items, Generator):
                items.close()  # stops a generator at once: engine.generate ends, its KV cache is freed
            self.running = None
        elapsed = time.perf_counter() - t0
        self.busy_s += elapsed
        self._mean_job_s = 0.8 * self._mean_job_s + 0.2 * elapsed
        if job.on_done is not None:
            try:
                job.on_done()
            except Exception:
                log.exception("on_done hook failed")
        self.outcomes[outcome] += 1  # last: whoever sees the count sees the job's usage too

    def begin_close(self) -> None:
        """Stop taking jobs and cancel the running one; returns at once (safe in a signal handler). The
        running and queued jobs end with a ServerClosing error."""
        self._closing.set()
        running = self.running
        if running is not None:
            running.cancel.set()

    def close(self, timeout: float = 10.0) -> None:
        """begin_close(), then join the engine thread (bounded wait)."""
        self.begin_close()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("engine thread still busy after %.0f s", timeout)
