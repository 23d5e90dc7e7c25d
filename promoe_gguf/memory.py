"""The device memory an Engine configuration takes, planned from the model file alone.

The planning layer: it reads the model (format) and the backends' layouts, and sits above both
(nothing below imports it). `promoe info` prints this plan per cache budget; `Engine.memory`
reports what the Engine actually allocated, and a test checks the two agree. Everything in bytes:
    resident      non-expert weights in their GGUF encoding (1-D tensors as float32)
    kv_cache      K and V for n_ctx positions of every layer, in the backend's layout (CPU: float32,
                  padded to 32 positions, llama.cpp's CPU layout; CUDA: float16 by default, as
                  llama.cpp's default cache)
    expert_arena  the expert cache's slots (n_slots x the largest expert region), or every routed
                  expert when there is no cache
    workspace     the backend's scratch: CUDA, one dequantized tile of the largest matrix for prefill;
                  CPU, ggml's work buffer for n_batch tokens
    activations   CUDA: the largest intermediate tensors of one prefill step of n_batch tokens, its
                  attention taken in chunks (torch allocates them per step; the plan keeps room for
                  them so the expert cache does not take it); CPU: 0 (host memory)
"""
from __future__ import annotations

import os

import numpy as np

from .backends import kv_layout
from .backends.cuda import ATTN_QUERY_BLOCK, PREFILL_CHUNK
from .backends.cuda import tile_bytes as cuda_tile_bytes
from .backends.torch_ops import DELTA_CHUNK
from .errors import ModelError
from .model import FAMILIES
from .model.common import recurrent_state_bytes
from .model.experts import resident_expert_bytes
from .runtime.host_store import StoreLayout

GGML_WORK_SLACK = 64 << 10     # ggml's per-op bookkeeping (mul_mat_id row maps, cache-line padding)
GPU_MEM_MARGIN = 0.10          # of the device's total memory (at least 1 GiB) left to CUDA itself
ACTIVATION_SHARE = 0.10        # the default prefill chunk is the largest whose activations fit this share
N_BATCH_CHOICES = (4096, 2048, 1024, 512, 256, 128, 64)


def resident_bytes(model) -> int:
    total = 0
    for name in model.resident_names:
        ref = model.tensor_ref(name)
        total += int(np.prod(ref.shape)) * 4 if len(ref.shape) == 1 else ref.nbytes
    return total


def kv_cache_bytes(model, n_ctx: int, device: str = "cuda", kv_type: str | None = None) -> int:
    """The KV cache's bytes as the Engine allocates it (the backend's layout: padding, element type),
    with the recurrent layers' states where the model has them (KV only for its attention layers)."""
    c = model.config
    kv = kv_layout(device, kv_type).nbytes(len(c.attention_layers), n_ctx, *FAMILIES[c.arch].cache_dims(model))
    return kv + recurrent_state_bytes(c)


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


def activation_bytes(model, device: str, n_batch: int, n_ctx: int) -> int:
    """CUDA: the intermediates of one prefill step of n_batch tokens, at their largest (fp32). The
    attention block runs PREFILL_CHUNK tokens at a time (Decoder._attention_block): its hidden
    states and projections (8 x [A, d]), the queries' scores against the whole context one block at a
    time, the cache read as float, and a gated delta net's (qwen35moe) conv taps over every channel,
    q/k/v per value head and its chunked form's per-head [A, chunk] matrices and [A, S] products
    (torch_ops.delta_net), for A = min(T, PREFILL_CHUNK). The FFN sees the whole step: the residual
    stream, its norm and the two blocks' outputs past the chunk's (4 x [T - A, d]), the router's logits and
    probabilities (2 x [T, E]), a layer's expert outputs [T, k, d]; one expert's (or a dense FFN's)
    gate, up and product over up to a chunk of its tokens at a time (3 x [A, ff]: the backend's
    expert_ffn). CPU: 0."""
    if device != "cuda":
        return 0
    cfg = model.config
    T = int(n_batch)
    A = min(T, PREFILL_CHUNK)
    ff = max(cfg.n_ff_exp, cfg.n_ff, cfg.n_ff_shexp)
    heads = cfg.n_head * max(cfg.head_dim_k, cfg.head_dim_v)
    floats = (8 * A * max(cfg.n_embd, heads) + cfg.n_head * min(A, ATTN_QUERY_BLOCK) * n_ctx
              + 2 * cfg.n_head_kv * n_ctx * max(cfg.head_dim_k, cfg.head_dim_v)
              + 4 * (T - A) * cfg.n_embd + 2 * T * cfg.n_experts
              + T * cfg.n_experts_used * cfg.n_embd + 3 * A * ff + cfg.n_vocab)
    la = cfg.linear_attention
    if la is not None:
        floats += A * (la.conv_channels * (la.conv_kernel + 2) + 8 * la.v_heads * la.head_v + 4 * la.v_heads * DELTA_CHUNK)
    return 4 * floats


def default_n_batch(model, device: str, n_ctx: int, gpu_mem: int | None) -> int:
    """The prefill chunk when none is given: CPU (or no device budget) 512 tokens, llama.cpp's ubatch;
    CUDA the largest of 4096..64 tokens whose activations take at most ACTIVATION_SHARE of the device
    budget (a longer chunk copies each missed expert once for more tokens); never above n_ctx."""
    if device != "cuda" or gpu_mem is None:
        return min(512, n_ctx)
    for n in N_BATCH_CHOICES:
        if n <= n_ctx and activation_bytes(model, device, n, n_ctx) <= ACTIVATION_SHARE * gpu_mem:
            return n
    return min(N_BATCH_CHOICES[-1], n_ctx)


def context(model, n_ctx: int | None) -> int:
    """The KV cache length an Engine takes by default: the model's, capped at 4096."""
    return int(n_ctx or min(model.config.n_ctx_train or 4096, 4096))


def plan(model, device: str = "cuda", n_ctx: int | None = None, n_batch: int | None = None, n_slots: int | None = None,
         kv_type: str | None = None) -> dict:
    """The memory breakdown of Engine(model, device, n_ctx, n_batch, kv_type) with an expert cache of
    `n_slots` slots (None: every expert resident); n_batch None: the default without a device budget."""
    n_ctx = context(model, n_ctx)
    n_batch = int(n_batch or default_n_batch(model, device, n_ctx, None))
    if n_slots is None:
        arena = resident_expert_bytes(model, in_place=device == "cpu")
    else:
        arena = n_slots * StoreLayout.of(model).slot_bytes
    out = {"resident": resident_bytes(model), "kv_cache": kv_cache_bytes(model, n_ctx, device, kv_type),
           "expert_arena": arena, "workspace": workspace_bytes(model, device, n_batch),
           "activations": activation_bytes(model, device, n_batch, n_ctx)}
    out["total"] = sum(out.values())
    return out


def default_gpu_mem(device) -> int:
    """CUDA default budget: free memory minus a margin for the CUDA context, cuBLAS workspaces, torch's
    allocator and the activations of a step (10% of the total, at least 1 GiB)."""
    import torch
    free, total = torch.cuda.mem_get_info(device)
    return int(free - max(GPU_MEM_MARGIN * total, 1 << 30))


def fit_cache(model, device: str, n_ctx: int | None, n_batch: int | None, gpu_mem: int,
              kv_type: str | None = None) -> int | None:
    """Expert cache bytes that fit in `gpu_mem` after residents, KV cache and workspace; None when
    every expert fits too (no cache needed)."""
    n_batch = int(n_batch or default_n_batch(model, device, context(model, n_ctx), gpu_mem))
    full = plan(model, device, n_ctx, n_batch, None, kv_type)
    if full["total"] <= gpu_mem:
        return None
    fixed = full["resident"] + full["kv_cache"] + full["workspace"] + full["activations"]
    left = gpu_mem - fixed
    if left <= 0:
        raise ModelError(f"--gpu-mem {gpu_mem:,} bytes is less than the resident weights ({full['resident']:,}), "
                         f"KV cache ({full['kv_cache']:,}), workspace ({full['workspace']:,}) and prefill "
                         f"activations ({full['activations']:,}, --n-batch {n_batch}) need ({fixed:,} bytes), "
                         f"before any expert")
    return left


def available_memory(device) -> int | None:
    """Bytes free for a new allocation on `device` (None: unknown). On the CPU: the system's available
    memory, or less when this process runs under an address-space limit (ulimit -v)."""
    import torch
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:  # noqa: BLE001 - no driver answer: do not guess
            return None
    free = None
    try:
        with open("/proc/meminfo") as f:
            free = next((int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")), None)
    except OSError:
        pass
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            with open("/proc/self/statm") as f:
                used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            free = min(free if free is not None else soft, max(0, soft - used))
    except (ImportError, OSError, ValueError):
        pass
    return free


def check_kv_cache(model, n_ctx: int, device, backend_kind: str, kv_type: str | None = None) -> int:
    """Refuse a KV cache that cannot fit before allocating it; returns its size in bytes."""
    need = kv_cache_bytes(model, n_ctx, backend_kind, kv_type)
    free = available_memory(device)
    if free is not None and need > free:
        raise ModelError(f"{model.path}: a KV cache of {n_ctx} positions needs {need / 2**30:.2f} GiB "
                         f"({model.config.n_layers} layers), more than the {free / 2**30:.2f} GiB free on {device}; "
                         f"pass a smaller n_ctx (--n-ctx)")
    return need
