"""Every numeric setting's range, checked in one place for the Python API, the command line and the
server: `number()` raises ParameterError naming the setting, its value (cut to 200 characters) and the
range. The CLI shows the flag instead of the Python name (cli/flags.py), the server the request field."""
from __future__ import annotations

import math
import os

from .errors import ParameterError, clip

LINK_RATIO_MAX = 1e4          # an emulated link slower than 10,000x a layer's compute never finishes a test


def max_threads() -> int:
    """Threads a setting may ask for: twice this machine's CPUs (more only thrashes; 100,000 crashed ggml)."""
    return 2 * (os.cpu_count() or 1)


def _range(lo, hi, lo_open: bool, hi_open: bool, integer: bool) -> str:
    fmt = (lambda v: str(int(v))) if integer else (lambda v: f"{v:g}")
    if hi == math.inf:
        return f"> {fmt(lo)}" if lo_open else f">= {fmt(lo)}"
    if lo == -math.inf:
        return f"< {fmt(hi)}" if hi_open else f"<= {fmt(hi)}"
    return f"{'(' if lo_open else '['}{fmt(lo)}, {fmt(hi)}{')' if hi_open else ']'}"


def number(name: str, value, lo=-math.inf, hi=math.inf, integer: bool = False, lo_open: bool = False,
           hi_open: bool = False, why: str = ""):
    """`value` if it is a (finite) number in the range, else ParameterError("<name> must be ...")."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int,) if integer else (int, float)):
        raise ParameterError(name, f"must be {kind}, got {type(value).__name__} {clip(value)}")
    if (not math.isfinite(value) or value < lo or value > hi or (lo_open and value == lo)
            or (hi_open and value == hi)):
        where = _range(lo, hi, lo_open, hi_open, integer)
        where = where if where[0] in "<>" else "in " + where
        raise ParameterError(name, f"must be {kind} {where}{why}, got {clip(value)}")
    return value


# Every setting the Python API, the CLI and the server share, with its range (hi may be a function: the
# thread limit depends on the machine). The CLI's flags and the server's fields are checked by these.
SETTINGS = {
    "n_threads": dict(lo=1, hi=lambda: max_threads(), integer=True, why=" (1 to twice this machine's CPUs)"),
    "cpu_threads": dict(lo=1, hi=lambda: max_threads(), integer=True, why=" (1 to twice this machine's CPUs)"),
    "n_ctx": dict(lo=1, integer=True),                  # at most the model's context length (Engine)
    "n_batch": dict(lo=1, integer=True),                # at most n_ctx (Engine)
    "max_tokens": dict(lo=1, integer=True),
    "temperature": dict(lo=0.0, why=" (0: greedy)"),
    "top_k": dict(integer=True, why=" (<= 0: no top-k)"),
    "top_p": dict(lo=0.0, hi=1.0),
    "min_p": dict(lo=0.0, hi=1.0),
    "repeat_penalty": dict(lo=0.0, lo_open=True, why=" (1: none)"),
    "repeat_last_n": dict(lo=-1, integer=True, why=" (-1: the whole history, 0: none)"),
    "seed": dict(lo=-2**63, hi=2**64 - 1, integer=True),        # torch.Generator.manual_seed's range
    "cache_rate": dict(lo=0.0, hi=1.0, lo_open=True, why=" (the fraction of routed experts cached)"),
    "port": dict(lo=0, hi=65535, integer=True, why=" (0: any free port)"),
    "max_queue": dict(lo=1, hi=4096, integer=True),
}


def check(name: str, value, **override):
    """`value` if setting `name` accepts it (SETTINGS), else ParameterError naming it, the value and the range."""
    spec = {**SETTINGS[name], **override}
    if callable(spec.get("hi")):
        spec["hi"] = spec["hi"]()
    return number(name, value, **spec)


def size(name: str, value):
    """A byte count: a positive integer."""
    return number(name, value, 1, integer=True, why=" (bytes)")


def check_cache_budget(cache_rate, cache_mem, gpu_mem) -> None:
    if cache_rate is not None and cache_mem is not None:
        raise ParameterError("cache_mem", "and a cache rate both size the expert cache: give one of them")
    if cache_rate is not None:
        check("cache_rate", cache_rate)
    if cache_mem is not None:
        size("cache_mem", cache_mem)
    if gpu_mem is not None:
        size("gpu_mem", gpu_mem)


def check_cache_options(resident: bool, fitted: bool, **options) -> None:
    """Options that only an expert cache uses (policy, predictor, link, cpu_experts, cpu_threads), given
    while every expert is resident: an error, since they would do nothing; only a warning when the
    memory fit (gpu_mem) chose residency, which the user could not know beforehand."""
    if not resident:
        return
    defaults = {"policy": "lru", "predictor": "none", "link": None, "cpu_experts": "auto", "cpu_threads": None}
    given = [(k, v) for k, v in options.items() if v not in (defaults[k], None, "")]
    if not given:
        return
    name, value = given[0]
    if fitted:
        import logging
        logging.getLogger("promoe").warning(
            "every expert fits in the device memory, so these expert-cache settings are not used: %s",
            ", ".join(f"{k}={v}" for k, v in given))
        return
    raise ParameterError(name, f"{clip(value)} needs an expert cache, but every expert is resident "
                               "(no cache rate, cache memory or GPU memory was given)")
