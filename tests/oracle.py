"""Stock llama.cpp (llama-cpp-python, CPU) as the oracle for logits."""
from __future__ import annotations

import contextlib

import numpy as np

from promoe_gguf.util import quiet_stderr


_quiet = quiet_stderr


@contextlib.contextmanager
def _plain_kernels():
    """Load models without llama.cpp's extra CPU buffer types (weight repacking): its reference
    kernels, which our CPU backend calls. With repacking (its default on AVX2), Q4_0, Q4_K and IQ4_NL
    weights run kernels that round differently (up to ~7e-2 relative L2 on small random models)."""
    import llama_cpp
    import llama_cpp.llama as L
    orig = L.llama_cpp.llama_model_default_params

    def params():
        p = orig()
        p.use_extra_bufts = False
        return p
    L.llama_cpp.llama_model_default_params = params
    try:
        yield
    finally:
        L.llama_cpp.llama_model_default_params = orig


def load(path: str, n_ctx: int = 256, n_batch: int | None = None, repack: bool = True):
    import llama_cpp
    n_batch = n_batch or n_ctx
    with _quiet(), (contextlib.nullcontext() if repack else _plain_kernels()):
        # f32 KV cache (type 0): llama.cpp's default f16 cache would round K and V
        return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, logits_all=True,
                               verbose=False, type_k=0, type_v=0, n_threads=2, seed=0)


def logits(path: str, tokens, n_ctx: int = 256, chunk: int | None = None, n_prefill: int | None = None,
           repack: bool = True) -> np.ndarray:
    """Logits of every position for a fresh sequence: float32 [n_tokens, n_vocab]. With `chunk`, the
    first n_prefill tokens go in batches of `chunk` and the rest one at a time (as our tests feed
    them), so both sides run the same kernels on the same batch shapes."""
    llm = load(path, n_ctx, chunk, repack)
    tokens = list(map(int, tokens))
    with _quiet():
        llm.reset()
        if chunk is None:
            llm.eval(tokens)
        else:
            llm.eval(tokens[:n_prefill])
            for t in tokens[n_prefill:]:
                llm.eval([t])
    return np.array(llm.scores[:llm.n_tokens], dtype=np.float32)


def greedy(path: str, prompt, n: int, n_ctx: int = 256) -> list[int]:
    """Greedy continuation of `prompt` by llama.cpp, token by token through its KV cache."""
    llm = load(path, n_ctx)
    out = []
    with _quiet():
        llm.reset()
        llm.eval(list(map(int, prompt)))
        for _ in range(n):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(tok)
            llm.eval([tok])
    return out


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
