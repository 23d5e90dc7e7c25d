"""Side-by-side cache benchmark: lru vs static vs promoe (gate / mlp / oracle predictors) copying every
miss, and hybrid (promoe's cache with misses computed on the CPU when the cost model says so), one run.

On CPU the host-to-device link is EMULATED (runtime/link.py): `--link ratio=10` makes one expert's
copy take 10x one layer's decode compute, measured here (the regime of Mixtral-8x7B Q4_K_M on a
PCIe 4.0 RTX 4090: ~99 MB per expert at ~25 GB/s = 4 ms vs ~0.3 ms of compute per layer).
Every configuration decodes the same prompts with the same seed; outputs are checked to be
identical to the all-resident run. Prints a table with ratios against lru and writes JSON + a PNG
(hit rate and stall time vs cache rate).

    python scripts/bench_cache.py [--model M] [--rates 0.25,0.5,0.75] [--tokens 48] [--out bench/results/cache-cpu]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
from tqdm import tqdm

from promoe_gguf import DEFAULT_MODEL, Engine
from promoe_gguf.bench.phases import run_phases
from promoe_gguf.predict.oracle import RoutingRecorder

PROMPTS = ["def parse_args(argv=None):\n", "import os\nimport sys\n\n", "class Config:\n    def __init__(self"]


def run_config(model, prompt, n, **kw):
    """Generate `n` greedy tokens; returns (tokens, {"prefill": stats, "decode": stats})."""
    eng = Engine(model, n_threads=1, **kw)
    try:
        run = run_phases(eng, prompt, n)
    finally:
        eng.close()
    phases = {"prefill": run.prefill, "decode": run.decode, "link": run.last["link"]}
    return run.tokens, phases


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--rates", default="0.25,0.5,0.75")
    ap.add_argument("--tokens", type=int, default=48, help="decode tokens per prompt")
    ap.add_argument("--link", default="ratio=10")
    ap.add_argument("--lookahead", type=int, default=4,
                    help="layers ahead a predictor scores (past the last layer: the next token's layers)")
    ap.add_argument("--mlp", default=None, help="a trained predictor file (adds promoe+mlp)")
    ap.add_argument("--out", default="bench/results/cache-cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    # 1. the all-resident reference, recording the routing for the oracle predictor
    ref = Engine(args.model, n_threads=1, cpu_repack=False)   # as the cache keeps it: the GGUF layout
    rec = RoutingRecorder()
    ref.experts.observers.append(rec)
    routes, want = {}, []
    for p in PROMPTS:
        rec.routes = {}
        want.append(list(ref.generate(p, max_tokens=args.tokens, temperature=0, ignore_eos=True)))
        routes[p] = dict(rec.routes)
    use_counts = {}
    for r in routes.values():
        for (_, layer), experts in r.items():
            for e in experts:
                use_counts[(layer, e)] = use_counts.get((layer, e), 0) + 1

    link = args.link
    if link.startswith("ratio="):   # calibrate once, so every configuration sees the same link
        probe = Engine(args.model, n_threads=1, cache_rate=1.0, link=link)
        cal = probe.source.calibration
        probe.close()
        link = f"{cal['bandwidth'] / 1e6:.4f}MB/s"
        print(f"link calibration: one layer's decode compute {cal['layer_decode_s'] * 1e3:.2f} ms, mean expert "
              f"{cal['expert_bytes'] / 1e3:.0f} kB, ratio {cal['ratio']:g} -> emulated {cal['bandwidth'] / 1e6:.2f} MB/s")
    # (label, policy, predictor, cpu_experts): the copy-only runtimes, then hybrid
    configs = [("lru", "lru", "none", "off"), ("static", "static", "none", "off"), ("promoe", "promoe", "none", "off"),
               ("promoe", "promoe", "gate", "off"), ("promoe", "promoe", "oracle", "off"),
               ("hybrid", "promoe", "none", "auto"), ("hybrid", "promoe", "gate", "auto")]
    if args.mlp:
        configs.insert(4, ("promoe", "promoe", f"mlp:{args.mlp}", "off"))
        configs.append(("hybrid", "promoe", f"mlp:{args.mlp}", "auto"))
    rows = []
    rates = [float(r) for r in args.rates.split(",")]
    for rate in rates:
        for label, policy, predictor, cpu in tqdm(configs, desc=f"cache rate {rate}"):
            acc = {"prefill": {}, "decode": {}}
            for p, w in zip(PROMPTS, want):   # one engine per prompt: the oracle replays that prompt's routing
                o, ph = run_config(args.model, p, args.tokens, cache_rate=rate, policy=policy,
                                   predictor=predictor, link=link, use_counts=use_counts, cpu_experts=cpu,
                                   routes=routes[p] if predictor == "oracle" else None, lookahead=args.lookahead)
                # on the CPU the "device" and the CPU pool both compute with ggml: even hybrid is exact here
                assert o == w, f"{label}/{predictor} changed the output: the cache must never do that"
                for phase in acc:
                    for k, v in ph[phase].items():
                        acc[phase][k] = acc[phase].get(k, 0) + v
            for phase, st in acc.items():
                lookups = st["hits"] + st["misses"]
                rows.append({"cache_rate": rate, "phase": phase, "policy": label, "predictor": predictor.split(":")[0],
                             "cpu_experts": st["cpu_experts"], "cpu_s": st["cpu_s"], "wait_cpu_s": st["wait_cpu_s"],
                             "hit_rate": st["hits"] / lookups if lookups else float("nan"),
                             "stall_s": st["stall_s"], "wall_s": st["wall_s"], "tokens": st["tokens"],
                             "tokens_per_s": st["tokens"] / st["wall_s"], "bytes_h2d": st["bytes_h2d"],
                             "prefetch_useful": st["prefetch_useful"], "prefetch_wasted": st["prefetch_wasted"],
                             "predictor_s": st["predictor_s"], "link": ph["link"]})
    link_desc = rows[0]["link"]
    print(f"\nmodel {os.path.basename(args.model)}; {len(PROMPTS)} prompts, prefill then {args.tokens} greedy decode "
          f"tokens each; {link_desc} (--link {args.link}); lookahead {args.lookahead}; every output identical to "
          f"the all-resident run")
    print(f"{'rate':>5} {'phase':<7} {'policy':<7} {'predictor':<9} {'hit rate':>8} {'stall s':>8} {'tok/s':>7} "
          f"{'stall/lru':>9} {'tok/s/lru':>9} {'useful':>6} {'wasted':>6} {'on CPU':>6} {'CPU wait s':>10}")
    for r in rows:
        base = next(b for b in rows if (b["cache_rate"], b["phase"]) == (r["cache_rate"], r["phase"])
                    and b["policy"] == "lru")
        r["stall_vs_lru"] = r["stall_s"] / base["stall_s"] if base["stall_s"] else float("nan")
        r["speed_vs_lru"] = r["tokens_per_s"] / base["tokens_per_s"]
        print(f"{r['cache_rate']:>5.2f} {r['phase']:<7} {r['policy']:<7} {r['predictor']:<9} {r['hit_rate']:>8.3f} "
              f"{r['stall_s']:>8.2f} {r['tokens_per_s']:>7.1f} {r['stall_vs_lru']:>9.2f} {r['speed_vs_lru']:>9.2f} "
              f"{r['prefetch_useful']:>6} {r['prefetch_wasted']:>6} {r['cpu_experts']:>6} {r['wait_cpu_s']:>10.2f}")
    os.makedirs(args.out, exist_ok=True)
    meta = {"model": os.path.basename(args.model), "link": args.link, "link_desc": link_desc, "tokens": args.tokens,
            "prompts": PROMPTS, "date": time.strftime("%Y-%m-%d"), "machine": platform.platform(),
            "cpus": os.cpu_count(), "note": "CPU run: the host-to-device link is emulated"}
    with open(os.path.join(args.out, "cache_bench.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    _plot(rows, rates, os.path.join(args.out, "cache_bench.png"), link_desc)
    print(f"wrote {args.out}/cache_bench.json and cache_bench.png")
    return 0


def _plot(rows, rates, path, link_desc):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.5))
    rows = [r for r in rows if r["phase"] == "decode"]
    for name in dict.fromkeys(f"{r['policy']}+{r['predictor']}" for r in rows):
        sel = [r for r in rows if f"{r['policy']}+{r['predictor']}" == name]
        style = "-" if sel[0]["policy"] == "hybrid" else "--"
        a.plot([r["cache_rate"] for r in sel], [r["tokens_per_s"] for r in sel], style, marker="o", label=name)
        b.plot([r["cache_rate"] for r in sel], [r["hit_rate"] for r in sel], style, marker="o", label=name)
        c.plot([r["cache_rate"] for r in sel], [r["stall_s"] for r in sel], style, marker="o", label=name)
    a.set(xlabel="cache rate", ylabel="decode tokens/s", title="decode speed vs cache size")
    b.set(xlabel="cache rate", ylabel="hit rate", title="decode hit rate vs cache size")
    c.set(xlabel="cache rate", ylabel="waiting for copies (s)", title=f"decode stall vs cache size\n{link_desc}")
    fig.legend(*a.get_legend_handles_labels(), loc="lower center", ncol=5, fontsize=8)
    fig.subplots_adjust(bottom=0.3)
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
