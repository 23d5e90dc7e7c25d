"""The host-to-device link: a CUDA copy stream, or on CPU an emulated PCIe link.

The emulation copies into the device arena (a separate tensor) and then sleeps until
`latency + bytes / bandwidth` has passed, so copies overlap compute the way DMA does.
Everything it reports is labelled as emulation.
"""
from __future__ import annotations

import random
import re
import time

import torch

from ..errors import ModelError


def parse_link(spec) -> dict:
    """'25GB/s', '25GB/s,10us', 'ratio=10' -> {'bandwidth': bytes/s} / {'ratio': 10.0}; None -> {}."""
    if spec is None or spec == "":
        return {}
    if isinstance(spec, dict):
        return dict(spec)
    text = str(spec).replace(" ", "")
    m = re.fullmatch(r"ratio=([0-9.]+)", text)
    if m:
        return {"ratio": float(m.group(1))}
    m = re.fullmatch(r"([0-9.]+)([KMG]?)B/s(?:,([0-9.]+)(us|ms))?(?:,jitter=([0-9.]+)(us|ms))?", text, re.I)
    if not m:
        raise ModelError(f"link {spec!r} is not 'NGB/s[,Lus][,jitter=Jus]' or 'ratio=R'")
    scale = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}[m.group(2).upper()]
    out = {"bandwidth": float(m.group(1)) * scale}
    for key, value, unit in (("latency", m.group(3), m.group(4)), ("jitter", m.group(5), m.group(6))):
        if value:
            out[key] = float(value) * (1e-6 if unit.lower() == "us" else 1e-3)
    return out


class Link:
    """Copies one chunk at a time, blocking the calling (copy) thread until it has landed."""

    def __init__(self, device, bandwidth: float | None = None, latency: float = 0.0, jitter: float = 0.0,
                 seed: int = 0):
        self.device = torch.device(device)
        self.bandwidth, self.latency, self.jitter = bandwidth, latency, jitter
        self.rng = random.Random(seed)   # jitter: a uniform random extra delay per chunk (stress tests)
        self.emulated = self.device.type == "cpu"
        if not self.emulated:
            self.stream = torch.cuda.Stream(device=self.device)

    def describe(self) -> str:
        if not self.emulated:
            return f"CUDA copy stream on {self.device}"
        if not self.bandwidth:
            return "emulated link (CPU): unthrottled memcpy"
        return f"emulated link (CPU): {self.bandwidth / 1e9:.3g} GB/s, {self.latency * 1e6:.0f} us latency"

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after=None) -> None:
        """dst <- src. `after`: a CUDA event the copy must wait for (the slot's last reader)."""
        if self.emulated:
            t0 = time.perf_counter()
            dst.copy_(src)
            if self.bandwidth or self.jitter:
                wire = src.numel() / self.bandwidth if self.bandwidth else 0.0
                extra = self.rng.uniform(0, self.jitter) if self.jitter else 0.0
                left = self.latency + wire + extra - (time.perf_counter() - t0)
                if left > 0:
                    time.sleep(left)
            return
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        done.synchronize()  # on the copy thread only: the compute thread never waits for copies it doesn't need
