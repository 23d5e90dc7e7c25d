"""A virtual clock: timed callbacks run in time order; the compute side advances the clock to where
it is, or steps it while it waits for something."""
from __future__ import annotations

import heapq
import itertools


class Clock:
    def __init__(self):
        self.now = 0.0
        self._events: list = []
        self._seq = itertools.count()

    def at(self, t: float, fn) -> None:
        heapq.heappush(self._events, (max(t, self.now), next(self._seq), fn))

    def advance(self, t: float) -> None:
        """Run every callback due by `t`, then stand at `t`."""
        while self._events and self._events[0][0] <= t:
            when, _, fn = heapq.heappop(self._events)
            self.now = max(self.now, when)
            fn()
        self.now = max(self.now, t)

    def step(self) -> bool:
        """Run the next callback (the clock jumps to it); False when nothing is pending."""
        if not self._events:
            return False
        when, _, fn = heapq.heappop(self._events)
        self.now = max(self.now, when)
        fn()
        return True
