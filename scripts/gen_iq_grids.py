#!/usr/bin/env python3
"""Rewrite promoe_gguf/kernels/cuda/iq_grids.cuh from gguf-py's IQ grids."""
from pathlib import Path

from promoe_gguf.kernels.iq_grids import render

if __name__ == "__main__":
    path = Path(__file__).resolve().parent.parent / "promoe_gguf" / "kernels" / "cuda" / "iq_grids.cuh"
    path.write_text(render())
    print(f"wrote {path}")
