"""CUDA dequant-matmul kernels for quantized experts (sources in the repository's kernels/ directory).

Importing this package needs neither CuPy nor a GPU; the first launch compiles the kernels with
CuPy's NVRTC. See kernels/README.md for the design and launch shapes.
"""
from .launch import (
    ALIGNMENT,
    SUPPORTED,
    ExpertLayout,
    dequantize_cuda,
    kernels_dir,
    linear,
    matvec,
    moe_combine,
    moe_decode,
    moe_down,
    moe_gate_up,
    module_source,
)

__all__ = [
    "ALIGNMENT", "SUPPORTED", "ExpertLayout", "dequantize_cuda", "kernels_dir", "linear", "matvec",
    "moe_combine", "moe_decode", "moe_down", "moe_gate_up", "module_source",
]
