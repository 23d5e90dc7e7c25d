"""The host-to-device link: a CUDA copy stream, or on CPU an emulated PCIe link.

The emulation copies into the device arena (a separate tensor) and then sleeps until
`latency + bytes / bandwidth` has passed, so copies overlap compute the way DMA does.
Everything it reports is labelled as emulation.
"""
from __future__ import annotations

import math
import random
import re
import time

import torch

from ..errors import ParameterError, clip
from ..limits import LINK_RATIO_MAX


_NUM = r"([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)"
LINK_FORMAT = "'NGB/s[,Lus][,jitter=Jus]' or 'ratio=R'"


def parse_link(spec) -> dict:
    """'25GB/s', '1GiB/s', '25GB/s,10us', '1.5e3MB/s', 'ratio=10' -> {'bandwidth': bytes/s} / {'ratio': 10.0};
    None -> {}. A rate must be > 0 and a ratio within what the emulation can run (ParameterError)."""
    if spec is None or spec == "":
        return {}
    if isinstance(spec, dict):
        return dict(spec)
    text = str(spec).replace(" ", "")
    m = re.fullmatch(r"ratio=" + _NUM, text, re.I)
    if m:
        ratio = float(m.group(1))
        if not 0 < ratio <= LINK_RATIO_MAX:
            raise ParameterError("link", f"ratio {m.group(1)} must be in (0, {LINK_RATIO_MAX:g}]: the copy of one "
                                         "expert takes ratio x one layer's decode compute")
        return {"ratio": ratio}
    m = re.fullmatch(_NUM + r"([KMG]?)(i?)B/s(?:," + _NUM + r"(us|ms))?(?:,jitter=" + _NUM + r"(us|ms))?", text, re.I)
    if not m:
        raise ParameterError("link", f"{clip(spec)} is not {LINK_FORMAT}")
    unit = m.group(2).upper()
    scale = ({"": 1, "K": 2**10, "M": 2**20, "G": 2**30} if m.group(3) else {"": 1, "K": 1e3, "M": 1e6, "G": 1e9})[unit]
    out = {"bandwidth": float(m.group(1)) * scale}
    if not 0 < out["bandwidth"] < math.inf:
        raise ParameterError("link", f"rate {m.group(1)}{m.group(2)}{m.group(3)}B/s must be > 0 and finite")
    for key, value, unit in (("latency", m.group(4), m.group(5)), ("jitter", m.group(6), m.group(7))):
        if value:
            out[key] = float(value) * (1e-6 if unit.lower() == "us" else 1e-3)
            if not out[key] < 60:
                raise ParameterError("link", f"{key} {value}{unit} must be under a minute")
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
        self._bounce = torch.empty(0, dtype=torch.uint8)

    def _contiguous(self, src: torch.Tensor) -> torch.Tensor:
        """A strided host view (a split expert's rows) packed into one reused page-locked buffer: torch
        would otherwise pack it into pageable memory, and a pageable copy does not overlap. Reuse is
        safe: each copy has landed before the next one starts (copy() waits)."""
        if src.is_contiguous():
            return src
        if self._bounce.numel() < src.numel():
            self._bounce = torch.empty(src.numel(), dtype=torch.uint8, pin_memory=not self.emulated)
        out = self._bounce[:src.numel()].view(src.shape)
        out.copy_(src)
        return out

    def describe(self) -> str:
        if not self.emulated:
            return f"CUDA copy stream on {self.device}"
        if not self.bandwidth:
            return "emulated link (CPU): unthrottled memcpy"
        return f"emulated link (CPU): {self.bandwidth / 1e9:.3g} GB/s, {self.latency * 1e6:.0f} us latency"

    def copy(self, dst: torch.Tensor, src: torch.Tensor | None, after=None) -> None:
        """dst <- src, or zeros when src is None (a memset on the device: nothing crosses the link).
        `after`: a CUDA event the copy must wait for (the slot's last reader). A strided (2-D) src is
        one copy, packed first into a page-locked buffer (_contiguous)."""
        if src is None:
            if self.emulated:
                dst.zero_()
                return
            with torch.cuda.stream(self.stream):
                if after is not None:
                    self.stream.wait_event(after)
                dst.zero_()
                done = torch.cuda.Event()
                done.record(self.stream)
            done.synchronize()
            return
        src = self._contiguous(src)
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
