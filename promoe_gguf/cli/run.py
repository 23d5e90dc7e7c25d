"""`promoe run [MODEL] -p TEXT -n N` and `promoe logits MODEL --tokens ... --out FILE.npy`."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

from ..errors import ModelError


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (0 threads or a 0-token batch is a usage error, not a crash)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} must be >= 1")
    return n


def add_cache_flags(p) -> None:
    """The cache flags every model-running command shares."""
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--cache-rate", type=float, default=None, help="fraction of routed experts the GPU cache holds")
    p.add_argument("--cache-mem", default=None, help="GPU cache budget in bytes (suffixes K, M, G)")
    p.add_argument("--policy", default="lru", choices=("lru", "static", "promoe"))
    p.add_argument("--predictor", default="none", help="none | gate | mlp:PATH | history[:TRACE] | freq[:TRACE]")
    p.add_argument("--cpu-experts", default="auto", choices=("auto", "off", "all"),
                   help="with an expert cache: compute misses on the CPU when the cost model says it is faster "
                        "than copying them (auto), always (all), or copy every miss (off)")
    p.add_argument("--cpu-threads", type=int, default=None, help="ggml threads of the CPU expert pool")
    p.add_argument("--gpu-mem", default=None,
                   help="device memory to use (suffixes K, M, G): the expert cache gets what residents, KV cache "
                        "and workspace leave (CUDA default: free memory minus a margin)")
    p.add_argument("--link", default=None,
                   help="CPU emulation of the host-to-device link: '25GB/s' or 'ratio=10' (copy of one expert "
                        "takes 10x one layer's decode compute)")
    p.add_argument("--n-ctx", type=positive_int, default=None, help="context length (KV cache size)")
    p.add_argument("--n-batch", type=positive_int, default=64, help="prefill chunk size")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="CPU threads of ggml and torch (default 1: the tiny default model decodes fastest on one)")
    p.add_argument("--check-numerics", action="store_true",
                   help="check every layer's blocks for NaN/inf and name the first that produced one "
                        "(the logits are always checked; decoding then runs eagerly)")
    p.add_argument("--no-graphs", action="store_true",
                   help="CUDA: decode every step eagerly instead of replaying it as recorded device graphs "
                        "(the same kernels, bitwise the same logits)")
    p.add_argument("--activations", default=None, choices=("q8", "f32"),
                   help="CUDA: 8-bit activations and dp4a as llama.cpp's kernels (q8, default) or exact fp32")
    p.add_argument("--kv-type", default=None, choices=("f16", "f32"),
                   help="CUDA: KV cache element type (default f16, as llama.cpp's)")


def add_sampling_flags(p, repeat_penalty: float = 1.0) -> None:
    """llama.cpp's sampling flags and defaults (temp 0.8, top-k 40, top-p 0.95, min-p 0.05)."""
    p.add_argument("--temp", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", type=float, default=repeat_penalty)
    p.add_argument("--seed", type=int, default=None)


def parse_mem(text, flag: str = "--cache-mem"):
    if text is None:
        return None
    t = str(text).strip().upper().rstrip("B")
    mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise ModelError(f"{flag} {text!r} is not a size (e.g. 512M, 8G)") from None


def engine_from_args(args, model=None):
    from ..engine import Engine
    if args.no_graphs and args.device == "cpu":
        import logging
        logging.getLogger("promoe").warning("--no-graphs: the CPU backend records no device graphs; every step "
                                            "runs eagerly anyway")
    if args.predictor == "oracle":
        raise ModelError("--predictor oracle replays a recorded routing of the same prompt: it exists for "
                         "benchmarks (Python API, routes=...), not the command line")
    return Engine(model if model is not None else args.model, device=args.device, cache_rate=args.cache_rate,
                  cache_mem=parse_mem(args.cache_mem), gpu_mem=parse_mem(args.gpu_mem, "--gpu-mem"),
                  policy=args.policy, predictor=args.predictor, link=args.link, n_ctx=args.n_ctx,
                  n_batch=args.n_batch, n_threads=args.threads, cpu_experts=args.cpu_experts,
                  cpu_threads=args.cpu_threads, check_numerics=args.check_numerics, graphs=not args.no_graphs,
                  activations=args.activations, kv_type=args.kv_type)


def run(args) -> int:
    if not args.prompt:
        raise ModelError("empty prompt (-p TEXT)")
    eng = engine_from_args(args)
    out = sys.stdout
    import codecs
    dec = codecs.getincrementaldecoder("utf-8")("replace")
    if args.echo:
        out.write(args.prompt)
    for tok in eng.generate(args.prompt, max_tokens=args.n, temperature=args.temp, top_k=args.top_k,
                            top_p=args.top_p, min_p=args.min_p, repeat_penalty=args.repeat_penalty,
                            seed=args.seed, stop=args.stop):
        out.write(dec.decode(eng.tokenizer.decode([tok])))
        out.flush()
    out.write(dec.decode(b"", final=True) + "\n")
    pp, tg = eng.timing.rates()
    print(f"prefill {eng.timing.prefill_tokens} tokens at {pp:.1f} tokens/s, decode {eng.timing.decode_tokens} "
          f"tokens at {tg:.1f} tokens/s", file=sys.stderr)
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
        raise ModelError(f"--tokens {args.tokens!r} is not a comma-separated list of integers") from None
    eng = engine_from_args(args)
    arr = eng.logits(tokens)
    out = os.path.abspath(args.out)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(out), suffix=".npy")  # atomic: no half-written file
    with os.fdopen(fd, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, out)
    print(f"wrote {out}: logits {arr.shape[0]} x {arr.shape[1]}")
    eng.close()
    return 0


def add_parsers(sub) -> None:
    s = sub.add_parser("run", help="generate text (default model when MODEL is omitted)")
    s.add_argument("model", nargs="?", default=None, help="GGUF file or cache directory")
    s.add_argument("-p", "--prompt", required=True)
    s.add_argument("-n", type=int, default=128, help="tokens to generate")
    add_sampling_flags(s, repeat_penalty=1.1)
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
