"""Expert predictors. `make_predictor(spec, model)` turns a --predictor value into one."""
from __future__ import annotations

from ..errors import ParameterError, clip
from .base import Predictor


def make_predictor(spec, model, lookahead: int = 1, routes=None) -> Predictor | None:
    """spec: none | gate | oracle | mlp:PATH | history[:TRACE] | freq[:TRACE] (an already-built
    Predictor passes through). history/freq learn online, or start from a trace's training prompts."""
    if spec is None or isinstance(spec, Predictor):
        return spec
    kind, _, arg = str(spec).partition(":")
    if kind == "none":
        return None
    if kind == "gate":
        from .gate import GatePredictor
        return GatePredictor(model, lookahead)
    if kind == "oracle":
        from .oracle import OraclePredictor
        if routes is None:
            raise ParameterError("predictor", "'oracle' needs a recorded routing trace (routes=...)")
        return OraclePredictor(model, routes, lookahead)
    if kind == "mlp":
        from .mlp import load_mlp_predictor
        if not arg:
            raise ParameterError("predictor", "'mlp' needs a file: mlp:PATH (made by `promoe train-predictor`)")
        return load_mlp_predictor(arg, model, lookahead)
    if kind in ("history", "freq"):
        from .history import FreqPredictor, HistoryPredictor, trace_counts
        counts = eams = None
        if arg:
            from .trace import Trace
            tr = Trace(arg)
            tr.check_model(model)
            counts, eams = trace_counts(tr, "train")
        if kind == "freq":
            return FreqPredictor(model, lookahead, counts)
        return HistoryPredictor(model, lookahead, eams)
    raise ParameterError("predictor", f"{clip(spec)} is not one of none, gate, oracle, mlp:PATH, history[:TRACE], "
                                      "freq[:TRACE]")
