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

import contextlib
import ctypes
import logging
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from ..errors import ModelError
from . import torch_ops
from .base import CPU_KV_PAD as KV_PAD
from .base import OAI_ALPHA, OAI_LIMIT, SWIGLU, BackendBase, DeltaNet, ExpertFn, ExpertStack, QMatrix, StackedMatrix
from .base import kv_layout as layout_of
from .ggml import GGML_TYPE_F32, GGML_TYPE_I32, CPlan, InitParams, lib

MAX_GRAPHS = 1024      # cached graphs (a few per op signature and token count)
MEM_ALIGN = 64         # padding per tensor in a context (ggml aligns data to 16)
MAX_NODES = 64         # tensors (views included) one op's graph may make: the delta net's makes ~35
# types ggml's CPU_REPACK buffer may take on x86 (it declines shapes it has no kernel for: checked per weight)
REPACKABLE = {"Q4_0", "Q4_K", "IQ4_NL", "Q8_0", "Q2_K", "Q5_K", "Q6_K", "MXFP4"}
TORCH_TO_GGML = {torch.float32: GGML_TYPE_F32, torch.int32: GGML_TYPE_I32}


class Leaf(NamedTuple):
    """A graph input: ggml type, ne (ggml order), nb (bytes); `repacked`: a weight in llama.cpp's
    CPU_REPACK buffer (its input pointer is then a Repacked handle). A tuple: it is hashed per call."""
    gtype: int
    ne: tuple
    nb: tuple
    repacked: bool = False


@dataclass(frozen=True)
class Repacked:
    """A weight copied into a CPU_REPACK buffer, interleaved for ggml's repack kernels."""
    tensor: int
    buffer: int
    base: int
    extra: int


_LEAVES: dict = {}


def leaf_of(t: torch.Tensor) -> tuple[Leaf, int]:
    """A torch tensor's memory as a ggml tensor (dims reversed: ggml's ne0 is torch's last dim).
    Any strides, but rows must be contiguous (the caller keeps `t` alive through the compute)."""
    key = (t.dtype, t.shape, t.stride())
    leaf = _LEAVES.get(key)
    if leaf is None:
        if t.device.type != "cpu" or t.stride(-1) != 1:
            raise ModelError(f"the CPU backend needs row-contiguous CPU tensors (got {t.device}, strides {t.stride()})")
        es = t.element_size()
        leaf = _LEAVES[key] = Leaf(TORCH_TO_GGML[t.dtype], tuple(t.shape[::-1]), tuple(s * es for s in t.stride()[::-1]))
        if len(_LEAVES) > 65536:
            _LEAVES.clear()
    return leaf, t.data_ptr()


def _weight_leaf(repacked: dict, gtype: int, ne: tuple, nb: tuple, addr: int):
    r = repacked.get((addr, ne))
    if r is not None:
        return Leaf(gtype, ne, (0,) * len(ne), True), r
    return Leaf(gtype, ne, nb), addr


@dataclass
class _Graph:
    ctx: int
    graph: int
    plan: CPlan
    leaves: tuple[int, ...]
    out: int
    data: tuple = ()             # a ctypes handle on each leaf's `data` field, then the output's
    work: int = -1               # the work buffer address the plan holds


class CpuBackend(BackendBase):
    kind = "cpu"
    weights_in_place = True                  # the GGUF's memory map is the weights' memory
    prefill_chunk = None                     # ggml takes a step whole, as llama.cpp its ubatch
    kv_layout = layout_of("cpu")             # llama.cpp's non-flash CPU layout: V transposed, spans padded

    def __init__(self, n_threads: int | None = None):
        super().__init__()
        self.device = torch.device("cpu")
        self.n_threads = max(1, int(n_threads or 1))
        self.g = lib()
        self._graphs: dict = {}
        self._repacked: dict = {}            # (address, ne) of a weight -> Repacked
        self._leaves: dict = {}              # weight -> its graph leaf (after any repacking)
        self._repack_ctx = None
        self._work = torch.empty(0, dtype=torch.uint8)
        self.compute_s = 0.0                 # wall time inside ggml's kernels (benchmarks read it)

    @property
    def workspace_bytes(self) -> int:
        return self._work.numel()

    # ---- weights in llama.cpp's CPU_REPACK layout -----------------------------------------------
    def leaf_of_weight(self, w: QMatrix):
        """A weight in its GGUF encoding (rows of row_bytes; 3-D: a stack of matrices), or its repacked
        copy; memoized per weight (resident weights are asked for every token)."""
        hit = self._leaves.get(id(w))
        if hit is not None and hit[0] is w:
            return hit[1]
        rb = w.pitch or w.row_bytes
        if len(w.shape) == 3:
            leaf = _weight_leaf(self._repacked, int(w.qtype), (w.cols, w.rows, w.shape[0]), (0, rb, rb * w.rows), w.addr)
        else:
            leaf = _weight_leaf(self._repacked, int(w.qtype), (w.cols, w.rows), (0, rb), w.addr)
        self._leaves[id(w)] = (w, leaf)
        return leaf

    def leaf_of_stack(self, m: StackedMatrix):
        """Every expert's matrix of a layer: expert i at addr + i * stride (or the repacked copy)."""
        hit = self._leaves.get(m)
        if hit is None:
            hit = self._leaves[m] = _weight_leaf(self._repacked, int(m.qtype), (m.cols, m.rows, m.count),
                                                 (0, m.row_pitch, m.stride), m.addr)
        return hit

    def repack(self, addr: int, qtype, ne: tuple, nbytes: int) -> bool:
        """Copy a contiguous weight (ne in ggml order) into a CPU_REPACK buffer, as llama.cpp loads it
        by default on AVX2 CPUs: its products then run ggml's repack kernels (other rounding, faster
        batches) exactly as llama.cpp's do. False (nothing kept) where that buffer type declines it."""
        b, g = self.g.base, self.g
        if (addr, ne) in self._repacked:
            return True
        buft = getattr(self, "_buft", None)
        if buft is None:
            buft = self._buft = g.extra_buffer_type("CPU_REPACK") or 0
        if not buft:
            return False
        if self._repack_ctx is None:
            self._repack_ctx = b.ggml_init(InitParams(4096 * (b.ggml_tensor_overhead() + MEM_ALIGN), None, True))
        fn = (b.ggml_new_tensor_1d, b.ggml_new_tensor_2d, b.ggml_new_tensor_3d)[len(ne) - 1]
        t = fn(self._repack_ctx, int(qtype), *ne)
        if b.ggml_nbytes(t) != nbytes:
            return False
        buf = b.ggml_backend_buft_alloc_buffer(buft, b.ggml_backend_buft_get_alloc_size(buft, t))
        base = b.ggml_backend_buffer_get_base(buf)
        if b.ggml_backend_tensor_alloc(buf, t, base) != 0 or not g.get_extra(t):
            b.ggml_backend_buffer_free(buf)               # no repack kernel for this type or shape
            return False
        with _llama_log_quiet():                           # ggml logs every repacked tensor (debug level)
            b.ggml_backend_tensor_set(t, addr, 0, nbytes)
        self._repacked[(addr, ne)] = Repacked(t, buf, base, g.get_extra(t))
        self._leaves.clear()                                   # leaves made before now point at the GGUF bytes
        return True

    def repack_weight(self, w: QMatrix) -> bool:
        if len(w.shape) != 2 or w.pitch or w.qtype.name not in REPACKABLE:
            return False
        return self.repack(w.addr, w.qtype, (w.cols, w.rows), w.nbytes)

    def repack_stack(self, m: StackedMatrix) -> bool:
        if m.stride != m.rows * m.row_bytes or m.pitch or m.qtype.name not in REPACKABLE:
            return False                                   # only a contiguous stack copies as one tensor
        return self.repack(m.addr, m.qtype, (m.cols, m.rows, m.count), m.stride * m.count)

    def reserve(self, nbytes: int) -> None:
        if nbytes > self._work.numel():
            self._work = torch.empty(nbytes, dtype=torch.uint8)

    # ---- graph plumbing ------------------------------------------------------------------------
    def _compute(self, key, inputs: list[tuple[Leaf, int]], build, out):
        """Run the cached graph `key` (made by build(ctx, *leaf tensors) on first use) with its leaves
        pointing at `inputs` and its result (a tuple: results) written into `out` (a tuple: outs)."""
        full_key = (key, tuple([leaf for leaf, _ in inputs]))
        gr = self._graphs.get(full_key)
        if gr is None:
            gr = self._build(full_key, inputs, build)
        for h, t, (leaf, p) in zip(gr.data, gr.leaves, inputs):
            if leaf.repacked:
                h.value = p.base
                self.g.set_buffer_extra(t, p.buffer, p.extra)
            else:
                h.value = p
        if isinstance(out, tuple):
            for h, o in zip(gr.data[len(inputs):], out):
                h.value = o.data_ptr()
        else:
            gr.data[-1].value = out.data_ptr()
        plan = gr.plan
        if plan.work_size:
            if plan.work_size > self._work.numel():
                self._work = torch.empty(plan.work_size, dtype=torch.uint8)
            if gr.work != self._work.data_ptr():
                gr.work = plan.work_data = self._work.data_ptr()
        self.launches += 1
        t0 = time.perf_counter()
        rc = self.g.cpu.ggml_graph_compute(gr.graph, ctypes.byref(plan))
        self.compute_s += time.perf_counter() - t0
        if rc != 0:
            raise RuntimeError(f"ggml graph compute failed with status {rc} ({key[0]})")
        return out

    def _build(self, key, inputs, build) -> _Graph:
        b = self.g.base
        scratch = self._graph_in(inputs, build, 0, measure=True)       # first pass: sizes only
        gr = self._graph_in(inputs, build, scratch)
        outs = gr.out if isinstance(gr.out, tuple) else (gr.out,)
        gr.data = tuple(ctypes.c_void_p.from_address(t + self.g.data_offset) for t in (*gr.leaves, *outs))
        if len(self._graphs) >= MAX_GRAPHS:                           # the oldest graph goes
            b.ggml_free(self._graphs.pop(next(iter(self._graphs))).ctx)
        self._graphs[key] = gr
        return gr

    def _graph_in(self, inputs, build, scratch_bytes: int, measure: bool = False):
        """A context holding the leaves (no data: they point at our memory), the graph and, unless
        measuring, room for the intermediate results. Measuring returns the bytes those need.
        Repacked weights' leaves carry their buffer and kernel traits when planning (work size)."""
        b = self.g.base
        leaves = [leaf for leaf, _ in inputs]
        n = len(leaves) + MAX_NODES
        size = n * (b.ggml_tensor_overhead() + MEM_ALIGN) + b.ggml_graph_overhead_custom(MAX_NODES, False) + scratch_bytes
        ctx = b.ggml_init(InitParams(size, None, True))
        if not ctx:
            raise ModelError(f"ggml could not allocate a graph context of {size} bytes")
        ts = []
        for leaf in leaves:
            fn = (b.ggml_new_tensor_1d, b.ggml_new_tensor_2d, b.ggml_new_tensor_3d)[len(leaf.ne) - 1]
            t = fn(ctx, leaf.gtype, *leaf.ne)
            if not leaf.repacked and any(leaf.nb[1:]):
                nb = [b.ggml_type_size(leaf.gtype), *leaf.nb[1:]]
                while len(nb) < 4:
                    nb.append(nb[-1] * (leaf.ne[len(nb) - 1] if len(nb) - 1 < len(leaf.ne) else 1))
                self.g.set_strides(t, tuple(nb))
            ts.append(t)
        for t, (leaf, p) in zip(ts, inputs):
            if leaf.repacked:
                self.g.set_buffer_extra(t, p.buffer, p.extra)
        b.ggml_set_no_alloc(ctx, measure)            # intermediate results live in the context
        out = build(ctx, *ts)
        graph = b.ggml_new_graph_custom(ctx, MAX_NODES, False)
        for o in (out if isinstance(out, tuple) else (out,)):
            b.ggml_build_forward_expand(graph, o)
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
        return self._compute(("mul_mat",), [self.leaf_of_weight(w), leaf_of(x)], lambda ctx, a, b: mm(ctx, a, b), y)

    def linears(self, x: torch.Tensor, ws) -> tuple:
        """x @ W^T for several weights sharing the input (q, k, v): one graph, one call."""
        x = _f32(x)
        mm = self.g.base.ggml_mul_mat
        outs = tuple(torch.empty((*x.shape[:-1], w.rows), dtype=torch.float32) for w in ws)
        n = len(ws)
        return self._compute(("mul_mats", n), [*(self.leaf_of_weight(w) for w in ws), leaf_of(x)],
                             lambda ctx, *ls: tuple(mm(ctx, lw, ls[n]) for lw in ls[:n]), outs)

    def router(self, x: torch.Tensor, w: QMatrix, gating: str):
        """(logits, probs): the router's product and softmax (or sigmoid) in one graph, as build_moe_ffn."""
        x = _f32(x)
        b = self.g.base
        act = b.ggml_sigmoid if gating == "sigmoid" else b.ggml_soft_max
        logits = torch.empty((x.shape[0], w.rows), dtype=torch.float32)

        def build(ctx, lw, lx):
            lg = b.ggml_mul_mat(ctx, lw, lx)
            return lg, act(ctx, lg)
        return self._compute(("router", gating), [self.leaf_of_weight(w), leaf_of(x)], build,
                             (logits, torch.empty_like(logits)))

    def ffn(self, x: torch.Tensor, gate: QMatrix, up: QMatrix, down: QMatrix) -> torch.Tensor:
        """down(silu(gate x) * up x): x [n, d] -> [n, d], as llama.cpp's build_ffn (SILU, PAR): a
        dense FFN or a shared expert."""
        x = _f32(x)
        b = self.g.base

        def build(ctx, lg, lu, ld, lx):
            return b.ggml_mul_mat(ctx, ld, b.ggml_swiglu_split(ctx, b.ggml_mul_mat(ctx, lg, lx), b.ggml_mul_mat(ctx, lu, lx)))
        y = torch.empty((x.shape[0], down.rows), dtype=torch.float32)
        return self._compute(("ffn",), [self.leaf_of_weight(gate), self.leaf_of_weight(up), self.leaf_of_weight(down),
                                        leaf_of(x)],
                             build, y)

    def expert_ffn(self, x: torch.Tensor, gate: QMatrix, up: QMatrix, down: QMatrix,
                   fn: ExpertFn = SWIGLU) -> torch.Tensor:
        """One routed expert over the n tokens routed to it: mul_mat_id over a stack of one, so each
        (token, row) product is the dot product llama.cpp's build_moe_ffn computes (mul_mat would
        take other kernels, llamafile's sgemm among them, and round differently). `fn`: the
        expert's own (ExpertFn.of)."""
        x = _f32(x)
        n = x.shape[0]
        one = ExpertStack(*(StackedMatrix(m.qtype, m.rows, m.cols, m.addr, m.rows * (m.pitch or m.row_bytes), 1, m.pitch)
                            for m in (gate, up, down)), fn=fn)
        zeros = np.zeros((n, 1), dtype=np.int32)
        return self._moe_slots(x, one, zeros, zeros)[:, 0]

    def moe(self, x: torch.Tensor, stack: ExpertStack, ids: torch.Tensor, weights: torch.Tensor,
            table: torch.Tensor | None = None) -> torch.Tensor:
        """All routed experts of a layer for T tokens: x [T, d], ids [T, k] (expert e at stack position
        table[e]; None: e), weights [T, k] -> [T, d]. One graph, llama.cpp's build_moe_ffn: mul_mat_id
        gate and up, swiglu, mul_mat_id down; then the slots weighted and added in slot order."""
        x = _f32(x)
        index = ids if table is None else table.long()[ids]
        if int(index.min()) < 0 or int(index.max()) >= stack.gate.count:
            raise ModelError(f"expert index out of range 0..{stack.gate.count - 1}: {index.tolist()}")
        scaled = self._moe_slots(x, stack, index.numpy(), ids.numpy()) * weights.unsqueeze(-1)
        out = scaled[:, 0]
        for j in range(1, scaled.shape[1]):
            out = out + scaled[:, j]
        return out

    def moe_pairs(self, x: torch.Tensor, stack: ExpertStack, ids: torch.Tensor, weights: torch.Tensor,
                  table: torch.Tensor, skip: torch.Tensor | None):
        """The pairs whose expert is in the table and not skipped, in one graph over those rows:
        (y [T*k, d] weighted, done [T*k] int32)."""
        x = _f32(x)
        T, k = ids.shape
        index = table.long()[ids]
        present = index >= 0
        if skip is not None:
            present &= skip[ids] == 0
        y = torch.zeros((T * k, stack.down.rows), dtype=torch.float32)
        t, s = np.nonzero(present.numpy())
        if len(t):
            rows = self._moe_slots(x[torch.from_numpy(t)], stack, index.numpy()[t, s].reshape(-1, 1),
                                   ids.numpy()[t, s].reshape(-1, 1))[:, 0]
            y[torch.from_numpy(t * k + s)] = rows * weights[torch.from_numpy(t), torch.from_numpy(s)].unsqueeze(-1)
        return y, present.reshape(-1).to(torch.int32)

    def moe_combine(self, y: torch.Tensor, done: torch.Tensor, ext: torch.Tensor | None,
                    weights: torch.Tensor) -> torch.Tensor:
        return torch_ops.moe_combine(y, done, ext, weights)

    def _moe_slots(self, x: torch.Tensor, stack: ExpertStack, index: np.ndarray, experts: np.ndarray) -> torch.Tensor:
        """[T, k, d]: expert index[t, s] of the stack applied to x[t] (experts[t, s] its expert id,
        which picks its bias rows). A merged gate+up tensor (its experts' gate rows then up rows) is
        one mul_mat_id whose halves are viewed, as llama.cpp does. With stack.fn's biases: add_id
        after each product and the clamped SwiGLU, as build_moe_ffn for gpt-oss."""
        T, k = index.shape
        b = self.g.base
        fn = stack.fn
        ids = torch.from_numpy(np.ascontiguousarray(index, dtype=np.int32))
        g, u, dn = stack.gate, stack.up, stack.down
        slot_out = torch.empty((T, k, dn.rows), dtype=torch.float32)
        xs, li = leaf_of(x.view(T, 1, -1)), leaf_of(ids)
        merged = merged_gate_up(stack)
        if merged is not None and not fn.bias:
            F = g.rows

            def build(ctx, lgu, ld, lx, li):
                gu = b.ggml_mul_mat_id(ctx, lgu, lx, li)                          # [2F, k, T]
                nb1, nb2 = 2 * F * 4, 2 * F * k * 4
                h = self._act(ctx, fn, b.ggml_view_3d(ctx, gu, F, k, T, nb1, nb2, 0),
                              b.ggml_view_3d(ctx, gu, F, k, T, nb1, nb2, F * 4))
                return b.ggml_mul_mat_id(ctx, ld, h, li)
            return self._compute(("moe_merged", fn.act), [self.leaf_of_stack(merged), self.leaf_of_stack(dn), xs, li],
                                 build, slot_out)
        mats = [self.leaf_of_stack(g), self.leaf_of_stack(u), self.leaf_of_stack(dn), xs, li]
        if fn.bias:
            eids = torch.from_numpy(np.ascontiguousarray(experts, dtype=np.int32))
            keep = (eids, *fn.bias)                                   # alive through the compute
            mats += [leaf_of(keep[0]), *(leaf_of(t) for t in fn.bias)]

            def build(ctx, lg, lu, ld, lx, li, le, lgb, lub, ldb):
                h = self._act(ctx, fn, b.ggml_add_id(ctx, b.ggml_mul_mat_id(ctx, lg, lx, li), lgb, le),
                              b.ggml_add_id(ctx, b.ggml_mul_mat_id(ctx, lu, lx, li), lub, le))
                return b.ggml_add_id(ctx, b.ggml_mul_mat_id(ctx, ld, h, li), ldb, le)
            out = self._compute(("moe_biased", fn.act), mats, build, slot_out)
            del keep
            return out

        def build(ctx, lg, lu, ld, lx, li):
            h = self._act(ctx, fn, b.ggml_mul_mat_id(ctx, lg, lx, li), b.ggml_mul_mat_id(ctx, lu, lx, li))
            return b.ggml_mul_mat_id(ctx, ld, h, li)                              # [d, k, T]
        return self._compute(("moe", fn.act), mats, build, slot_out)

    def _act(self, ctx, fn: ExpertFn, gate, up):
        b = self.g.base
        if fn.act == "swiglu_oai":
            return b.ggml_swiglu_oai(ctx, gate, up, OAI_ALPHA, OAI_LIMIT)
        return b.ggml_swiglu_split(ctx, gate, up)

    # ---- norms, activations --------------------------------------------------------------------
    def rms_norm(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        """ggml_rms_norm then ggml_mul by the weight (llama.cpp's build_norm), over the last dim."""
        x = _f32(x)
        b = self.g.base
        y = torch.empty_like(x)
        return self._compute(("rms_norm", float(eps)), [leaf_of(x), leaf_of(w)],
                             lambda ctx, lx, lw: b.ggml_mul(ctx, b.ggml_rms_norm(ctx, lx, eps), lw), y)

    def add_rms_norm(self, x, r, w, eps: float, scale: float = 1.0):
        """(x + r * scale, rms_norm(that) * w): a residual add followed by the next block's norm, one graph."""
        if scale != 1.0:
            r = r * scale                                 # ggml_scale: the same float product
        x, r = _f32(x), _f32(r)
        b = self.g.base

        def build(ctx, lx, lr, lw):
            s = b.ggml_add(ctx, lx, lr)
            return s, b.ggml_mul(ctx, b.ggml_rms_norm(ctx, s, eps), lw)
        return self._compute(("add_rms_norm", float(eps)), [leaf_of(x), leaf_of(r), leaf_of(w)], build,
                             (torch.empty_like(x), torch.empty_like(x)))

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

    def positions(self, n_past: int, T: int) -> torch.Tensor:
        return torch.arange(n_past, n_past + T, dtype=torch.int32)

    def store_kv(self, cache, layer: int, k: torch.Tensor, v: torch.Tensor, step) -> None:
        cache.append(layer, k, v, step.n_past)

    def rope(self, x: torch.Tensor, spec, step) -> torch.Tensor:
        """ggml_rope_ext over x [T, heads, D] (the first n_dims of each head rotate)."""
        return self.rope_many((x,), spec, step)[0]

    def rope_many(self, xs, spec, step) -> tuple:
        """ggml_rope_ext over each x [T, heads, D] (q and k): one graph, one call. IMROPE is
        ggml_rope_multi over llama.cpp's text positions: t, h and w the token's, e zero."""
        pos = step.pos
        b = self.g.base
        tail = (spec.n_ctx_orig, spec.base, spec.freq_scale, spec.ext_factor, spec.attn_factor, spec.beta_fast,
                spec.beta_slow)
        n = len(xs)
        if spec.kind == "imrope":
            pos = step.tables.get("imrope_pos")
            if pos is None:
                pos = step.tables["imrope_pos"] = torch.cat((step.pos, step.pos, step.pos, torch.zeros_like(step.pos)))
            sections = (ctypes.c_int * 4)(*spec.sections)

            def one(ctx, lx, lp):
                return b.ggml_rope_multi(ctx, lx, lp, None, spec.n_dims, sections, spec.mode, *tail)
        else:
            def one(ctx, lx, lp):
                return b.ggml_rope_ext(ctx, lx, lp, None, spec.n_dims, spec.mode, *tail)
        return self._compute(("rope", n, spec), [*(leaf_of(x.float()) for x in xs), leaf_of(pos)],
                             lambda ctx, *ls: tuple(one(ctx, lx, ls[n]) for lx in ls[:n]),
                             tuple(torch.empty(x.shape, dtype=torch.float32) for x in xs))

    def softmax(self, x: torch.Tensor) -> torch.Tensor:
        """ggml_soft_max over the last dim (gpt-oss's weights over the chosen experts)."""
        x = _f32(x).contiguous()
        return self._compute(("soft_max",), [leaf_of(x)], lambda ctx, lx: self.g.base.ggml_soft_max(ctx, lx),
                             torch.empty_like(x))

    def window_mask(self, step, window: int) -> torch.Tensor:
        """step.mask with positions `window` or more behind each query masked too (llama.cpp's
        standard sliding window: p_query - p_key >= window is masked); made once per step."""
        mask = step.tables.get(("window", window))
        if mask is None:
            span = step.mask.shape[1]
            q = torch.arange(step.n_past, step.n_past + step.mask.shape[0])[:, None]
            far = q - torch.arange(span)[None, :] >= window
            mask = step.tables[("window", window)] = step.mask.masked_fill(far, float("-inf"))
        return mask

    def attention(self, q, cache, layer: int, step, scale: float, sinks=None, window: int = 0) -> torch.Tensor:
        """q [T, H, Dk] against the cache's first P' positions -> [T, H*Dv], as llama.cpp's non-flash
        attention: kq = K q, soft_max_ext(kq, mask, scale), kqv = V^T kq. The span P' is padded to
        KV_PAD with masked positions: ggml's F32 dot products then add the same partial sums in the
        same order as llama.cpp's (whose span is padded to 256), so the result is bit-identical."""
        T, H, _ = q.shape
        mask = self.window_mask(step, window) if window else step.mask
        span = mask.shape[1]
        K = cache.k[layer][:, :span]                       # [Hkv, P', Dk]
        Vt = cache.v[layer][:, :, :span]                   # [Hkv, Dv, P']
        Dv = Vt.shape[1]
        b = self.g.base

        def build(ctx, lq, lk, lv, lm, *ls):
            kq = b.ggml_soft_max_ext(ctx, b.ggml_mul_mat(ctx, lk, lq), lm, scale, 0.0)
            if ls:                                                     # gpt-oss: a sink logit per head
                b.ggml_soft_max_add_sinks(kq, ls[0])
            return b.ggml_mul_mat(ctx, lv, kq)                          # [Dv, T, H]
        out = torch.empty((H, T, Dv), dtype=torch.float32)
        leaves = [leaf_of(_f32(q).transpose(0, 1)), leaf_of(K), leaf_of(Vt), leaf_of(mask)]
        if sinks is not None:
            leaves.append(leaf_of(sinks))
        self._compute(("attention", float(scale)), leaves, build, out)
        return out.transpose(0, 1).reshape(T, H * Dv)

    # ---- gated linear attention -----------------------------------------------------------------
    def delta_net(self, qkv, z, beta, alpha, net: DeltaNet, conv_state, ssm_state) -> torch.Tensor:
        """One graph as llama.cpp's qwen35moe builds it (one sequence): ssm_conv over [conv state | qkv^T],
        silu, views of q, k, v, l2_norm, the fused ggml_gated_delta_net (which scales q by S^-1/2), an RMS
        norm per head times silu(z). Writes the new conv and ssm states over the old ones in place
        (the graph reads them before it writes them). Leaves come in the shapes the ops take (a view
        of a leaf would keep the leaf's build-time address)."""
        T, C = qkv.shape
        Hk, Hv, S, K = net.k_heads, net.v_heads, net.head, net.conv.shape[1]
        b, f = self.g.base, 4                                            # float32 bytes

        def build(ctx, lx, lz, lbeta, lalpha, lcs, lss, lw, ldt, la, ln):
            xin = b.ggml_concat(ctx, lcs, lx, 0)                                              # [K-1+T, C, 1]
            row = (K - 1 + T) * f
            new_conv = b.ggml_cont(ctx, b.ggml_view_3d(ctx, xin, K - 1, C, 1, row, row * C, T * f))
            co = b.ggml_silu(ctx, b.ggml_ssm_conv(ctx, xin, lw))                             # [C, T, 1]
            nb1 = C * f
            q = b.ggml_view_4d(ctx, co, S, Hk, T, 1, S * f, nb1, nb1 * T, 0)
            k = b.ggml_view_4d(ctx, co, S, Hk, T, 1, S * f, nb1, nb1 * T, Hk * S * f)
            v = b.ggml_view_4d(ctx, co, S, Hv, T, 1, S * f, nb1, nb1 * T, 2 * Hk * S * f)
            q, k = b.ggml_l2_norm(ctx, q, net.eps), b.ggml_l2_norm(ctx, k, net.eps)
            bt = b.ggml_reshape_4d(ctx, b.ggml_sigmoid(ctx, lbeta), 1, Hv, T, 1)
            g = b.ggml_mul(ctx, b.ggml_softplus(ctx, b.ggml_add(ctx, lalpha, ldt)), la)      # [Hv, T]
            r = b.ggml_gated_delta_net(ctx, q, k, v, b.ggml_reshape_4d(ctx, g, 1, Hv, T, 1), bt, lss, 1)
            o = b.ggml_view_4d(ctx, r, S, Hv, T, 1, S * f, S * Hv * f, S * Hv * T * f, 0)
            new_ssm = b.ggml_cont(ctx, b.ggml_view_3d(ctx, r, S, S, Hv, S * f, S * S * f, S * Hv * T * f))
            gated = b.ggml_mul(ctx, b.ggml_mul(ctx, b.ggml_rms_norm(ctx, o, net.eps), ln), b.ggml_silu(ctx, lz))
            return gated, new_conv, new_ssm
        out = torch.empty((T, Hv * S), dtype=torch.float32)
        def dense(t, shape):                                             # fresh strides (size-1 dims included)
            return torch.empty(shape, dtype=torch.float32).copy_(t.reshape(shape))
        inputs = (dense(qkv.t(), (1, C, T)), dense(z, (T, Hv, S)), dense(beta, (T, Hv, 1)), dense(alpha, (T, Hv)),
                  conv_state.view(1, C, K - 1), ssm_state, net.conv, net.dt_bias, net.a, net.norm)    # alive to the end
        leaves = [leaf_of(t) for t in inputs]
        self._compute(("delta_net", Hk, Hv, S, K, float(net.eps)), leaves, build, (out, conv_state, ssm_state))
        return out

    def embed(self, tokens: torch.Tensor, w: QMatrix) -> torch.Tensor:
        """ggml_get_rows: the token rows dequantized (exactly gguf-py's values)."""
        ids = tokens.to(torch.int32).contiguous()
        y = torch.empty((ids.numel(), w.cols), dtype=torch.float32)
        return self._compute(("get_rows",), [self.leaf_of_weight(w), leaf_of(ids)],
                             lambda ctx, lw, li: self.g.base.ggml_get_rows(ctx, lw, li), y)

    def close(self) -> None:
        b = self.g.base
        for gr in self._graphs.values():
            b.ggml_free(gr.ctx)
        self._graphs.clear()
        for r in self._repacked.values():
            b.ggml_backend_buffer_free(r.buffer)
        self._repacked.clear()
        if self._repack_ctx:
            b.ggml_free(self._repack_ctx)
            self._repack_ctx = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


@contextlib.contextmanager
def _llama_log_quiet():
    """llama-cpp-python prints ggml's log, debug lines included until a Llama(verbose=False) says
    otherwise: hold its logger at ERROR for the duration."""
    lg = logging.getLogger("llama-cpp-python")
    old = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(old)


def merged_gate_up(stack: ExpertStack) -> StackedMatrix | None:
    """The merged [2F] gate+up tensor a stack's gate and up are views of (ffn_gate_up_exps), if so."""
    g, u = stack.gate, stack.up
    rb = g.row_bytes
    if (g.qtype == u.qtype and g.rows == u.rows and g.stride == u.stride == 2 * g.rows * rb
            and u.addr == g.addr + g.rows * rb):
        return StackedMatrix(g.qtype, 2 * g.rows, g.cols, g.addr, g.stride, g.count)
    return None


def _f32(x: torch.Tensor) -> torch.Tensor:
    if x.dtype is torch.float32 and x.is_contiguous():
        return x
    if x.device.type != "cpu":
        raise ModelError(f"the CPU backend got activations on {x.device}")
    return x.to(torch.float32).contiguous()
