"""The test-model factory: every model loads in stock llama.cpp (or is refused where expected), has the
tensor names/shapes/types llama.cpp gives it, and the byte vocabulary round-trips exactly."""
import ctypes

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from promoe_gguf.testing import factory as mtm

bv = mtm.byte_vocab
KEYS = mtm.plan()
TOKENS = [bv.BOS_ID] + list(b"def f(x):\n\treturn")[:15]


def _id(key):
    return "-".join(key)


def _llama(path, **kw):
    from llama_cpp import Llama
    return Llama(str(path), **kw)


def _logits(path, tokens=TOKENS, **kw):
    llm = _llama(path, n_ctx=128, logits_all=True, verbose=False, **kw)
    llm.reset()
    llm.eval(list(tokens))
    out = np.array(llm.scores[:llm.n_tokens], dtype=np.float32)
    del llm
    return out


def _tensors(path):
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def _ne(t):
    return [int(x) for x in t.shape]


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(np.asarray(b, np.float64)))


# ---------------------------------------------------------------------------------------------
# loading in llama.cpp
# ---------------------------------------------------------------------------------------------

def test_plan_covers_the_brief(test_models):
    assert set(test_models) == set(KEYS)
    for arch in mtm.ARCHS:
        for q in mtm.ARCH_QUANTS.get(arch, mtm.CORE_QUANTS):
            assert (arch, q, "default") in test_models
    assert {q for a, q, _ in test_models if a == "gpt-oss"} == {"F32", "Q8_0", "MXFP4_MOE"}
    for q in mtm.EXTRA_QUANTS:
        assert ("llama", q, "default") in test_models
    for key in [("deepseek", "Q4_K_M", "narrow"), ("deepseek", "F32", "narrow"),
                ("llama", "Q4_K_M", "legacy"), ("deepseek2", "Q4_K_M", "merged")]:
        assert key in test_models


@pytest.mark.parametrize("key", KEYS, ids=_id)
def test_llama_cpp_loads_and_evaluates(test_models, key):
    path = test_models[key]
    if not mtm.llama_cpp_loads(key):
        with pytest.raises(ValueError):
            _llama(path, n_ctx=128, verbose=False)
        return
    L = _logits(path)
    assert L.shape == (len(TOKENS), bv.N_VOCAB)
    assert np.isfinite(L).all()
    assert (L.std(axis=1) > 0.5).all(), "logits are degenerate"
    assert len({int(i) for i in L.argmax(axis=1)}) > 1


# ---------------------------------------------------------------------------------------------
# tensor types llama.cpp's quantizer chose
# ---------------------------------------------------------------------------------------------

def _gate_type(tensors):
    for name in ("blk.{}.ffn_gate_exps.weight", "blk.{}.ffn_gate_up_exps.weight", "blk.{}.ffn_gate.0.weight"):
        for layer in range(4):
            if name.format(layer) in tensors:
                return tensors[name.format(layer)].tensor_type
    raise AssertionError("no routed gate tensor")


@pytest.mark.parametrize("key", KEYS, ids=_id)
def test_tensor_types(test_models, key):
    arch, quant, variant = key
    ts = _tensors(test_models[key])
    assert _gate_type(ts) == mtm.BASE_TYPE[quant]
    for name, t in ts.items():
        if len(t.shape) == 1 or name.endswith("_norm.weight") or "ffn_gate_inp" in name:
            assert t.tensor_type == T.F32, name           # llama.cpp never quantizes these
    down = {t.tensor_type for n, t in ts.items() if n.endswith("ffn_down_exps.weight")}
    if variant == "narrow" and quant == "Q4_K_M":
        # expert width 352 is not a multiple of 256: Q4_K -> Q5_0, the Q6_K bump -> Q8_0
        assert down == {T.Q5_0, T.Q8_0}
    elif quant == "Q4_K_M" and variant != "legacy":
        assert down == {T.Q4_K, T.Q6_K}                  # use_more_bits bumps the last layer
    elif quant == "Q5_K_M" and variant != "legacy":
        assert down == {T.Q5_K, T.Q6_K}
    elif quant == "Q2_K":
        assert down == {T.Q3_K}
    if arch == "llama" and quant == "Q4_K_M":            # the 8-expert (Mixtral) bumps
        assert ts["blk.0.attn_k.weight"].tensor_type == T.Q8_0
        assert ts["blk.0.attn_v.weight"].tensor_type == T.Q8_0
        assert ts["blk.0.attn_output.weight"].tensor_type == T.Q5_K
    if arch == "deepseek2" and quant == "Q4_K_M" and variant in ("default", "v3", "merged"):
        assert ts["blk.1.attn_k_b.weight"].tensor_type == T.Q5_0   # ne0 = qk_nope = 64
    if arch == "granitemoe" and quant == "Q4_K_M":
        assert "output.weight" not in ts and ts["token_embd.weight"].tensor_type == T.Q6_K   # tied


def test_every_block_type_is_covered(test_models):
    seen = set()
    for key, path in test_models.items():
        seen |= {t.tensor_type for t in _tensors(path).values()}
    want = {T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K,
            T.Q6_K, T.IQ4_NL, T.IQ4_XS, T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.MXFP4}
    assert want <= seen, want - seen


# ---------------------------------------------------------------------------------------------
# layouts, names, shapes, metadata
# ---------------------------------------------------------------------------------------------

def test_arch_layouts(test_models):
    E = mtm.N_EMBD
    ts = {a: _tensors(test_models[(a, "F32", "default")]) for a in mtm.ARCHS}
    V = bv.N_VOCAB
    for a in mtm.ARCHS:
        assert _ne(ts[a]["token_embd.weight"]) == [E, V]
    s = mtm.spec("llama")
    assert _ne(ts["llama"]["blk.1.ffn_gate_exps.weight"]) == [E, 256, 8]
    assert _ne(ts["llama"]["blk.1.ffn_down_exps.weight"]) == [256, E, 8]
    assert _ne(ts["llama"]["blk.1.ffn_gate_inp.weight"]) == [E, 8]
    assert _ne(ts["llama"]["blk.0.attn_k.weight"]) == [E, s["n_head_kv"] * 64]
    q2 = ts["qwen2moe"]
    assert _ne(q2["blk.0.ffn_gate_inp_shexp.weight"]) == [E]
    assert _ne(q2["blk.0.ffn_up_shexp.weight"]) == [E, 512] and _ne(q2["blk.0.ffn_down_shexp.weight"]) == [512, E]
    assert _ne(q2["blk.0.attn_q.bias"]) == [E] and _ne(q2["blk.0.attn_k.bias"]) == [128]
    q3 = ts["qwen3moe"]
    assert _ne(q3["blk.0.attn_q.weight"]) == [E, 4 * 128] and _ne(q3["blk.0.attn_output.weight"]) == [4 * 128, E]
    assert _ne(q3["blk.0.attn_q_norm.weight"]) == [128] and _ne(q3["blk.0.attn_k_norm.weight"]) == [128]
    ol = ts["olmoe"]
    assert _ne(ol["blk.0.attn_q_norm.weight"]) == [E] and _ne(ol["blk.0.attn_k_norm.weight"]) == [E]
    ds = ts["deepseek"]
    assert "blk.0.ffn_gate.weight" in ds and "blk.0.ffn_gate_exps.weight" not in ds
    assert _ne(ds["blk.1.ffn_gate_shexp.weight"]) == [E, 2 * 256]
    d2 = ts["deepseek2"]
    assert _ne(d2["blk.0.attn_q.weight"]) == [E, 4 * 96]
    assert _ne(d2["blk.0.attn_kv_a_mqa.weight"]) == [E, 512 + 32]
    assert _ne(d2["blk.0.attn_kv_a_norm.weight"]) == [512]
    assert _ne(d2["blk.0.attn_k_b.weight"]) == [64, 512, 4]
    assert _ne(d2["blk.0.attn_v_b.weight"]) == [512, 64, 4]
    assert _ne(d2["blk.0.attn_output.weight"]) == [4 * 64, E]
    assert "blk.0.ffn_up.weight" in d2 and _ne(d2["blk.2.ffn_down_shexp.weight"]) == [512, E]
    assert "output.weight" not in ts["granitemoe"]
    kvb = _tensors(test_models[("deepseek2", "F32", "kvb")])
    assert _ne(kvb["blk.0.attn_kv_b.weight"]) == [512, 4 * (64 + 64)] and "blk.0.attn_k_b.weight" not in kvb
    v3 = _tensors(test_models[("deepseek2", "F32", "v3")])
    assert _ne(v3["blk.0.attn_q_a.weight"]) == [E, 512] and _ne(v3["blk.0.attn_q_b.weight"]) == [512, 4 * 96]
    assert _ne(v3["blk.1.exp_probs_b.bias"]) == [8]
    glm = ts["glm4moe"]                                      # layer 0 dense, layers 1-2 MoE, block 3 NextN
    assert "blk.0.ffn_up.weight" in glm and _ne(glm["blk.1.ffn_up_shexp.weight"]) == [E, 256]
    assert "blk.1.post_attention_norm.weight" in glm and "blk.1.ffn_norm.weight" not in glm
    assert _ne(glm["blk.1.exp_probs_b.bias"]) == [8] and _ne(glm["blk.0.attn_q.bias"]) == [E]
    assert _ne(glm["blk.3.nextn.eh_proj.weight"]) == [2 * E, E] and "blk.2.nextn.eh_proj.weight" not in glm
    qk = _tensors(test_models[("glm4moe", "F32", "qknorm")])
    assert _ne(qk["blk.0.attn_q_norm.weight"]) == [64] and "blk.0.attn_q_norm.weight" not in glm
    go = ts["gpt-oss"]                                       # q 8 x 64 wide, biases everywhere, sinks per head
    assert _ne(go["blk.0.attn_q.weight"]) == [E, 8 * 64] and _ne(go["blk.0.attn_output.bias"]) == [E]
    assert _ne(go["blk.0.attn_sinks.weight"]) == [8] and _ne(go["blk.1.ffn_gate_inp.bias"]) == [8]
    assert _ne(go["blk.1.ffn_gate_exps.bias"]) == [256, 8] and _ne(go["blk.1.ffn_down_exps.bias"]) == [E, 8]
    assert "blk.1.post_attention_norm.weight" in go
    mx = _tensors(test_models[("gpt-oss", "MXFP4_MOE", "default")])
    assert mx["blk.0.ffn_up_exps.weight"].tensor_type == gguf.GGMLQuantizationType.MXFP4
    assert mx["blk.0.ffn_up_exps.bias"].tensor_type == gguf.GGMLQuantizationType.F32
    nar = _tensors(test_models[("deepseek", "F32", "narrow")])
    assert _ne(nar["blk.1.ffn_down_exps.weight"]) == [352, E, 8]


def _fields(path):
    return {f.name: f.contents() for f in gguf.GGUFReader(str(path)).fields.values() if not f.name.startswith("GGUF.")}


def test_metadata(test_models):
    g = _fields(test_models[("granitemoe", "Q4_K_M", "default")])
    for k in ("embedding_scale", "residual_scale", "attention.scale", "logit_scale"):
        assert f"granitemoe.{k}" in g
    q3 = _fields(test_models[("qwen3moe", "F32", "default")])
    assert q3["qwen3moe.attention.key_length"] == 128 and q3["qwen3moe.embedding_length"] == 256
    d2 = _fields(test_models[("deepseek2", "Q4_K_M", "default")])
    assert d2["deepseek2.attention.key_length"] == 544 and d2["deepseek2.attention.key_length_mla"] == 96
    assert d2["deepseek2.attention.value_length"] == 512 and d2["deepseek2.attention.value_length_mla"] == 64
    assert d2["deepseek2.attention.head_count_kv"] == 1 and d2["deepseek2.leading_dense_block_count"] == 1
    assert d2["deepseek2.rope.scaling.type"] == "yarn"
    go = _fields(test_models[("gpt-oss", "MXFP4_MOE", "default")])
    assert go["gpt-oss.attention.sliding_window"] == 16 and go["gpt-oss.attention.key_length"] == 64
    assert go["gpt-oss.expert_used_count"] == 4 and go["gpt-oss.rope.scaling.type"] == "yarn"
    for key, path in test_models.items():
        f = _fields(path)
        assert f["general.architecture"] == key[0]
        assert f["tokenizer.ggml.model"] == "gpt2" and len(f["tokenizer.ggml.tokens"]) == bv.N_VOCAB
        assert f[f"{key[0]}.context_length"] == 512


# ---------------------------------------------------------------------------------------------
# derived layouts and the twin
# ---------------------------------------------------------------------------------------------

def test_legacy_is_byte_exact(test_models):
    src, dst = test_models[("llama", "Q4_K_M", "default")], test_models[("llama", "Q4_K_M", "legacy")]
    a, b = _tensors(src), _tensors(dst)
    s = mtm.spec("llama")
    for layer in range(s["n_layer"]):
        for kind in ("gate", "up", "down"):
            st = a[f"blk.{layer}.ffn_{kind}_exps.weight"]
            assert f"blk.{layer}.ffn_{kind}_exps.weight" not in b
            for e in range(s["n_expert"]):
                t = b[f"blk.{layer}.ffn_{kind}.{e}.weight"]
                assert t.tensor_type == st.tensor_type and _ne(t) == _ne(st)[:2]
                assert np.asarray(t.data).tobytes() == np.asarray(st.data[e]).tobytes()
    others = {n for n in a if "_exps" not in n}
    assert others <= set(b)
    assert _fields(src) == _fields(dst)


def test_merged_is_byte_exact_and_loads_identically(test_models):
    src, dst = test_models[("deepseek2", "Q4_K_M", "default")], test_models[("deepseek2", "Q4_K_M", "merged")]
    a, b = _tensors(src), _tensors(dst)
    s = mtm.spec("deepseek2")
    for layer in range(s["n_dense"], s["n_layer"]):
        m = b[f"blk.{layer}.ffn_gate_up_exps.weight"]
        g, u = a[f"blk.{layer}.ffn_gate_exps.weight"], a[f"blk.{layer}.ffn_up_exps.weight"]
        assert _ne(m) == [mtm.N_EMBD, 2 * s["n_ff_exp"], s["n_expert"]]
        for e in range(s["n_expert"]):
            want = np.asarray(g.data[e]).tobytes() + np.asarray(u.data[e]).tobytes()
            assert np.asarray(m.data[e]).tobytes() == want
    assert _fields(src) == _fields(dst)
    assert _rel(_logits(dst), _logits(src)) < 1e-6


def test_dequantized_twin(test_models, tmp_path):
    src = test_models[("llama", "Q4_K_M", "default")]
    twin = mtm.dequantized_twin(src, tmp_path / "twin.gguf")
    a, b = _tensors(src), _tensors(twin)
    assert set(a) == set(b)
    for name, t in a.items():
        assert b[name].tensor_type == T.F32 and _ne(b[name]) == _ne(t)
        want = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(-1)
        assert np.array_equal(np.asarray(b[name].data).reshape(-1), want), name
    fa, fb = _fields(src), _fields(twin)
    assert fb.pop("general.file_type") == 0
    fa.pop("general.file_type")
    assert fa == fb
    # llama.cpp rounds activations to 8 bits on the quantized file only: a few percent apart
    assert _rel(_logits(src), _logits(twin)) < 0.1


def test_mla_and_unsplit_kv_b_are_the_same_model(test_models):
    """deepseek2 "kvb" holds the same weights as "default" (absorbed MLA): with an f32 KV cache
    llama.cpp gives the same logits through both attention paths."""
    a = _logits(test_models[("deepseek2", "F32", "default")], type_k=0, type_v=0)
    b = _logits(test_models[("deepseek2", "F32", "kvb")], type_k=0, type_v=0)
    assert _rel(b, a) < 1e-5


def test_deterministic(tmp_path):
    p1 = mtm.make_float_model("qwen3moe", tmp_path / "a.gguf", seed=3)
    p2 = mtm.make_float_model("qwen3moe", tmp_path / "b.gguf", seed=3)
    p3 = mtm.make_float_model("qwen3moe", tmp_path / "c.gguf", seed=4)
    assert open(p1, "rb").read() == open(p2, "rb").read()
    assert open(p1, "rb").read() != open(p3, "rb").read()


def test_build_models_reuses_cache(test_models):
    import os
    import time
    d = os.path.dirname(next(iter(test_models.values())))
    before = {p: os.stat(p).st_mtime_ns for p in test_models.values()}
    t0 = time.perf_counter()
    again = mtm.build_models(d, progress=False)
    assert again == test_models
    assert time.perf_counter() - t0 < 5
    assert {p: os.stat(p).st_mtime_ns for p in again.values()} == before


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        mtm.make_float_model("gpt2", tmp_path / "x.gguf")
    with pytest.raises(ValueError):
        mtm.make_float_model("llama", tmp_path / "x.gguf", variant="kvb")
    with pytest.raises(ValueError):
        mtm.quantize(tmp_path / "x.gguf", tmp_path / "y.gguf", "Q9_K")
    with pytest.raises(RuntimeError):
        mtm.quantize(tmp_path / "missing.gguf", tmp_path / "y.gguf", "Q8_0")
    assert not (tmp_path / "y.gguf").exists()


# ---------------------------------------------------------------------------------------------
# the byte vocabulary
# ---------------------------------------------------------------------------------------------

TEXTS = [
    b"", b"a", b" ", b"hello world", b"  two leading spaces", b"trailing  \n",
    b"tabs\tand\r\nCRLF\n\n\n", b" . , ? ! 's 're ' x", b"<s></s><unk><pad>",
    "h\u00e9llo w\u00f6rld \u2014 \u00fcn\u00efc\u00f6d\u00e9 \u65e5\u672c\u8a9e \U0001f642\n".encode(),
    bytes(range(32, 127)), bytes(range(0, 32)),
]


@pytest.fixture(scope="module")
def vocab_llm(test_models):
    return _llama(test_models[("llama", "F32", "default")], vocab_only=True, verbose=False)


def test_byte_vocab_round_trip(vocab_llm):
    src = open(mtm.__file__, "rb").read()
    for text in TEXTS + [src]:
        ids = vocab_llm.tokenize(text, add_bos=False, special=False)
        assert ids == list(text), text[:60]
        assert ids == bv.encode(text)
        assert vocab_llm.detokenize(ids) == text
        assert bv.decode(ids) == text
    assert vocab_llm.tokenize(b"hi", add_bos=True, special=False) == [bv.BOS_ID, ord("h"), ord("i")]
    assert bv.encode("hi", add_bos=True) == [bv.BOS_ID, ord("h"), ord("i")]


def test_byte_vocab_specials(vocab_llm):
    assert vocab_llm.n_vocab() == bv.N_VOCAB
    assert vocab_llm.token_bos() == bv.BOS_ID and vocab_llm.token_eos() == bv.EOS_ID
    assert vocab_llm.tokenize(b"<s>x</s>", add_bos=False, special=True) == [bv.BOS_ID, ord("x"), bv.EOS_ID]
    assert vocab_llm.detokenize([bv.BOS_ID, bv.EOS_ID, bv.PAD_ID]) == b""
    for b in range(256):
        assert vocab_llm.detokenize([b]) == bytes([b])


def test_c_detokenizer_is_exact(vocab_llm):
    """llama_detokenize (unlike per-token pieces) may "clean up" spaces; this vocab turns that off."""
    import llama_cpp
    text = b" . , ? ! 's 're ' x  y"
    arr = (llama_cpp.llama_token * len(text))(*text)
    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_detokenize(vocab_llm._model.vocab, arr, len(text), buf, 256, False, False)
    assert buf.raw[:n] == text
