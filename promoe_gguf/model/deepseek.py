"""DeepSeek-MoE: `deepseek` (v1, deepseek-moe-16b) and `deepseek2` (V2/V2-Lite/V3, MLA attention).

Both: the first `leading_dense_block_count` layers use a dense FFN; the others add an ungated
shared expert to the routed experts. v1 attention is llama's (NORM RoPE).

DeepSeek2's multi-head latent attention, computed in its "decompressed" (MHA) form:
    q        = attn_q h  (or attn_q_b(rms(attn_q_a h)))      [T, H, nope+rope]
    c, k_pe  = split(attn_kv_a_mqa h)                          [T, kv_lora], [T, rope]
    c        = rms(c) * attn_kv_a_norm
    k_nope,v = per head from attn_kv_b c  (or attn_k_b / attn_v_b, the absorbed-MLA tensors)
    q_pe, k_pe rotated (NORM), k_pe shared by all heads
    scale    = mscale^2 / sqrt(nope+rope), mscale = 1 + yarn_log_multiplier * ln(factor) (1 without YaRN)
"""
from __future__ import annotations

import math

import torch

from ..errors import ModelError
from .common import Rope, attention, rms_norm, swiglu_ffn
from .decoder import Decoder


class DeepSeek(Decoder):
    archs = ("deepseek", "deepseek2")

    def __init__(self, model, experts, device="cpu"):
        super().__init__(model, experts, device)
        c = self.cfg
        if c.arch != "deepseek2":
            return
        if not c.kv_lora_rank:
            raise ModelError(f"{model.path}: deepseek2.attention.kv_lora_rank is missing (needed for MLA)")
        self.rope = Rope(c, self.device, yarn_mscale_in_cos=False)     # magnitude goes into kq_scale
        self.n_rot = c.rope.n_dims
        self.dk = int(c.extra.get("key_length_mla") or c.head_dim_k)    # nope + rope per head
        self.dv = int(c.extra.get("value_length_mla") or c.head_dim_v)
        self.nope = self.dk - self.n_rot
        mscale = 1.0
        if c.rope.scaling == "yarn" and c.rope.factor != 1.0:
            # llama.cpp as vendored by llama-cpp-python 0.3.35 (checked against it: 9e-7); later
            # llama.cpp versions moved a factor 0.1 between this formula and the converter
            mscale = 1.0 + c.rope.yarn_log_mul * math.log(c.rope.factor)
        self.kq_scale = mscale * mscale / math.sqrt(self.dk)

    def attention(self, layer, h, pos, cache):
        if self.cfg.arch == "deepseek2":
            return self.mla_attention(layer, h, pos, cache)
        return self.standard_attention(layer, *self.qkv(layer, h), pos, cache)

    def _kv_heads(self, layer, c_kv):
        """Compressed kv [T, kv_lora] -> k_nope [T, H, nope], v [T, H, dv]."""
        p, H, T = f"blk.{layer}.", self.cfg.n_head, c_kv.shape[0]
        if self.model.has_tensor(p + "attn_kv_b.weight"):
            kv = self.W.linear(c_kv, p + "attn_kv_b").view(T, H, self.nope + self.dv)
            return kv[..., :self.nope], kv[..., self.nope:]
        k_b = self.W(p + "attn_k_b.weight")                                  # [H, kv_lora, nope]
        v_b = self.W(p + "attn_v_b.weight")                                  # [H, dv, kv_lora]
        return torch.einsum("tc,hcn->thn", c_kv, k_b), torch.einsum("tc,hvc->thv", c_kv, v_b)

    def mla_attention(self, layer, h, pos, cache):
        c, p, T, H = self.cfg, f"blk.{layer}.", h.shape[0], self.cfg.n_head
        if self.model.has_tensor(p + "attn_q.weight"):
            q = self.W.linear(h, p + "attn_q")
        else:
            q_a = rms_norm(self.W.linear(h, p + "attn_q_a"), self.W(p + "attn_q_a_norm.weight"), c.rms_eps)
            q = self.W.linear(q_a, p + "attn_q_b")
        q = q.view(T, H, self.dk)
        kv_a = self.W.linear(h, p + "attn_kv_a_mqa")                          # [T, kv_lora + rope]
        c_kv = rms_norm(kv_a[:, :c.kv_lora_rank], self.W(p + "attn_kv_a_norm.weight"), c.rms_eps)
        k_pe = self.rope(kv_a[:, None, c.kv_lora_rank:], pos)                # [T, 1, rope]
        q_pe = self.rope(q[..., self.nope:], pos)
        k_nope, v = self._kv_heads(layer, c_kv)
        q = torch.cat((q[..., :self.nope], q_pe), dim=-1)
        k = torch.cat((k_nope, k_pe.expand(T, H, self.n_rot)), dim=-1)
        K, V = cache.append(layer, k, v)
        a = attention(q, K, V, cache.n_past, self.kq_scale)
        return self.W.linear(a, p + "attn_output")

    def ffn(self, layer, h):
        if layer < self.cfg.n_leading_dense:
            return swiglu_ffn(self.W, h, f"blk.{layer}.ffn")
        return super().ffn(layer, h)
