"""Our CPU forward pass against stock llama.cpp, for every architecture and quant type the factory makes.

The CPU backend computes with llama.cpp's own kernels (ggml), so it is checked against llama.cpp's
native quantized run fed the same batches (three 16-token prefill chunks, then 16 single-token
decode steps, F32 KV cache): <= 1e-5 relative L2 of the whole logit matrix, bitwise equal on almost
every model. As llama.cpp does by default on AVX2 CPUs, an all-resident CPU engine repacks Q4_0, Q4_K,
IQ4_NL... weights (CPU_REPACK) into kernels that round differently from the reference ones; with
cpu_repack=False it matches llama.cpp loaded without that buffer type. The CUDA path keeps fp32
activations and has its own oracle, the dequantized twin (tests/test_cuda_path.py).
"""
import numpy as np
import pytest
import torch

import oracle
from promoe_gguf import Engine

N_PREFILL, CHUNK, N_DECODE = 48, 16, 16   # 64 tokens: three prefill chunks, then 16 decode steps


def our_logits(path, tokens, repack: bool = True):
    """Prefill N_PREFILL tokens in chunks of CHUNK, then decode the rest one at a time."""
    eng = Engine(path, n_ctx=256, cpu_repack=repack)
    cache = eng.decoder.new_cache(256)
    out = [eng.decoder.forward(torch.tensor(tokens[i:i + CHUNK]), cache) for i in range(0, N_PREFILL, CHUNK)]
    out += [eng.decoder.forward(torch.tensor([t]), cache) for t in tokens[N_PREFILL:]]
    return torch.cat(out).numpy()


def _tokens(seed=0):
    return np.random.default_rng(seed).integers(0, 256, N_PREFILL + N_DECODE).tolist()


def parity_cases(models):
    return sorted(k for k in models if k[2] != "legacy")      # llama.cpp no longer loads legacy files


NATIVE_BOUND = 1e-5


def test_parity_all(test_models):
    """One test over the whole matrix so a failure report lists every (arch, quant) that is off."""
    tokens = _tokens()
    bad, rows = [], []
    for key in parity_cases(test_models):
        path = test_models[key]
        ours = our_logits(path, tokens)
        assert np.isfinite(ours).all(), key
        native = oracle.rel_l2(ours, oracle.logits(path, tokens, chunk=CHUNK, n_prefill=N_PREFILL))
        rows.append((key, native))
        if native > NATIVE_BOUND:
            bad.append((key, native))
    for key, a in rows:
        print(f"{'/'.join(key):<32} native {a:.2e}")
    print(f"bitwise equal to llama.cpp on {sum(a == 0 for _, a in rows)} of {len(rows)} models")
    assert not bad, bad
    archs = {k[0] for k, _ in rows}
    assert len(archs) >= 8, f"parity covered only {archs}"


def test_parity_without_repacking(test_models):
    """cpu_repack=False against llama.cpp without CPU_REPACK buffers: the reference kernels, which an
    engine with an expert cache also runs; one model per quant type, and the MLA/merged layouts."""
    tokens = _tokens()
    bad = []
    keys = [k for k in parity_cases(test_models) if k[0] == "llama"] + \
        [("deepseek2", "Q4_K_M", "default"), ("deepseek2", "Q4_K_M", "merged"), ("qwen2moe", "Q4_0", "default")]
    for key in keys:
        path = test_models[key]
        err = oracle.rel_l2(our_logits(path, tokens, repack=False),
                            oracle.logits(path, tokens, chunk=CHUNK, n_prefill=N_PREFILL, repack=False))
        print(f"{'/'.join(key):<32} reference kernels {err:.2e}")
        if err > NATIVE_BOUND:
            bad.append((key, err))
    assert not bad, bad


@pytest.mark.parametrize("arch", ["llama", "qwen2moe", "qwen3moe", "olmoe", "deepseek", "deepseek2", "granitemoe",
                                  "glm4moe", "gpt-oss", "qwen35moe"])
def test_greedy_generation_matches(test_models, arch):
    key = (arch, "F32", "default")
    if key not in test_models:
        pytest.fail(f"factory made no {key}")
    prompt = _tokens(1)[:16]
    want = oracle.greedy(test_models[key], prompt, 32)
    eng = Engine(test_models[key], n_ctx=256)
    if eng.tokenizer.eos_id in want:  # we stop at end-of-sequence; the oracle loop does not
        want = want[:want.index(eng.tokenizer.eos_id)]
    got = list(eng.generate(prompt, max_tokens=32, temperature=0))
    assert got == want
