"""Mixtral (GGUF arch `llama` with experts) and Granite-MoE (`granitemoe`: the same block with
embedding, residual, attention and logit scales, which Decoder applies from the config).

    h = rms_norm(x);  x += attn_output(attn(rope_norm(q h), rope_norm(k h), v h))
    h = rms_norm(x);  x += sum_top2 w_e * down_e(silu(gate_e h) * up_e h)  [+ shared expert]
"""
from __future__ import annotations

from .decoder import Decoder


class Mixtral(Decoder):
    archs = ("llama", "granitemoe")

    def attention(self, layer, h, step):
        return self.standard_attention(layer, *self.qkv(layer, h), step)
