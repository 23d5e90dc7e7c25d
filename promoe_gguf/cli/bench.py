"""`promoe bench MODEL [--vs-llamacpp]`: prefill and decode speed per cache mode and budget, side by side.

For each mode (all resident; lru and promoe copying every miss; hybrid: promoe with CPU experts, one
miss per layer split by rows where that finishes sooner; hybrid-whole: the same, every miss whole; or
any POLICY/PREDICTOR/CPU_EXPERTS triple, e.g. promoe/mlp:FILE/auto) at
each cache rate or --gpu-mem budget: time to first token and prefill tok/s for each prompt length,
decode tok/s, hit rate, the share of decode spent waiting (copies, CPU pool), where experts ran, and
the gap to the bound per decode token,
    max(bytes read on the device / device GB/s, missed bytes / (link GB/s + CPU GB/s)),
each rate measured on this machine (the cost model's probes). On a CPU-only machine the device is
the CPU and the link is emulated (`--link`, default ratio=10): the rows say so. With --vs-llamacpp the
same GGUF runs through stock llama.cpp with the same threads: all on the CPU (and, given CUDA,
its offload modes, -ngl N and --n-cpu-moe N fitted to the same device memory); "vs llama.cpp" divides
a row's decode speed by llama.cpp's fastest mode that needs no more device memory (on the CPU machine:
its all-CPU row). Writes OUT/bench.json, bench.md, bench.png and profile.json (this machine's measured rates as a
`promoe simulate --profile` file).

Every row also reports what a decode token costs the host, counted on the code path it ran: device
graph replays, kernel launches made outside replays, host waits, and the host's time per layer
(wall time minus device work). `--device cuda-emulated` runs the CUDA backend's code path on the CPU
(the kernels' host build, graphs recorded and replayed in emulation): its counts are those a GPU
sees and its host time is the Python that paces a GPU; its speeds are not a GPU's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from ..errors import ModelError, clip
from ..util import cannot_write
from .flags import ranged, setting, size

MODES = {            # name -> Engine options (with a cache)
    "lru": dict(policy="lru", predictor="none", cpu_experts="off"),
    "promoe": dict(policy="promoe", predictor="gate", cpu_experts="off"),
    "hybrid": dict(policy="promoe", predictor="gate", cpu_experts="auto"),
    "hybrid-whole": dict(policy="promoe", predictor="gate", cpu_experts="whole"),   # hybrid without row splits
}


GRAPH_KERNEL_US = 69.0 / 25       # llama.cpp CUDA decode: ~25 kernels per layer in a graph cost 69 us (MODEL.md)


def _engine_device(device: str) -> dict:
    """Engine options for --device: cuda-emulated is the CUDA backend on the kernels' CPU build."""
    if device == "cuda-emulated":
        from ..kernels.emulator import Emu, build_emulator
        return {"device": "cpu", "launcher": Emu(build_emulator()).launcher}
    return {"device": device}


def _run_one(path, prompts, n_decode, threads, device, link, **kw) -> dict:
    from ..engine import Engine
    from ..bench.phases import run_phases
    n_ctx = max(len(p) for p in prompts) + n_decode + 8
    cached = kw.get("cache_rate") or kw.get("gpu_mem")
    on = _engine_device(device)
    eng = Engine(path, n_threads=threads, n_ctx=n_ctx, n_batch=min(512, n_ctx),
                 link=link if cached and on["device"] == "cpu" else None, **on, **kw)
    try:
        list(eng.generate(prompts[0][:8], max_tokens=2, temperature=0, ignore_eos=True))           # warm-up
        out = {"prefill": []}
        for p in prompts:
            before = eng.stats
            t0 = time.perf_counter()
            gen = eng.generate(p, max_tokens=1, temperature=0, ignore_eos=True)
            next(gen)
            ttft = time.perf_counter() - t0
            out["prefill"].append({"tokens": len(p), "ttft_s": ttft, "tok_s": len(p) / ttft,
                                   "stall_s": eng.stats["stall_s"] - before["stall_s"]})
        counts = []                                # decode measured once warmed up (graphs recorded)
        run = run_phases(eng, prompts[-1][:16], n_decode + 3, split_after=3,
                         at_split=lambda: counts.append(eng.decoding.counts.copy()))
        st, dec = run.last, run.decode
        d = {k: dec[k] for k in ("hits", "misses", "bytes_h2d", "stall_s", "cpu_experts", "split_experts", "copies")
             if k in dec}
        out["decode"] = {"tokens": n_decode, "tok_s": n_decode / dec["wall_s"], **d,
                         "wait_copy_share": st.get("decode_wait_copy_share", 0.0),
                         "wait_cpu_share": st.get("decode_wait_cpu_share", 0.0)}
        kernels = eng.decoding.kernels_per_token
        L = eng.config.n_layers
        dispatch = eng.decoding.counts.since(counts[0], L)
        # host work: the host's time less its waits for copies and CPU experts (reported as stall shares)
        waits = sum(dec.get(k, 0.0) for k in ("stall_s", "wait_cpu_s"))
        dispatch["host_work_us_per_layer"] = max(0.0, dispatch["host_us_per_layer"] - waits / n_decode / L * 1e6)
        dispatch["kernels_per_layer"] = None if kernels is None else kernels / L
        out["dispatch"] = dispatch
        out["memory"] = eng.memory
        out["cost_model"] = st.get("cost_model")
        out["link"] = st.get("link", "none (all resident)")
        out["link_GBps"] = st.get("link_bandwidth", 0.0) / 1e9
        out["expert_bytes"] = float(np.mean([eng.model.expert_nbytes(*k) for k in eng.model.expert_keys]))
        out["resident_bytes"] = eng.memory["resident"]
        out["moe_layers"] = len(eng.config.moe_layers)
        out["n_layers"] = eng.config.n_layers
        if device == "cuda":
            import torch
            out["device_total_bytes"] = torch.cuda.get_device_properties(0).total_memory
        out["k"] = eng.config.n_experts_used
        return out
    finally:
        eng.close()


def _bound(r: dict, device_gbs: float, cpu_gbs: float, link_gbs: float) -> float:
    """Seconds per decode token the hardware allows: the device reads every used expert and the
    residents; a miss moves its bytes over the link or through the CPU, whichever pair is faster."""
    dec = r["decode"]
    used = r["k"] * r["moe_layers"] * r["expert_bytes"]
    device = (r["resident_bytes"] + used) / (device_gbs * 1e9)
    lookups = dec.get("hits", 0) + dec.get("misses", 0)
    missed = (dec.get("misses", 0) / lookups if lookups else 0.0) * used
    if not missed or link_gbs + cpu_gbs <= 0:      # no miss, or no rate known to move one
        return device
    return max(device, missed / ((link_gbs + cpu_gbs) * 1e9))


def _mode(text: str) -> dict:
    """A --modes entry: a name in MODES, or POLICY/PREDICTOR/CPU_EXPERTS (the predictor may hold a path)."""
    from ..runtime.placement import CPU_EXPERTS
    if text in MODES:
        return MODES[text]
    parts = text.split("/")
    policy, cpu = parts[0], parts[-1]
    if len(parts) < 3 or policy not in ("lru", "static", "promoe") or cpu not in CPU_EXPERTS:
        raise ModelError(f"--modes: {text!r} is neither {', '.join(MODES)} nor POLICY/PREDICTOR/CPU_EXPERTS "
                         f"(policy lru|static|promoe, cpu experts {'|'.join(CPU_EXPERTS)}; e.g. promoe/gate/auto)")
    return dict(policy=policy, predictor="/".join(parts[1:-1]), cpu_experts=cpu)


def _llamacpp_rows(path, prompts, n_decode, threads, device, budgets) -> list[dict]:
    """Stock llama.cpp on the same GGUF with the same threads. With its llama-bench built
    (scripts/build_llamacpp.sh; $PROMOE_LLAMACPP_BIN): all on the CPU, and on a GPU its offload modes
    fitted to each device budget (bytes). Without llama-bench, on the CPU: the all-CPU row through
    llama-cpp-python's bindings to the same llama.cpp."""
    from ..bench import llamacpp as lc
    try:
        bin_dir = lc.find_bin_dir()
    except lc.LlamaCppNotBuilt as e:
        if device == "cuda":
            raise ModelError(f"--vs-llamacpp on a GPU needs llama.cpp's llama-bench for its offload modes: {e}") from None
        print(f"promoe bench: {e}\n  llama.cpp's all-CPU row comes from llama-cpp-python instead", file=sys.stderr)
        return _llamacpp_python_rows(path, prompts, n_decode, threads)
    names = {"cpu": "llama.cpp (all on the CPU)"}
    rows, seen = [], set()
    for budget in budgets:
        for r in lc.bench_modes(path, budget, n_prompt=[len(p) for p in prompts], n_gen=n_decode, threads=threads,
                                reps=2, bin_dir=bin_dir, gpu=None if device == "cuda" else False):
            if (r.mode, r.n_gpu_layers, r.n_cpu_moe) in seen:
                continue
            seen.add((r.mode, r.n_gpu_layers, r.n_cpu_moe))
            mode = names.get(r.mode) or (f"llama.cpp -ngl {r.n_gpu_layers}" if r.mode == "ngl"
                                         else f"llama.cpp -ngl {r.n_gpu_layers} --n-cpu-moe {r.n_cpu_moe}")
            rows.append({"mode": mode, "budget": "-" if r.mode == "cpu" else f"gpu_mem={budget / 2**30:.2f}G",
                         "source": f"llama-bench ({r.backends}, {r.n_threads} threads)",
                         "device_bytes": r.device_bytes_est or 0,
                         "prefill": [{"tokens": n, "ttft_s": n / ts, "tok_s": ts}
                                     for n, ts in sorted(r.prefill_by_length.items())],
                         "decode": {"tokens": n_decode, "tok_s": r.decode_tok_s}})
    return rows


def _llamacpp_python_rows(path, prompts, n_decode, threads) -> list[dict]:
    """Stock llama.cpp through llama-cpp-python on the CPU (n_gpu_layers=0), same threads."""
    import llama_cpp
    from ..util import quiet_stderr
    n_ctx = max(len(p) for p in prompts) + n_decode + 8
    with quiet_stderr():
        llm = llama_cpp.Llama(path, n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                              n_threads_batch=threads, n_gpu_layers=0, verbose=False)
    prefill = []
    with quiet_stderr():
        llm.eval(prompts[0][:8])
        for p in prompts:
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(p)
            dt = time.perf_counter() - t0
            prefill.append({"tokens": len(p), "ttft_s": dt, "tok_s": len(p) / dt})
        llm.reset()
        llm.eval(prompts[-1][:16])
        t0 = time.perf_counter()
        for _ in range(n_decode):
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
            llm.eval([int(np.argmax(logits))])
        dt = time.perf_counter() - t0
    return [{"mode": "llama.cpp (all on the CPU)", "budget": "-", "source": "llama-cpp-python", "device_bytes": 0,
             "prefill": prefill,
             "decode": {"tokens": n_decode, "tok_s": n_decode / dt}}]


def run(args) -> int:
    from tqdm import tqdm
    from ..format import open_model
    path = args.model
    if args.rates is not None and args.gpu_mem is not None:
        raise ModelError("--rates and --gpu-mem both choose the cache budgets: give one of them")
    if args.link is not None and args.device == "cuda":
        raise ModelError("--link emulates the link on the CPU; with --device cuda the real one is measured")
    args.rates = args.rates or [0.25, 0.5, 0.75]
    args.link = args.link or "ratio=10"
    out_dir = _make_out_dir(args.out)             # before the work: a folder we cannot create fails at once
    model = open_model(path)
    n_ctx_max = min(model.config.n_ctx_train or 4096, 4096)
    lengths = [n for n in (32, 256, 1024) if n + args.tokens + 8 <= n_ctx_max] or [min(32, n_ctx_max // 2)]
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, min(model.config.n_vocab, 256), n).tolist() for n in lengths]
    modes = {m: _mode(m) for m in args.modes.split(",")}
    budgets = [("gpu_mem", args.gpu_mem)] if args.gpu_mem else [("cache_rate", r) for r in args.rates]
    jobs = [("all resident", "-", {})] + [(m, f"{k}={v}", {k: v, **modes[m]}) for k, v in budgets for m in modes]
    rows = []
    for mode, budget, kw in tqdm(jobs, desc="bench", unit="config"):
        r = _run_one(path, prompts, args.tokens, args.threads, args.device, args.link, **kw)
        rows.append({"mode": mode, "budget": budget, **r})
    ref = rows[0]
    cm = next((r["cost_model"] for r in rows if r.get("cost_model")), None)
    cpu_gbs = max(cm["cpu_GBps_1tok"].values()) if cm else None
    link_gbs = (cm["link_GBps"] if cm and cm["link_GBps"] else
                max((r.get("link_GBps") or 0.0 for r in rows), default=0.0) or None)   # no cost model: the emulated link
    # the device's rate: the all-resident decode's bytes per second (on the CPU: the same ggml)
    used = ref["k"] * ref["moe_layers"] * ref["expert_bytes"] + ref["resident_bytes"]
    device_gbs = used * ref["decode"]["tok_s"] / 1e9
    for r in rows:
        r["bound_s_per_token"] = _bound(r, device_gbs, cpu_gbs or 0.0, link_gbs or 0.0)
        r["gap_to_bound"] = (1 / r["decode"]["tok_s"]) / r["bound_s_per_token"]
    if args.vs_llamacpp:       # the same device memory: the budget given, else what each cached row used
        budgets = ([args.gpu_mem] if args.gpu_mem else
                   sorted({r["memory"]["total"] for r in rows if r["budget"] != "-"}) or [None])
        rows += _llamacpp_rows(path, prompts, args.tokens, args.threads, "cuda" if args.device == "cuda" else "cpu",
                               budgets)
    moe_cache = None
    if args.vs_llamacpp:
        from ..bench.llamacpp import moe_cache_support
        ok, why = moe_cache_support()
        moe_cache = {"measured": False, "available": ok, "why": why}
    res = {"llamacpp_moe_cache": moe_cache, "model": os.path.basename(path), "device": args.device, "threads": args.threads, "link": args.link,
           "emulated": args.device != "cuda", "prompt_lengths": lengths, "decode_tokens": args.tokens,
           "rates_GBps": {"device": device_gbs, "cpu": cpu_gbs, "link": link_gbs},
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}
    with open(os.path.join(out_dir, "bench.json"), "w") as f:
        json.dump(res, f, indent=1, default=float)
    with open(os.path.join(out_dir, "profile.json"), "w") as f:
        json.dump(_measured_profile(res, ref, cm).to_json(), f, indent=1)
    md = _markdown(res)
    with open(os.path.join(out_dir, "bench.md"), "w") as f:
        f.write(md)
    _plot(res, os.path.join(out_dir, "bench.png"))
    print(md)
    print(f"wrote {out_dir}/: bench.json, bench.md, bench.png, profile.json (for promoe simulate --profile)",
          file=sys.stderr)
    return 0


def _make_out_dir(path: str) -> str:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise cannot_write(e, f"--out {path}") from None
    if not os.access(path, os.W_OK):
        raise ModelError(f"--out {path}: the folder is not writable")
    return os.path.abspath(path)


def _rates(text: str) -> list[float]:
    """--rates: comma-separated cache rates, each in (0, 1]."""
    out = []
    for part in text.split(","):
        try:
            out.append(setting("cache_rate")(part.strip()))
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"must be comma-separated cache rates, each in (0, 1], got "
                                             f"{clip(part.strip())} in {clip(text)}") from None
    return out


def _measured_profile(res: dict, ref: dict, cm: dict | None):
    """This machine as a `promoe simulate --profile` file, from the rates this run measured: the device's
    matvec rate (the cost model's device probe, else the all-resident decode), the CPU pool's, the
    link's, and our fixed cost per layer (the all-resident decode step minus its bytes at that rate)."""
    from ..sim.profile import GiB, Profile
    rate = res["rates_GBps"]
    device_gbs = rate["device"]
    if cm and cm.get("device_ms_per_expert"):
        ms = np.mean([v[0] for v in cm["device_ms_per_expert"].values()])
        device_gbs = ref["expert_bytes"] / (ms * 1e-3) / 1e9
    used = ref["k"] * ref["moe_layers"] * ref["expert_bytes"] + ref["resident_bytes"]
    layer_s = (1 / ref["decode"]["tok_s"] - used / (device_gbs * 1e9)) / ref["n_layers"]
    extra = {}
    if res["device"] == "cuda-emulated":
        # speeds here are the emulation's: our fixed cost per layer on a GPU is the host work measured
        # here plus the recorded kernels at llama.cpp's calibrated cost per graph kernel; the simulator
        # takes one cost for every mode, so the dearest mode's (a cache's hand-offs cost host work)
        costs = {f"{r['mode']} {r['budget']}": r["dispatch"]["host_cpu_us_per_layer"]
                 + r["dispatch"]["kernels_per_layer"] * GRAPH_KERNEL_US
                 for r in res["rows"] if (r.get("dispatch") or {}).get("kernels_per_layer")}
        if costs:
            layer_s = max(costs.values()) * 1e-6
            extra = {"layer_us_by_mode": {k: round(v, 1) for k, v in costs.items()}}
    threads = res["threads"]
    cpu_gbs = rate["cpu"] or device_gbs
    return Profile(
        name=f"measured-{res['device']}", gpu_gbs=device_gbs, gpu_eff=1.0,
        gpu_mem_gb=ref.get("device_total_bytes", 0) / GiB, h2d_gbs=rate["link"] or 0.0,
        cpu_gbs=cpu_gbs, cpu_eff=1.0, cpu_threads=threads, cpu_thread_gbs=cpu_gbs / threads,
        ours_layer_us=max(0.0, layer_s * 1e6), emulated=res["emulated"],
        source=f"promoe bench {res['model']} {res['date']}: device matvec, CPU pool and link rates and our per-layer "
               "decode cost as measured" + (" (the device is this CPU, the link emulated)" if res["emulated"] else "")
               + ("; per-layer cost: host work measured on the CUDA code path in emulation + its recorded kernels "
                  f"x {GRAPH_KERNEL_US:.2f} us, the dearest mode's" if res["device"] == "cuda-emulated" else ""),
        extra=extra)


def _markdown(res: dict) -> str:
    rate = res["rates_GBps"]
    where = (f"CPU machine: the device is the CPU and the link is emulated (--link {res['link']})"
             if res["device"] == "cpu" else
             f"the CUDA code path on this CPU (kernels' host build, graphs emulated; --link {res['link']}): dispatch "
             "counts and host time are a GPU's, speeds are not" if res["device"] == "cuda-emulated"
             else f"device {res['device']}")
    head = [f"# promoe bench {res['model']} ({res['date']})", "",
            f"{where}; {res['threads']} thread(s); decode {res['decode_tokens']} tokens; measured rates: device "
            f"{rate['device']:.2f} GB/s (all-resident decode), CPU {rate['cpu'] or 0:.2f} GB/s (ggml probe), link "
            f"{rate['link'] or 0:.4g} GB/s.", ""]
    lens = res["prompt_lengths"]
    cols = " | ".join(f"prefill {n} tok/s (TTFT s)" for n in lens)
    head += [f"| mode | budget | {cols} | decode tok/s | vs llama.cpp | hit rate | on CPU (+split) | copied | wait copies | "
             "wait CPU | gap to bound | decode: graphs replayed / launches outside / host waits per token | "
             "host us per layer: work (CPU) |", "|" + "---|" * (len(lens) + 12)]
    llama = [r for r in res["rows"] if r["mode"].startswith("llama.cpp")]
    for r in res["rows"]:
        dec = r["decode"]
        lookups = dec.get("hits", 0) + dec.get("misses", 0)
        pre = " | ".join(f"{p['tok_s']:.1f} ({p['ttft_s']:.2f})" for p in r["prefill"])
        # against llama.cpp's fastest mode that needs no more device memory than this row
        mem = r["memory"]["total"] if "memory" in r else r.get("device_bytes", 0)
        best = max((x["decode"]["tok_s"] for x in llama if x.get("device_bytes", 0) <= mem or res["emulated"]),
                   default=None)
        vs = f"{dec['tok_s'] / best:.2f}x" if best else "-"
        head.append(f"| {r['mode']} | {r['budget']} | {pre} | {dec['tok_s']:.1f} | {vs} | "
                    f"{(dec.get('hits', 0) / lookups) if lookups else 1.0:.2f} | {dec.get('cpu_experts', '-')}"
                    f"{' (+' + str(dec['split_experts']) + ')' if dec.get('split_experts') else ''} | "
                    f"{dec.get('copies', '-')} | {dec.get('wait_copy_share', 0):.0%} | {dec.get('wait_cpu_share', 0):.0%} | "
                    + (f"{r['gap_to_bound']:.1f}x |" if "gap_to_bound" in r else "- |") + _dispatch_cells(r))
    src = sorted({r["source"] for r in llama})
    if src:
        head += ["", f"llama.cpp rows: {', '.join(src)}; prefill from llama-bench is prompt processing alone "
                 "(TTFT = tokens / tok/s)." if any(x.startswith("llama-bench") for x in src) else
                 f"llama.cpp rows: {', '.join(src)}."]
    mc = res.get("llamacpp_moe_cache")
    if mc is not None:
        head.append(f"llama.cpp's expert cache (--moe-cache-mib) is not measured here ({mc['why']}); its rows are "
                    "simulated: `promoe simulate --engine llamacpp --n-cpu-moe N --moe-cache-mib M|auto`.")
    return "\n".join(head) + "\n"


def _dispatch_cells(r: dict) -> str:
    d = r.get("dispatch")
    if not d:
        return " - | - |"
    return (f" {d['mode']}: {d['replays_per_token']:.0f} / {d['launches_outside_replays_per_token']:.0f} / "
            f"{d['host_syncs_per_token']:.0f} | {d['host_work_us_per_layer']:.0f} ({d['host_cpu_us_per_layer']:.0f}) |")


def _plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = [r for r in res["rows"] if r["budget"] != "-" and not r["mode"].startswith("llama.cpp")]
    for mode in dict.fromkeys(r["mode"] for r in rows):
        sel = [r for r in rows if r["mode"] == mode]
        ax.plot([float(r["budget"].split("=")[1]) for r in sel], [r["decode"]["tok_s"] for r in sel], marker="o",
                label=mode)
    for r in res["rows"]:
        if r["budget"] == "-" or r["mode"].startswith("llama.cpp"):
            ax.axhline(r["decode"]["tok_s"], linestyle=":", color="gray" if r["mode"] == "all resident" else "black",
                       label=r["mode"])
    ax.set(xlabel="cache budget (" + (rows[0]["budget"].split("=")[0] if rows else "") + ")", ylabel="decode tokens/s",
           title=f"{res['model']}: decode speed vs cache budget" + (" (emulated link)" if res["emulated"] else ""))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def add_parsers(sub) -> None:
    s = sub.add_parser("bench", help="prefill/decode speed per cache mode and budget (and vs llama.cpp)")
    s.add_argument("model", help="GGUF file or cache directory")
    s.add_argument("--modes", default="lru,promoe,hybrid", help="comma-separated: lru, promoe, hybrid, hybrid-whole, or POLICY/PREDICTOR/CPU_EXPERTS "
                                                          "(e.g. static/none/off, promoe/mlp:FILE/auto)")
    s.add_argument("--rates", type=_rates, default=None, help="cache rates, each in (0, 1] (default 0.25,0.5,0.75)")
    s.add_argument("--gpu-mem", type=size, default=None, help="one device memory budget instead of --rates")
    s.add_argument("--tokens", type=ranged(1), default=128, help="decode tokens, >= 1")
    s.add_argument("--threads", type=setting("n_threads"), default=1, help="CPU threads")
    s.add_argument("--device", default="cpu", choices=("cpu", "cuda", "cuda-emulated"),
                   help="cuda-emulated: the CUDA code path on this CPU (counts and host time a GPU would see)")
    s.add_argument("--link", default=None,
                   help="CPU only: the emulated link, default ratio=10 (see promoe run --help)")
    s.add_argument("--vs-llamacpp", action="store_true",
                   help="add stock llama.cpp's rows, same GGUF, threads and device memory (llama-bench from "
                        "scripts/build_llamacpp.sh or $PROMOE_LLAMACPP_BIN; else llama-cpp-python, CPU only)")
    s.add_argument("--out", default="promoe-bench",
                   help="output directory (created): bench.json, bench.md, bench.png and profile.json")
    s.set_defaults(func=run)
