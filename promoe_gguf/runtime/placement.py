"""Where a layer's missed experts run, as a plain function: CachedExpertSource (the Engine) and promoe
simulate both call it, so the two cannot drift apart."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Miss:
    """An expert the layer needs that is not on the device yet."""
    key: tuple                  # (layer, expert)
    cpu_s: float                # the CPU computing its tokens from host memory
    copy_bytes: int             # what is left to copy (a prefetch may have landed part of it)
    device_s: float             # the device computing its tokens once it has landed
    queued_bytes: int           # precise copies already queued ahead of it on the link


def cpu_share(misses: list[Miss], copy_seconds, handoff_s: float = 0.0) -> set:
    """The misses to compute on the CPU: each on the side that finishes it sooner, given what that side already has to do: the CPU its queued jobs, the link its queued
    copies and the misses this call sent to it. When the CPU and the link are about as fast the misses
    split between them. `copy_seconds(nbytes)` is the link's time for nbytes (its latency included);
    `handoff_s` what a CPU expert costs beyond its compute (a pool job and the rows there and back)."""
    out, backlog, ahead = set(), 0.0, 0
    for miss in misses:
        copy = copy_seconds(miss.copy_bytes + ahead + miss.queued_bytes) + miss.device_s
        cpu = backlog + miss.cpu_s + handoff_s
        if cpu >= copy:
            ahead += miss.copy_bytes              # the link carries it: later misses queue behind it
            continue
        backlog = cpu
        out.add(miss.key)
    return out
