"""Expert bytes, resident tensors and dequantization against gguf-py, on llama.cpp-made models."""
import json

import gguf
import numpy as np
import pytest

import promoe_gguf
from promoe_gguf import ModelError, open_model
from promoe_gguf.cli.main import main as promoe_main
from promoe_gguf.format.converter import convert
from promoe_gguf.format.quants import QUANT_TYPES


def _gguf_expert_bytes(reader: gguf.GGUFReader, layer: int, expert: int, n_ff: int) -> bytes:
    """The oracle: expert bytes as gguf-py's reader exposes the tensors (no promoe code involved)."""
    t = {x.name: x for x in reader.tensors}
    p = f"blk.{layer}."
    if p + "ffn_down_exps.weight" in t:
        if p + "ffn_gate_up_exps.weight" in t:
            gu = t[p + "ffn_gate_up_exps.weight"].data[expert]        # (2*n_ff, row_bytes)
            gate, up = gu[:n_ff], gu[n_ff:]
        else:
            gate, up = t[p + "ffn_gate_exps.weight"].data[expert], t[p + "ffn_up_exps.weight"].data[expert]
        down = t[p + "ffn_down_exps.weight"].data[expert]
    else:
        gate, up, down = (t[f"{p}ffn_{m}.{expert}.weight"].data for m in ("gate", "up", "down"))
    return b"".join(np.ascontiguousarray(a).tobytes() for a in (gate, up, down))


def test_every_expert_matches_gguf_py(test_models, tmp_path):
    for key, path in test_models.items():
        model = open_model(path)
        reader = gguf.GGUFReader(path)
        conv = open_model(convert(path, tmp_path / "_".join(key), progress=False))
        cfg = model.config
        assert conv.config == cfg, key
        assert len(model.expert_keys) == len(cfg.moe_layers) * cfg.n_experts
        for layer, expert in model.expert_keys:
            want = _gguf_expert_bytes(reader, layer, expert, cfg.n_ff_exp)
            assert model.read_expert(layer, expert) == want, (key, layer, expert)
            assert conv.read_expert(layer, expert) == want, (key, layer, expert)


def test_layouts_agree(test_models):
    """Legacy per-expert and merged gate_up files hold the same expert bytes as their stacked source."""
    variants = {k[2]: k for k in test_models if k[2] in ("legacy", "merged")}
    assert "legacy" in variants, "factory must make a legacy-layout model"
    for variant, key in variants.items():
        src = [k for k in test_models if k[:2] == key[:2] and k[2] == "default"]
        assert src, f"no stacked source for {key}"
        a, b = open_model(test_models[key]), open_model(test_models[src[0]])
        assert a.expert_keys == b.expert_keys
        for le in a.expert_keys:
            assert a.read_expert(*le) == b.read_expert(*le)


def test_dequantize_matches_gguf_py_on_every_type(test_models):
    seen = set()
    for path in test_models.values():
        for t in gguf.GGUFReader(path).tensors:
            if t.tensor_type not in QUANT_TYPES or (t.tensor_type, t.name) in seen:
                continue
            seen.add((t.tensor_type, t.name))
            shape = tuple(int(d) for d in reversed(t.shape))
            raw = np.asarray(t.data).view(np.uint8).reshape(-1)
            ours = promoe_gguf.dequantize(raw, t.tensor_type.name, shape)
            ref = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
            assert ours.dtype == np.float32 and ours.shape == shape
            assert np.array_equal(ours, ref), (path, t.name, t.tensor_type.name)
    types = {qt for qt, _ in seen}
    missing = set(QUANT_TYPES) - types
    assert not missing, f"no llama.cpp-quantized data for {[m.name for m in missing]}"


def test_one_block_dequantizes_as_gguf_py(test_models):
    """A single block, as split_unit probes each type with (its 4 bytes of Q5 high bits then sit at an
    offset an int32 view refuses): the first block of every quantized tensor type, against gguf-py."""
    seen = set()
    for path in test_models.values():
        for t in gguf.GGUFReader(path).tensors:
            if t.tensor_type not in QUANT_TYPES or t.tensor_type in seen:
                continue
            seen.add(t.tensor_type)
            qt = QUANT_TYPES[t.tensor_type]
            raw = np.asarray(t.data).view(np.uint8).reshape(-1)[:qt.type_size]
            ours = promoe_gguf.dequantize(raw, t.tensor_type.name, (qt.block_size,))
            ref = gguf.quants.dequantize(raw, t.tensor_type).reshape(-1)
            assert np.array_equal(ours, ref), (path, t.name, t.tensor_type.name)
    assert {gguf.GGMLQuantizationType.Q5_0, gguf.GGMLQuantizationType.Q5_1} <= seen


def test_resident_tensors_match_gguf_py(test_models, tmp_path):
    key = next(k for k in test_models if k[1] == "Q4_K_M" and k[2] == "default")
    model = open_model(test_models[key])
    conv = open_model(convert(test_models[key], tmp_path / "c", progress=False))
    reader = gguf.GGUFReader(test_models[key])
    names = [t.name for t in reader.tensors if "_exps" not in t.name]
    assert sorted(model.resident_names) == sorted(names) == sorted(conv.resident_names)
    for t in reader.tensors:
        if t.name in names:
            ref = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
            assert np.array_equal(model.tensor_f32(t.name).reshape(ref.shape), ref), t.name
            assert np.array_equal(conv.tensor_f32(t.name).reshape(ref.shape), ref), t.name
    assert conv.metadata("general.architecture") == model.metadata("general.architecture")
    assert conv.metadata("tokenizer.ggml.tokens") == model.metadata("tokenizer.ggml.tokens")


def test_contract_errors_for_dense_layers_and_ranges(test_models):
    key = next(k for k in test_models if k[0] == "deepseek" and k[2] == "default")
    model = open_model(test_models[key])
    assert model.config.n_leading_dense >= 1
    with pytest.raises(ModelError, match="dense"):
        model.read_expert(0, 0)
    with pytest.raises(ModelError, match="expert 999"):
        model.read_expert(model.config.n_layers - 1, 999)
    with pytest.raises(ModelError, match="layer 99"):
        model.read_expert(99, 0)


def test_info_json(test_models, capsys):
    key = next(k for k in test_models if k[0] == "llama" and k[1] == "Q4_K_M" and k[2] == "default")
    assert promoe_main(["info", test_models[key], "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    model = open_model(test_models[key])
    reader = gguf.GGUFReader(test_models[key])
    exps = [t for t in reader.tensors if "_exps" in t.name]
    assert info["arch"] == "llama" and info["n_experts"] == model.config.n_experts
    assert info["expert_bytes_total"] == sum(int(t.n_bytes) for t in exps)
    assert info["resident_bytes_total"] == sum(int(t.n_bytes) for t in reader.tensors) - info["expert_bytes_total"]
    gate_types = {t.tensor_type.name for t in exps if "gate" in t.name}
    assert set(info["quant_types"]["gate"]) == gate_types
    mem = info["memory"]                    # Engine.memory's breakdown per budget (tests/test_memory.py)
    assert mem["cache_rate=0.25"]["total"] < mem["cache_rate=0.5"]["total"] < mem["cache_rate=1.0"]["total"]
    assert all(set(m) >= {"resident", "kv_cache", "expert_arena", "workspace", "total"} for m in mem.values())
    assert promoe_main(["info", test_models[key]]) == 0
    assert "top-2" in capsys.readouterr().out
