"""Bad input gets a ModelError that names the problem, and no partial output."""
import os
import resource
import signal
import subprocess
import sys

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from hypothesis import HealthCheck, given, settings, strategies as st

from promoe_gguf import ModelError, open_model
from promoe_gguf.engine import Engine
from promoe_gguf.format.converter import _copy_metadata, convert
from semantic_fuzz import deadline, memory_limit


def _base(test_models):
    return test_models[next(k for k in test_models if k[0] == "llama" and k[1] == "Q4_K_M" and k[2] == "default")]


def rewrite(src, dst, arch=None, drop=(), meta=None, tensors=None):
    """Copy a GGUF with gguf-py, dropping tensors, overriding metadata {key: (value, type)} and tensors."""
    r = gguf.GGUFReader(src)
    arch = arch or r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(dst), arch)
    _copy_metadata(r, w)
    for k, (v, vt) in (meta or {}).items():
        w.add_key_value(k, v, vt)
    for t in r.tensors:
        if t.name in drop:
            continue
        if tensors and t.name in tensors:
            w.add_tensor(t.name, *tensors[t.name])
            continue
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(dst)


def test_not_a_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_text("hello, I am not a model" * 10)
    with pytest.raises(ModelError, match="not a GGUF"):
        open_model(p)
    with pytest.raises(ModelError, match="no such file"):
        open_model(tmp_path / "missing.gguf")


@pytest.mark.parametrize("keep", [0.999, 0.5, 0.01])
def test_truncated(test_models, tmp_path, keep):
    data = open(_base(test_models), "rb").read()
    p = tmp_path / "t.gguf"
    p.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelError, match="truncated|ends inside|not a GGUF"):
        open_model(p)


def test_not_moe(test_models, tmp_path):
    p = rewrite(_base(test_models), tmp_path / "dense.gguf", meta={"llama.expert_count": (0, gguf.GGUFValueType.UINT32)})
    with pytest.raises(ModelError, match="not a Mixture-of-Experts"):
        open_model(p)


def test_unsupported_arch(test_models, tmp_path):
    p = rewrite(_base(test_models), tmp_path / "a.gguf", arch="gpt2")
    with pytest.raises(ModelError, match="unsupported architecture 'gpt2'"):
        open_model(p)


def test_unsupported_quant_type(test_models, tmp_path):
    src = _base(test_models)
    name = "blk.1.ffn_up_exps.weight"
    shape = next(t for t in gguf.GGUFReader(src).tensors if t.name == name).data.shape[:2]
    vals = np.random.default_rng(0).standard_normal((*shape, 256)).astype(np.float32)
    q = gguf.quants.quantize(vals, T.TQ2_0)
    p = rewrite(src, tmp_path / "q.gguf", tensors={name: (q, None, T.TQ2_0)})
    with pytest.raises(ModelError, match="unsupported quant type TQ2_0"):
        open_model(p)


def test_missing_and_misshaped_tensor(test_models, tmp_path):
    src = _base(test_models)
    p = rewrite(src, tmp_path / "m.gguf", drop={"blk.1.ffn_down_exps.weight"})
    with pytest.raises(ModelError, match="blk.1.ffn_down_exps"):
        open_model(p)
    r = {t.name: t for t in gguf.GGUFReader(src).tensors}
    router = np.asarray(r["blk.0.ffn_gate_inp.weight"].data)[:-1]  # one expert short
    p = rewrite(src, tmp_path / "s.gguf", tensors={"blk.0.ffn_gate_inp.weight": (router,)})
    with pytest.raises(ModelError, match="blk.0.ffn_gate_inp.weight.*shape"):
        open_model(p)


def test_inconsistent_metadata(test_models, tmp_path):
    src = _base(test_models)
    n = open_model(src).config.n_experts
    u32 = gguf.GGUFValueType.UINT32
    p = rewrite(src, tmp_path / "e.gguf", meta={"llama.expert_count": (n * 2, u32)})
    with pytest.raises(ModelError, match=rf"llama.expert_count = {n * 2}.*blk.0.ffn_gate_inp.weight has shape"):
        open_model(p)
    p = rewrite(src, tmp_path / "k.gguf", meta={"llama.expert_used_count": (n + 1, u32)})
    with pytest.raises(ModelError, match=rf"llama.expert_used_count = {n + 1}.*must not exceed expert_count"):
        open_model(p)
    p = rewrite(src, tmp_path / "f.gguf", meta={"llama.feed_forward_length": (12345, u32)})
    with pytest.raises(ModelError, match=r"llama.feed_forward_length = 12345.*blk.0.ffn_gate_exps.weight has shape"):
        open_model(p)


def test_convert_refuses_existing_output(test_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ModelError, match="already exists"):
        convert(_base(test_models), out, progress=False)
    assert os.listdir(out) == ["keep.txt"]


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # make the write fail with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def test_convert_failure_midway_leaves_nothing(test_models, tmp_path):
    """A real write failure (file-size limit, like a full disk) part-way through experts.bin."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "promoe_gguf.cli.main", "convert", "-q", _base(test_models), str(out)],
                          capture_output=True, text=True, preexec_fn=_limit_file_size, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "nothing was written" in proc.stderr
    assert os.listdir(tmp_path) == [], "partial output left behind"


def test_corrupt_cache_names_expert(test_models, tmp_path):
    out = convert(_base(test_models), tmp_path / "c", progress=False)
    import json
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    victim = manifest["experts"][5]
    with open(os.path.join(out, "experts.bin"), "r+b") as f:
        f.seek(victim["offset"] + 100)
        b = f.read(1)
        f.seek(victim["offset"] + 100)
        f.write(bytes([b[0] ^ 0xFF]))
    msg = f"expert {victim['expert']} of layer {victim['layer']}"
    with pytest.raises(ModelError, match=msg):
        open_model(out)
    lazy = open_model(out, verify="lazy")
    lazy.read_expert(*(manifest["experts"][0][k] for k in ("layer", "expert")))
    with pytest.raises(ModelError, match=msg):
        lazy.read_expert(victim["layer"], victim["expert"])
    os.remove(os.path.join(out, "manifest.json"))
    with pytest.raises(ModelError, match="manifest.json missing"):
        open_model(out)


# ---- fuzzing: mutate the header (metadata and tensor infos) of a real factory model ----------

@pytest.fixture(scope="module")
def fuzz_seed(test_models, tmp_path_factory):
    src = _base(test_models)
    data = bytearray(open(src, "rb").read())
    header_len = gguf.GGUFReader(src).data_offset
    return data, header_len, tmp_path_factory.mktemp("fuzz") / "f.gguf"


def _fuzz_header_case(fuzz_seed, data):
    """One mutation of the header (a byte, a u32/u64 field, a cut); then open, read experts and, if
    it opens, run the model: ModelError or finite logits, nothing else (hypothesis reports anything
    else, with the shrunk mutation)."""
    base, header_len, path = fuzz_seed
    buf = bytearray(base)
    kind = data.draw(st.sampled_from(["byte", "u64", "u32", "cut"]))
    pos = data.draw(st.integers(0, header_len - 1))
    if kind == "byte":
        buf[pos] = data.draw(st.integers(0, 255))
    elif kind in ("u64", "u32"):
        n = 8 if kind == "u64" else 4
        v = data.draw(st.sampled_from([0, 1, 2**31 - 1, 2**32 - 1, 2**63, 2**64 - 1, 255, 4096]) | st.integers(0, 2**(8 * n) - 1))
        buf[pos:pos + n] = (v % 2**(8 * n)).to_bytes(n, "little")
    else:
        buf = buf[:pos]
    path.write_bytes(bytes(buf))
    try:
        with memory_limit(2 << 30), deadline(20.0):
            model = open_model(path)
            for key in model.expert_keys[:2]:
                model.read_expert(*key)
            with Engine(path, n_batch=2) as eng:
                assert np.isfinite(eng.logits([1, 2, 3])).all()
    except ModelError:
        return


FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
            derandomize=True)


@settings(max_examples=1000, **FUZZ)
@given(st.data())
def test_fuzz_header(fuzz_seed, data):
    _fuzz_header_case(fuzz_seed, data)


@pytest.mark.slow
@settings(max_examples=10_000, **{**FUZZ, "derandomize": False})
@given(st.data())
def test_fuzz_header_10k(fuzz_seed, data):
    _fuzz_header_case(fuzz_seed, data)
