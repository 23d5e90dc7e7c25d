"""The oracle: replays a recorded routing trace of the same sequence, so every prediction is right.
It is the upper bound a real predictor is measured against."""
from __future__ import annotations

import torch

from .base import Predictor


class RoutingRecorder:
    """Records the real routing of a run: {(position, layer): chosen expert ids}."""

    def __init__(self):
        self.routes: dict[tuple[int, int], list[int]] = {}
        self.positions: list[int] = []

    def begin_step(self, positions):
        self.positions = list(positions)

    def observe(self, layer, x, chosen, logits=None):
        for pos, row in zip(self.positions, chosen.tolist()):
            self.routes[(pos, layer)] = row


class OraclePredictor(Predictor):
    name = "oracle"

    def __init__(self, model, routes: dict, lookahead: int = 2):
        super().__init__(model, lookahead)
        self.routes = routes
        self.n_layers, self.n_experts = model.config.n_layers, model.config.n_experts

    def predict(self, layer, x):
        out = {}
        for t in range(layer + 1, layer + 1 + self.lookahead):
            shift, target = divmod(t, self.n_layers)          # past the last layer: the next token
            scores = torch.zeros((len(self.positions), self.n_experts))
            for i, pos in enumerate(self.positions):
                for e in self.routes.get((pos + shift * len(self.positions), target), ()):
                    scores[i, e] = 1.0
            if scores.any():
                out[t] = scores
        return out
