"""Where a layer's missed experts run, as a plain function: CachedExpertSource (the Engine) and promoe
simulate both call it, so the two cannot drift apart.

Each miss runs on the CPU (from host memory), on the device (copied over the link first), or split by
rows: the CPU computes the first rows of its intermediate layer (gate and up rows, the matching
columns of down) while the link carries the rest to the device, so that both sides finish together.
The objective is the layer's finish time, max(CPU finish, link finish), not the hit rate."""
from __future__ import annotations

from dataclasses import dataclass, field

CPU_EXPERTS = ("auto", "whole", "off", "all")    # the --cpu-experts modes; whole: auto without splitting


@dataclass
class Miss:
    """An expert the layer needs that is not on the device yet."""
    key: tuple                  # (layer, expert)
    cpu_s: float                # the CPU computing its tokens from host memory
    copy_bytes: int             # what is left to copy (a prefetch may have landed part of it)
    device_s: float             # the device computing its tokens once it has landed
    queued_bytes: int           # precise copies already queued ahead of it on the link
    parts: int = 0              # row groups it can be split into (0: whole only)


@dataclass
class Placement:
    """cpu: misses computed whole on the CPU; split: key -> row groups (of its Miss.parts) the CPU
    computes, the rest copied and computed on the device; every other miss is copied whole."""
    cpu: set = field(default_factory=set)
    split: dict = field(default_factory=dict)


def cpu_share(misses: list[Miss], copy_seconds, handoff_s: float = 0.0) -> set:
    """The misses to compute on the CPU: each on the side that finishes it sooner, given what that side already has to do: the CPU its queued jobs, the link its queued
    copies and the misses this call sent to it. When the CPU and the link are about as fast the misses
    split between them. `copy_seconds(nbytes)` is the link's time for nbytes (its latency included);
    `handoff_s` what a CPU expert costs beyond its compute (a pool job and the rows there and back)."""
    return _whole(misses, copy_seconds, handoff_s)[0]


def _whole(misses, copy_seconds, handoff_s):
    out, backlog, ahead = set(), 0.0, 0
    for miss in misses:
        copy = copy_seconds(miss.copy_bytes + ahead + miss.queued_bytes) + miss.device_s
        cpu = backlog + miss.cpu_s + handoff_s
        if cpu >= copy:
            ahead += miss.copy_bytes              # the link carries it: later misses queue behind it
            continue
        backlog = cpu
        out.add(miss.key)
    return out, backlog, ahead


def place(misses: list[Miss], copy_seconds, handoff_s: float = 0.0) -> Placement:
    """cpu_share's whole-expert choice, then one splittable miss shared so the CPU and the link finish
    the layer together: the last miss of the side that finishes later (the one that decided the
    imbalance) gives row groups to the other side, as many as minimize the later finish."""
    cpu = _whole(misses, copy_seconds, handoff_s)[0]
    split, best_gain = {}, None
    for side in (True, False):                     # the last splittable miss on each side
        miss = next((m for m in reversed(misses) if m.parts >= 2 and (m.key in cpu) == side), None)
        share = None if miss is None else _share(miss, misses, cpu, copy_seconds, handoff_s)
        if share is not None and (best_gain is None or share[1] < best_gain[1]):
            best_gain = (miss, share[1], share[0])
    if best_gain is not None:
        miss, _, j = best_gain
        cpu.discard(miss.key)
        if j == miss.parts:
            cpu.add(miss.key)
        elif j:
            split[miss.key] = j
    return Placement(cpu, split)


def _share(miss: Miss, misses: list, cpu: set, copy_seconds, handoff_s):
    """(row groups of `miss` the CPU should compute (0..parts), the layer's finish then) given where the
    others go; None when nothing is to be gained."""
    others_cpu = sum(m.cpu_s + handoff_s for m in misses if m.key in cpu and m.key != miss.key)
    others_link = [m for m in misses if m.key not in cpu and m.key != miss.key]
    link_bytes = sum(m.copy_bytes for m in others_link)
    queued = miss.queued_bytes
    link_free = max((copy_seconds(link_bytes + m.queued_bytes) + m.device_s for m in others_link), default=0.0)

    def finish(j: int) -> float:
        f = j / miss.parts
        t_cpu = others_cpu + (f * miss.cpu_s + handoff_s if j else 0.0)
        t_link = link_free
        if j < miss.parts:          # the device computes the whole slot (zeros where the CPU's rows are)
            t_link = max(t_link, copy_seconds(link_bytes + queued + (1 - f) * miss.copy_bytes) + miss.device_s)
        return max(t_cpu, t_link)

    # t_cpu rises and t_link falls with j: the best j is next to where they cross
    lo, hi = 0, miss.parts
    while hi - lo > 1:
        mid = (lo + hi) // 2
        f = mid / miss.parts
        t_cpu = others_cpu + f * miss.cpu_s + handoff_s
        t_link = copy_seconds(link_bytes + queued + (1 - f) * miss.copy_bytes) + miss.device_s
        if t_cpu < t_link:
            lo = mid
        else:
            hi = mid
    current = miss.parts if miss.key in cpu else 0
    best = min({0, lo, hi, miss.parts}, key=lambda j: (finish(j), j != current))
    # a split adds the other side's fixed costs (a hand-off, a copy's latency per matrix), which the
    # finish times above count once: it must win by more than those
    margin = handoff_s + 3 * copy_seconds(0) if 0 < best < miss.parts else 0.0
    return (best, finish(best)) if finish(best) + margin < finish(current) else None
