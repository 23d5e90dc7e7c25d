"""Our sampler chain against llama.cpp's own samplers (llama_sampler_init_* through llama-cpp-python's
low-level API) applied to a llama_token_data_array built from the same logits: the same tokens survive
and their probabilities agree."""
import ctypes
import math

import llama_cpp
import numpy as np
import pytest
import torch

from promoe_gguf import DEFAULT_MODEL, Engine
from promoe_gguf.sampling import Sampler


def llama_distribution(logits: np.ndarray, history, temperature, top_k, top_p, min_p, repeat_penalty,
                       repeat_last_n) -> np.ndarray:
    """llama.cpp's default chain (common/common.h: penalties, top-k, top-p, min-p, temperature) without
    the final draw: the probabilities `dist` would sample from, float64 [vocab]."""
    n = len(logits)
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    try:
        # -1 means "the whole context" in llama.cpp's arg parser; the sampler itself takes a count
        last_n = len(history) if repeat_last_n < 0 else repeat_last_n
        for smpl in (llama_cpp.llama_sampler_init_penalties(n, last_n, repeat_penalty, 0.0, 0.0),
                     llama_cpp.llama_sampler_init_top_k(top_k),
                     llama_cpp.llama_sampler_init_top_p(top_p, 0),
                     llama_cpp.llama_sampler_init_min_p(min_p, 0),
                     llama_cpp.llama_sampler_init_temp_ext(temperature, 0.0, 1.0)):
            llama_cpp.llama_sampler_chain_add(chain, smpl)          # the chain owns and frees them
        for tok in history:
            llama_cpp.llama_sampler_accept(chain, tok)
        data = (llama_cpp.llama_token_data * n)(*[llama_cpp.llama_token_data(i, float(v), 0.0)
                                                  for i, v in enumerate(logits)])
        arr = llama_cpp.llama_token_data_array(data=ctypes.cast(data, llama_cpp.llama_token_data_p),
                                               size=n, selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(chain, ctypes.byref(arr))
        ids = np.array([arr.data[i].id for i in range(arr.size)])
        out = np.array([arr.data[i].logit for i in range(arr.size)], dtype=np.float64)
    finally:
        llama_cpp.llama_sampler_free(chain)
    probs = np.zeros(n)
    finite = np.isfinite(out)                 # temperature <= 0 leaves the others at -inf
    e = np.exp(out[finite] - out[finite].max())
    probs[ids[finite]] = e / e.sum()
    return probs


SETTINGS = [  # temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n
    (0.8, 40, 0.95, 0.05, 1.0, 64),     # llama.cpp's defaults
    (1.0, 0, 1.0, 0.0, 1.0, 64),        # nothing filters
    (0.7, 5, 1.0, 0.0, 1.0, 64),        # top-k alone
    (1.0, 0, 0.5, 0.0, 1.0, 64),        # top-p alone
    (1.3, 0, 1.0, 0.2, 1.0, 64),        # min-p alone
    (0.5, 0, 1.0, 0.0, 1.3, 16),        # repeat penalty, short window
    (1.0, 0, 1.0, 0.0, 1.3, 0),         # window 0 disables the penalty
    (1.0, 0, 1.0, 0.0, 1.5, -1),        # window -1: the whole history
    (1.1, 20, 0.8, 0.1, 1.2, 64),       # all together
    (0.0, 40, 0.95, 0.05, 1.1, 64),     # greedy
]


def random_logits(seed, n=512):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 3, n).astype(np.float32)
    x[rng.choice(n, 5, replace=False)] += 8      # a few strong candidates, like a real model
    return x


@pytest.fixture(scope="module")
def real_logits():
    """Logits of the embedded default model at every position of a prompt (llama.cpp's byte vocab)."""
    with Engine(DEFAULT_MODEL, n_ctx=128) as eng:
        ids = eng.tokenize("import os\nimport sys\n\ndef main(argv):\n    return 0\n")
        return eng.logits(ids), ids


def check_agreement(logits, history, setting):
    ours = Sampler(*setting[:5], repeat_last_n=setting[5], seed=0).distribution(torch.from_numpy(logits), history)
    ours = ours.double().numpy()
    ref = llama_distribution(logits, history, *setting)
    assert set(np.nonzero(ours)[0]) == set(np.nonzero(ref)[0]), f"kept tokens differ for {setting}"
    err = np.abs(ours - ref).max()
    assert err < 1e-5, f"{setting}: max |p_ours - p_llama| = {err:.2e}"
    return err


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "t{}-k{}-p{}-m{}-r{}-n{}".format(*s))
def test_filtered_distribution_matches_llama_cpp_random_logits(setting):
    for seed in range(5):
        logits = random_logits(seed)
        rng = np.random.default_rng(100 + seed)
        # the history repeats some strong candidates, so the penalty changes the outcome
        strong = np.argsort(logits)[-8:]
        history = [int(t) for t in np.concatenate([rng.integers(0, len(logits), 90), strong[:4]])]
        check_agreement(logits, history, setting)


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "t{}-k{}-p{}-m{}-r{}-n{}".format(*s))
def test_filtered_distribution_matches_llama_cpp_model_logits(real_logits, setting):
    logits, ids = real_logits
    for pos in range(4, len(ids), 7):
        check_agreement(logits[pos], ids[:pos + 1], setting)


def test_filters_really_filter():
    """The settings above exercise each filter: kept-set sizes shrink as llama.cpp says they should."""
    logits = random_logits(0)
    sizes = {s: int((llama_distribution(logits, [], *s) > 0).sum()) for s in SETTINGS[:5]}
    assert sizes[SETTINGS[1]] == len(logits)
    assert sizes[SETTINGS[2]] == 5
    assert 1 <= sizes[SETTINGS[3]] < len(logits) and 1 <= sizes[SETTINGS[4]] < len(logits)


def test_draws_follow_the_distribution():
    """sample() draws from distribution(): empirical frequencies within a few standard errors of llama.cpp's
    probabilities, and a seed fixes the draws."""
    logits = random_logits(3)
    setting = (1.0, 10, 0.95, 0.0, 1.0, 64)
    ref = llama_distribution(logits, [], *setting)
    sampler = Sampler(*setting[:5], repeat_last_n=64, seed=7)
    n = 4000
    draws = np.bincount([sampler.sample(torch.from_numpy(logits), []) for _ in range(n)], minlength=len(logits))
    assert set(np.nonzero(draws)[0]) <= set(np.nonzero(ref)[0])
    freq = draws / n
    tol = 5 * np.sqrt(ref * (1 - ref) / n) + 1e-9
    assert np.all(np.abs(freq - ref) <= tol), np.abs(freq - ref).max()
    def draws_with(seed):
        sampler = Sampler(*setting[:5], repeat_last_n=64, seed=seed)
        return [sampler.sample(torch.from_numpy(logits), []) for _ in range(50)]
    assert draws_with(11) == draws_with(11)
    assert draws_with(11) != draws_with(12)
