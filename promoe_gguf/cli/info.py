"""`promoe info MODEL [--json]`: what is in a MoE model and what GPU memory a cache needs."""
from __future__ import annotations

import json
import math
from collections import Counter

from ..format import open_model

CACHE_RATES = (0.25, 0.5, 0.75, 1.0)


def model_info(model) -> dict:
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
        # resident weights + cache slots (one slot = the largest expert); KV cache not included
        "gpu_bytes_for_cache_rate": {
            str(r): resident + max(math.ceil(r * n_routed), cfg.n_experts_used) * slot for r in CACHE_RATES},
    }


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def format_info(info: dict) -> str:
    lines = [
        f"model        {info['path']}",
        f"arch         {info['arch']}: {info['n_layers']} layers ({info['moe_layers']} MoE), d={info['n_embd']}, "
        f"vocab {info['n_vocab']}, context {info['n_ctx_train']}",
        f"experts      {info['n_experts']} per layer, top-{info['n_experts_used']}, FF width {info['n_ff_exp']}"
        + (f", shared expert FF {info['n_ff_shexp']}" if info["n_ff_shexp"] else ""),
    ]
    for m, types in info["quant_types"].items():
        lines.append(f"  {m:<5}      " + ", ".join(f"{t} x{n}" for t, n in sorted(types.items())))
    eb = info["expert_bytes"]
    size = _mib(eb["max"]) if eb["min"] == eb["max"] else f"{_mib(eb['min'])} .. {_mib(eb['max'])}"
    lines += [
        f"expert size  {size}",
        f"experts      {info['routed_experts']} routed, {_mib(info['expert_bytes_total'])} in all",
        f"resident     {_mib(info['resident_bytes_total'])} (attention, embeddings, norms, routers, shared/dense FFN)",
        "GPU memory for cache rate (resident + expert slots, KV cache extra):",
    ]
    for r, n in info["gpu_bytes_for_cache_rate"].items():
        lines.append(f"  {float(r):>4.2f}      {_mib(n)}")
    return "\n".join(lines)


def run(args) -> int:
    model = open_model(args.model)
    info = model_info(model)
    print(json.dumps(info, indent=1) if args.json else format_info(info))
    return 0
