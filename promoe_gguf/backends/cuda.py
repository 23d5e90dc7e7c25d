"""The CUDA backend: the CuPy kernels of kernels/cuda/*.cu on weights kept in their GGUF blocks.

    linear         1..8 tokens: matvec kernels (fp32 activations); more: the matrix is dequantized a
                   tile of rows at a time into a bounded workspace and multiplied with cuBLAS, so no
                   full float copy of a matrix ever exists. F32/F16/BF16 weights: torch in their dtype.
    moe            a layer's routed experts in one fused launch sequence over a device table of
                   matrix addresses (gate+up+SiLU, down x routing weight, slot-ordered combine).
    rms_norm       one launch (add_rms_norm also does the residual add before it).

Host code only plans launches (kernels/launch.py) and hands them to `launcher`: CuPy on a GPU, or
in tests the CPU build of the same kernels, which runs this whole code path without a GPU. A kernel
that fails to compile or launch is reported once, by name and quant type, and that (kernel, quant
type) then runs through torch (dequantize + matmul) instead of crashing the forward pass.
"""
from __future__ import annotations

import logging
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ModelError
from ..format.quants import dequantize_torch
from ..kernels import launch as L
from . import FLOAT_TYPES, Backend, ExpertStack, QMatrix
from . import torch_ops

log = logging.getLogger("promoe.cuda")

TILE_BYTES = 32 << 20        # prefill dequantization workspace (one tile of rows of one matrix)


def tile_bytes(qtype, rows: int, cols: int, elt: int = 4) -> int:
    """Workspace one prefill product over a quantized [rows, cols] matrix needs (0 for float weights)."""
    if qtype in FLOAT_TYPES:
        return 0
    return max(1, min(rows, TILE_BYTES // (cols * elt))) * cols * elt


@lru_cache(maxsize=4096)
def _layout(d: int, n_ff: int, gate, up, down) -> L.ExpertLayout:
    return L.ExpertLayout(n_embd=d, n_ff=n_ff, gate=gate, up=up, down=down)


class CudaBackend(Backend):
    kind = "cuda"

    def __init__(self, device, launcher=None, prefill_dtype=torch.float32):
        super().__init__()
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.launcher = launcher or L.run
        self.prefill_dtype = prefill_dtype       # dequantized tiles: float32 (exact) or float16 (tensor cores)
        self.failed: dict[tuple, str] = {}      # (kernel op, quant type) -> why it runs through torch now
        self.tile: torch.Tensor | None = None   # workspace, grown on demand up to TILE_BYTES
        self._tables: dict = {}                 # per-head address tables of 3-D weights
        pin = self.device.type == "cuda"
        self._staging = [torch.empty(L.MAX_NCOLS * 64 * 3, dtype=torch.int64, pin_memory=pin) for _ in range(4)]
        self._next_staging = 0

    @property
    def workspace_bytes(self) -> int:
        return 0 if self.tile is None else self.tile.numel() * self.tile.element_size()

    def reserve(self, nbytes: int) -> None:
        elt = torch.finfo(self.prefill_dtype).bits // 8
        if nbytes > self.workspace_bytes:
            self.tile = torch.empty(nbytes // elt, dtype=self.prefill_dtype, device=self.device)

    # ---- launching, with a torch fallback ------------------------------------------------------
    def _launch(self, launches: list, op: str, qtype) -> bool:
        """Run `launches`; False (after one warning) if this (op, qtype) failed now or before."""
        key = (op, None if qtype is None else int(qtype))
        if key in self.failed:
            return False
        try:
            self.launcher(launches, self.device)
        except Exception as e:  # noqa: BLE001 - any compile or launch failure degrades to torch
            name = getattr(qtype, "name", qtype)
            self.failed[key] = f"{type(e).__name__}: {e}"
            log.warning("CUDA kernel %s for %s failed (%s); it runs through torch from now on",
                        launches[0].name if launches else op, name or "any type", self.failed[key])
            return False
        self.launches += len(launches)
        return True

    # ---- linear --------------------------------------------------------------------------------
    def linear(self, x: torch.Tensor, w: QMatrix) -> torch.Tensor:
        """x [T, cols] -> [T, rows] (fp32); 3-D W [B, rows, cols] takes x [B, T, cols] -> [B, T, rows]."""
        if w.qtype in FLOAT_TYPES:
            wt = w.data.view(FLOAT_TYPES[w.qtype]).view(w.shape) if w.data.dtype == torch.uint8 else w.data
            return torch.matmul(x.to(wt.dtype), wt.transpose(-1, -2)).float()
        x = _f32(x)
        if len(w.shape) == 3:
            return self._linear_heads(x, w)
        T = x.shape[0]
        y = torch.empty((T, w.rows), dtype=torch.float32, device=x.device)
        if T <= L.MAX_NCOLS:
            plan = L.plan_matvec(w.qtype, w.shape, T, w.addr, x.data_ptr(), w.cols, y.data_ptr(), w.rows)
            if self._launch(plan, "matvec", w.qtype):
                return y
        else:
            yt = self._tiled_gemm(x, w)
            if yt is not None:
                return yt
        return x @ dequantize_torch(w.data, w.qtype, w.shape).T

    def linears(self, x: torch.Tensor, ws) -> tuple:
        return tuple(self.linear(x, w) for w in ws)

    def router(self, x: torch.Tensor, w: QMatrix, gating: str):
        logits = self.linear(x, w)
        return logits, (torch.sigmoid(logits) if gating == "sigmoid" else torch.softmax(logits, dim=-1))

    def _tiled_gemm(self, x: torch.Tensor, w: QMatrix) -> torch.Tensor | None:
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
            plan = L.plan_dequant(w.qtype, (n, w.cols), w.addr + r0 * rb, tile.data_ptr(), w.cols, dt == torch.float16)
            if not self._launch(plan, "dequant", w.qtype):
                return None
            torch.mm(tile, xt, out=yt[r0:r0 + n])
        return yt.T.float().contiguous()

    def _linear_heads(self, x: torch.Tensor, w: QMatrix) -> torch.Tensor:
        """A stack of per-head matrices (B of them): one moe_matvec launch over (head, token) pairs."""
        B, T = x.shape[0], x.shape[1]
        key = (w.addr, w.shape, T)
        table = self._tables.get(key)
        if table is None:
            stride = w.rows * w.row_bytes
            addr = np.repeat(w.addr + stride * np.arange(B, dtype=np.int64), T)       # pair p = b * T + t
            table = torch.from_numpy(np.stack([addr, addr, addr], axis=1)).to(self.device)
            self._tables[key] = table
        y = torch.empty((B * T, w.rows), dtype=torch.float32, device=x.device)
        xs = x.reshape(B * T, w.cols)
        plan = [L._moe_matvec(L.supported_qtype(w.qtype), 0, w.rows, w.cols, B * T, table.data_ptr(), xs.data_ptr(),
                              w.cols, 1, 0, y.data_ptr(), w.rows)]
        if self._launch(plan, "moe", w.qtype):
            return y.view(B, T, w.rows)
        return torch.matmul(x, dequantize_torch(w.data, w.qtype, w.shape).transpose(-1, -2))

    # ---- attention -----------------------------------------------------------------------------
    kv_layout = (False, 1)                      # V not transposed, no padding: SDPA reads views

    def causal_mask(self, n_past: int, T: int):
        return torch_ops.causal_mask(n_past, T, self.device)

    def prepare(self, step, rope) -> None:
        step.tables[rope] = torch_ops.rope_tables(rope, step.pos)     # once per step, for every layer

    def rope(self, x: torch.Tensor, spec, step) -> torch.Tensor:
        tables = step.tables.get(spec)
        if tables is None:
            tables = step.tables[spec] = torch_ops.rope_tables(spec, step.pos)
        return torch_ops.rope(x, spec, tables)

    def rope_many(self, xs, spec, step) -> tuple:
        return tuple(self.rope(x, spec, step) for x in xs)

    def attention(self, q, cache, layer: int, step, scale: float) -> torch.Tensor:
        end = step.n_past + step.n_tokens
        return torch_ops.attention(q, cache.k[layer][:, :end], cache.v[layer][:, :end], step.mask, scale)

    def softmax(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x, dim=-1)

    def sigmoid(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x)

    # ---- embeddings, norms ---------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor, w: QMatrix) -> torch.Tensor:
        if w.data.dtype != torch.uint8:
            return w.data[tokens].float()
        rows = w.data.view(w.rows, -1)[tokens]
        return dequantize_torch(rows, w.qtype, (tokens.numel(), w.cols))

    def rms_norm(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        x = _f32(x)
        n = x.shape[-1]
        y = torch.empty_like(x)
        plan = L.plan_rms_norm(x.numel() // n, n, x.data_ptr(), n, w.data_ptr(), y.data_ptr(), n, eps)
        if self._launch(plan, "norm", None):
            return y
        return torch_ops.rms_norm(x, w, eps)

    def add_rms_norm(self, x, r, w, eps: float, scale: float = 1.0):
        x, r = _f32(x), _f32(r)
        n = x.shape[-1]
        s, y = torch.empty_like(x), torch.empty_like(x)
        plan = L.plan_add_rms_norm(x.numel() // n, n, x.data_ptr(), r.data_ptr(), scale, s.data_ptr(),
                                   w.data_ptr(), y.data_ptr(), eps)
        if self._launch(plan, "norm", None):
            return s, y
        s = x + (r * scale if scale != 1.0 else r)
        return s, torch_ops.rms_norm(s, w, eps)

    # ---- experts -------------------------------------------------------------------------------
    def ffn(self, x: torch.Tensor, gate: QMatrix, up: QMatrix, down: QMatrix) -> torch.Tensor:
        """down(silu(gate x) * up x): a dense FFN, a shared expert, or one routed expert's tokens."""
        return self.linear(F.silu(self.linear(x, gate)) * self.linear(x, up), down)

    expert_ffn = ffn

    def _table(self, stack: ExpertStack, index: np.ndarray) -> torch.Tensor:
        """[T, k, 3] device addresses of each selected expert's gate, up and down (one async copy)."""
        T, k = index.shape
        host = self._staging[self._next_staging]
        self._next_staging = (self._next_staging + 1) % len(self._staging)
        n = T * k * 3
        if host.numel() < n:
            raise ModelError(f"moe: {T} tokens x {k} experts exceed the fused path's table")
        view = host[:n].numpy().reshape(T, k, 3)
        for j, m in enumerate((stack.gate, stack.up, stack.down)):
            view[:, :, j] = m.addr + index.astype(np.int64) * m.stride
        table = torch.empty((T, k, 3), dtype=torch.int64, device=self.device)
        return table.copy_(host[:n].view(T, k, 3), non_blocking=True)      # one async host-to-device copy

    def moe(self, x: torch.Tensor, stack: ExpertStack, index: np.ndarray, weights: torch.Tensor) -> torch.Tensor:
        """x [T, d], index [T, k] (positions in `stack`), weights [T, k] -> [T, d], in three launches
        (four when gate and up differ in type) plus the table copy; no host synchronisation."""
        x = _f32(x)
        T, k = index.shape
        g, u, dn = stack.gate, stack.up, stack.down
        if index.min() < 0 or index.max() >= g.count:
            raise ModelError(f"expert index out of range 0..{g.count - 1}: {index.tolist()}")
        layout = _layout(g.cols, g.rows, g.qtype, u.qtype, dn.qtype)
        table = self._table(stack, index)
        n_pairs, same = T * k, layout.gate == layout.up
        buf = torch.empty((n_pairs if same else 2 * n_pairs, g.rows), dtype=torch.float32, device=x.device)
        plan = L.plan_moe_gate_up(layout, n_pairs, k, table.data_ptr(), x.data_ptr(), g.cols, buf.data_ptr(), g.rows)
        if not self._launch(plan, "moe", g.qtype):
            return self._moe_torch(x, stack, index, weights)
        h = buf if same else F.silu(buf[:n_pairs]) * buf[n_pairs:]   # gate and up of different types
        w = _f32(weights).reshape(-1)
        slot_out = torch.empty((T, k, dn.rows), dtype=torch.float32, device=x.device)
        plan = L.plan_moe_down(layout, n_pairs, table.data_ptr(), h.data_ptr(), g.rows, w.data_ptr(),
                               slot_out.data_ptr(), dn.rows)
        if not self._launch(plan, "moe", dn.qtype):
            return self._moe_torch(x, stack, index, weights)
        out = torch.empty((T, dn.rows), dtype=torch.float32, device=x.device)
        plan = L.plan_moe_combine(dn.qtype, T, k, dn.rows, slot_out.data_ptr(), out.data_ptr())
        if not self._launch(plan, "moe", dn.qtype):
            return self._moe_torch(x, stack, index, weights)
        return out

    def moe_rows(self, x_rows: torch.Tensor, stack: ExpertStack, index: np.ndarray) -> torch.Tensor:
        """Expert index[i] of the stack on row i of x_rows: [n, d] -> [n, d] (unweighted): the fused
        kernels over n (row, expert) pairs of one slot each."""
        x_rows = _f32(x_rows)
        n = x_rows.shape[0]
        index = np.asarray(index).reshape(n, 1)
        g, u, dn = stack.gate, stack.up, stack.down
        layout = _layout(g.cols, g.rows, g.qtype, u.qtype, dn.qtype)
        table = self._table(stack, index)
        same = layout.gate == layout.up
        buf = torch.empty((n if same else 2 * n, g.rows), dtype=torch.float32, device=x_rows.device)
        out = torch.empty((n, dn.rows), dtype=torch.float32, device=x_rows.device)
        if self._launch(L.plan_moe_gate_up(layout, n, 1, table.data_ptr(), x_rows.data_ptr(), g.cols, buf.data_ptr(),
                                           g.rows), "moe", g.qtype):
            h = buf if same else F.silu(buf[:n]) * buf[n:]
            if self._launch(L.plan_moe_down(layout, n, table.data_ptr(), h.data_ptr(), g.rows, 0, out.data_ptr(),
                                            dn.rows), "moe", dn.qtype):
                return out
        ones = torch.ones((n, 1), dtype=torch.float32, device=x_rows.device)
        return self._moe_torch(x_rows, stack, index, ones)

    def _moe_torch(self, x, stack: ExpertStack, index: np.ndarray, weights) -> torch.Tensor:
        """Fallback after a kernel failure: each (token, slot) pair through dequantize + matmul."""
        T, k = index.shape
        slot_out = torch.empty((T, k, stack.down.rows), dtype=torch.float32, device=x.device)
        for t in range(T):
            for s in range(k):
                mats = [_dequant_at(o, m, int(index[t, s]))
                        for o, m in zip(stack.owners, (stack.gate, stack.up, stack.down))]
                h = F.silu(x[t] @ mats[0].T) * (x[t] @ mats[1].T)
                slot_out[t, s] = h @ mats[2].T
        return self.combine(slot_out, weights)


def _dequant_at(owner: torch.Tensor, m, i: int) -> torch.Tensor:
    """Expert i's matrix of a stack, read back through `owner` (the uint8 tensor holding that matrix)."""
    off = m.addr + i * m.stride - owner.data_ptr()
    n = m.rows * m.row_bytes
    return dequantize_torch(owner.view(-1)[off:off + n], m.qtype, (m.rows, m.cols))


def _f32(x: torch.Tensor) -> torch.Tensor:
    x = x.to(torch.float32).contiguous()
    return x if x.data_ptr() % 16 == 0 else x.clone()
