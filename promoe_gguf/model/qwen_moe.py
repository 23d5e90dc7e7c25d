"""Qwen-MoE: `qwen2moe` (q/k/v biases; a shared expert gated by sigmoid(ffn_gate_inp_shexp . h))
and `qwen3moe` (no biases; RMS norm of each q and k head before RoPE; head dim = key_length).
Both rotate with NEOX RoPE (halves). Qwen3-MoE renormalizes top-k weights (config.norm_topk)."""
from __future__ import annotations

from .decoder import Decoder


class QwenMoE(Decoder):
    archs = ("qwen2moe", "qwen3moe")

    def attention(self, layer, h, step):
        c, p = self.cfg, f"blk.{layer}."
        q, k, v = self.qkv(layer, h)
        q_norm = self.W.vec(p + "attn_q_norm.weight", optional=True)        # [Dk], per head (qwen3moe)
        if q_norm is not None:
            q = self.backend.rms_norm(q, q_norm, c.rms_eps)
            k = self.backend.rms_norm(k, self.W.vec(p + "attn_k_norm.weight"), c.rms_eps)
        return self.standard_attention(layer, q, k, v, step)
