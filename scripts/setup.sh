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
# llama-cpp-python compiles from source once (~6 min on 2 cores); pip caches the wheel afterwards.
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} .venv/bin/python -m pip install -q -e ".[dev]"
