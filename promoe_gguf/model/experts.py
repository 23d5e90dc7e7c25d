"""The expert seam: every routed expert is computed here, on bytes a source puts on the device.

Model code calls `MoEExperts(layer, x, ids, weights, step)` with the router's choice still on the
device. Three routes:

  every expert resident (ResidentSource), few tokens: one fused call routed on the device (the
      kernels read the ids and the layer's slot table); nothing is read on the host, so a decode
      step with it is one device graph.
  an expert cache (CachedExpertSource), few tokens: the ids and the router input go to static host
      buffers and control passes to the host (`step.driver.cut`): the source makes the chosen
      experts resident or sends misses to the CPU pool, and writes the layer's slot table for the
      device; the device computes its pairs (`moe_pairs`), control passes to the host again to
      collect the CPU's rows, and `moe_combine`
      adds every slot in slot order. Recorded as graphs, each cut is a segment boundary.
  more tokens (prefill): expert by expert on the host's routing, in the order the source gives (a
      cache computes the resident ones first), each over the tokens routed to it.

Either way each (token, slot) output lands in its place and the slots are weighted and added in
slot order, so the result depends only on which route the step takes and where each expert ran,
never on the cache's state or timing: with misses copied, outputs are bitwise identical whatever
the source does.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from ..backends import FUSED_MAX_TOKENS, ExpertStack, StackedMatrix, matrix_at
from ..backends import ExpertFn
from ..backends.base import contiguous, expert_part
from ..errors import ModelError
from ..format.converter import EXPERT_ALIGN, region_layout
from ..format.expert_index import MATRICES
from ..numerics import OFF as NUMERICS_OFF


def _align(n: int, a: int = 256) -> int:
    return -(-n // a) * a


class ExpertSource(Protocol):
    """Where a model's routed experts are, for the seam. `resident`: every expert always on the
    device (nothing to place). `fuse_any`: every step in one fused call, however many tokens."""
    model: object                                  # the open model (format.open_model)
    resident: bool
    fuse_any: bool
    stacks: dict                                   # MoE layer -> ExpertStack (where the slots are)
    nbytes: int                                    # device bytes the experts take

    # [E] int32 on the device, expert -> slot: the resident route's table (a cached source's table
    # is the host's, per layer and step, from acquire)
    def table(self, layer: int) -> torch.Tensor: ...
    def begin_step(self, positions: list[int]) -> None: ...
    def reset_sequence(self) -> None: ...
    # (stack, table [E] int32 on the host: expert -> slot, -1 where not on the device, cpu jobs) or
    # None; x [T, d] and ids [T, k] are the step's host buffers (the seam's per-layer log), rewritten
    # only by the next step
    def acquire(self, layer: int, x, ids: np.ndarray): ...
    def release(self, layer: int) -> None: ...
    def cpu_result(self, layer: int, expert: int, job) -> torch.Tensor | None: ...   # None: the CPU failed
    def order(self, layer: int, x, ids: np.ndarray): ...       # the device's experts, one at a time
    def cpu_jobs(self, layer: int) -> dict: ...               # expert -> the CPU job order() started
    def matrices(self, layer: int, expert: int) -> tuple: ...
    def done(self, layer: int, expert: int) -> None: ...
    def end_layer(self, layer: int) -> None: ...
    def stats(self) -> dict: ...
    def close(self) -> None: ...


class ResidentSource:
    """Every routed expert resident on the device, one stack per MoE layer.

    `in_place` (the backend's weights_in_place: the CPU): the model's own memory map, addressed in
    place when a layer's experts sit at a uniform stride (stacked or merged GGUF tensors); otherwise
    one packed device buffer per layer (expert e's gate, up and down at e * stride). The slot table
    is the identity."""

    resident = True

    def __init__(self, model, device, in_place: bool):
        self.model, self.device = model, torch.device(device)
        self.fuse_any = False      # set for the CPU's repacked stacks (Engine._repack)
        self.stacks: dict[int, ExpertStack] = {}
        file = torch.from_numpy(model.expert_data) if in_place else None
        for layer in model.config.moe_layers:
            mats = [model.expert_matrices(layer, e) for e in range(model.config.n_experts)]
            for e in range(len(mats)):
                model.matrix_bytes(layer, e, "gate")          # a converted cache checks each expert once
            stack = _in_place(file, mats) if file is not None else None
            if stack is None:
                stack = self._packed(layer, mats)
            self.stacks[layer] = stack
        self.nbytes = resident_expert_bytes(model, in_place)
        self._identity_h = np.arange(model.config.n_experts, dtype=np.int32)
        self._identity = torch.from_numpy(self._identity_h).to(self.device)

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

    def table(self, layer: int) -> torch.Tensor:
        return self._identity

    def begin_step(self, positions: list[int]) -> None:
        pass

    def reset_sequence(self) -> None:
        pass

    def acquire(self, layer: int, x, ids: np.ndarray):
        return self.stacks[layer], self._identity_h, {}

    def release(self, layer: int) -> None:
        pass

    def cpu_result(self, layer: int, expert: int, job) -> torch.Tensor | None:
        raise ModelError("every expert is resident: nothing runs on the CPU pool")

    def order(self, layer: int, x, ids: np.ndarray):
        yield from np.unique(ids).tolist()

    def cpu_jobs(self, layer: int) -> dict:
        return {}

    def matrices(self, layer: int, expert: int):
        """(gate, up, down) QMatrix of one expert, ready to read."""
        st = self.stacks[layer]
        return tuple(matrix_at(o.view(-1), m.addr + expert * m.stride - o.data_ptr(), name, m.qtype,
                               (m.rows, m.cols))
                     for o, m, name in zip(st.owners, (st.gate, st.up, st.down), MATRICES))

    def done(self, layer: int, expert: int) -> None:
        pass

    def end_layer(self, layer: int) -> None:
        pass

    def stats(self) -> dict:
        """All experts resident: nothing is ever missed or copied."""
        return {"hits": 0, "misses": 0, "bytes_h2d": 0, "stall_s": 0.0, "prefetch_useful": 0,
                "prefetch_wasted": 0, "per_layer": {}}

    def close(self) -> None:
        pass


def _packed_layout(matrices) -> tuple[list[int], int]:
    """Offsets of gate, up, down in one expert's packed region (the converted file's layout), and
    the stride from one expert's region to the next."""
    offs, size = region_layout(matrices)
    return offs, _align(size, EXPERT_ALIGN)


def _uniform_stride(mats, j: int) -> int | None:
    """The byte stride between consecutive experts' matrix j, if one stride places them all."""
    m0 = mats[0][j]
    stride = mats[1][j].offset - m0.offset if len(mats) > 1 else m0.nbytes
    if stride <= 0 or any(ms[j].offset != m0.offset + e * stride or ms[j].qtype != m0.qtype
                          for e, ms in enumerate(mats)):
        return None
    return stride


def resident_expert_bytes(model, in_place: bool) -> int:
    """Bytes ResidentSource holds: the mapped expert bytes where it reads the file in place (the
    CPU), else packed buffers (n_experts x stride per layer)."""
    total = 0
    for layer in model.config.moe_layers:
        mats = [model.expert_matrices(layer, e) for e in range(model.config.n_experts)]
        if in_place and all(_uniform_stride(mats, j) for j in range(3)):
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


@dataclass
class _LayerIO:
    """A cached layer's static buffers for one step size: what crosses between device and host at
    the seam (the same memory at every step, so a recorded graph reads and writes them)."""
    ids_h: torch.Tensor          # [T, k] int64, host: the router's choice
    x_h: torch.Tensor            # [T, d] float32, host: the router input (CPU experts, the predictor)
    skip_h: torch.Tensor         # [E] int32, host: experts the CPU computes this step
    skip: torch.Tensor           # the same on the device
    table_h: torch.Tensor        # [E] int32, host: expert -> slot for this step (acquire's answer)
    table: torch.Tensor          # the same on the device
    ext_h: torch.Tensor          # [T, k, d] float32, host: the CPU's rows
    ext: torch.Tensor            # the same on the device
    jobs: dict = field(default_factory=dict)
    refused: bool = False        # the source cannot hold every chosen expert at once: per-expert route
    written: tuple | None = None  # (rows, cols) of ext_h the last step's CPU jobs wrote (zeroed before the next)

    def __post_init__(self):
        self.ids_np, self.skip_np, self.ext_np = self.ids_h.numpy(), self.skip_h.numpy(), self.ext_h.numpy()
        self.table_np = self.table_h.numpy()


class MoEExperts:
    """Computes routed experts through a source and a backend.

    `observers` (tracers, routing recorders) get `begin_step(positions)` at each forward step and
    `observe(layer, x, ids, logits)` at each MoE layer, on the compute thread (ids on the host);
    they must not modify their arguments. With an observer, decoding runs eagerly (a graph step
    has no host hand-off at a resident layer). `listeners` only get begin_step.
    """

    numerics = NUMERICS_OFF     # names the expert whose output is not finite (numerics.py)

    def __init__(self, source: ExpertSource, backend=None):
        self.source, self.backend = source, backend
        self.observers = []
        self.listeners = []
        self._io: dict = {}

    def set_fn(self, layer: int, fn: ExpertFn) -> None:
        """The layer's experts compute `fn` (an activation other than SwiGLU, biases by expert id):
        kept on the source's stack, so every route and the CPU pool see it."""
        self.source.stacks[layer] = dataclasses.replace(self.source.stacks[layer], fn=fn.on_host())

    def _fn(self, layer: int, expert: int) -> ExpertFn:
        return self.source.stacks[layer].fn.of(expert)

    def begin_step(self, positions: list[int]) -> None:
        self.source.begin_step(positions)
        for ob in (*self.listeners, *self.observers):
            ob.begin_step(positions)

    def __call__(self, layer: int, x, ids, weights, step, logits=None):
        """x [T, d]; ids [T, k] long (on the device); weights [T, k] -> [T, d] =
        sum_j weights[:, j] * expert_{ids[:, j]}(x)."""
        be, src = self.backend, self.source
        T = ids.shape[0]
        ids_host = None
        if self.observers or self.numerics.enabled:
            ids_host = be.to_host(ids)
            for ob in self.observers:
                ob.observe(layer, x, torch.from_numpy(ids_host), logits)
        if T <= FUSED_MAX_TOKENS or src.fuse_any:
            if src.resident:
                out = be.moe(x, src.stacks[layer], ids, weights, src.table(layer))
                self.numerics.fused_experts(layer, out, ids_host, lambda t, j: self._one(layer, x, t, int(ids_host[t, j])))
                return out
            out = self._cached(layer, x, ids, weights, step)
            if out is not None:
                self.numerics.fused_experts(layer, out, ids_host, lambda t, j: None)
                return out
        if ids_host is None:
            ids_host = be.to_host(ids)
        return self._per_expert(layer, x, ids_host, weights)

    def _one(self, layer: int, x, t: int, expert: int):
        """Expert `expert`'s own output for token t (only to name the expert behind a non-finite
        fused result)."""
        try:
            return self.backend.expert_ffn(x[t:t + 1], *self.source.matrices(layer, expert), self._fn(layer, expert))[0]
        finally:
            self.source.done(layer, expert)

    # ---- an expert cache: the host places, the device computes its pairs ----------------------
    def _layer_io(self, layer: int, T: int, k: int, d: int) -> _LayerIO:
        io = self._io.get((layer, T))
        if io is None:
            be, E = self.backend, self.source.model.config.n_experts
            io = self._io[(layer, T)] = _LayerIO(
                ids_h=be.host_buffer((T, k), torch.int64), x_h=be.host_buffer((T, d), torch.float32),
                skip_h=be.host_buffer((E,), torch.int32), skip=torch.zeros(E, dtype=torch.int32, device=be.device),
                table_h=be.host_buffer((E,), torch.int32), table=torch.full((E,), -1, dtype=torch.int32, device=be.device),
                ext_h=be.host_buffer((T, k, d), torch.float32),
                ext=torch.zeros((T, k, d), dtype=torch.float32, device=be.device))
        return io

    def _cached(self, layer: int, x, ids, weights, step):
        """The cached route; None when the source cannot hold every chosen expert at once (then the
        per-expert route takes the step)."""
        be, src = self.backend, self.source
        T, k = ids.shape
        io = self._layer_io(layer, T, k, x.shape[1])
        io.ids_h.copy_(ids, non_blocking=True)
        io.x_h.copy_(x, non_blocking=True)
        step.driver.cut(lambda: self._place(layer, io), sync=True)
        if io.refused:                                   # eager only: a recorded step has one token
            io.refused = False
            return None
        io.skip.copy_(io.skip_h, non_blocking=True)
        io.table.copy_(io.table_h, non_blocking=True)
        y, done = be.moe_pairs(x, src.stacks[layer], ids, weights, io.table, io.skip)
        step.driver.cut(lambda: self._collect(layer, io), sync=False)
        io.ext.copy_(io.ext_h, non_blocking=True)
        return be.moe_combine(y, done, io.ext, weights)

    def _place(self, layer: int, io: _LayerIO) -> None:
        """Host, after the routing landed: every chosen expert resident (pinned) or given to the CPU."""
        placed = self.source.acquire(layer, io.x_h, io.ids_np)
        if placed is None:
            io.refused = True
            return
        io.table_np[:] = placed[1]
        io.jobs = placed[2]
        io.skip_np[:] = 0
        io.skip_np[[e for e, job in io.jobs.items() if job.part is None]] = 1    # a split expert runs on both
        if io.written is not None:                       # the last step's CPU rows (the device has read them)
            io.ext_np[io.written] = 0
            io.written = None

    def _collect(self, layer: int, io: _LayerIO) -> None:
        """Host, once the device's pairs are queued: the CPU's rows into ext, the layer's slots released."""
        try:
            written = []
            for e, job in io.jobs.items():
                io.ext_np[job.rows, job.cols] = self._cpu_rows(layer, e, job).cpu().numpy()
                written.append((job.rows, job.cols))
            if written:
                io.written = tuple(np.concatenate(a) for a in zip(*written))
        finally:
            io.jobs = {}
            self.source.release(layer)

    def _cpu_rows(self, layer: int, e: int, job) -> torch.Tensor:
        """A CPU job's output rows; if the CPU failed, the expert copied and computed here instead."""
        rows = self.source.cpu_result(layer, e, job)
        if rows is not None:
            return rows
        try:
            mats = self.source.matrices(layer, e)
            if job.part is not None:                     # only the CPU's rows (the device has the rest)
                mats = tuple(contiguous(m) for m in expert_part(mats, *job.part))
            return self.backend.expert_ffn(job.x.to(self.backend.device), *mats, self._fn(layer, e))
        finally:
            self.source.done(layer, e)

    # ---- prefill: expert by expert ----------------------------------------------------------------
    def _per_expert(self, layer: int, x, ids_host: np.ndarray, weights):
        be = self.backend
        T, k = ids_host.shape
        slot_out = torch.empty((T, k, x.shape[1]), dtype=torch.float32, device=x.device)
        for e in self.source.order(layer, x, ids_host):
            rows, cols = np.nonzero(ids_host == e)
            if len(rows) == 0:
                raise ModelError(f"expert source yielded expert {e} of layer {layer}, which no token chose")
            r, c = torch.from_numpy(rows).to(x.device), torch.from_numpy(cols).to(x.device)
            try:
                slot_out[r, c] = be.expert_ffn(x[r], *self.source.matrices(layer, e), self._fn(layer, e))
            finally:
                self.source.done(layer, e)
        for e, job in self.source.cpu_jobs(layer).items():      # misses the CPU computed meanwhile
            r, c = torch.from_numpy(job.rows).to(x.device), torch.from_numpy(job.cols).to(x.device)
            slot_out[r, c] = self._cpu_rows(layer, e, job).to(x.device)
        self.source.end_layer(layer)
        self.numerics.experts(layer, ids_host, slot_out)
        done = torch.ones(T * k, dtype=torch.int32, device=x.device)
        return be.moe_combine((slot_out * weights.unsqueeze(-1)).view(T * k, -1), done, None, weights)
