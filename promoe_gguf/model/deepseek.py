"""DeepSeek-MoE: `deepseek` (v1, deepseek-moe-16b) and `deepseek2` (V2/V2-Lite/V3, MLA attention).

Both: the first `leading_dense_block_count` layers use a dense FFN; the others add an ungated
shared expert to the routed experts. v1 attention is llama's (NORM RoPE).

DeepSeek2's multi-head latent attention, computed as llama.cpp computes it for each file layout:
    q        = attn_q h  (or attn_q_b(rms(attn_q_a h)))      [T, H, nope+rope]
    c, k_pe  = split(attn_kv_a_mqa h)                          [T, kv_lora], [T, rope]
    c        = rms(c) * attn_kv_a_norm;  q_pe, k_pe rotated (NORM), k_pe shared by all heads
  split attn_k_b / attn_v_b (current files): absorbed MLA, one latent KV head
    q'       = [attn_k_b[h] q_nope[h] | q_pe]                  [T, H, kv_lora+rope]
    K, V     = [c | k_pe], c                                   cached: [1, P, kv_lora+rope], [1, P, kv_lora]
    out[h]   = attn_v_b[h] attention(q', K, V)[h]              [T, H, dv]
  attn_kv_b (older files): decompressed MHA, k_nope and v per head from attn_kv_b c.
    scale    = mscale^2 / sqrt(nope+rope), mscale = 1 + yarn_log_multiplier * ln(factor) (1 without YaRN)
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import ModelError
from .common import Step
from .decoder import Decoder


class DeepSeek(Decoder):
    archs = ("deepseek", "deepseek2")

    def __init__(self, model, experts, backend):
        super().__init__(model, experts, backend)
        c = self.cfg
        if c.arch != "deepseek2":
            return
        if not c.kv_lora_rank:
            raise ModelError(f"{model.path}: deepseek2.attention.kv_lora_rank is missing (needed for MLA)")
        self.n_rot = c.rope.n_dims
        self.dk = int(c.extra.get("key_length_mla") or c.head_dim_k)    # nope + rope per head
        self.dv = int(c.extra.get("value_length_mla") or c.head_dim_v)
        self.nope = self.dk - self.n_rot
        self.absorbed = not model.has_tensor("blk.0.attn_kv_b.weight")
        # YaRN's magnitude goes into kq_scale (rope_spec cancels it in the rotation), in float32 as
        # llama.cpp 0.3.35's deepseek2 graph: the GGUF's yarn_log_multiplier is read / 0.1, then x 0.1
        f32, mscale = np.float32, np.float32(1.0)
        rs = self.rope
        if rs.ext_factor:
            lm = f32(c.rope.yarn_log_mul) / f32(0.1)
            inv = f32(1.0) / f32(rs.freq_scale)
            org = f32(rs.attn_factor) * (f32(1.0) + f32(0.1) * np.log(inv))
            mscale = org * (f32(1.0) + f32(0.1) * lm * np.log(inv))
        self.kq_scale = float(f32(1.0) * mscale * mscale / np.sqrt(f32(self.dk)))

    @classmethod
    def cache_dims(cls, model):
        """deepseek2 with attn_k_b/attn_v_b caches one latent head [c | k_pe] and c; with attn_kv_b,
        every head's decompressed k and v."""
        c = model.config
        if c.arch != "deepseek2":
            return super().cache_dims(model)
        if not model.has_tensor("blk.0.attn_kv_b.weight"):
            return (1, c.kv_lora_rank + c.rope.n_dims), (1, c.kv_lora_rank)
        dk = int(c.extra.get("key_length_mla") or c.head_dim_k)
        dv = int(c.extra.get("value_length_mla") or c.head_dim_v)
        return (c.n_head, dk), (c.n_head, dv)

    def attention(self, layer, h, step: Step):
        if self.cfg.arch == "deepseek2":
            return self.mla_attention(layer, h, step)
        return self.standard_attention(layer, *self.qkv(layer, h), step)

    def mla_attention(self, layer, h, step: Step):
        c, p, T, H, be = self.cfg, f"blk.{layer}.", h.shape[0], self.cfg.n_head, self.backend
        cache = step.cache
        if self.W.has(p + "attn_q.weight"):
            q = self.linear(h, p + "attn_q")
        else:
            q_a = be.rms_norm(self.linear(h, p + "attn_q_a"), self.W.vec(p + "attn_q_a_norm.weight"), c.rms_eps)
            q = self.linear(q_a, p + "attn_q_b")
        q = q.view(T, H, self.dk)
        kv_a = self.linear(h, p + "attn_kv_a_mqa")                             # [T, kv_lora + rope]
        c_kv = be.rms_norm(kv_a[:, :c.kv_lora_rank].contiguous(), self.W.vec(p + "attn_kv_a_norm.weight"), c.rms_eps)
        k_pe = be.rope(kv_a[:, None, c.kv_lora_rank:], self.rope, step)       # [T, 1, rope]
        q_pe = be.rope(q[..., self.nope:], self.rope, step)                     # [T, H, rope]
        if self.absorbed:
            q_abs = be.linear(q[..., :self.nope].transpose(0, 1), self.W.mat(p + "attn_k_b.weight"))  # [H, T, kv_lora]
            qq = torch.cat((q_abs.transpose(0, 1), q_pe), dim=-1)              # [T, H, kv_lora + rope]
            be.store_kv(cache, layer, torch.cat((c_kv, k_pe[:, 0]), -1)[:, None], c_kv[:, None], step)
            a = be.attention(qq, cache, layer, step, self.kq_scale).view(T, H, c.kv_lora_rank)
            a = be.linear(a.transpose(0, 1), self.W.mat(p + "attn_v_b.weight"))                   # [H, T, dv]
            return self.linear(a.transpose(0, 1).reshape(T, H * self.dv), p + "attn_output")
        kv = self.linear(c_kv, p + "attn_kv_b").view(T, H, self.nope + self.dv)
        k = torch.cat((kv[..., :self.nope], k_pe.expand(T, H, self.n_rot)), dim=-1)
        qq = torch.cat((q[..., :self.nope], q_pe), dim=-1)
        be.store_kv(cache, layer, k, kv[..., self.nope:], step)
        a = be.attention(qq, cache, layer, step, self.kq_scale)
        return self.linear(a, p + "attn_output")
