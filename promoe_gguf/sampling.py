"""Token sampling as llama.cpp's default chain: penalties -> top-k -> top-p -> min-p -> temperature -> dist.

Semantics follow llama.cpp's samplers (src/llama-sampler.cpp, chain order from common/common.h), which
tests/test_sampling.py checks against llama.cpp's own sampler objects on the same logits:
- penalties: the last `repeat_last_n` tokens of the history (0 disables, -1 means the whole history);
  a logit <= 0 is multiplied by the penalty, a positive one divided;
- top-k: exactly the k highest logits (k <= 0 or k >= vocab: no-op);
- top-p: softmax of the candidates, keep the shortest prefix (by probability) whose sum reaches p;
- min-p: keep logits >= max logit + log(min_p) (i.e. p_i >= min_p * p_max);
- temperature: logits / t over the survivors; t <= 0 is greedy (the argmax alone).
"""
from __future__ import annotations

import math

import torch

from .limits import check

# llama-server's defaults (common/common.h): `promoe run`, `chat`, the server and the Python API all use them.
DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.0,
            "repeat_last_n": 64, "seed": None}


def check_sampling(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed) -> dict:
    """Sampling parameters as Sampler takes them; ParameterError names the first bad one (limits.SETTINGS)."""
    given = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
                 repeat_last_n=repeat_last_n)
    out = {k: check(k, v) for k, v in given.items()}
    for k in ("temperature", "top_p", "min_p", "repeat_penalty"):
        out[k] = float(out[k])
    out["seed"] = None if seed is None else check("seed", seed)
    return out


class Sampler:
    def __init__(self, temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0,
                 repeat_last_n=64, seed=None):
        self.temperature, self.top_k, self.top_p, self.min_p = temperature, top_k, top_p, min_p
        self.repeat_penalty, self.repeat_last_n = repeat_penalty, repeat_last_n
        self.gen = torch.Generator().manual_seed(int(seed) if seed is not None else torch.seed())

    def penalized(self, logits, history: list[int]) -> torch.Tensor:
        """Float32 copy of `logits` [vocab] with the repeat penalty applied to recent tokens."""
        x = logits.detach().float().cpu().clone()
        window = len(history) if self.repeat_last_n < 0 else self.repeat_last_n
        if self.repeat_penalty != 1.0 and window > 0 and history:
            recent = torch.tensor(sorted(set(history[-window:])), dtype=torch.long)
            v = x[recent]
            x[recent] = torch.where(v <= 0, v * self.repeat_penalty, v / self.repeat_penalty)
        return x

    def distribution(self, logits, history: list[int]) -> torch.Tensor:
        """The probabilities the chain samples from, [vocab] float32 (zero outside the kept tokens)."""
        x = self.penalized(logits, history)
        n = x.numel()
        if self.temperature <= 0:
            probs = torch.zeros(n)
            probs[int(torch.argmax(x))] = 1.0
            return probs
        # Candidates sorted by logit, descending, as llama.cpp's samplers leave them (top-k sorts only k).
        if 0 < self.top_k < n:
            kept, order = torch.topk(x, self.top_k)
        else:
            order = torch.argsort(x, descending=True, stable=True)
            kept = x[order]
        if self.top_p < 1.0:
            cum = torch.cumsum(torch.softmax(kept, -1), 0)
            reached = torch.nonzero(cum >= self.top_p)
            if len(reached):
                last = int(reached[0]) + 1
                kept, order = kept[:last], order[:last]
        if self.min_p > 0.0:
            floor = kept[0] + torch.tensor(math.log(self.min_p), dtype=torch.float32)
            last = int((kept >= floor).sum())                  # kept is sorted: a prefix survives
            kept, order = kept[:max(last, 1)], order[:max(last, 1)]
        probs = torch.zeros(n)
        probs[order] = torch.softmax(kept / self.temperature, -1)
        return probs

    def sample(self, logits, history: list[int]) -> int:
        """logits [vocab] -> one token id."""
        probs = self.distribution(logits, history)
        if self.temperature <= 0:
            return int(torch.argmax(probs))
        return int(torch.multinomial(probs, 1, generator=self.gen))
