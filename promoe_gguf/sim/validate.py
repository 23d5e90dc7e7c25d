"""Validation (a): the simulator against our own Engine, measured on this machine (CPU emulation).

The same prompts, greedy decoding and routing: the trace is recorded from an all-resident Engine (the
cache never changes results, so every cached run routes identically), the emulated link is calibrated
once (ratio=10: one expert's copy takes 10 layers of decode compute, scripts/bench_cache.py's regime),
and before every measured configuration this machine's profile is measured again (measure.py): the
machine is shared, so the profile and the run it predicts are taken together.
"""
from __future__ import annotations

import time


PROMPTS = ["def parse_args(argv=None):\n", "import os\nimport sys\n\n", "class Config:\n    def __init__(self"]
CONFIGS = [("lru", "lru", "none", "off"), ("static", "static", "none", "off"), ("promoe", "promoe", "none", "off"),
           ("promoe", "promoe", "gate", "off"), ("promoe", "promoe", "oracle", "off"),
           ("hybrid", "promoe", "none", "auto"), ("hybrid", "promoe", "gate", "auto")]


def record_trace(model, out_dir, prompts=PROMPTS, tokens: int = 48):
    """Greedy decode of every prompt from an all-resident Engine (cpu_repack=False: the layout the cache
    keeps, so routing is the cached runs' exactly), recorded as a promoe trace."""
    from ..engine import Engine
    from ..predict.trace import Trace, TraceWriter
    eng = Engine(model, n_threads=1, cpu_repack=False)
    w = TraceWriter(out_dir, eng.model, {"greedy": True, "n_decode": tokens})
    eng.experts.observers.append(w)
    try:
        for i, p in enumerate(prompts):
            ids = eng.tokenize(p)
            toks = list(ids)
            w.start_sequence(i, "eval", toks, len(ids))
            for t in eng.generate(ids, max_tokens=tokens + 1, temperature=0, ignore_eos=True):
                toks.append(t)
            w.flush()
    finally:
        eng.experts.observers.remove(w)
        eng.close()
    w.close()
    return Trace(out_dir)


def link_bandwidth(model, ratio: float = 10.0) -> float:
    """bytes/s of runtime.link's ratio=R calibration (one expert's copy = R layers of decode compute)."""
    from ..engine import Engine
    eng = Engine(model, n_threads=1, cache_rate=1.0, link=f"ratio={ratio}")
    try:
        return eng.source.calibration["bandwidth"]
    finally:
        eng.close()


def measured_run(model, trace, rate: float, policy: str, predictor: str, cpu: str, link_bps: float,
                 lookahead: int) -> dict:
    """One configuration on the real Engine, each traced prompt on a fresh engine (as bench_cache does);
    checks every output against the trace (the routing the simulator replays is the run's)."""
    from ..bench.phases import run_phases
    from ..engine import Engine
    from .routing import TraceRouting
    counts = TraceRouting(trace).use_counts()
    acc = {"prefill_tokens": 0, "prefill_s": 0.0, "decode_tokens": 0, "decode_s": 0.0}
    stats = {"prefill": {}, "decode": {}}
    for s in trace.seqs():
        start, n_prompt, n_decode = s["start"], s["n_prompt"], s["n_decode"]
        prompt = [int(t) for t in trace.tokens[start:start + n_prompt]]
        want = [int(t) for t in trace.tokens[start + n_prompt:start + n_prompt + n_decode]]
        eng = Engine(model, n_threads=1, cache_rate=rate, policy=policy, predictor=predictor, cpu_experts=cpu,
                     link=f"{link_bps / 1e6:.6f}MB/s", profile=counts, lookahead=lookahead,
                     routes=trace.routes(s) if predictor == "oracle" else None)
        try:
            run = run_phases(eng, prompt, n_decode + 1)
        finally:
            eng.close()
        if run.tokens[:n_decode] != want:
            raise RuntimeError(f"{policy}/{predictor}/{cpu} at rate {rate} decoded other tokens than the trace")
        tm = run.timing
        acc["prefill_tokens"] += tm.prefill_tokens
        acc["prefill_s"] += tm.prefill_s
        acc["decode_tokens"] += tm.decode_tokens
        acc["decode_s"] += tm.decode_s
        for k in ("hits", "misses", "stall_s", "bytes_h2d", "cpu_experts"):
            stats["prefill"][k] = stats["prefill"].get(k, 0) + run.prefill[k]
            stats["decode"][k] = stats["decode"].get(k, 0) + run.decode[k]
    out = {"decode_tok_s": acc["decode_tokens"] / acc["decode_s"], "prefill_tok_s": acc["prefill_tokens"] / acc["prefill_s"]}
    for ph in ("decode", "prefill"):
        st = stats[ph]
        n = st["hits"] + st["misses"]
        out[f"{ph}_hit_rate"] = st["hits"] / n if n else None
        out[f"{ph}_stall_share"] = st["stall_s"] / acc[f"{ph}_s"]
        out[f"{ph}_h2d_per_token"] = st["bytes_h2d"] / acc[f"{ph}_tokens"]
    out["decode_cpu_experts_per_token"] = stats["decode"]["cpu_experts"] / acc["decode_tokens"]
    return out


def simulated_run(model, trace, profile, rate: float, policy: str, predictor: str, cpu: str, lookahead: int) -> dict:
    from .run import load_inputs, simulate
    inp = load_inputs(shape=model, trace=str(trace.path), profile=profile)
    return simulate(inputs=inp, engine="promoe", policy=policy, predictor=predictor, cpu_experts=cpu,
                    cache_rate=rate, lookahead=lookahead)


def validate_cpu(model=None, out_dir="build/sim-validation", rates=(0.25, 0.5, 0.75), tokens: int = 48,
                 lookahead: int = 4, ratio: float = 10.0, configs=CONFIGS, progress: bool = True) -> dict:
    """Every (rate, config): measured on the real Engine and simulated with a profile measured just
    before it. Returns {"meta", "rows"}."""
    import os
    import shutil
    from tqdm import tqdm
    from ..paths import DEFAULT_MODEL
    from .measure import measure_profile
    model = model or DEFAULT_MODEL
    tdir = os.path.join(out_dir, "trace")
    shutil.rmtree(tdir, ignore_errors=True)
    trace = record_trace(model, tdir, tokens=tokens)
    link = link_bandwidth(model, ratio)
    rows = []
    jobs = [(r, c) for r in rates for c in configs]
    for rate, (label, policy, predictor, cpu) in tqdm(jobs, desc="validate", unit="run", disable=not progress):
        prof = measure_profile(link, model)
        meas = measured_run(model, trace, rate, policy, predictor, cpu, link, lookahead)
        sim = simulated_run(model, trace, prof, rate, policy, predictor, cpu, lookahead)
        row = {"cache_rate": rate, "label": label, "policy": policy, "predictor": predictor, "cpu_experts": cpu,
               "profile": {k: getattr(prof, k) for k in ("gpu_gbs", "gpu_tflops", "h2d_gbs", "ours_layer_us",
                                                         "ours_prefill_layer_us", "predictor_us")}}
        for k in ("decode_tok_s", "prefill_tok_s", "decode_hit_rate", "prefill_hit_rate", "decode_stall_share"):
            row[f"measured_{k}"], row[f"simulated_{k}"] = meas[k], sim[k]
        row["decode_error"] = sim["decode_tok_s"] / meas["decode_tok_s"] - 1
        row["prefill_error"] = sim["prefill_tok_s"] / meas["prefill_tok_s"] - 1
        rows.append(row)
    meta = {"model": os.path.basename(model), "prompts": PROMPTS, "decode_tokens": tokens, "lookahead": lookahead,
            "link_ratio": ratio, "link_bytes_per_s": link, "date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": f"{os.cpu_count()} CPUs, shared; the device and the link are emulated (runtime/link.py)"}
    return {"meta": meta, "rows": rows}
