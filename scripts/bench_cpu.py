"""CPU speed of our forward pass next to llama.cpp's (llama-cpp-python), same GGUF, same threads, one run.

    python scripts/bench_cpu.py [--models default,mixtral] [--prompt-tokens 128] [--tokens 64] [--threads 1]
                                [--out bench/results/cpu]

Models: the embedded default model, and a Mixtral-shaped one (d 2048, expert FF 7168, 8 experts
top-2, 4 layers, Q4_K_M by llama.cpp's quantizer; scripts/make_test_model.py builds and caches it).
Prefill: one fresh sequence of --prompt-tokens tokens in one batch; decode: --tokens greedy tokens
through the KV cache. Both sides are timed alternately, best of --repeats. All experts resident.
Besides tokens/s and the ratio ours / llama.cpp it reports, for our decode, the share of time spent
inside ggml's kernels (the rest is Python and torch between them) and ggml calls per token.
Writes OUT/cpu_bench.json and OUT/cpu_bench.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent

from promoe_gguf import DEFAULT_MODEL, Engine  # noqa: E402
from promoe_gguf.util import quiet_stderr as quiet  # noqa: E402


def model_path(name: str) -> str:
    if name == "default":
        return DEFAULT_MODEL
    if name == "mixtral":
        from promoe_gguf.testing import factory
        return str(factory.make_mixtral_shaped(os.environ.get("PROMOE_TEST_MODELS", REPO / ".test-models")))
    return name


def ours(path, prompt, n, threads):
    eng = Engine(path, n_threads=threads, n_batch=len(prompt), n_ctx=len(prompt) + n + 8)
    list(eng.generate(prompt[:8], max_tokens=2, temperature=0, ignore_eos=True))             # warm-up
    eng.timing.reset()
    t0 = time.perf_counter()
    gen = eng.generate(prompt, max_tokens=n + 1, temperature=0, ignore_eos=True)
    next(gen)
    t1 = time.perf_counter()
    calls0, ggml0 = eng.backend.launches, eng.backend.compute_s
    for _ in gen:
        pass
    t2 = time.perf_counter()
    eng.close()
    return {"prefill_tok_s": len(prompt) / (t1 - t0), "decode_tok_s": n / (t2 - t1),
            "decode_ggml_share": (eng.backend.compute_s - ggml0) / (t2 - t1), "ggml_calls_per_token": (eng.backend.launches - calls0) / n}


def llama(path, prompt, n, threads):
    import llama_cpp
    with quiet():
        llm = llama_cpp.Llama(path, n_ctx=len(prompt) + n + 8, n_batch=len(prompt), n_ubatch=len(prompt),
                              n_threads=threads, n_threads_batch=threads, verbose=False)
        llm.eval(prompt[:8])
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        for _ in range(n):
            logits = llm._ctx.get_logits()   # last position only (logits_all=False)
            tok = int(np.argmax(np.ctypeslib.as_array(logits, shape=(llm.n_vocab(),))))
            llm.eval([tok])
        t2 = time.perf_counter()
    return {"prefill_tok_s": len(prompt) / (t1 - t0), "decode_tok_s": n / (t2 - t1)}


def best(runs: list[dict]) -> dict:
    return {k: max(r[k] for r in runs) if k.endswith("tok_s") else float(np.median([r[k] for r in runs]))
            for k in runs[0]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="default,mixtral")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "cpu"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    prompt = np.random.default_rng(0).integers(0, 256, args.prompt_tokens).tolist()
    rows = []
    for name in args.models.split(","):
        path = model_path(name)
        o, ll = [], []
        for _ in range(args.repeats):                   # alternate, so both see the same machine load
            o.append(ours(path, prompt, args.tokens, args.threads))
            ll.append(llama(path, prompt, args.tokens, args.threads))
        o, ll = best(o), best(ll)
        rows.append({"model": name, "path": os.path.basename(path), "ours": o, "llama_cpp": ll,
                     "prefill_ratio": o["prefill_tok_s"] / ll["prefill_tok_s"],
                     "decode_ratio": o["decode_tok_s"] / ll["decode_tok_s"]})
        print(f"{name}: prefill {o['prefill_tok_s']:.1f} vs {ll['prefill_tok_s']:.1f} tok/s ({rows[-1]['prefill_ratio']:.2f}x), "
              f"decode {o['decode_tok_s']:.1f} vs {ll['decode_tok_s']:.1f} tok/s ({rows[-1]['decode_ratio']:.2f}x); "
              f"ggml share of our decode {o['decode_ggml_share']:.0%}", flush=True)
    res = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "threads": args.threads, "prompt_tokens": args.prompt_tokens, "decode_tokens": args.tokens,
           "repeats": args.repeats, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu_bench.json").write_text(json.dumps(res, indent=1))
    L = [f"# CPU: promoe-gguf vs llama.cpp (llama-cpp-python 0.3.35, default settings), {res['date']}", "",
         f"{res['cpus']}-core machine, {args.threads} thread(s) each, prefill {args.prompt_tokens} tokens in one batch, "
         f"decode {args.tokens} greedy tokens; best of {args.repeats} alternating runs; all experts resident.", "",
         "| model | prefill tok/s ours | llama.cpp | ratio | decode tok/s ours | llama.cpp | ratio | ggml share of our decode | ggml calls / token |",
         "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        o, ll = r["ours"], r["llama_cpp"]
        L.append(f"| {r['model']} | {o['prefill_tok_s']:.1f} | {ll['prefill_tok_s']:.1f} | {r['prefill_ratio']:.2f} | "
                 f"{o['decode_tok_s']:.1f} | {ll['decode_tok_s']:.1f} | {r['decode_ratio']:.2f} | {o['decode_ggml_share']:.0%} | "
                 f"{o['ggml_calls_per_token']:.0f} |")
    (out / "cpu_bench.md").write_text("\n".join(L) + "\n")
    print(f"wrote {out / 'cpu_bench.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
