#!/usr/bin/env bash
# Build stock llama.cpp's llama-bench and llama-completion (the classic CLI; this version's llama-cli
# needs the whole server) from the llama.cpp that llama-cpp-python 0.3.35 vendors, so comparison runs
# use exactly the llama.cpp our oracle tests load.
#
#   scripts/build_llamacpp.sh [--cuda] OUT_DIR
#
# One CMake tree for both flavours, with dynamically loaded backends (GGML_BACKEND_DL, as llama.cpp's
# own release builds): libllama / libggml do not change with the backend, so the CUDA flavour only
# adds the ggml-cuda module to an already built CPU tree.
# CPU flavour: AVX2 without -march=native, the flags scripts/setup.sh gives llama-cpp-python (a native
#   build on our AMX CPUs crashed llama.cpp). OUT_DIR: llama-bench, llama-completion and their shared
#   libraries (libggml-cpu.so is the CPU backend module), RUNPATH $ORIGIN: runs from any directory.
# CUDA flavour (--cuda): as above plus libggml-cuda.so for sm_90 only (H200; "90-real": SASS only, the
#   PTX would double the code for no GPU we are lent), nvcc 13 from the system, cuBLAS headers from
#   the `nvidia-cublas` wheel (pip --target into the work dir), and a link-time stub of libcuda.so.1
#   generated from cuda.h (this machine has no driver; the GPU machine's is loaded at run time).
#   Bundled: libcudart.so.13 and libgomp.so.1. NOT bundled: libcublas/libcublasLt (57 + 552 MB), which
#   the GPU machine's image has (nvidia-cublas in its python, the CUDA toolkit); OUT_DIR/run.sh finds
#   them there and runs a binary. Also writes OUT_DIR.tar.xz, the carryable bundle.
#   Note: with dynamic backends a CUDA module that fails to load leaves llama.cpp on the CPU without
#   an error; promoe_gguf.bench.llamacpp checks the backend llama-bench reports.
#
# Measured on the 2-core CPU machine (shared with other jobs, load average ~5; nice 19, -j2), 2026-12-02:
#   CPU:  19 min wall (1151 s; 13 min of CPU time), 258 steps; OUT_DIR 13 MB.
#   CUDA: 88 min wall more on top of the CPU tree (5281 s; 56 min of CPU time), 142 steps, nearly all
#         ggml-cuda's template instances; so ~107 min from nothing. Bundle: 49 MB unpacked,
#         21 MB as .tar.xz (libggml-cuda.so alone is 39 MB). Far over 20 minutes, so the bundle is
#         committed: bench/llamacpp-cuda/llamacpp-cuda.tar.xz (see the README.md there).
#   Needs glibc >= 2.34 and libstdc++ of GCC >= 12 (GLIBCXX_3.4.30) where it runs.
#
# Env: LLAMACPP_WORK (default build/llamacpp: sdist, sources, build tree, cuBLAS wheel), JOBS (2).
set -euo pipefail

LCP_VERSION=0.3.35
REPO=$(cd "$(dirname "$0")/.." && pwd)
CUDA=0
if [ "${1:-}" = "--cuda" ]; then CUDA=1; shift; fi
[ $# -eq 1 ] || { echo "usage: $0 [--cuda] OUT_DIR" >&2; exit 2; }
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
if [ -n "$(ls -A "$OUT")" ] && [ ! -f "$OUT/BUILD_INFO" ]; then
    echo "$OUT is not empty and holds no BUILD_INFO: not overwriting it" >&2; exit 1
fi
WORK=${LLAMACPP_WORK:-$REPO/build/llamacpp}
JOBS=${JOBS:-2}
PY=${PYTHON:-python3}
[ -x "$REPO/.venv/bin/python" ] && PY=$REPO/.venv/bin/python
mkdir -p "$WORK"
T0=$(date +%s)

# 1. the vendored llama.cpp, from the sdist pip would build llama-cpp-python from
SRC=$WORK/llama_cpp_python-$LCP_VERSION/vendor/llama.cpp
if [ ! -f "$SRC/CMakeLists.txt" ]; then
    [ -f "$WORK/sdist/llama_cpp_python-$LCP_VERSION.tar.gz" ] ||
        "$PY" -m pip download -q "llama-cpp-python==$LCP_VERSION" --no-deps --no-binary :all: -d "$WORK/sdist"
    tar xzf "$WORK/sdist/llama_cpp_python-$LCP_VERSION.tar.gz" -C "$WORK"
fi
[ -f "$SRC/CMakeLists.txt" ] || { echo "no vendor/llama.cpp in the llama-cpp-python $LCP_VERSION sdist" >&2; exit 1; }

# only what llama-bench / llama-completion need: no server, web UI (it would download one), tests
ARGS=(-G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_BACKEND_DL=ON
      -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF
      -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF
      -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON "-DCMAKE_INSTALL_RPATH=\$ORIGIN")
TARGETS=(llama-bench llama-completion ggml-cpu)

if [ $CUDA = 1 ]; then
    CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
    NVCC=$(command -v nvcc || echo "$CUDA_HOME/bin/nvcc")
    [ -x "$NVCC" ] || { echo "nvcc not found (the CUDA 13 toolkit is needed)" >&2; exit 1; }
    CUBLAS=$WORK/cublas/nvidia/cu13
    if [ ! -f "$CUBLAS/include/cublas_v2.h" ]; then
        "$PY" -m pip install -q --no-deps --target "$WORK/cublas" "nvidia-cublas>=13,<14"
    fi
    for l in cublas cublasLt; do ln -sf "lib$l.so.13" "$CUBLAS/lib/lib$l.so"; done
    # link-time stub of the driver library: every cu* entry point cuda.h declares, as an empty function
    STUB=$WORK/cuda-stub
    if [ ! -f "$STUB/libcuda.so" ]; then
        mkdir -p "$STUB"
        echo '#include <cuda.h>' | gcc -E -P -I"$CUDA_HOME/include" -x c - \
            | grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | sed 's/[[:space:]]*($//' | sort -u \
            | sed 's/.*/void &(void) {}/' >"$STUB/stub.c"
        gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$STUB/libcuda.so" "$STUB/stub.c"
    fi
    # cuBLAS headers go to nvcc only: CMAKE_CXX_FLAGS must stay as the CPU flavour set them, or the
    # whole tree would rebuild
    ARGS+=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90-real -DCMAKE_CUDA_COMPILER="$NVCC"
           -DCUDAToolkit_ROOT="$CUDA_HOME" "-DCMAKE_CUDA_FLAGS=-I$CUBLAS/include"
           -DCUDA_cublas_LIBRARY="$CUBLAS/lib/libcublas.so" -DCUDA_cublasLt_LIBRARY="$CUBLAS/lib/libcublasLt.so"
           -DCUDA_cuda_driver_LIBRARY="$STUB/libcuda.so")
    TARGETS+=(ggml-cuda)
else
    ARGS+=(-DGGML_CUDA=OFF)
fi

B=$WORK/build
nice -n 19 cmake -S "$SRC" -B "$B" "${ARGS[@]}" >"$WORK/cmake-$([ $CUDA = 1 ] && echo cuda || echo cpu).log"
nice -n 19 cmake --build "$B" -j "$JOBS" --target "${TARGETS[@]}"

# 2. OUT_DIR: binaries + our shared libs, flat; RUNPATH is $ORIGIN already (CMAKE_INSTALL_RPATH)
rm -rf "${OUT:?}"/* "$OUT.tar.xz"
for t in llama-bench llama-completion; do install -m 755 "$B/bin/$t" "$OUT/$t"; done
for f in "$B"/bin/lib*.so*; do
    case "$(basename "$f")" in libggml-cuda*) [ $CUDA = 1 ] || continue ;; esac
    cp -P "$f" "$OUT/"
done
if [ $CUDA = 0 ]; then
    echo "llama.cpp (llama-cpp-python $LCP_VERSION vendor), CPU AVX2, built $(date -u +%FT%TZ), this run $(( $(date +%s) - T0 )) s" \
        >"$OUT/BUILD_INFO"
    cat "$OUT/BUILD_INFO"
    exit 0
fi
cp -L "$CUDA_HOME/lib64/libcudart.so.13" "$OUT/"
cp -L "$(gcc -print-file-name=libgomp.so.1)" "$OUT/"      # ggml-cpu's OpenMP, in case the image lacks it
strip --strip-unneeded "$OUT"/llama-* "$OUT"/lib*.so* 2>/dev/null || true
cat >"$OUT/run.sh" <<'EOF'
#!/usr/bin/env bash
# run.sh BINARY [ARGS...]: put this machine's libcublas.so.13 on the library path, then run a bundled binary.
# run.sh --ldd: show how the CUDA backend module's libraries resolve (llama.cpp skips a module that fails
# to load without saying why).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
BIN=$1; shift
find_cublas() {
    local d py
    for d in ${CUBLAS_LIB_DIR:-} /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu; do
        [ -e "$d/libcublas.so.13" ] && { echo "$d"; return; }
    done
    for py in python3 /opt/torch/.venv/bin/python3; do
        d=$("$py" -c 'import nvidia, os; print(*[os.path.join(p, "cu13", "lib") for p in nvidia.__path__], sep="\n")' 2>/dev/null | head -1) || true
        [ -n "$d" ] && [ -e "$d/libcublas.so.13" ] && { echo "$d"; return; }
    done
    find / -xdev -name libcublas.so.13 -printf '%h\n' 2>/dev/null | head -1
}
D=$(find_cublas)
[ -n "$D" ] || { echo "run.sh: libcublas.so.13 not found on this machine (set CUBLAS_LIB_DIR)" >&2; exit 1; }
export LD_LIBRARY_PATH="$HERE:$D${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
[ "$BIN" = "--ldd" ] && exec ldd "$HERE/libggml-cuda.so"
exec "$HERE/$BIN" "$@"
EOF
chmod 755 "$OUT/run.sh"
echo "llama.cpp (llama-cpp-python $LCP_VERSION vendor), CUDA sm_90 + CPU AVX2, $("$NVCC" --version | grep -o 'release [0-9.]*'), built $(date -u +%FT%TZ), this run $(( $(date +%s) - T0 )) s" \
    >"$OUT/BUILD_INFO"
tar -C "$(dirname "$OUT")" -cf - "$(basename "$OUT")" | xz -T"$JOBS" -9 >"$OUT.tar.xz"
echo "bundle: $(du -sh "$OUT" | cut -f1) unpacked, $(du -h "$OUT.tar.xz" | cut -f1) as $OUT.tar.xz" | tee -a "$OUT/BUILD_INFO"
