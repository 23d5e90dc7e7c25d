"""Evaluating the default model: llama.cpp's logits and bits per byte on GGUF files, the F32 GGUF
checked against the torch model, routing statistics, samples, and the model card (`run_eval`)."""
from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...format import byte_vocab
from .corpus import (HELDOUT_MODULUS, MODEL_CARD, MODEL_NAME, SHIPPED_GGUF, corpus_files,
                     heldout_files, heldout_windows)
from .model import TinyMoE, load_ckpt, model_from_gguf, torch_logits


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

@torch.no_grad()
def torch_bits_per_byte(model: TinyMoE, windows: list[np.ndarray]) -> float:
    bits = 0.0
    n = 0
    for w in windows:
        bits += bits_of(torch_logits(model, w), w)
        n += len(w) - 1
    return bits / n


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
    bv = byte_vocab
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
# The model card
# --------------------------------------------------------------------------------------------

PROMPTS = ["def ", "import os\n", "class ", "    for i in range(", "if __name__ == "]


def run_eval(q4_path: Path = SHIPPED_GGUF, f32_path: Path | None = None,
             ckpt_info_path: Path | None = None, card_path: Path | None = MODEL_CARD,
             windows: int | None = None, routing_windows: int = 64,
             ckpt_path: Path | None = None) -> dict:
    torch.set_num_threads(2)
    q4_path = Path(q4_path)
    wins = heldout_windows(512, max_windows=windows)
    n_all = len(heldout_windows(512))
    t0 = time.time()
    bpb_q4, nbytes = llama_bits_per_byte(q4_path, wins, progress=True)
    t_q4 = time.time() - t0
    print(f"llama.cpp Q4_K_M held-out: {bpb_q4:.4f} bits/byte over {nbytes} bytes "
          f"({len(wins)} windows, {t_q4:.0f}s)", flush=True)
    bpb_f32 = None
    if f32_path is not None and Path(f32_path).exists():
        bpb_f32, nb = llama_bits_per_byte(Path(f32_path), wins, progress=True)
        assert nb == nbytes
        print(f"llama.cpp F32 held-out:    {bpb_f32:.4f} bits/byte over {nb} bytes", flush=True)

    # routing statistics: the trained torch model (checkpoint, else the F32 GGUF's exact weights)
    if ckpt_path is not None and Path(ckpt_path).exists():
        model, _ = load_ckpt(Path(ckpt_path))
        routing_src = f"torch model, checkpoint {Path(ckpt_path).name}"
    elif f32_path is not None and Path(f32_path).exists():
        model = model_from_gguf(Path(f32_path))
        routing_src = "torch model on the F32 GGUF's weights"
    else:
        model = model_from_gguf(q4_path)
        routing_src = "torch model on the Q4_K_M GGUF's weights (gguf-py dequantized)"
    rwins = heldout_windows(512, max_windows=routing_windows)
    routing = routing_stats(model, rwins)
    routing["source"] = routing_src
    q4_model = model_from_gguf(q4_path)
    routing_q4 = routing_stats(q4_model, rwins)
    torch_bpb_q4_dequant = torch_bits_per_byte(q4_model, rwins)
    print("routing (torch, held-out):", json.dumps({k: routing[k] for k in (
        "expert_usage_entropy_bits", "consecutive_token_overlap", "adjacent_layer_overlap")}))

    samples = llama_samples(q4_path, PROMPTS, n=160)
    for s in samples:
        print(f"--- prompt {s['prompt']!r}\n[greedy]  {s['prompt']}{s['greedy']}\n"
              f"[sampled] {s['prompt']}{s['sampled']}")

    info = {}
    if ckpt_info_path is not None and Path(ckpt_info_path).exists():
        info = json.loads(Path(ckpt_info_path).read_text())
    cfg = q4_model.cfg
    card = {
        "name": MODEL_NAME,
        "file": q4_path.name,
        "file_bytes": q4_path.stat().st_size,
        "quantization": "Q4_K_M (llama.cpp llama_model_quantize, ftype 15)",
        "arch": "llama (Mixtral layout: MoE FFN, softmax top-k routing, renormalized weights)",
        "shape": {
            "n_vocab": cfg.n_vocab, "n_ctx": cfg.n_ctx, "n_embd": cfg.n_embd,
            "n_layers": cfg.n_layers, "n_head": cfg.n_head, "n_head_kv": cfg.n_head_kv,
            "head_dim": cfg.head_dim, "n_ff_expert": cfg.n_ff, "n_expert": cfg.n_expert,
            "n_expert_used": cfg.n_expert_used, "rms_eps": cfg.rms_eps,
            "rope": "NORM (adjacent pairs)", "rope_base": cfg.rope_base,
            "params": int(sum(p.numel() for p in q4_model.parameters())),
        },
        "tokenizer": "bytes: token id b (0..255) is raw byte b; BOS 256, EOS 257, UNK 258, PAD 259 "
                     "(promoe_gguf/format/byte_vocab.py)",
        "corpus": {
            "source": "Python standard library .py sources (os.path.dirname(os.__file__)), "
                      "excluding site-packages and test directories",
            "python": platform.python_version(),
            "files": len(corpus_files()),
            "heldout_rule": f"sha256(relative path)[:8] little-endian % {HELDOUT_MODULUS} == 0",
            "heldout_files": len(heldout_files()),
            "train_bytes": info.get("train_bytes"),
        },
        "training": {k: info.get(k) for k in (
            "steps", "batch", "tokens_seen", "train_seconds", "train_cpu_seconds", "lr", "warmup",
            "weight_decay", "aux_coef", "seed")} | {
            "time_note": "train_seconds is wall time on a 2-core machine shared with other jobs; "
                         "train_cpu_seconds is the training process's CPU time (2 threads)",
            "seq_len": 512, "optimizer": "AdamW (0.9, 0.95), cosine LR to 10%, grad clip 1.0",
            "loss": "cross-entropy + aux * Switch load-balancing loss (mean over layers)",
            "threads": 2, "device": "CPU fp32",
            "final_val_bpb_torch": next((r.get("val_bpb") for r in reversed(info.get("log", []))
                                         if "val_bpb" in r), None),
        },
        "eval": {
            "heldout_windows": len(wins),
            "heldout_windows_total": n_all,
            "window_tokens": 512,
            "heldout_bytes_scored": nbytes,
            "bits_per_byte_llama_cpp_q4_k_m": round(bpb_q4, 4),
            "bits_per_byte_llama_cpp_f32": None if bpb_f32 is None else round(bpb_f32, 4),
            "bits_per_byte_torch_q4_dequant_routing_windows": round(torch_bpb_q4_dequant, 4),
            "f32_gguf_vs_torch_logits_rel_l2": info.get("f32_vs_torch_rel_l2"),
        },
        "routing": routing,
        "routing_q4_dequant": {k: routing_q4[k] for k in (
            "expert_usage_entropy_bits", "consecutive_token_overlap", "adjacent_layer_overlap")},
        "samples": samples,
        "samples_note": "llama.cpp on the Q4_K_M file, 160 bytes; greedy = top_k 1, "
                        "sampled = temp 0.7, top_k 40, top_p 0.95, seed 0",
    }
    if card_path is not None:
        Path(card_path).parent.mkdir(parents=True, exist_ok=True)
        Path(card_path).write_text(json.dumps(card, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {card_path}")
    return card

