#!/usr/bin/env bash
# One-shot GPU check: scripts/gpu_check.sh OUT_DIR [ARCHIVE.tar.gz]
#
# Everything a GPU can tell the project, in one device call (all steps together about 8 minutes; a
# call may run 10, and the lease has room for one rerun). Results are written as they come: a crash late keeps
# what ran early. On the lent machine only 8 files come back from $OUT, so give an archive there and
# the results folder elsewhere: `bash scripts/gpu_check.sh /tmp/gpu $OUT/gpu_check.tar.gz` (the archive
# is written however the script ends, early exits included).
#
# For a machine with an NVIDIA GPU, CUDA 13, PyTorch (cu130), cupy-cuda13x and Python 3.12, without
# network access. Python packages missing there (gguf, diskcache, the AVX2 llama-cpp-python) come as
# wheel files in .whl/ next to this checkout (scripts/gpu_wheels.sh). The repo's .venv is not used:
# set PYTHON to choose an interpreter.
#   1. the GPU name, driver and date (nvidia-smi)                       -> OUT_DIR/env.txt
#   2. PyTorch sees a CUDA device, CuPy imports                         -> OUT_DIR/preflight.txt
#   3. scripts/gpu_e2e.py: decode through Engine(device="cuda") on real-shape Mixtral-8x7B (2 layers),
#      Qwen3-30B-A3B (4), Qwen1.5-MoE-A2.7B (qwen2moe), DeepSeek-V2-Lite (deepseek2), gpt-oss-20b and
#      Qwen3.5-35B-A3B: us per decode layer eager vs graphs (timed unprofiled), then kernels per token
#      (torch.profiler) and syncs with the line that made each (sync debug mode) over a short pass,
#      replays and host waits per token; graphs == eager bitwise; cache tokens == resident; hybrid with
#      cpu_experts="all" ran CPU experts; llama-bench (the committed CUDA bundle) on the same files,
#      all on the GPU, beside ours                                       -> OUT_DIR/e2e.{json,txt}
#      and our measured per-layer cost as a simulate profile             -> OUT_DIR/h200-measured.json
#   4. (not here: it needs no GPU) the consumer comparison at the measured cost, back on the CPU
#      machine: scripts/sim_results.py --quick --skip-sweeps --layer-cost OUT_DIR/h200-measured.json
#   5. python3 -m pytest -m gpu: the backend's calls on the GPU          -> OUT_DIR/pytest.txt
#   6. scripts/gpu_bench.py: copy bandwidths; CudaBackend.linear per quant type (q8 and fp32
#      activations, Mixtral and Qwen3-30B-A3B expert shapes, 1 and 8 tokens) as a share of the copy
#      bandwidth; CudaBackend.moe routed on the device              -> OUT_DIR/bench.{json,md}, copies.json
#   7. promoe bench --vs-llamacpp on the 2-layer Mixtral with a 1.2 GB device budget: lru / promoe /
#      hybrid beside llama.cpp's -ngl N and --n-cpu-moe N          -> OUT_DIR/vs-llamacpp/
#      (GPU_CHECK_VS_LLAMACPP=0 skips it)
# Exit status: 0 all passed; 2 usage or setup error; 3 no CUDA device / CuPy; 1 any step failed (each
# step's exit status is printed at the end and written to OUT_DIR/status.txt).
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
T0=$(date +%s)
status() { echo "$1 exit $2 at $(( $(date +%s) - T0 )) s" | tee -a "$OUT/status.txt"; }

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
    nproc
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
try:
    import llama_cpp  # noqa: F401
    print("llama-cpp-python: importable (CPU experts run ggml)")
except ImportError as e:
    print(f"llama-cpp-python: missing ({e}): hybrid rows turn CPU experts off")
PYEOF
rc=$?
cat "$OUT/preflight.txt"
if [ $rc -ne 0 ]; then
    echo "gpu_check: stopped before the tests: no usable CUDA device (see $OUT/preflight.txt)" >&2
    exit 3
fi

LC=/tmp/gpu-check-lc/llamacpp-cuda
mkdir -p /tmp/gpu-check-lc && tar xJf bench/llamacpp-cuda/llamacpp-cuda.tar.xz -C /tmp/gpu-check-lc \
    && "$LC/run.sh" llama-bench --list-devices > "$OUT/llamacpp-devices.txt" 2>&1 || LC=""
[ -n "$LC" ] && LCARG="--llamacpp $LC" || LCARG=""

# 3. decode end to end (first: the numbers the project needs most)
timeout 330 "$PY" scripts/gpu_e2e.py "$OUT/e2e.json" --tokens 32 $LCARG --profile-out "$OUT/h200-measured.json" \
    2>&1 | tee "$OUT/e2e.txt"
e2e_rc=${PIPESTATUS[0]}
status e2e "$e2e_rc"

# 4. the simulator needs no GPU: it runs on the CPU machine from h200-measured.json (see the header)

# 5. GPU tests (kernels compile on first use; CuPy caches them for the benchmark)
timeout 100 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_kernels_gpu.py tests/test_backend_gpu.py 2>&1 \
    | tee "$OUT/pytest.txt"
test_rc=${PIPESTATUS[0]}
[ "$test_rc" -eq 5 ] && test_rc=0        # no gpu tests collected is not a failure of this check
status pytest "$test_rc"

# 6. kernel benchmark
timeout 80 "$PY" scripts/gpu_bench.py "$OUT" --types Q4_0,Q8_0,Q4_K,Q5_K,Q6_K,IQ4_XS --iters 30 2>&1 | tee "$OUT/bench.txt"
bench_rc=${PIPESTATUS[0]}
status bench "$bench_rc"

# 7. side by side with stock llama.cpp (CUDA sm_90 bundle) on a real-shape model, same device memory
vs_rc=0
if [ "${GPU_CHECK_VS_LLAMACPP:-1}" != 0 ] && [ -n "$LC" ]; then
    M=$(ls /tmp/promoe-e2e/*mixtral-8x7b-2l-*.gguf 2>/dev/null | head -n 1)
    if [ -n "$M" ]; then
        PROMOE_LLAMACPP_BIN="$LC" timeout 90 "$PY" -m promoe_gguf.cli.main bench "$M" \
            --device cuda --vs-llamacpp --gpu-mem 1.2G --tokens 32 --threads 8 --out "$OUT/vs-llamacpp" \
            > "$OUT/vs-llamacpp.txt" 2>&1
        vs_rc=$?
    else
        echo "vs-llamacpp: no 2-layer Mixtral under /tmp/promoe-e2e (step 3 writes it): not run" | tee "$OUT/vs-llamacpp.txt"
        vs_rc=1
    fi
elif [ "${GPU_CHECK_VS_LLAMACPP:-1}" != 0 ]; then
    echo "vs-llamacpp: the llama.cpp CUDA bundle did not unpack or run (see llamacpp-devices.txt): not run" \
        | tee "$OUT/vs-llamacpp.txt"
    vs_rc=1
fi
status vs-llamacpp "$vs_rc"

echo "gpu_check: e2e $e2e_rc, pytest $test_rc, bench $bench_rc, vs-llamacpp $vs_rc; results in $OUT"
if [ "$e2e_rc" -ne 0 ] || [ "$test_rc" -ne 0 ] || [ "$bench_rc" -ne 0 ] || [ "$vs_rc" -ne 0 ]; then
    echo "gpu_check: FAILED" >&2
    exit 1
fi
exit 0
