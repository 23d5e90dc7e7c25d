"""Non-finite values are caught where they start.

Real factory models with one weight set to NaN or inf in the file (an F32 element, or the f16 scale
of a quantized block): the logits check turns the NaN into a ModelError on every step; with
check_numerics the error names the first layer and block (attention, router, expert E, shared
expert, ...) that produced it. Which expert a token is routed to is read from a clean run.
"""
import math
import struct

import gguf
import numpy as np
import pytest

from gguf_edit import poison
from promoe_gguf import ModelError
from promoe_gguf.engine import Engine
from promoe_gguf.numerics import NonFiniteError

TOKENS = [1, 2, 3]
NAN32 = struct.pack("<f", math.nan)
INF16 = struct.pack("<H", 0x7C00)          # f16 +inf: the scale `d` of a Q8_0 block


def _f32_offset(path, tensor, index) -> int:
    """Byte offset of element `index` (numpy order) in F32 tensor `tensor` of the file at `path`."""
    t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == tensor)
    return int(np.ravel_multi_index(index, tuple(int(d) for d in reversed(t.shape)))) * 4


def _nan_at(src, dst, tensor, index):
    return poison(src, dst, tensor, _f32_offset(src, tensor, index), NAN32)


def _routes(path, layer):
    """ids [T, k] the router picks at `layer` for TOKENS (clean model)."""
    seen = {}

    class Recorder:
        def begin_step(self, positions):
            pass

        def observe(self, lay, x, ids, logits):
            if lay == layer:
                seen.setdefault("ids", []).append(ids.clone())

    with Engine(path) as eng:
        eng.experts.observers.append(Recorder())
        eng.logits(TOKENS)
    return np.concatenate([i.numpy() for i in seen["ids"]])


def _model(test_models, arch, quant="F32"):
    return test_models[(arch, quant, "default")]


def _expect_named(path, where):
    """check_numerics names `where`; without it the logits check still refuses, with the hint."""
    with Engine(path, check_numerics=True) as eng, pytest.raises(NonFiniteError, match=where):
        eng.logits(TOKENS)
    with Engine(path) as eng, pytest.raises(ModelError, match="logits hold .*--check-numerics"):
        eng.logits(TOKENS)


def test_clean_model_results_unchanged(test_models):
    """Checking every block changes nothing: bitwise-equal logits, and no error on a sound model."""
    path = _model(test_models, "deepseek2", "Q4_K_M")
    with Engine(path) as a, Engine(path, check_numerics=True) as b:
        assert np.array_equal(a.logits(TOKENS), b.logits(TOKENS))


# (arch, tensor, element set to NaN, where the error must say it started)
POISONED = [
    ("llama", "blk.0.attn_q.weight", (5, 7), r"NaN first produced by layer 0, attention \(at position 0\)"),
    ("qwen3moe", "blk.1.ffn_gate_inp.weight", (3, 0), r"layer 1, router"),
    ("deepseek", "blk.1.ffn_up_shexp.weight", (0, 0), r"layer 1, shared expert"),
    ("deepseek", "blk.0.ffn_up.weight", (0, 0), r"layer 0, feed-forward \("),      # the dense layer
    ("deepseek", "blk.2.ffn_norm.weight", (10,), r"layer 2, the feed-forward norm"),
    ("granitemoe", "token_embd.weight", (TOKENS[2], 0), r"the token embedding \(at position 2\)"),
    ("olmoe", "output.weight", (7, 3), r"the output head"),
]


@pytest.mark.parametrize("arch,tensor,index,where", POISONED, ids=[f"{a}:{t}" for a, t, _, _ in POISONED])
def test_nan_in_block_is_named(test_models, tmp_path, arch, tensor, index, where):
    _expect_named(_nan_at(_model(test_models, arch), tmp_path / "p.gguf", tensor, index), where)


def test_inf_scale_of_a_quantized_block(test_models, tmp_path):
    """Q8_0 block 0 of layer 1's attn_k gets an inf scale: inf * 0 somewhere makes NaN."""
    src = _model(test_models, "llama", "Q8_0")
    p = poison(src, tmp_path / "p.gguf", "blk.1.attn_k.weight", 0, INF16)
    _expect_named(p, r"first produced by layer 1, attention")


def test_nan_in_routed_expert_names_it(test_models, tmp_path):
    src = _model(test_models, "llama")
    e = int(_routes(src, 1)[0, 0])                 # an expert token 0 uses at layer 1
    p = _nan_at(src, tmp_path / "p.gguf", "blk.1.ffn_up_exps.weight", (e, 0, 0))
    _expect_named(p, rf"layer 1, expert {e} \(at position 0\)")


def test_unused_expert_with_nan_is_harmless(test_models, tmp_path):
    """A NaN in an expert no token of the sequence picks never reaches the result."""
    src = _model(test_models, "llama")
    unused = sorted(set(range(8)) - set(_routes(src, 1).ravel().tolist()))
    assert unused, "3 tokens x top-2 cannot use all 8 experts"
    p = _nan_at(src, tmp_path / "p.gguf", "blk.1.ffn_up_exps.weight", (unused[0], 0, 0))
    with Engine(src) as clean, Engine(p, check_numerics=True) as eng:
        assert np.array_equal(eng.logits(TOKENS), clean.logits(TOKENS))


def test_generate_never_samples_from_nan(test_models, tmp_path):
    p = _nan_at(_model(test_models, "olmoe"), tmp_path / "p.gguf", "output.weight", (7, 3))
    with Engine(p) as eng, pytest.raises(ModelError, match="logits hold NaN"):
        list(eng.generate(TOKENS, max_tokens=4, seed=0))


def test_position_is_absolute_across_steps(test_models, tmp_path):
    """One token per step (n_batch=1): the position named is the sequence position, not the row."""
    src = _model(test_models, "llama")
    routes = _routes(src, 0)                                       # [T, k]
    first_use = {}
    for t, row in enumerate(routes.tolist()):
        for e in row:
            first_use.setdefault(e, t)
    e, t = max(first_use.items(), key=lambda kv: kv[1])
    assert t > 0, "every routed expert is used by the first token"
    p = _nan_at(src, tmp_path / "p.gguf", "blk.0.ffn_down_exps.weight", (e, 0, 0))
    with Engine(p, check_numerics=True, n_batch=1) as eng, pytest.raises(NonFiniteError) as err:
        eng.logits(TOKENS)
    assert f"layer 0, expert {e} (at position {t})" in str(err.value)


def test_all_finite_is_exact():
    """The fast sum-based check never misses a NaN or inf, and a sum that overflows on finite values
    (3e38 + 3e38) does not count as non-finite."""
    import torch
    from promoe_gguf.numerics import all_finite
    x = torch.zeros(4, 300)
    assert all_finite(x)
    for bad in (math.nan, math.inf, -math.inf):
        y = x.clone()
        y[2, 123] = bad
        assert not all_finite(y)
    y = x.clone()
    y[0, 0], y[1, 1] = math.inf, -math.inf                       # sum is NaN
    assert not all_finite(y)
    big = torch.full((4, 300), 3e38)
    assert not bool(torch.isfinite(big.sum())) and all_finite(big)
