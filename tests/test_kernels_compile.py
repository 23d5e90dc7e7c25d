"""Every CUDA kernel compiles for sm_90 (the lent H200), every op and quant type, without a single
warning, with NVRTC loaded through ctypes from the nvidia-cuda-nvrtc-cu12 wheel (no GPU, no driver,
no CuPy needed). For sm_80 (consumer Ampere and up) the untyped kernels and each typed op for one type
of every block-decoder family: the decoders are shared device functions, so a type compiles for one
architecture as its family does (every type for both took 3.5 minutes of CI).

The source, options and name expressions are exactly what promoe_gguf.kernels.launch gives
cupy.RawModule (launch.module_source), plus the options CuPy itself appends when it compiles
(CUPY_APPENDED_OPTIONS) and the target architecture.
"""
from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import pytest

from promoe_gguf.kernels import launch

ARCHS = ("sm_80", "sm_90")
# one type per decoder family in kernels/cuda/blocks.cuh: legacy 32-blocks, K-quants, the IQ4
# non-linear grids, the IQ1-IQ3 lattice grids, MXFP4
SM80_TYPES = ("Q4_0", "Q8_0", "Q4_K", "Q6_K", "IQ4_XS", "IQ2_XXS", "IQ1_M", "MXFP4")
TYPED = [(op, t, arch) for arch in ARCHS for op in launch.OPS if op not in launch.UNTYPED_OPS
         for t in launch.SUPPORTED if arch == "sm_90" or t.name in SM80_TYPES]
# cupy/cuda/compiler.py appends these to every NVRTC compile (plus -arch for the device it runs on)
CUPY_APPENDED_OPTIONS = ("-ftz=true", "--device-as-default-execution-space")


def _load_nvrtc():
    try:
        spec = importlib.util.find_spec("nvidia.cuda_nvrtc")
    except ModuleNotFoundError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("NVRTC wheel not installed: pip install nvidia-cuda-nvrtc-cu12 (in the project's dev extra)")
    libs = []
    for loc in spec.submodule_search_locations:
        libs += [p for p in sorted((Path(loc) / "lib").glob("libnvrtc.so*"))
                 if "builtins" not in p.name and ".alt." not in p.name]
    if not libs:
        pytest.skip(f"NVRTC wheel found at {list(spec.submodule_search_locations)} but without libnvrtc.so")
    lib = ctypes.CDLL(str(libs[-1]))
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    return lib


@pytest.fixture(scope="module")
def nvrtc():
    return _load_nvrtc()


def nvrtc_compile(lib, code: str, filename: str, options: tuple[str, ...], name_expressions=None):
    """(result code, log, cubin bytes, {name expression: lowered name})"""
    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), code.encode(), filename.encode(), 0, None, None)
    assert rc == 0, lib.nvrtcGetErrorString(rc).decode()
    try:
        for ne in name_expressions or ():
            assert lib.nvrtcAddNameExpression(prog, ne.encode()) == 0
        opts = [o.encode() for o in options]
        rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        n = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
        log = ctypes.create_string_buffer(n.value)
        lib.nvrtcGetProgramLog(prog, log)
        cubin, lowered = b"", {}
        if rc == 0:
            lib.nvrtcGetCUBINSize(prog, ctypes.byref(n))
            buf = ctypes.create_string_buffer(n.value)
            lib.nvrtcGetCUBIN(prog, buf)
            cubin = buf.raw
            for ne in name_expressions or ():
                p = ctypes.c_char_p()
                lib.nvrtcGetLoweredName(prog, ne.encode(), ctypes.byref(p))
                lowered[ne] = p.value.decode()
        return rc, log.value.decode(errors="replace"), cubin, lowered
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _check_compiles(nvrtc, op, qtype, arch):
    src = launch.module_source(op, qtype)
    what = f"{op} {getattr(qtype, 'name', 'untyped')} {arch}"
    options = src.options + CUPY_APPENDED_OPTIONS + (f"--gpu-architecture={arch}",)
    rc, log, cubin, lowered = nvrtc_compile(nvrtc, src.code, launch.OPS[op], options, src.name_expressions)
    assert rc == 0, f"{what}: NVRTC failed ({nvrtc.nvrtcGetErrorString(rc).decode()}):\n{log}"
    assert log.strip() == "", f"{what}: compiler output (warnings fail the check):\n{log}"
    symbols = set(lowered.values()) | set(src.kernel_names)
    missing = [k for k in symbols if k.encode() + b"\0" not in cubin]
    assert not missing, f"{what}: entry points missing from the cubin: {missing}"


@pytest.mark.parametrize("op,qtype,arch", TYPED, ids=[f"{o}-{t.name}-{a}" for o, t, a in TYPED])
def test_kernel_compiles_without_warnings(nvrtc, op, qtype, arch):
    _check_compiles(nvrtc, op, qtype, arch)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("op", sorted(launch.UNTYPED_OPS))
def test_untyped_kernel_compiles_without_warnings(nvrtc, op, arch):
    assert set(SM80_TYPES) <= {t.name for t in launch.SUPPORTED}
    _check_compiles(nvrtc, op, None, arch)


def test_nvrtc_reports_warnings(nvrtc):
    """The check above would see a warning: NVRTC puts them in the log."""
    code = 'extern "C" __global__ void k(float* y) { int unused_but_set = 0; unused_but_set = 1; y[0] = 1.0f; }\n' \
           'extern "C" __global__ void k2(float* y) { float a[2]; y[0] = a[1]; }\n' \
           '__device__ int f() { }\n'
    rc, log, _, _ = nvrtc_compile(nvrtc, code, "w.cu", ("--gpu-architecture=sm_90",))
    assert rc == 0 and "warning" in log, log
