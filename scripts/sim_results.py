"""The simulator's committed results (bench/results/sim/): the consumer-GPU comparison (issue 11,
item 6), tok/s-vs-memory sweeps as PNG, and the synthetic routing's calibration table.
ALL FIGURES ARE SIMULATED (promoe simulate), never measured on a GPU.

    python scripts/sim_results.py [--out bench/results/sim] [--skip-sweeps]
"""
from __future__ import annotations

import argparse
import json
import os
import time

from tqdm import tqdm

from promoe_gguf.errors import ModelError
from promoe_gguf.sim import load_inputs, simulate, sweep
from promoe_gguf.sim.profile import PROFILES
from promoe_gguf.sim.report import plot_sweep
from promoe_gguf.sim.routing import calibration_rows

MODELS = ["mixtral-8x7b", "qwen3-30b-a3b"]
GPUS = ["rtx4070ti-12g", "rtx3060-12g", "rtx4090-24g"]
OURS = [("lru", dict(policy="lru", predictor="none", cpu_experts="off")),
        ("promoe", dict(policy="promoe", predictor="gate", cpu_experts="off")),
        ("hybrid", dict(policy="promoe", predictor="gate", cpu_experts="auto"))]
N_BATCH = 512                # our prefill chunk in the comparison (llama.cpp's ubatch); the Engine's default is 64
AS_BUILT_LAYER_US = 400      # sensitivity: a Python-bound dispatch (24 device ops x ~15 us + 1 sync)


def llamacpp_best(inp) -> dict:
    """llama.cpp's modes that fit (all on the CPU, --ngl auto, --n-cpu-moe auto), best decode first."""
    rows = []
    for kw in ({}, {"ngl": "auto"}, {"n_cpu_moe": "auto"}):
        try:
            rows.append(simulate(engine="llamacpp", inputs=inp, **kw))
        except ModelError:
            pass
    return sorted(rows, key=lambda r: -r["decode_tok_s"])


def comparison(progress=True, layer_cost: tuple[float, float] | None = None) -> list[dict]:
    """layer_cost: our measured per-layer decode cost (every expert resident, with an expert cache)."""
    out = []
    jobs = [(m, g) for m in MODELS for g in GPUS]
    for model, gpu in tqdm(jobs, desc="compare", disable=not progress):
        inp = load_inputs(shape=model, profile=gpu, sequences=2)      # ours: the first warms the cache
        modes = llamacpp_best(inp)
        row = {"model": model, "gpu": gpu, "profile": PROFILES[gpu].source, "calibrated_routing": inp.calibrated,
               "llamacpp": {r["mode"]: _brief(r) for r in modes}, "llamacpp_best": modes[0]["mode"]}
        for name, kw in OURS:
            r = simulate(engine="promoe", inputs=inp, n_batch=N_BATCH, warm=True, **kw)
            row[name] = _brief(r) | {"slots": r["slots"], "cache_rate": r["cache_rate"]}
        row["hybrid_batch64"] = _brief(simulate(engine="promoe", inputs=inp, n_batch=64, warm=True, **OURS[2][1]))
        row["hybrid_cold"] = _brief(simulate(engine="promoe", inputs=inp, n_batch=N_BATCH, **OURS[2][1]))
        slow = load_inputs(shape=model, profile=f"{gpu},ours_layer_us={AS_BUILT_LAYER_US}", sequences=2)
        r = simulate(engine="promoe", inputs=slow, n_batch=N_BATCH, warm=True, **OURS[2][1])
        row["hybrid_python_bound"] = _brief(r)
        if layer_cost is not None:
            cost = layer_cost[0] if row["hybrid"]["cache_rate"] >= 1 else layer_cost[1]   # everything fits: no hand-offs
            meas = load_inputs(shape=model, profile=f"{gpu},ours_layer_us={cost}", sequences=2)
            row["hybrid_measured_cost"] = _brief(simulate(engine="promoe", inputs=meas, n_batch=N_BATCH, warm=True,
                                                          **OURS[2][1])) | {"layer_us": round(cost, 1)}
        out.append(row)
    return out


def _brief(r: dict) -> dict:
    return {"decode_tok_s": round(r["decode_tok_s"], 2), "prefill_tok_s": round(r["prefill_tok_s"], 1),
            "decode_hit_rate": None if r["decode_hit_rate"] is None else round(r["decode_hit_rate"], 3),
            "decode_stall_share": round(r["decode_stall_share"], 3),
            "device_gib": round(r["device_memory"]["total"] / 2**30, 2), "mode": r["mode"],
            "decode_h2d_mb_per_token": round(r["decode_bytes_per_token"]["h2d"] / 1e6, 1),
            "decode_cpu_experts_per_token": round(r["decode_cpu_experts_per_token"], 2)}


def render_comparison(rows, path, layer_cost=None, layer_cost_source=""):
    lines = ["# Consumer GPUs: llama.cpp's best mode vs our runtime (SIMULATED)", "",
             "**Simulated with `promoe simulate`, never measured on a GPU.** Profiles (promoe_gguf/sim/profile.py): "
             + "; ".join(f"`{g}` = {PROFILES[g].source}" for g in GPUS) + ". Q4_K_M as llama.cpp lays it out; "
             "synthetic routing (Qwen3-30B-A3B: the preset calibrated to published traces; Mixtral: the same "
             "preset, no public trace statistics), a request = a 512-token prompt then 128 decoded tokens, context "
             "4096; our cache is warm (a server: a previous, independent request ran first; 'cold' column: the first "
             "request after start-up). Every engine "
             "gets the whole GPU: llama.cpp the placements that fit (all on the CPU, the most layers with `--ngl`, "
             "the fewest CPU expert layers with `--n-cpu-moe`; best decode shown), ours the largest expert cache "
             "`Engine(gpu_mem=default)` fits (10% / 1 GiB left to CUDA).", "",
             "- **lru**: per-layer LRU, every miss copied; **promoe**: promoe policy + gate predictor, misses copied; "
             "**hybrid**: promoe + gate, misses on the CPU when the cost model says so (`--cpu-experts auto`).",
             f"- Our per-layer decode cost is set to llama.cpp's (69 us: the design's target); the 'hybrid, Python-bound' "
             f"column is hybrid at {AS_BUILT_LAYER_US} us/layer, a Python-bound dispatch"
             + (f"; the 'hybrid, measured cost' column is hybrid at the per-layer cost {layer_cost_source}: "
                f"{layer_cost[1]:.0f} us with an expert cache, {layer_cost[0]:.0f} us where every expert fits."
                if layer_cost is not None else " (no GPU run of ours exists to say which)."),
             "- Validation of the model: bench/results/sim/validation.md (llama.cpp decode within 15% of published "
             "runs; GPU prefill has no published check).", "",
             f"- Our prefill runs in chunks of {N_BATCH} tokens (`--n-batch {N_BATCH}`, llama.cpp's ubatch); the "
             "Engine's default, 64, re-reads (and on a miss re-copies) every expert each 64 tokens: the 'hybrid, --n-batch 64' column.",
             "",
             "| model | GPU | llama.cpp best (mode) | lru | promoe | hybrid | hybrid / llama.cpp | hybrid, Python-bound | "
             + ("hybrid, measured cost | measured / llama.cpp | " if layer_cost is not None else "")
             + "hybrid, --n-batch 64 | hybrid, cold |",
             "|---|---|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if layer_cost is not None else "") + "---:|---:|"]
    for phase in ("decode", "prefill"):
        lines.append(f"| **{phase} tok/s** | | | | | | | |" + (" | |" if layer_cost is not None else "") + " | |")
        for r in rows:
            best = r["llamacpp"][r["llamacpp_best"]]
            key = f"{phase}_tok_s"
            meas = (f"{r['hybrid_measured_cost'][key]:.1f} | {r['hybrid_measured_cost'][key] / best[key]:.2f}x | "
                    if layer_cost is not None else "")
            lines.append(f"| {r['model']} | {r['gpu']} | {best[key]:.1f} ({r['llamacpp_best']}) | {r['lru'][key]:.1f} | "
                         f"{r['promoe'][key]:.1f} | {r['hybrid'][key]:.1f} | {r['hybrid'][key] / best[key]:.2f}x | "
                         f"{r['hybrid_python_bound'][key]:.1f} | {meas}{r['hybrid_batch64'][key]:.1f} | "
                         f"{r['hybrid_cold'][key]:.1f} |")
    lines += ["", "Details (decode): cache slots, hit rate, share of decode waiting for copies, experts computed on "
              "the CPU and bytes copied per token.", "",
              "| model | GPU | engine | device GiB | slots (rate) | hit rate | stall | CPU experts/tok | copied MB/tok |",
              "|---|---|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        for mode, b in r["llamacpp"].items():
            lines.append(f"| {r['model']} | {r['gpu']} | llama.cpp {mode} | {b['device_gib']} | | | | | |")
        for name in ("lru", "promoe", "hybrid"):
            b = r[name]
            lines.append(f"| {r['model']} | {r['gpu']} | {name} | {b['device_gib']} | {b['slots']} ({b['cache_rate']:.0%}) | "
                         f"{b['decode_hit_rate']:.3f} | {b['decode_stall_share']:.0%} | {b['decode_cpu_experts_per_token']} | "
                         f"{b['decode_h2d_mb_per_token']} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def render_calibration(rows, path):
    lines = ["# Synthetic routing: calibration against public traces", "",
             "`promoe_gguf/sim/routing.py` presets, 8 MoE layers, mean of seeds 0-2. Steady-state LRU rows: 512 "
             "tokens, counted after 64 warm-up tokens; cold rows: an 8-token prompt then 256 decoded tokens, counted "
             "from the first. Role *fit*: the preset's parameters were tuned to it; *check*: not used for tuning. "
             "Targets are the published figure +-5 points (ranges as published where given).", "",
             "| preset | experts | statistic | target | simulated | within | role | source |",
             "|---|---|---|---|---:|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['experts']} | {r['statistic']} | {r['target']} | {r['simulated']:.3f} | "
                     f"{'yes' if r['ok'] else 'NO'} | {r['role']} | {r['source']} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/sim")
    ap.add_argument("--skip-sweeps", action="store_true")
    ap.add_argument("--layer-cost", default=None, metavar="US|PROFILE.json",
                    help="also simulate hybrid at this per-layer decode cost (a number, or the ours_layer_us of a "
                         "profile written by promoe bench or scripts/gpu_e2e.py)")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    cal = calibration_rows()
    render_calibration(cal, os.path.join(args.out, "routing_calibration.md"))
    cost, source = None, ""
    if args.layer_cost is not None:
        from promoe_gguf.sim.profile import layer_cost, parse_profile
        cached = layer_cost(args.layer_cost)
        cost, source = (cached, cached), "given"
        try:
            prof = parse_profile(args.layer_cost)
            by_mode = prof.extra.get("layer_us_by_mode", {})
            resident = next((v for k, v in by_mode.items() if k.startswith("all resident")), cached)
            cost, source = (resident, cached), f"measured ({prof.source})"
        except ModelError:
            pass
    rows = comparison(layer_cost=cost)
    render_comparison(rows, os.path.join(args.out, "consumer.md"), cost, source)
    with open(os.path.join(args.out, "consumer.json"), "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "simulated": True, "rows": rows, "layer_cost_us": cost,
                   "layer_cost_source": source, "routing_calibration": cal}, f, indent=1)
    if not args.skip_sweeps:
        for model, gpu in (("qwen3-30b-a3b", "rtx4070ti-12g"), ("mixtral-8x7b", "rtx4090-24g")):
            inp = load_inputs(shape=model, profile=gpu)
            srows = sweep(inp, [kw for _, kw in OURS])
            name = f"sweep-{model}-{gpu}"
            plot_sweep(srows, os.path.join(args.out, name + ".png"),
                       f"{model} Q4_K_M on {gpu} (our prefill at --n-batch 64, the Engine's default)")
            with open(os.path.join(args.out, name + ".json"), "w") as f:
                json.dump([{k: r[k] for k in ("engine", "mode", "device_gib", "decode_tok_s", "prefill_tok_s",
                                               "decode_hit_rate")} for r in srows], f, indent=1)
    print(open(os.path.join(args.out, "consumer.md")).read())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
