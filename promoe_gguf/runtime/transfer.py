"""The transfer engine: one copy thread, three priorities, copies chunked per matrix.

HIGH tasks (the router's real choice) always go first; then ADMIT ones (experts the CPU just
computed, which the cache may take in the link's idle time, the most valuable first), then LOW ones
(predictions of the next layers' experts). Admissions go before guesses because, simulated, that is
faster (Mixtral-8x7B on a 4090: 31.1 against 25.3 tok/s with guesses first; the gate predictor's
guesses are right about 70% of the time, an expert just used comes back more often). Neither ever
evicts an expert worth more than it brings (Policy.worth). The choice is remade after every chunk,
so a precise request waits behind at most one chunk of a speculative copy (ProMoE's chunked prefetch). A task takes its slot when its first chunk starts (evicting a
victim then, not earlier). If the thread dies, `alive` turns false and the compute thread copies
for itself (reactive loading), with a logged warning.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from .cache import READY
from .host_store import Piece

log = logging.getLogger("promoe.runtime")
HIGH, ADMIT, LOW = 0, 1, 2


@dataclass
class Task:
    key: tuple
    priority: int
    slot: object = None
    next_chunk: int = 0
    dropped: bool = False
    pieces: list | None = None       # a split expert's device part (into a staging slot); None: the whole expert

    @property
    def landed(self) -> bool:
        return self.pieces is not None and self.next_chunk == len(self.pieces)


class CopyQueue:
    """The copy requests and their order, with no thread: what to copy next (`next_task`), and what a
    landed chunk changes (`landed`). TransferEngine drives it with its copy thread; promoe simulate
    drives it with its virtual clock."""

    def __init__(self, store, cache, stats):
        self.store, self.cache, self.stats = store, cache, stats
        self.queues = (deque(), deque(), deque())    # HIGH, ADMIT, LOW
        self.tasks: dict[tuple, Task] = {}           # pending or running, by expert
        self.parts: dict[tuple, Task] = {}           # split experts' device parts, pending or running
        self.alive = True                            # False: nothing copies any more (the caller loads)
        self.starved = False                         # a precise copy waits for a slot to come free
        self.on_wire = 0                             # bytes of the chunk being copied now (any priority)

    # ---- requests (any thread; they take cache.cv) ------------------------------------------
    def request(self, key, priority: int) -> None:
        cv = self.cache.cv
        with cv:
            slot = self.cache.where.get(key)
            if slot is not None and slot.state == READY:
                return
            task = self.tasks.get(key)
            if task is None:
                task = Task(key, priority)
                self.tasks[key] = task
                self.queues[priority].append(task)
            elif priority < task.priority:            # a guess became a certainty, an admission a guess
                self.queues[task.priority].remove(task)
                task.priority = priority
                self.queues[priority].append(task)
            else:
                return                                # already queued as it is: nobody to wake
            cv.notify_all()

    def request_part(self, key, lo: int, staging) -> Task:
        """(any thread) Copy `key`'s intermediate rows from `lo` on into `staging` (zeros where the
        CPU's rows are), as a precise copy; the caller waits for `task.landed`."""
        task = Task(key, HIGH, slot=staging, pieces=self.store.store_layout.part_pieces(key, lo))
        with self.cache.cv:
            self.parts[key] = task
            self.queues[HIGH].append(task)
            self.cache.cv.notify_all()
        return task

    def pieces(self, task: Task) -> list:
        return task.pieces if task.pieces is not None else self.store.store_layout.pieces(task.key)

    def drop_speculative(self, layer: int) -> int:
        """Early preemption: forget LOW and ADMIT tasks for `layer` that have not started (the layer's
        own choice is about to be known)."""
        with self.cache.cv:
            n = 0
            for priority in (LOW, ADMIT):
                q = self.queues[priority]
                if not q:
                    continue
                keep = deque(t for t in q if t.key[0] != layer or t.slot is not None)
                for t in q:
                    if t.key[0] == layer and t.slot is None:
                        t.dropped = True
                        del self.tasks[t.key]
                n += len(q) - len(keep)
                q.clear()
                q.extend(keep)
            return n

    def pending_low(self) -> int:
        with self.cache.cv:
            return len(self.queues[LOW])

    def queued_bytes(self, priority: int) -> int:
        """(cv held) Bytes still to copy for the tasks queued at `priority`."""
        return sum(self._left(task) for task in self.queues[priority])

    def ahead_of_new(self) -> int:
        """(cv held) Bytes a precise copy requested now waits behind: the precise copies queued and
        the chunk on the wire (a guess's chunk is not interrupted)."""
        return self.queued_bytes(HIGH) + self.on_wire

    def queued_bytes_of(self, key, priority: int) -> int:
        """(cv held) Bytes still to copy for `key` if it is queued at `priority`, else 0."""
        task = self.tasks.get(key)
        return self._left(task) if task is not None and task.priority == priority else 0

    def _left(self, task) -> int:
        return sum(p.wire_bytes for p in self.pieces(task)[task.next_chunk:])

    def next_task(self):
        """(cv held) The task to advance next and its slot, or None. Tasks go in queue order; when the
        first precise one waits for a slot, a task that already holds one still advances (it may be
        the expert the compute thread waits for, whose use frees the slots the first one needs)."""
        self.starved = False
        for priority in (HIGH, ADMIT, LOW):
            q = self.queues[priority]
            if priority == ADMIT and len(q) > 1 and q[0].slot is None:   # a started one, else the most valuable
                best = max(q, key=lambda t: (t.slot is not None, self.cache.value(t.key)))
                q.remove(best)
                q.appendleft(best)
            while q and q[0].slot is None:
                task = q[0]
                task.slot = self.cache.allocate(task.key, self.stats.on_evict, speculative=priority != HIGH)
                if task.slot is not None:
                    self.cache.loading(task.slot, priority != HIGH)
                elif priority != HIGH:                    # nothing worth evicting: drop the guess
                    q.popleft()
                    task.dropped = True
                    del self.tasks[task.key]
                else:
                    self.starved = True                   # precise: waits for a slot to come free
                    break
            held = next((task for task in q if task.slot is not None), None)
            if held is not None:
                return held
        return None

    def landed(self, task: Task, nbytes: int) -> None:
        """(cv held) The task's next chunk is on the device: count it; its last chunk makes the slot
        READY and retires the task (a split part: its waiter sees task.landed)."""
        task.next_chunk += 1
        if task.pieces is not None:
            if nbytes:
                self.stats.copied(task.key, nbytes, False)
            if task.landed:
                self.queues[task.priority].remove(task)
                del self.parts[task.key]
            return
        self.cache.chunk_landed(task.slot, task.next_chunk)
        self.stats.copied(task.key, nbytes, task.priority != HIGH)
        if task.next_chunk == len(self.store.chunks(task.key)):
            self.cache.mark_present(task.slot)
            self.stats.add(task.key[0], "copies")
            if task.priority != HIGH and self.cache.policy.prefetch_touches:
                self.cache.touch(task.slot)
            self.queues[task.priority].remove(task)
            del self.tasks[task.key]



class TransferEngine(CopyQueue):
    """CopyQueue with its copy thread, over a link (runtime/link.py)."""

    def __init__(self, store, cache, link, stats, fault=None):
        super().__init__(store, cache, stats)
        self.link = link
        self.stopping = False
        self.fault = fault                           # tests: callable raising inside the thread
        self.thread = threading.Thread(target=self._run, name="promoe-copy", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        cv = self.cache.cv
        try:
            while True:
                with cv:
                    task = None
                    while not self.stopping and (task := self.next_task()) is None:
                        cv.wait(0.05)
                    if self.stopping:
                        return
                    slot, piece = task.slot, self.pieces(task)[task.next_chunk]
                    after = slot.free_event
                    self.on_wire = piece.wire_bytes
                if self.fault is not None:
                    self.fault()
                self.copy_piece(task, piece, after)
                with cv:
                    self.on_wire = 0
                    self.landed(task, piece.wire_bytes)
                    if task.landed or task.slot.state == READY:   # waiters want whole experts or parts
                        cv.notify_all()
        except BaseException as e:  # noqa: BLE001 - any failure degrades to reactive loading
            log.warning("expert copy thread died (%s: %s); loading experts reactively from now on",
                        type(e).__name__, e)
            with cv:
                self.alive = False
                cv.notify_all()

    def copy_piece(self, task: Task, piece: Piece, after) -> None:
        self.link.copy(self.cache.piece(task.slot, piece), None if piece.zero else self.store.piece(task.key, piece), after)

    def load_part_now(self, task: Task) -> None:
        """Reactive fallback on the caller's thread (copy thread dead): the rest of a split part."""
        cv = self.cache.cv
        with cv:
            if task.landed:
                return
            if task in self.queues[HIGH]:
                self.queues[HIGH].remove(task)
            self.parts.pop(task.key, None)
        while task.next_chunk < len(task.pieces):
            self.copy_piece(task, task.pieces[task.next_chunk], task.slot.free_event)
            task.next_chunk += 1

    def load_now(self, key) -> None:
        """Reactive fallback on the caller's thread (copy thread dead): copy `key` synchronously."""
        cv = self.cache.cv
        with cv:
            slot = self.cache.where.get(key)
            if slot is not None and slot.state == READY:
                return
            task = self.tasks.pop(key, None)
            for q in self.queues:
                if task in q:
                    q.remove(task)
            if slot is None:
                deadline = time.monotonic() + 30
                while (slot := self.cache.allocate(key, self.stats.on_evict)) is None:
                    if not cv.wait(0.05) and time.monotonic() > deadline:
                        raise RuntimeError(f"no cache slot came free for expert {key[1]} of layer {key[0]}")
            self.cache.loading(slot, False)
        for i, (offset, nbytes) in enumerate(self.store.chunks(key)):
            self.link.copy(self.cache.view(slot, offset, nbytes), self.store.region(key)[offset:offset + nbytes],
                           slot.free_event)
            with cv:
                self.cache.chunk_landed(slot, i + 1)
                self.stats.copied(key, nbytes, False)
        with cv:
            self.cache.mark_present(slot)
            self.stats.add(key[0], "copies")
            cv.notify_all()

    def close(self) -> None:
        with self.cache.cv:
            self.stopping = True
            self.cache.cv.notify_all()
        self.thread.join(timeout=10)
        if self.thread.is_alive():
            log.warning("expert copy thread did not stop within 10 s")
