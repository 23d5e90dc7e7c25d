"""The CPU backend: llama.cpp's own CPU kernels through ggml, on the weights in place.

Every op of the forward pass except plain float adds, multiplies and reshapes is a small ggml graph
computed by ggml-cpu, built the way llama.cpp builds it (mul_mat, mul_mat_id + swiglu for a
layer's experts, rms_norm, rope_ext, soft_max_ext attention over a transposed V cache), so
activations are rounded to 8 bits exactly where llama.cpp rounds them and the logits follow
llama.cpp's native run. A graph is built once per signature (op, parameters, the type, shape and
strides of every input) and cached; a call only points its leaves at this call's memory and computes.

Not thread-safe: one backend per computing thread (the scratch work buffer is shared).
"""
from __future__ import annotations

import ctypes
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ModelError
from ..format.quants import dequantize_torch
from . import Backend, ExpertStack, QMatrix, StackedMatrix
from .ggml import GGML_TYPE_F32, GGML_TYPE_I32, CPlan, InitParams, lib

MAX_GRAPHS = 1024      # cached graphs (a few per op signature and token count)
MEM_ALIGN = 64         # padding per tensor in a context (ggml aligns data to 16)
KV_PAD = 32            # attention spans are padded to this many positions, masked (see attention())
TORCH_TO_GGML = {torch.float32: GGML_TYPE_F32, torch.int32: GGML_TYPE_I32}


@dataclass(frozen=True)
class Leaf:
    """A graph input: ggml type, ne (ggml order), nb (bytes)."""
    gtype: int
    ne: tuple[int, ...]
    nb: tuple[int, ...]


def leaf_of(t: torch.Tensor) -> tuple[Leaf, int]:
    """A torch tensor's memory as a ggml tensor (dims reversed: ggml's ne0 is torch's last dim).
    Any strides, but rows must be contiguous (the caller keeps `t` alive through the compute)."""
    if t.device.type != "cpu" or t.stride(-1) != 1:
        raise ModelError(f"the CPU backend needs row-contiguous CPU tensors (got {t.device}, strides {t.stride()})")
    g = TORCH_TO_GGML[t.dtype]
    return Leaf(g, tuple(reversed(t.shape)), tuple(s * t.element_size() for s in reversed(t.stride()))), t.data_ptr()


def leaf_of_weight(w: QMatrix) -> tuple[Leaf, int]:
    """A weight in its GGUF encoding: rows of row_bytes; a 3-D weight is a stack of matrices."""
    rb = w.row_bytes
    if len(w.shape) == 3:
        return Leaf(int(w.qtype), (w.cols, w.rows, w.shape[0]), (0, rb, rb * w.rows)), w.addr
    return Leaf(int(w.qtype), (w.cols, w.rows), (0, rb)), w.addr


def leaf_of_stack(m: StackedMatrix) -> tuple[Leaf, int]:
    """Every expert's matrix of a layer: expert i at addr + i * stride."""
    return Leaf(int(m.qtype), (m.cols, m.rows, m.count), (0, m.row_bytes, m.stride)), m.addr


@dataclass
class _Graph:
    ctx: int
    graph: int
    plan: CPlan
    leaves: tuple[int, ...]
    out: int


class CpuBackend(Backend):
    kind = "cpu"
    kv_layout = (True, KV_PAD)               # V transposed, spans padded: llama.cpp's non-flash layout

    def __init__(self, n_threads: int | None = None):
        super().__init__()
        self.device = torch.device("cpu")
        self.n_threads = max(1, int(n_threads or 1))
        self.g = lib()
        self._graphs: OrderedDict = OrderedDict()
        self._work = torch.empty(0, dtype=torch.uint8)
        self.compute_s = 0.0                 # wall time inside ggml's kernels (benchmarks read it)

    @property
    def workspace_bytes(self) -> int:
        return self._work.numel()

    def reserve(self, nbytes: int) -> None:
        if nbytes > self._work.numel():
            self._work = torch.empty(nbytes, dtype=torch.uint8)

    # ---- graph plumbing ------------------------------------------------------------------------
    def _compute(self, key, inputs: list[tuple[Leaf, int]], build, out: torch.Tensor):
        """Run the cached graph `key` (made by build(ctx, *leaf tensors) on first use) with its leaves
        pointing at `inputs` and its result written into `out`."""
        full_key = (key, tuple(leaf for leaf, _ in inputs))
        gr = self._graphs.get(full_key)
        if gr is None:
            gr = self._build(full_key, [leaf for leaf, _ in inputs], build)
        else:
            self._graphs.move_to_end(full_key)
        set_data = self.g.set_data
        for t, (_, p) in zip(gr.leaves, inputs):
            set_data(t, p)
        set_data(gr.out, out.data_ptr())
        plan = gr.plan
        if plan.work_size > self._work.numel():
            self._work = torch.empty(plan.work_size, dtype=torch.uint8)
        plan.work_data = self._work.data_ptr() if plan.work_size else None
        self.launches += 1
        t0 = time.perf_counter()
        rc = self.g.cpu.ggml_graph_compute(gr.graph, ctypes.byref(plan))
        self.compute_s += time.perf_counter() - t0
        if rc != 0:
            raise RuntimeError(f"ggml graph compute failed with status {rc} ({key[0]})")
        return out

    def _build(self, key, leaves: list[Leaf], build) -> _Graph:
        b = self.g.base
        scratch = self._graph_in(leaves, build, 0, measure=True)       # first pass: sizes only
        gr = self._graph_in(leaves, build, scratch)
        self._graphs[key] = gr
        if len(self._graphs) > MAX_GRAPHS:
            _, old = self._graphs.popitem(last=False)
            b.ggml_free(old.ctx)
        return gr

    def _graph_in(self, leaves: list[Leaf], build, scratch_bytes: int, measure: bool = False):
        """A context holding the leaves (no data: they point at our memory), the graph and, unless
        measuring, room for the intermediate results. Measuring returns the bytes those need."""
        b = self.g.base
        n = len(leaves) + 16
        size = n * (b.ggml_tensor_overhead() + MEM_ALIGN) + b.ggml_graph_overhead_custom(64, False) + scratch_bytes
        ctx = b.ggml_init(InitParams(size, None, True))
        if not ctx:
            raise ModelError(f"ggml could not allocate a graph context of {size} bytes")
        ts = []
        for leaf in leaves:
            fn = (b.ggml_new_tensor_1d, b.ggml_new_tensor_2d, b.ggml_new_tensor_3d)[len(leaf.ne) - 1]
            t = fn(ctx, leaf.gtype, *leaf.ne)
            if any(leaf.nb[1:]):
                nb = [b.ggml_type_size(leaf.gtype), *leaf.nb[1:]]
                while len(nb) < 4:
                    nb.append(nb[-1] * (leaf.ne[len(nb) - 1] if len(nb) - 1 < len(leaf.ne) else 1))
                self.g.set_strides(t, tuple(nb))
            ts.append(t)
        b.ggml_set_no_alloc(ctx, measure)            # intermediate results live in the context
        out = build(ctx, *ts)
        graph = b.ggml_new_graph_custom(ctx, 64, False)
        b.ggml_build_forward_expand(graph, out)
        if measure:
            need = sum(b.ggml_nbytes(b.ggml_graph_node(graph, i)) + MEM_ALIGN for i in range(b.ggml_graph_n_nodes(graph)))
            b.ggml_free(ctx)
            return need
        plan = self.g.cpu.ggml_graph_plan(graph, self.n_threads, None)
        return _Graph(ctx, graph, plan, tuple(ts), out)

    # ---- matrix products -----------------------------------------------------------------------
    def linear(self, x: torch.Tensor, w: QMatrix) -> torch.Tensor:
        """x [T, cols] -> [T, rows]; a 3-D W [B, rows, cols] takes x [B, T, cols] -> [B, T, rows]."""
        x = _f32(x)
        if x.shape[-1] != w.cols or (len(w.shape) == 3) != (x.dim() == 3) or (x.dim() == 3 and x.shape[0] != w.shape[0]):
            raise ModelError(f"{w.name}: activations of shape {tuple(x.shape)} do not fit weight {w.shape}")
        y = torch.empty((*x.shape[:-1], w.rows), dtype=torch.float32)
        mm = self.g.base.ggml_mul_mat
        return self._compute(("mul_mat",), [leaf_of_weight(w), leaf_of(x)], lambda ctx, a, b: mm(ctx, a, b), y)

    def ffn(self, x: torch.Tensor, gate: QMatrix, up: QMatrix, down: QMatrix) -> torch.Tensor:
        """down(silu(gate x) * up x): x [n, d] -> [n, d], as llama.cpp's build_ffn (SILU, PAR): a
        dense FFN or a shared expert."""
        x = _f32(x)
        b = self.g.base

        def build(ctx, lg, lu, ld, lx):
            return b.ggml_mul_mat(ctx, ld, b.ggml_swiglu_split(ctx, b.ggml_mul_mat(ctx, lg, lx), b.ggml_mul_mat(ctx, lu, lx)))
        y = torch.empty((x.shape[0], down.rows), dtype=torch.float32)
        return self._compute(("ffn",), [leaf_of_weight(gate), leaf_of_weight(up), leaf_of_weight(down), leaf_of(x)],
                             build, y)

    def expert_ffn(self, x: torch.Tensor, gate: QMatrix, up: QMatrix, down: QMatrix) -> torch.Tensor:
        """One routed expert over the n tokens routed to it: mul_mat_id over a stack of one, so each
        (token, row) product is the dot product llama.cpp's build_moe_ffn computes (mul_mat would
        take other kernels, llamafile's sgemm among them, and round differently)."""
        x = _f32(x)
        n = x.shape[0]
        one = ExpertStack(*(StackedMatrix(m.qtype, m.rows, m.cols, m.addr, m.rows * m.row_bytes, 1)
                            for m in (gate, up, down)))
        return self._moe_slots(x, one, np.zeros((n, 1), dtype=np.int32))[:, 0]

    def moe(self, x: torch.Tensor, stack: ExpertStack, index: np.ndarray, weights: torch.Tensor) -> torch.Tensor:
        """All routed experts of a layer for T tokens: x [T, d], index [T, k] (positions in `stack`),
        weights [T, k] -> [T, d]. One graph, llama.cpp's build_moe_ffn: mul_mat_id gate and up,
        swiglu, mul_mat_id down; then the slots weighted and added in slot order."""
        x = _f32(x)
        if index.min() < 0 or index.max() >= stack.gate.count:
            raise ModelError(f"expert index out of range 0..{stack.gate.count - 1}: {index.tolist()}")
        return self.combine(self._moe_slots(x, stack, index), weights)

    def moe_rows(self, x_rows: torch.Tensor, stack: ExpertStack, index: np.ndarray) -> torch.Tensor:
        """Expert index[i] of the stack on row i of x_rows: [n, d] -> [n, d] (unweighted)."""
        return self._moe_slots(_f32(x_rows), stack, np.asarray(index).reshape(-1, 1))[:, 0]

    def _moe_slots(self, x: torch.Tensor, stack: ExpertStack, index: np.ndarray) -> torch.Tensor:
        """[T, k, d]: expert index[t, s] of the stack applied to x[t]."""
        T, k = index.shape
        b = self.g.base
        ids = torch.from_numpy(np.ascontiguousarray(index, dtype=np.int32))

        def build(ctx, lg, lu, ld, lx, li):
            h = b.ggml_swiglu_split(ctx, b.ggml_mul_mat_id(ctx, lg, lx, li), b.ggml_mul_mat_id(ctx, lu, lx, li))
            return b.ggml_mul_mat_id(ctx, ld, h, li)                              # [d, k, T]
        slot_out = torch.empty((T, k, stack.down.rows), dtype=torch.float32)
        return self._compute(("moe",), [leaf_of_stack(stack.gate), leaf_of_stack(stack.up), leaf_of_stack(stack.down),
                                        leaf_of(x.view(T, 1, -1)), leaf_of(ids)], build, slot_out)

    # ---- norms, activations --------------------------------------------------------------------
    def rms_norm(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        """ggml_rms_norm then ggml_mul by the weight (llama.cpp's build_norm), over the last dim."""
        x = _f32(x)
        b = self.g.base
        y = torch.empty_like(x)
        return self._compute(("rms_norm", float(eps)), [leaf_of(x), leaf_of(w)],
                             lambda ctx, lx, lw: b.ggml_mul(ctx, b.ggml_rms_norm(ctx, lx, eps), lw), y)

    def add_rms_norm(self, x, r, w, eps: float, scale: float = 1.0):
        """(x + r * scale, rms_norm(that) * w): a residual add followed by the next block's norm."""
        x = x + (r * scale if scale != 1.0 else r)
        return x, self.rms_norm(x, w, eps)

    def softmax(self, x: torch.Tensor) -> torch.Tensor:
        x = _f32(x)
        return self._compute(("soft_max",), [leaf_of(x)], lambda ctx, lx: self.g.base.ggml_soft_max(ctx, lx),
                             torch.empty_like(x))

    def sigmoid(self, x: torch.Tensor) -> torch.Tensor:
        x = _f32(x)
        return self._compute(("sigmoid",), [leaf_of(x)], lambda ctx, lx: self.g.base.ggml_sigmoid(ctx, lx),
                             torch.empty_like(x))

    # ---- attention -----------------------------------------------------------------------------
    def causal_mask(self, n_past: int, T: int) -> torch.Tensor:
        """[T, P'] float32: 0 where allowed, -inf elsewhere, P' = n_past + T rounded up to KV_PAD."""
        span = -(-(n_past + T) // KV_PAD) * KV_PAD
        q = torch.arange(n_past, n_past + T)[:, None]
        return torch.where(torch.arange(span)[None, :] <= q, 0.0, float("-inf")).float()

    def prepare(self, step, rope) -> None:
        step.tables["pos_i32"] = step.pos.to(torch.int32).contiguous()

    def rope(self, x: torch.Tensor, spec, step) -> torch.Tensor:
        """ggml_rope_ext over x [T, heads, D] (the first n_dims of each head rotate)."""
        pos = step.tables.get("pos_i32")
        if pos is None:
            self.prepare(step, spec)
            pos = step.tables["pos_i32"]
        b = self.g.base
        y = torch.empty(x.shape, dtype=torch.float32)
        args = (spec.n_dims, spec.mode, spec.n_ctx_orig, spec.base, spec.freq_scale, spec.ext_factor,
                spec.attn_factor, spec.beta_fast, spec.beta_slow)
        return self._compute(("rope", args), [leaf_of(x.float()), leaf_of(pos)],
                             lambda ctx, lx, lp: b.ggml_rope_ext(ctx, lx, lp, None, *args), y)

    def attention(self, q, cache, layer: int, step, scale: float) -> torch.Tensor:
        """q [T, H, Dk] against the cache's first P' positions -> [T, H*Dv], as llama.cpp's non-flash
        attention: kq = K q, soft_max_ext(kq, mask, scale), kqv = V^T kq. The span P' is padded to
        KV_PAD with masked positions: ggml's F32 dot products then add the same partial sums in the
        same order as llama.cpp's (whose span is padded to 256), so the result is bit-identical."""
        T, H, _ = q.shape
        mask = step.mask
        span = mask.shape[1]
        K = cache.k[layer][:, :span]                       # [Hkv, P', Dk]
        Vt = cache.v[layer][:, :, :span]                   # [Hkv, Dv, P']
        Dv = Vt.shape[1]
        b = self.g.base

        def build(ctx, lq, lk, lv, lm):
            kq = b.ggml_soft_max_ext(ctx, b.ggml_mul_mat(ctx, lk, lq), lm, scale, 0.0)
            return b.ggml_mul_mat(ctx, lv, kq)                          # [Dv, T, H]
        out = torch.empty((H, T, Dv), dtype=torch.float32)
        self._compute(("attention", float(scale)), [leaf_of(_f32(q).transpose(0, 1)), leaf_of(K), leaf_of(Vt), leaf_of(mask)],
                      build, out)
        return out.transpose(0, 1).reshape(T, H * Dv)

    def embed(self, tokens: torch.Tensor, w: QMatrix) -> torch.Tensor:
        rows = w.data.view(w.rows, -1)[tokens.to(w.data.device)]
        return dequantize_torch(rows, w.qtype, (tokens.numel(), w.cols))

    def close(self) -> None:
        for gr in self._graphs.values():
            self.g.base.ggml_free(gr.ctx)
        self._graphs.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _f32(x: torch.Tensor) -> torch.Tensor:
    if x.device.type != "cpu":
        raise ModelError(f"the CPU backend got activations on {x.device}")
    return x.to(torch.float32).contiguous()
