"""Token sampling as llama.cpp's default chain: repeat penalty -> top-k -> top-p -> min-p -> temperature."""
from __future__ import annotations

import torch


class Sampler:
    def __init__(self, temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0,
                 repeat_last_n=64, seed=None):
        self.temperature, self.top_k, self.top_p, self.min_p = temperature, top_k, top_p, min_p
        self.repeat_penalty, self.repeat_last_n = repeat_penalty, repeat_last_n
        self.gen = torch.Generator().manual_seed(int(seed) if seed is not None else torch.seed())

    def sample(self, logits, history: list[int]) -> int:
        """logits [vocab] -> one token id."""
        logits = logits.detach().float().cpu().clone()
        if self.repeat_penalty != 1.0 and history:
            recent = torch.tensor(sorted(set(history[-self.repeat_last_n:])), dtype=torch.long)
            v = logits[recent]
            logits[recent] = torch.where(v > 0, v / self.repeat_penalty, v * self.repeat_penalty)
        if self.temperature <= 0:
            return int(torch.argmax(logits))
        if 0 < self.top_k < logits.numel():
            kth = torch.topk(logits, self.top_k).values[-1]
            logits[logits < kth] = float("-inf")
        probs = torch.softmax(logits, dim=-1)
        if self.top_p < 1.0:
            p, idx = torch.sort(probs, descending=True)
            cut = torch.cumsum(p, 0) - p > self.top_p         # keep the smallest prefix reaching top_p
            probs[idx[cut]] = 0.0
        if self.min_p > 0.0:
            probs[probs < self.min_p * probs.max()] = 0.0
        logits = torch.where(probs > 0, logits / self.temperature, torch.tensor(float("-inf")))
        return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=self.gen))
