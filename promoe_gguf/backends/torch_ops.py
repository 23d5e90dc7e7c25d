"""The non-matmul ops of the forward pass in plain torch: RoPE, attention, softmax, norms.

The CUDA backend runs these (few launches each: RoPE tables are built once per step; attention is
one SDPA call over the cache's views). The CPU backend computes the same ops with ggml instead, so
its results follow llama.cpp's arithmetic bit for bit; these stay within float rounding of it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class RopeSpec:
    """RoPE as ggml_rope_ext takes it: rotate the first n_dims of each head, NORM (adjacent pairs)
    or NEOX (halves); YaRN when ext_factor != 0 (cos/sin scaled by attn_factor * (1 + 0.1 ln(1/freq_scale))).
    IMROPE (ggml_rope_multi, interleaved sections, NEOX halves) over text: the t, h and w positions
    are the token's, the e position 0, so pairs of the e section do not rotate."""
    kind: str                # "norm" | "neox" | "imrope"
    n_dims: int
    base: float
    freq_scale: float = 1.0
    ext_factor: float = 0.0
    attn_factor: float = 1.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    n_ctx_orig: int = 0
    sections: tuple = ()     # imrope: pairs per t/h/w/e section

    @property
    def mode(self) -> int:
        return {"norm": 0, "neox": 2, "imrope": 40}[self.kind]     # GGML_ROPE_TYPE_NORMAL / NEOX / IMROPE

    def rotating_pairs(self) -> torch.Tensor:
        """[n_dims/2] 1.0 where a pair turns with the token's position, 0.0 for imrope's e section
        (ggml's sector rule: pair j's sector j mod sum(sections), interleaved t, h, w by sector mod 3)."""
        n = self.n_dims // 2
        if self.kind != "imrope":
            return torch.ones(n, dtype=torch.float64)
        t, h, w, _ = self.sections
        sector = torch.arange(n) % max(1, sum(self.sections))
        r = sector % 3
        turns = ((r == 0) & (sector < 3 * t)) | ((r == 1) & (sector < 3 * h)) | ((r == 2) & (sector < 3 * w))
        return turns.double()

    def theta(self, device) -> tuple[torch.Tensor, float]:
        """Per-pair frequencies [n_dims/2] (float64; 0 for a pair that does not turn) and the cos/sin
        magnitude, as ggml's rope_yarn."""
        n = self.n_dims
        i = torch.arange(0, n, 2, dtype=torch.float64)
        theta = self.base ** (-i / n)
        mscale = self.attn_factor
        if self.ext_factor != 0.0:
            def corr_dim(beta):
                return n * math.log(self.n_ctx_orig / (beta * 2 * math.pi)) / (2 * math.log(self.base))
            low = max(0.0, math.floor(corr_dim(self.beta_fast)))
            high = min(n - 1.0, math.ceil(corr_dim(self.beta_slow)))
            ramp = (1 - ((i / 2 - low) / max(0.001, high - low)).clamp(0, 1)) * self.ext_factor
            theta = theta * self.freq_scale * (1 - ramp) + theta * ramp
            mscale *= 1.0 + 0.1 * math.log(1.0 / self.freq_scale)
        else:
            theta = theta * self.freq_scale
        return (theta * self.rotating_pairs()).to(device), mscale


def rope_tables(spec: RopeSpec, pos: torch.Tensor):
    """Per-step tables for positions pos [T]: NORM -> complex cis [T, 1, n/2];
    NEOX -> (cos [T, 1, n], sin with the first half negated [T, 1, n])."""
    theta, mscale = spec.theta(pos.device)
    ang = pos.to(torch.float64)[:, None] * theta[None, :]                # [T, n_dims/2]
    cos = (torch.cos(ang) * mscale).float()[:, None, :]
    sin = (torch.sin(ang) * mscale).float()[:, None, :]
    if spec.kind == "norm":
        return torch.complex(cos, sin)
    return torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)


def rope(x: torch.Tensor, spec: RopeSpec, tables) -> torch.Tensor:
    """x [T, heads, D] -> rotated copy (the first n_dims of each head)."""
    n = spec.n_dims
    rot = x[..., :n] if n < x.shape[-1] else x
    if spec.kind == "norm":                      # (a + ib)(cos + i sin), pairs (2j, 2j+1)
        pairs = rot.reshape(*rot.shape[:-1], n // 2, 2)
        if pairs.stride(-1) != 1 or pairs.storage_offset() % 2:
            pairs = pairs.contiguous()
        out = torch.view_as_real(torch.view_as_complex(pairs) * tables).flatten(-2)
    else:                                        # halves: a cos - b sin | b cos + a sin
        cos, sin_signed = tables
        out = rot * cos + rot.roll(n // 2, dims=-1) * sin_signed
    return out if n == x.shape[-1] else torch.cat((out, x[..., n:]), dim=-1)


def causal_mask(n_past: int, T: int, device) -> torch.Tensor | None:
    """[T, n_past + T], True where attention is allowed; None for one token (it sees everything)."""
    if T == 1:
        return None
    qpos = torch.arange(n_past, n_past + T, device=device)[:, None]
    return torch.arange(n_past + T, device=device)[None, :] <= qpos


def attention(q, K, V, mask, scale: float) -> torch.Tensor:
    """q [T, H, Dk]; K [Hkv, P, Dk]; V [Hkv, P, Dv] -> [T, H*Dv]; grouped-query heads share K/V
    without copies (SDPA's enable_gqa)."""
    T, H, _ = q.shape
    Hkv, Dv = K.shape[0], V.shape[-1]
    o = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), K.unsqueeze(0), V.unsqueeze(0),
                                       attn_mask=mask, scale=scale, enable_gqa=H != Hkv)   # [1, H, T, Dv]
    return o[0].transpose(0, 1).reshape(T, H * Dv)


def attention_sinks(q, K, V, pos: torch.Tensor, scale: float, sinks: torch.Tensor | None, window: int) -> torch.Tensor:
    """gpt-oss's attention: q [T, H, Dk] at positions pos [T] (on the device) against K [Hkv, P, Dk],
    V [Hkv, P, Dv] -> [T, H*Dv]; key j is seen where j <= pos and, with a window, pos - j < window; a
    sink logit per head [H] joins each softmax's denominator. Masks from device values only, so a
    recorded step holds it."""
    T, H, _ = q.shape
    Hkv, P, Dv = K.shape[0], K.shape[1], V.shape[-1]
    g = H // Hkv
    qh = q.float().transpose(0, 1).reshape(Hkv, g * T, -1)                       # [Hkv, g*T, Dk]
    s = torch.matmul(qh, K.float().transpose(1, 2)).view(H, T, P) * scale         # [H, T, P]
    j = torch.arange(P, device=q.device)[None, :]
    p = pos.long()[:, None]
    allowed = j <= p
    if window:
        allowed = allowed & (p - j < window)
    s = s.masked_fill(~allowed[None], float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.float()[:, None, None].expand(H, T, 1)], dim=-1)
    a = torch.softmax(s, dim=-1)[..., :P]                                          # the sink takes no value
    o = torch.matmul(a.reshape(Hkv, g * T, P), V.float()).view(H, T, Dv)
    return o.transpose(0, 1).reshape(T, H * Dv)


def swiglu_oai(g: torch.Tensor, u: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's clamped SwiGLU, as ggml computes it: x = min(g, limit), x / (1 + e^(-alpha x)) * (clamp(u) + 1)."""
    x = g.clamp(max=limit)
    return x / (1.0 + torch.exp(-alpha * x)) * (u.clamp(-limit, limit) + 1.0)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def moe_combine(y: torch.Tensor, done: torch.Tensor, ext: torch.Tensor | None, w: torch.Tensor) -> torch.Tensor:
    """[T, d]: each token's slots added in slot order (as llama.cpp's build_moe_ffn), a pair's output
    y [T*k, d] (already weighted) where done [T*k], plus w * ext (the CPU's unweighted rows [T, k, d],
    zero where the CPU took no part; a split expert has both)."""
    T, k = w.shape
    y3 = y.view(T, k, -1)
    parts = torch.where(done.view(T, k, 1).bool(), y3, torch.zeros((), dtype=y3.dtype))
    if ext is not None:
        parts = parts + w.unsqueeze(-1) * ext.view(T, k, -1)
    out = parts[:, 0]
    for j in range(1, k):
        out = out + parts[:, j]
    return out


DELTA_CHUNK = 64        # tokens a prefill step's delta net takes at once (llama.cpp's chunking uses 64 too)


def delta_net(qkv, z, beta, alpha, net, conv_state, ssm_state) -> torch.Tensor:
    """A gated delta net over T tokens in torch (see model/qwen35_moe.py for the equations), as
    llama.cpp's graph computes it: causal conv over [conv state | qkv], silu, l2-normed q and k, a
    decayed delta-rule update per token and v head, the RMS-normed output gated by silu(z).
    qkv [T, C], z [T, Hv S], beta/alpha [T, Hv] -> [T, Hv S]; conv_state [C, K-1] and ssm_state
    [Hv, S, S] are updated in place (recordable: no host reads). One token (decode) steps the
    recurrence; more (prefill) take it DELTA_CHUNK tokens at a time in matrix form."""
    T, C = qkv.shape
    Hk, Hv, S, K = net.k_heads, net.v_heads, net.head, net.conv.shape[1]
    x = torch.cat((conv_state, qkv.float().t()), dim=1)                        # [C, K-1+T]
    conv_state.copy_(x[:, T:])
    x = F.silu((x.unfold(1, K, 1) * net.conv[:, None, :]).sum(-1).t())          # [T, C]
    q, k, v = x.split((Hk * S, Hk * S, Hv * S), dim=1)
    q = F.normalize(q.reshape(T, Hk, S), dim=-1, eps=net.eps).repeat(1, Hv // Hk, 1) * S ** -0.5   # [T, Hv, S]
    k = F.normalize(k.reshape(T, Hk, S), dim=-1, eps=net.eps).repeat(1, Hv // Hk, 1)
    v = v.reshape(T, Hv, S)
    g = F.softplus(alpha.float() + net.dt_bias) * net.a                        # [T, Hv] log decay (< 0)
    b = torch.sigmoid(beta.float())
    o = _delta_step(q, k, v, g, b, ssm_state) if T == 1 else _delta_chunked(q, k, v, g, b, ssm_state)
    o = rms_norm(o, net.norm, net.eps) * F.silu(z.float().view(T, Hv, S))
    return o.reshape(T, Hv * S)


def _delta_step(q, k, v, g, b, state) -> torch.Tensor:
    """One token: S = exp(g) S; S += b (v - S k) k^T; o = S q. state [Hv, S(value), S(key)]."""
    s = state * torch.exp(g[0])[:, None, None]
    d = (v[0] - (s @ k[0, :, :, None])[..., 0]) * b[0, :, None]                  # [Hv, S]
    s = s + d[:, :, None] * k[0, :, None, :]
    state.copy_(s)
    return (s @ q[0, :, :, None])[..., 0][None]                                 # [1, Hv, S]


def _delta_chunked(q, k, v, g, b, state, chunk: int = DELTA_CHUNK) -> torch.Tensor:
    """The same recurrence over T tokens, `chunk` at a time: within a chunk the delta rule's
    corrections are one triangular solve (the WY form), across chunks the state carries over.
    q, k, v [T, H, S], g, b [T, H] -> o [T, H, S]; state [H, S(value), S(key)] in place."""
    T, H, S = q.shape
    pad = -T % chunk
    n = (T + pad) // chunk

    def blocks(t):                                                   # [T, H, ...] -> [H, n, chunk, ...]
        t = F.pad(t, (0, 0) * (t.dim() - 1) + (0, pad))             # the token dim (first) padded
        return t.reshape(n, chunk, H, *t.shape[2:]).transpose(0, 2).transpose(1, 2)
    q, k, v = blocks(q), blocks(k), blocks(v)                         # [H, n, c, S]
    g, b = blocks(g), blocks(b)                                       # [H, n, c]
    gc = g.cumsum(-1)
    lower = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    decay = torch.exp((gc[..., :, None] - gc[..., None, :]).masked_fill(~lower, float("-inf")))   # [H, n, c, c]
    kb = k * b[..., None]
    eye = torch.eye(chunk, device=q.device)
    A = eye + (kb @ k.transpose(-1, -2) * decay).tril(-1)             # I + strictly lower corrections
    W = torch.linalg.solve_triangular(A, eye.expand_as(A), upper=False, unitriangular=True)
    u = W @ (v * b[..., None])                                        # corrected values [H, n, c, S]
    w = W @ (kb * torch.exp(gc)[..., None])                           # what the carried state removes
    qk = (q @ k.transpose(-1, -2) * decay)                            # causal within the chunk
    s = state.transpose(-1, -2)                                       # [H, S(key), S(value)]
    outs = []
    for i in range(n):
        new_v = u[:, i] - w[:, i] @ s                                             # [H, c, S]
        outs.append((q[:, i] * torch.exp(gc[:, i])[..., None]) @ s + qk[:, i] @ new_v)
        last = gc[:, i, -1]                                                       # [H]
        s = s * torch.exp(last)[:, None, None] + (k[:, i] * torch.exp(last[:, None] - gc[:, i])[..., None]).transpose(-1, -2) @ new_v
    state.copy_(s.transpose(-1, -2))
    o = torch.stack(outs, 1).reshape(H, n * chunk, S)[:, :T]          # [H, T, S]
    return o.transpose(0, 1)
