"""Mixtral (GGUF arch `llama` with experts) and Granite-MoE (`granitemoe`: the same block with
embedding, residual, attention and logit scales, which Decoder applies from the config).

    h = rms_norm(x);  x += attn_output(attn(rope_norm(q h), rope_norm(k h), v h))
    h = rms_norm(x);  x += sum_top2 w_e * down_e(silu(gate_e h) * up_e h)  [+ shared expert]
"""
from __future__ import annotations

from .decoder import Decoder


class Mixtral(Decoder):
    archs = ("llama", "granitemoe")

    def attention(self, layer, h, pos, cache):
        c, p, T = self.cfg, f"blk.{layer}.", h.shape[0]
        q = self.W.linear(h, p + "attn_q", bias=True).view(T, c.n_head, c.head_dim_k)
        k = self.W.linear(h, p + "attn_k", bias=True).view(T, c.n_head_kv, c.head_dim_k)
        v = self.W.linear(h, p + "attn_v", bias=True).view(T, c.n_head_kv, c.head_dim_v)
        return self.standard_attention(layer, q, k, v, pos, cache)

    def ffn(self, layer, h):
        out = self.routed_experts(layer, h)
        shared = self.shared_expert(layer, h)
        return out if shared is None else out + shared
