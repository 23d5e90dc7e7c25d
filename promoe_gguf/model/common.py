"""Building blocks shared by the model families, each computing what llama.cpp computes.

Shapes: T = tokens in this step, P = positions in the KV cache so far + T, d = n_embd,
H = query heads, Hkv = kv heads, Dk/Dv = head dims, E = experts, k = experts per token.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from gguf import GGMLQuantizationType as T

from ..backends import KVLayout, QMatrix
from ..backends.torch_ops import RopeSpec
from ..errors import ModelError


class ResidentWeights:
    """Every non-expert tensor of a model on the backend's device, placed once at load.

    Matrices keep their GGUF encoding as bytes (QMatrix: where the backend reads weights in place,
    the CPU, the file's memory map itself; else a device copy of the same bytes); 1-D tensors
    (norms, biases, gate vectors), biases of any rank (gpt-oss's per-expert [E, n]) and a delta net's
    conv taps (read whole per step, never multiplied as a matrix) become float32."""

    def __init__(self, model, backend):
        self.model, self.device = model, backend.device
        self.mats: dict[str, QMatrix] = {}
        self.vecs: dict[str, torch.Tensor] = {}
        file = torch.from_numpy(model.resident_data) if backend.weights_in_place else None
        for name in model.resident_names:
            ref = model.tensor_ref(name)
            if len(ref.shape) == 1 or name.endswith(".bias") or name.endswith(".ssm_conv1d.weight"):
                self.vecs[name] = torch.from_numpy(model.tensor_f32(name).copy()).to(self.device)
                continue
            if file is not None:
                data = file[ref.offset:ref.offset + ref.nbytes]
            else:
                data = torch.from_numpy(np.ascontiguousarray(model.tensor_raw(name)).reshape(-1)).to(self.device)
            self.mats[name] = QMatrix(name, ref.qtype, ref.shape, data)

    @property
    def nbytes(self) -> int:
        """Bytes these weights take on the device (on the CPU: the mapped bytes they are read from)."""
        return (sum(m.nbytes for m in self.mats.values())
                + sum(v.numel() * v.element_size() for v in self.vecs.values()))

    def has(self, name: str) -> bool:
        return name in self.mats or name in self.vecs

    def mat(self, name: str, optional: bool = False) -> QMatrix | None:
        """The matrix `name`; a 1-D tensor (a gate vector) reads as a [1, n] F32 matrix."""
        m = self.mats.get(name)
        if m is None and name in self.vecs:
            v = self.vecs[name]
            m = self.mats[name] = QMatrix(name, T.F32, (1, v.numel()), v.view(torch.uint8))
        if m is None and not optional:
            raise ModelError(f"{self.model.path}: matrix {name!r} is missing")
        return m

    def vec(self, name: str, optional: bool = False) -> torch.Tensor | None:
        v = self.vecs.get(name)
        if v is None and not optional:
            raise ModelError(f"{self.model.path}: tensor {name!r} is missing")
        return v


def rope_spec(cfg) -> RopeSpec:
    """The RoPE llama.cpp applies for this config, its YaRN attn_factor computed in float32 as
    llama_context does (for DeepSeek2 it cancels ggml's YaRN magnitude, which goes into kq_scale)."""
    r = cfg.rope
    if r.scaling not in ("none", "yarn", "linear"):
        raise ModelError(f"rope scaling {r.scaling!r} is not supported")
    f32 = np.float32
    scaled = r.scaling in ("linear", "yarn") and r.factor not in (0.0, 1.0)
    freq_scale = f32(1.0) / f32(r.factor) if scaled else f32(1.0)
    ext, attn = 0.0, f32(1.0)
    if r.scaling == "yarn" and scaled:
        ext = 1.0
        factor = f32(1.0) / freq_scale
        cancel = f32(1.0) / (f32(1.0) + f32(0.1) * np.log(factor))
        if r.yarn_log_mul:                  # get_mscale(f, m) / get_mscale(f, m) with m = log_mul: 1
            attn = cancel
        else:
            attn = (f32(0.1) * np.log(factor) + f32(1.0)) * cancel
    return RopeSpec(kind=r.kind, n_dims=r.n_dims, base=float(f32(r.base)), freq_scale=float(freq_scale),
                    ext_factor=ext, attn_factor=float(attn), n_ctx_orig=int(r.orig_ctx or cfg.n_ctx_train or 0),
                    sections=r.sections)


class KVCache:
    """Per layer K [Hkv, n, Dk] and V [Hkv, n, Dv] (heads first, so attention reads views), or V
    transposed [Hkv, Dv, n] where the backend wants it (ggml, as llama.cpp's non-flash attention),
    in the backend's element type (fp16 on CUDA, as llama.cpp's default). Allocated once, zeroed
    (the CPU backend reads `pad`-aligned spans whose tail is masked out), for n = n_ctx rounded up
    to the layout's padding; `reset()` starts a new sequence in place. The positions written so
    far, n_past, live on the host: a decode step reads its position from a device buffer.

    Models with gated linear attention (qwen35moe) keep K and V only for their attention layers
    (`layers`; None elsewhere) and, beside them, each recurrent layer's state (RecurrentState), as
    llama.cpp's hybrid memory does."""

    def __init__(self, n_layers: int, n_ctx: int, k_dims: tuple[int, int], v_dims: tuple[int, int], device,
                 layout: KVLayout, layers: list[int] | None = None, linear=None):
        self.n_ctx, self.device, self.layout = n_ctx, torch.device(device), layout
        self.dtype, self.v_trans = layout.dtype, layout.v_trans
        self.n_alloc = layout.n_alloc(n_ctx)
        layers = list(range(n_layers)) if layers is None else layers
        (hk, dk), (hv, dv) = k_dims, v_dims
        nbytes = layout.nbytes(len(layers), n_ctx, k_dims, v_dims)
        vshape = (hv, dv, self.n_alloc) if self.v_trans else (hv, self.n_alloc, dv)
        self.k: list = [None] * n_layers
        self.v: list = [None] * n_layers
        try:
            for layer in layers:
                self.k[layer] = torch.zeros((hk, self.n_alloc, dk), dtype=self.dtype, device=self.device)
                self.v[layer] = torch.zeros(vshape, dtype=self.dtype, device=self.device)
            self.recurrent = RecurrentState(n_layers, layers, linear, self.device) if linear is not None else None
        except (torch.OutOfMemoryError, RuntimeError) as e:
            raise ModelError(f"cannot allocate a KV cache of {n_ctx} positions ({nbytes:,} bytes): {e}") from e
        self.nbytes = nbytes + (self.recurrent.nbytes if self.recurrent else 0)
        self.n_past = 0

    def reset(self) -> None:
        self.n_past = 0
        if self.recurrent is not None:
            self.recurrent.reset()

    def append(self, layer: int, k, v, start: int) -> None:
        """Store k [T, Hkv, Dk] / v [T, Hkv, Dv] at positions start..start+T (host positions)."""
        T = k.shape[0]
        end = start + T
        if end > self.n_ctx:
            raise ModelError(f"context of {end} tokens exceeds the KV cache's {self.n_ctx}")
        self.k[layer][:, start:end] = k.transpose(0, 1)
        if self.v_trans:
            self.v[layer][:, :, start:end] = v.permute(1, 2, 0)
        else:
            self.v[layer][:, start:end] = v.transpose(0, 1)


def recurrent_state_bytes(cfg) -> int:
    """Bytes of every recurrent layer's state for one sequence (float32, as llama.cpp's R and S)."""
    la = cfg.linear_attention
    if la is None:
        return 0
    n = sum(cfg.is_recurrent(layer) for layer in range(cfg.n_layers))
    return n * sum(la.state_floats()) * 4


class RecurrentState:
    """Per recurrent layer: conv [C, K-1] (the conv's last K-1 inputs, C = q|k|v channels) and ssm
    [Hv, S, S] (a delta net's matrix per v head, S[h, j, i]: value j, key i), float32, in ggml's
    order (ne0 last). Zero at the start of a sequence; a forward step updates them in place, so a
    recorded decode step replays on the same memory."""

    def __init__(self, n_layers: int, attention_layers: list[int], linear, device):
        K, C, Hv, S = linear.conv_kernel, linear.conv_channels, linear.v_heads, linear.head_v
        attention = set(attention_layers)
        rec = [layer for layer in range(n_layers) if layer not in attention]
        self.conv = {layer: torch.zeros((C, K - 1), dtype=torch.float32, device=device) for layer in rec}
        self.ssm = {layer: torch.zeros((Hv, S, S), dtype=torch.float32, device=device) for layer in rec}
        self.nbytes = sum(t.numel() * 4 for t in (*self.conv.values(), *self.ssm.values()))

    def reset(self) -> None:
        for t in (*self.conv.values(), *self.ssm.values()):
            t.zero_()


class StepDriver(Protocol):
    """Where a forward step hands control to the host (the expert seam with a cache): `action` runs
    once the device work queued so far has landed (`sync`) or been queued. Eagerly that is now; in a
    recorded decode step it is a graph boundary and the action runs between replays."""

    def cut(self, action, sync: bool) -> None: ...


class EagerDriver:
    def __init__(self, backend):
        self.backend = backend

    def cut(self, action, sync: bool) -> None:
        if sync:
            self.backend.sync()
        action()


@dataclass
class Step:
    """What every layer of one forward step shares: positions, the attention mask, the cache, where
    control passes to the host, and per-step tables a backend builds once."""
    pos: torch.Tensor             # [T] absolute positions (int32, on the device)
    n_past: int | None            # positions already in the cache (None in a recorded decode step)
    cache: KVCache
    driver: StepDriver
    mask: object = None           # the backend's causal mask for this step
    tables: dict = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return self.pos.numel()

    def part(self, lo: int, n: int) -> "Step":
        """Tokens lo..lo+n of this (eager) step as a step of their own: the ones before lo are in
        the cache by then, so the causal mask is this one's rows and columns up to them."""
        mask = None if self.mask is None else self.mask[lo:lo + n, :self.n_past + lo + n]
        return Step(self.pos[lo:lo + n], self.n_past + lo, self.cache, self.driver, mask)


def route(probs, cfg, bias=None):
    """Router probabilities [T, E] (softmax or sigmoid of the logits) -> (ids [T, k] long, weights
    [T, k] float32), as llama.cpp's build_moe_ffn."""
    select = probs if bias is None else probs + bias
    if cfg.n_expert_groups > 1:
        T, E = select.shape
        groups = select.view(T, cfg.n_expert_groups, E // cfg.n_expert_groups)
        score = groups.topk(2, dim=-1).values.sum(-1)                       # [T, G]: top-2 sum per group
        keep = score.topk(cfg.n_group_used, dim=-1).indices
        mask = torch.full_like(score, float("-inf")).scatter(1, keep, 0.0)
        select = (groups + mask[..., None]).view(T, E)
    top = select.topk(cfg.n_experts_used, dim=-1)
    ids = top.indices
    w = top.values if select is probs else probs.gather(1, ids)           # weights from unbiased probs
    if cfg.norm_topk:                                                    # ggml_sum_rows adds in double
        w = w / w.double().sum(-1, keepdim=True).float().clamp(min=6.103515625e-5)
    if cfg.weights_scale not in (0.0, 1.0):
        w = w * cfg.weights_scale
    return ids, w


def check_tokens(tokens, n_vocab: int):
    t = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    if t.numel() == 0:
        raise ModelError("empty token sequence")
    bad = ((t < 0) | (t >= n_vocab)).nonzero()
    if len(bad):
        i = int(bad[0, 0])
        raise ModelError(f"token id {int(t[i])} at position {i} is out of range (vocabulary {n_vocab})")
    return t
