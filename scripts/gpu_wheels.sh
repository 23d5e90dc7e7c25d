#!/usr/bin/env bash
# Fetch the Python wheels scripts/gpu_check.sh needs on the lent GPU machine, which has no network:
# gguf (everything else promoe-gguf's CUDA path imports is in that machine's image). They land in
# .whl/ (git-ignored); a device run carries them with carry=[".whl"].
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform any -d .whl "gguf==0.19.0"
ls -l .whl
