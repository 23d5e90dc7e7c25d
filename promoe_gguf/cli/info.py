"""`promoe info MODEL [--json]`: what is in a MoE model and what GPU memory a cache needs."""
from __future__ import annotations

import json
from collections import Counter

from ..errors import ModelError
from ..format import open_model
from ..memory import plan
from ..runtime.cache import slots_for_budget
from ..runtime.host_store import StoreLayout

CACHE_RATES = (0.25, 0.5, 0.75, 1.0)


def memory_plans(model, device: str = "cuda", n_ctx=None, n_batch: int | None = None) -> dict:
    """{budget name: memory breakdown} for every cache rate the Engine accepts, and all resident."""
    layout = StoreLayout.of(model)
    out = {}
    for r in CACHE_RATES:
        try:
            n = slots_for_budget(layout, model.config.n_experts_used, cache_rate=r)
        except ModelError:
            continue                      # a budget below one layer's working set: the Engine refuses it
        out[f"cache_rate={r}"] = {"slots": n, **plan(model, device, n_ctx, n_batch, n)}
    out["all_resident"] = plan(model, device, n_ctx, n_batch, None)
    return out


def model_info(model, device: str = "cuda", n_ctx=None) -> dict:
    cfg = model.config
    per_matrix: dict[str, Counter] = {m: Counter() for m in ("gate", "up", "down")}
    expert_bytes = Counter()
    for layer, expert in model.expert_keys:
        mats = model.expert_matrices(layer, expert)
        for m in mats:
            per_matrix[m.matrix][m.qtype.name] += 1
        expert_bytes[sum(m.nbytes for m in mats)] += 1
    n_routed = len(model.expert_keys)
    slot = max(expert_bytes)
    resident = model.resident_bytes_total()
    return {
        "path": model.path,
        "arch": cfg.arch,
        "n_layers": cfg.n_layers,
        "moe_layers": len(cfg.moe_layers),
        "nextn_layers": cfg.n_nextn_layers,
        "sliding_window": cfg.sliding_window,
        "swa_layers": [layer for layer in range(cfg.n_layers) if cfg.is_swa(layer)],
        "expert_biases": any(n.endswith("_exps.bias") for n in model.resident_names),
        "attention_sinks": any(n.endswith("attn_sinks.weight") for n in model.resident_names),
        "n_experts": cfg.n_experts,
        "n_experts_used": cfg.n_experts_used,
        "n_embd": cfg.n_embd,
        "n_ff_exp": cfg.n_ff_exp,
        "n_ff_shexp": cfg.n_ff_shexp,
        "n_vocab": cfg.n_vocab,
        "n_ctx_train": cfg.n_ctx_train,
        "quant_types": {m: dict(c) for m, c in per_matrix.items()},
        "expert_bytes": {"min": min(expert_bytes), "max": slot},
        "routed_experts": n_routed,
        "expert_bytes_total": model.expert_bytes_total(),
        "resident_bytes_total": resident,
        "device": device,
        "memory": memory_plans(model, device, n_ctx),
    }


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def format_info(info: dict) -> str:
    lines = [
        f"model        {info['path']}",
        f"arch         {info['arch']}: {info['n_layers']} layers ({info['moe_layers']} MoE), d={info['n_embd']}, "
        f"vocab {info['n_vocab']}, context {info['n_ctx_train']}"
        + (f"; {info['nextn_layers']} NextN block(s) in the file, not run" if info["nextn_layers"] else ""),
        *([f"attention    a {info['sliding_window']}-position sliding window on {len(info['swa_layers'])} of "
           f"{info['n_layers']} layers" + ("; a sink logit per head" if info["attention_sinks"] else "")]
          if info["sliding_window"] else []),
        f"experts      {info['n_experts']} per layer, top-{info['n_experts_used']}, FF width {info['n_ff_exp']}"
        + (f", shared expert FF {info['n_ff_shexp']}" if info["n_ff_shexp"] else "")
        + ("; biases on every expert matrix (resident, by expert id); clamped SwiGLU" if info["expert_biases"] else ""),
    ]
    for m, types in info["quant_types"].items():
        lines.append(f"  {m:<5}      " + ", ".join(f"{t} x{n}" for t, n in sorted(types.items())))
    eb = info["expert_bytes"]
    size = _mib(eb["max"]) if eb["min"] == eb["max"] else f"{_mib(eb['min'])} .. {_mib(eb['max'])}"
    lines += [
        f"expert size  {size}",
        f"experts      {info['routed_experts']} routed, {_mib(info['expert_bytes_total'])} in all",
        f"resident     {_mib(info['resident_bytes_total'])} (attention, embeddings, norms, routers, shared/dense FFN"
        + (", expert biases" if info["expert_biases"] else "") + ")",
        f"{info['device']} memory per expert budget (what Engine.memory reports for the same settings):",
        f"  {'budget':<18} {'slots':>5} {'resident':>12} {'kv_cache':>12} {'experts':>12} {'workspace':>12} "
        f"{'activations':>12} {'total':>12}",
    ]
    for name, m in info["memory"].items():
        lines.append(f"  {name:<18} {m.get('slots', '-'):>5} " + " ".join(
            f"{_mib(m[k]):>12}" for k in ("resident", "kv_cache", "expert_arena", "workspace", "activations", "total")))
    return "\n".join(lines)


def lru_hit_rate(trace, n_slots: int) -> float:
    """Hit rate of a per-layer LRU of n_slots // MoE layers slots each over a trace's decode rows, in
    order (an estimate: the runtime's promoe policy keeps valuable experts, so it does at least as well).
    The replay is the simulator's (sim/routing.lru_hit_rate)."""
    import numpy as np
    from ..sim.routing import lru_hit_rate as replay
    rows = [r for s in trace.seqs() for r in range(s["start"] + s["n_prompt"], s["start"] + s["n_prompt"] + s["n_decode"])]
    return replay(np.asarray(trace.ids[rows]), max(1, n_slots // trace.M))


def gpu_plan(model, gpu_mem: int, device: str, n_ctx, n_batch: int | None = None, trace=None) -> dict:
    """What lives where with `gpu_mem` bytes of device memory (Engine(gpu_mem=...) does the same)."""
    from ..memory import context, default_n_batch, fit_cache
    n_batch = int(n_batch or default_n_batch(model, device, context(model, n_ctx), gpu_mem))
    arena = fit_cache(model, device, n_ctx, n_batch, gpu_mem)
    layout = StoreLayout.of(model)
    if arena is None:
        out = {"gpu_mem": gpu_mem, "experts_on_device": len(layout.keys), "experts_total": len(layout.keys),
               "n_batch": n_batch, **plan(model, device, n_ctx, n_batch, None)}
        out["expected_hit_rate"] = 1.0
        return out
    slots = slots_for_budget(layout, model.config.n_experts_used, cache_mem=arena)
    out = {"gpu_mem": gpu_mem, "experts_on_device": slots, "experts_total": len(layout.keys),
           "n_batch": n_batch, **plan(model, device, n_ctx, n_batch, slots)}
    if trace is not None:
        out["expected_hit_rate"] = lru_hit_rate(trace, slots)
    return out


def run(args) -> int:
    from ..paths import DEFAULT_MODEL
    if getattr(args, "trace", None) and not getattr(args, "gpu_mem", None):
        raise ModelError("--trace gives the expected hit rate of a --gpu-mem plan: add --gpu-mem")
    model = open_model(args.model or DEFAULT_MODEL)
    info = model_info(model, getattr(args, "device", "cuda"), getattr(args, "n_ctx", None))
    if getattr(args, "gpu_mem", None):
        trace = None
        if args.trace:
            from ..predict.trace import Trace
            trace = Trace(args.trace)
            trace.check_model(model)
        p = info["gpu_plan"] = gpu_plan(model, args.gpu_mem, args.device, args.n_ctx, trace=trace)
        if not args.json:
            hit = p.get("expected_hit_rate")
            on, total = p["experts_on_device"], p["experts_total"]
            where = (f"all {total} experts resident on the device, none in host memory" if on == total else
                     f"{on} of {total} experts on the device ({on / total:.0%}), the other {total - on} in host "
                     "memory (computed on the CPU or copied, as the cost model decides)")
            print(format_info(info))
            print(f"with --gpu-mem {_mib(args.gpu_mem)}: resident {_mib(p['resident'])}, KV cache "
                  f"{_mib(p['kv_cache'])}, workspace {_mib(p['workspace'])}, prefill activations "
                  f"{_mib(p['activations'])} (--n-batch {p['n_batch']}), expert cache {_mib(p['expert_arena'])}: "
                  f"{where}; total {_mib(p['total'])}"
                  + (f"; expected decode hit rate {hit:.2f} (LRU replay of the trace)" if hit is not None and trace
                     else ""))
            return 0
    print(json.dumps(info, indent=1) if args.json else format_info(info))
    return 0
