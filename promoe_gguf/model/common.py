"""Building blocks shared by the model families, each computing what llama.cpp computes.

Shapes: T = tokens in this step, P = positions in the KV cache so far + T, d = n_embd,
H = query heads, Hkv = kv heads, Dk/Dv = head dims, E = experts, k = experts per token.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import ModelError


class Weights:
    """Resident tensors of one model, dequantized to float32 once, on `device`."""

    def __init__(self, model, device):
        self.model, self.device, self._cache = model, device, {}

    def __call__(self, name: str, optional: bool = False):
        if name not in self._cache:
            if optional and not self.model.has_tensor(name):
                return None
            arr = self.model.tensor_f32(name)                   # numpy order: [out, in] for matrices
            self._cache[name] = torch.from_numpy(arr).to(self.device)
        return self._cache[name]

    def linear(self, x, name: str, bias: bool = False):
        """x [T, in] @ W[out, in]^T (+ b)."""
        y = x @ self(name + ".weight").T
        if bias:
            b = self(name + ".bias", optional=True)
            if b is not None:
                y = y + b
        return y


def rms_norm(x, w, eps: float):
    """x [..., n] normalized over the last dim, times w [n] (ggml_rms_norm then mul)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def silu(x):
    return F.silu(x)


class Rope:
    """Rotary embedding as llama.cpp applies it: NORM rotates adjacent pairs, NEOX the two halves.

    Only the first `n_dims` dims of each head rotate. Linear scaling divides positions by the
    factor; YaRN blends interpolated and extrapolated frequencies per pair (ggml's rope_yarn).
    """

    def __init__(self, cfg, device, yarn_mscale_in_cos: bool = True):
        r = cfg.rope
        self.kind, self.n_dims = r.kind, r.n_dims
        i = torch.arange(0, r.n_dims, 2, dtype=torch.float64)
        theta = r.base ** (-i / r.n_dims)                     # [n_dims/2] extrapolation frequencies
        self.mscale = 1.0
        if r.scaling == "linear":
            theta = theta / r.factor
        elif r.scaling == "yarn" and r.factor != 1.0:
            freq_scale = 1.0 / r.factor
            orig = r.orig_ctx or cfg.n_ctx_train

            def corr_dim(beta):
                return r.n_dims * math.log(orig / (beta * 2 * math.pi)) / (2 * math.log(r.base))
            low = max(0.0, math.floor(corr_dim(32.0)))
            high = min(r.n_dims - 1.0, math.ceil(corr_dim(1.0)))
            ramp = 1 - ((i / 2 - low) / max(0.001, high - low)).clamp(0, 1)
            theta = theta * freq_scale * (1 - ramp) + theta * ramp
            if yarn_mscale_in_cos:
                self.mscale = 1.0 + 0.1 * math.log(1.0 / freq_scale)
        elif r.scaling not in ("none", "yarn", "linear"):
            raise ModelError(f"rope scaling {r.scaling!r} is not supported")
        self.theta = theta.to(device)

    def __call__(self, x, pos):
        """x [T, heads, D], pos [T] -> rotated copy."""
        ang = pos.to(torch.float64)[:, None] * self.theta[None, :]          # [T, n_dims/2]
        cos = (torch.cos(ang) * self.mscale).to(x.dtype)[:, None, :]
        sin = (torch.sin(ang) * self.mscale).to(x.dtype)[:, None, :]
        rot, rest = x[..., :self.n_dims], x[..., self.n_dims:]
        if self.kind == "norm":
            a, b = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
        else:
            half = self.n_dims // 2
            a, b = rot[..., :half], rot[..., half:]
            out = torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)
        return torch.cat((out, rest), dim=-1)


class KVCache:
    """Per-layer K [P, Hkv, Dk] and V [P, Hkv, Dv], grown in place up to `n_ctx` positions."""

    def __init__(self, n_layers: int, n_ctx: int, device, dtype=torch.float32):
        self.n_ctx, self.device, self.dtype = n_ctx, device, dtype
        self.k: list = [None] * n_layers
        self.v: list = [None] * n_layers
        self.n_past = 0

    def append(self, layer: int, k, v):
        """Store this step's k/v at positions n_past..n_past+T; return all keys/values so far."""
        T = k.shape[0]
        end = self.n_past + T
        if end > self.n_ctx:
            raise ModelError(f"context of {end} tokens exceeds the KV cache's {self.n_ctx}")
        if self.k[layer] is None:
            self.k[layer] = torch.empty((self.n_ctx, *k.shape[1:]), dtype=self.dtype, device=self.device)
            self.v[layer] = torch.empty((self.n_ctx, *v.shape[1:]), dtype=self.dtype, device=self.device)
        self.k[layer][self.n_past:end] = k
        self.v[layer][self.n_past:end] = v
        return self.k[layer][:end], self.v[layer][:end]


def attention(q, k, v, n_past: int, scale: float):
    """Causal attention. q [T, H, Dk]; k [P, Hkv, Dk]; v [P, Hkv, Dv] -> [T, H*Dv]."""
    T, H, _ = q.shape
    P, Hkv, Dv = v.shape
    rep = H // Hkv
    k = k.repeat_interleave(rep, dim=1) if rep > 1 else k
    v = v.repeat_interleave(rep, dim=1) if rep > 1 else v
    scores = torch.einsum("thd,phd->htp", q, k) * scale                    # [H, T, P]
    qpos = torch.arange(n_past, n_past + T, device=q.device)[:, None]
    kpos = torch.arange(P, device=q.device)[None, :]
    scores = scores.masked_fill(kpos > qpos, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("htp,phd->thd", probs, v).reshape(T, H * Dv)


def route(logits, cfg, bias=None):
    """Router logits [T, E] -> (ids [T, k] long, weights [T, k] float32), as llama.cpp's build_moe_ffn."""
    probs = torch.sigmoid(logits) if cfg.gating == "sigmoid" else torch.softmax(logits, dim=-1)
    select = probs if bias is None else probs + bias
    if cfg.n_expert_groups > 1:
        T, E = select.shape
        groups = select.view(T, cfg.n_expert_groups, E // cfg.n_expert_groups)
        score = groups.topk(2, dim=-1).values.sum(-1)                       # [T, G]: top-2 sum per group
        keep = score.topk(cfg.n_group_used, dim=-1).indices
        mask = torch.full_like(score, float("-inf")).scatter(1, keep, 0.0)
        select = (groups + mask[..., None]).view(T, E)
    ids = select.topk(cfg.n_experts_used, dim=-1).indices
    w = probs.gather(1, ids)
    if cfg.norm_topk:
        w = w / w.sum(-1, keepdim=True).clamp(min=6.103515625e-5)
    if cfg.weights_scale not in (0.0, 1.0):
        w = w * cfg.weights_scale
    return ids, w


def swiglu_ffn(W: Weights, x, prefix: str, suffix: str = ""):
    """down(silu(gate x) * up x) over `{prefix}_gate{suffix}.weight` etc. (dense or shared expert)."""
    g = W.linear(x, f"{prefix}_gate{suffix}")
    return W.linear(silu(g) * W.linear(x, f"{prefix}_up{suffix}"), f"{prefix}_down{suffix}")


def check_tokens(tokens, n_vocab: int):
    t = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    if t.numel() == 0:
        raise ModelError("empty token sequence")
    bad = ((t < 0) | (t >= n_vocab)).nonzero()
    if len(bad):
        i = int(bad[0, 0])
        raise ModelError(f"token id {int(t[i])} at position {i} is out of range (vocabulary {n_vocab})")
    return t
