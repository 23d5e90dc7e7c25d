"""End-to-end decode on a GPU through Engine(device="cuda"), on real-shape models written directly
(promoe_gguf.bench.real_shapes: published shapes, llama.cpp's Q4_K_M mix, random valid blocks; no
llama.cpp needed). Exits non-zero on any failed check; writes OUT.json after every configuration, so a
crash late keeps what ran early.

Models (--models): mixtral-8x7b and qwen3-30b-a3b (--layers, default 2 and 4), qwen1.5-moe-a2.7b
(qwen2moe: biases, the 1-D gated shared expert), deepseek-v2-lite (deepseek2: MLA, a dense layer) and,
last (a short lease keeps what ran before it), gpt-oss-20b (sinks, a window, expert biases: torch
between the routed matvec kernels).
For each, decoding the same prompt greedily:
  * all resident, graphs and eager: us per decode layer (timed with nothing watching), then kernels
    per token (torch.profiler) and host syncs per token with the line that made each
    (torch.cuda.set_sync_debug_mode) over a short profiled pass, graph replays per token; the logits
    of every step bitwise equal (checked);
  * an expert cache at half the experts, misses copied (lru, graphs): tokens equal to the all-resident
    run (checked), host waits per token (one per MoE layer + one);
  * hybrid (promoe + gate, cpu_experts="all", graphs): experts computed on the CPU (checked > 0), greedy
    agreement with the all-resident run;
  * with --llamacpp DIR (the CUDA bundle): llama-bench's decode on the same file, every layer on the
    GPU, beside ours: tok/s and the effective bandwidth (bytes read per token x tok/s) of both.
With --profile-out FILE: the H200 profile with our fixed cost per decode layer as measured here (the
all-resident, graphs step's wall time per layer minus its bytes at the device bandwidth --d2d), for
`promoe simulate --profile FILE` and scripts/sim_results.py --layer-cost FILE.

    python scripts/gpu_e2e.py OUT.json [--models mixtral-8x7b,qwen3-30b-a3b] [--tokens 32] [--d2d GBps]
                              [--llamacpp DIR] [--profile-out FILE]
    python scripts/gpu_e2e.py OUT.json --device cuda-emulated --models default --tokens 6   # dry run here
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

MODELS = {"mixtral-8x7b": 2, "qwen3-30b-a3b": 4, "qwen1.5-moe-a2.7b": 2, "deepseek-v2-lite": 2, "gpt-oss-20b": 2,
          "qwen3.5-35b-a3b": 4}
PROMPT = list(range(1, 17))


def model_path(name: str, layers: int | None) -> Path:
    """The embedded model ("default"), or a real-shape model written once under /tmp."""
    if name == "default":
        from promoe_gguf import DEFAULT_MODEL
        return Path(DEFAULT_MODEL)
    from promoe_gguf.bench import real_shapes
    n = layers or MODELS[name]
    path = Path("/tmp/promoe-e2e") / real_shapes.file_name(name, n)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        real_shapes.write_model(name, path, n)
        print(f"{name}: {n} layers written in {time.time() - t0:.0f} s", flush=True)
    return path


def engine_options(device: str) -> dict:
    if device == "cuda-emulated":
        from promoe_gguf.kernels.emulator import Emu, build_emulator
        return {"device": "cpu", "launcher": Emu(build_emulator()).launcher}
    return {"device": device}


PROFILED_TOKENS = 8


def decode(eng, tokens: int, profile: bool) -> dict:
    """Greedy decode of PROMPT: tokens, the logits of every step, per-token counts and timings.

    Two passes after a warm-up (eager, recorded, replayed): `tokens` timed steps with nothing
    watching, then (profile, on a GPU) PROFILED_TOKENS steps under torch.profiler and torch's sync
    debug mode, for kernels and syncs per token and where each sync was made. Timing under the
    profiler is not decode time: CUPTI's start-up and per-kernel tracing land in it (the first H200
    run timed the first model 34x slower with graphs than eager that way)."""
    import torch
    on_gpu = eng.device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(eng.device)) if on_gpu else (lambda: None)
    eng._new_sequence()
    logits = eng._prefill(eng.kv_cache, torch.tensor(PROMPT), last_only=True)[-1].float().cpu()
    out, steps = [], []

    def run(n: int):
        nonlocal logits
        for _ in range(n):
            tok = int(torch.argmax(logits))
            out.append(tok)
            logits = eng.decoding.step(tok).clone()
            steps.append(logits)
        sync()
    run(3)                                                    # warm-up: eager, recorded, replayed
    before = eng.decoding.counts.copy()
    t0 = time.perf_counter()
    run(tokens)
    wall = time.perf_counter() - t0
    n_layers = eng.config.n_layers
    counts = eng.decoding.counts.since(before, n_layers)
    row = {"tokens": out, "wall_us_per_layer": wall / tokens / n_layers * 1e6, "decode_tok_s": tokens / wall,
           **{k: counts[k] for k in ("mode", "replays_per_token", "host_syncs_per_token",
                                     "launches_outside_replays_per_token", "host_us_per_layer")}}
    if profile and on_gpu:
        row.update(profiled(torch, lambda: run(PROFILED_TOKENS)))
        row["profiled_tokens"] = PROFILED_TOKENS
        for k in ("profiler_kernels_per_token", "torch_syncs_per_token"):
            row[k] /= PROFILED_TOKENS
    return row, steps


def profiled(torch, fn) -> dict:
    """Kernels (torch.profiler) and host syncs (torch's sync debug mode: every thread's, with the
    Python line that made each) while fn runs."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile
    with tprofile(activities=[ProfilerActivity.CUDA]) as prof, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    sites: dict = {}
    for w in syncs:
        where = f"{Path(w.filename).name}:{w.lineno}"
        sites[where] = sites.get(where, 0) + 1
    return {"profiler_kernels_per_token": len(kernels), "torch_syncs_per_token": len(syncs),
            "torch_sync_sites": dict(sorted(sites.items(), key=lambda kv: -kv[1]))}


def bytes_per_token(model) -> float:
    """Weight bytes a decode token reads: every resident tensor, and k routed experts per MoE layer."""
    expert = sum(model.expert_nbytes(*k) for k in model.expert_keys) / max(1, len(model.expert_keys))
    resident = sum(model.tensor_ref(n).nbytes for n in model.resident_names)
    return resident + model.config.n_experts_used * expert * len(model.config.moe_layers)


def run_model(name: str, layers, device: str, tokens: int, llamacpp, save) -> dict:
    from promoe_gguf import Engine, open_model
    path = model_path(name, layers)
    m = open_model(str(path))
    res = {"model": name, "file": path.name, "n_layers": m.config.n_layers, "moe_layers": len(m.config.moe_layers),
           "bytes_per_token": bytes_per_token(m), "rows": {}, "checks": {}}
    opts = engine_options(device)

    def one(label: str, **kw):
        eng = Engine(str(path), n_ctx=128, **opts, **kw)
        try:
            row, steps = decode(eng, tokens, profile=True)
            st = eng.stats
            row.update({"cpu_experts_run": st.get("cpu_experts", 0), "hits": st.get("hits", 0),
                        "misses": st.get("misses", 0), "stall_s": st.get("stall_s", 0.0),
                        "fell_back_to_torch": dict(eng.backend.failed)})
        finally:
            eng.close()
        res["rows"][label] = row
        save()
        print(f"{name} {label}: {row['decode_tok_s']:.1f} tok/s, {row['wall_us_per_layer']:.0f} us/layer, "
              f"{row['mode']} {row['replays_per_token']:.0f} replays / {row['launches_outside_replays_per_token']:.0f} "
              f"launches outside / {row['host_syncs_per_token']:.0f} host waits per token"
              + (f", {row['profiler_kernels_per_token']:.0f} kernels and {row['torch_syncs_per_token']:.1f} torch syncs "
                 f"per token (profiler)" if "profiler_kernels_per_token" in row else ""), flush=True)
        if row.get("torch_sync_sites"):
            print(f"  syncs made at: {', '.join(f'{k} x{v}' for k, v in row['torch_sync_sites'].items())}", flush=True)
        return row, steps

    graphs, g_steps = one("resident, graphs")
    eager, e_steps = one("resident, eager", graphs=False)
    import torch
    checks = res["checks"]
    checks["graphs_equal_eager_bitwise"] = all(torch.equal(a, b) for a, b in zip(g_steps, e_steps))
    checks["no_torch_fallback"] = not graphs["fell_back_to_torch"]
    checks["graphs_recorded"] = graphs["mode"] == "graphs"
    checks["resident_one_wait_per_token"] = graphs["host_syncs_per_token"] == 1
    cached, _ = one("cache 0.5, lru, misses copied", cache_rate=0.5, policy="lru", cpu_experts="off")
    checks["cache_tokens_equal_resident"] = cached["tokens"] == graphs["tokens"]
    checks["cache_one_wait_per_moe_layer"] = cached["host_syncs_per_token"] <= res["moe_layers"] + 1
    hybrid, _ = one("hybrid, cpu_experts=all", cache_rate=0.5, policy="promoe", predictor="gate", cpu_experts="all")
    checks["hybrid_ran_cpu_experts"] = hybrid["cpu_experts_run"] > 0
    res["hybrid_greedy_agreement"] = sum(a == b for a, b in zip(hybrid["tokens"], graphs["tokens"])) / len(graphs["tokens"])
    res["eager_over_graphs_us_per_layer"] = (eager["wall_us_per_layer"], graphs["wall_us_per_layer"])
    if llamacpp:
        from promoe_gguf.bench.llamacpp import run_llama_bench
        lc = run_llama_bench(path, n_prompt=0, n_gen=max(32, tokens), n_gpu_layers=99, reps=2, bin_dir=llamacpp)
        res["llamacpp_decode_tok_s"] = lc.decode_tok_s
        res["ours_over_llamacpp_decode"] = graphs["decode_tok_s"] / lc.decode_tok_s
        res["effective_GBps"] = {"ours": res["bytes_per_token"] * graphs["decode_tok_s"] / 1e9,
                                 "llamacpp": res["bytes_per_token"] * lc.decode_tok_s / 1e9}
        print(f"{name}: llama.cpp (all on the GPU) {lc.decode_tok_s:.1f} tok/s; ours / llama.cpp "
              f"{res['ours_over_llamacpp_decode']:.2f}x", flush=True)
    save()
    failed = [k for k, ok in checks.items() if not ok]
    print(f"{name}: checks {'passed' if not failed else 'FAILED: ' + ', '.join(failed)}", flush=True)
    return res


def measured_profile(results: list[dict], d2d_GBps: float):
    """The H200 profile with our fixed cost per decode layer as measured: the all-resident graphs
    step's wall time per layer less its bytes at the device bandwidth (median over the models)."""
    from promoe_gguf.sim.profile import PROFILES
    costs, cached = [], []
    for r in results:
        bw_us = r["bytes_per_token"] / (d2d_GBps * 1e9 * PROFILES["h200"].gpu_eff) / r["n_layers"] * 1e6
        if "resident, graphs" in r["rows"]:
            costs.append(max(0.0, r["rows"]["resident, graphs"]["wall_us_per_layer"] - bw_us))
        if "hybrid, cpu_experts=all" in r["rows"]:          # hand-offs and CPU experts included: an upper bound
            cached.append(max(0.0, r["rows"]["hybrid, cpu_experts=all"]["wall_us_per_layer"] - bw_us))
    resident = statistics.median(costs)
    hybrid = statistics.median(cached) if cached else resident
    prof = PROFILES["h200"].with_(ours_layer_us=hybrid,
                                  extra={"layer_us_by_mode": {"all resident": resident, "hybrid": hybrid}})
    return prof, costs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--layers", type=int, default=None, help="layers of every real-shape model (default per model)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cuda-emulated"))
    ap.add_argument("--d2d", type=float, default=4000.0, help="device bandwidth, GB/s (gpu_bench measures it)")
    ap.add_argument("--llamacpp", default=None, help="the CUDA llama.cpp bundle's directory (llama-bench)")
    ap.add_argument("--profile-out", default=None, help="write the measured per-layer cost as a simulate profile")
    args = ap.parse_args(argv)
    out = {"status": "running", "device": args.device, "models": []}

    def save():
        Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    failed = []
    for name in args.models.split(","):
        try:
            r = run_model(name, args.layers, args.device, args.tokens, args.llamacpp, save)
            out["models"].append(r)
            failed += [f"{name}: {k}" for k, ok in r["checks"].items() if not ok]
        except Exception as e:  # noqa: BLE001 - record the failure, go on with the next model, fail at the end
            import traceback
            traceback.print_exc()
            out["models"].append({"model": name, "status": "failed", "reason": f"{type(e).__name__}: {e}"})
            failed.append(f"{name}: {type(e).__name__}: {e}")
        save()
    if args.profile_out and out["models"]:
        try:
            prof, costs = measured_profile([r for r in out["models"] if "rows" in r], args.d2d)
            prof = prof.with_(name="h200-measured",
                              source=f"scripts/gpu_e2e.py {time.strftime('%Y-%m-%d')}: ours_layer_us measured on this "
                                     f"GPU (per model: {', '.join(f'{c:.0f}' for c in costs)} us)")
            Path(args.profile_out).write_text(json.dumps(prof.to_json(), indent=1))
            out["ours_layer_us"] = prof.ours_layer_us
        except Exception as e:  # noqa: BLE001
            failed.append(f"profile: {type(e).__name__}: {e}")
    out["status"] = "ok" if not failed else "failed"
    out["failed"] = failed
    save()
    print("gpu_e2e: " + ("all checks passed" if not failed else "FAILED: " + "; ".join(failed)), flush=True)
    return 0 if not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
