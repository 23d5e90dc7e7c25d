"""GLM-4-MoE: `glm4moe` (GLM-4.5, GLM-4.5-Air, GLM-4.6).

    h        = rms(x) * attn_norm
    q, k, v  = attn_q/k/v h + biases                      [T, H, D], [T, Hkv, D]
    q, k     = rms per head (attn_q_norm / attn_k_norm, GLM-4.5 only), then NEOX RoPE over the first
               rope.dimension_count dims of each head (half of it in the released models)
    x        = x + attn_output attention(q, k, v)
    h        = rms(x) * post_attention_norm                (the file's name for the FFN norm)
    x        = x + (layer < leading_dense_block_count ? dense SwiGLU FFN
                    : routed experts (sigmoid scores, exp_probs_b picks, weights normalized and scaled)
                      + the ungated shared expert)

The file's last nextn_predict_layers blocks are NextN (multi-token prediction) blocks: llama.cpp
loads them but does not run them, and neither do we (config.n_layers excludes them; their tensors
are never read).
"""
from __future__ import annotations

from .decoder import Decoder


class GLM4MoE(Decoder):
    archs = ("glm4moe",)

    def attention(self, layer, h, step):
        q, k, v = self.qkv(layer, h)
        q, k = self.qk_norm(layer, q, k)
        return self.standard_attention(layer, q, k, v, step)
