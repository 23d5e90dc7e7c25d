#!/usr/bin/env bash
# Fetch the Python wheels scripts/gpu_check.sh needs on the lent GPU machine, which has no network:
# gguf and diskcache from PyPI, and llama-cpp-python as scripts/setup.sh built it here (pip's wheel
# cache returns it at once; AVX2, no CUDA: the hybrid rows' CPU experts run its ggml). Everything else
# the CUDA path imports is in that machine's image. They land in .whl/ (git-ignored, about 21 MB); a
# device run carries them with carry=[".whl"].
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform any -d .whl "gguf==0.19.0" "diskcache>=5.6"
export CMAKE_ARGS=${CMAKE_ARGS:-"-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"}
"$PY" -m pip wheel -q --no-deps -w .whl "llama-cpp-python==0.3.35"
ls -l .whl
