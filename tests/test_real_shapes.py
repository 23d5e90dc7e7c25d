"""Real-shape synthetic models (promoe_gguf.bench.real_shapes, testing.factory.make_real_shape).

Oracles: llama.cpp's own quantizer decides the Q4_K_M type of every tensor (a dry run on a sparse F16
skeleton with the same names and shapes, at the full and at the reduced layer counts); stock llama.cpp
loads each written file and computes finite logits; gguf-py reads the tensors' types, shapes and bytes
back; gguf-py dequantizes the random blocks.
"""
import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

import conftest
from promoe_gguf import open_model
from promoe_gguf.bench import quant_mix
from promoe_gguf.bench import real_shapes as rs

# layer counts of the files written: DeepSeek-V2-Lite needs its dense layer 0 plus two MoE layers to
# hold both expert-down fallbacks (Q5_0 and Q8_0); one layer of the others already has every type.
# GLM-4.5-Air, Qwen3-235B-A22B, DeepSeek-V3 and gpt-oss are checked by the quantizer's dry run only:
# their least files would be 0.9-3.5 GB (GLM's: the dense layer 0, one MoE layer and the NextN block of 128 experts
# of 1408); tests/test_parity.py runs their layouts (glm4moe, qwen3moe, deepseek2 "v3", gpt-oss) against
# llama.cpp on factory models.
FILE_LAYERS = {"mixtral-8x7b": 1, "qwen3-30b-a3b": 1, "deepseek-v2-lite": 3, "qwen1.5-moe-a2.7b": 1,
               "olmoe-1b-7b": 1}
CUT_LAYERS = {**FILE_LAYERS, "glm-4.5-air": 2, "qwen3-235b-a22b": 1, "deepseek-v3": 4, "gpt-oss-20b": 2,
              "gpt-oss-120b": 2, "qwen3.5-35b-a3b": 4}
NAMES = sorted(rs.SHAPES)
FILE_NAMES = sorted(FILE_LAYERS)


@pytest.fixture(scope="module")
def files(factory):
    return {n: factory.make_real_shape(n, conftest.test_models_dir(), FILE_LAYERS[n]) for n in FILE_NAMES}


def _planned_bytes(path, plan) -> dict[str, np.memmap]:
    """Each tensor's bytes where the plan puts them: the data section closes the file, tensor after
    tensor in plan order, each padded to 32 bytes (GGUF's default alignment). Derived from the plan
    and the file size alone, not from any GGUF reader."""
    pads = [gguf.GGUFWriter.ggml_pad(t.nbytes, 32) for t in plan]
    data = np.memmap(path, dtype=np.uint8, mode="r")
    off = len(data) - sum(pads)
    out = {}
    for t, pad in zip(plan, pads):
        out[t.name] = data[off:off + t.nbytes]
        off += pad
    return out


def _llamacpp_dry_run(factory, src) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """{tensor: (type stored, ne, Q4_K_M target type)} as llama.cpp's own GGUF loader and quantizer
    see src (llama_model_quantize with dry_run: nothing is read or written but the header)."""
    return quant_mix.dry_run(src, "Q4_K_M")


@pytest.mark.parametrize("name", NAMES)
def test_quant_mix_is_llamacpps_q4_k_m(factory, tmp_path, name):
    for n in (None, CUT_LAYERS[name]):
        src = tmp_path / f"skeleton-{n}.gguf"
        quant_mix.write_skeleton(name, src, n)
        got = {k: target for k, (_, _, target) in _llamacpp_dry_run(factory, src).items()}
        want = {t.name: t.qtype.name for t in rs.tensor_plan(name, n)}
        assert got == want, {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}


def test_recorded_low_bit_mixes_are_llamacpps(tmp_path):
    """The IQ2_XXS / IQ1_M mixes the simulator reads (promoe_gguf/data/quant_mixes.json) are what
    llama.cpp's quantizer chooses for those models now (a fresh dry run, every tensor)."""
    for name, ftype in quant_mix.MIXES:
        fresh = quant_mix.llamacpp_mix(name, ftype, tmp_path)
        assert fresh == rs.committed_mix(name, ftype), (name, ftype)
        assert {t.name for t in rs.tensor_plan(name, ftype=ftype)} == set(fresh)
    with pytest.raises(ValueError, match="recorded for all 94 layers"):
        rs.tensor_plan("qwen3-235b-a22b", 4, ftype="IQ2_XXS")


def test_full_qwen3_weighs_the_published_q4_k_m():
    """A published figure: Qwen3-30B-A3B Q4_K_M is 17.28 GB (GiB) on disk (GOBA-AI-Labs'
    PrunedHub-Qwen3-30B-A3B model card, "original Q4_K_M (17.28 GB)"); tensor data is all but ~6 MB."""
    total = sum(t.nbytes for t in rs.tensor_plan("qwen3-30b-a3b")) / 2**30
    assert abs(total - 17.28) < 0.01, total


@pytest.mark.parametrize("name", FILE_NAMES)
def test_file_is_the_plan_and_llamacpp_runs_it(factory, files, name):
    path = files[name]
    plan = rs.tensor_plan(name, FILE_LAYERS[name])
    # llama.cpp's GGUF loader reads back each tensor's type and dims; requantizing to Q4_K_M would
    # change none of them
    seen = _llamacpp_dry_run(factory, path)
    assert seen == {t.name: (t.qtype.name, t.ne, t.qtype.name) for t in plan}
    # the random blocks are finite weights of rms ~ 1/sqrt(ne0), for every quant type in the file
    raw = _planned_bytes(path, plan)
    for qtype in {t.qtype for t in plan} - {T.F32, T.F16}:
        t = next(t for t in plan if t.qtype == qtype)
        row = gguf.quants.quant_shape_to_byte_shape((t.ne[0],), qtype)[0]
        w = gguf.quants.dequantize(np.asarray(raw[t.name][:64 * row]).reshape(64, row), qtype)
        rms = float(np.sqrt(np.mean(w.astype(np.float64) ** 2) * t.ne[0]))
        assert np.isfinite(w).all() and 0.3 < rms < 3.0, (t.name, qtype.name, rms)

    import llama_cpp
    from promoe_gguf.util import quiet_stderr
    with quiet_stderr():
        llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    try:
        toks = llm.tokenize(b"def f(x):", add_bos=True)
        llm.eval(toks)
        logits = np.array(llm.scores[:llm.n_tokens])
    finally:
        llm.close()
    assert logits.shape == (len(toks), rs.get_shape(name).n_vocab)
    assert np.isfinite(logits).all() and logits.std() > 0.1


@pytest.mark.parametrize("name", FILE_NAMES)
def test_open_model_config_and_experts(files, name):
    s = rs.get_shape(name)
    n = FILE_LAYERS[name]
    plan = rs.tensor_plan(name, n)
    by_name = {t.name: t for t in plan}
    raw = _planned_bytes(files[name], plan)
    m = open_model(files[name])
    try:
        c = m.config
        assert (c.arch, c.n_layers, c.n_embd, c.n_vocab) == (s.arch, n, s.n_embd, s.n_vocab)
        assert (c.n_experts, c.n_experts_used, c.n_ff_exp) == (s.n_expert, s.n_used, s.n_ff_exp)
        assert (c.n_ff_shexp, c.n_leading_dense) == (s.n_ff_shexp, s.n_dense)
        assert c.moe_layers == list(range(s.n_dense, n))
        down_types = set()
        for layer in c.moe_layers:
            for e in (0, s.n_expert - 1):
                want = b""
                for mat in m.expert_matrices(layer, e):
                    p = by_name[f"blk.{layer}.ffn_{mat.matrix}_exps.weight"]
                    assert (mat.qtype, mat.shape) == (p.qtype, (p.ne[1], p.ne[0]))
                    per_expert = p.nbytes // s.n_expert
                    want += raw[p.name][e * per_expert:(e + 1) * per_expert].tobytes()
                    if mat.matrix == "down":
                        down_types.add(mat.qtype.name)
                assert m.read_expert(layer, e) == want
        if name == "deepseek-v2-lite":   # ne0 1408: K-quants fall back (layer 1 Q4_K -> Q5_0, 2 Q6_K -> Q8_0)
            assert down_types == {"Q5_0", "Q8_0"}
    finally:
        m.close()


def test_bad_input(factory, tmp_path):
    with pytest.raises(ValueError, match="unknown real shape 'mixtral-8x22b'"):
        factory.make_real_shape("mixtral-8x22b", tmp_path)
    with pytest.raises(ValueError, match="deepseek-v2-lite: n_layers must be in 2..27"):
        factory.make_real_shape("deepseek-v2-lite", tmp_path, 1)
    with pytest.raises(ValueError, match="olmoe-1b-7b: n_layers must be in 1..16"):
        rs.tensor_plan("olmoe-1b-7b", 17)
    assert not list(tmp_path.iterdir())      # nothing half-written
