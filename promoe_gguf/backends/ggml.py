"""ctypes bindings to the ggml that llama-cpp-python ships (libggml-base, libggml-cpu).

Exactly one ggml lives in a process: this module loads the libraries from the `llama_cpp` package
directory after importing `llama_cpp`, so the dynamic loader hands back the very copies llama.cpp
already uses (a second libggml-base under the same soname would clash). Only the few entry points
the CPU backend needs are declared: contexts, tensors, mul_mat / mul_mat_id / swiglu, graph plan
and compute.

Tensors point at memory we own (GGUF memory maps, torch tensors): a context is created with
`no_alloc` and each leaf's `data` field is set directly. ggml.h has no setter for it, so the field's
offset is found once by asking ggml where it put an allocated tensor's data (and checked against
the header's layout), instead of trusting a hard-coded struct definition.
"""
from __future__ import annotations

import ctypes
import os
import threading

from ..errors import ModelError

GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_I32 = 0, 1, 26
MAX_DIMS = 4

_vp, _i64, _sz = ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t


class InitParams(ctypes.Structure):
    _fields_ = [("mem_size", _sz), ("mem_buffer", _vp), ("no_alloc", ctypes.c_bool)]


class CPlan(ctypes.Structure):
    """struct ggml_cplan (ggml-cpu.h)."""
    _fields_ = [("work_size", _sz), ("work_data", _vp), ("n_threads", ctypes.c_int), ("threadpool", _vp),
                ("abort_callback", _vp), ("abort_callback_data", _vp), ("use_ref", ctypes.c_bool)]


class Lib:
    """The loaded libraries, their signatures and the layout facts of struct ggml_tensor."""

    def __init__(self):
        try:
            import llama_cpp  # noqa: F401 - loads libllama, hence the libggml copies we must reuse
        except ImportError as e:  # pragma: no cover - a dependency of the package
            raise ModelError("the CPU backend needs llama-cpp-python (its ggml computes the quantized matmuls)") from e
        libdir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
        try:
            self.base = ctypes.CDLL(_soname(libdir, "libggml-base"), mode=ctypes.RTLD_GLOBAL)
            self.cpu = ctypes.CDLL(_soname(libdir, "libggml-cpu"), mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            raise ModelError(f"cannot load ggml from llama-cpp-python ({libdir}): {e}") from e
        b, c = self.base, self.cpu
        for name, res, args in (
            ("ggml_init", _vp, [InitParams]),
            ("ggml_free", None, [_vp]),
            ("ggml_set_no_alloc", None, [_vp, ctypes.c_bool]),
            ("ggml_tensor_overhead", _sz, []),
            ("ggml_graph_overhead_custom", _sz, [_sz, ctypes.c_bool]),
            ("ggml_new_tensor_1d", _vp, [_vp, ctypes.c_int, _i64]),
            ("ggml_new_tensor_2d", _vp, [_vp, ctypes.c_int, _i64, _i64]),
            ("ggml_new_tensor_3d", _vp, [_vp, ctypes.c_int, _i64, _i64, _i64]),
            ("ggml_get_data", _vp, [_vp]),
            ("ggml_nbytes", _sz, [_vp]),
            ("ggml_row_size", _sz, [ctypes.c_int, _i64]),
            ("ggml_blck_size", _i64, [ctypes.c_int]),
            ("ggml_type_size", _sz, [ctypes.c_int]),
            ("ggml_mul_mat", _vp, [_vp, _vp, _vp]),
            ("ggml_mul_mat_id", _vp, [_vp, _vp, _vp, _vp]),
            ("ggml_swiglu_split", _vp, [_vp, _vp, _vp]),
            ("ggml_swiglu_oai", _vp, [_vp, _vp, _vp, ctypes.c_float, ctypes.c_float]),
            ("ggml_add_id", _vp, [_vp, _vp, _vp, _vp]),
            ("ggml_soft_max_add_sinks", None, [_vp, _vp]),
            ("ggml_mul", _vp, [_vp, _vp, _vp]),
            ("ggml_add", _vp, [_vp, _vp, _vp]),
            ("ggml_get_rows", _vp, [_vp, _vp, _vp]),
            ("ggml_view_3d", _vp, [_vp, _vp, _i64, _i64, _i64, _sz, _sz, _sz]),
            ("ggml_rms_norm", _vp, [_vp, _vp, ctypes.c_float]),
            ("ggml_soft_max", _vp, [_vp, _vp]),
            ("ggml_soft_max_ext", _vp, [_vp, _vp, _vp, ctypes.c_float, ctypes.c_float]),
            ("ggml_sigmoid", _vp, [_vp, _vp]),
            ("ggml_rope_ext", _vp, [_vp, _vp, _vp, _vp, ctypes.c_int, ctypes.c_int, ctypes.c_int] + [ctypes.c_float] * 6),
            ("ggml_rope_multi", _vp, [_vp, _vp, _vp, _vp, ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.c_int,
                                      ctypes.c_int] + [ctypes.c_float] * 6),
            # gated linear attention (qwen35moe)
            ("ggml_transpose", _vp, [_vp, _vp]),
            ("ggml_cont", _vp, [_vp, _vp]),
            ("ggml_concat", _vp, [_vp, _vp, _vp, ctypes.c_int]),
            ("ggml_reshape_3d", _vp, [_vp, _vp, _i64, _i64, _i64]),
            ("ggml_reshape_4d", _vp, [_vp, _vp, _i64, _i64, _i64, _i64]),
            ("ggml_view_4d", _vp, [_vp, _vp, _i64, _i64, _i64, _i64, _sz, _sz, _sz, _sz]),
            ("ggml_ssm_conv", _vp, [_vp, _vp, _vp]),
            ("ggml_silu", _vp, [_vp, _vp]),
            ("ggml_softplus", _vp, [_vp, _vp]),
            ("ggml_l2_norm", _vp, [_vp, _vp, ctypes.c_float]),
            ("ggml_gated_delta_net", _vp, [_vp, _vp, _vp, _vp, _vp, _vp, _vp, _i64]),
            ("ggml_new_graph_custom", _vp, [_vp, _sz, ctypes.c_bool]),
            ("ggml_build_forward_expand", None, [_vp, _vp]),
            ("ggml_graph_n_nodes", ctypes.c_int, [_vp]),
            ("ggml_graph_node", _vp, [_vp, ctypes.c_int]),
        ):
            f = getattr(b, name)
            f.restype, f.argtypes = res, args
        for name, res, args in (                     # ggml-backend: buffers of the CPU's extra buffer types
            ("ggml_backend_reg_get_proc_address", _vp, [_vp, ctypes.c_char_p]),
            ("ggml_backend_reg_dev_get", _vp, [_vp, _sz]),
            ("ggml_backend_buft_name", ctypes.c_char_p, [_vp]),
            ("ggml_backend_buft_alloc_buffer", _vp, [_vp, _sz]),
            ("ggml_backend_buft_get_alloc_size", _sz, [_vp, _vp]),
            ("ggml_backend_buffer_get_base", _vp, [_vp]),
            ("ggml_backend_buffer_free", None, [_vp]),
            ("ggml_backend_tensor_alloc", ctypes.c_int, [_vp, _vp, _vp]),
            ("ggml_backend_tensor_set", None, [_vp, _vp, _sz, _sz]),
        ):
            f = getattr(b, name)
            f.restype, f.argtypes = res, args
        c.ggml_backend_cpu_reg.restype, c.ggml_backend_cpu_reg.argtypes = _vp, []
        c.ggml_graph_plan.restype, c.ggml_graph_plan.argtypes = CPlan, [_vp, ctypes.c_int, _vp]
        c.ggml_graph_compute.restype, c.ggml_graph_compute.argtypes = ctypes.c_int, [_vp, ctypes.POINTER(CPlan)]
        c.ggml_cpu_init.restype, c.ggml_cpu_init.argtypes = None, []
        c.ggml_cpu_init()
        self.data_offset = self._find_data_offset()

    def _find_data_offset(self) -> int:
        """Offset of `void * data` in struct ggml_tensor, read off a tensor ggml allocated itself."""
        ctx = self.base.ggml_init(InitParams(1 << 16, None, False))
        try:
            t = self.base.ggml_new_tensor_2d(ctx, GGML_TYPE_F32, 4, 4)
            data = self.base.ggml_get_data(t)
            # the words up to and including the expected one: what lies past the struct (the tensor's
            # own uninitialized data, a freed context's bytes) may hold the same address by chance
            words = (ctypes.c_uint64 * 32).from_address(t)
            hits = [8 * i for i in range(32) if words[i] == data]
        finally:
            self.base.ggml_free(ctx)
        # ggml.h: type, buffer, ne[4], nb[4], op, op_params[16], flags, src[10], view_src, view_offs, data
        if hits != [248]:
            raise ModelError(f"unexpected struct ggml_tensor layout in llama-cpp-python's ggml (data at {hits}, "
                             "expected byte 248): this ggml version is not supported")
        return hits[0]

    def extra_buffer_type(self, name: str) -> int | None:
        """One of the CPU device's extra buffer types by name (CPU_REPACK: llama.cpp's weight repacking)."""
        b = self.base
        reg = self.cpu.ggml_backend_cpu_reg()
        fn = b.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
        if not fn:
            return None
        get = ctypes.CFUNCTYPE(ctypes.POINTER(_vp), _vp)(fn)
        arr = get(b.ggml_backend_reg_dev_get(reg, 0))
        i = 0
        while arr and arr[i]:
            if b.ggml_backend_buft_name(arr[i]) == name.encode():
                return arr[i]
            i += 1
        return None

    # ---- tensor fields (ggml.h: type, buffer @8, ne @16, nb @48, ..., data @248, name, extra @320) --
    BUFFER_OFFSET, EXTRA_OFFSET = 8, 320

    def set_data(self, t: int, ptr: int) -> None:
        ctypes.c_void_p.from_address(t + self.data_offset).value = ptr

    def set_buffer_extra(self, t: int, buffer: int | None, extra: int | None) -> None:
        ctypes.c_void_p.from_address(t + self.BUFFER_OFFSET).value = buffer
        ctypes.c_void_p.from_address(t + self.EXTRA_OFFSET).value = extra

    def get_extra(self, t: int) -> int | None:
        return ctypes.c_void_p.from_address(t + self.EXTRA_OFFSET).value

    @staticmethod
    def set_strides(t: int, nb: tuple[int, ...]) -> None:
        """Overwrite nb[0..len(nb)) (bytes); ne comes first: 8-byte type+pad, 8-byte buffer, 4 x int64 ne."""
        arr = (ctypes.c_uint64 * MAX_DIMS).from_address(t + 48)
        for i, v in enumerate(nb):
            arr[i] = v


def _soname(libdir: str, stem: str) -> str:
    """The file the loader knows the library by (libggml-base.so.0), so dlopen returns the copy
    llama.cpp already loaded."""
    names = [n for n in os.listdir(libdir) if n.startswith(stem + ".so")]
    if not names:
        raise ModelError(f"{stem}.so not found in {libdir}")
    versioned = [n for n in names if n != stem + ".so"]
    return os.path.join(libdir, min(versioned or names, key=len))


_lib: Lib | None = None
_lock = threading.Lock()


def lib() -> Lib:
    global _lib
    if _lib is None:
        with _lock:
            if _lib is None:
                _lib = Lib()
    return _lib
