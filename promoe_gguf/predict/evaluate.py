"""Predictor evaluation on a trace's held-out prompts: accuracy, recall, fetch rate, GOODPRED.

Replay. Every held-out sequence is fed token by token through the Predictor interface exactly as the
runtime drives it in decode: reset(); per token begin_step([pos]); per MoE layer a: predict(a, x)
then observe(a, x, chosen). x is the traced router input. A prediction made at MoE layer a for
target b = a + j (b >= M: MoE layer b - M of the next token) is at lookahead distance j.

Metrics, per predictor and distance j, micro-averaged over (token, source layer) instances whose
target exists (the last token of a sequence has no next token):
    P = the predicted set: top-`topk` scores (default k, the model's experts per token)
    R = the experts the router really chose at the target (k of them)
    accuracy  = sum |P & R| / sum |P|    over instances with a prediction (precision of the top-k)
    recall    = sum |P & R| / sum |R|    over all instances (a missing prediction recalls nothing)
    fetch_rate, from a timeline of the copy link (below); goodpred = accuracy x fetch_rate.

Fetch-rate model ("stride prefetching" at distance j, nothing cached, link used only for prefetch):
decode runs layer after layer, each taking c seconds (per-layer decode compute: measured from the
Engine, or given). The prediction for target b is issued at source layer a's router input plus the
predictor's own latency, and is due at target b's router, (layer_b - layer_a) x c later (+ n_layers x
c for the next token). Its experts join one FIFO copy queue in score order; an expert takes
tau = bytes / bandwidth (or, in ratio mode, tau = R x c). A queued copy whose deadline has passed
before it starts is dropped (ProMoE's early preemption); one that starts in time finishes at
start + tau and is fetchable iff it finishes by its deadline. fetch_rate = fetchable / predicted. coverage = (predicted, right and fetchable) / really used: the
share of the experts the forward pass needs that this predictor has in place in time (GOODPRED, as
defined, does not count what a predictor does not predict: gate reuse makes no next-token guesses).
The per-layer time c is the median time between decoded tokens of an all-resident Engine divided by
the number of layers (`--layer-time` overrides it); the predictor's latency is its own measured
time per call.

Cost: the predictor's time per decode step is the median over replayed tokens of the wall time of
begin_step + predict + observe over all MoE layers (one thread), reported beside the decode step.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelError, ParameterError
from ..runtime.link import parse_link as runtime_link

REQUIRED_KEYS = ("predictor", "lookahead", "accuracy", "recall", "fetch_rate", "goodpred")


# ---- metric definitions (hand-checkable) --------------------------------------------------------
def set_metrics(pred: np.ndarray, true: np.ndarray) -> dict:
    """pred [n, p] predicted expert ids (-1 = none; a row of all -1 = no prediction), true [n, k].
    Returns hits, n_pred, n_true, accuracy (hits / n_pred), recall (hits / n_true)."""
    pred, true = np.asarray(pred), np.asarray(true)
    if len(pred) == 0:
        return {"hits": 0, "n_pred": 0, "n_true": int(true.size), "accuracy": None, "recall": None}
    valid = pred >= 0
    hit = (pred[:, :, None] == true[:, None, :]).any(-1) & valid
    hits, n_pred, n_true = int(hit.sum()), int(valid.sum()), int(true.size)
    return {"hits": hits, "n_pred": n_pred, "n_true": n_true,
            "accuracy": hits / n_pred if n_pred else None, "recall": hits / n_true if n_true else None}


def parse_link(text) -> tuple[str, float]:
    """--link in the runtime's grammar (runtime.link.parse_link) as ("bw", bytes/s) or ("ratio", R)."""
    spec = runtime_link(text)
    if not spec:
        raise ParameterError("link", "is empty: give a bandwidth (e.g. 25GB/s) or ratio=R")
    return ("ratio", spec["ratio"]) if "ratio" in spec else ("bw", spec["bandwidth"])


def fetch_timeline(issue: np.ndarray, deadline: np.ndarray, tau: np.ndarray) -> np.ndarray:
    """FIFO copy link. Copies in queue order: issue time, deadline, duration (seconds). A copy starts
    at max(link free, issue) if it can finish by its deadline (then it is fetchable); one that cannot
    is skipped and leaves the link free (a prefetch that lands after its layer ran is useless; the
    runtime's precise request takes over). Returns a bool array: fetchable."""
    ok = np.zeros(len(issue), bool)
    free = -math.inf
    for i in range(len(issue)):
        end = max(free, issue[i]) + tau[i]
        if end <= deadline[i] + 1e-15:
            ok[i], free = True, end
    return ok


# ---- replay -------------------------------------------------------------------------------------
class Replay:
    """Per instance (row, source slot a, distance j): predicted ids [.., topk] (-1 = none)."""

    def __init__(self, n_rows, M, J, topk):
        self.pred = np.full((n_rows, M, J, topk), -1, np.int16)
        self.step_s: list[float] = []      # predictor time of each replayed token (all its layers)
        self.step_cpu: list[float] = []    # the same, thread CPU time


def replay(predictor, trace, seqs, lookahead: int, topk: int, max_rows: int | None = None,
           progress=None) -> tuple[Replay, np.ndarray]:
    """Feed `seqs` through `predictor`; returns (Replay, the trace rows replayed)."""
    M, n_layers = trace.M, trace.n_layers
    moe = trace.moe_layers
    slot = {layer: i for i, layer in enumerate(moe)}
    rows_all = []
    for s in seqs:
        n = s["n_prompt"] + s["n_decode"]
        rows_all.append(np.arange(s["start"], s["start"] + n))
    rows = np.concatenate(rows_all) if rows_all else np.zeros(0, np.int64)
    if max_rows is not None and len(rows) > max_rows:
        keep, total = [], 0                     # whole sequences, in order, up to max_rows
        for r in rows_all:
            if total >= max_rows:
                break
            keep.append(r[:max_rows - total])
            total += len(keep[-1])
        rows_all, rows = keep, np.concatenate(keep)
    rp = Replay(len(rows), M, lookahead, topk)
    if predictor is None:
        return rp, rows
    i = 0
    for seq_rows in rows_all:
        predictor.reset()
        predictor.set_sequence(trace, seq_rows)
        X = torch.from_numpy(np.asarray(trace.x[seq_rows[0]:seq_rows[-1] + 1]).astype(np.float32))
        IDS = torch.from_numpy(np.asarray(trace.ids[seq_rows[0]:seq_rows[-1] + 1]).astype(np.int64))
        POS = np.asarray(trace.pos[seq_rows[0]:seq_rows[-1] + 1])
        for r in range(len(seq_rows)):
            xs = [X[r, a][None] for a in range(M)]                       # inputs ready before timing
            chosen = [IDS[r, a][None] for a in range(M)]
            pos = [int(POS[r])]
            outs = []
            t0, c0 = time.perf_counter(), time.thread_time()
            predictor.begin_step(pos)
            for a, layer in enumerate(moe):
                outs.append(predictor.predict(layer, xs[a]))
                predictor.observe(layer, xs[a], chosen[a])
            rp.step_s.append(time.perf_counter() - t0)
            rp.step_cpu.append(time.thread_time() - c0)
            for a, out in enumerate(outs):
                for target, scores in out.items():
                    b = slot[target] if target < n_layers else M + slot.get(target - n_layers, -10**6)
                    j = b - a
                    if 1 <= j <= lookahead:
                        rp.pred[i, a, j - 1] = torch.topk(scores[0].float(), topk).indices.numpy()
            i += 1
            if progress is not None:
                progress.update(1)
    return rp, rows


def truth(trace, rows: np.ndarray, lookahead: int) -> tuple[np.ndarray, np.ndarray]:
    """True ids [n, M, J, k] at each target and a validity mask [n, M, J] (target exists)."""
    M = trace.M
    ids = np.asarray(trace.ids[rows]).astype(np.int64)                         # [n, M, k]
    seq = np.asarray(trace.seq[rows])
    nxt_ok = np.zeros(len(rows), bool)
    if len(rows) > 1:
        nxt_ok[:-1] = (seq[1:] == seq[:-1]) & (rows[1:] == rows[:-1] + 1)
    nxt = np.asarray(trace.ids[np.minimum(rows + 1, trace.N - 1)]).astype(np.int64)
    T = np.zeros((len(rows), M, lookahead, trace.k), np.int64)
    V = np.zeros((len(rows), M, lookahead), bool)
    for a in range(M):
        for j in range(1, lookahead + 1):
            b = a + j
            if b < M:
                T[:, a, j - 1], V[:, a, j - 1] = ids[:, b], True
            elif b - M < M:
                T[:, a, j - 1], V[:, a, j - 1] = nxt[:, b - M], nxt_ok
    return T, V


def fetch_rate(trace, model, rows, pred: np.ndarray, j: int, layer_time: float, link, pred_latency: float,
               true: np.ndarray | None = None, valid: np.ndarray | None = None):
    """Fetch rate of the distance-j predictions `pred` [n, M, topk] (see the module doc); with the
    true ids [n, M, k] and validity [n, M] also the coverage: the share of the experts really used
    (at targets that exist) that were predicted and fetched in time. Returns (fetch_rate, coverage)."""
    M, n_layers, moe = trace.M, trace.n_layers, trace.moe_layers
    mode, val = link
    nbytes = np.array([[model.expert_nbytes(layer, e) for e in range(trace.E)] for layer in moe], np.float64)
    tau_tab = nbytes / val if mode == "bw" else np.full_like(nbytes, val * layer_time)
    issue, deadline, tau, good = [], [], [], []
    # one continuous decode stream through the replayed rows
    t_row = np.arange(len(rows), dtype=np.float64) * n_layers * layer_time
    for a in range(M):
        b = a + j
        dl = moe[b] if b < M else (moe[b - M] + n_layers if b - M < M else None)
        if dl is None:
            continue
        ids = pred[:, a]                                                             # [n, topk]
        for q in range(ids.shape[1]):
            e = ids[:, q].astype(np.int64)
            has = e >= 0
            tb = b if b < M else b - M
            issue.append(np.where(has, t_row + moe[a] * layer_time + pred_latency, np.nan))
            deadline.append(t_row + dl * layer_time)
            tau.append(np.where(has, tau_tab[tb][np.maximum(e, 0)], np.nan))
            if true is not None:
                good.append(has & valid[:, a] & (e[:, None] == true[:, a]).any(1))
    if not issue:
        return None, (0.0 if true is not None else None)
    issue, deadline, tau = (np.stack(v, 1).reshape(-1) for v in (issue, deadline, tau))
    order = np.lexsort((np.arange(len(issue)), issue))       # FIFO by issue time, then queue order
    keep = order[~np.isnan(issue[order])]
    if len(keep) == 0:
        return None, (0.0 if true is not None else None)
    ok = fetch_timeline(issue[keep], deadline[keep], tau[keep])
    coverage = None
    if true is not None:
        good = np.stack(good, 1).reshape(-1)[keep]
        n_true = int(valid.sum()) * true.shape[-1]
        coverage = float((ok & good).sum() / n_true) if n_true else None
    return float(ok.mean()), coverage


def measure_layer_time(model_path, trace, n_tokens: int = 32, repeats: int = 2) -> float:
    """Per-layer decode compute time: an all-resident Engine decodes `n_tokens` after a held-out
    prompt's first 64 tokens, `repeats` times; the median time between decoded tokens (one forward
    step and one sampling), divided by the number of layers. Medians resist other load on the host."""
    from ..engine import Engine
    eng = Engine(model_path, n_ctx=min(512, trace.meta.get("options", {}).get("n_ctx", 512)))
    seqs = trace.seqs("eval") or trace.seqs()
    s = seqs[0]
    prompt = [int(t) for t in np.asarray(trace.tokens[s["start"]:s["start"] + min(64, s["n_prompt"])])]
    gaps = []
    for _ in range(repeats):
        last = None
        for _tok in eng.generate(prompt, max_tokens=n_tokens, temperature=0.0):
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            last = now
    eng.close()
    if not gaps:
        raise ModelError("could not measure a decode step (the model stopped at once); pass --layer-time")
    return float(np.median(gaps)) / trace.n_layers


def build_predictor(spec: str, model, trace, lookahead: int):
    """A predictor for evaluation: history/freq learn from the trace's training prompts; the oracle
    replays each sequence's own routes."""
    from . import make_predictor
    kind, _, arg = spec.partition(":")
    if kind in ("history", "freq") and not arg:
        from .history import FreqPredictor, HistoryPredictor, trace_counts
        counts, eams = trace_counts(trace, "train")
        return FreqPredictor(model, lookahead, counts) if kind == "freq" else HistoryPredictor(model, lookahead, eams)
    if kind == "oracle":
        from .oracle import OraclePredictor

        class _TraceOracle(OraclePredictor):
            """Replays each sequence's own routes; lookahead counts MoE layers (as everywhere here)."""

            def set_sequence(self, tr, rows):
                s = next(q for q in tr.sequences if q["start"] <= rows[0] < q["start"] + q["n_prompt"] + q["n_decode"])
                self.routes = tr.routes(s)

            def predict(self, layer, x):
                moe = trace.moe_layers
                if layer not in moe:
                    return {}
                a, M, T, out = moe.index(layer), len(moe), len(self.positions), {}
                for j in range(1, self.lookahead + 1):
                    shift, bb = divmod(a + j, M)
                    scores = torch.zeros((T, self.n_experts))
                    for i, pos in enumerate(self.positions):
                        for e in self.routes.get((pos + shift * T, moe[bb]), ()):
                            scores[i, e] = 1.0
                    if scores.any():
                        out[moe[bb] + shift * self.n_layers] = scores
                return out
        return _TraceOracle(model, {}, lookahead)
    if kind == "none":
        return None
    return make_predictor(spec, model, lookahead=lookahead)


def evaluate(model_path, trace_path, predictors: list[str], lookahead: int = 3, link="25GB/s",
             layer_time: float | None = None, topk: int | None = None, max_rows: int | None = None,
             split: str = "eval", progress: bool = True, pred_latency: float | None = None) -> dict:
    """Replay `predictors` over the trace's `split` prompts; returns {"rows", "pairs", "setup", "cost"}.
    `pred_latency` (seconds per predict call, the delay before a prediction can be queued): default
    the measured mean of each predictor's calls during the replay."""
    from tqdm import tqdm
    from ..format import open_model
    from .trace import Trace
    trace = Trace(trace_path)
    model = open_model(model_path)
    trace.check_model(model)
    if not 1 <= lookahead <= 3:
        raise ModelError(f"--lookahead {lookahead} must be 1..3")
    if not predictors:
        raise ModelError("no predictor to evaluate (--predictors gate,mlp:PATH,history,freq)")
    link_t = parse_link(link)
    k = trace.k
    topk = int(topk or k)
    if not 1 <= topk <= trace.E:
        raise ModelError(f"--topk {topk} must be 1..{trace.E}")
    seqs = trace.seqs(split)
    if not seqs:
        raise ModelError(f"trace {trace_path} has no {split!r} prompts")
    if layer_time is None:
        layer_time = measure_layer_time(model_path, trace)
        lt_source = "measured (all-resident Engine, CPU decode)"
    else:
        lt_source = "given"
    built = [(spec, build_predictor(spec, model, trace, lookahead)) for spec in predictors]
    n_rows = sum(s["n_prompt"] + s["n_decode"] for s in seqs)
    n_rows = min(n_rows, max_rows) if max_rows else n_rows
    rows_out, pairs_out, cost = [], [], {}
    T_ids = V = None
    with tqdm(total=n_rows * len(built), desc="eval-predictor", unit="tok", disable=not progress,
              mininterval=1.0) as bar:
        for spec, pred in built:
            rp, rows = replay(pred, trace, seqs, lookahead, topk, max_rows, bar)
            if T_ids is None:
                T_ids, V = truth(trace, rows, lookahead)
            name = spec
            med = float(np.median(rp.step_s)) if rp.step_s else 0.0
            cost[name] = {"ms_per_step": 1e3 * med, "mean_ms_per_step": round(1e3 * float(np.mean(rp.step_s)), 4)
                          if rp.step_s else 0.0, "cpu_ms_per_step": round(1e3 * float(np.median(rp.step_cpu)), 4)
                          if rp.step_cpu else 0.0, "steps": len(rp.step_s)}
            lat = med / trace.M if pred_latency is None else pred_latency
            for j in range(1, lookahead + 1):
                sel = V[:, :, j - 1]
                P = rp.pred[:, :, j - 1][sel]
                R = T_ids[:, :, j - 1][sel]
                m = set_metrics(P, R)
                M = trace.M
                intra = np.broadcast_to((np.arange(M) + j < M)[None, :], sel.shape)[sel]
                mi, mc = set_metrics(P[intra], R[intra]), set_metrics(P[~intra], R[~intra])
                fr, cov = fetch_rate(trace, model, rows, rp.pred[:, :, j - 1], j, layer_time, link_t, lat,
                                     T_ids[:, :, j - 1], V[:, :, j - 1])
                acc = m["accuracy"]
                rows_out.append({"predictor": name, "lookahead": j, "accuracy": _r(acc), "recall": _r(m["recall"]),
                                 "fetch_rate": _r(fr), "goodpred": _r(acc * fr if acc is not None and fr is not None else None),
                                 "accuracy_intra": _r(mi["accuracy"]), "accuracy_cross": _r(mc["accuracy"]),
                                 "recall_cross": _r(mc["recall"]), "coverage": _r(cov), "instances": int(sel.sum())})
                for a in range(M):
                    sa = V[:, a, j - 1]
                    ma = set_metrics(rp.pred[sa, a, j - 1], T_ids[sa, a, j - 1])
                    b = a + j
                    pairs_out.append({"predictor": name, "lookahead": j, "source": trace.moe_layers[a],
                                      "target": (trace.moe_layers[b] if b < M else
                                                 f"next:{trace.moe_layers[b - M]}" if b - M < M else None),
                                      "accuracy": _r(ma["accuracy"]), "recall": _r(ma["recall"]),
                                      "instances": int(sa.sum())})
    mode, val = link_t
    step_s = layer_time * trace.n_layers
    for c in cost.values():
        c["share_of_step"] = _r(c["ms_per_step"] / 1e3 / step_s)
        c["ms_per_step"] = _r(c["ms_per_step"])
    return {"rows": rows_out, "pairs": pairs_out,
            "setup": {"model": str(model_path), "trace": str(trace_path), "split": split,
                      "sequences": len(seqs), "tokens": int(len(T_ids) if T_ids is not None else 0),
                      "topk": topk, "k": k, "n_experts": trace.E, "lookahead": lookahead,
                      "link": link, "link_mode": mode, "link_value": val,
                      "expert_bytes_mean": float(np.mean([model.expert_nbytes(layer, e) for layer in trace.moe_layers
                                                          for e in range(trace.E)])),
                      "layer_time_s": layer_time, "layer_time_source": lt_source,
                      "decode_step_ms": _r(step_s * 1e3)},
            "cost": cost}


def _r(v, nd=4):
    return None if v is None else round(float(v), nd)


def plot(report: dict, path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = report["rows"]
    names = list(dict.fromkeys(r["predictor"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name in names:
        rs = [r for r in rows if r["predictor"] == name]
        xs = [r["lookahead"] for r in rs]
        label = name if len(name) < 28 else name.split(":")[0]
        axes[0].plot(xs, [r["accuracy"] if r["accuracy"] is not None else np.nan for r in rs], "o-", label=label)
        axes[1].plot(xs, [r["goodpred"] if r["goodpred"] is not None else np.nan for r in rs], "o-", label=label)
    s = report["setup"]
    axes[0].set(title="accuracy (top-k precision) vs lookahead", xlabel="lookahead (MoE layers)",
                ylabel="accuracy", ylim=(0, 1.02))
    axes[1].set(title=f"GOODPRED = accuracy x fetch rate (link {s['link']})", xlabel="lookahead (MoE layers)",
                ylabel="goodpred", ylim=(0, 1.02))
    for ax in axes:
        ax.set_xticks(sorted({r["lookahead"] for r in rows}))
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(names), fontsize=9)
    fig.suptitle(f"{Path(s['model']).name}: {s['tokens']} held-out tokens, {s['sequences']} prompts", fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_table(report: dict) -> str:
    lines = [f"{'predictor':<28} {'la':>2} {'accuracy':>8} {'recall':>7} {'fetch':>6} {'goodpred':>8} "
             f"{'acc_in':>7} {'acc_x':>7}"]
    f = lambda v: "   -" if v is None else f"{v:.3f}"   # noqa: E731
    for r in report["rows"]:
        name = r["predictor"] if len(r["predictor"]) <= 28 else "..." + r["predictor"][-25:]
        lines.append(f"{name:<28} {r['lookahead']:>2} {f(r['accuracy']):>8} {f(r['recall']):>7} "
                     f"{f(r['fetch_rate']):>6} {f(r['goodpred']):>8} {f(r['accuracy_intra']):>7} "
                     f"{f(r['accuracy_cross']):>7}")
    s = report["setup"]
    lines.append(f"decode step {s['decode_step_ms']} ms ({s['layer_time_source']}); link {s['link']}; "
                 f"mean expert {s['expert_bytes_mean'] / 1e3:.1f} kB")
    for name, c in report["cost"].items():
        lines.append(f"predictor {name}: {c['ms_per_step']} ms per decode step "
                     f"({100 * (c['share_of_step'] or 0):.2f}% of a step)")
    return "\n".join(lines)


def markdown_table(report: dict) -> str:
    """The rows as a Markdown table, then the setup and the predictor cost."""
    f = lambda v: "-" if v is None else f"{v:.3f}"   # noqa: E731
    out = ["| predictor | lookahead | accuracy | recall | fetch rate | GOODPRED | coverage | accuracy (same token) "
           "| accuracy (next token) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        name = r["predictor"].split("/")[-1] if r["predictor"].startswith("mlp:") else r["predictor"]
        out.append(f"| {name} | {r['lookahead']} | {f(r['accuracy'])} | {f(r['recall'])} | {f(r['fetch_rate'])} "
                   f"| {f(r['goodpred'])} | {f(r.get('coverage'))} | {f(r['accuracy_intra'])} | {f(r['accuracy_cross'])} |")
    s = report["setup"]
    out.append("")
    out.append(f"{s['tokens']} held-out tokens from {s['sequences']} prompts; top-{s['topk']} of {s['n_experts']} "
               f"predicted per target; link {s['link']}; mean expert {s['expert_bytes_mean'] / 1e3:.1f} kB; "
               f"decode step {s['decode_step_ms']} ms ({s['layer_time_source']}).")
    out.append("")
    out.append("| predictor | ms per decode step (median) | share of a decode step |")
    out.append("|---|---:|---:|")
    for name, c in report["cost"].items():
        n = name.split("/")[-1] if name.startswith("mlp:") else name
        out.append(f"| {n} | {c['ms_per_step']:.3f} | {100 * (c['share_of_step'] or 0):.2f}% |")
    return "\n".join(out) + "\n"


def write_json(report: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    return path
