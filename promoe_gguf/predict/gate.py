"""Gate reuse (mixtral-offloading, AdapMoE): score layer L+j's experts by applying L+j's router to
layer L's router input. Cheap, no training; cannot look across tokens."""
from __future__ import annotations

import torch

from .base import Predictor


class GatePredictor(Predictor):
    name = "gate"

    def __init__(self, model, lookahead: int = 1):
        super().__init__(model, lookahead)
        cfg = model.config
        self.routers = {layer: torch.from_numpy(model.tensor_f32(f"blk.{layer}.ffn_gate_inp.weight"))
                        for layer in cfg.moe_layers}                                  # [E, d] each

    def predict(self, layer, x):
        x = x.float().cpu()
        return {t: x @ self.routers[t].T for t in range(layer + 1, layer + 1 + self.lookahead)
                if t in self.routers}
