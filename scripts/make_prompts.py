#!/usr/bin/env python
"""Prompts for routing traces, from the Python standard library's .py sources (the default model's corpus).

Training prompts come only from the files the default model trained on; evaluation prompts only from
its held-out files (promoe_gguf/testing/tiny_moe/corpus.py: `is_heldout`), so a predictor is
evaluated on text neither it nor the model has seen. Each prompt is a run of whole lines of about
--bytes UTF-8 bytes; the chunks are taken evenly spaced over the sorted files, so the output is
deterministic for a given Python installation.

    python scripts/make_prompts.py --out build/prompts.jsonl               # 720 train + 80 eval
    python scripts/make_prompts.py --train 20 --eval 4 --out /tmp/p.jsonl  # small

Output: JSON lines {"prompt": text, "split": "train"|"eval", "source": "relpath:first_line"}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from promoe_gguf.testing.tiny_moe.corpus import corpus_files, is_heldout, stdlib_dir


def _corpus():
    """(stdlib_dir, corpus_files, is_heldout) from promoe_gguf/testing/tiny_moe/corpus.py (one
    definition of the split)."""
    return stdlib_dir(), corpus_files(), is_heldout


def chunks(path: str, rel: str, n_bytes: int, min_bytes: int):
    """Runs of whole lines of about n_bytes (never more), with their first line number."""
    try:
        text = open(path, encoding="utf-8").read()
    except (UnicodeDecodeError, OSError):
        return
    cur, size, first = [], 0, 1
    for no, line in enumerate(text.splitlines(keepends=True), 1):
        b = len(line.encode("utf-8"))
        if b > n_bytes:                      # an over-long line ends the chunk and is skipped
            if size >= min_bytes:
                yield f"{rel}:{first}", "".join(cur)
            cur, size, first = [], 0, no + 1
            continue
        if size + b > n_bytes:
            if size >= min_bytes:
                yield f"{rel}:{first}", "".join(cur)
            cur, size, first = [], 0, no
        cur.append(line)
        size += b
    if size >= min_bytes:
        yield f"{rel}:{first}", "".join(cur)


def pick(files, base, n: int, n_bytes: int, min_bytes: int) -> list[tuple[str, str]]:
    allc = [c for rel in files for c in chunks(os.path.join(base, rel), rel, n_bytes, min_bytes)]
    if n >= len(allc):
        return allc
    step = len(allc) / n
    return [allc[int(i * step)] for i in range(n)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON lines file to write")
    ap.add_argument("--train", type=int, default=720, help="training prompts (from the model's training files)")
    ap.add_argument("--eval", type=int, default=80, help="evaluation prompts (from the held-out files)")
    ap.add_argument("--bytes", type=int, default=440, help="prompt length in UTF-8 bytes (at most)")
    args = ap.parse_args(argv)
    base, files, is_heldout = _corpus()
    train_files = [f for f in files if not is_heldout(f)]
    eval_files = [f for f in files if is_heldout(f)]
    min_bytes = args.bytes // 2
    train = pick(train_files, base, args.train, args.bytes, min_bytes)
    ev = pick(eval_files, base, args.eval, args.bytes, min_bytes)
    assert not {s.split(":")[0] for s, _ in train} & {s.split(":")[0] for s, _ in ev}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for split, items in (("train", train), ("eval", ev)):
            for src, text in items:
                f.write(json.dumps({"prompt": text, "split": split, "source": src}) + "\n")
    n_tr = sum(len(t.encode()) for _, t in train)
    n_ev = sum(len(t.encode()) for _, t in ev)
    print(f"wrote {out}: {len(train)} train prompts ({n_tr} bytes, {len(train_files)} files), "
          f"{len(ev)} eval prompts ({n_ev} bytes, {len(eval_files)} held-out files)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
