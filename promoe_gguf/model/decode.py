"""Decoding one token at a time on static device state, eagerly or as replayed device graphs.

Per token the host writes the token id and its position into a page-locked buffer, the step
(`Decoder.run`) copies them to a fixed device buffer, computes, and copies the logits to a fixed
page-locked buffer; the host waits once and reads them. The step has the same shapes and addresses
at every position, so with graphs it is recorded on the second token (the first warms every kernel
up eagerly) and replayed from then on:

  every expert resident: one graph for the whole token: one replay and one wait per token;
  an expert cache: the expert seam cuts the step where the host must act (after a layer's router:
      place the chosen experts; after the device's pairs: collect the CPU's rows), so the token is
      a chain of segments and host actions: one wait per MoE layer (the routing), nothing else.

A step that cannot be recorded (a kernel falling back to torch that reads the device, a backend
without graphs) runs eagerly from then on, with one warning naming why. Eager and replayed steps
run the same kernels on the same buffers: their logits are bitwise equal.

Counters (`counts`) give per token what the budget tests and `promoe bench` report: replays, kernel
launches and aten ops made outside replays, host waits, and the host's time (wall time minus the
device work the emulation measures).
"""
from __future__ import annotations

import logging
import time
import dataclasses
from dataclasses import dataclass

import torch

from ..errors import ModelError
from .common import EagerDriver, Step

log = logging.getLogger("promoe.decode")


@dataclass
class Segment:
    """A recorded stretch of the step and the host action that follows it (None after the last)."""
    graph: object
    action: object = None
    sync: bool = False


@dataclass
class DecodeCounts:
    """Totals over the decode steps taken (diff two `copy()`s for a stretch of them)."""
    tokens: int = 0
    replays: int = 0
    host_syncs: int = 0
    eager_launches: int = 0           # kernel launches (CUDA) / ggml graph computes (CPU) made outside replays
    host_s: float = 0.0               # wall time minus the device work the CPU emulation measured
    host_cpu_s: float = 0.0           # the decoding thread's CPU time minus the device work's (no waits, no
                                      # time other threads had the CPU)
    wall_s: float = 0.0
    mode: str = "eager"
    why_eager: str = ""

    def copy(self) -> "DecodeCounts":
        return dataclasses.replace(self)

    def since(self, before: "DecodeCounts", n_layers: int) -> dict:
        """Per token over the steps since `before`, and per layer for the host time."""
        n = max(1, self.tokens - before.tokens)
        return {"mode": self.mode, "tokens": self.tokens - before.tokens,
                "replays_per_token": (self.replays - before.replays) / n,
                "host_syncs_per_token": (self.host_syncs - before.host_syncs) / n,
                "launches_outside_replays_per_token": (self.eager_launches - before.eager_launches) / n,
                "host_us_per_layer": (self.host_s - before.host_s) / n / max(1, n_layers) * 1e6,
                "host_cpu_us_per_layer": (self.host_cpu_s - before.host_cpu_s) / n / max(1, n_layers) * 1e6,
                "wall_us_per_layer": (self.wall_s - before.wall_s) / n / max(1, n_layers) * 1e6,
                **({"why_eager": self.why_eager} if self.why_eager else {})}


class _Recording:
    """The driver while a step records: each cut closes a segment and opens the next."""

    def __init__(self, backend):
        self.backend = backend
        self.segments: list[Segment] = []
        self._open()

    def _open(self) -> None:
        g = self.backend.new_graph()
        g.begin()
        self.segments.append(Segment(g))

    def cut(self, action, sync: bool) -> None:
        seg = self.segments[-1]
        seg.graph.end()
        seg.action, seg.sync = action, sync
        self._open()

    def close(self) -> None:
        self.segments[-1].graph.end()
        self.rewind()

    def rewind(self) -> None:
        """Undo what recording computed (the emulation runs while it records), last graph first."""
        for seg in reversed(self.segments):
            seg.graph.rewind()


class Decoding:
    """One-token steps of `decoder` over `kv_cache`. graphs=False: always eager (also the automatic
    fallback). The KV cache's n_past is advanced here, as Decoder.forward does."""

    def __init__(self, decoder, kv_cache, graphs: bool = True):
        self.decoder, self.kv_cache, self.backend = decoder, kv_cache, decoder.backend
        be = self.backend
        self.inputs_h = be.host_buffer((2,), torch.int32)              # token, position
        self.inputs = torch.zeros(2, dtype=torch.int32, device=be.device)
        self.logits_h = be.host_buffer((decoder.cfg.n_vocab,), torch.float32)
        self._inputs_np, self._logits_np = self.inputs_h.numpy(), self.logits_h.numpy()   # host writes and reads
        self.segments: list[Segment] | None = None
        self.graphs = graphs and be.graphs and not decoder.experts.observers and not decoder.numerics.enabled
        self._eager_steps = 0
        self.counts = DecodeCounts(mode="graphs" if self.graphs else "eager")
        if graphs and not self.graphs:
            self.counts.why_eager = (f"the {be.kind} backend has no device graphs" if not be.graphs else
                                     "per-layer observers or --check-numerics read every layer on the host")
        self._eager = EagerDriver(be)

    # ---- the step ------------------------------------------------------------------------------------
    def _body(self, driver, n_past: int | None) -> None:
        """The device work of one token (recordable: n_past None, nothing may read the position on
        the host): inputs in, logits out."""
        self.inputs.copy_(self.inputs_h, non_blocking=True)
        mask = None if n_past is None else self.backend.causal_mask(n_past, 1)
        step = Step(self.inputs[1:2], n_past, self.kv_cache, driver, mask)
        logits = self.decoder.run(self.inputs[0:1], step, last_only=True)
        self.logits_h.copy_(logits[-1], non_blocking=True)

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        """Logits [n_vocab] (host, float32) after feeding `token` at position cache.n_past. The
        tensor is this object's buffer: read or copy it before the next step."""
        cache, be, dec = self.kv_cache, self.backend, self.decoder
        if not 0 <= int(token) < dec.cfg.n_vocab:
            raise ModelError(f"token id {token} is out of range (vocabulary {dec.cfg.n_vocab})")
        if cache.n_past + 1 > cache.n_ctx:
            raise ModelError(f"sequence of {cache.n_past + 1} tokens is longer than the context ({cache.n_ctx})")
        t0, cpu0 = time.perf_counter(), time.thread_time()
        syncs0, launches0, device0, device_cpu0 = be.host_syncs, be.launches, be.device_s, be.device_cpu_s
        dec.experts.begin_step([cache.n_past])
        self._inputs_np[:] = (int(token), cache.n_past)
        if self.segments is None and self.graphs and self._eager_steps >= 1:
            self._record()
        if self.segments is not None:
            self._replay()
        else:
            self._body(self._eager, cache.n_past)
            self._eager_steps += 1
        be.sync()
        cache.n_past += 1
        dec.numerics.host_logits(self._logits_np)
        c = self.counts
        c.tokens += 1
        c.host_syncs += be.host_syncs - syncs0
        c.eager_launches += be.launches - launches0
        wall = time.perf_counter() - t0
        c.wall_s += wall
        c.host_s += wall - (be.device_s - device0)
        c.host_cpu_s += time.thread_time() - cpu0 - (be.device_cpu_s - device_cpu0)
        return self.logits_h

    @property
    def kernels_per_token(self) -> int | None:
        """Device kernels of one recorded token (known in the emulation; None eager or on a GPU)."""
        if not self.segments or any(seg.graph.kernels is None for seg in self.segments):
            return None
        return sum(seg.graph.kernels for seg in self.segments)

    def _replay(self) -> None:
        be = self.backend
        for seg in self.segments:
            seg.graph.replay()
            self.counts.replays += 1
            if seg.action is not None:
                if seg.sync:
                    be.sync()
                seg.action()

    def _record(self) -> None:
        """Record the step as graphs (not run: the replay that follows computes this token)."""
        be = self.backend
        rec = None
        be.capturing = True
        try:
            with be.capture_stream():
                rec = _Recording(be)
                self._body(rec, None)
                rec.close()
        except Exception as e:  # noqa: BLE001 - any capture failure: eager from now on, said once
            if rec is not None and rec.segments and rec.segments[-1].graph is not None:
                try:
                    rec.segments[-1].graph.end()
                except Exception:  # noqa: BLE001 - it may have ended already
                    pass
                rec.rewind()
            self.graphs = False
            self.counts.mode, self.counts.why_eager = "eager", f"{type(e).__name__}: {e}"
            log.warning("decode steps run eagerly: recording the step as a device graph failed (%s: %s)",
                        type(e).__name__, e)
            return
        finally:
            be.capturing = False
        self.segments = rec.segments
