"""Semantic fuzz of model metadata: one (or a few) metadata values of a real factory model changed,
the model run through Engine.logits. Every case must either run with finite logits or raise
ModelError; anything else (another exception, non-finite logits, a hang, a huge allocation) is an
escape. Used by tests/test_semantic_fuzz.py; also runnable on its own:

    python tests/semantic_fuzz.py MODEL.gguf [--cases N] [--seed S]
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import resource
import signal
import sys
import time
from dataclasses import dataclass, field

import numpy as np
from gguf import GGUFValueType as V

sys.path.insert(0, os.path.dirname(__file__))
from gguf_edit import NUMERIC_TYPES, GGUFTemplate  # noqa: E402

# every metadata key (after "{arch}.") that ModelConfig or the forward pass reads
READ_KEYS = (
    "vocab_size", "context_length", "embedding_length", "block_count", "feed_forward_length",
    "attention.head_count", "attention.head_count_kv", "attention.key_length", "attention.value_length",
    "attention.layer_norm_rms_epsilon", "attention.q_lora_rank", "attention.kv_lora_rank",
    "attention.key_length_mla", "attention.value_length_mla", "attention.scale",
    "rope.dimension_count", "rope.freq_base", "rope.scaling.type", "rope.scaling.factor",
    "rope.scaling.original_context_length", "rope.scaling.yarn_log_multiplier",
    "expert_count", "expert_used_count", "expert_feed_forward_length", "expert_shared_feed_forward_length",
    "expert_shared_count", "leading_dense_block_count", "expert_weights_scale", "expert_weights_norm",
    "expert_gating_func", "expert_group_count", "expert_group_used_count",
    "embedding_scale", "residual_scale", "logit_scale", "nextn_predict_layers",
    "ssm.conv_kernel", "ssm.inner_size", "ssm.state_size", "ssm.time_step_rank", "ssm.group_count",
    "full_attention_interval",
)
OTHER_ARCHS = ("llama", "qwen2moe", "qwen3moe", "olmoe", "deepseek", "deepseek2", "granitemoe", "glm4moe", "gpt-oss",
               "qwen35moe", "gpt2")


def _int_like(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# mutation classes of a present value: name -> f(value, vtype, neighbour) -> (value, vtype) | None (remove)
def _same_type(v, t):
    """v stored in the key's own type where it fits, else in the widest type that holds it."""
    if t in (V.FLOAT32, V.FLOAT64):
        return float(v), t
    if isinstance(v, float):
        return v, V.FLOAT32
    lo, hi = {V.UINT8: (0, 255), V.INT8: (-128, 127), V.UINT16: (0, 65535), V.INT16: (-32768, 32767),
              V.UINT32: (0, 2**32 - 1), V.INT32: (-2**31, 2**31 - 1), V.UINT64: (0, 2**64 - 1),
              V.INT64: (-2**63, 2**63 - 1)}[t]
    if lo <= v <= hi:
        return v, t
    return v, (V.INT64 if v < 0 else V.UINT64)


CORE = {
    "zero": lambda v, t, n: _same_type(0, t),
    "one": lambda v, t, n: _same_type(1, t),
    "minus_one": lambda v, t, n: _same_type(v - 1, t),
    "plus_one": lambda v, t, n: _same_type(v + 1, t),
    "neighbour": lambda v, t, n: _same_type(n, t) if n is not None else None,
    "huge": lambda v, t, n: (3.0e38, V.FLOAT32) if t in (V.FLOAT32, V.FLOAT64) else (2**32 - 1, V.UINT32),
    "negative": lambda v, t, n: (-abs(v) - 1.0, V.FLOAT32) if t in (V.FLOAT32, V.FLOAT64) else (-1, V.INT32),
    "nan": lambda v, t, n: (math.nan, V.FLOAT32),
    "inf": lambda v, t, n: (math.inf, V.FLOAT32),
    "absent": lambda v, t, n: None,
}
EXTENDED = {
    "huge64": lambda v, t, n: (2**63 - 1, V.UINT64) if t not in (V.FLOAT32, V.FLOAT64) else (1.0e300, V.FLOAT64),
    "2^31": lambda v, t, n: _same_type(2**31, t),
    "-inf": lambda v, t, n: (-math.inf, V.FLOAT32),
    "tiny": lambda v, t, n: (1e-30, V.FLOAT32),
    "times_two": lambda v, t, n: _same_type(v * 2, t),
    "half": lambda v, t, n: _same_type(v / 2 if isinstance(v, float) else v // 2, t),
    "fraction": lambda v, t, n: (float(v) + 0.5, V.FLOAT32),
    "as_string": lambda v, t, n: (str(v), V.STRING),
}
# values for a key the file does not have (its default applies until the fuzz adds it)
ADDED = {
    "add_zero": (0, V.UINT32), "add_one": (1, V.UINT32), "add_two": (2, V.UINT32), "add_3": (3, V.UINT32),
    "add_huge": (2**32 - 1, V.UINT32), "add_negative": (-1, V.INT32), "add_nan": (math.nan, V.FLOAT32),
    "add_inf": (math.inf, V.FLOAT32), "add_half": (0.5, V.FLOAT32), "add_64": (64, V.UINT32),
    "add_1e9": (1.0e9, V.FLOAT32),
}
STRING_VALUES = {"rope.scaling.type": ("none", "linear", "yarn", "longrope", "", "YARN")}


@dataclass(frozen=True)
class Case:
    """One mutated file: changes {full key: (value, type) | None}."""
    label: str
    changes: tuple

    @property
    def change_dict(self) -> dict:
        return dict(self.changes)

    @property
    def keys(self) -> list[str]:
        return [k for k, _ in self.changes]


def _numeric_keys(t: GGUFTemplate) -> list[str]:
    return [f"{t.arch}.{k}" for k in READ_KEYS if f"{t.arch}.{k}" in t.values
            and t.values[f"{t.arch}.{k}"][1] in NUMERIC_TYPES]


def _neighbour(t: GGUFTemplate, key: str):
    """The value of the next numeric key in the file (wrapping): a plausible mix-up."""
    keys = _numeric_keys(t)
    if key not in keys or len(keys) < 2:
        return None
    return t.values[keys[(keys.index(key) + 1) % len(keys)]][0]


def _one(key, name, change) -> Case:
    return Case(f"{key}={name}", ((key, change),))


def core_cases(t: GGUFTemplate) -> list[Case]:
    """Every read key present in the file, every CORE mutation; plus the architecture name."""
    cases = []
    for key in (f"{t.arch}.{k}" for k in READ_KEYS):
        if key not in t.values:
            continue
        v, vt = t.values[key]
        if vt == V.STRING:
            for s in STRING_VALUES.get(key.split(".", 1)[1], ()):
                if s != v:
                    cases.append(_one(key, repr(s), (s, V.STRING)))
            cases.append(_one(key, "absent", None))
            continue
        if vt == V.BOOL:
            cases += [_one(key, "flip", (not v, V.BOOL)), _one(key, "absent", None),
                      _one(key, "as_uint", (int(v) + 1, V.UINT32))]
            continue
        n = _neighbour(t, key)
        for name, fn in CORE.items():
            change = fn(v, vt, n)
            if change is None and name != "absent":
                continue
            cases.append(_one(key, name, change))
    cases += [_one("general.architecture", a, (a, V.STRING)) for a in OTHER_ARCHS if a != t.arch][:2]
    return cases


def extended_cases(t: GGUFTemplate) -> list[Case]:
    """EXTENDED mutations of present keys, ADDED values for absent ones, other archs' names."""
    cases = []
    for key in (f"{t.arch}.{k}" for k in READ_KEYS):
        if key in t.values:
            v, vt = t.values[key]
            if vt not in NUMERIC_TYPES:
                continue
            cases += [_one(key, name, fn(v, vt, None)) for name, fn in EXTENDED.items()]
        else:
            suffix = key.split(".", 1)[1]
            if suffix in STRING_VALUES:
                cases += [_one(key, repr(s), (s, V.STRING)) for s in STRING_VALUES[suffix]]
            else:
                cases += [_one(key, name, change) for name, change in ADDED.items()]
    cases += [_one("general.architecture", a, (a, V.STRING)) for a in OTHER_ARCHS if a != t.arch][2:]
    return cases


def random_cases(t: GGUFTemplate, n: int, seed: int) -> list[Case]:
    """n cases of 2-3 keys changed at once, each with a random mutation class or a random value."""
    rng = random.Random(seed)
    pool = core_cases(t) + extended_cases(t)
    out = []
    for _ in range(n):
        picks = rng.sample(pool, rng.randint(2, 3))
        changes = dict(c.changes[0] for c in picks)
        if rng.random() < 0.3:      # a random numeric value for one present key
            key = rng.choice(_numeric_keys(t))
            changes[key] = (rng.choice([rng.randint(0, 2**16), rng.randint(0, 2**40)]), V.UINT64) \
                if rng.random() < 0.5 else (rng.uniform(-1e6, 1e6), V.FLOAT32)
        out.append(Case("+".join(f"{k}" for k in changes) + f"#{len(out)}", tuple(changes.items())))
    return out


def cases_for(t: GGUFTemplate, n: int | None = None, seed: int = 0) -> list[Case]:
    """The core matrix, then the extended one, then random multi-key cases: the first n of them
    (all of core + extended when n is None)."""
    cases = core_cases(t) + extended_cases(t)
    if n is None:
        return cases
    if n > len(cases):
        cases += random_cases(t, n - len(cases), seed)
    return cases[:n]


# ---- running a case ------------------------------------------------------------------------------

class CaseTimeout(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise CaseTimeout in this (main) thread after `seconds` of wall time."""
    def _alarm(signum, frame):
        raise CaseTimeout(f"no result after {seconds} s")
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _vm_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def memory_limit(extra_bytes: int):
    """Lower this process's address-space soft limit to its current size + extra_bytes (restored
    after): an allocation a metadata value blew up fails instead of swapping the machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _vm_bytes() + extra_bytes
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@dataclass
class Outcome:
    case: Case
    kind: str                   # ran | rejected | escape
    detail: str = ""
    seconds: float = 0.0
    stage: str = "open"         # open (Engine(path)) | run (Engine.logits)


@dataclass
class Report:
    outcomes: list = field(default_factory=list)

    def count(self, kind: str) -> int:
        return sum(o.kind == kind for o in self.outcomes)

    @property
    def escapes(self) -> list:
        return [o for o in self.outcomes if o.kind == "escape"]

    def summary(self) -> str:
        return (f"{len(self.outcomes)} cases: {self.count('ran')} ran with finite logits, "
                f"{self.count('rejected')} ModelError, {len(self.escapes)} escapes")


TOKENS = [1, 2, 3]


def run_case(t: GGUFTemplate, case: Case, path: str, seconds: float = 10.0) -> Outcome:
    """Write the mutated file, run Engine(path, n_batch=2).logits(TOKENS): two prefill chunks, so the
    second reads the KV cache the first wrote."""
    from promoe_gguf import ModelError
    from promoe_gguf.engine import Engine
    t.write(path, case.change_dict)
    t0 = time.perf_counter()
    eng, stage = None, "open"

    def outcome(kind, detail=""):
        return Outcome(case, kind, detail, time.perf_counter() - t0, stage)
    try:
        with deadline(seconds):
            eng = Engine(path, n_batch=2)
            stage = "run"
            logits = eng.logits(TOKENS)
        if logits.shape != (len(TOKENS), eng.config.n_vocab):
            return outcome("escape", f"logits of shape {logits.shape}, vocabulary {eng.config.n_vocab}")
        if not np.isfinite(logits).all():
            return outcome("escape", "non-finite logits returned")
        return outcome("ran")
    except ModelError as e:
        return outcome("rejected", str(e))
    except BaseException as e:  # noqa: BLE001 - everything else is what the fuzz hunts
        if isinstance(e, KeyboardInterrupt):
            raise
        return outcome("escape", f"{type(e).__name__}: {str(e)[:300]}")
    finally:
        if eng is not None:
            eng.close()


def run_cases(t: GGUFTemplate, cases, path: str, mem_bytes: int = 2 << 30, seconds: float = 10.0) -> Report:
    report = Report()
    with memory_limit(mem_bytes):
        for case in cases:
            report.outcomes.append(run_case(t, case, path, seconds))
    return report


def main(argv=None) -> int:
    import argparse
    import tempfile
    import torch
    torch.set_num_threads(1)
    ap = argparse.ArgumentParser(description="semantic metadata fuzz of one GGUF model")
    ap.add_argument("model")
    ap.add_argument("--cases", type=int, default=None, help="number of cases (default: core + extended matrix)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--show", type=int, default=20, help="escapes to print")
    args = ap.parse_args(argv)
    t = GGUFTemplate(args.model)
    cases = cases_for(t, args.cases, args.seed)
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as d:
        report = run_cases(t, cases, os.path.join(d, "m.gguf"))
    print(report.summary())
    for o in report.escapes[:args.show]:
        print(f"  {o.case.label}: {o.detail}")
    return 1 if report.escapes else 0


if __name__ == "__main__":
    sys.exit(main())
