"""Training the default model on CPU, deterministically (fixed seeds, fixed step count, 2 threads):
batches, learning-rate schedule, checkpoints, the loop itself, and the export of the result to GGUF
(F32, checked against llama.cpp, then Q4_K_M). `run` is what scripts/train_tiny_moe.py runs."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...format import byte_vocab
from .corpus import MODEL_CARD, SEED, SHIPPED_GGUF, heldout_windows, load_stream, train_files
from .evaluate import run_eval, torch_bits_per_byte, verify_f32_against_llama_cpp
from .model import TinyMoE, TinyMoEConfig, export_gguf, load_balance_loss, load_ckpt, quantize_q4_k_m


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


def save_ckpt(path: Path, model: TinyMoE, opt, step: int, elapsed: float, args, log):
    tmp = Path(str(path) + ".tmp")
    torch.save({"cfg": asdict(model.cfg), "model": model.state_dict(),
                "opt": opt.state_dict() if opt is not None else None,
                "step": step, "elapsed_s": elapsed, "args": vars(args), "log": log}, tmp)
    os.replace(tmp, path)


def train(args) -> tuple[TinyMoE, dict]:
    from tqdm import tqdm
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    rng = np.random.default_rng(SEED)
    bv = byte_vocab
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


def run(args) -> int:
    """Train (or load `args.export_only`), export, quantize, evaluate and write the model card, as
    scripts/train_tiny_moe.py's arguments say."""
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
    run_eval(q4_path=exp["q4_path"], f32_path=exp["f32_path"],
             ckpt_info_path=Path(args.out) / "train_info.json",
             card_path=MODEL_CARD if not args.no_ship else Path(args.out) / "default-moe.json",
             ckpt_path=Path(args.export_only) if args.export_only else Path(args.out) / "ckpt.pt",
             windows=args.eval_windows or None)
    return 0

