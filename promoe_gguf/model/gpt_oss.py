"""gpt-oss (gpt-oss-20b, gpt-oss-120b): `gpt-oss` in GGUF, llama.cpp's LLM_ARCH_OPENAI_MOE.

    h        = rms(x) * attn_norm
    q, k, v  = attn_q/k/v h + biases                       [T, H, D], [T, Hkv, D] (H*D != d: 64 x 64 vs 2880)
    q, k     = NEOX RoPE with YaRN
    a        = softmax over [q.k * D^-1/2 | sink_h] (one sink logit per head, attn_sinks, in the
               denominator only), within the last sliding_window positions on even layers
               (llama.cpp's set_swa_pattern(2)), over every position on odd ones
    x        = x + attn_output a + attn_output.bias
    h        = rms(x) * post_attention_norm
    logits   = ffn_gate_inp h + ffn_gate_inp.bias            [T, E]
    ids      = top-k(logits); w = softmax(logits[ids])       (softmax over the k chosen only)
    expert e = down_e(swiglu_oai(gate_e h + bg_e, up_e h + bu_e)) + bd_e, with
               swiglu_oai(g, u) = min(g, 7) * sigmoid(1.702 min(g, 7)) * (clamp(u, -7, 7) + 1)
    x        = x + sum_j w_j expert_{ids_j}(h)

The experts' biases stay resident (a row per expert id) while the experts' matrices go through the
expert seam like any other family's; the seam hands both to the backend (backends.ExpertFn).
"""
from __future__ import annotations

from ..backends import ExpertFn
from .decoder import Decoder


class GptOss(Decoder):
    archs = ("gpt-oss",)

    def __init__(self, model, experts, backend):
        super().__init__(model, experts, backend)
        for layer in self.cfg.moe_layers:
            p = f"blk.{layer}.ffn_"
            experts.set_fn(layer, ExpertFn("swiglu_oai", tuple(self.W.vec(f"{p}{m}_exps.bias") for m in ("gate", "up", "down"))))

    def attention(self, layer, h, step):
        q, k, v = self.qkv(layer, h)
        be, p = self.backend, f"blk.{layer}."
        q, k = be.rope_many((q, k), self.rope, step)
        be.store_kv(step.cache, layer, k, v, step)
        window = self.cfg.sliding_window if self.cfg.is_swa(layer) else 0
        a = be.attention(q, step.cache, layer, step, self.kq_scale, sinks=self.W.vec(p + "attn_sinks.weight"),
                         window=window)
        return self.linear(a, p + "attn_output", bias=True)

    def ffn(self, layer, h, step):
        p = f"blk.{layer}."
        be = self.backend
        logits = self.linear(h, p + "ffn_gate_inp", bias=True)                 # [T, E]
        self.numerics.check(logits, layer, "router")
        ids = logits.topk(self.cfg.n_experts_used, dim=-1).indices           # [T, k]
        w = be.softmax(logits.gather(1, ids))
        return self.experts(layer, h, ids, w, step, logits)
