"""OLMoE (`olmoe`): RMS norm over the whole q and k projections (width H*Dk, before splitting into
heads), NEOX RoPE, softmax top-k without renormalization, no shared expert."""
from __future__ import annotations

from .common import rms_norm
from .decoder import Decoder


class OLMoE(Decoder):
    archs = ("olmoe",)

    def attention(self, layer, h, pos, cache):
        c, p, T = self.cfg, f"blk.{layer}.", h.shape[0]
        q = rms_norm(self.W.linear(h, p + "attn_q"), self.W(p + "attn_q_norm.weight"), c.rms_eps)
        k = rms_norm(self.W.linear(h, p + "attn_k"), self.W(p + "attn_k_norm.weight"), c.rms_eps)
        v = self.W.linear(h, p + "attn_v")
        q = q.view(T, c.n_head, c.head_dim_k)
        k = k.view(T, c.n_head_kv, c.head_dim_k)
        v = v.view(T, c.n_head_kv, c.head_dim_v)
        return self.standard_attention(layer, q, k, v, pos, cache)
