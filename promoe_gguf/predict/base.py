"""The predictor interface the runtime's prefetcher drives.

A forward step (one prefill chunk or one decoded token) goes:
    begin_step(positions)                     absolute positions of this step's tokens
    for each MoE layer L:  (x = the router input of layer L, [T, d])
        predict(L, x) -> {target: scores [T, E]}    scores for later layers, higher = more likely
        observe(L, x, chosen)                       the router's real choice [T, k], for history
A target t > L names layer t of this step when t < n_layers, and layer t - n_layers of the NEXT
step (cross-token prediction: the next token's first layers from this token's last ones).
Predictors run on the prefetcher's thread, off the critical path; they must not mutate `x`.
"""
from __future__ import annotations

import torch


class Predictor:
    name = "none"

    def __init__(self, model=None, lookahead: int = 1):
        self.model, self.lookahead = model, int(lookahead)
        self.positions: list[int] = []

    def begin_step(self, positions: list[int]) -> None:
        self.positions = list(positions)

    def predict(self, layer: int, x: torch.Tensor) -> dict[int, torch.Tensor]:
        return {}

    def observe(self, layer: int, x: torch.Tensor, chosen: torch.Tensor) -> None:
        pass

    def reset(self) -> None:
        """A new sequence starts."""
        self.positions = []

    def set_sequence(self, trace, rows) -> None:
        """An evaluation replays `trace`'s rows `rows` next (a predictor that replays recorded routes
        loads that sequence's; the others have nothing to do)."""
