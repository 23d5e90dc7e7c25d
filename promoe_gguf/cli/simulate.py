"""`promoe simulate`: predicted decode/prefill tok/s of our runtime or stock llama.cpp on a hardware
profile, replaying a routing trace or synthetic routing through the real cache and placement logic."""
from __future__ import annotations

import json

from ..bench.real_shapes import SHAPES, recorded_mixes
from ..runtime.placement import CPU_EXPERTS
from ..errors import ModelError, ParameterError
from ..sim.profile import PROFILES
from .flags import ranged, setting, size


def add_parsers(sub) -> None:
    s = sub.add_parser("simulate", help="predict tok/s on a hardware profile (our runtime or llama.cpp), simulated")
    src = s.add_argument_group("inputs")
    src.add_argument("--trace", default=None, help="a routing trace (promoe trace); its model is --shape "
                                                    "(default: the embedded model)")
    mixes = ", ".join(f"{n}:{f.lower()}" for n, fs in recorded_mixes().items() for f in fs)
    src.add_argument("--shape", default=None, help=" | ".join(SHAPES) + " (Q4_K_M; ':f16' for F16; " + mixes
                     + " for the recorded mixes of llama.cpp's quantizer) or a GGUF / cache dir")
    src.add_argument("--profile", required=True, help=" | ".join(PROFILES) + " | a JSON file "
                                                       "| 'gpu_gbs=448,gpu_mem_gb=8,h2d_gbs=12,cpu_gbs=102,cpu_threads=10'")
    src.add_argument("--layer-cost", default=None, metavar="US|PROFILE.json",
                     help="our fixed decode cost per layer: microseconds, or the ours_layer_us of a profile file "
                          "written by `promoe bench` (profile.json) or scripts/gpu_e2e.py")
    src.add_argument("--prompt", type=ranged(1), default=512, help="synthetic routing: prompt tokens (prefill)")
    src.add_argument("--decode", type=ranged(1), default=128, help="synthetic routing: decoded tokens")
    src.add_argument("--sequences", type=ranged(1, 10_000), default=1, help="synthetic routing: independent sequences")
    src.add_argument("--warm", action="store_true",
                     help="our cache carries over between sequences (a server); an extra first sequence warms it")
    src.add_argument("--routing", default=None,
                     help="synthetic routing statistics over the shape's preset, e.g. 'reuse=0.2,skew=0.8,locality=0.3'")
    src.add_argument("--seed", type=setting("seed"), default=0, help="synthetic routing's seed")
    e = s.add_argument_group("engine")
    e.add_argument("--engine", default="promoe", choices=("promoe", "llamacpp", "freetoken"),
                   help="promoe: our runtime; llamacpp: stock llama.cpp's offload modes; freetoken: a FreeToken-like "
                        "design (LRU per layout, link/CPU split of misses, double-buffered prefill)")
    e.add_argument("--policy", default=None, choices=("lru", "static", "promoe"), help="ours: cache policy (default lru)")
    e.add_argument("--predictor", default=None, choices=("none", "gate", "oracle"),
                   help="ours: expert predictor (default none; oracle = the true future from the routing)")
    e.add_argument("--cpu-experts", default=None, choices=CPU_EXPERTS,
                   help="ours: misses on the CPU, one split by rows where that finishes sooner (default auto; "
                        "whole: never split)")
    e.add_argument("--cache-rate", type=setting("cache_rate"), default=None,
                   help="ours: fraction of routed experts the cache holds, in (0, 1]")
    e.add_argument("--gpu-mem", type=size, default=None, help="device memory for everything (e.g. 10G); default: fit the profile")
    e.add_argument("--lookahead", type=ranged(1, 16), default=None, help="ours: layers ahead a predictor scores (default 1)")
    e.add_argument("--n-batch", type=setting("n_batch"), default=None,
                   help="ours: prefill chunk in tokens (default: the Engine's for the device budget, "
                        "memory.default_n_batch)")
    e.add_argument("--ngl", default=None, help="llama.cpp: layers on the GPU (the last N), or 'auto' (most that fit)")
    e.add_argument("--n-cpu-moe", default=None,
                   help="llama.cpp: experts of the first N layers on the CPU, or 'auto' (fewest that fit)")
    e.add_argument("--moe-cache-mib", default=None, metavar="MIB|auto",
                   help="llama.cpp: its expert cache over the layers --n-cpu-moe leaves in host memory, in MiB, or "
                        "'auto' (all the device memory left)")
    e.add_argument("--n-ubatch", type=ranged(1), default=None,
                   help="llama.cpp, freetoken: prefill micro-batch (default 512)")
    e.add_argument("--n-ctx", type=setting("n_ctx"), default=4096, help="KV cache length (memory)")
    o = s.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="one JSON object (decode_tok_s, prefill_tok_s, ...)")
    o.add_argument("--sweep", default=None, metavar="PNG",
                   help="also sweep the cache budget (lru, promoe+gate, hybrid; llama.cpp --n-cpu-moe 0..L) and "
                        "plot tok/s vs device memory to PNG (rows beside it as .json)")
    o.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=run)


def _mib(value):
    if value is None or value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ParameterError("--moe-cache-mib", f"{value!r}: a whole number of MiB >= 1, or auto")
    return n


def run(args) -> int:
    from ..sim import load_inputs, simulate, sweep
    from ..sim.report import format_result, plot_sweep
    if args.trace is None and args.shape is None:
        raise ModelError("give --shape NAME|MODEL.gguf (synthetic routing) or --trace TRACE")
    ours = {"--policy": args.policy, "--predictor": args.predictor, "--cpu-experts": args.cpu_experts,
            "--cache-rate": args.cache_rate, "--lookahead": args.lookahead, "--n-batch": args.n_batch}
    theirs = {"--ngl": args.ngl, "--n-cpu-moe": args.n_cpu_moe, "--moe-cache-mib": args.moe_cache_mib,
              "--n-ubatch": args.n_ubatch}
    n_batch, n_ubatch = args.n_batch, args.n_ubatch or 512
    applies = {"promoe": ours, "llamacpp": theirs, "freetoken": {"--n-ubatch": args.n_ubatch}}[args.engine]
    unused = [f for f, v in {**ours, **theirs}.items() if v is not None and f not in applies
              and not (args.sweep and f in ("--n-batch", "--n-ubatch"))]      # a sweep runs both engines
    if unused:
        raise ModelError(f"{unused[0]} does not apply to --engine {args.engine}")
    profile = args.profile
    if args.layer_cost is not None:
        from ..sim.profile import layer_cost, parse_profile
        profile = parse_profile(profile).with_(ours_layer_us=layer_cost(args.layer_cost))
    inp = load_inputs(args.shape, args.trace, profile, args.prompt, args.decode,
                      args.sequences + (1 if args.warm and args.trace is None else 0), args.routing, args.seed)
    r = simulate(engine=args.engine, policy=args.policy or "lru", predictor=args.predictor or "none",
                 cpu_experts=args.cpu_experts or "auto", cache_rate=args.cache_rate, gpu_mem=args.gpu_mem, ngl=args.ngl,
                 n_cpu_moe=args.n_cpu_moe, moe_cache_mib=_mib(args.moe_cache_mib), n_ctx=args.n_ctx, n_batch=n_batch, n_ubatch=n_ubatch,
                 lookahead=args.lookahead or 1, inputs=inp, progress=not args.quiet and not args.json, warm=args.warm)
    if args.sweep:
        configs = [dict(policy="lru", predictor="none", cpu_experts="off"),
                   dict(policy="promoe", predictor="gate", cpu_experts="off"),
                   dict(policy="promoe", predictor="gate", cpu_experts="auto")]
        rows = sweep(inp, configs, n_ctx=args.n_ctx, n_batch=n_batch, n_ubatch=n_ubatch,
                     progress=not args.quiet)
        plot_sweep(rows, args.sweep, f"{inp.model.name} on {inp.profile.name}")
        with open(args.sweep.rsplit(".", 1)[0] + ".json", "w") as f:
            json.dump(rows, f, indent=1, default=str)
        r["sweep"] = args.sweep
    print(json.dumps(r, indent=1, default=str) if args.json else format_result(r))
    return 0
