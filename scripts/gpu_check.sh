#!/usr/bin/env bash
# One-shot GPU check of the CUDA kernels: scripts/gpu_check.sh OUT_DIR [ARCHIVE.tar.gz]
#
# On the lent machine only 8 files come back from $OUT, so give an archive there and the results
# folder elsewhere: `bash scripts/gpu_check.sh /tmp/gpu $OUT/gpu_check.tar.gz` (the archive is written
# however the script ends, early exits included).
#
# For a machine with an NVIDIA GPU, CUDA 13, PyTorch (cu130), cupy-cuda13x and Python 3.12, without
# network access; each step has a timeout, all together 9.5 minutes (a device call may run 10). Python packages missing there (gguf, ...) come as wheel files
# in .whl/ next to this checkout. The repo's .venv is not used: set PYTHON to choose an interpreter.
#   1. records the GPU name, driver and date (nvidia-smi)            -> OUT_DIR/env.txt
#   2. checks that PyTorch sees a CUDA device and CuPy imports        -> OUT_DIR/preflight.txt
#   3. python3 -m pytest -m gpu -q                                    -> OUT_DIR/pytest.txt
#   4. scripts/gpu_bench.py: bandwidths, matvec GB/s, uploads         -> OUT_DIR/bench.{json,md}
#   5. scripts/gpu_e2e.py: Engine(device="cuda") end to end: cache, copy stream, fused decode;
#      tokens vs the all-resident run; launches and syncs per token   -> OUT_DIR/e2e.{json,txt}
#   6. promoe bench --vs-llamacpp on a 2-layer Mixtral-8x7B-shaped Q4_K_M model with a 1.2 GB device
#      budget: our lru / promoe / hybrid rows beside stock llama.cpp all on the CPU, -ngl N and
#      --n-cpu-moe N (the committed CUDA bundle, bench/llamacpp-cuda/)  -> OUT_DIR/vs-llamacpp/
#      (GPU_CHECK_VS_LLAMACPP=0 skips it)
# Exit status: 0 all passed; 2 usage or setup error; 3 no CUDA device / CuPy; 1 any test, the bench or
# the end-to-end run failed (each step's exit status is printed at the end).
set -uo pipefail

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: $0 OUT_DIR [ARCHIVE.tar.gz]" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
OUT="$(cd "$1" && pwd)"
if [ $# -eq 2 ]; then
    mkdir -p "$(dirname "$2")" || exit 2
    ARCHIVE="$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"
    trap 'tar czf "$ARCHIVE" -C "$(dirname "$OUT")" "$(basename "$OUT")" && echo "gpu_check: results packed in $ARCHIVE"' EXIT
fi
cd "$(dirname "$0")/.." || exit 2
REPO="$(pwd)"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
        || { echo "ERROR: installing the wheels in .whl/ failed" >&2; exit 2; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

# 1. environment
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "python: $("$PY" --version 2>&1)"
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
        nvidia-smi
    else
        echo "nvidia-smi: not found"
    fi
} > "$OUT/env.txt" 2>&1
head -n 5 "$OUT/env.txt"

# 2. the first GPU call: stop here, clearly, without a usable device
"$PY" - > "$OUT/preflight.txt" 2>&1 <<'PYEOF'
import sys
try:
    import torch
except ImportError:
    sys.exit("ERROR: PyTorch is not installed, so no CUDA device can be used")
if not torch.cuda.is_available():
    sys.exit(f"ERROR: no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, CUDA {torch.version.cuda})")
try:
    import cupy
except ImportError:
    sys.exit("ERROR: CuPy is not installed (cupy-cuda13x for CUDA 13, cupy-cuda12x for CUDA 12)")
import gguf  # noqa: F401  (the kernels' Python side needs it)
print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
      f"cupy {cupy.__version__}; CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}")
PYEOF
rc=$?
cat "$OUT/preflight.txt"
if [ $rc -ne 0 ]; then
    echo "gpu_check: stopped before the tests: no usable CUDA device (see $OUT/preflight.txt)" >&2
    exit 3
fi

# 3. GPU tests (kernels compile on first use; CuPy caches them for the benchmark)
timeout 120 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_kernels_gpu.py tests/test_backend_gpu.py 2>&1 | tee "$OUT/pytest.txt"
test_rc=${PIPESTATUS[0]}
[ "$test_rc" -eq 5 ] && test_rc=0        # no gpu tests collected is not a failure of this check

# 4. benchmark
timeout 120 "$PY" scripts/gpu_bench.py "$OUT" 2>&1 | tee "$OUT/bench.txt"
bench_rc=${PIPESTATUS[0]}

# 5. end to end through the Engine (uses the bandwidths step 4 measured, if it got that far)
D2D=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['d2d_GBps'])" "$OUT/copies.json" 2>/dev/null || echo 4000)
H2D=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['h2d_pinned_GBps'])" "$OUT/copies.json" 2>/dev/null || echo 50)
timeout 160 "$PY" scripts/gpu_e2e.py "$OUT/e2e.json" --tokens 24 --d2d "$D2D" --h2d "$H2D" 2>&1 | tee "$OUT/e2e.txt"
e2e_rc=${PIPESTATUS[0]}

# 6. side by side with stock llama.cpp (CUDA sm_90 bundle) on a real-shape model, same device memory
vs_rc=0
if [ "${GPU_CHECK_VS_LLAMACPP:-1}" != 0 ]; then
    {
        set -e
        mkdir -p /tmp/gpu-check-lc /tmp/gpu-check-models "$OUT/vs-llamacpp"
        tar xJf bench/llamacpp-cuda/llamacpp-cuda.tar.xz -C /tmp/gpu-check-lc
        /tmp/gpu-check-lc/llamacpp-cuda/run.sh llama-bench --list-devices
        M=$("$PY" scripts/make_test_model.py /tmp/gpu-check-models --real-shape mixtral-8x7b --layers 2 | grep '\.gguf$')
        PROMOE_LLAMACPP_BIN=/tmp/gpu-check-lc/llamacpp-cuda timeout 150 "$PY" -m promoe_gguf.cli.main bench "$M" \
            --device cuda --vs-llamacpp --gpu-mem 1.2G --tokens 32 --threads 8 --out "$OUT/vs-llamacpp"
    } 2>&1 | tee "$OUT/vs-llamacpp.txt"
    vs_rc=${PIPESTATUS[0]}
fi

echo "gpu_check: pytest exit $test_rc, bench exit $bench_rc, e2e exit $e2e_rc, vs-llamacpp exit $vs_rc; results in $OUT"
if [ "$test_rc" -ne 0 ] || [ "$bench_rc" -ne 0 ] || [ "$e2e_rc" -ne 0 ] || [ "$vs_rc" -ne 0 ]; then
    echo "gpu_check: FAILED" >&2
    exit 1
fi
exit 0
