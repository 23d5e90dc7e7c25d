"""Device graphs: a stretch of device work recorded once and replayed with the same memory.

A decode step has the same shapes, addresses and launches at every position: its inputs (token,
position) live in device buffers, so it is recorded once and replayed (CUDA graphs: one launch for
the whole step instead of one per kernel, and no Python between kernels).

    CudaGraph       torch.cuda.CUDAGraph, captured on a side stream; every CuPy launch made while it
                    records goes to torch's current stream and is captured with the torch ops.
    EmulatedGraph   the same contract on the CPU emulation of the CUDA backend (tests, `promoe bench`
                    on a machine without a GPU): recording runs the step and keeps each device
                    operation (every aten op that computes, every kernel launch) as a node; replay
                    runs the nodes again on the same tensors, with no Python of the model in between.
                    A host read of a device value while recording is an error, as on a GPU; what
                    recording wrote into memory made before it (a recurrent state) is put back
                    afterwards (rewind), as a capture that computes nothing leaves it.

Both count their replays; the emulation also times them (device time, not host work).
"""
from __future__ import annotations

import time
from typing import Protocol

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from ..errors import ModelError


class GraphCaptureError(ModelError):
    """The step did something a recorded graph cannot hold (a host read of a device value)."""


class DeviceGraph(Protocol):
    replays: int
    replay_s: float                 # time spent replaying (the emulation's device time; 0 on a GPU)
    kernels: int | None             # device kernels in the graph (counted by the emulation; None on a GPU)

    def begin(self) -> None: ...
    def end(self) -> None: ...
    def rewind(self) -> None: ...       # undo what recording computed (nothing to undo on a GPU)
    def replay(self) -> None: ...


class CudaGraph:
    """One torch.cuda.CUDAGraph; graphs of one step share a memory pool (replayed in capture order)."""

    def __init__(self, device: torch.device, pool=None):
        self.device = device
        self.graph = torch.cuda.CUDAGraph()
        self.pool = pool
        self.replays, self.replay_s = 0, 0.0
        self.kernels = None             # the profiler counts them on a GPU (scripts/gpu_e2e.py)

    def begin(self) -> None:
        # thread_local: the copy and CPU-pool threads keep using their own streams while this records
        self.graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")

    def end(self) -> None:
        self.graph.capture_end()

    def rewind(self) -> None:
        """A capture computes nothing: nothing to undo."""

    def replay(self) -> None:
        self.graph.replay()
        self.replays += 1


# aten ops that allocate without computing: no node (the tensor recording made is reused)
_ALLOC = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh"}
# aten ops that wait for the device on a GPU (a value, or a shape that depends on values)
_SYNCING = {"_local_scalar_dense", "is_nonzero", "equal", "nonzero", "unique", "_unique2", "unique_consecutive",
            "masked_select", "item"}


class EmulatedGraph:
    """Records the device operations of a stretch of the CUDA backend's code path on the CPU."""

    def __init__(self, backend):
        self.backend = backend
        self.nodes: list = []
        self.memory: list = []           # every tensor made while recording: the graph's private pool
        self.replays, self.replay_s = 0, 0.0
        self._launches = 0
        self._mode = None
        self._launcher = None

    def begin(self) -> None:
        be = self.backend
        self._launcher = be.launcher
        launcher, nodes = self._launcher, self.nodes

        def recording(launches, device):
            launcher(launches, device)
            nodes.append(lambda: launcher(launches, device))
            self._launches += len(launches) - 1          # a node per call, a kernel per launch
        be.launcher = recording
        self._mode = _Recorder(self.nodes, self.memory)
        self._mode.__enter__()

    def end(self) -> None:
        self._mode.__exit__(None, None, None)
        self.backend.launcher = self._launcher

    def rewind(self) -> None:
        """Put back what recording's aten ops wrote into memory made before it (a recurrent state
        read and written by the step), as a GPU capture, which computes nothing, leaves it. Called
        once the whole step has recorded (its later graphs read what earlier ones wrote), last
        graph first."""
        if self._mode is not None:
            self._mode.restore()
            self._mode = None

    @property
    def kernels(self) -> int:
        """Device kernels a replay runs: one per aten node (a torch kernel on a GPU), one per launch."""
        return len(self.nodes) + self._launches

    def replay(self) -> None:
        t0, c0 = time.perf_counter(), time.thread_time()
        with torch.inference_mode(), _disable_current_modes():     # the device runs it, not the host
            for node in self.nodes:
                node()
        self.replays += 1
        dt = time.perf_counter() - t0
        self.replay_s += dt
        self.backend.device_s += dt            # the emulated device's busy time, not host work
        self.backend.device_cpu_s += time.thread_time() - c0


def _storages(ts) -> set:
    return {t.untyped_storage().data_ptr() for t in ts if isinstance(t, torch.Tensor)}


class _Recorder(TorchDispatchMode):
    """Runs each aten op and keeps it as a node: an op that writes its arguments runs again as it
    is; an op that makes a new tensor runs again and its result goes into the tensor recording made;
    a view (its result shares an argument's memory) and an allocation need no node."""

    def __init__(self, nodes: list, memory: list):
        super().__init__()
        self.nodes, self.memory = nodes, memory
        self.saved: dict = {}            # (address, shape, strides) -> (tensor, its content before recording)
        self.mine: set = set()           # storages made while recording

    def _save_written(self, func, args, kwargs) -> None:
        """Before an op writes a tensor made before recording, keep its content (once per view)."""
        values = {a.name: v for a, v in zip(func._schema.arguments, args)} | kwargs
        for a in func._schema.arguments:
            v = values.get(a.name)
            if a.alias_info is None or not a.alias_info.is_write or not isinstance(v, torch.Tensor):
                continue
            key = (v.data_ptr(), tuple(v.shape), v.stride())
            if key not in self.saved and v.untyped_storage().data_ptr() not in self.mine:
                self.saved[key] = (v, v.clone())

    def restore(self) -> None:
        with _disable_current_modes():
            for v, before in reversed(self.saved.values()):
                v.copy_(before)
        self.saved.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        if name in _SYNCING:
            raise GraphCaptureError(f"aten.{name} reads a device value on the host while a graph records")
        if func._schema.is_mutable:
            self._save_written(func, args, kwargs)
        out = func(*args, **kwargs)
        # kernels hold raw addresses: memory made while recording stays the graph's (a CUDA graph's
        # private pool), or a replay would write into memory the allocator has handed out again
        made = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, torch.Tensor)]
        self.memory.extend(made)
        self.mine |= _storages(made)
        if func._schema.is_mutable:
            self.nodes.append(lambda: func(*args, **kwargs))
            return out
        outs = out if isinstance(out, (tuple, list)) else (out,)
        if not all(isinstance(o, torch.Tensor) for o in outs):
            raise GraphCaptureError(f"aten.{name} returned {type(out).__name__} to the host while a graph records")
        # a view shares an argument's memory (the schema's alias marks are not enough: aten.to may copy)
        if name in _ALLOC or _storages(outs) & _storages([*args, *kwargs.values()]):
            return out
        if isinstance(out, torch.Tensor):
            self.nodes.append(lambda: out.copy_(func(*args, **kwargs)))
        else:
            def again():
                for dst, src in zip(outs, func(*args, **kwargs)):
                    dst.copy_(src)
            self.nodes.append(again)
        return out
