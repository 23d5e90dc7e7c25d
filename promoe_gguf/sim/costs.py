"""What one piece of work costs on a profile: the simulator's roofline terms.

A quantized product over T tokens streams its weight bytes and does 2 * params * T flops; it takes
max(bytes / bandwidth, flops / rate) on its device. Attention reads the KV cache (ctx positions) and
does 4 * T * ctx * heads * head_dim flops. Fixed per-layer, per-op and per-call costs come from the
profile (MODEL.md). `SimModel` is the per-layer summary of a model (a GGUF, a cache directory or a
header-only shape) these terms need.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..model import FAMILIES
from ..model.common import recurrent_state_bytes
from ..runtime.host_store import StoreLayout


FLOAT_THREAD_FACTOR = 2.0     # F16 dot products decode no blocks: a thread streams ~2x the bytes of a K-quant


def _params(ref) -> int:
    return int(np.prod(ref.shape)) if len(ref.shape) >= 2 else 0


@dataclass
class SimModel:
    model: object                 # the MoEModel-like object (memory.plan and StoreLayout read it)
    name: str
    n_layers: int
    moe_layers: list
    E: int
    k: int
    d: int
    vocab: int
    layer_bytes: list             # per layer: non-expert weights as stored (attention, norms, router, shared/dense FFN)
    layer_params: list            # ... their matrix parameters (flops = 2 * params * tokens)
    embd_bytes: int               # token_embd (llama.cpp keeps it on the CPU: a row lookup)
    out_bytes: int                # output (+ output_norm)
    out_params: int
    expert_bytes: dict            # layer -> bytes of one routed expert (gate + up + down)
    expert_params: dict           # layer -> matrix parameters of one expert
    kv_elems: int                 # K + V elements per position per layer (averaged: recurrent layers keep none)
    cpu_factor: float             # how much faster than K-quants a CPU thread streams these experts' types
    attn_dim: int                 # n_head * head_dim (attention flops per position)
    layout: StoreLayout
    state_bytes: int = 0          # recurrent state read and written per step, averaged per layer (qwen35moe)
    n_head: int = 0               # attention heads (llama.cpp's KQ buffer without flash attention)

    @classmethod
    def of(cls, model) -> "SimModel":
        cfg = model.config
        lb, lp = [0] * cfg.n_layers, [0] * cfg.n_layers
        embd = out = outp = 0
        for name in model.resident_names:
            ref = model.tensor_ref(name)
            if name.startswith("blk."):
                i = int(name.split(".")[1])
                lb[i] += ref.nbytes
                lp[i] += _params(ref)
            elif name.startswith("token_embd"):
                embd += ref.nbytes
            else:
                out += ref.nbytes
                outp += _params(ref)
        if not model.has_tensor("output.weight"):            # tied embeddings: the head reads token_embd
            out, outp = out + embd, outp + _params(model.tensor_ref("token_embd.weight"))
        eb, ep = {}, {}
        for layer in cfg.moe_layers:
            mats = model.expert_matrices(layer, 0)
            eb[layer] = sum(m.nbytes for m in mats)
            ep[layer] = sum(m.shape[0] * m.shape[1] for m in mats)
        (hk, dk), (hv, dv) = FAMILIES[cfg.arch].cache_dims(model)
        types = {m.qtype.name for m in model.expert_matrices(cfg.moe_layers[0], 0)}
        factor = FLOAT_THREAD_FACTOR if types <= {"F16", "BF16", "F32"} else 1.0
        return cls(model, getattr(model, "path", cfg.arch), cfg.n_layers, list(cfg.moe_layers), cfg.n_experts,
                   cfg.n_experts_used, cfg.n_embd, cfg.n_vocab, lb, lp, embd, out, outp, eb, ep,
                   (hk * dk + hv * dv) * len(cfg.attention_layers) // cfg.n_layers, factor, cfg.n_head * cfg.head_dim_k,
                   StoreLayout.of(model), 2 * recurrent_state_bytes(cfg) // cfg.n_layers, cfg.n_head)

    def cpu_bw(self, prof) -> float:
        return prof.cpu_bw(self.cpu_factor)

    @property
    def total_bytes(self) -> int:
        return sum(self.layer_bytes) + self.embd_bytes + self.out_bytes + sum(
            self.expert_bytes[layer] * self.E for layer in self.moe_layers)


def roofline(nbytes: float, flops: float, bw: float, rate: float) -> float:
    return max(nbytes / bw if bw else 0.0, flops / rate if rate else 0.0)


def gpu_expert_s(m: SimModel, prof, layer: int, T: int) -> float:
    """One routed expert over T tokens on the device (weights already there)."""
    return roofline(m.expert_bytes[layer], 2 * m.expert_params[layer] * T, prof.gpu_bw, prof.gpu_flops)


def cpu_expert_s(m: SimModel, prof, layer: int, T: int) -> float:
    """One routed expert over T tokens with ggml on the CPU (all threads), from host memory."""
    return roofline(m.expert_bytes[layer], 2 * m.expert_params[layer] * T, m.cpu_bw(prof), prof.cpu_flops)


def attention_work(m: SimModel, T: int, ctx: float, elem_bytes: int) -> tuple[float, float]:
    """(KV and recurrent-state bytes read, flops) of one layer's attention for T tokens seeing `ctx`
    positions on average."""
    return ctx * m.kv_elems * elem_bytes + m.state_bytes, 4.0 * T * ctx * m.attn_dim


def layer_gpu_s(m: SimModel, prof, layer: int, T: int, ctx: float, kv_elem_bytes: int) -> float:
    """A layer's non-expert work on the device: attention, norms, router, shared/dense FFN."""
    kv, aflops = attention_work(m, T, ctx, kv_elem_bytes)
    return roofline(m.layer_bytes[layer] + kv, 2 * m.layer_params[layer] * T + aflops, prof.gpu_bw, prof.gpu_flops)


def layer_cpu_s(m: SimModel, prof, layer: int, T: int, ctx: float, kv_elem_bytes: int) -> float:
    kv, aflops = attention_work(m, T, ctx, kv_elem_bytes)
    return roofline(m.layer_bytes[layer] + kv, 2 * m.layer_params[layer] * T + aflops, m.cpu_bw(prof), prof.cpu_flops)
