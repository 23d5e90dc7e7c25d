"""The decoder skeleton every family shares: embed -> [attention -> FFN] x L -> logits.

A family file subclasses Decoder and writes `attention(layer, h, pos, cache)` and `ffn(layer, h)`;
the loop, residuals (with Granite's scales) and output head live here once.
"""
from __future__ import annotations

import math

import torch

from ..errors import ModelError
from ..numerics import OFF as NUMERICS_OFF
from .common import KVCache, Rope, Weights, attention, check_tokens, rms_norm, route, swiglu_ffn
from .experts import MoEExperts


class Decoder:
    archs: tuple[str, ...] = ()
    numerics = NUMERICS_OFF     # issue 13: non-finite checks per block (numerics.py); the Engine attaches one

    def __init__(self, model, experts: MoEExperts, device="cpu"):
        self.model, self.cfg, self.experts = model, model.config, experts
        self.device = torch.device(device)
        self.W = Weights(model, self.device)
        self.rope = Rope(self.cfg, self.device)
        c = self.cfg
        self.kq_scale = c.attention_scale or 1.0 / math.sqrt(c.head_dim_k)
        self.residual_scale = c.residual_scale or 1.0
        self._check_tensors()

    def _check_tensors(self) -> None:
        for name in ("token_embd.weight", "output_norm.weight"):
            self.model.tensor_ref(name)  # ModelError names a missing tensor
        for layer in range(self.cfg.n_layers):
            self.model.tensor_ref(f"blk.{layer}.attn_norm.weight")

    def new_cache(self, n_ctx: int) -> KVCache:
        return KVCache(self.cfg.n_layers, n_ctx, self.device)

    # ---- the pieces a family writes ------------------------------------------------------
    def attention(self, layer: int, h, pos, cache: KVCache):
        raise NotImplementedError

    def ffn(self, layer: int, h):
        """Routed experts plus the shared expert where the file has one (override for dense layers)."""
        out = self.routed_experts(layer, h)
        shared = self.shared_expert(layer, h)
        return out if shared is None else out + shared

    # ---- shared pieces -------------------------------------------------------------------
    def qkv(self, layer: int, h):
        """q [T, H, Dk], k [T, Hkv, Dk], v [T, Hkv, Dv] from attn_q/k/v (with biases if present)."""
        c, p, T = self.cfg, f"blk.{layer}.", h.shape[0]
        q = self.W.linear(h, p + "attn_q", bias=True).view(T, c.n_head, c.head_dim_k)
        k = self.W.linear(h, p + "attn_k", bias=True).view(T, c.n_head_kv, c.head_dim_k)
        v = self.W.linear(h, p + "attn_v", bias=True).view(T, c.n_head_kv, c.head_dim_v)
        return q, k, v

    def standard_attention(self, layer: int, q, k, v, pos, cache: KVCache):
        """q [T, H, Dk], k [T, Hkv, Dk], v [T, Hkv, Dv] before RoPE -> attn_output projection [T, d]."""
        q, k = self.rope(q, pos), self.rope(k, pos)
        K, V = cache.append(layer, k, v)
        a = attention(q, K, V, cache.n_past, self.kq_scale)
        return self.W.linear(a, f"blk.{layer}.attn_output")

    def routed_experts(self, layer: int, h):
        """Router -> top-k -> the expert seam. h [T, d] -> [T, d]."""
        p = f"blk.{layer}."
        logits = self.W.linear(h, p + "ffn_gate_inp")                     # [T, E]
        self.numerics.check(logits, layer, "router")                       # issue 13
        ids, w = route(logits, self.cfg, self.W(p + "exp_probs_b.bias", optional=True))
        return self.experts(layer, h, ids, w, logits)

    def shared_expert(self, layer: int, h):
        """Shared expert (no gate unless the file has ffn_gate_inp_shexp, as Qwen2-MoE)."""
        p = f"blk.{layer}.ffn"
        if not self.model.has_tensor(p + "_up_shexp.weight"):
            return None
        out = swiglu_ffn(self.W, h, p, suffix="_shexp")
        gate = self.W(p + "_gate_inp_shexp.weight", optional=True)
        if gate is not None:
            out = out * torch.sigmoid(h @ gate.reshape(-1, 1))               # [T, 1]
        self.numerics.check(out, layer, "shared expert")                   # issue 13
        return out

    # ---- the forward pass ----------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, tokens, cache: KVCache):
        """tokens [T] appended after cache.n_past -> logits [T, n_vocab] (float32)."""
        c = self.cfg
        tokens = check_tokens(tokens, c.n_vocab).to(self.device)
        T = tokens.numel()
        if cache.n_past + T > cache.n_ctx:
            raise ModelError(f"sequence of {cache.n_past + T} tokens is longer than the context ({cache.n_ctx})")
        pos = torch.arange(cache.n_past, cache.n_past + T, device=self.device)
        self.experts.begin_step(list(range(cache.n_past, cache.n_past + T)))
        x = self.W("token_embd.weight")[tokens]                                # [T, d]
        if c.embedding_scale:
            x = x * c.embedding_scale
        self.numerics.check(x, None, "the token embedding")                # issue 13: numerics checks
        for layer in range(c.n_layers):
            p = f"blk.{layer}."
            h = rms_norm(x, self.W(p + "attn_norm.weight"), c.rms_eps)
            x = x + self.attention(layer, h, pos, cache) * self.residual_scale
            self.numerics.check(x, layer, "attention")
            h = rms_norm(x, self.W(p + "ffn_norm.weight"), c.rms_eps)
            self.numerics.check(h, layer, "the feed-forward norm")
            x = x + self.ffn(layer, h) * self.residual_scale
            self.numerics.check(x, layer, "feed-forward")
        cache.n_past += T
        x = rms_norm(x, self.W("output_norm.weight"), c.rms_eps)
        head = self.W("output.weight", optional=True)
        logits = x @ (head if head is not None else self.W("token_embd.weight")).T
        if c.logit_scale:
            logits = logits / c.logit_scale
        self.numerics.logits(logits)                                       # issue 13: always on
        return logits
