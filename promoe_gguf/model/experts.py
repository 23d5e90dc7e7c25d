"""The expert seam: every routed expert is computed here, from quantized bytes obtained from a source.

Model code calls `MoEExperts(layer, x, ids, weights)`. The source decides where the bytes come
from (all in host memory here; the runtime's GPU cache later) and in which order experts run
(the runtime reorders: resident first). Each expert's output lands in its (token, slot) place and
the slots are summed in slot order at the end, so the result does not depend on that order, on the
cache or on timing: outputs are bitwise identical whatever the source does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..format.expert_index import MATRICES
from ..format.quants import dequantize_torch
from ..numerics import OFF as NUMERICS_OFF


_cuda_kernels = None   # None: not tried yet; False: unavailable (CuPy missing), fall back to torch


def expert_linear(raw, m, x):
    """x [n, cols] @ W^T for one quantized matrix `m` (MatrixSlice) held in uint8 tensor `raw`.

    On CUDA: the dequant-matmul kernels read the GGUF blocks in place (kernels/*.cu); without CuPy,
    dequantize + torch matmul (with a warning, once)."""
    global _cuda_kernels
    if raw.is_cuda and _cuda_kernels is not False:
        if _cuda_kernels is None:
            try:
                from .. import kernels
                kernels.launch._cupy()
                _cuda_kernels = kernels
            except Exception as e:  # noqa: BLE001 - any import problem means: no kernels
                import logging
                logging.getLogger("promoe.runtime").warning("CUDA kernels unavailable (%s); experts run as "
                                                            "dequantize + torch matmul", e)
                _cuda_kernels = False
        if _cuda_kernels and m.qtype in _cuda_kernels.SUPPORTED:  # F16/F32/BF16 experts: torch below
            return _cuda_kernels.linear(raw, m.qtype, m.shape, x.float().contiguous())
    return x @ dequantize_torch(raw, m.qtype, m.shape).T


class ExpertSource:
    """Where expert bytes come from. The default keeps every expert in (host) memory."""

    def __init__(self, model, device="cpu"):
        self.model, self.device = model, torch.device(device)
        self._store = {}

    def begin_step(self, positions: list[int]) -> None:
        """A forward step (prefill chunk or decoded token) at these absolute positions starts."""

    def order(self, layer: int, x, ids):
        """Yield this layer's needed experts in the order to compute them (a runtime reorders: the
        experts already on the device first) ; also the moment to request the missing ones."""
        yield from torch.unique(ids).tolist()

    def matrix(self, layer: int, expert: int, index: int):
        """(uint8 tensor, MatrixSlice) of matrix `index` (0 gate, 1 up, 2 down), ready to read."""
        key = (layer, expert)
        if key not in self._store:
            self._store[key] = [torch.from_numpy(self.model.matrix_bytes(layer, expert, name).copy()).to(self.device)
                                for name in MATRICES]
        return self._store[key][index], self.model.expert_matrices(layer, expert)[index]

    def done(self, layer: int, expert: int) -> None:
        """The expert's bytes are no longer read (a cache may now evict it)."""

    def end_layer(self, layer: int) -> None:
        pass

    def stats(self) -> dict:
        """All experts resident: nothing is ever missed or copied."""
        return {"hits": 0, "misses": 0, "bytes_h2d": 0, "stall_s": 0.0, "prefetch_useful": 0,
                "prefetch_wasted": 0, "per_layer": {}}


class MoEExperts:
    """Computes routed experts through a source.

    `observers` (tracers, routing recorders) get `begin_step(positions)` at each forward step and
    `observe(layer, x, ids, logits)` at each MoE layer, on the compute thread; they must not
    modify their arguments.
    """

    numerics = NUMERICS_OFF     # issue 13: names the expert whose output is not finite (numerics.py)

    def __init__(self, source: ExpertSource):
        self.source = source
        self.observers = []

    def begin_step(self, positions: list[int]) -> None:
        self.source.begin_step(positions)
        for ob in self.observers:
            ob.begin_step(positions)

    def __call__(self, layer: int, x, ids, weights, logits=None):
        """x [T, d]; ids [T, k] long; weights [T, k] -> [T, d] = sum_j weights[:, j] * expert_{ids[:, j]}(x)."""
        for ob in self.observers:
            ob.observe(layer, x, ids, logits)
        T, k = ids.shape
        slots = torch.empty((T, k, x.shape[1]), dtype=x.dtype, device=x.device)
        for e in self.source.order(layer, x, ids):
            rows, cols = (ids == e).nonzero(as_tuple=True)
            xe = x[rows]                                                   # [n_e, d]
            (g, gm), (u, um) = self.source.matrix(layer, e, 0), self.source.matrix(layer, e, 1)
            h = F.silu(expert_linear(g, gm, xe)) * expert_linear(u, um, xe)  # [n_e, n_ff]
            d, dm = self.source.matrix(layer, e, 2)
            slots[rows, cols] = expert_linear(d, dm, h)
            self.source.done(layer, e)
        self.source.end_layer(layer)
        self.numerics.experts(layer, ids, slots)                           # issue 13
        out = slots[:, 0] * weights[:, :1]
        for j in range(1, k):
            out = out + slots[:, j] * weights[:, j:j + 1]
        return out
