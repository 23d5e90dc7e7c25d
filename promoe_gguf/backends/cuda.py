"""The CUDA backend: the CuPy kernels of kernels/cuda/*.cu on weights kept in their GGUF blocks.

    linear / linears   1..8 tokens: matvec kernels (q, k and v of one quant type in one launch),
                       activations quantized to 8 bits once per product (dp4a, llama.cpp's mmvq
                       arithmetic) or kept in fp32 (`activations="f32"`, the dequantized-twin
                       arithmetic); more tokens: the matrix dequantized a tile of rows at a time
                       into a bounded workspace and multiplied with cuBLAS. F32/F16/BF16: torch.
    embed              get_rows: the token rows dequantized, token ids read on the device.
    rope / store_kv    positions read on the device, angles from tables built once; the KV cache
    / attention        is fp16 (llama.cpp's default; fp32 selectable); decode attention is a split
                       kernel over the cache (grouped heads share K/V, nothing is copied); prefill
                       runs SDPA over the cache upcast to fp32.
    moe / moe_pairs    a layer's routed experts from the router's ids on the device through a slot
    / moe_combine      table (no host read): gate+up+SiLU, then down with the weighted slot sum in
                       the same launch, or per pair (hybrid: the CPU's rows added by moe_combine).
    rms_norm           one launch (add_rms_norm also does the residual add before it).

Nothing in a decode step reads the device on the host, allocates outside torch's allocator or
depends on a Python value that changes from step to step, so a step is captured once as a CUDA
graph and replayed (backends/graph.py). Host code only plans launches (kernels/plans.py) and hands
them to `launcher`: CuPy on a GPU, or in tests the CPU build of the same kernels, which runs this
whole code path without a GPU. A kernel that fails to compile or launch is reported once, by name
and quant type, and that (kernel, quant type) then runs through torch instead.
"""
from __future__ import annotations

import contextlib

import logging
import time
from functools import lru_cache

import torch
import torch.nn.functional as F

from ..errors import ModelError, ParameterError, clip
from ..format.quants import dequantize_torch
from ..kernels import launch as L
from ..kernels import plans as P
from . import torch_ops
from .base import FLOAT_TYPES, OAI_ALPHA, OAI_LIMIT, SWIGLU, BackendBase, ExpertFn, ExpertStack, QMatrix
from .base import kv_layout as layout_of

log = logging.getLogger("promoe.cuda")

TILE_BYTES = 32 << 20        # prefill dequantization workspace (one tile of rows of one matrix)
ATTN_QUERY_BLOCK = 256       # prefill attention takes its queries in blocks: scores [H, block, context] at a time
# a prefill step's attention block (projections, RoPE, KV store, attention, output projection) and each
# expert's FFN run this many tokens at a time, the router and the expert seam over the whole step: the
# step can be long (a missed expert crosses the link once per step) while the intermediates stay a
# chunk's size (memory.activation_bytes)
PREFILL_CHUNK = 1024
ACTIVATIONS = ("q8", "f32")


def tile_bytes(qtype, rows: int, cols: int, elt: int = 4) -> int:
    """Workspace one prefill product over a quantized [rows, cols] matrix needs (0 for float weights)."""
    if qtype in FLOAT_TYPES:
        return 0
    return max(1, min(rows, TILE_BYTES // (cols * elt))) * cols * elt


@lru_cache(maxsize=4096)
def _layout(d: int, n_ff: int, gate, up, down) -> P.ExpertLayout:
    return P.ExpertLayout(n_embd=d, n_ff=n_ff, gate=gate, up=up, down=down)


def _heads(t: torch.Tensor) -> P.Heads:
    """A [T, H, D] fp32 tensor with unit stride along D, by pointer and strides."""
    if t.dtype != torch.float32 or t.stride(-1) != 1:
        raise ModelError(f"expected fp32 heads with contiguous rows, got {t.dtype} strides {t.stride()}")
    return P.Heads(t.data_ptr(), t.shape[1], t.stride(0), t.stride(1))


class CudaBackend(BackendBase):
    kind = "cuda"
    weights_in_place = False                    # every weight copied to the device once
    prefill_chunk = PREFILL_CHUNK

    def __init__(self, device, launcher=None, prefill_dtype=torch.float32, activations: str = "q8",
                 kv_type: str = "f16"):
        super().__init__()
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if activations not in ACTIVATIONS:
            raise ParameterError("activations", f"{clip(activations)} is not one of {', '.join(ACTIVATIONS)}")
        self.launcher = launcher or L.run
        self.emulated = launcher is not None and self.device.type == "cpu"   # tests: the kernels' CPU build
        self.activations = activations
        self.kv_layout = layout_of("cuda", kv_type)
        self.prefill_dtype = prefill_dtype       # dequantized tiles: float32 (exact) or float16 (tensor cores)
        self.failed: dict[tuple, str] = {}      # (kernel op, quant type) -> why it runs through torch now
        self.tile: torch.Tensor | None = None   # workspace, grown on demand up to TILE_BYTES
        self._consts: dict = {}                 # small device constants built once (id tables, RoPE tables)
        self._graph_pool = None
        self.graphs = self.device.type == "cuda" or self.emulated

    @property
    def workspace_bytes(self) -> int:
        return 0 if self.tile is None else self.tile.numel() * self.tile.element_size()

    def reserve(self, nbytes: int) -> None:
        elt = torch.finfo(self.prefill_dtype).bits // 8
        if nbytes > self.workspace_bytes:
            self.tile = torch.empty(nbytes // elt, dtype=self.prefill_dtype, device=self.device)

    # ---- host <-> device -----------------------------------------------------------------------
    def host_buffer(self, shape, dtype) -> torch.Tensor:
        """Page-locked host memory (device copies from and to it run asynchronously, and capture)."""
        return torch.zeros(shape, dtype=dtype, pin_memory=self.device.type == "cuda")

    def sync(self) -> None:
        self._may_wait("a wait for the device")
        self.host_syncs += 1
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    @contextlib.contextmanager
    def capture_stream(self):
        """CUDA: record on a side stream that waits for the current one (torch.cuda.graph's protocol);
        the emulation records where it is."""
        if self.device.type != "cuda":
            yield
            return
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        torch.cuda.synchronize(self.device)
        with torch.cuda.stream(side):
            yield

    def new_graph(self):
        """A graph to record the next stretch of work into: CUDA graphs share one memory pool
        (they replay in the order they were recorded); the emulation records on the CPU."""
        from .graph import CudaGraph, EmulatedGraph
        if self.emulated:
            return EmulatedGraph(self)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        return CudaGraph(self.device, self._graph_pool)

    # ---- launching, with a torch fallback ------------------------------------------------------
    def _launch(self, launches: list, op: str, qtype) -> bool:
        """Run `launches`; False (after one warning) if this (op, qtype) failed now or before."""
        key = (op, None if qtype is None else int(qtype))
        if key in self.failed:
            return False
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            self.launcher(launches, self.device)
        except Exception as e:  # noqa: BLE001 - any compile or launch failure degrades to torch
            name = getattr(qtype, "name", qtype)
            self.failed[key] = f"{type(e).__name__}: {e}"
            log.warning("CUDA kernel %s for %s failed (%s); it runs through torch from now on",
                        launches[0].name if launches else op, name or "any type", self.failed[key])
            return False
        finally:
            if self.emulated:                   # the emulation runs kernels on this thread: device time
                self.device_s += time.perf_counter() - t0
                self.device_cpu_s += time.thread_time() - c0
        self.launches += len(launches)
        return True

    def _const(self, key, make):
        t = self._consts.get(key)
        if t is None:
            t = self._consts[key] = make()
        return t

    # ---- activations -----------------------------------------------------------------------------
    def _act(self, x: torch.Tensor):
        """x [T, n] fp32 contiguous -> the activations a matvec reads: F32Act, or quantized (Q8Act)."""
        T, n = x.shape
        f32 = P.F32Act(x.data_ptr(), n)
        if self.activations == "f32" or "quantize" in {k[0] for k in self.failed}:
            return f32, x
        xq = torch.empty((T, n), dtype=torch.int8, device=self.device)
        xd = torch.empty((T, n // P.Q8_BLOCK), dtype=torch.float32, device=self.device)
        q8 = P.Q8Act(xq.data_ptr(), n, xd.data_ptr(), n // P.Q8_BLOCK)
        if not self._launch(P.plan_quantize_q8(f32, n, T, q8), "quantize", None):
            return f32, x
        return q8, (x, xq, xd)

    # ---- linear --------------------------------------------------------------------------------
    def linear(self, x: torch.Tensor, w: QMatrix) -> torch.Tensor:
        """x [T, cols] -> [T, rows] (fp32); 3-D W [B, rows, cols] takes x [B, T, cols] -> [B, T, rows]."""
        return self.linears(x, [w])[0]

    def linears(self, x: torch.Tensor, ws) -> tuple:
        """x @ W^T for several weights sharing x (q, k, v): up to three quantized matrices of one
        type in one launch, the input quantized once."""
        outs: list = [None] * len(ws)
        groups: dict = {}
        for i, w in enumerate(ws):
            if w.qtype in FLOAT_TYPES:
                wt = w.data.view(FLOAT_TYPES[w.qtype]) if w.data.dtype == torch.uint8 else w.data
                wt = wt.view(w.shape)
                outs[i] = torch.matmul(x.to(wt.dtype), wt.transpose(-1, -2)).float()
            elif len(w.shape) == 3:
                outs[i] = self._linear_heads(_f32(x), w)
            else:
                groups.setdefault(w.qtype, []).append(i)
        if not groups:
            return tuple(outs)
        x = _f32(x)
        T = x.shape[0]
        if T > L.MAX_NCOLS:
            for idx in groups.values():
                for i in idx:
                    outs[i] = self._tiled_gemm(x, ws[i])
            return tuple(outs)
        act, keep = self._act(x)
        for qtype, idx in groups.items():
            for j in range(0, len(idx), 3):
                part = idx[j:j + 3]
                ys = [torch.empty((T, ws[i].rows), dtype=torch.float32, device=self.device) for i in part]
                plan = P.plan_matvec(qtype, x.shape[1], T, [P.MatvecTarget(ws[i].addr, ws[i].rows, y.data_ptr(),
                                                                           ws[i].rows) for i, y in zip(part, ys)], act)
                ok = self._launch(plan, "matvec", qtype)
                for i, y in zip(part, ys):
                    outs[i] = y if ok else x @ dequantize_torch(ws[i].data, ws[i].qtype, ws[i].shape).T
        del keep
        return tuple(outs)

    def router(self, x: torch.Tensor, w: QMatrix, gating: str):
        logits = self.linear(x, w)
        return logits, (torch.sigmoid(logits) if gating == "sigmoid" else torch.softmax(logits, dim=-1))

    def _tiled_gemm(self, x: torch.Tensor, w: QMatrix) -> torch.Tensor:
        """Prefill: W dequantized a tile of rows at a time, each tile times x^T by cuBLAS (y^T rows)."""
        dt = self.prefill_dtype
        elt = torch.finfo(dt).bits // 8
        need = tile_bytes(w.qtype, w.rows, w.cols, elt)
        tile_rows = need // (w.cols * elt)
        if self.tile is None or self.workspace_bytes < need or self.tile.dtype != dt:
            self.tile = torch.empty(need // elt, dtype=dt, device=self.device)
        xt = x.to(dt).T.contiguous()                                    # [cols, T]
        yt = torch.empty((w.rows, x.shape[0]), dtype=dt, device=self.device)
        rb = w.row_bytes
        for r0 in range(0, w.rows, tile_rows):
            n = min(tile_rows, w.rows - r0)
            tile = self.tile[:n * w.cols].view(n, w.cols)
            plan = P.plan_dequant(w.qtype, (n, w.cols), w.addr + r0 * rb, tile.data_ptr(), w.cols, dt == torch.float16)
            if not self._launch(plan, "dequant", w.qtype):
                return x @ dequantize_torch(w.data, w.qtype, w.shape).T
            torch.mm(tile, xt, out=yt[r0:r0 + n])
        return yt.T.float().contiguous()

    def _linear_heads(self, x: torch.Tensor, w: QMatrix) -> torch.Tensor:
        """A stack of per-head matrices W [B, rows, cols], x [B, T, cols] -> [B, T, rows]: one
        moe_matvec launch over the (head, token) pairs (pair b * T + t reads matrix b)."""
        B, T = x.shape[0], x.shape[1]
        ids = self._const(("head_ids", B, T), lambda: torch.arange(B, device=self.device).repeat_interleave(T))
        table = self._const(("identity", B), lambda: torch.arange(B, dtype=torch.int32, device=self.device))
        y = torch.empty((B * T, w.rows), dtype=torch.float32, device=self.device)
        xs = x.reshape(B * T, w.cols)
        route = P.Route(ids.data_ptr(), table.data_ptr(), 0, 1)
        plan = P.plan_moe_matvec(w.qtype, w.rows, w.cols, route, B * T, w.addr, w.rows * w.row_bytes,
                                 P.F32Act(xs.data_ptr(), w.cols), 1, 0, y.data_ptr(), w.rows)
        if self._launch(plan, "moe", w.qtype):
            return y.view(B, T, w.rows)
        return torch.matmul(x, dequantize_torch(w.data, w.qtype, w.shape).transpose(-1, -2))

    # ---- attention -----------------------------------------------------------------------------
    def causal_mask(self, n_past: int, T: int):
        """Only prefill (more than 8 tokens, SDPA) needs a mask; the decode kernel bounds each
        query by its position."""
        return torch_ops.causal_mask(n_past, T, self.device) if T > L.MAX_NCOLS else None

    def positions(self, n_past: int, T: int) -> torch.Tensor:
        return torch.arange(n_past, n_past + T, dtype=torch.int32, device=self.device)

    def prepare(self, step, rope) -> None:
        self._rope_tables(rope, step.cache.n_alloc)          # built once; a step captured later finds them

    def _rope_tables(self, spec, n_pos: int):
        """(cos, sin) [n_pos, n_dims / 2] fp32 for positions 0..n_pos-1, computed as torch_ops.rope_tables
        (float64 angles, magnitude folded in) once per spec and length."""
        def make():
            theta, mscale = spec.theta("cpu")
            ang = torch.arange(n_pos, dtype=torch.float64)[:, None] * theta[None, :]
            return ((torch.cos(ang) * mscale).float().to(self.device), (torch.sin(ang) * mscale).float().to(self.device))
        return self._const(("rope", spec, n_pos), make)

    def rope(self, x: torch.Tensor, spec, step) -> torch.Tensor:
        return self.rope_many((x,), spec, step)[0]

    def rope_many(self, xs, spec, step) -> tuple:
        """RoPE of each x [T, heads, D] at the step's positions (on the device): new tensors."""
        cos, sin = self._rope_tables(spec, step.cache.n_alloc)
        outs = []
        for i in range(0, len(xs), 2):
            part = [_f32_rows(x) for x in xs[i:i + 2]]
            ys = [torch.empty(x.shape, dtype=torch.float32, device=self.device) for x in part]
            D = part[0].shape[-1]
            if any(x.shape[-1] != D for x in part):
                ys = [self.rope_many((x,), spec, step)[0] for x in part]
            else:
                plan = P.plan_rope([_heads(x) for x in part], [_heads(y) for y in ys], part[0].shape[0], D, spec.n_dims,
                                   spec.kind != "norm", step.pos.data_ptr(), cos.data_ptr(), sin.data_ptr())
                if not self._launch(plan, "rope", None):
                    tables = torch_ops.rope_tables(spec, step.pos.long())
                    ys = [torch_ops.rope(x, spec, tables) for x in part]
            outs += ys
        return tuple(outs)

    def store_kv(self, cache, layer: int, k: torch.Tensor, v: torch.Tensor, step) -> None:
        """k [T, Hkv, Dk], v [T, Hkv, Dv] into the cache at the step's positions (on the device)."""
        k, v = _f32_rows(k), _f32_rows(v)
        kc, vc = cache.k[layer], cache.v[layer]
        plan = P.plan_kv_store(_heads(k), _heads(v), k.shape[0], k.shape[2], v.shape[2], step.pos.data_ptr(),
                               kc.data_ptr(), vc.data_ptr(), cache.n_alloc, kc.element_size())
        if not self._launch(plan, "attention", None):
            p = step.pos.long()
            kc[:, p] = k.transpose(0, 1).to(kc.dtype)
            vc[:, p] = v.transpose(0, 1).to(vc.dtype)

    def softmax(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x.float(), dim=-1)

    def delta_net(self, qkv, z, beta, alpha, net, conv_state, ssm_state) -> torch.Tensor:
        """Gated linear attention in torch on the device (a loop over the step's tokens; one in decode),
        states updated in place, so a decode step records and replays it."""
        return torch_ops.delta_net(qkv, z, beta, alpha, net, conv_state, ssm_state)

    def attention(self, q, cache, layer: int, step, scale: float, sinks=None, window: int = 0) -> torch.Tensor:
        """q [T, H, Dk] against the cache -> [T, H*Dv]. Up to 8 tokens: the split kernel, query t seeing
        positions 0..pos[t]; more (prefill): SDPA over the first n_past + T positions in fp32. With
        sinks or a window (gpt-oss): torch over the cache, masked from the positions on the device
        (the kernels have neither yet)."""
        T, H, _ = q.shape
        K, V = cache.k[layer], cache.v[layer]                # [Hkv, n, Dk], [Hkv, n, Dv]
        if sinks is not None or window:
            # a decode step reads the whole cache, masked, eager or recorded (a recording cannot know
            # n_past): the same products over the same lengths, so eager and replayed logits are
            # bitwise equal (cuBLAS picks its reduction by length; the H200 showed them apart)
            end = cache.n_alloc if step.n_past is None or T <= L.MAX_NCOLS else step.n_past + T
            return torch_ops.attention_sinks(q, K[:, :end], V[:, :end], step.pos, scale, sinks, window)
        hkv, dk, dv = K.shape[0], K.shape[2], V.shape[2]
        if T <= L.MAX_NCOLS:
            q = _f32_rows(q)
            n_split = P.attention_splits(cache.n_alloc)
            part_o = torch.empty((T, H, n_split, dv), dtype=torch.float32, device=self.device)
            part_ml = torch.empty((T, H, n_split, 2), dtype=torch.float32, device=self.device)
            out = torch.empty((T, H * dv), dtype=torch.float32, device=self.device)
            plan = P.plan_attention(_heads(q), T, hkv, dk, dv, K.data_ptr(), V.data_ptr(), cache.n_alloc,
                                    K.element_size(), step.pos.data_ptr(), scale, part_o.data_ptr(), part_ml.data_ptr(),
                                    out.data_ptr(), H * dv)
            if self._launch(plan, "attention", None):
                return out
            end = int(step.pos[-1]) + 1                         # fallback: the positions read on the host
            mask = torch.arange(end, device=self.device)[None, :] <= step.pos.long()[:, None]
            return torch_ops.attention(q, K[:, :end].float(), V[:, :end].float(), mask, scale)
        end = step.n_past + T
        Kf, Vf, q = K[:, :end].float(), V[:, :end].float(), q.float()
        if T <= ATTN_QUERY_BLOCK:
            return torch_ops.attention(q, Kf, Vf, step.mask, scale)
        # queries a block at a time: a block's scores against the context, not the whole chunk's
        return torch.cat([torch_ops.attention(q[lo:lo + ATTN_QUERY_BLOCK], Kf, Vf, step.mask[lo:lo + ATTN_QUERY_BLOCK], scale)
                          for lo in range(0, T, ATTN_QUERY_BLOCK)])

    def sigmoid(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x)

    # ---- embeddings, norms ---------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor, w: QMatrix) -> torch.Tensor:
        if w.data.dtype != torch.uint8 or w.qtype in FLOAT_TYPES:
            table = w.data.view(FLOAT_TYPES[w.qtype]) if w.data.dtype == torch.uint8 else w.data
            return table.view(w.shape)[tokens.long()].float()
        ids = tokens if tokens.dtype == torch.int32 else tokens.to(torch.int32)
        y = torch.empty((ids.numel(), w.cols), dtype=torch.float32, device=self.device)
        if self._launch(P.plan_get_rows(w.qtype, w.shape, w.addr, ids.data_ptr(), ids.numel(), y.data_ptr(), w.cols),
                        "dequant", w.qtype):
            return y
        rows = w.data.view(w.rows, -1)[ids.long()]
        return dequantize_torch(rows, w.qtype, (ids.numel(), w.cols))

    def rms_norm(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        x = _f32(x)
        n = x.shape[-1]
        y = torch.empty_like(x)
        plan = P.plan_rms_norm(x.numel() // n, n, x.data_ptr(), n, w.data_ptr(), y.data_ptr(), n, eps)
        if self._launch(plan, "norm", None):
            return y
        return torch_ops.rms_norm(x, w, eps)

    def add_rms_norm(self, x, r, w, eps: float, scale: float = 1.0):
        x, r = _f32(x), _f32(r)
        n = x.shape[-1]
        s, y = torch.empty_like(x), torch.empty_like(x)
        plan = P.plan_add_rms_norm(x.numel() // n, n, x.data_ptr(), r.data_ptr(), scale, s.data_ptr(),
                                   w.data_ptr(), y.data_ptr(), eps)
        if self._launch(plan, "norm", None):
            return s, y
        s = x + (r * scale if scale != 1.0 else r)
        return s, torch_ops.rms_norm(s, w, eps)

    # ---- experts -------------------------------------------------------------------------------
    def ffn(self, x: torch.Tensor, gate: QMatrix, up: QMatrix, down: QMatrix) -> torch.Tensor:
        """down(silu(gate x) * up x): a dense FFN or a shared expert."""
        return self.expert_ffn(x, gate, up, down)

    def expert_ffn(self, x: torch.Tensor, gate: QMatrix, up: QMatrix, down: QMatrix, fn: ExpertFn = SWIGLU):
        """One routed expert's tokens; `fn` its own activation and bias rows ([1, n]). More tokens
        than prefill_chunk go a chunk at a time: the [T, n_ff] intermediates stay a chunk's size
        (memory.activation_bytes), the weights are read again per chunk from device memory."""
        n = self.prefill_chunk
        if n and x.shape[0] > n:
            return torch.cat([self.expert_ffn(x[lo:lo + n], gate, up, down, fn) for lo in range(0, x.shape[0], n)])
        g, u = self.linears(x, [gate, up])
        if not fn.bias:
            return self.linear(F.silu(g) * u, down)
        gb, ub, db = fn.bias
        return self.linear(_expert_act(fn, g + gb, u + ub), down) + db

    def _gate_up(self, x: torch.Tensor, stack: ExpertStack, route: P.Route, n_pairs: int):
        """h [n_pairs, n_ff] = silu(gate x) * up x of each pair the route computes, or None."""
        g, u, dn = stack.gate, stack.up, stack.down
        layout = _layout(g.cols, g.rows, g.qtype, u.qtype, dn.qtype)
        act, keep = self._act(x)
        h = torch.empty((n_pairs, g.rows), dtype=torch.float32, device=self.device)
        if layout.gate == layout.up and g.stride == u.stride:
            plan = P.plan_moe_gate_up(layout, route, n_pairs, g.addr, u.addr, g.stride, act, h.data_ptr(), g.rows)
            return h if self._launch(plan, "moe", g.qtype) else None
        gu = torch.empty((2, n_pairs, g.rows), dtype=torch.float32, device=self.device)
        for i, m in enumerate((g, u)):
            plan = P.plan_moe_matvec(m.qtype, m.rows, m.cols, route, n_pairs, m.addr, m.stride, act, route.n_slots, 0,
                                     gu[i].data_ptr(), m.rows)
            if not self._launch(plan, "moe", m.qtype):
                return None
        del keep
        return F.silu(gu[0]) * gu[1]

    def moe(self, x: torch.Tensor, stack: ExpertStack, ids: torch.Tensor, weights: torch.Tensor,
            table: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, d], ids [T, k] (the router's choice, on the device), weights [T, k] -> [T, d]:
        every chosen expert on the device at stack position table[e] (None: e itself). Two launches
        (gate+up, then down with the slot-ordered weighted sum), plus one per quantized input."""
        x, w = _f32(x), _f32(weights)
        T, k = ids.shape
        table = table if table is not None else self._identity(stack.gate.count)
        ids = ids.contiguous()
        if stack.fn.bias:
            y, done = self._moe_biased(x, stack, ids, w, table, None)
            return self.moe_combine(y, done, None, w)
        route = P.Route(ids.data_ptr(), table.data_ptr(), 0, k)
        h = self._gate_up(x, stack, route, T * k)
        dn = stack.down
        if h is not None:
            layout = _layout(stack.gate.cols, stack.gate.rows, stack.gate.qtype, stack.up.qtype, dn.qtype)
            hact, keep = self._act(h)
            out = torch.empty((T, dn.rows), dtype=torch.float32, device=self.device)
            plan = P.plan_moe_down_combine(layout, route, T, dn.addr, dn.stride, hact, w.data_ptr(), out.data_ptr(),
                                           dn.rows)
            if self._launch(plan, "moe", dn.qtype):
                return out
        return self._moe_torch(x, stack, ids, table, None, w)[0]

    def moe_pairs(self, x: torch.Tensor, stack: ExpertStack, ids: torch.Tensor, weights: torch.Tensor,
                  table: torch.Tensor, skip: torch.Tensor | None):
        """The pairs this device computes (their expert in the table, not skipped): (y [T*k, d]
        weighted outputs, done [T*k] int32: 1 where computed). The rest come from the CPU."""
        x, w = _f32(x), _f32(weights)
        T, k = ids.shape
        ids = ids.contiguous()
        if stack.fn.bias:
            return self._moe_biased(x, stack, ids, w, table, skip)
        route = P.Route(ids.data_ptr(), table.data_ptr(), 0 if skip is None else skip.data_ptr(), k)
        n = T * k
        dn = stack.down
        y = torch.empty((n, dn.rows), dtype=torch.float32, device=self.device)
        done = torch.empty(n, dtype=torch.int32, device=self.device)
        h = self._gate_up(x, stack, route, n)
        if h is not None:
            hact, keep = self._act(h)
            plan = P.plan_moe_matvec(dn.qtype, dn.rows, dn.cols, route, n, dn.addr, dn.stride, hact, 1, w.data_ptr(),
                                     y.data_ptr(), dn.rows, done.data_ptr())
            if self._launch(plan, "moe", dn.qtype):
                return y, done
        return self._moe_torch(x, stack, ids, table, skip, w)

    def moe_combine(self, y: torch.Tensor, done: torch.Tensor, ext: torch.Tensor | None,
                    weights: torch.Tensor) -> torch.Tensor:
        """[T, d]: each token's slots added in slot order, a pair's output from y where done, plus
        weights * ext (the CPU's unweighted rows [T, k, d], zero where the CPU took no part)."""
        w = _f32(weights)
        T, k = w.shape
        n = y.shape[-1]
        out = torch.empty((T, n), dtype=torch.float32, device=self.device)
        plan = P.plan_moe_combine(done.data_ptr(), y.data_ptr(), 0 if ext is None else ext.data_ptr(), w.data_ptr(),
                                  T, k, n, out.data_ptr())
        if self._launch(plan, "moe_combine", None):
            return out
        return torch_ops.moe_combine(y, done, ext, w)

    def _moe_biased(self, x, stack: ExpertStack, ids, w, table, skip):
        """(y [T*k, d] weighted, done [T*k]) for experts with biases (gpt-oss): gate, up and down are
        the routed matvec kernels (unscaled); biases, picked by expert id, and the clamped SwiGLU in
        torch between them, all on the device."""
        T, k = ids.shape
        n = T * k
        g, u, dn = stack.gate, stack.up, stack.down
        gb, ub, db = stack.fn.bias
        e = ids.reshape(-1).long()
        route = P.Route(ids.data_ptr(), table.data_ptr(), 0 if skip is None else skip.data_ptr(), k)
        act, keep = self._act(x)
        gu = torch.empty((2, n, g.rows), dtype=torch.float32, device=self.device)
        done = torch.empty(n, dtype=torch.int32, device=self.device)
        ok = all(self._launch(P.plan_moe_matvec(m.qtype, m.rows, m.cols, route, n, m.addr, m.stride, act, k, 0,
                                                gu[i].data_ptr(), m.rows, done.data_ptr()), "moe", m.qtype)
                 for i, m in enumerate((g, u)))
        del keep
        if ok:
            h = _f32(_expert_act(stack.fn, gu[0] + gb[e], gu[1] + ub[e]))
            hact, keep = self._act(h)
            y = torch.empty((n, dn.rows), dtype=torch.float32, device=self.device)
            if self._launch(P.plan_moe_matvec(dn.qtype, dn.rows, dn.cols, route, n, dn.addr, dn.stride, hact, 1, 0,
                                              y.data_ptr(), dn.rows), "moe", dn.qtype):
                y = torch.where(done.bool()[:, None], (y + db[e]) * w.reshape(-1, 1), 0.0)
                return y, done
        return self._moe_torch(x, stack, ids, table, skip, w, combine=False)

    def _identity(self, n: int) -> torch.Tensor:
        return self._const(("identity", n), lambda: torch.arange(n, dtype=torch.int32, device=self.device))

    def _moe_torch(self, x, stack: ExpertStack, ids, table, skip, weights, combine: bool = True):
        """Each pair through dequantize + matmul, after a kernel failure.
        Routed on the device (the slot of each pair is gathered there, absent or skipped pairs masked),
        so a decode step with it still records as a graph. One pair at a time: one expert's matrices
        dequantized at once. Returns (out [T, d], None) for moe, (y, done) for moe_pairs."""
        T, k = ids.shape
        flat = ids.reshape(-1).long()
        slots = table.long()[flat]                                                  # [T*k], -1: absent
        present = slots >= 0
        if skip is not None:
            present &= skip.long()[flat] == 0
        slots = slots.clamp(min=0)
        mats = [_stacked_bytes(o, m) for o, m in zip(stack.owners, (stack.gate, stack.up, stack.down))]
        fn = stack.fn
        y = torch.empty((T * k, stack.down.rows), dtype=torch.float32, device=self.device)
        for p in range(T * k):
            g, u, dn = (dequantize_torch(b[slots[p:p + 1]].reshape(-1), m.qtype, (m.rows, m.cols))
                        for b, m in zip(mats, (stack.gate, stack.up, stack.down)))
            xt = x[p // k]
            if fn.bias:                          # biases by expert id, gathered on the device
                gb, ub, db = (b.index_select(0, flat[p:p + 1])[0] for b in fn.bias)
                y[p] = (_expert_act(fn, g @ xt + gb, u @ xt + ub) @ dn.T + db) * weights.reshape(-1)[p]
            else:
                y[p] = (F.silu(g @ xt) * (u @ xt)) @ dn.T * weights.reshape(-1)[p]
        y = torch.where(present[:, None], y, 0.0)                 # a masked pair read a stand-in slot
        done = present.to(torch.int32)
        if skip is None and combine:
            return self.moe_combine(y, done, None, weights), None
        return y, done


def _expert_act(fn: ExpertFn, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    if fn.act == "swiglu_oai":
        return torch_ops.swiglu_oai(g, u, OAI_ALPHA, OAI_LIMIT)
    return F.silu(g) * u


def _stacked_bytes(owner: torch.Tensor, m) -> torch.Tensor:
    """[count, bytes of one matrix] uint8: every expert's matrix of a stack, through `owner`."""
    n = m.rows * m.row_bytes
    return owner.view(-1).as_strided((m.count, n), (m.stride, 1), m.addr - owner.data_ptr())


def _f32(x: torch.Tensor) -> torch.Tensor:
    """fp32, contiguous, 16-byte aligned (what every kernel's activations must be)."""
    x = x.to(torch.float32).contiguous()
    return x if x.data_ptr() % 16 == 0 else x.clone()


def _f32_rows(x: torch.Tensor) -> torch.Tensor:
    """fp32 with unit stride along the last dim (other strides kept: heads are read by stride)."""
    x = x.to(torch.float32)
    return x if x.stride(-1) == 1 else x.contiguous()


__all__ = ["CudaBackend", "tile_bytes", "ACTIVATIONS"]
