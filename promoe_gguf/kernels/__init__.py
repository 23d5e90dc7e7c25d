"""CUDA kernels for quantized models, compiled at run time by CuPy's NVRTC (sources in cuda/).

Importing this package needs neither CuPy nor a GPU. `plans` says which kernel, grid and arguments
each call takes (pure Python); `launch` compiles and enqueues them. See cuda/README.md for the design.
"""
