"""What every backend shares: the weight handles (QMatrix, StackedMatrix, ExpertStack), the KV
layouts, the Backend protocol and BackendBase. The backends (cpu.py, cuda.py) import this module, the
package imports them only to build one (make_backend): no import cycle."""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from ..errors import ModelError, ParameterError, clip
from ..format.quants import quant_type

FLOAT_TYPES = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}
FUSED_MAX_TOKENS = 8     # a forward step of at most this many tokens takes the fused MoE path


@dataclass(eq=False)
class QMatrix:
    """A weight in its GGUF encoding on a device: W [rows, cols], out = W @ x.

    `shape` is numpy order: (rows, cols), or (batch, rows, cols) for a stack of per-head matrices
    (DeepSeek2's attn_k_b / attn_v_b). `data` holds the bytes (uint8, as the GGUF stores them)."""
    name: str
    qtype: T
    shape: tuple[int, ...]
    data: torch.Tensor
    pitch: int = 0               # bytes from one row to the next when not row_bytes (a column range)

    @property
    def rows(self) -> int:
        return self.shape[-2]

    @property
    def cols(self) -> int:
        return self.shape[-1]

    @property
    def row_bytes(self) -> int:
        return quant_type(self.qtype).row_bytes(self.cols)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    @property
    def addr(self) -> int:
        return self.data.data_ptr()


@dataclass(frozen=True)
class StackedMatrix:
    """One matrix (gate, up or down) of every expert of a layer: expert i's blocks start at
    addr + i * stride (a stacked GGUF tensor, or the slots of the expert cache)."""
    qtype: T
    rows: int
    cols: int
    addr: int
    stride: int
    count: int
    pitch: int = 0               # bytes from one row to the next when not row_bytes (a column range)

    @property
    def row_bytes(self) -> int:
        return quant_type(self.qtype).row_bytes(self.cols)

    @property
    def row_pitch(self) -> int:
        return self.pitch or self.row_bytes


@dataclass(frozen=True)
class ExpertFn:
    """What an expert computes beyond its three products. act: "silu" (SwiGLU) or "swiglu_oai"
    (gpt-oss: gate clamped above at 7, up to [-7, 7], x * sigmoid(1.702 x) * (up + 1)). bias: ()
    or the layer's (gate [E, F], up [E, F], down [E, d]) float32 biases on the device, a row per
    expert id (resident: small, and never in a cache slot); host_bias: the same on the host, copied
    once (what CPU pool jobs read: no device read per job)."""
    act: str = "silu"
    bias: tuple = ()
    host_bias: tuple = ()

    def on_host(self) -> "ExpertFn":
        """This function with its biases copied to the host once (a no-op on the CPU)."""
        return self if not self.bias else dataclasses.replace(self, host_bias=tuple(b.cpu() for b in self.bias))

    def of(self, expert: int, host: bool = False) -> "ExpertFn":
        """The same function for one expert: its bias rows as [1, n] (a stack of one); host: the rows
        of the host copy (a CPU pool job of a device engine)."""
        if not self.bias:
            return self
        src = (self.host_bias or self.bias) if host else self.bias
        return ExpertFn(self.act, tuple(b[expert:expert + 1] for b in src))


SWIGLU = ExpertFn()
OAI_ALPHA, OAI_LIMIT = 1.702, 7.0        # llama.cpp's constants for LLM_FFN_SWIGLU_OAI_MOE


@dataclass(frozen=True, eq=False)
class DeltaNet:
    """A gated delta net layer's small weights (float32, on the device) and its heads, as
    `Backend.delta_net` takes them: conv [C, K] taps, dt_bias and a [Hv] (the decay's bias and
    -exp(A_log)), norm [S] (the output's per-head RMS weight); q/k heads k_heads, v heads v_heads,
    all of `head` wide."""
    conv: torch.Tensor
    dt_bias: torch.Tensor
    a: torch.Tensor
    norm: torch.Tensor
    k_heads: int
    v_heads: int
    head: int
    eps: float


@dataclass(frozen=True)
class ExpertStack:
    """Where one MoE layer's experts are, as the fused call reads them. `owners`: the uint8 tensors
    holding gate, up and down (they keep the memory alive; the torch fallback reads through them).
    `fn`: the activation and biases (biases by expert id, not by stack position)."""
    gate: StackedMatrix
    up: StackedMatrix
    down: StackedMatrix
    owners: tuple = ()
    fn: ExpertFn = SWIGLU


def matrix_at(owner: torch.Tensor, offset: int, name: str, qtype, shape) -> QMatrix:
    """QMatrix over bytes [offset, offset + size) of a uint8 tensor (a cache slot, a host row)."""
    qt = quant_type(qtype)
    n = int(np.prod(shape[:-1])) * qt.row_bytes(shape[-1])
    return QMatrix(name, qt.ggml_type, tuple(shape), owner[offset:offset + n])


def split_unit(mats) -> int:
    """The rows of an expert's intermediate layer one split step moves (down's block, whose columns
    they are); 0 when the expert cannot be split: a zeroed block of some matrix would not decode to
    zeros (a device slot holds zeros where the CPU's rows are)."""
    if any(not _zero_is_zero(m.qtype) for m in mats):
        return 0
    return quant_type(mats[2].qtype).block_size


def _zero_is_zero(qtype) -> bool:
    from ..format.quants import dequantize_torch
    qt = quant_type(qtype)
    return bool((dequantize_torch(torch.zeros(qt.type_size, dtype=torch.uint8), qtype, (qt.block_size,)) == 0).all())


def expert_part(mats, lo: int, hi: int) -> tuple:
    """An expert's (gate, up, down) restricted to intermediate rows [lo, hi): gate's and up's rows, and
    down's columns as a view whose rows stay `pitch` bytes apart (the CPU backend reads it in place).
    lo and hi are multiples of split_unit."""
    gate, up, down = mats
    out = [QMatrix(m.name, m.qtype, (hi - lo, m.cols), m.data[lo * m.row_bytes:hi * m.row_bytes]) for m in (gate, up)]
    qt = quant_type(down.qtype)
    a, b = lo // qt.block_size * qt.type_size, hi // qt.block_size * qt.type_size
    rb = down.row_bytes
    out.append(QMatrix(down.name, down.qtype, (down.rows, hi - lo), down.data[a:(down.rows - 1) * rb + b], pitch=rb))
    return tuple(out)


def contiguous(m: QMatrix) -> QMatrix:
    """A pitched QMatrix's rows packed into a buffer of their own (for a device that reads rows
    back to back)."""
    if not m.pitch:
        return m
    rb = m.row_bytes
    rows = torch.as_strided(m.data, (m.rows, rb), (m.pitch, 1))
    return QMatrix(m.name, m.qtype, m.shape, rows.contiguous().view(-1))


@dataclass(frozen=True)
class KVLayout:
    """How a backend wants the KV cache: V transposed ([Hkv, Dv, n], ggml's non-flash layout) or
    not, the length padded to a multiple of `pad` (the padded tail is masked), the element type."""
    v_trans: bool
    pad: int
    dtype: torch.dtype

    def n_alloc(self, n_ctx: int) -> int:
        return -(-n_ctx // self.pad) * self.pad

    def nbytes(self, n_layers: int, n_ctx: int, k_dims: tuple[int, int], v_dims: tuple[int, int]) -> int:
        """Bytes of K and V for every layer (the planner and the allocation use this one formula)."""
        (hk, dk), (hv, dv) = k_dims, v_dims
        return n_layers * self.n_alloc(n_ctx) * (hk * dk + hv * dv) * torch.finfo(self.dtype).bits // 8


CPU_KV_PAD = 32          # ggml attention spans are padded to this many positions (masked): see cpu.py
KV_TYPES = {"f16": torch.float16, "f32": torch.float32}


def kv_layout(kind: str, kv_type: str | None = None) -> KVLayout:
    """The KV cache layout of a backend kind: the CPU's is llama.cpp's non-flash CPU layout (V
    transposed, float32, padded); CUDA's is heads-first K and V, float16 unless kv_type says f32."""
    if kind == "cpu":
        if kv_type not in (None, "f32"):
            raise ParameterError("kv_type", f"{clip(kv_type)}: the CPU keeps llama.cpp's f32 cache (an oracle run's)")
        return KVLayout(v_trans=True, pad=CPU_KV_PAD, dtype=torch.float32)
    if (kv_type or "f16") not in KV_TYPES:
        raise ParameterError("kv_type", f"{clip(kv_type)} is not one of {', '.join(KV_TYPES)}")
    return KVLayout(v_trans=False, pad=1, dtype=KV_TYPES[kv_type or "f16"])


class Backend(Protocol):
    """Every call the model, the expert seam and the decode driver make on a device.

    Shapes: T tokens, d = n_embd, H / Hkv heads, k experts per token. Activations are float32."""
    device: torch.device
    kind: str                                   # "cpu" (ggml) or "cuda" (the CuPy kernels)
    weights_in_place: bool                      # reads weights where the file maps them (else copies)
    kv_layout: KVLayout
    prefill_chunk: int | None                   # a longer step's attention block and each expert's FFN
                                                # run this many tokens at a time (None: whole)
    workspace_bytes: int                        # scratch memory held on the device
    graphs: bool                                # can record device graphs (new_graph)
    host_syncs: int                             # device -> host waits (counted: decode-step budgets)
    launches: int                               # kernel launches / ggml graph computes made eagerly
    device_s: float                             # device work timed on the host (the CPU emulation)
    device_cpu_s: float                         # ... and the CPU time this thread spent on it

    def reserve(self, nbytes: int) -> None: ...
    # products and norms
    def linear(self, x: torch.Tensor, w: QMatrix) -> torch.Tensor: ...                  # [T, cols] -> [T, rows]
    def linears(self, x: torch.Tensor, ws) -> tuple: ...                                # several W, one x
    def router(self, x: torch.Tensor, w: QMatrix, gating: str) -> tuple: ...           # (logits, probs) [T, E]
    def embed(self, tokens: torch.Tensor, w: QMatrix) -> torch.Tensor: ...             # [T] -> [T, d]
    def rms_norm(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor: ...
    def add_rms_norm(self, x, r, w, eps: float, scale: float = 1.0) -> tuple: ...      # (x + r*scale, norm of it)
    def sigmoid(self, x: torch.Tensor) -> torch.Tensor: ...
    def ffn(self, x: torch.Tensor, gate: QMatrix, up: QMatrix, down: QMatrix) -> torch.Tensor: ...
    def expert_ffn(self, x: torch.Tensor, gate: QMatrix, up: QMatrix, down: QMatrix,
                   fn: ExpertFn = SWIGLU) -> torch.Tensor: ...                              # fn: of one expert
    # attention over the KV cache (positions: the step's, on the device)
    def positions(self, n_past: int, T: int) -> torch.Tensor: ...                      # [T] int32
    def causal_mask(self, n_past: int, T: int): ...
    def prepare(self, step, rope) -> None: ...
    def rope(self, x: torch.Tensor, spec, step) -> torch.Tensor: ...
    def rope_many(self, xs, spec, step) -> tuple: ...
    def store_kv(self, cache, layer: int, k: torch.Tensor, v: torch.Tensor, step) -> None: ...
    def attention(self, q: torch.Tensor, cache, layer: int, step, scale: float,
                  sinks: torch.Tensor | None = None, window: int = 0) -> torch.Tensor: ...    # window 0: causal
    def softmax(self, x: torch.Tensor) -> torch.Tensor: ...                                # over the last dim
    # gated linear attention: qkv [T, C], z [T, Hv*S], beta and alpha [T, Hv] (the projections) ->
    # [T, Hv*S] (normed and gated, before ssm_out); conv [C, K-1] and ssm [Hv, S, S] states in place
    def delta_net(self, qkv: torch.Tensor, z: torch.Tensor, beta: torch.Tensor, alpha: torch.Tensor,
                  net: DeltaNet, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> torch.Tensor: ...
    # routed experts, routed on the device: ids [T, k] from the router, table [E] expert -> stack position
    def moe(self, x: torch.Tensor, stack: "ExpertStack", ids: torch.Tensor, weights: torch.Tensor,
            table: torch.Tensor | None = None) -> torch.Tensor: ...
    def moe_pairs(self, x: torch.Tensor, stack: "ExpertStack", ids: torch.Tensor, weights: torch.Tensor,
                  table: torch.Tensor, skip: torch.Tensor | None) -> tuple: ...       # (y [T*k, d], done [T*k])
    def moe_combine(self, y: torch.Tensor, done: torch.Tensor, ext: torch.Tensor | None,
                    weights: torch.Tensor) -> torch.Tensor: ...
    # host <-> device
    def to_host(self, t: torch.Tensor) -> np.ndarray: ...
    def host_buffer(self, shape, dtype) -> torch.Tensor: ...                           # page-locked where it matters
    def sync(self) -> None: ...
    def new_graph(self): ...                                                             # a DeviceGraph
    def capture_stream(self): ...                      # context: where a recording runs (CUDA: a side stream)


class BackendBase:
    """What the backends share: the counters the decode-step budget tests read, and the one way the
    forward pass reads device values on the host."""
    graphs = False

    def __init__(self):
        self.host_syncs = 0          # device -> host waits
        self.launches = 0            # kernel launches (CUDA) / ggml graph computes (CPU), made eagerly
        self.capturing = False       # a device graph is recording: nothing may wait for the device
        self.device_s = 0.0          # device work timed on the host: the CPU emulation's kernels and replays
        self.device_cpu_s = 0.0      # the calling thread's CPU time in that work

    @property
    def workspace_bytes(self) -> int:
        """Scratch memory this backend holds on its device (grown on demand, bounded)."""
        return 0

    def reserve(self, nbytes: int) -> None:
        """Allocate the scratch workspace up front (memory accounting sees it from the start)."""

    def prepare(self, step, rope) -> None:
        """A forward step starts: build what every layer shares, once."""

    def to_host(self, t: torch.Tensor) -> np.ndarray:
        self._may_wait("a device tensor copied to the host")
        self.host_syncs += 1
        return t.cpu().numpy()

    def host_buffer(self, shape, dtype) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype)

    def sync(self) -> None:
        """Wait for the device's queued work (the CPU backend computes synchronously)."""
        self._may_wait("a wait for the device")

    def new_graph(self):
        raise ModelError(f"the {self.kind} backend records no device graphs")

    def capture_stream(self):
        """Where a graph recording runs: here, the current stream."""
        return contextlib.nullcontext()

    def _may_wait(self, what: str) -> None:
        if self.capturing:
            from .graph import GraphCaptureError
            raise GraphCaptureError(f"{what} while a device graph records")
