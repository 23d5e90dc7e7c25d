"""A profile of THIS machine for the CPU emulation (the "device" is the compute thread's ggml, the
link is runtime.link's emulated one): what validation (a) simulates our measured Engine runs with.

  ggml probe   an expert of the model's shape and quant types (random valid blocks) through
               CpuBackend.expert_ffn on `threads` threads: bytes/s at 1 token (gpu_gbs = cpu_gbs, the
               call's fixed cost folded in) and flops/s at 64 tokens (gpu_tflops, cpu_gflops)
  per layer    an Engine on `model` with every expert cached (cache_rate=1, unthrottled link): decode
               and prefill step time minus the probe's compute, per layer (ours_layer_us,
               ours_prefill_layer_us): Python, ggml graph building, the runtime's bookkeeping
  per miss     lru at CALIBRATION_RATE over the emulated link: per miss, the wait beyond bytes /
               bandwidth (h2d_latency_us per chunk: the copy thread's sleep overshoots on a busy machine)
               and the decode time beyond the all-resident step outside the waits (miss_us: waking up,
               pinning, cold caches after the thread slept)
  per CPU job  the same with every miss computed by the CPU pool: the extra time per CPU expert beyond
               its ggml product (cpu_job_us: hand-off, the pool thread's Python competing for the GIL)
  predictor    one GatePredictor call and the prefetcher's top-k vote on it (predictor_us)
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ..runtime.cost import _timed
from .profile import Profile


def _expert(specs):
    """Random valid matrices for [(name, qtype, (rows, cols))]: (QMatrix list, bytes, flops per token)."""
    from ..backends import matrix_at
    from ..format.quants import quant_type
    from ..kernels.testdata import random_blocks
    g = torch.Generator().manual_seed(0)
    mats, nbytes, flops = [], 0, 0
    for name, qtype, shape in specs:
        mats.append(matrix_at(random_blocks(qtype, shape, g), 0, name, qtype, shape))
        nbytes += shape[0] * quant_type(qtype).row_bytes(shape[1])
        flops += 2 * shape[0] * shape[1]
    return mats, nbytes, flops


def probe_ggml(specs, threads: int = 1) -> dict:
    """{bytes_per_s, flops_per_s} of ggml's expert product over an expert of `specs` on this machine."""
    from ..backends.cpu import CpuBackend
    be = CpuBackend(n_threads=threads)
    try:
        mats, nbytes, flops1 = _expert(specs)
        d = specs[0][2][1]
        x1, x64 = torch.randn(1, d), torch.randn(64, d)
        t1 = _timed(lambda: be.expert_ffn(x1, *mats), repeats=51)
        t64 = _timed(lambda: be.expert_ffn(x64, *mats), repeats=11)
    finally:
        be.close()
    return {"bytes_per_s": nbytes / t1, "flops_per_s": flops1 * 64 / t64, "expert_bytes": nbytes,
            "t1_s": t1, "t64_s": t64}


def _decode_run(model, threads: int, tokens: int, prompt: str, warm: bool, decode_link=None, **kw) -> dict:
    """Per decode token: wall time, time waiting for copies, misses and CPU experts of one Engine run
    (optionally after a warm-up generation; with `decode_link` bytes/s, the emulated link is set to it
    once the prompt is in)."""
    from ..bench.phases import run_phases
    from ..engine import Engine
    eng = Engine(model, n_threads=threads, **kw)
    try:
        if warm:
            list(eng.generate(prompt, max_tokens=4, temperature=0, ignore_eos=True))

        def set_decode_link():
            if decode_link:
                eng.source.transfer.link.bandwidth = decode_link
        run = run_phases(eng, prompt, tokens, at_split=set_decode_link)
        tm = run.timing
        eb = float(np.mean(list(eng.source.store.expert_bytes.values())))
        chunks = len(eng.source.store.chunks(eng.source.store.keys[0]))
        cfg = eng.model.config
    finally:
        eng.close()
    n = max(1, tm.decode_tokens)
    d = {k: run.decode[k] / n for k in ("misses", "cpu_experts", "stall_s")}
    return {"step_s": tm.decode_s / n, "prefill_s": tm.prefill_s, "prefill_tokens": tm.prefill_tokens,
            **d, "expert_bytes": eb, "chunks": chunks, "cfg": cfg}


CALIBRATION_RATE = 0.375        # the miss and CPU-job runs; validation uses other cache rates


def _engine_overheads(model, threads: int, tokens: int, probe: dict, prompt: str, link_bps: float) -> dict:
    """Per-layer, per-miss, per-chunk and per-CPU-job costs of our runtime beyond the probe's expert
    compute, from three Engine runs on this machine, now."""
    res = _decode_run(model, threads, tokens, prompt, True, cache_rate=1.0, cpu_experts="off")
    cfg, eb, bw = res["cfg"], res["expert_bytes"], probe["bytes_per_s"]
    L = cfg.n_layers
    layer_us = (res["step_s"] - len(cfg.moe_layers) * eb * cfg.n_experts_used / bw) / L
    # prefill: the per-expert path calls every used expert once per chunk (at most n_experts per layer)
    calls = len(cfg.moe_layers) * min(cfg.n_experts, res["prefill_tokens"] * cfg.n_experts_used)
    pre_us = (res["prefill_s"] - calls * eb / bw) / L
    # misses copied (lru, reactive: the link is idle when a miss is requested) over the emulated link:
    # the wait beyond bytes / bandwidth is the link's per-chunk overshoot; the time beyond the
    # all-resident step outside the waits is the compute thread's cost per miss
    miss = _decode_run(model, threads, tokens, prompt, False, cache_rate=CALIBRATION_RATE, cpu_experts="off",
                       link=f"{link_bps / 1e6:.6f}MB/s")
    m = max(miss["misses"], 1e-9)
    chunk_us = (miss["stall_s"] / m - eb / link_bps) / miss["chunks"]
    miss_us = (miss["step_s"] - miss["stall_s"] - res["step_s"]) / m
    # every miss computed by the CPU pool (the link slowed once the prompt is in: few admissions land)
    cpu = _decode_run(model, threads, tokens, prompt, False, decode_link=link_bps, cache_rate=CALIBRATION_RATE,
                      cpu_experts="all")
    job_us = (cpu["step_s"] - res["step_s"]) / max(cpu["cpu_experts"], 1e-9) - eb / bw
    return {"ours_layer_us": max(0.0, layer_us) * 1e6, "ours_prefill_layer_us": max(0.0, pre_us) * 1e6,
            "h2d_latency_us": max(0.0, chunk_us) * 1e6, "miss_us": max(0.0, miss_us) * 1e6,
            "cpu_job_us": max(0.0, job_us) * 1e6, "decode_step_s": res["step_s"], "prefill_s": res["prefill_s"],
            "prefill_tokens": res["prefill_tokens"], "misses_per_step": miss["misses"],
            "cpu_experts_per_step": cpu["cpu_experts"]}


def _predictor_us(m) -> float:
    from ..predict.gate import GatePredictor
    from ..runtime.prefetcher import Predictions
    p = GatePredictor(m, 1)
    x = torch.randn(1, m.config.n_embd)
    voter = type("Voter", (), {"n_used": m.config.n_experts_used})()

    def call():
        for s in p.predict(m.config.moe_layers[0], x).values():
            Predictions.pick(voter, s)
    return _timed(call, repeats=200) * 1e6


def _handoff_us(threads: int) -> float:
    """An empty job's round trip through a CPU expert pool, as the runtime's cost model measures it."""
    from ..runtime.cpu_pool import CpuExpertPool
    pool = CpuExpertPool(threads)
    try:
        return _timed(pool.round_trip, repeats=20) * 1e6
    finally:
        pool.close()


def measure_profile(link_bps: float, model=None, threads: int = 1, tokens: int = 48,
                    prompt: str = "def parse_args(argv=None):\n") -> Profile:
    """This machine as a profile for the emulated runtime with a link of `link_bps` bytes/s."""
    from ..paths import DEFAULT_MODEL
    from ..format import open_model
    model = model or DEFAULT_MODEL
    m = open_model(model)
    probe = probe_ggml([(x.matrix, x.qtype, x.shape) for x in m.expert_matrices(m.config.moe_layers[0], 0)], threads)
    over = _engine_overheads(model, threads, tokens, probe, prompt, link_bps)
    gbs, gflops = probe["bytes_per_s"] / 1e9, probe["flops_per_s"] / 1e9
    return Profile(
        name="this-machine-emulated", gpu_gbs=gbs, gpu_mem_gb=0.0, h2d_gbs=link_bps / 1e9,
        h2d_latency_us=over["h2d_latency_us"],
        cpu_gbs=gbs, cpu_threads=threads, gpu_tflops=gflops * threads / 1e3, cpu_gflops=gflops / threads,
        cpu_thread_gbs=gbs * 10, gpu_eff=1.0, cpu_eff=1.0, expert_call_us=0.0,
        ours_layer_us=over["ours_layer_us"], ours_prefill_layer_us=over["ours_prefill_layer_us"],
        miss_us=over["miss_us"], cpu_job_us=over["cpu_job_us"], cpu_handoff_us=_handoff_us(threads),
        predictor_us=_predictor_us(m), emulated=True,
        source=f"measured on this machine {time.strftime('%Y-%m-%d')}: ggml {threads} thread(s), emulated link",
        extra={"probe": probe, "engine": over})
