"""Our forward pass against stock llama.cpp, for every architecture and quant type the factory makes.

Quantized models are checked twice (see README, "How close to llama.cpp"): against llama.cpp on the
dequantized twin (exact arithmetic on the same weights: <= 1e-3) and against llama.cpp's native
quantized run (it rounds activations to 8 bits: <= 5e-2). Sequences run several prefill chunks,
then single-token decode steps through the KV cache.
"""
import os

import numpy as np
import pytest
import torch

import oracle
from promoe_gguf import Engine

N_PREFILL, CHUNK, N_DECODE = 48, 16, 16   # 64 tokens: three prefill chunks, then 16 decode steps
FLOAT = ("F32", "F16")          # llama.cpp's arithmetic on these is exact float (BF16 rounds activations)
NATIVE_UNCHECKED = {"v3"}       # sigmoid + group-limited routing: 8-bit activations flip expert choices


def our_logits(path, tokens):
    """Prefill N_PREFILL tokens in chunks of CHUNK, then decode the rest one at a time."""
    eng = Engine(path, n_ctx=256)
    cache = eng.decoder.new_cache(256)
    out = [eng.decoder.forward(torch.tensor(tokens[i:i + CHUNK]), cache) for i in range(0, N_PREFILL, CHUNK)]
    out += [eng.decoder.forward(torch.tensor([t]), cache) for t in tokens[N_PREFILL:]]
    return torch.cat(out).numpy()


def _tokens(seed=0):
    return np.random.default_rng(seed).integers(0, 256, N_PREFILL + N_DECODE).tolist()


def _twin(factory, path):
    twin = path[:-len(".gguf")] + ".twin-f32.gguf"
    if not os.path.exists(twin):
        factory.dequantized_twin(path, twin)
    return twin


def parity_cases(models):
    return sorted(k for k in models if k[2] != "legacy")      # llama.cpp no longer loads legacy files


def test_parity_all(test_models, factory):
    """One test over the whole matrix so a failure report lists every (arch, quant) that is off."""
    tokens = _tokens()
    bad, rows = [], []
    for key in parity_cases(test_models):
        arch, quant, variant = key
        path = test_models[key]
        ours = our_logits(path, tokens)
        assert np.isfinite(ours).all(), key
        if quant in FLOAT:
            err = oracle.rel_l2(ours, oracle.logits(path, tokens))
            rows.append((key, err, None))
            if err > 1e-3:
                bad.append((key, "float", err))
            continue
        exact = oracle.rel_l2(ours, oracle.logits(_twin(factory, path), tokens))
        native = oracle.rel_l2(ours, oracle.logits(path, tokens))
        rows.append((key, exact, native))
        if exact > 1e-3:
            bad.append((key, "twin", exact))
        if native > 5e-2 and variant not in NATIVE_UNCHECKED:
            bad.append((key, "native", native))
    for key, a, b in rows:
        print(f"{'/'.join(key):<32} exact {a:.2e}" + (f"  native {b:.2e}" if b is not None else ""))
    assert not bad, bad
    archs = {k[0] for k, _, _ in rows}
    assert len(archs) >= 7, f"parity covered only {archs}"


@pytest.mark.parametrize("arch", ["llama", "qwen2moe", "qwen3moe", "olmoe", "deepseek", "deepseek2", "granitemoe"])
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
