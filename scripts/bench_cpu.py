"""CPU speed of our torch forward next to llama.cpp's (llama-cpp-python), same GGUF, one run.

    python scripts/bench_cpu.py [--model M] [--prompt-tokens 128] [--tokens 64] [--threads 1]

Prefill: one fresh sequence of --prompt-tokens tokens; decode: --tokens greedy tokens through the
KV cache. Prints tokens/s for both and the ratio ours / llama.cpp. All experts resident (no cache):
this measures the forward pass, not the runtime.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from promoe_gguf import DEFAULT_MODEL, Engine
from promoe_gguf.util import quiet_stderr as quiet


def ours(model, prompt, n, threads):
    eng = Engine(model, n_threads=threads, n_batch=512)
    list(eng.generate(prompt[:8], max_tokens=2, temperature=0, ignore_eos=True))       # warm-up
    eng.timing.__init__()
    list(eng.generate(prompt, max_tokens=n + 1, temperature=0, ignore_eos=True))
    return eng.timing.rates()


def llama(model, prompt, n, threads):
    import llama_cpp
    with quiet():
        llm = llama_cpp.Llama(model, n_ctx=len(prompt) + n + 8, n_batch=512, n_threads=threads,
                              n_threads_batch=threads, verbose=False)
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
    return len(prompt) / (t1 - t0), n / (t2 - t1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    prompt = np.random.default_rng(0).integers(0, 256, args.prompt_tokens).tolist()
    torch.set_num_threads(args.threads)
    o_pp, o_tg = ours(args.model, prompt, args.tokens, args.threads)
    l_pp, l_tg = llama(args.model, prompt, args.tokens, args.threads)
    print(f"model {os.path.basename(args.model)}, CPU, {args.threads} thread(s), prefill {args.prompt_tokens} tokens, "
          f"decode {args.tokens} tokens")
    print(f"{'':10} {'prefill tok/s':>14} {'decode tok/s':>13}")
    print(f"{'promoe':10} {o_pp:>14.1f} {o_tg:>13.1f}")
    print(f"{'llama.cpp':10} {l_pp:>14.1f} {l_tg:>13.1f}")
    print(f"{'ratio':10} {o_pp / l_pp:>14.2f} {o_tg / l_tg:>13.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
