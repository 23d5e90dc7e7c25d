"""A predictor file's record, checked before it is used: every field's type and range, every state
tensor's shape (from the spec), finite weights, and the spec against the model identity it records.
Each failure is one line naming the file and the field (torch's own errors are multi-line)."""
from __future__ import annotations

import math

import torch

from ..errors import ModelError
from .identity import IDENTITY_KEYS

# FeatureSpec field -> (type, lowest, highest)
SPEC_FIELDS = {
    "M": (int, 1, 4096), "E": (int, 1, 1 << 16), "k": (int, 1, 1 << 16), "d": (int, 1, 1 << 20),
    "window": (int, 1, 3), "ctx": (int, 1, 64), "target_x": (bool, 0, 1), "ema": (float, 0.0, 1.0),
    "rank": (int, 0, 1 << 16),
}
MAX_HIDDEN = 1 << 16


def _typed(v, kind) -> bool:
    if kind is bool:
        return isinstance(v, bool)
    if kind is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return isinstance(v, int) and not isinstance(v, bool)


def state_shapes(spec: dict, hidden: int) -> dict:
    """The shape of every state tensor a record of this spec holds (see PredictorNet)."""
    M, E, d, rank = spec["M"], spec["E"], spec["d"], spec["rank"]
    r = rank or d
    P = M * spec["window"]
    F = spec["ctx"] * r + E + 4 * E + (r if spec["target_x"] else 0)
    shapes = {"xmu": (M, d), "xsd": (M, d), "W1": (P, F, hidden), "b1": (P, 1, hidden),
              "W2": (P, hidden, E), "b2": (P, 1, E)}
    if rank:
        shapes["U"] = (M, d, rank)
    return shapes


def check_record(rec: dict, path) -> None:
    """Raise ModelError (one line, naming `path`) unless `rec` is a usable mlp predictor record."""
    def fail(what: str) -> ModelError:
        return ModelError(f"predictor file {path}: {what}")

    ident = rec.get("model")
    if not isinstance(ident, dict) or any(k not in ident for k in IDENTITY_KEYS):
        raise fail("the model identity ('model') is missing or incomplete")
    spec = rec.get("spec")
    if not isinstance(spec, dict) or set(spec) != set(SPEC_FIELDS):
        got = sorted(spec) if isinstance(spec, dict) else type(spec).__name__
        raise fail(f"spec fields {got} are not {sorted(SPEC_FIELDS)}")
    for name, (kind, lo, hi) in SPEC_FIELDS.items():
        v = spec[name]
        if not _typed(v, kind) or not lo <= v <= hi:
            raise fail(f"spec {name} = {v!r} is not a {kind.__name__} in [{lo}, {hi}]")
    hidden = rec.get("hidden")
    if not _typed(hidden, int) or not 1 <= hidden <= MAX_HIDDEN:
        raise fail(f"hidden = {hidden!r} is not an integer in [1, {MAX_HIDDEN}]")
    for name, want in (("M", len(ident["moe_layers"]) if isinstance(ident["moe_layers"], list) else None),
                       ("E", ident["n_experts"]), ("k", ident["n_experts_used"]), ("d", ident["n_embd"])):
        if spec[name] != want:
            raise fail(f"spec {name} = {spec[name]} disagrees with the recorded model ({want!r})")
    if spec["k"] > spec["E"] or spec["window"] > spec["M"]:
        raise fail(f"spec k = {spec['k']} / window = {spec['window']} exceed E = {spec['E']} / M = {spec['M']}")
    state = rec.get("state")
    if not isinstance(state, dict):
        raise fail("the weights ('state') are missing")
    for name, shape in state_shapes(spec, hidden).items():
        t = state.get(name)
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise fail(f"state {name!r} is missing or not a float tensor")
        if tuple(t.shape) != shape:
            raise fail(f"state {name!r} has shape {tuple(t.shape)}, the spec needs {shape}")
        if not bool(torch.isfinite(t).all()):
            raise fail(f"state {name!r} holds NaN or inf")
    if not bool((state["xsd"] > 0).all()):
        raise fail("state 'xsd' (standard deviations) holds values <= 0")
