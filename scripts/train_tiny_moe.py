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

The code lives in promoe_gguf/testing/tiny_moe/; its torch forward pass (model.py) is written to
match what llama.cpp computes for arch "llama" so that the F32 GGUF evaluates to the same logits in
llama.cpp (checked by `verify_f32_against_llama_cpp`, evaluate.py).
"""
from __future__ import annotations

import argparse
import sys

from promoe_gguf.testing.tiny_moe import DEFAULT_OUT, run


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
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
