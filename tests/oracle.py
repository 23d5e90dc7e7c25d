"""Stock llama.cpp (llama-cpp-python, CPU) as the oracle for logits."""
from __future__ import annotations

import numpy as np

from promoe_gguf.util import quiet_stderr


_quiet = quiet_stderr


def load(path: str, n_ctx: int = 256):
    import llama_cpp
    with _quiet():
        # f32 KV cache (type 0): llama.cpp's default f16 cache would round K and V
        return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
                               type_k=0, type_v=0, n_threads=2, seed=0)


def logits(path: str, tokens, n_ctx: int = 256) -> np.ndarray:
    """Logits of every position for a fresh sequence: float32 [n_tokens, n_vocab]."""
    llm = load(path, n_ctx)
    with _quiet():
        llm.reset()
        llm.eval(list(map(int, tokens)))
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
