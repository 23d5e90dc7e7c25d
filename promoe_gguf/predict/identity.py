"""Model identity: what a trace or a trained predictor belongs to.

A predictor learned on one model's routing is meaningless for another, so traces and predictor files
record `model_identity(model)` and refuse to be used with a model whose identity differs. The router
hash covers the raw bytes of every MoE layer's router (`blk.L.ffn_gate_inp.weight`), so two files with
the same shapes but different weights (another checkpoint, another quantization of the routers) differ.
"""
from __future__ import annotations

import hashlib

from ..errors import ModelError

IDENTITY_KEYS = ("arch", "n_layers", "n_embd", "n_experts", "n_experts_used", "moe_layers", "router_sha256")


def model_identity(model) -> dict:
    cfg = model.config
    h = hashlib.sha256()
    for layer in cfg.moe_layers:
        name = f"blk.{layer}.ffn_gate_inp.weight"
        h.update(name.encode())
        h.update(memoryview(model.tensor_raw(name)).cast("B"))
    return {"arch": cfg.arch, "n_layers": int(cfg.n_layers), "n_embd": int(cfg.n_embd),
            "n_experts": int(cfg.n_experts), "n_experts_used": int(cfg.n_experts_used),
            "moe_layers": [int(x) for x in cfg.moe_layers], "router_sha256": h.hexdigest()}


def check_identity(recorded: dict, model, what: str) -> None:
    """Raise ModelError naming every field where `recorded` differs from `model`'s identity."""
    actual = model_identity(model)
    diffs = []
    for k in IDENTITY_KEYS:
        a, b = recorded.get(k), actual[k]
        if a != b:
            if k == "router_sha256":
                diffs.append(f"router weights hash {str(a)[:12]}.. != {str(b)[:12]}..")
            else:
                diffs.append(f"{k} {a!r} != {b!r}")
    if diffs:
        path = getattr(model, "path", "the model")
        raise ModelError(f"{what} was made for another model than {path}: " + "; ".join(diffs))
