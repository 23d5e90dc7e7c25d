"""Qwen3.5 / Qwen3.6 MoE (`qwen35moe`, llama.cpp's LLM_ARCH_QWEN35MOE): gated linear attention in three
layers of four, gated full attention in the fourth, routed experts plus a gated shared expert in all.

Gated delta net (layer L with (L + 1) % full_attention_interval != 0), per token t, v head h:
    qkv      = attn_qkv h                                   [T, C], C = 2 Hk S + Hv S
    z        = attn_gate h                                  [T, Hv S]
    x        = silu(causal conv of qkv, ssm_conv1d [C, K])  (the state keeps the last K-1 inputs)
    q, k, v  = x split [Hk, S] | [Hk, S] | [Hv, S];  q, k = l2_norm(q), l2_norm(k)
               (v head h reads q/k head h mod Hk: ggml's tiled broadcast)
    g        = softplus(ssm_alpha h + ssm_dt.bias) * ssm_a  (a log decay, ssm_a = -exp(A_log) < 0)
    beta     = sigmoid(ssm_beta h)
    S_h      = exp(g) S_h;  S_h += beta (v - S_h k) k^T;  o_h = S_h q / sqrt(S)   (S_h: [S x S], the state)
    out      = ssm_out (rms(o_h) * ssm_norm * silu(z_h))
Gated attention (the other layers):
    [q | gate] = attn_q h per head [T, H, 2 D];  k, v = attn_k h, attn_v h
    q, k       = per-head RMS norm, multi-section RoPE (text: t = h = w = the position)
    out        = attn_output (attention(q, k, v) * sigmoid(gate))
FFN: softmax router, top-k renormalized, SwiGLU experts; + sigmoid(ffn_gate_inp_shexp . h) * shared(h).
The recurrent state lives beside the KV cache (common.RecurrentState), which keeps K and V only for
the attention layers.
"""
from __future__ import annotations

from ..backends import DeltaNet
from .decoder import Decoder


class Qwen35MoE(Decoder):
    archs = ("qwen35moe",)

    def __init__(self, model, experts, backend):
        super().__init__(model, experts, backend)
        la, W = self.cfg.linear_attention, self.W
        self.nets = {layer: DeltaNet(conv=W.vec(f"blk.{layer}.ssm_conv1d.weight"), dt_bias=W.vec(f"blk.{layer}.ssm_dt.bias"),
                                     a=W.vec(f"blk.{layer}.ssm_a"), norm=W.vec(f"blk.{layer}.ssm_norm.weight"),
                                     k_heads=la.k_heads, v_heads=la.v_heads, head=la.state_size, eps=self.cfg.rms_eps)
                     for layer in range(self.cfg.n_layers) if self.cfg.is_recurrent(layer)}

    def attention(self, layer, h, step):
        if layer in self.nets:
            return self.linear_attention(layer, h, step)
        return self.gated_attention(layer, h, step)

    def linear_attention(self, layer, h, step):
        p, W = f"blk.{layer}.", self.W
        qkv, z, beta, alpha = self.backend.linears(h, [W.mat(p + n) for n in (
            "attn_qkv.weight", "attn_gate.weight", "ssm_beta.weight", "ssm_alpha.weight")])   # [T, C] [T, Hv S] [T, Hv] x2
        state = step.cache.recurrent
        o = self.backend.delta_net(qkv, z, beta, alpha, self.nets[layer], state.conv[layer], state.ssm[layer])
        return self.linear(o, p + "ssm_out")                                  # [T, Hv S] -> [T, d]

    def gated_attention(self, layer, h, step):
        c, p, T, W = self.cfg, f"blk.{layer}.", h.shape[0], self.W
        H, Hkv, D = c.n_head, c.n_head_kv, c.head_dim_k
        qg, k, v = self.backend.linears(h, [W.mat(p + n + ".weight") for n in ("attn_q", "attn_k", "attn_v")])
        qg = qg.view(T, H, 2 * D)
        q, gate = qg[..., :D], qg[..., D:].reshape(T, H * D)                  # [T, H, D], [T, H D]
        q, k = self.qk_norm(layer, q.contiguous(), k.view(T, Hkv, D))
        a = self.standard_attention_core(layer, q, k, v.view(T, Hkv, c.head_dim_v), step)
        return self.linear(a * self.backend.sigmoid(gate), p + "attn_output")
