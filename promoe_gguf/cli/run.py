"""`promoe run [MODEL] -p TEXT -n N` and `promoe logits MODEL --tokens ... --out FILE.npy`."""
from __future__ import annotations

import json
import os
import sys
import tempfile

import numpy as np

from ..errors import ModelError, clip
from ..util import cannot_write, output_folder
from .flags import add_cache_flags, add_sampling_flags, engine_from_args, sampling_args, setting


def run(args) -> int:
    if not args.prompt:
        raise ModelError("-p: the prompt is empty")
    # argv is bytes: a prompt that is not UTF-8 reaches us with its bytes escaped (PEP 383); the
    # tokenizer reads UTF-8 (llama.cpp would silently replace the bad bytes), so it is refused
    prompt = os.fsencode(args.prompt)
    try:
        prompt.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ModelError(f"-p: the prompt is not UTF-8: byte 0x{prompt[e.start]:02x} at byte {e.start} "
                         "(the tokenizer reads UTF-8 text)") from None
    eng = engine_from_args(args)
    try:
        out = sys.stdout
        import codecs
        dec = codecs.getincrementaldecoder("utf-8")("replace")
        if args.echo:
            out.write(prompt.decode("utf-8", errors="replace"))
        generated = 0
        for tok in eng.generate(prompt, max_tokens=args.n, stop=args.stop, **sampling_args(args)):
            generated += 1
            out.write(dec.decode(eng.tokenizer.decode([tok])))
            out.flush()
        out.write(dec.decode(b"", final=True) + "\n")
    except BaseException:
        eng.close()
        raise
    pp, tg = eng.timing.rates()
    # the first token comes from the prefill; each later one from a decode step (one forward pass)
    print(f"generated {generated} tokens: prefill {eng.timing.prefill_tokens} tokens at {pp:.1f} tokens/s, "
          f"{eng.timing.decode_tokens} decode steps at {tg:.1f} tokens/s", file=sys.stderr)
    if args.stats_json:
        print(json.dumps(eng.stats, indent=1, default=float), file=sys.stderr)
    elif args.stats:
        from .stats_table import format_stats
        print(format_stats(eng.stats), file=sys.stderr)
    eng.close()
    return 0


def logits(args) -> int:
    try:
        tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    except ValueError:
        raise ModelError(f"--tokens {clip(args.tokens)} is not a comma-separated list of integers") from None
    what = f"--out {args.out}"
    folder = output_folder(args.out, what)               # before the model loads
    eng = engine_from_args(args)
    try:
        arr = eng.logits(tokens)
    finally:
        eng.close()
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".promoe-", suffix=".npy")  # atomic: no half-written file
        with os.fdopen(fd, "wb") as f:
            np.save(f, arr)
        os.replace(tmp, args.out)
    except OSError as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise cannot_write(e, what) from None
    print(f"wrote {args.out}: logits {arr.shape[0]} x {arr.shape[1]}")
    return 0


def add_parsers(sub) -> None:
    s = sub.add_parser("run", help="generate text (default model when MODEL is omitted)")
    s.add_argument("model", nargs="?", default=None, help="GGUF file or cache directory")
    s.add_argument("-p", "--prompt", required=True)
    s.add_argument("-n", type=setting("max_tokens"), default=128, help="tokens to generate, >= 1")
    add_sampling_flags(s)
    s.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    s.add_argument("--echo", action="store_true", help="print the prompt first")
    s.add_argument("--stats", action="store_true", help="print a table of cache statistics after the run")
    s.add_argument("--stats-json", action="store_true", help="print the statistics as JSON instead")
    add_cache_flags(s)
    s.set_defaults(func=run)

    s = sub.add_parser("logits", help="logits of a token sequence, saved as .npy [n_tokens, n_vocab]")
    s.add_argument("model")
    s.add_argument("--tokens", required=True, help="comma-separated token ids")
    s.add_argument("--out", required=True, help="output .npy file")
    add_cache_flags(s)
    s.set_defaults(func=logits)
