"""ProMoE's learned predictor: a small MLP per (source MoE layer, target MoE layer), trained on traces.

Targets. From MoE layer a (counting MoE layers only, M of them) the predictor scores the experts of
the `window` next MoE layers b = a+1 .. a+window; b >= M is layer b-M of the NEXT token (cross-token
prediction: the next token's first layers from this token's last ones, which gate reuse cannot do).

Features of one (token p, source a, target b), all known when layer a's router input is:
  window   the router inputs of the last `ctx` MoE layers: x[p,a], x[p,a-1], ..; before layer 0 they
           continue with the previous token's last layers (x[p-1,M-1], ..), zeros at a sequence start
  current  softmax of layer a's router logits (the router is cheap; the predictor recomputes it)
  gate     softmax of target layer b's router applied to x[p,a] (the gate-reuse guess)
  latest   the latest routing already seen at the target layer: the previous token's for a target in
           this token, this token's for a target in the next token: router softmax + chosen multi-hot
           (+ its router input when `target_x`)
  history  an exponential moving average (decay `ema`) of the chosen multi-hot at the target layer
           over the sequence's tokens up to that latest one
Router inputs enter through a linear encoder per layer, z = standardize(x) @ U_l (d -> `rank`; rank 0:
the standardized x itself), shared by every pair that reads that layer: it is computed once per token
and layer, which keeps the predictor small and cheap. Model per pair: Linear(F, hidden) -> ReLU ->
Linear(hidden, E). Training: a listwise cross-entropy (softmax over experts against the k chosen, 1/k
each), Adam, all pairs in one loop as batched matmuls, early stopping on a validation tenth of the
training prompts (the eval prompts are never read).

Runtime: `MLPPredictor` (numpy: a decode step's calls are tiny) keeps the previous token's encoded
router inputs and routing per layer and the history average; in a prefill chunk of T > 1 tokens every
row uses the state before the chunk (the rows' own previous tokens are computed in the same step),
which only matters for prefill prefetching.
"""
from __future__ import annotations

import hashlib
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelError, one_line
from .base import Predictor
from .identity import check_identity
from .record_check import check_record

FORMAT, VERSION = "promoe-predictor", 1


@dataclass
class FeatureSpec:
    M: int                    # MoE layers
    E: int                    # experts per layer
    k: int                    # experts used per token
    d: int                    # hidden size (router input)
    window: int = 3           # targets a+1 .. a+window
    ctx: int = 3              # router inputs of this many layers (sliding back across the token edge)
    target_x: bool = True     # the latest router input at the target layer as a feature
    ema: float = 0.8          # decay of the per-layer routing history average
    rank: int = 64            # encoder width (0: no encoder, the standardized router input itself)

    @property
    def r(self) -> int:
        return self.rank or self.d

    @property
    def n_shared(self) -> int:
        """Features every target of a source shares: the window of encoded inputs, the current routing."""
        return self.ctx * self.r + self.E

    @property
    def n_features(self) -> int:
        return self.n_shared + 4 * self.E + (self.r if self.target_x else 0)

    def pairs(self) -> list[tuple[int, int]]:
        return [(a, j) for a in range(self.M) for j in range(1, self.window + 1)]


def pair_label(moe_layers, a, j) -> str:
    b, M = a + j, len(moe_layers)
    return f"L{moe_layers[a]}->" + (f"L{moe_layers[b]}" if b < M else f"next L{moe_layers[b - M]}")


class PredictorNet(torch.nn.Module):
    """Encoders U [M, d, r] (+ per-layer standardization of x), and P two-layer MLPs stacked:
    W1 [P, F, H], W2 [P, H, E]."""

    def __init__(self, spec: FeatureSpec, H: int):
        super().__init__()
        s = spec
        P, F = len(s.pairs()), s.n_features
        self.spec = s
        self.register_buffer("xmu", torch.zeros(s.M, s.d))
        self.register_buffer("xsd", torch.ones(s.M, s.d))
        if s.rank:
            self.U = torch.nn.Parameter(torch.randn(s.M, s.d, s.rank) / math.sqrt(s.d))
        self.W1 = torch.nn.Parameter(torch.empty(P, F, H))
        self.b1 = torch.nn.Parameter(torch.zeros(P, 1, H))
        self.W2 = torch.nn.Parameter(torch.empty(P, H, s.E))
        self.b2 = torch.nn.Parameter(torch.zeros(P, 1, s.E))
        for p in range(P):
            torch.nn.init.kaiming_uniform_(self.W1.data[p].T, a=math.sqrt(5))
            torch.nn.init.kaiming_uniform_(self.W2.data[p].T, a=math.sqrt(5))

    def encode(self, X, mask=None):
        """X [B, M, d] -> Z [B, M, r]; rows where mask == 0 (no such token) encode to zeros."""
        Z = (X - self.xmu) / self.xsd
        if self.spec.rank:
            Z = torch.einsum("bmd,mdr->bmr", Z, self.U)
        return Z * mask[:, None, None] if mask is not None else Z

    def forward(self, feats, dropout: float = 0.0):
        """feats [P, B, F] -> scores [P, B, E]."""
        h = torch.relu(torch.baddbmm(self.b1, feats, self.W1))
        if dropout and self.training:
            h = torch.nn.functional.dropout(h, dropout)
        return torch.baddbmm(self.b2, h, self.W2)


# ---- training data from a trace -----------------------------------------------------------------
class TraceTensors:
    """The trace rows of some sequences, in RAM, with the derived arrays features are gathered from."""

    def __init__(self, trace, seqs: list[dict], spec: FeatureSpec):
        rows = [np.arange(s["start"], s["start"] + s["n_prompt"] + s["n_decode"]) for s in seqs]
        lengths = [len(r) for r in rows]
        rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        n = self.n = len(rows)
        self.X = torch.from_numpy(np.asarray(trace.x[rows]))                          # [n, M, d] f16
        logits = torch.from_numpy(np.asarray(trace.logits[rows], dtype=np.float32))
        self.P = torch.softmax(logits, -1)                                            # [n, M, E]
        self.ids = torch.from_numpy(np.asarray(trace.ids[rows]).astype(np.int64))     # [n, M, k]
        self.H = torch.zeros(n, spec.M, spec.E).scatter_(2, self.ids, 1.0)
        self.routers = torch.from_numpy(np.asarray(trace.routers))                    # [M, E, d]
        # previous / next row within the same sequence (-1 at the edges)
        prev, nxt = np.arange(n) - 1, np.arange(n) + 1
        starts = np.cumsum([0] + lengths[:-1]).astype(np.int64) if lengths else np.zeros(0, np.int64)
        ends = starts + np.asarray(lengths, np.int64) - 1
        prev[starts] = -1
        nxt[ends] = -1
        self.prev, self.next = torch.from_numpy(prev), torch.from_numpy(nxt)
        # EMA of the chosen multi-hot per layer, through each row (inclusive), reset per sequence
        ema = np.zeros((n, spec.M, spec.E), np.float32)
        Hn, c = self.H.numpy(), spec.ema
        for s0, L in zip(starts, lengths):
            acc = np.zeros((spec.M, spec.E), np.float32)
            for r in range(s0, s0 + L):
                acc = c * acc + (1 - c) * Hn[r]
                ema[r] = acc
        self.EMA = torch.from_numpy(ema)
        self.valid = torch.from_numpy(np.nonzero(nxt >= 0)[0])   # rows with a next token: every target exists

    def batch(self, net: PredictorNet, rows: torch.Tensor):
        """(features [P, n, F], target expert ids [P, n, k]) of every pair at trace rows `rows`."""
        s = net.spec
        M = s.M
        prev = self.prev[rows]
        pm = (prev >= 0).float()
        pr = prev.clamp_min(0)
        Xc = self.X[rows].float()
        Zc = net.encode(Xc)                                                       # [n, M, r]
        Zp = net.encode(self.X[pr].float(), pm)
        GL = torch.einsum("nad,bed->nabe", Xc, self.routers)                      # [n, a, b, E] gate reuse
        feats, ys = [], []
        pm1 = pm[:, None]
        for a, j in s.pairs():
            win = [Zc[:, a - i] if a - i >= 0 else Zp[:, M + a - i] for i in range(s.ctx)]
            b = a + j
            bb = b % M
            gate = torch.softmax(GL[:, a, bb], -1)
            if b < M:
                tp, th, te = self.P[pr, bb] * pm1, self.H[pr, bb] * pm1, self.EMA[pr, bb] * pm1
                tz, y = Zp[:, bb], self.ids[rows, b]
            else:
                tp, th, te, tz = self.P[rows, bb], self.H[rows, bb], self.EMA[rows, bb], Zc[:, bb]
                y = self.ids[self.next[rows], bb]
            parts = win + [self.P[rows, a], gate, tp, th, te] + ([tz] if s.target_x else [])
            feats.append(torch.cat(parts, 1))
            ys.append(y)
        return torch.stack(feats), torch.stack(ys)


def train_predictor(trace, out_path=None, window: int = 3, ctx: int = 3, hidden: int = 128, rank: int = 64,
                    target_x: bool = True, ema: float = 0.8, epochs: int = 30, patience: int = 3,
                    batch: int = 512, lr: float = 2e-3, weight_decay: float = 1e-5, dropout: float = 0.0,
                    seed: int = 0, max_rows: int | None = None, progress: bool = True) -> dict:
    """Train the predictor on a trace's training prompts (every tenth of them validates for early
    stopping; the eval prompts are never read). Returns the predictor record (saved to out_path)."""
    from tqdm import tqdm
    from .trace import Trace
    if not isinstance(trace, Trace):
        trace = Trace(trace)
    M, E, k, d = trace.M, trace.E, trace.k, trace.d
    if not 1 <= window <= 3:
        raise ModelError(f"window {window} must be 1..3")
    if window > M:
        raise ModelError(f"window {window} exceeds the model's {M} MoE layers")
    if ctx < 1 or rank < 0 or hidden < 1:
        raise ModelError(f"ctx {ctx} must be >= 1, rank {rank} >= 0, hidden {hidden} >= 1")
    spec = FeatureSpec(M=M, E=E, k=k, d=d, window=window, ctx=ctx, target_x=target_x, ema=ema, rank=rank)
    train_seqs = trace.seqs("train")
    if len(train_seqs) < 2:
        raise ModelError(f"trace {trace.path} has {len(train_seqs)} training prompt(s); training needs at least 2")
    val_seqs = [s for i, s in enumerate(train_seqs) if i % 10 == 9] or train_seqs[-1:]
    fit_seqs = [s for s in train_seqs if s not in val_seqs]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    fit, val = TraceTensors(trace, fit_seqs, spec), TraceTensors(trace, val_seqs, spec)
    fit_rows, val_rows = fit.valid, val.valid
    if max_rows is not None and len(fit_rows) > max_rows:
        fit_rows = fit_rows[torch.randperm(len(fit_rows), generator=gen)[:max_rows]].sort().values
    if len(fit_rows) == 0 or len(val_rows) == 0:
        raise ModelError(f"trace {trace.path} is too small to train on ({len(fit_rows)} + {len(val_rows)} rows)")
    pairs = spec.pairs()
    P = len(pairs)
    net = PredictorNet(spec, hidden)
    X = fit.X[fit_rows[torch.randperm(len(fit_rows), generator=gen)[:50000]]].float()   # standardization
    net.xmu.copy_(X.mean(0))
    net.xsd.copy_(X.std(0).clamp_min(1e-3))
    del X
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)

    @torch.no_grad()
    def validate():
        net.eval()
        loss, hits, n = torch.zeros(P), torch.zeros(P), 0
        for i in range(0, len(val_rows), 2048):
            F_, Y = val.batch(net, val_rows[i:i + 2048])
            S = net(F_)
            loss += -(torch.log_softmax(S, -1).gather(-1, Y).mean(-1)).sum(-1)
            pred = torch.topk(S, k, -1).indices
            hits += (pred.unsqueeze(-1) == Y.unsqueeze(-2)).any(-1).float().mean(-1).sum(-1)
            n += F_.shape[1]
        return loss / n, hits / n

    best_loss, best_acc = validate()
    best_state = {n_: t.detach().clone() for n_, t in net.state_dict().items()}
    best_epoch, history, stale, t0 = 0, [], 0, time.perf_counter()
    n_batches = (len(fit_rows) + batch - 1) // batch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * n_batches, eta_min=lr * 0.05)
    bar = tqdm(total=epochs * n_batches, desc="train-predictor", unit="batch", disable=not progress, mininterval=1.0)
    epoch = 0
    for epoch in range(1, epochs + 1):
        net.train()
        perm = fit_rows[torch.randperm(len(fit_rows), generator=gen)]
        tot = 0.0
        for i in range(0, len(perm), batch):
            F_, Y = fit.batch(net, perm[i:i + batch])
            S = net(F_, dropout)
            loss = -(torch.log_softmax(S, -1).gather(-1, Y).mean(-1)).mean(-1).sum()   # sum over pairs
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item()
            bar.update(1)
        vloss, vacc = validate()
        if vloss.mean() < best_loss.mean() - 1e-4:
            best_loss, best_acc, best_epoch, stale = vloss, vacc, epoch, 0
            best_state = {n_: t.detach().clone() for n_, t in net.state_dict().items()}
        else:
            stale += 1
        history.append({"epoch": epoch, "train_loss": round(tot / n_batches / P, 5),
                        "val_loss": round(vloss.mean().item(), 5), "val_acc": round(vacc.mean().item(), 5)})
        bar.set_postfix(val_acc=f"{vacc.mean().item():.4f}", best=f"{best_acc.mean().item():.4f}")
        if stale >= patience:
            break
    bar.close()
    net.load_state_dict(best_state)
    record = {
        "format": FORMAT, "version": VERSION, "kind": "mlp", "model": trace.identity,
        "window": window, "spec": asdict(spec), "hidden": hidden,
        "state": {n_: t.detach().clone() for n_, t in net.state_dict().items()},
        "train": {"seed": seed, "epochs_run": epoch, "best_epoch": best_epoch, "history": history,
                  "val_acc": {pair_label(trace.moe_layers, a, j): round(float(x), 5) for (a, j), x in zip(pairs, best_acc)},
                  "fit_rows": int(len(fit_rows)), "val_rows": int(len(val_rows)),
                  "fit_prompts": len(fit_seqs), "val_prompts": len(val_seqs),
                  "trace_rows": trace.N, "seconds": round(time.perf_counter() - t0, 1),
                  "hyper": {"lr": lr, "batch": batch, "weight_decay": weight_decay, "dropout": dropout,
                            "patience": patience, "max_epochs": epochs}},
    }
    if out_path is not None:
        save_predictor(record, out_path)
    return record


def _stored(name: str, t: torch.Tensor) -> torch.Tensor:
    """Weights are stored as float16, standardization as float32."""
    return t.half() if name in ("U", "W1", "b1", "W2", "b2") else t.float()


def save_predictor(record: dict, path) -> Path:
    """torch.save of the record, float16 weights, written atomically."""
    rec = dict(record)
    rec["state"] = {n: _stored(n, t) for n, t in record["state"].items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(rec, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def read_predictor_file(path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"predictor file {path} does not exist")
    _check_archive(p)
    try:
        rec = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise ModelError(f"predictor file {path} is damaged: its archive is intact but its contents cannot be "
                         f"read back ({type(e).__name__}: {one_line(e, 120)})") from None
    if not isinstance(rec, dict) or rec.get("format") != FORMAT:
        raise ModelError(f"predictor file {path} is not a promoe predictor")
    if rec.get("version") != VERSION:
        raise ModelError(f"predictor file {path}: format version {rec.get('version')!r} is not supported "
                         f"(this promoe reads version {VERSION})")
    if rec.get("kind") != "mlp":
        raise ModelError(f"predictor file {path}: kind {rec.get('kind')!r} is not 'mlp'")
    check_record(rec, path)
    return rec


def _check_archive(p: Path) -> None:
    """torch.save writes a zip archive with a CRC-32 per member: check them all before unpickling, so a
    damaged file is named as damaged (and where) rather than failing somewhere inside the unpickler."""
    import zipfile
    try:
        with zipfile.ZipFile(p) as z:
            bad = z.testzip()
    except zipfile.BadZipFile as e:
        raise ModelError(f"predictor file {p} is not a promoe predictor, or is truncated: not a readable zip "
                         f"archive as torch.save writes ({e})") from None
    except Exception as e:  # noqa: BLE001 - a damaged directory entry fails in zipfile's own parsing
        raise ModelError(f"predictor file {p} is damaged: its zip directory is unreadable "
                         f"({type(e).__name__}: {one_line(e, 120)})") from None
    if bad is not None:
        raise ModelError(f"predictor file {p} is damaged: archive member {bad!r} fails its CRC-32 check")


def record_digest(record: dict) -> str:
    h = hashlib.sha256()
    for n in sorted(record["state"]):
        h.update(n.encode())
        h.update(record["state"][n].detach().float().numpy().tobytes())
    return h.hexdigest()


# ---- runtime ------------------------------------------------------------------------------------
class MLPPredictor(Predictor):
    """The runtime side, in numpy (a decode step's calls are tiny: per-op overhead dominates).

    Per source layer a: z_a = x_a @ U'_a + c_a (standardization folded in); one matmul of the block
    every target shares (window of z, current routing) for all targets at once; one batched matmul of
    the targets' own blocks; one batched second layer."""
    name = "mlp"

    def __init__(self, model, record: dict, lookahead: int | None = None, routers=None, stride: int = 1):
        """lookahead: targets a+1 .. a+lookahead (at most the trained window; default all of it).
        stride: predict from every stride-th MoE layer only (slots 0, stride, ..), each time for the
        next `lookahead` layers: with stride = lookahead the windows tile without overlap."""
        spec = FeatureSpec(**record["spec"])
        super().__init__(model, min(lookahead or spec.window, spec.window))
        if stride < 1:
            raise ModelError(f"stride {stride} must be >= 1")
        self.stride = int(stride)
        self.spec, self.record = spec, record
        ident = record["model"]
        self.moe = list(ident["moe_layers"])
        self.n_layers = ident["n_layers"]
        self.slot = {layer: i for i, layer in enumerate(self.moe)}
        M, E, d = spec.M, spec.E, spec.d
        if routers is None:
            routers = np.stack([model.tensor_f32(f"blk.{layer}.ffn_gate_inp.weight") for layer in self.moe])
        R = np.asarray(routers, np.float32)                                            # [M, E, d]
        self.R_all_T = np.ascontiguousarray(R.reshape(-1, d).T)                         # [d, M*E]
        st = {n: t.float().numpy() for n, t in record["state"].items()}
        inv = 1.0 / st["xsd"]                                                           # [M, d]
        if spec.rank:
            self.U = [np.ascontiguousarray(st["U"][a] * inv[a][:, None]) for a in range(M)]   # [d, r]
            self.c = [-(st["xmu"][a] * inv[a]) @ st["U"][a] for a in range(M)]               # [r]
        else:
            self.U = None
            self.mu, self.inv = st["xmu"], inv
        H, S, w = record["hidden"], spec.n_shared, self.lookahead
        self.H = H
        pidx = {pair: i for i, pair in enumerate(spec.pairs())}
        W1, b1, W2, b2 = st["W1"], st["b1"], st["W2"], st["b2"]
        self.Ws, self.b1, self.Wt, self.W2, self.b2, self.targets = [], [], [], [], [], []
        for a in range(M):
            ps = [pidx[(a, j)] for j in range(1, w + 1)]
            self.Ws.append(np.ascontiguousarray(np.concatenate([W1[p, :S] for p in ps], axis=1)))   # [S, w*H]
            self.b1.append(np.concatenate([b1[p, 0] for p in ps]))                                # [w*H]
            self.Wt.append(np.ascontiguousarray(np.stack([W1[p, S:] for p in ps])))                # [w, Ft, H]
            self.W2.append(np.ascontiguousarray(np.stack([W2[p] for p in ps])))                    # [w, H, E]
            self.b2.append(np.stack([b2[p] for p in ps]))                                         # [w, 1, E]
            self.targets.append([(a + j, (a + j) % M, self.moe[a + j] if a + j < M
                                  else self.moe[(a + j) % M] + self.n_layers) for j in range(1, w + 1)])
        self.zero_state = (np.zeros((1, spec.r), np.float32), np.zeros((1, E), np.float32),
                           np.zeros((1, E), np.float32))
        self.zero_ema = np.zeros((1, E), np.float32)
        self.eye = np.eye(E, dtype=np.float32)
        self.calls, self.seconds, self.cpu_seconds = 0, 0.0, 0.0   # predict(): wall and thread CPU time
        self.reset()

    def reset(self):
        super().reset()
        s = self.spec
        self.prev = {}           # slot -> (z [1,r], probs [1,E], hot [1,E]) of the last token seen
        self.cur = {}            # slot -> [z [T,r], probs [T,E], hot [T,E] | None] of this step
        self.ema = np.zeros((s.M, 1, s.E), np.float32)   # through the previous step's last token
        self.ema_cur = {}        # slot -> [T, E] through each row of this step (once hot is known)

    def _hot(self, a):
        """This step's choice at slot a: observed, else the router's top-k (also updates the history)."""
        cur = self.cur[a]
        if cur[2] is None:
            probs = cur[1]
            top = np.argpartition(-probs, self.spec.k - 1, axis=1)[:, :self.spec.k]
            hot = np.zeros_like(probs)
            hot[np.arange(len(hot))[:, None], top] = 1.0
            self._set_hot(a, hot)
        return cur[2]

    def _set_hot(self, a, hot):
        self.cur[a][2] = hot
        c = self.spec.ema
        if hot.shape[0] == 1:
            self.ema_cur[a] = c * self.ema[a] + (1 - c) * hot
            return
        out, acc = np.empty_like(hot), self.ema[a][0]
        for t in range(hot.shape[0]):
            acc = c * acc + (1 - c) * hot[t]
            out[t] = acc
        self.ema_cur[a] = out

    def begin_step(self, positions):
        for a, cur in self.cur.items():
            hot = self._hot(a)
            self.prev[a] = (cur[0][-1:], cur[1][-1:], hot[-1:])
            self.ema[a] = self.ema_cur[a][-1:]
        self.cur, self.ema_cur = {}, {}
        super().begin_step(positions)

    def _encode(self, a, xn):
        if self.U is not None:
            return xn @ self.U[a] + self.c[a]
        return (xn - self.mu[a]) * self.inv[a]

    @staticmethod
    def _softmax(z):
        z = z - z.max(-1, keepdims=True)
        np.exp(z, out=z)
        z /= z.sum(-1, keepdims=True)
        return z

    def predict(self, layer, x):
        a = self.slot.get(layer)
        if a is None:
            return {}
        t0, c0 = time.perf_counter(), time.thread_time()
        s = self.spec
        M, E = s.M, s.E
        xn = (x.detach() if x.device.type == "cpu" and x.dtype == torch.float32
              else x.detach().to("cpu", torch.float32)).numpy()
        T = xn.shape[0]
        sm = self._softmax((xn @ self.R_all_T).reshape(T, M, E))                 # every router on x
        z = self._encode(a, xn)
        self.cur[a] = [z, sm[:, a], None]
        if a % self.stride:
            self.seconds += time.perf_counter() - t0
            self.cpu_seconds += time.thread_time() - c0
            return {}
        win = []
        for i in range(s.ctx):
            lay = a - i
            if lay >= 0:
                win.append(self.cur[lay][0] if lay in self.cur else np.zeros_like(z))
            else:
                pv = self.prev.get(M + lay)
                win.append(np.broadcast_to(pv[0], z.shape) if pv is not None else np.zeros_like(z))
        win.append(sm[:, a])
        hs = np.concatenate(win, axis=1) @ self.Ws[a] + self.b1[a]                # [T, w*H]
        tfs = []
        for b, bb, _ in self.targets[a]:
            if b < M:
                st, ema = self.prev.get(bb), self.ema[bb]
            elif bb in self.cur:
                st, ema = self.cur[bb], None
                st = (st[0], st[1], self._hot(bb))
                ema = self.ema_cur[bb]
            else:
                st = None
            if st is None:
                st, ema = self.zero_state, self.zero_ema
            parts = [sm[:, bb], st[1], st[2], ema] + ([st[0]] if s.target_x else [])
            if T > 1:
                parts = [np.broadcast_to(p, (T, p.shape[-1])) for p in parts]
            tfs.append(np.concatenate(parts, axis=1))
        w = len(tfs)
        h = np.matmul(np.stack(tfs), self.Wt[a]) + hs.reshape(T, w, self.H).transpose(1, 0, 2)   # [w, T, H]
        np.maximum(h, 0.0, out=h)
        S = np.matmul(h, self.W2[a]) + self.b2[a]                                 # [w, T, E]
        out = {t: torch.from_numpy(S[i]) for i, (_, _, t) in enumerate(self.targets[a])}
        self.calls += 1
        self.seconds += time.perf_counter() - t0
        self.cpu_seconds += time.thread_time() - c0
        return out

    def observe(self, layer, x, chosen, logits=None):
        a = self.slot.get(layer)
        if a is None:
            return
        if a not in self.cur:                   # predict() was not called for this layer
            xn = x.detach().to("cpu", torch.float32).numpy()
            probs = self._softmax(xn @ self.R_all_T[:, a * self.spec.E:(a + 1) * self.spec.E])
            self.cur[a] = [self._encode(a, xn), probs, None]
        self._set_hot(a, self.eye[chosen.detach().to("cpu").numpy()].sum(1))


def load_mlp_predictor(path, model, lookahead: int | None = None, stride: int = 1) -> MLPPredictor:
    """The predictor in file `path` for `model` (ModelError if it was trained for another model)."""
    rec = read_predictor_file(path)
    check_identity(rec["model"], model, f"predictor {path}")
    return MLPPredictor(model, rec, lookahead, stride=stride)
