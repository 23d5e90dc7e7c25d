"""One way to run an Engine and split what it did into prefill and decode: the benchmarks
(`promoe bench`, scripts/bench_cache.py, scripts/bench_cpu.py) and the simulator's validation and
measurement (sim/validate.py, sim/measure.py) all call `run_phases`.

A generation's first token closes the prefill; `split_after` tokens may be let through first (decode
warm-up: graphs recorded). Engine.stats is read at the split and at the end, so the decode figures
are differences of the Engine's own counters over exactly the decode tokens measured.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Phases:
    tokens: list                        # every token the generation produced
    prefill: dict                       # Engine.stats (numbers) at the split, with wall_s and tokens
    decode: dict                        # their increase from the split to the end, with wall_s and tokens
    last: dict = field(default_factory=dict)     # Engine.stats at the end (every value)
    timing: object = None               # the Engine's Timing of this generation alone


def _numbers(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_phases(eng, prompt, max_tokens: int, split_after: int = 1, at_split=None) -> Phases:
    """Greedy generation of `max_tokens` from `prompt` on `eng`, its Timing reset first. The split
    falls after `split_after` tokens (1: when the prompt is in); `at_split()` runs there (a link
    changed for decode, say)."""
    eng.timing.reset()
    out, first, t_split = [], None, None
    t0 = time.perf_counter()
    for tok in eng.generate(prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True):
        out.append(tok)
        if len(out) == split_after:
            t_split, first = time.perf_counter(), eng.stats
            if at_split is not None:
                at_split()
    t_end, last = time.perf_counter(), eng.stats
    if first is None:                               # stopped before the split: all of it was prefill
        t_split, first = t_end, last
    a, b = _numbers(first), _numbers(last)
    prefill = {**a, "wall_s": t_split - t0, "tokens": eng.timing.prefill_tokens}
    decode = {**{k: b[k] - a.get(k, 0) for k in b}, "wall_s": t_end - t_split, "tokens": max(0, len(out) - split_after)}
    return Phases(out, prefill, decode, last, eng.timing)
