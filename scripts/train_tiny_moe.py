#!/usr/bin/env python
"""Train, export and quantize promoe-gguf's embedded default model.

A tiny byte-level Mixture-of-Experts language model in the Mixtral layout (llama.cpp arch "llama":
RMSNorm, RoPE of llama.cpp's NORM kind, GQA attention, 8 experts top-2 with renormalized softmax
weights), trained on CPU on the Python standard library's own .py sources, exported to GGUF with
gguf-py and quantized to Q4_K_M by llama.cpp's own quantizer.

Everything is deterministic: fixed seeds, fixed step count, 2 threads, a held-out file set chosen by
a stable hash of each file's path relative to the standard library directory.

    python scripts/train_tiny_moe.py                      # train + export + quantize + evaluate
    python scripts/train_tiny_moe.py --steps 20 --out build/smoke   # smoke run
    python scripts/train_tiny_moe.py --export-only build/tiny_moe/ckpt.pt  # export a checkpoint

The forward pass here is written to match what llama.cpp computes for arch "llama" so that the F32
GGUF evaluates to the same logits in llama.cpp (checked by `verify_f32_against_llama_cpp`).
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DATA_DIR = ROOT / "promoe_gguf" / "data"
SHIPPED_GGUF = DATA_DIR / "default-moe-q4_k_m.gguf"
MODEL_CARD = DATA_DIR / "default-moe.json"
DEFAULT_OUT = ROOT / "build" / "tiny_moe"

MODEL_NAME = "promoe-tiny-moe"
SEED = 1234
HELDOUT_MODULUS = 20  # ~5% of files: sha256(relpath)[0:8] % 20 == 0
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                           "__pycache__"})


def byte_vocab():
    """The project's byte-level tokenizer, promoe_gguf/format/byte_vocab.py.

    Falls back to loading the file directly when the package itself cannot be imported."""
    try:
        from promoe_gguf.format import byte_vocab as bv
        return bv
    except Exception:  # the package's other modules may be mid-edit; the vocab file stands alone
        import importlib.util
        name = "_promoe_byte_vocab"
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(
                name, ROOT / "promoe_gguf" / "format" / "byte_vocab.py")
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            sys.modules[name] = mod
        return sys.modules[name]


# --------------------------------------------------------------------------------------------
# Corpus: the Python standard library's .py sources
# --------------------------------------------------------------------------------------------

def stdlib_dir() -> str:
    return os.path.dirname(os.__file__)


def corpus_files() -> list[str]:
    """Sorted relative paths of the standard library's .py files (no tests, no site-packages)."""
    base = stdlib_dir()
    out = []
    for root, dirs, files in os.walk(base):
        dirs[:] = sorted(d for d in dirs if d not in EXCLUDED_DIRS)
        for f in files:
            if f.endswith(".py"):
                out.append(os.path.relpath(os.path.join(root, f), base).replace(os.sep, "/"))
    return sorted(out)


def is_heldout(relpath: str) -> bool:
    h = int.from_bytes(hashlib.sha256(relpath.encode("utf-8")).digest()[:8], "little")
    return h % HELDOUT_MODULUS == 0


def heldout_files() -> list[str]:
    """The held-out files (relative to `stdlib_dir()`); training never sees them."""
    return [f for f in corpus_files() if is_heldout(f)]


def train_files() -> list[str]:
    return [f for f in corpus_files() if not is_heldout(f)]


def load_stream(files: list[str]) -> np.ndarray:
    """The files' bytes concatenated in the given order, as uint8."""
    base = stdlib_dir()
    parts = []
    for f in files:
        with open(os.path.join(base, f), "rb") as fh:
            parts.append(np.frombuffer(fh.read(), dtype=np.uint8))
    return np.concatenate(parts) if parts else np.zeros(0, np.uint8)


def heldout_windows(n_ctx: int = 512, max_windows: int | None = None,
                    max_bytes: int | None = None) -> list[np.ndarray]:
    """Token windows [BOS, b0 .. b_{n_ctx-2}] cut without overlap from the held-out stream.

    Each window scores n_ctx-1 bytes. With max_windows, an evenly spaced deterministic subset.
    With max_bytes, the fewest windows that score at least that many bytes (evenly spaced)."""
    bos = byte_vocab().BOS_ID
    stream = load_stream(heldout_files())
    w = n_ctx - 1
    n_all = len(stream) // w
    idx = np.arange(n_all)
    if max_bytes is not None:
        max_windows = min(n_all, -(-max_bytes // w))
    if max_windows is not None and max_windows < n_all:
        idx = np.linspace(0, n_all - 1, max_windows).round().astype(np.int64)
    out = []
    for i in idx:
        chunk = stream[i * w:(i + 1) * w].astype(np.int64)
        out.append(np.concatenate([[bos], chunk]))
    return out


# --------------------------------------------------------------------------------------------
# Model: llama.cpp arch "llama" with MoE FFN (Mixtral semantics)
# --------------------------------------------------------------------------------------------

@dataclass
class TinyMoEConfig:
    n_vocab: int
    n_ctx: int = 512
    n_embd: int = 256
    n_layers: int = 4
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 512            # expert FF width (llama.feed_forward_length)
    n_expert: int = 8
    n_expert_used: int = 2
    rms_eps: float = 1e-5
    rope_base: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # ggml_rms_norm: x / sqrt(mean(x^2) + eps), then * weight
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope_norm(x: torch.Tensor, pos: torch.Tensor, base: float) -> torch.Tensor:
    """llama.cpp GGML_ROPE_TYPE_NORM: rotate adjacent pairs (x[2i], x[2i+1]).

    x: [B, T, H, D]; pos: [T]. theta_i = pos * base^(-2i/D)."""
    d = x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)          # [D/2]
    ang = pos.to(torch.float64)[:, None] * inv[None, :]                     # [T, D/2]
    cos = ang.cos().to(x.dtype)[None, :, None, :]
    sin = ang.sin().to(x.dtype)[None, :, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2)


class Block(nn.Module):
    def __init__(self, cfg: TinyMoEConfig):
        super().__init__()
        c = cfg
        self.cfg = cfg
        hd = c.head_dim
        # nn.Linear weight shape [out, in] == GGUF numpy order (ne1, ne0)
        self.attn_norm = nn.Parameter(torch.ones(c.n_embd))
        self.wq = nn.Linear(c.n_embd, c.n_head * hd, bias=False)
        self.wk = nn.Linear(c.n_embd, c.n_head_kv * hd, bias=False)
        self.wv = nn.Linear(c.n_embd, c.n_head_kv * hd, bias=False)
        self.wo = nn.Linear(c.n_head * hd, c.n_embd, bias=False)
        self.ffn_norm = nn.Parameter(torch.ones(c.n_embd))
        self.gate_inp = nn.Linear(c.n_embd, c.n_expert, bias=False)           # [E, n_embd]
        # stacked experts, numpy order of the GGUF tensors
        self.gate_exps = nn.Parameter(torch.empty(c.n_expert, c.n_ff, c.n_embd))
        self.up_exps = nn.Parameter(torch.empty(c.n_expert, c.n_ff, c.n_embd))
        self.down_exps = nn.Parameter(torch.empty(c.n_expert, c.n_embd, c.n_ff))

    def attention(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        B, T, _ = x.shape
        hd = c.head_dim
        q = self.wq(x).view(B, T, c.n_head, hd)
        k = self.wk(x).view(B, T, c.n_head_kv, hd)
        v = self.wv(x).view(B, T, c.n_head_kv, hd)
        q = rope_norm(q, pos, c.rope_base)
        k = rope_norm(k, pos, c.rope_base)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))                   # [B, H, T, D]
        rep = c.n_head // c.n_head_kv
        if rep > 1:  # q head h uses kv head h // rep (ggml broadcast)
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / math.sqrt(hd))
        return self.wo(o.transpose(1, 2).reshape(B, T, c.n_head * hd))

    def moe(self, x: torch.Tensor):
        """x: [N, n_embd] -> (out [N, n_embd], probs [N, E], topk ids [N, k])."""
        c = self.cfg
        logits = self.gate_inp(x)                                           # [N, E]
        probs = torch.softmax(logits, dim=-1)
        w, ids = torch.topk(probs, c.n_expert_used, dim=-1)                # [N, k]
        w = w / w.sum(-1, keepdim=True).clamp_min(6.103515625e-5)          # Mixtral: norm_w
        # Dispatch: sort the (token, slot) pairs by expert, run each expert on its contiguous
        # group (no padding), scale by the routing weight and scatter-add back in a fixed order.
        flat_ids = ids.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)
        counts = torch.bincount(flat_ids, minlength=c.n_expert).tolist()
        tok = order // c.n_expert_used
        groups = x.index_select(0, tok).split(counts)
        G, U, Dn = self.gate_exps.unbind(0), self.up_exps.unbind(0), self.down_exps.unbind(0)
        y = torch.cat([(F.silu(h @ G[e].t()) * (h @ U[e].t())) @ Dn[e].t()
                       for e, h in enumerate(groups)])
        y = y * w.reshape(-1)[order][:, None]
        out = x.new_zeros(x.shape).index_add(0, tok, y)
        return out, probs, ids

    def forward(self, x: torch.Tensor, pos: torch.Tensor):
        x = x + self.attention(rms_norm(x, self.attn_norm, self.cfg.rms_eps), pos)
        B, T, C = x.shape
        y, probs, ids = self.moe(rms_norm(x, self.ffn_norm, self.cfg.rms_eps).reshape(B * T, C))
        return x + y.view(B, T, C), probs, ids


class TinyMoE(nn.Module):
    def __init__(self, cfg: TinyMoEConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embd = nn.Embedding(cfg.n_vocab, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.output_norm = nn.Parameter(torch.ones(cfg.n_embd))
        self.output = nn.Linear(cfg.n_embd, cfg.n_vocab, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        std = 0.02
        resid = std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.tok_embd.weight, std=std)
        nn.init.normal_(self.output.weight, std=std)
        for b in self.blocks:
            for lin in (b.wq, b.wk, b.wv):
                nn.init.normal_(lin.weight, std=std)
            nn.init.normal_(b.wo.weight, std=resid)
            nn.init.normal_(b.gate_inp.weight, std=std)
            nn.init.normal_(b.gate_exps, std=std)
            nn.init.normal_(b.up_exps, std=std)
            nn.init.normal_(b.down_exps, std=resid)

    def forward(self, tokens: torch.Tensor, start_pos: int = 0):
        """tokens [B, T] -> logits [B, T, V], router probs per layer [B*T, E], ids per layer."""
        B, T = tokens.shape
        pos = torch.arange(start_pos, start_pos + T)
        x = self.tok_embd(tokens)
        all_probs, all_ids = [], []
        for b in self.blocks:
            x, probs, ids = b(x, pos)
            all_probs.append(probs)
            all_ids.append(ids)
        x = rms_norm(x, self.output_norm, self.cfg.rms_eps)
        return self.output(x), all_probs, all_ids


def load_balance_loss(probs: torch.Tensor, ids: torch.Tensor, n_expert: int) -> torch.Tensor:
    """Switch-Transformer auxiliary loss: E * sum_e f_e * P_e (1.0 when perfectly balanced)."""
    f = torch.bincount(ids.reshape(-1), minlength=n_expert).to(probs.dtype) / ids.numel()
    p = probs.mean(0)
    return n_expert * (f * p).sum()


# --------------------------------------------------------------------------------------------
# GGUF: tensor names, export, loading back (gguf-py dequantization) into the torch model
# --------------------------------------------------------------------------------------------

def gguf_tensors(model: TinyMoE) -> dict[str, np.ndarray]:
    """GGUF tensor name -> float32 numpy array in GGUF numpy order (reversed ne)."""
    t = {}

    def a(p):
        return p.detach().cpu().float().numpy().copy()
    t["token_embd.weight"] = a(model.tok_embd.weight)                     # ne [n_embd, n_vocab]
    for i, b in enumerate(model.blocks):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = a(b.attn_norm)
        t[p + "attn_q.weight"] = a(b.wq.weight)                           # ne [n_embd, n_embd]
        t[p + "attn_k.weight"] = a(b.wk.weight)                           # ne [n_embd, n_embd_gqa]
        t[p + "attn_v.weight"] = a(b.wv.weight)
        t[p + "attn_output.weight"] = a(b.wo.weight)
        t[p + "ffn_norm.weight"] = a(b.ffn_norm)
        t[p + "ffn_gate_inp.weight"] = a(b.gate_inp.weight)               # ne [n_embd, n_expert]
        t[p + "ffn_gate_exps.weight"] = a(b.gate_exps)                    # ne [n_embd, n_ff, E]
        t[p + "ffn_up_exps.weight"] = a(b.up_exps)                        # ne [n_embd, n_ff, E]
        t[p + "ffn_down_exps.weight"] = a(b.down_exps)                    # ne [n_ff, n_embd, E]
    t["output_norm.weight"] = a(model.output_norm)
    t["output.weight"] = a(model.output.weight)                           # ne [n_embd, n_vocab]
    return t


def export_gguf(model: TinyMoE, path: Path) -> Path:
    import gguf
    cfg = model.cfg
    bv = byte_vocab()
    assert cfg.n_vocab == bv.N_VOCAB, (cfg.n_vocab, bv.N_VOCAB)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from promoe_gguf.testing.spec import ModelSpec, model_tensors, write_metadata
    spec = ModelSpec(MODEL_NAME, "llama", n_layer=cfg.n_layers, n_embd=cfg.n_embd, n_vocab=cfg.n_vocab,
                     n_ctx=cfg.n_ctx, n_head=cfg.n_head, n_head_kv=cfg.n_head_kv, head_dim=cfg.head_dim,
                     n_expert=cfg.n_expert, n_used=cfg.n_expert_used, n_ff_exp=cfg.n_ff, n_ff=cfg.n_ff,
                     rms_eps=cfg.rms_eps, rope_base=cfg.rope_base)
    tensors = gguf_tensors(model)
    want = {t.name: t.ne for t in model_tensors(spec)}
    got = {name: tuple(reversed(arr.shape)) for name, arr in tensors.items()}
    assert got == want, f"the trained model's tensors are not the llama layout of testing/spec.py: {got} vs {want}"
    w = gguf.GGUFWriter(str(path), arch="llama")
    write_metadata(w, spec, file_type=gguf.LlamaFileType.ALL_F32)
    w.add_description("Tiny byte-level MoE (Mixtral layout) trained on Python stdlib sources; "
                      "promoe-gguf's embedded default model")
    for name, arr in tensors.items():
        w.add_tensor(name, arr.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def quantize_q4_k_m(src: Path, dst: Path, nthread: int = 2) -> Path:
    import llama_cpp
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    p.nthread = nthread
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed with {rc}")
    return dst


def gguf_field(reader, key):
    f = reader.fields[key]
    if f.types and f.types[0] == __import__("gguf").GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode()
    return f.parts[f.data[0]].tolist()[0]


def model_from_gguf(path: Path) -> TinyMoE:
    """The torch model with weights dequantized by gguf-py from a GGUF (any quant type)."""
    import gguf
    r = gguf.GGUFReader(str(path))
    cfg = TinyMoEConfig(
        n_vocab=int(gguf_field(r, "llama.vocab_size")),
        n_ctx=int(gguf_field(r, "llama.context_length")),
        n_embd=int(gguf_field(r, "llama.embedding_length")),
        n_layers=int(gguf_field(r, "llama.block_count")),
        n_head=int(gguf_field(r, "llama.attention.head_count")),
        n_head_kv=int(gguf_field(r, "llama.attention.head_count_kv")),
        n_ff=int(gguf_field(r, "llama.feed_forward_length")),
        n_expert=int(gguf_field(r, "llama.expert_count")),
        n_expert_used=int(gguf_field(r, "llama.expert_used_count")),
        rms_eps=float(gguf_field(r, "llama.attention.layer_norm_rms_epsilon")),
        rope_base=float(gguf_field(r, "llama.rope.freq_base")),
    )
    arrs = {}
    for t in r.tensors:
        shape = tuple(int(s) for s in reversed(list(t.shape)))
        a = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        arrs[t.name] = np.array(a.reshape(shape), dtype=np.float32, copy=True)
    model = TinyMoE(cfg)
    names = gguf_tensors(model)
    sd = {}
    with torch.no_grad():
        # map back through the same name table
        params = {
            "token_embd.weight": model.tok_embd.weight,
            "output_norm.weight": model.output_norm,
            "output.weight": model.output.weight,
        }
        for i, b in enumerate(model.blocks):
            p = f"blk.{i}."
            params.update({
                p + "attn_norm.weight": b.attn_norm, p + "attn_q.weight": b.wq.weight,
                p + "attn_k.weight": b.wk.weight, p + "attn_v.weight": b.wv.weight,
                p + "attn_output.weight": b.wo.weight, p + "ffn_norm.weight": b.ffn_norm,
                p + "ffn_gate_inp.weight": b.gate_inp.weight,
                p + "ffn_gate_exps.weight": b.gate_exps, p + "ffn_up_exps.weight": b.up_exps,
                p + "ffn_down_exps.weight": b.down_exps,
            })
        assert set(params) == set(names) == set(arrs), set(arrs) ^ set(params)
        for n, prm in params.items():
            prm.copy_(torch.from_numpy(arrs[n]).view(prm.shape))
    del sd
    model.eval()
    return model


# --------------------------------------------------------------------------------------------
# llama.cpp scoring
# --------------------------------------------------------------------------------------------

def open_llama(path: Path, n_ctx: int = 512, f32_kv: bool = False):
    from llama_cpp import Llama
    kw = {}
    if f32_kv:
        kw.update(type_k=0, type_v=0)  # GGML_TYPE_F32 KV cache (default is F16)
    return Llama(str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2,
                 n_threads_batch=2, **kw)


def llama_logits(llm, tokens) -> np.ndarray:
    llm.reset()
    llm.eval([int(t) for t in tokens])
    return np.array(llm.scores[:llm.n_tokens], dtype=np.float32)


def bits_of(logits: np.ndarray, tokens: np.ndarray) -> float:
    """Sum of -log2 p(tokens[i+1] | logits[i]) over i = 0..len-2."""
    lg = torch.from_numpy(np.asarray(logits[:-1], dtype=np.float64))
    lp = torch.log_softmax(lg, dim=-1)
    tgt = torch.from_numpy(np.asarray(tokens[1:], dtype=np.int64))
    return float(-lp.gather(1, tgt[:, None]).sum() / math.log(2))


def llama_bits_per_byte(path: Path, windows: list[np.ndarray], progress: bool = False):
    """(bits/byte, bytes scored) of llama.cpp on the given [BOS, bytes...] windows."""
    llm = open_llama(path, n_ctx=max(len(w) for w in windows))
    total_bits, total_bytes = 0.0, 0
    it = windows
    if progress:
        from tqdm import tqdm
        it = tqdm(windows, desc=f"llama.cpp bpb {Path(path).name}", unit="win")
    for w in it:
        total_bits += bits_of(llama_logits(llm, w), w)
        total_bytes += len(w) - 1
    del llm
    return total_bits / total_bytes, total_bytes


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@torch.no_grad()
def torch_logits(model: TinyMoE, tokens) -> np.ndarray:
    t = torch.as_tensor(np.asarray(tokens, dtype=np.int64))[None]
    return model(t)[0][0].numpy()


def verify_f32_against_llama_cpp(model: TinyMoE, f32_path: Path, n_windows: int = 3,
                                 n_tokens: int = 256) -> dict:
    """Relative L2 error of llama.cpp's logits on the F32 GGUF vs this torch model."""
    wins = [w[:n_tokens] for w in heldout_windows(512, max_windows=n_windows)]
    res = {}
    for f32_kv in (True, False):
        llm = open_llama(f32_path, n_ctx=512, f32_kv=f32_kv)
        errs = [rel_l2(llama_logits(llm, w), torch_logits(model, w)) for w in wins]
        del llm
        res["f32_kv" if f32_kv else "f16_kv"] = max(errs)
    res["n_windows"] = len(wins)
    res["n_tokens"] = n_tokens
    return res


# --------------------------------------------------------------------------------------------
# Routing statistics (torch model) and samples
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def routing_stats(model: TinyMoE, windows: list[np.ndarray]) -> dict:
    cfg = model.cfg
    E, L, k = cfg.n_expert, cfg.n_layers, cfg.n_expert_used
    counts = np.zeros((L, E), np.int64)
    consec = np.zeros(L)
    n_consec = 0
    adj = np.zeros(max(L - 1, 1))
    n_tok = 0
    for w in windows:
        _, _, ids = model(torch.as_tensor(w, dtype=torch.int64)[None])
        sets = []
        for l in range(L):
            oh = F.one_hot(ids[l], E).sum(1).numpy().astype(bool)          # [T, E]
            sets.append(oh)
            counts[l] += oh.sum(0)
            consec[l] += (oh[1:] & oh[:-1]).sum() / k
        for l in range(L - 1):
            adj[l] += (sets[l] & sets[l + 1]).sum() / k
        n_consec += len(w) - 1
        n_tok += len(w)
    p = counts / counts.sum(1, keepdims=True)
    ent = -(np.where(p > 0, p * np.log2(np.where(p > 0, p, 1)), 0)).sum(1)
    return {
        "tokens": int(n_tok),
        "expert_usage_entropy_bits": [round(float(x), 4) for x in ent],
        "expert_usage_entropy_max_bits": round(math.log2(E), 4),
        "expert_usage_fraction": [[round(float(x), 4) for x in row] for row in p],
        "consecutive_token_overlap": [round(float(x / n_consec), 4) for x in consec],
        "adjacent_layer_overlap": [round(float(x / n_tok), 4) for x in adj[:L - 1]],
        "overlap_chance_level": round(k / E, 4),
    }


def llama_samples(path: Path, prompts: list[str], n: int = 120, seed: int = 0) -> list[dict]:
    """Greedy and sampled continuations from llama.cpp on the GGUF (byte tokens)."""
    from llama_cpp import Llama
    bv = byte_vocab()
    llm = Llama(str(path), n_ctx=512, verbose=False, n_threads=2, n_threads_batch=2, seed=seed)
    out = []
    for prompt in prompts:
        toks = [bv.BOS_ID] + list(prompt.encode("utf-8"))
        row = {"prompt": prompt}
        for mode, kw in (("greedy", dict(temp=0.0, top_k=1)),
                         ("sampled", dict(temp=0.7, top_k=40, top_p=0.95))):
            llm.reset()
            llm.set_seed(seed)
            gen = []
            for t in llm.generate(toks, reset=True, repeat_penalty=1.0, **kw):
                if t == bv.EOS_ID or t >= 256:
                    break
                gen.append(t)
                if len(gen) >= n:
                    break
            row[mode] = bytes(gen).decode("utf-8", errors="replace")
        out.append(row)
    del llm
    return out


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def make_batch(stream: np.ndarray, rng: np.random.Generator, batch: int, n_ctx: int, bos: int):
    """Inputs [BOS, b0..b_{n-2}] and targets [b0..b_{n-1}] at random offsets of the stream."""
    offs = rng.integers(0, len(stream) - n_ctx, size=batch)
    x = np.empty((batch, n_ctx), np.int64)
    y = np.empty((batch, n_ctx), np.int64)
    for i, o in enumerate(offs):
        chunk = stream[o:o + n_ctx].astype(np.int64)
        x[i, 0] = bos
        x[i, 1:] = chunk[:-1]
        y[i] = chunk
    return torch.from_numpy(x), torch.from_numpy(y)


def lr_at(step: int, steps: int, peak: float, warmup: int, final_frac: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def torch_bits_per_byte(model: TinyMoE, windows: list[np.ndarray]) -> float:
    bits = 0.0
    n = 0
    for w in windows:
        bits += bits_of(torch_logits(model, w), w)
        n += len(w) - 1
    return bits / n


def save_ckpt(path: Path, model: TinyMoE, opt, step: int, elapsed: float, args, log):
    tmp = Path(str(path) + ".tmp")
    torch.save({"cfg": asdict(model.cfg), "model": model.state_dict(),
                "opt": opt.state_dict() if opt is not None else None,
                "step": step, "elapsed_s": elapsed, "args": vars(args), "log": log}, tmp)
    os.replace(tmp, path)


def load_ckpt(path: Path) -> tuple[TinyMoE, dict]:
    ck = torch.load(path, map_location="cpu", weights_only=False)
    model = TinyMoE(TinyMoEConfig(**ck["cfg"]))
    model.load_state_dict(ck["model"])
    model.eval()
    return model, ck


def train(args) -> tuple[TinyMoE, dict]:
    from tqdm import tqdm
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    rng = np.random.default_rng(SEED)
    bv = byte_vocab()
    cfg = TinyMoEConfig(n_vocab=bv.N_VOCAB, n_ff=args.n_ff, n_head_kv=args.n_head_kv)
    model = TinyMoE(cfg)
    stream = load_stream(train_files())
    val = heldout_windows(cfg.n_ctx, max_windows=args.val_windows)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {asdict(cfg)} params {n_params/1e6:.2f}M; train bytes {len(stream)}; "
          f"steps {args.steps} x batch {args.batch} x {cfg.n_ctx}", flush=True)
    log = []
    start = 0
    t_prev, c_prev = 0.0, 0.0
    ck_path = out / "ckpt.pt"
    if args.resume and ck_path.exists():
        # continue a run exactly: weights, optimizer state, step, and the batch RNG replayed
        ck = torch.load(ck_path, map_location="cpu", weights_only=False)
        assert ck["cfg"] == asdict(cfg), "checkpoint has another shape"
        assert all(ck["args"][k] == getattr(args, k) for k in
                   ("steps", "batch", "lr", "warmup", "wd", "aux")), "checkpoint has other args"
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        start, log = ck["step"], ck["log"]
        t_prev = ck["elapsed_s"]
        c_prev = log[-1].get("cpu_s", 0.0) if log else 0.0
        for _ in range(start):
            rng.integers(0, len(stream) - cfg.n_ctx, size=args.batch)
        print(f"resumed from {ck_path} at step {start}", flush=True)
    t0 = time.time() - t_prev
    c0 = time.process_time() - c_prev
    pbar = tqdm(range(start, args.steps), desc="train", unit="step", mininterval=5.0,
                initial=start, total=args.steps)
    for step in pbar:
        lr = lr_at(step, args.steps, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = make_batch(stream, rng, args.batch, cfg.n_ctx, bv.BOS_ID)
        model.train()
        logits, probs, ids = model(x)
        ce = F.cross_entropy(logits.reshape(-1, cfg.n_vocab), y.reshape(-1))
        aux = sum(load_balance_loss(p, i, cfg.n_expert) for p, i in zip(probs, ids)) / cfg.n_layers
        loss = ce + args.aux * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bpb = ce.item() / math.log(2)
        pbar.set_postfix(bpb=f"{bpb:.3f}", aux=f"{aux.item():.3f}", lr=f"{lr:.2e}")
        rec = {"step": step + 1, "train_bpb": round(bpb, 4), "aux": round(aux.item(), 4),
               "elapsed_s": round(time.time() - t0, 1),
               "cpu_s": round(time.process_time() - c0, 1)}
        last = step + 1 == args.steps
        if (step + 1) % args.eval_every == 0 or last:
            model.eval()
            rec["val_bpb"] = round(torch_bits_per_byte(model, val), 4)
            tqdm.write(f"step {step+1}: train {bpb:.3f} val {rec['val_bpb']:.3f} bits/byte "
                       f"aux {aux.item():.3f} ({time.time()-t0:.0f}s)")
        log.append(rec)
        if (step + 1) % args.ckpt_every == 0 or last or step + 1 == args.stop_after:
            save_ckpt(out / "ckpt.pt", model, opt, step + 1, time.time() - t0, args, log)
        if step + 1 == args.stop_after:
            print(f"stopped after step {step + 1} (--stop-after)", flush=True)
            sys.exit(0)
    elapsed = time.time() - t0
    model.eval()
    info = {"steps": args.steps, "train_seconds": round(elapsed, 1),
            "train_cpu_seconds": round(time.process_time() - c0, 1), "batch": args.batch,
            "lr": args.lr, "warmup": args.warmup, "weight_decay": args.wd, "aux_coef": args.aux,
            "seed": SEED, "tokens_seen": args.steps * args.batch * cfg.n_ctx,
            "train_bytes": int(len(stream)), "log": log}
    return model, info


def export_all(model: TinyMoE, out: Path, ship: bool) -> dict:
    out = Path(out)
    f32 = export_gguf(model, out / "default-moe-f32.gguf")
    ver = verify_f32_against_llama_cpp(model, f32)
    print(f"F32 GGUF vs torch: rel L2 {ver}", flush=True)
    dst = SHIPPED_GGUF if ship else out / "default-moe-q4_k_m.gguf"
    quantize_q4_k_m(f32, dst)
    size = dst.stat().st_size
    print(f"Q4_K_M: {dst} {size/1e6:.3f} MB", flush=True)
    return {"f32_path": f32, "q4_path": dst, "f32_vs_torch_rel_l2": ver, "q4_bytes": size}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=1400)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--aux", type=float, default=0.01, help="load-balancing loss coefficient")
    ap.add_argument("--n-ff", type=int, default=512)
    ap.add_argument("--n-head-kv", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--val-windows", type=int, default=16)
    ap.add_argument("--ckpt-every", type=int, default=50)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--no-ship", action="store_true",
                    help="write the Q4_K_M file under --out instead of promoe_gguf/data")
    ap.add_argument("--no-export", action="store_true")
    ap.add_argument("--eval-windows", type=int, default=0,
                    help="held-out windows llama.cpp scores at the end (default 0: all)")
    ap.add_argument("--stop-after", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--resume", action="store_true",
                    help="continue from OUT/ckpt.pt (same args; bitwise the same run)")
    ap.add_argument("--export-only", metavar="CKPT", help="skip training; export this checkpoint")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    if args.export_only:
        model, ck = load_ckpt(Path(args.export_only))
        info = {}
        a = ck["args"]
        info.update({"steps": ck["step"], "train_seconds": round(ck["elapsed_s"], 1),
                     "train_cpu_seconds": ck["log"][-1].get("cpu_s") if ck["log"] else None,
                     "batch": a["batch"], "lr": a["lr"], "warmup": a["warmup"],
                     "weight_decay": a["wd"], "aux_coef": a["aux"], "seed": SEED,
                     "tokens_seen": ck["step"] * a["batch"] * model.cfg.n_ctx,
                     "planned_steps": a["steps"], "log": ck["log"],
                     "train_bytes": int(len(load_stream(train_files())))})
    else:
        model, info = train(args)
    if args.no_export:
        return 0
    exp = export_all(model, Path(args.out), ship=not args.no_ship)
    with open(Path(args.out) / "train_info.json", "w") as fh:
        json.dump({**info, "f32_vs_torch_rel_l2": exp["f32_vs_torch_rel_l2"],
                   "cfg": asdict(model.cfg)}, fh, indent=1)
    # evaluation + model card
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from eval_default_model import run_eval  # scripts/eval_default_model.py
    run_eval(q4_path=exp["q4_path"], f32_path=exp["f32_path"],
             ckpt_info_path=Path(args.out) / "train_info.json",
             card_path=MODEL_CARD if not args.no_ship else Path(args.out) / "default-moe.json",
             ckpt_path=Path(args.export_only) if args.export_only else Path(args.out) / "ckpt.pt",
             windows=args.eval_windows or None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
