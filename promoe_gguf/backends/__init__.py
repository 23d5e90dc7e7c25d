"""Backends: the quantized math of one device behind the calls the model makes (`Backend`).

Weights never leave their GGUF encoding: a QMatrix is the file's bytes on the backend's device.
`cpu.py` computes with llama.cpp's own CPU kernels (ggml, 8-bit activations as llama.cpp does);
`cuda.py` with the CuPy kernels of kernels/ (8-bit or fp32 activations). The model code never asks
which device it runs on: every difference lives behind this protocol.
"""
from __future__ import annotations

import torch

from ..errors import ParameterError, clip
from .base import (CPU_KV_PAD, FLOAT_TYPES, FUSED_MAX_TOKENS, KV_TYPES, Backend, BackendBase, DeltaNet, ExpertFn, ExpertStack,
                   KVLayout, QMatrix, StackedMatrix, kv_layout, matrix_at)


def parse_device(device) -> torch.device:
    """A device we run on (cpu, cuda, cuda:N); ParameterError names anything else."""
    try:
        out = torch.device(device)
    except (RuntimeError, TypeError):
        raise ParameterError("device", f"{clip(device)} is not a device (cpu, cuda or cuda:N)") from None
    if out.type not in ("cpu", "cuda"):
        raise ParameterError("device", f"{clip(device)} is not supported (cpu, cuda or cuda:N)")
    return out


def make_backend(device, n_threads: int | None = None, launcher=None, activations: str | None = None,
                 kv_type: str | None = None) -> Backend:
    """CPU: ggml; CUDA: the CuPy kernels (`launcher` replaces CuPy for tests on machines without a GPU).
    activations ("q8" | "f32") and kv_type ("f16" | "f32") choose the CUDA arithmetic; ggml's is llama.cpp's."""
    device = parse_device(device)
    if device.type == "cpu" and launcher is None:
        if activations is not None:
            raise ParameterError("activations", f"{clip(activations)} chooses the CUDA kernels' arithmetic; the CPU "
                                                "computes as llama.cpp's CPU kernels do (8-bit activations)")
        kv_layout("cpu", kv_type)
        from .cpu import CpuBackend
        return CpuBackend(n_threads=n_threads)
    from .cuda import CudaBackend
    return CudaBackend(device, launcher=launcher, activations=activations or "q8", kv_type=kv_type or "f16")


__all__ = ["QMatrix", "StackedMatrix", "ExpertStack", "ExpertFn", "DeltaNet", "Backend", "BackendBase", "KVLayout", "kv_layout", "make_backend",
           "parse_device", "matrix_at", "FLOAT_TYPES", "FUSED_MAX_TOKENS", "KV_TYPES", "CPU_KV_PAD"]
