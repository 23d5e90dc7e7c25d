"""The host-to-device link: a CUDA copy stream, or on CPU an emulated PCIe link.

The emulation copies into the device arena (a separate tensor) and then sleeps until
`latency + bytes / bandwidth` has passed, so copies overlap compute the way DMA does.
Everything it reports is labelled as emulation.
"""
from __future__ import annotations

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
    m = re.fullmatch(r"([0-9.]+)([KMG]?)B/s(?:,([0-9.]+)(us|ms))?", text, re.IGNORECASE)
    if not m:
        raise ModelError(f"link {spec!r} is not 'NGB/s[,Lus]' or 'ratio=R'")
    scale = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}[m.group(2).upper()]
    out = {"bandwidth": float(m.group(1)) * scale}
    if m.group(3):
        out["latency"] = float(m.group(3)) * (1e-6 if m.group(4) == "us" else 1e-3)
    return out


class Link:
    """Copies one chunk at a time, blocking the calling (copy) thread until it has landed."""

    def __init__(self, device, bandwidth: float | None = None, latency: float = 0.0):
        self.device = torch.device(device)
        self.bandwidth, self.latency = bandwidth, latency
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
            if self.bandwidth:
                left = self.latency + src.numel() / self.bandwidth - (time.perf_counter() - t0)
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
