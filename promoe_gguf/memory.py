"""The device memory an Engine configuration takes, planned from the model file alone.

`promoe info` prints this plan per cache budget; `Engine.memory` reports what the Engine actually
allocated, and a test checks the two agree. Everything in bytes:
    resident      non-expert weights in their GGUF encoding (1-D tensors as float32)
    kv_cache      float32 K and V for n_ctx positions of every layer
    expert_arena  the expert cache's slots (n_slots x the largest expert region), or every routed
                  expert when there is no cache
    workspace     the backend's scratch: CUDA, one dequantized tile of the largest matrix for prefill;
                  CPU, ggml's work buffer for n_batch tokens
"""
from __future__ import annotations

import numpy as np

from .backends.cuda import tile_bytes as cuda_tile_bytes
from .model import FAMILIES
from .model.experts import resident_expert_bytes
from .runtime.host_store import StoreLayout

GGML_WORK_SLACK = 64 << 10     # ggml's per-op bookkeeping (mul_mat_id row maps, cache-line padding)


def resident_bytes(model) -> int:
    total = 0
    for name in model.resident_names:
        ref = model.tensor_ref(name)
        total += int(np.prod(ref.shape)) * 4 if len(ref.shape) == 1 else ref.nbytes
    return total


def kv_cache_bytes(model, n_ctx: int) -> int:
    (hk, dk), (hv, dv) = FAMILIES[model.config.arch].cache_dims(model)
    return model.config.n_layers * n_ctx * (hk * dk + hv * dv) * 4


def _matrix_shapes(model):
    for name in model.resident_names:
        ref = model.tensor_ref(name)
        if len(ref.shape) >= 2:
            yield ref.qtype, ref.shape[-2], ref.shape[-1]
    for layer in model.config.moe_layers:                       # a layer's experts share their shapes
        for m in model.expert_matrices(layer, 0):
            yield m.qtype, m.shape[0], m.shape[1]


def workspace_bytes(model, device: str, n_batch: int) -> int:
    shapes = list(_matrix_shapes(model))
    if device == "cuda":
        return max(cuda_tile_bytes(q, rows, cols) for q, rows, cols in shapes)
    return n_batch * max(cols for _, _, cols in shapes) * 4 + GGML_WORK_SLACK


def plan(model, device: str = "cuda", n_ctx: int | None = None, n_batch: int = 64, n_slots: int | None = None) -> dict:
    """The memory breakdown of Engine(model, device, n_ctx, n_batch) with an expert cache of
    `n_slots` slots (None: every expert resident)."""
    cfg = model.config
    n_ctx = int(n_ctx or min(cfg.n_ctx_train or 4096, 4096))
    if n_slots is None:
        arena = resident_expert_bytes(model, device)
    else:
        arena = n_slots * StoreLayout.of(model).slot_bytes
    out = {"resident": resident_bytes(model), "kv_cache": kv_cache_bytes(model, n_ctx), "expert_arena": arena,
           "workspace": workspace_bytes(model, device, n_batch)}
    out["total"] = sum(out.values())
    return out


GPU_MEM_MARGIN = 0.10            # of the device's total memory (at least 1 GiB) left to CUDA itself


def default_gpu_mem(device) -> int:
    """CUDA default budget: free memory minus a margin for the CUDA context, cuBLAS workspaces, torch's
    allocator and the activations of a step (10% of the total, at least 1 GiB)."""
    import torch
    free, total = torch.cuda.mem_get_info(device)
    return int(free - max(GPU_MEM_MARGIN * total, 1 << 30))


def fit_cache(model, device: str, n_ctx: int | None, n_batch: int, gpu_mem: int) -> int | None:
    """Expert cache bytes that fit in `gpu_mem` after residents, KV cache and workspace; None when
    every expert fits too (no cache needed)."""
    from .errors import ModelError
    full = plan(model, device, n_ctx, n_batch, None)
    if full["total"] <= gpu_mem:
        return None
    fixed = full["resident"] + full["kv_cache"] + full["workspace"]
    left = gpu_mem - fixed
    if left <= 0:
        raise ModelError(f"--gpu-mem {gpu_mem:,} bytes is less than the resident weights ({full['resident']:,}), "
                         f"KV cache ({full['kv_cache']:,}) and workspace ({full['workspace']:,}) need "
                         f"({fixed:,} bytes), before any expert")
    return left
