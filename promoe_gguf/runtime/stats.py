"""Cache statistics, totals and per layer (updated under the cache's lock)."""
from __future__ import annotations

from collections import defaultdict

FIELDS = ("hits", "misses", "bytes_h2d", "copies", "stall_s", "prefetch_useful", "prefetch_wasted",
          "cpu_experts", "cpu_s", "copies_avoided", "wait_cpu_s", "split_experts")


class Stats:
    def __init__(self):
        self.layers = defaultdict(lambda: dict.fromkeys(FIELDS, 0))
        self.predictor_calls = 0
        self.predictor_s = 0.0
        self.predictor_errors = 0
        self.dropped_predictions = 0
        self.decode_steps = 0
        self.decode_s = 0.0                 # wall time of decode steps (one token each)
        self.decode_wait_copy_s = 0.0       # of which waiting for copies
        self.decode_wait_cpu_s = 0.0        # of which waiting for the CPU pool

    def add(self, layer: int, field: str, value=1) -> None:
        self.layers[layer][field] += value

    def copied(self, key, nbytes: int, speculative: bool) -> None:
        self.add(key[0], "bytes_h2d", nbytes)

    def on_evict(self, slot) -> None:
        if slot.speculative:
            self.add(slot.key[0], "prefetch_wasted")

    def snapshot(self, slots=()) -> dict:
        per_layer = {layer: dict(v) for layer, v in sorted(self.layers.items())}
        totals = {f: sum(v[f] for v in per_layer.values()) for f in FIELDS}
        for f in ("stall_s", "cpu_s", "wait_cpu_s"):
            totals[f] = float(totals[f])
        unused = sum(1 for s in slots if s.speculative and s.key is not None)
        return {**totals, "prefetch_unused_resident": unused,
                "predictor_calls": self.predictor_calls, "predictor_s": self.predictor_s,
                "predictor_errors": self.predictor_errors, "dropped_predictions": self.dropped_predictions,
                "decode_steps": self.decode_steps, "decode_s": self.decode_s,
                "decode_wait_copy_share": self.decode_wait_copy_s / self.decode_s if self.decode_s else 0.0,
                "decode_wait_cpu_share": self.decode_wait_cpu_s / self.decode_s if self.decode_s else 0.0,
                "per_layer": per_layer}
