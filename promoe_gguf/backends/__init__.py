"""Backends: the quantized math of one device behind the few calls the model makes.

    linear(x, W)                     x [T, cols] float32 -> [T, rows] float32, W a QMatrix
    embed(tokens, W)                 rows of the token embedding, dequantized
    rms_norm(x, w, eps)              and add_rms_norm (residual add fused with the next norm)
    moe(x, stack, index, weights)    all routed experts of one layer for a few tokens, one fused call
    expert_ffn(x, gate, up, down)    one expert over the tokens routed to it (prefill)

Weights never leave their GGUF encoding: a QMatrix is the file's bytes on the backend's device.
`cpu.py` computes with llama.cpp's own CPU kernels (ggml, 8-bit activations as llama.cpp does);
`cuda.py` with the CuPy kernels of kernels/ (fp32 activations). The model code never asks which.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from ..errors import ModelError
from ..format.quants import quant_type

FLOAT_TYPES = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}
FUSED_MAX_TOKENS = 8     # a forward step of at most this many tokens takes the fused MoE path


@dataclass(eq=False)
class QMatrix:
    """A weight in its GGUF encoding on a device: W [rows, cols], out = W @ x.

    `shape` is numpy order: (rows, cols), or (batch, rows, cols) for a stack of per-head matrices
    (DeepSeek2's attn_k_b / attn_v_b). `data` holds the bytes: uint8, or the float dtype for
    F32/F16/BF16 weights on CUDA."""
    name: str
    qtype: T
    shape: tuple[int, ...]
    data: torch.Tensor

    @property
    def rows(self) -> int:
        return self.shape[-2]

    @property
    def cols(self) -> int:
        return self.shape[-1]

    @property
    def row_bytes(self) -> int:
        return quant_type(self.qtype).row_bytes(self.cols)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    @property
    def addr(self) -> int:
        return self.data.data_ptr()


@dataclass(frozen=True)
class StackedMatrix:
    """One matrix (gate, up or down) of every expert of a layer: expert i's blocks start at
    addr + i * stride (a stacked GGUF tensor, or the slots of the expert cache)."""
    qtype: T
    rows: int
    cols: int
    addr: int
    stride: int
    count: int

    @property
    def row_bytes(self) -> int:
        return quant_type(self.qtype).row_bytes(self.cols)


@dataclass(frozen=True)
class ExpertStack:
    """Where one MoE layer's experts are, as the fused call reads them. `owners`: the uint8 tensors
    holding gate, up and down (they keep the memory alive; the torch fallback reads through them)."""
    gate: StackedMatrix
    up: StackedMatrix
    down: StackedMatrix
    owners: tuple = ()


def matrix_at(owner: torch.Tensor, offset: int, name: str, qtype, shape) -> QMatrix:
    """QMatrix over bytes [offset, offset + size) of a uint8 tensor (a cache slot, a host row)."""
    qt = quant_type(qtype)
    n = int(np.prod(shape[:-1])) * qt.row_bytes(shape[-1])
    return QMatrix(name, qt.ggml_type, tuple(shape), owner[offset:offset + n])


class Backend:
    """What every backend offers besides the math: counters the decode-step budget test reads."""
    device: torch.device
    kind: str                        # "cpu" (ggml) or "cuda" (the CuPy kernels)

    def __init__(self):
        self.host_syncs = 0          # device -> host waits (routing ids), one helper counts them
        self.launches = 0            # kernel launches (CUDA) / ggml graph computes (CPU)

    @property
    def workspace_bytes(self) -> int:
        """Scratch memory this backend holds on its device (grown on demand, bounded)."""
        return 0

    def reserve(self, nbytes: int) -> None:
        """Allocate the scratch workspace up front (memory accounting sees it from the start)."""

    def prepare(self, step, rope) -> None:
        """A forward step starts: build what every layer shares (RoPE tables, positions) once."""

    def to_host(self, t: torch.Tensor) -> np.ndarray:
        """The one way the forward pass reads device values on the host (the routing ids)."""
        self.host_syncs += 1
        return t.cpu().numpy()

    def combine(self, slot_out: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """[T, k, d] expert outputs, [T, k] routing weights -> [T, d]: each slot scaled, then the slots
        added in slot order (as llama.cpp's build_moe_ffn), so the sum never depends on compute order."""
        scaled = slot_out * weights.unsqueeze(-1)
        out = scaled[:, 0]
        for j in range(1, scaled.shape[1]):
            out = out + scaled[:, j]
        return out


def make_backend(device, n_threads: int | None = None, launcher=None) -> Backend:
    """CPU: ggml; CUDA: the CuPy kernels (`launcher` replaces CuPy for tests on machines without a GPU)."""
    device = torch.device(device)
    if device.type == "cpu" and launcher is None:
        from .cpu import CpuBackend
        return CpuBackend(n_threads=n_threads)
    if device.type in ("cuda", "cpu"):
        from .cuda import CudaBackend
        return CudaBackend(device, launcher=launcher)
    raise ModelError(f"unsupported device {device} (cpu or cuda)")


__all__ = ["QMatrix", "StackedMatrix", "ExpertStack", "Backend", "make_backend", "matrix_at", "FLOAT_TYPES",
           "FUSED_MAX_TOKENS"]
