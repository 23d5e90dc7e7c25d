"""The cost model: for an expert the device lacks, is it faster to compute it on the CPU or to copy it?

Measured at start-up on this machine and reported in the stats:
  * CPU: seconds to run one expert of each quant-type signature over 1 and FUSED_MAX_TOKENS tokens,
    with ggml on the pool's threads, from the host store (the real path);
  * link: the copy engine's bytes/s and per-copy latency (CUDA: a pinned copy of one expert into
    the arena, timed; CPU: the emulated link's setting);
  * device: seconds to run one expert on the device (CUDA: the fused kernels, timed; CPU emulation:
    the compute thread's ggml, the same as the pool's);
  * hand-off: what a CPU expert costs beyond its compute (a job through the pool's queue and back).
Per miss (runtime/placement.py): CPU if its backlog + cpu_s(T) + hand-off < the copy still to come
(queue ahead + bytes left) / link + latency + device_s(T).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from ..backends import FUSED_MAX_TOKENS


def _timed(fn, repeats: int = 3) -> float:
    fn()                                           # warm-up: graphs built, pages touched
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@dataclass
class CostModel:
    link_bps: float                                # host-to-device bytes per second (inf: unthrottled)
    link_latency_s: float = 0.0
    cpu_s: dict = field(default_factory=dict)      # signature -> (seconds at 1 token, at FUSED_MAX_TOKENS)
    device_s: dict = field(default_factory=dict)   # signature -> (seconds at 1 token, at FUSED_MAX_TOKENS)
    cpu_handoff_s: float = 50e-6                   # a CPU expert's cost beyond its compute

    @staticmethod
    def signature(matrices) -> tuple:
        return tuple((m.qtype.name, *m.shape) for m in matrices)

    @staticmethod
    def _at(table: tuple, T: int) -> float:
        one, many = table
        return one + (many - one) * (min(T, FUSED_MAX_TOKENS) - 1) / max(1, FUSED_MAX_TOKENS - 1)

    def cpu_seconds(self, sig, T: int) -> float:
        return self._at(self.cpu_s[sig], T)

    def device_seconds(self, sig, T: int) -> float:
        return self._at(self.device_s[sig], T) if sig in self.device_s else 0.0

    def copy_seconds(self, nbytes: float) -> float:
        return self.link_latency_s + (nbytes / self.link_bps if self.link_bps else 0.0)

    def describe(self) -> dict:
        def gbs(table, sig):
            nbytes = sum(_bytes(q, r, c) for q, r, c in sig)
            return round(nbytes / table[0] / 1e9, 3)
        return {"link_GBps": None if not self.link_bps else round(self.link_bps / 1e9, 6),
                "link_latency_us": round(self.link_latency_s * 1e6, 1),
                "cpu_handoff_us": round(self.cpu_handoff_s * 1e6, 1),
                "cpu_GBps_1tok": {_name(s): gbs(t, s) for s, t in self.cpu_s.items()},
                "cpu_ms_per_expert": {_name(s): [round(t[0] * 1e3, 3), round(t[1] * 1e3, 3)] for s, t in self.cpu_s.items()},
                "device_ms_per_expert": {_name(s): [round(t[0] * 1e3, 3), round(t[1] * 1e3, 3)]
                                         for s, t in self.device_s.items()}}


def _bytes(qname, rows, cols) -> int:
    from ..format.quants import quant_type
    return rows * quant_type(qname).row_bytes(cols)


def _name(sig) -> str:
    return "/".join(q for q, *_ in sig)


def measure(store, pool, link, device_run=None) -> CostModel:
    """Probe one expert per signature: on the CPU pool's backend, and (device_run(key, x)) on the device."""
    model = CostModel(link_bps=link.bandwidth or 0.0, link_latency_s=link.latency,
                      cpu_handoff_s=_timed(pool.round_trip))
    seen = {}
    for key in store.keys:
        seen.setdefault(CostModel.signature(m for m, _ in store.layout[key]), key)
    for sig, key in seen.items():
        mats = store.matrices(key)
        d = mats[0].cols
        xs = {T: torch.randn(T, d, generator=torch.Generator().manual_seed(T)) for T in (1, FUSED_MAX_TOKENS)}
        model.cpu_s[sig] = tuple(_timed(lambda x=x: pool.run_now(x, mats)) for x in xs.values())
        if device_run is not None:
            model.device_s[sig] = tuple(_timed(lambda x=x: device_run(key, x)) for x in xs.values())
    return model
