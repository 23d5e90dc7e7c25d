"""History-based baselines.

freq     per-layer usage frequency: the same k experts per layer every time (counts from a trace's
         training prompts, or counted online as the predictor observes routing).
history  MoE-Infinity's expert activation matrix (EAM) matching: the current request's EAM (tokens
         routed to each (layer, expert) so far) is compared by cosine similarity with the EAMs of past
         requests (a trace's training prompts, plus every request this predictor has seen finish);
         the closest one's counts at the target layer are the scores.
Both look across tokens too (targets >= n_layers: the next token's layers).
"""
from __future__ import annotations

import numpy as np
import torch

from .base import Predictor


def _targets(pred, layer):
    """[(target number, target MoE slot)] for lookahead 1..pred.lookahead from `layer`."""
    a = pred.slot.get(layer)
    if a is None:
        return []
    out = []
    for j in range(1, pred.lookahead + 1):
        b = a + j
        bb = b % pred.M
        out.append((pred.moe[bb] + (pred.n_layers if b >= pred.M else 0), bb))
    return out


class FreqPredictor(Predictor):
    name = "freq"

    def __init__(self, model, lookahead: int = 1, counts=None):
        super().__init__(model, lookahead)
        cfg = model.config
        self.moe, self.n_layers, self.E = list(cfg.moe_layers), cfg.n_layers, cfg.n_experts
        self.M = len(self.moe)
        self.slot = {layer: i for i, layer in enumerate(self.moe)}
        self.online = counts is None
        self.counts = torch.zeros(self.M, self.E) if counts is None else torch.as_tensor(counts, dtype=torch.float32).clone()
        # a fixed tie-break so that equal counts rank experts deterministically
        self.tie = -torch.arange(self.E, dtype=torch.float32) * 1e-6

    def predict(self, layer, x):
        T = x.shape[0]
        return {t: (self.counts[bb] / max(1.0, float(self.counts[bb].sum())) + self.tie).expand(T, self.E)
                for t, bb in _targets(self, layer)}

    def observe(self, layer, x, chosen, logits=None):
        if self.online and layer in self.slot:
            self.counts[self.slot[layer]] += torch.bincount(chosen.reshape(-1).cpu().long(), minlength=self.E).float()


class HistoryPredictor(Predictor):
    name = "history"

    def __init__(self, model, lookahead: int = 1, library=None, max_library: int = 4096):
        super().__init__(model, lookahead)
        cfg = model.config
        self.moe, self.n_layers, self.E = list(cfg.moe_layers), cfg.n_layers, cfg.n_experts
        self.M = len(self.moe)
        self.slot = {layer: i for i, layer in enumerate(self.moe)}
        lib = np.zeros((0, self.M, self.E), np.float32) if library is None else np.asarray(library, np.float32)
        self.library = torch.as_tensor(lib).reshape(-1, self.M * self.E)
        self.max_library = max_library
        self.tie = -torch.arange(self.E, dtype=torch.float32) * 1e-6
        self._refresh()
        self.eam = torch.zeros(self.M * self.E)

    def _refresh(self):
        n = self.library.norm(dim=1, keepdim=True).clamp_min(1e-9)
        self.lib_unit = self.library / n
        mean = self.library.sum(0)
        self.mean = mean / mean.reshape(self.M, self.E).sum(1).repeat_interleave(self.E).clamp_min(1.0)

    def reset(self):
        if getattr(self, "eam", None) is not None and self.eam.sum() > 0:      # archive the finished request
            self.library = torch.cat([self.library, self.eam[None]])[-self.max_library:]
            self._refresh()
        self.eam = torch.zeros(self.M * self.E)
        super().reset()

    def predict(self, layer, x):
        targets = _targets(self, layer)
        if not targets:
            return {}
        T = x.shape[0]
        if len(self.library) and self.eam.sum() > 0:
            sim = self.lib_unit @ (self.eam / self.eam.norm())
            row = self.library[int(torch.argmax(sim))].reshape(self.M, self.E)
        elif len(self.library):
            row = self.mean.reshape(self.M, self.E)
        else:
            row = self.eam.reshape(self.M, self.E)
        out = {}
        for t, bb in targets:
            s = row[bb] / row[bb].sum().clamp_min(1.0)
            # the current request's own counts break ties between equally matched experts
            own = self.eam.reshape(self.M, self.E)[bb]
            out[t] = (s + 1e-3 * own / own.sum().clamp_min(1.0) + self.tie).expand(T, self.E)
        return out

    def observe(self, layer, x, chosen, logits=None):
        a = self.slot.get(layer)
        if a is None:
            return
        c = torch.bincount(chosen.reshape(-1).cpu().long(), minlength=self.E).float()
        self.eam[a * self.E:(a + 1) * self.E] += c


def trace_counts(trace, split: str = "train"):
    """Per-layer expert counts [M, E] over the split's rows, and per-request EAMs [n_seqs, M, E]."""
    E = trace.E
    eams = []
    for s in trace.seqs(split):
        ids = np.asarray(trace.ids[s["start"]:s["start"] + s["n_prompt"] + s["n_decode"]]).astype(np.int64)
        eam = np.zeros((trace.M, E), np.float32)
        for a in range(trace.M):
            eam[a] = np.bincount(ids[:, a].reshape(-1), minlength=E)
        eams.append(eam)
    eams = np.stack(eams) if eams else np.zeros((0, trace.M, E), np.float32)
    return eams.sum(0) if len(eams) else np.zeros((trace.M, E), np.float32), eams
