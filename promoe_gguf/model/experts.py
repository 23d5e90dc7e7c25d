"""The expert seam: every routed expert is computed here, on bytes a source puts on the device.

Model code calls `MoEExperts(layer, x, ids, weights)`. The routing ids are read on the host once
per layer (`backend.to_host`: the layer's only host synchronisation; the cache needs them). Then:

  few tokens (decode, <= FUSED_MAX_TOKENS): the source makes every chosen expert resident and says
      where they are (an ExpertStack and each (token, slot)'s position in it); the backend computes
      the whole layer in one fused call (CPU: ggml mul_mat_id; CUDA: the fused MoE kernels).
  more tokens (prefill): expert by expert, in the order the source gives (a cache computes the
      resident ones first), each over the tokens routed to it; a cache may evict between experts.

Either way each (token, slot) output lands in its place and the slots are weighted and added in
slot order, so the result depends only on which path the step size selects, never on the source,
the cache or timing: outputs are bitwise identical whatever the source does.
"""
from __future__ import annotations

import numpy as np
import torch

from ..backends import FUSED_MAX_TOKENS, ExpertStack, StackedMatrix, matrix_at
from ..errors import ModelError
from ..format.expert_index import MATRICES
from ..numerics import OFF as NUMERICS_OFF


def _align(n: int, a: int = 256) -> int:
    return -(-n // a) * a


class ExpertSource:
    """Every routed expert resident on the device, one stack per MoE layer.

    CPU: the model's own memory map, addressed in place when a layer's experts sit at a uniform
    stride (stacked or merged GGUF tensors); otherwise, and on CUDA, one packed device buffer per
    layer (expert e's gate, up and down at e * stride)."""

    fuse_any = False      # every step in one fused call, however many tokens (set for the CPU's repacked stacks)

    def __init__(self, model, device="cpu"):
        self.model, self.device = model, torch.device(device)
        self.stacks: dict[int, ExpertStack] = {}
        file = torch.from_numpy(model.expert_data) if self.device.type == "cpu" else None
        for layer in model.config.moe_layers:
            mats = [model.expert_matrices(layer, e) for e in range(model.config.n_experts)]
            for e in range(len(mats)):
                model.matrix_bytes(layer, e, "gate")          # a converted cache checks each expert once
            stack = _in_place(file, mats) if file is not None else None
            if stack is None:
                stack = self._packed(layer, mats)
            self.stacks[layer] = stack
        self.nbytes = resident_expert_bytes(model, self.device.type)

    def _packed(self, layer: int, mats) -> ExpertStack:
        offs, stride = _packed_layout(mats[0])
        buf = torch.empty((len(mats), stride), dtype=torch.uint8)
        for e, ms in enumerate(mats):
            for m, off in zip(ms, offs):
                buf[e, off:off + m.nbytes] = torch.from_numpy(np.ascontiguousarray(
                    self.model.matrix_bytes(layer, e, m.matrix)))
        buf = buf.to(self.device)
        base = buf.data_ptr()
        sm = [StackedMatrix(m.qtype, m.shape[0], m.shape[1], base + off, stride, len(mats))
              for m, off in zip(mats[0], offs)]
        return ExpertStack(*sm, owners=(buf, buf, buf))

    # ---- the interface the seam calls --------------------------------------------------------
    def begin_step(self, positions: list[int]) -> None:
        """A forward step (prefill chunk or decoded token) at these absolute positions starts."""

    def acquire(self, layer: int, x, ids: np.ndarray):
        """Fused path: (stack, index [T, k] into it, CPU jobs) once every chosen expert the device
        computes is on it; index -1 marks a (token, slot) whose expert runs on the CPU (its job)."""
        return self.stacks[layer], ids, {}

    def release(self, layer: int) -> None:
        """The fused call has been issued: the experts of `layer` may be evicted after it."""

    def order(self, layer: int, x, ids: np.ndarray):
        """Per-expert path: this layer's needed experts in the order to compute them."""
        yield from np.unique(ids).tolist()

    def matrices(self, layer: int, expert: int):
        """(gate, up, down) QMatrix of one expert, ready to read."""
        st = self.stacks[layer]
        return tuple(matrix_at(o.view(-1), m.addr + expert * m.stride - o.data_ptr(), name, m.qtype,
                               (m.rows, m.cols))
                     for o, m, name in zip(st.owners, (st.gate, st.up, st.down), MATRICES))

    def done(self, layer: int, expert: int) -> None:
        """The expert's bytes are no longer read (a cache may now evict it)."""

    def end_layer(self, layer: int) -> None:
        pass

    def stats(self) -> dict:
        """All experts resident: nothing is ever missed or copied."""
        return {"hits": 0, "misses": 0, "bytes_h2d": 0, "stall_s": 0.0, "prefetch_useful": 0,
                "prefetch_wasted": 0, "per_layer": {}}


def _packed_layout(matrices) -> tuple[list[int], int]:
    """Offsets of gate, up, down in one expert's packed region, and the region's stride."""
    offs, pos = [], 0
    for m in matrices:
        offs.append(pos)
        pos = _align(pos + m.nbytes)
    return offs, _align(pos, 4096)


def _uniform_stride(mats, j: int) -> int | None:
    """The byte stride between consecutive experts' matrix j, if one stride places them all."""
    m0 = mats[0][j]
    stride = mats[1][j].offset - m0.offset if len(mats) > 1 else m0.nbytes
    if stride <= 0 or any(ms[j].offset != m0.offset + e * stride or ms[j].qtype != m0.qtype
                          for e, ms in enumerate(mats)):
        return None
    return stride


def resident_expert_bytes(model, device: str) -> int:
    """Bytes ExpertSource holds on `device`: the mapped expert bytes where the CPU reads the file in
    place, else packed buffers (n_experts x stride per layer)."""
    total = 0
    for layer in model.config.moe_layers:
        mats = [model.expert_matrices(layer, e) for e in range(model.config.n_experts)]
        if device == "cpu" and all(_uniform_stride(mats, j) for j in range(3)):
            total += sum(m.nbytes for ms in mats for m in ms)
        else:
            total += len(mats) * _packed_layout(mats[0])[1]
    return total


def _in_place(file: torch.Tensor, mats) -> ExpertStack | None:
    """A stack over the memory map when every matrix of the layer's experts sits at one stride."""
    sm = []
    for j in range(3):
        m0, stride = mats[0][j], _uniform_stride(mats, j)
        if stride is None:
            return None
        sm.append(StackedMatrix(m0.qtype, m0.shape[0], m0.shape[1], file.data_ptr() + m0.offset, stride, len(mats)))
    return ExpertStack(*sm, owners=(file, file, file))


class MoEExperts:
    """Computes routed experts through a source and a backend.

    `observers` (tracers, routing recorders) get `begin_step(positions)` at each forward step and
    `observe(layer, x, ids, logits)` at each MoE layer, on the compute thread (ids on the host);
    they must not modify their arguments.
    """

    numerics = NUMERICS_OFF     # issue 13: names the expert whose output is not finite (numerics.py)

    def __init__(self, source: ExpertSource, backend=None):
        self.source, self.backend = source, backend
        self.observers = []

    def begin_step(self, positions: list[int]) -> None:
        self.source.begin_step(positions)
        for ob in self.observers:
            ob.begin_step(positions)

    def __call__(self, layer: int, x, ids, weights, logits=None):
        """x [T, d]; ids [T, k] long; weights [T, k] -> [T, d] = sum_j weights[:, j] * expert_{ids[:, j]}(x)."""
        be = self.backend
        ids_host = be.to_host(ids)                                   # the layer's one host sync
        if self.observers:
            ids_t = torch.from_numpy(ids_host)
            for ob in self.observers:
                ob.observe(layer, x, ids_t, logits)
        T, k = ids_host.shape
        if T <= FUSED_MAX_TOKENS or self.source.fuse_any:
            placed = self.source.acquire(layer, x, ids_host)
            if placed is not None:
                try:
                    out = self._fused(layer, x, weights, *placed)
                    self.numerics.fused_experts(layer, out, ids_host,                # issue 13
                                                lambda t, j: self._slot_output(x, t, j, *placed))
                    return out
                finally:
                    self.source.release(layer)
        slot_out = torch.empty((T, k, x.shape[1]), dtype=torch.float32, device=x.device)
        for e in self.source.order(layer, x, ids_host):
            rows, cols = np.nonzero(ids_host == e)
            if len(rows) == 0:
                raise ModelError(f"expert source yielded expert {e} of layer {layer}, which no token chose")
            r, c = torch.from_numpy(rows).to(x.device), torch.from_numpy(cols).to(x.device)
            try:
                slot_out[r, c] = be.expert_ffn(x[r], *self.source.matrices(layer, e))
            finally:
                self.source.done(layer, e)
        self.source.end_layer(layer)
        self.numerics.experts(layer, ids_host, slot_out)                     # issue 13
        return be.combine(slot_out, weights)

    def _slot_output(self, x, t, j, stack, index, cpu_jobs):
        """Expert (t, j)'s own output for token t, recomputed on the device (issue 13: only to name
        the expert behind a non-finite fused result); None for an expert computed on the CPU."""
        if index[t, j] < 0:
            return None
        return self.backend.moe_rows(x[t:t + 1], stack, index[t:t + 1, j])[0]

    def _fused(self, layer, x, weights, stack, index, cpu_jobs):
        """All of a layer's (token, slot) pairs in one fused call, or, with experts on the CPU, the
        device's pairs in one call while the CPU computes the others, the results placed by pair."""
        be = self.backend
        if not cpu_jobs:
            return be.moe(x, stack, index, weights)
        T, k = index.shape
        slot_out = torch.empty((T, k, x.shape[1]), dtype=torch.float32, device=x.device)
        t, s = np.nonzero(index >= 0)
        if len(t):
            tt, ss = torch.from_numpy(t).to(x.device), torch.from_numpy(s).to(x.device)
            slot_out[tt, ss] = be.moe_rows(x[tt], stack, index[t, s])
        for e, job in cpu_jobs.items():
            rows = self.source.cpu_result(layer, e, job, be)
            slot_out[torch.from_numpy(job.rows).to(x.device), torch.from_numpy(job.cols).to(x.device)] = rows
        return be.combine(slot_out, weights)
