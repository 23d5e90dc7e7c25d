"""Routing traces: per token and MoE layer, the router's input hidden state, its logits and the chosen
experts, for prefill and decode, streamed to disk.

Format (a directory, version 1):
    meta.json        {"format": "promoe-trace", "version": 1, "model": model_identity(model),
                      "n_moe": M, "n_embd": d, "n_experts": E, "k": k, "rows": N,
                      "sequences": [{"index", "split", "start", "n_prompt", "n_decode", "truncated"}],
                      "timing": {...}, "options": {...}}            written last: no meta = unfinished
    tokens.i32 [N]        token id of each row (a row = one token of one sequence, in order)
    pos.i32    [N]        its absolute position in the sequence
    seq.i32    [N]        index of its sequence (prompt) in meta["sequences"]
    phase.u8   [N]        0 prefill, 1 decode
    x.f16      [N, M, d]  the router input (ffn-normed hidden state) at each MoE layer, float16
    logits.f32 [N, M, E]  the router logits
    ids.i16    [N, M, k]  the chosen experts, in the router's top-k order
    routers.f32 [M, E, d] the routers (ffn_gate_inp) themselves, so training needs no model file
M counts MoE layers (meta["model"]["moe_layers"] maps them to layer numbers). All arrays are
little-endian raw binaries, read back with numpy memmaps: writing holds one forward step in memory,
reading holds nothing.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from ..errors import ModelError
from .identity import check_identity, model_identity

FORMAT, VERSION = "promoe-trace", 1
ROW_FILES = {"tokens": ("tokens.i32", "<i4"), "pos": ("pos.i32", "<i4"), "seq": ("seq.i32", "<i4"),
             "phase": ("phase.u8", "u1")}
LAYER_FILES = {"x": ("x.f16", "<f2"), "logits": ("logits.f32", "<f4"), "ids": ("ids.i16", "<i2")}
SPLITS = ("train", "eval")


def default_split(index: int) -> str:
    """9:1 train/eval by prompt: every tenth prompt (index 9, 19, ...) is held out."""
    return "eval" if index % 10 == 9 else "train"


# ---- prompts files -----------------------------------------------------------------------------
def load_prompts(path) -> list[dict]:
    """One prompt per line, or JSON lines with a "prompt" field (and optionally "split": train|eval).
    Returns [{"prompt": str, "split": str|None}]."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"prompts file {path} does not exist")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ModelError(f"prompts file {path} is not UTF-8 text ({e})") from None
    first = next((ln for ln in lines if ln.strip()), None)
    if first is None:
        raise ModelError(f"prompts file {path} holds no prompt")
    jsonl = False
    if first.lstrip().startswith("{"):
        try:
            jsonl = isinstance(json.loads(first), dict) and "prompt" in json.loads(first)
        except json.JSONDecodeError:
            jsonl = False
    out = []
    for no, ln in enumerate(lines, 1):
        if not ln.strip():
            continue
        if not jsonl:
            out.append({"prompt": ln, "split": None})
            continue
        try:
            obj = json.loads(ln)
        except json.JSONDecodeError as e:
            raise ModelError(f"{path}:{no}: not a JSON line ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise ModelError(f"{path}:{no}: a JSON line needs a string \"prompt\" field")
        split = obj.get("split")
        if split is not None and split not in SPLITS:
            raise ModelError(f"{path}:{no}: split {split!r} is not one of {', '.join(SPLITS)}")
        if not obj["prompt"]:
            raise ModelError(f"{path}:{no}: empty prompt")
        out.append({"prompt": obj["prompt"], "split": split})
    return out


# ---- writing -----------------------------------------------------------------------------------
class TraceWriter:
    """An observer for `engine.experts.observers`: buffers one forward step, appends it to the files.

    The driver tells it which sequence runs (`start_sequence`) and keeps `tokens` (the sequence's
    token list, growing during decode) current; `n_prompt` separates prefill from decode rows."""

    def __init__(self, out_dir, model, options: dict | None = None):
        self.dir = Path(out_dir)
        cfg = model.config
        self.identity = model_identity(model)
        self.moe = list(cfg.moe_layers)
        self.slot = {layer: i for i, layer in enumerate(self.moe)}
        self.d, self.E, self.k = int(cfg.n_embd), int(cfg.n_experts), int(cfg.n_experts_used)
        self.options = dict(options or {})
        if self.dir.exists():
            if not self.dir.is_dir() or any(self.dir.iterdir()):
                raise ModelError(f"trace output {self.dir} already exists (choose a new path)")
        self.dir.mkdir(parents=True, exist_ok=True)
        routers = np.stack([model.tensor_f32(f"blk.{layer}.ffn_gate_inp.weight") for layer in self.moe])
        (self.dir / "routers.f32").write_bytes(routers.astype("<f4").tobytes())
        self.files = {k: open(self.dir / f, "wb") for k, (f, _) in {**ROW_FILES, **LAYER_FILES}.items()}
        self.rows = 0
        self.sequences: list[dict] = []
        self.positions: list[int] = []
        self.buf: dict[int, tuple] = {}
        self.tokens: list[int] = []
        self.n_prompt = 0
        self.seq = -1

    # observer protocol
    def begin_step(self, positions) -> None:
        self.flush()
        self.positions = list(positions)

    def observe(self, layer, x, ids, logits=None) -> None:
        i = self.slot[layer]
        x16 = x.detach().to("cpu").float().numpy().astype("<f2")
        lg = (np.full((x16.shape[0], self.E), np.nan, "<f4") if logits is None
              else logits.detach().to("cpu").float().numpy().astype("<f4"))
        self.buf[i] = (x16, lg, ids.detach().to("cpu").numpy().astype("<i2"))

    # driver protocol
    def start_sequence(self, index: int, split, tokens: list, n_prompt: int, truncated: bool = False) -> None:
        self.flush()
        self.seq, self.tokens, self.n_prompt = index, tokens, n_prompt
        self.sequences.append({"index": index, "split": split, "start": self.rows, "n_prompt": n_prompt,
                               "n_decode": 0, "truncated": bool(truncated)})

    def flush(self) -> None:
        if not self.buf:
            return
        if len(self.buf) != len(self.moe):
            missing = [self.moe[i] for i in range(len(self.moe)) if i not in self.buf]
            raise ModelError(f"trace: forward step at positions {self.positions[:1]}.. skipped MoE layers {missing}")
        T = len(self.positions)
        pos = np.asarray(self.positions, "<i4")
        self.files["tokens"].write(np.asarray([self.tokens[p] for p in self.positions], "<i4").tobytes())
        self.files["pos"].write(pos.tobytes())
        self.files["seq"].write(np.full(T, self.seq, "<i4").tobytes())
        self.files["phase"].write((pos >= self.n_prompt).astype("u1").tobytes())
        for j, name in enumerate(("x", "logits", "ids")):
            arr = np.stack([self.buf[i][j] for i in range(len(self.moe))], axis=1)   # [T, M, ...]
            self.files[name].write(np.ascontiguousarray(arr).tobytes())
        self.rows += T
        self.sequences[-1]["n_decode"] += int((pos >= self.n_prompt).sum())
        self.buf = {}

    def close(self, timing: dict | None = None) -> Path:
        self.flush()
        for f in self.files.values():
            f.close()
        meta = {"format": FORMAT, "version": VERSION, "model": self.identity, "n_moe": len(self.moe),
                "n_embd": self.d, "n_experts": self.E, "k": self.k, "rows": self.rows,
                "sequences": self.sequences, "timing": timing or {}, "options": self.options}
        tmp = self.dir / "meta.json.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, self.dir / "meta.json")
        return self.dir

    def abort(self) -> None:
        for f in self.files.values():
            f.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def trace_prompts(engine, prompts: list[dict], out_dir, n_decode: int = 32, temperature: float = 0.8,
                  seed: int = 0, progress: bool = True, max_prompt_tokens: int | None = None) -> Path:
    """Run every prompt (prefill, then `n_decode` sampled tokens with seed `seed + index`) through
    `engine` and record its routing under `out_dir`. Deterministic for a given model and prompts."""
    from tqdm import tqdm
    n_ctx = engine.n_ctx
    limit = n_ctx - n_decode - 1 if max_prompt_tokens is None else min(max_prompt_tokens, n_ctx - n_decode - 1)
    if limit < 1:
        raise ModelError(f"--decode {n_decode} leaves no room for a prompt in a context of {n_ctx} tokens")
    encoded = []
    for i, p in enumerate(prompts):
        ids = engine.tokenize(p["prompt"])
        encoded.append((ids[:limit], len(ids) > limit))
    opts = {"n_decode": n_decode, "temperature": temperature, "seed": seed, "n_ctx": n_ctx,
            "n_batch": engine.n_batch, "prompt_token_limit": limit}
    w = TraceWriter(out_dir, engine.model, opts)
    engine.experts.observers.append(w)
    total = sum(len(ids) for ids, _ in encoded) + n_decode * len(encoded)
    t0 = time.perf_counter()
    try:
        with tqdm(total=total, desc="trace", unit="tok", disable=not progress, mininterval=1.0) as bar:
            for i, ((ids, trunc), p) in enumerate(zip(encoded, prompts)):
                tokens = list(ids)
                w.start_sequence(i, p.get("split"), tokens, len(ids), trunc)
                before = engine.timing.prefill_tokens + engine.timing.decode_tokens
                if n_decode > 0:
                    # n_decode + 1 tokens: each of the first n_decode goes back through the model (a traced step)
                    for tok in engine.generate(ids, max_tokens=n_decode + 1, temperature=temperature, seed=seed + i):
                        tokens.append(tok)
                else:
                    engine.logits(ids)
                w.flush()
                bar.update(engine.timing.prefill_tokens + engine.timing.decode_tokens - before)
    except BaseException:
        engine.experts.observers.remove(w)
        w.abort()
        raise
    engine.experts.observers.remove(w)
    t = engine.timing
    timing = {"wall_s": round(time.perf_counter() - t0, 3), "prefill_tokens": t.prefill_tokens,
              "prefill_s": round(t.prefill_s, 4), "decode_tokens": t.decode_tokens, "decode_s": round(t.decode_s, 4)}
    return w.close(timing)


# ---- reading -----------------------------------------------------------------------------------
class Trace:
    """A trace directory, memory-mapped. Row arrays: tokens, pos, seq, phase; [N, M, ...]: x, logits, ids."""

    def __init__(self, path):
        self.path = Path(path)
        mp = self.path / "meta.json"
        if not self.path.is_dir():
            raise ModelError(f"trace {path} is not a directory (make one with `promoe trace`)")
        if not mp.is_file():
            raise ModelError(f"trace {path} has no meta.json: not a trace, or tracing did not finish")
        try:
            self.meta = json.loads(mp.read_text())
        except json.JSONDecodeError as e:
            raise ModelError(f"trace {path}: meta.json is not valid JSON ({e.msg})") from None
        if self.meta.get("format") != FORMAT:
            raise ModelError(f"trace {path}: not a promoe trace (format {self.meta.get('format')!r})")
        if self.meta.get("version") != VERSION:
            raise ModelError(f"trace {path}: format version {self.meta.get('version')!r} is not supported "
                             f"(this promoe reads version {VERSION})")
        m = self.meta
        self.identity = m["model"]
        self.N, self.M, self.d, self.E, self.k = m["rows"], m["n_moe"], m["n_embd"], m["n_experts"], m["k"]
        self.n_layers = self.identity["n_layers"]
        self.moe_layers = list(self.identity["moe_layers"])
        shapes = {"x": (self.M, self.d), "logits": (self.M, self.E), "ids": (self.M, self.k)}
        for name, (fname, dt) in {**ROW_FILES, **LAYER_FILES}.items():
            shape = (self.N,) + shapes.get(name, ())
            f = self.path / fname
            want = int(np.prod(shape)) * np.dtype(dt).itemsize
            if not f.is_file() or f.stat().st_size != want:
                raise ModelError(f"trace {path}: {fname} is missing or has the wrong size "
                                 f"({f.stat().st_size if f.is_file() else 'missing'} bytes, expected {want})")
            arr = np.memmap(f, dtype=dt, mode="r", shape=shape) if self.N else np.zeros(shape, dt)
            setattr(self, name, arr)
        self.sequences = m["sequences"]
        f = self.path / "routers.f32"
        want = self.M * self.E * self.d * 4
        if not f.is_file() or f.stat().st_size != want:
            raise ModelError(f"trace {path}: routers.f32 is missing or has the wrong size")
        self.routers = np.fromfile(f, dtype="<f4").reshape(self.M, self.E, self.d)

    def __len__(self) -> int:
        return self.N

    def check_model(self, model) -> None:
        check_identity(self.identity, model, f"trace {self.path}")

    def split_of(self, seq_entry: dict) -> str:
        return seq_entry.get("split") or default_split(seq_entry["index"])

    def seqs(self, split: str | None = None) -> list[dict]:
        return [s for s in self.sequences if split is None or self.split_of(s) == split]

    def rows(self, split: str | None = None) -> np.ndarray:
        """Row indices of the sequences in `split` (train | eval | None: all), in order."""
        parts = [np.arange(s["start"], s["start"] + s["n_prompt"] + s["n_decode"]) for s in self.seqs(split)]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def routes(self, seq_entry: dict) -> dict:
        """{(position, layer): [expert ids]} of one sequence (what OraclePredictor replays)."""
        s0, n = seq_entry["start"], seq_entry["n_prompt"] + seq_entry["n_decode"]
        ids, pos = np.asarray(self.ids[s0:s0 + n]), np.asarray(self.pos[s0:s0 + n])
        return {(int(p), layer): ids[r, i].tolist() for r, p in enumerate(pos)
                for i, layer in enumerate(self.moe_layers)}
