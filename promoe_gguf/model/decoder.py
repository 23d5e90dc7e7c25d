"""The decoder skeleton every family shares: embed -> [attention -> FFN] x L -> logits.

A family file subclasses Decoder and writes `attention(layer, h, step)` and, where it differs,
`ffn(layer, h, step)`; the loop, residuals (with Granite's scales) and output head live here once.
Every matrix product goes through the backend (`self.linear`), which computes on the weights in
their GGUF encoding; the residual add and the next norm are one backend call (`add_rms_norm`).

`run(tokens, step)` is the step itself, device work only: token ids and positions are device
tensors and nothing in it reads the device on the host (the expert seam hands control to the host
through `step.driver`), so a decode step can be recorded once as device graphs and replayed
(model/decode.py). `forward(tokens, cache)` wraps it with the host's checks and bookkeeping.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import ModelError
from ..format.shape_rules import ffn_norm_name
from ..numerics import OFF as NUMERICS_OFF
from .common import EagerDriver, KVCache, ResidentWeights, Step, check_tokens, rope_spec, route
from .experts import MoEExperts


class Decoder:
    archs: tuple[str, ...] = ()
    numerics = NUMERICS_OFF     # non-finite checks per block (numerics.py); the Engine attaches one

    def __init__(self, model, experts: MoEExperts, backend):
        self.model, self.cfg, self.experts, self.backend = model, model.config, experts, backend
        self.device = backend.device
        self._check_tensors()
        self.W = ResidentWeights(model, backend)
        self.rope = rope_spec(self.cfg)
        self.ffn_norms = [ffn_norm_name(self.cfg, layer) for layer in range(self.cfg.n_layers)]
        c, f32 = self.cfg, np.float32
        # scales in float32, as llama.cpp computes them
        self.kq_scale = float(f32(c.attention_scale)) if c.attention_scale else float(f32(1.0) / np.sqrt(f32(c.head_dim_k)))
        self.residual_scale = float(f32(c.residual_scale)) if c.residual_scale else 1.0

    def _check_tensors(self) -> None:
        for name in ("token_embd.weight", "output_norm.weight"):
            self.model.tensor_ref(name)  # ModelError names a missing tensor
        for layer in range(self.cfg.n_layers):
            self.model.tensor_ref(f"blk.{layer}.attn_norm.weight")

    # ---- KV cache ----------------------------------------------------------------------------
    @classmethod
    def cache_dims(cls, model) -> tuple[tuple[int, int], tuple[int, int]]:
        """(Hkv, Dk), (Hkv, Dv) of one position of one layer's KV cache."""
        c = model.config
        return (c.n_head_kv, c.head_dim_k), (c.n_head_kv, c.head_dim_v)

    def new_cache(self, n_ctx: int) -> KVCache:
        c = self.cfg
        return KVCache(c.n_layers, n_ctx, *self.cache_dims(self.model), self.device, self.backend.kv_layout,
                       layers=c.attention_layers, linear=c.linear_attention)

    # ---- the pieces a family writes ------------------------------------------------------
    def attention(self, layer: int, h, step: Step):
        raise NotImplementedError

    def ffn(self, layer: int, h, step: Step):
        """A leading dense layer's FFN, else the routed experts plus the shared expert where the file has one."""
        if layer < self.cfg.n_leading_dense:
            return self.swiglu_ffn(h, f"blk.{layer}.ffn")
        out = self.routed_experts(layer, h, step)
        shared = self.shared_expert(layer, h)
        return out if shared is None else out + shared

    # ---- shared pieces -------------------------------------------------------------------
    def linear(self, x, name: str, bias: bool = False):
        """x [T, in] @ W[out, in]^T (+ b) for the resident matrix `name`.weight."""
        y = self.backend.linear(x, self.W.mat(name + ".weight"))
        if bias:
            b = self.W.vec(name + ".bias", optional=True)
            if b is not None:
                y = y + b
        return y

    def swiglu_ffn(self, h, prefix: str, suffix: str = ""):
        """down(silu(gate h) * up h) over `{prefix}_gate{suffix}.weight` etc. (dense or shared expert)."""
        W = self.W
        return self.backend.ffn(h, W.mat(f"{prefix}_gate{suffix}.weight"), W.mat(f"{prefix}_up{suffix}.weight"),
                                W.mat(f"{prefix}_down{suffix}.weight"))

    def qkv(self, layer: int, h):
        """q [T, H, Dk], k [T, Hkv, Dk], v [T, Hkv, Dv] from attn_q/k/v (with biases if present), in one call."""
        c, p, T, W = self.cfg, f"blk.{layer}.", h.shape[0], self.W
        names = (p + "attn_q", p + "attn_k", p + "attn_v")
        outs = self.backend.linears(h, [W.mat(n + ".weight") for n in names])
        q, k, v = (y if (b := W.vec(n + ".bias", optional=True)) is None else y + b for y, n in zip(outs, names))
        return q.view(T, c.n_head, c.head_dim_k), k.view(T, c.n_head_kv, c.head_dim_k), v.view(T, c.n_head_kv, c.head_dim_v)

    def qk_norm(self, layer: int, q, k):
        """RMS norm of each q and k head where the file has attn_q_norm / attn_k_norm [Dk] (Qwen3, GLM-4.5)."""
        p = f"blk.{layer}."
        q_norm = self.W.vec(p + "attn_q_norm.weight", optional=True)
        if q_norm is None:
            return q, k
        eps = self.cfg.rms_eps
        return (self.backend.rms_norm(q, q_norm, eps),
                self.backend.rms_norm(k, self.W.vec(p + "attn_k_norm.weight"), eps))

    def standard_attention(self, layer: int, q, k, v, step: Step):
        """q [T, H, Dk], k [T, Hkv, Dk], v [T, Hkv, Dv] before RoPE -> attn_output projection [T, d]."""
        return self.linear(self.standard_attention_core(layer, q, k, v, step), f"blk.{layer}.attn_output")

    def standard_attention_core(self, layer: int, q, k, v, step: Step):
        """RoPE, the KV cache and attention: q [T, H, Dk], k, v [T, Hkv, D] -> [T, H * Dv]."""
        be = self.backend
        q, k = be.rope_many((q, k), self.rope, step)
        be.store_kv(step.cache, layer, k, v, step)
        return be.attention(q, step.cache, layer, step, self.kq_scale)

    def routed_experts(self, layer: int, h, step: Step):
        """Router -> top-k (on the device) -> the expert seam. h [T, d] -> [T, d]."""
        p = f"blk.{layer}."
        logits, probs = self.backend.router(h, self.W.mat(p + "ffn_gate_inp.weight"), self.cfg.gating)   # [T, E]
        self.numerics.check(logits, layer, "router")
        ids, w = route(probs, self.cfg, self.W.vec(p + "exp_probs_b.bias", optional=True))
        return self.experts(layer, h, ids, w, step, logits)

    def shared_expert(self, layer: int, h):
        """Shared expert (no gate unless the file has ffn_gate_inp_shexp, as Qwen2-MoE)."""
        p = f"blk.{layer}.ffn"
        if not self.W.has(p + "_up_shexp.weight"):
            return None
        out = self.swiglu_ffn(h, p, suffix="_shexp")
        if self.W.has(p + "_gate_inp_shexp.weight"):                     # a [1, d] row: one gate per token
            out = out * self.backend.sigmoid(self.linear(h, p + "_gate_inp_shexp"))
        self.numerics.check(out, layer, "shared expert")
        return out

    def _attention_block(self, layer: int, h, step: Step):
        """The family's attention over the step, in the backend's prefill chunks when the step is
        longer (the chunks in order, each seeing the ones before it in the cache)."""
        n, T = self.backend.prefill_chunk, h.shape[0]
        if not n or T <= n or step.n_past is None:
            return self.attention(layer, h, step)
        return torch.cat([self.attention(layer, h[lo:lo + n], step.part(lo, min(n, T - lo))) for lo in range(0, T, n)])

    # ---- the forward pass ----------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, tokens, cache: KVCache, last_only: bool = False):
        """tokens [T] appended after cache.n_past -> logits [T, n_vocab] (float32); with last_only, of
        the last position alone [1, n_vocab] (what generation reads, as llama.cpp computes it)."""
        c, be = self.cfg, self.backend
        tokens = check_tokens(tokens, c.n_vocab)
        T = tokens.numel()
        if cache.n_past + T > cache.n_ctx:
            raise ModelError(f"sequence of {cache.n_past + T} tokens is longer than the context ({cache.n_ctx})")
        step = Step(be.positions(cache.n_past, T), cache.n_past, cache, EagerDriver(be), be.causal_mask(cache.n_past, T))
        self.experts.begin_step(list(range(cache.n_past, cache.n_past + T)))
        logits = self.run(tokens.to(device=self.device, dtype=torch.int32), step, last_only)
        cache.n_past += T
        self.numerics.logits(logits)                                       # always on
        return logits

    def run(self, tokens, step: Step, last_only: bool = False):
        """The step's device work: token ids [T] int32 on the device -> logits ([T] or [1], n_vocab)."""
        c, be, W = self.cfg, self.backend, self.W
        be.prepare(step, self.rope)
        x = be.embed(tokens, W.mat("token_embd.weight"))                   # [T, d]
        if c.embedding_scale:
            x = x * float(np.float32(c.embedding_scale))
        self.numerics.check(x, None, "the token embedding")
        h = be.rms_norm(x, W.vec("blk.0.attn_norm.weight"), c.rms_eps)
        for layer in range(c.n_layers):
            x, h = be.add_rms_norm(x, self._attention_block(layer, h, step), W.vec(self.ffn_norms[layer]), c.rms_eps,
                                   self.residual_scale)
            self.numerics.check(x, layer, "attention")
            self.numerics.check(h, layer, "the feed-forward norm")
            nxt = f"blk.{layer + 1}.attn_norm.weight" if layer + 1 < c.n_layers else "output_norm.weight"
            x, h = be.add_rms_norm(x, self.ffn(layer, h, step), W.vec(nxt), c.rms_eps, self.residual_scale)
            self.numerics.check(x, layer, "feed-forward")
        if last_only:
            h = h[-1:]
        head = W.mat("output.weight", optional=True) or W.mat("token_embd.weight")
        logits = be.linear(h, head)
        if c.logit_scale:
            logits = logits * float(np.float32(1.0) / np.float32(c.logit_scale))    # ggml_scale(1/s)
        return logits
