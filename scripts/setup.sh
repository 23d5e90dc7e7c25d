#!/usr/bin/env bash
# Set up .venv with everything promoe-gguf needs, from Python and the package registries alone.
# torch is pinned first: on CPU machines 2.13.0 is a local CPU build, so pip never pulls a CUDA build;
# pyproject declares a range, so a GPU machine keeps its own CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q "torch==2.13.0"
# llama-cpp-python compiles from source once (~6-9 min on 2 cores); pip caches the wheel afterwards.
# Its ggml is built for AVX2 (not -march=native): a native build on CPUs with AMX takes ggml's AMX
# matmul path, which crashed llama.cpp itself (SIGSEGV in ggml_backend_amx_mul_mat) on every
# Q4_K model on our 2-core machines; AVX2 also keeps a cached wheel valid on any x86-64 CI machine.
export CMAKE_ARGS=${CMAKE_ARGS:-"-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"}
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} .venv/bin/python -m pip install -q -e ".[dev]"
