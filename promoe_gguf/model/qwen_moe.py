"""Qwen-MoE: `qwen2moe` (q/k/v biases; a shared expert gated by sigmoid(ffn_gate_inp_shexp . h))
and `qwen3moe` (no biases; RMS norm of each q and k head before RoPE; head dim = key_length).
Both rotate with NEOX RoPE (halves). Qwen3-MoE renormalizes top-k weights (config.norm_topk)."""
from __future__ import annotations

from .decoder import Decoder


class QwenMoE(Decoder):
    archs = ("qwen2moe", "qwen3moe")

    def attention(self, layer, h, step):
        q, k, v = self.qkv(layer, h)
        q, k = self.qk_norm(layer, q, k)                                   # qwen3moe
        return self.standard_attention(layer, q, k, v, step)
