"""OLMoE (`olmoe`): RMS norm over the whole q and k projections (width H*Dk, before splitting into
heads), NEOX RoPE, softmax top-k without renormalization, no shared expert."""
from __future__ import annotations

from .decoder import Decoder


class OLMoE(Decoder):
    archs = ("olmoe",)

    def attention(self, layer, h, step):
        c, p, T, be = self.cfg, f"blk.{layer}.", h.shape[0], self.backend
        q = be.rms_norm(self.linear(h, p + "attn_q"), self.W.vec(p + "attn_q_norm.weight"), c.rms_eps)
        k = be.rms_norm(self.linear(h, p + "attn_k"), self.W.vec(p + "attn_k_norm.weight"), c.rms_eps)
        v = self.linear(h, p + "attn_v")
        q = q.view(T, c.n_head, c.head_dim_k)
        k = k.view(T, c.n_head_kv, c.head_dim_k)
        v = v.view(T, c.n_head_kv, c.head_dim_v)
        return self.standard_attention(layer, q, k, v, step)
