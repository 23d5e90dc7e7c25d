"""The validation pass at open, per architecture: one metadata value of a real factory
model changed, and the error must name the key, its value and the tensor or rule it contradicts.

Expected shapes come from the factory's spec (promoe_gguf/testing/factory.py), not from the validator.
"""
import math
import re

import pytest
from gguf import GGUFValueType as V

from gguf_edit import GGUFTemplate
from promoe_gguf import ModelError, open_model
from promoe_gguf.engine import Engine
from semantic_fuzz import memory_limit

ARCHS = ("llama", "qwen2moe", "qwen3moe", "olmoe", "deepseek", "deepseek2", "granitemoe", "glm4moe", "gpt-oss",
         "qwen35moe")
U32, I32, F32 = V.UINT32, V.INT32, V.FLOAT32


def _open_changed(test_models, tmp_path, arch, changes, variant="default"):
    quant = "Q4_K_M" if (arch, "Q4_K_M", variant) in test_models else "MXFP4_MOE"       # gpt-oss ships MXFP4
    t = GGUFTemplate(test_models[(arch, quant, variant)])
    path = t.write(tmp_path / "m.gguf", {f"{arch}.{k}" if not k.startswith("general.") else k: v
                                        for k, v in changes.items()})
    with pytest.raises(ModelError) as err:
        open_model(path)
    msg = str(err.value)
    assert msg.startswith(path) and "\n" not in msg
    return msg


def _cases(factory, arch):
    """(id, {key: (value, type)}, [regexes the message must match]) for one architecture."""
    s = factory.spec(arch)
    d, H, Hkv, D, E = s["n_embd"], s["n_head"], s["n_head_kv"], s["head_dim"], s["n_expert"]
    first_moe = s["n_dense"]
    out = [
        ("vocab_vs_embedding", {"vocab_size": (s["n_vocab"] - 1, U32)},
         [rf"{arch}.vocab_size = {s['n_vocab'] - 1}", rf"token_embd.weight has shape \({s['n_vocab']}, {d}\)"]),
        ("expert_count_vs_router", {"expert_count": (E + 1, U32)},
         [rf"{arch}.expert_count = {E + 1}", rf"blk.{first_moe}.ffn_gate_inp.weight has shape \({E}, {d}\)"]),
        ("top_k_within_experts", {"expert_used_count": (E + 1, U32)},
         [rf"{arch}.expert_used_count = {E + 1}", "must not exceed expert_count"]),
        ("kv_heads_divide_heads", {"attention.head_count_kv": (3, U32)},
         [rf"{arch}.attention.head_count = {H}", rf"{arch}.attention.head_count_kv = 3", "multiple"]),
        ("rope_dims_even", {"rope.dimension_count": (31, U32)},
         [rf"{arch}.rope.dimension_count = 31", "must be even"]),
        ("block_count_too_big", {"block_count": (s.n_blocks + 1, U32)},
         [rf"{arch}.block_count = {s.n_blocks + 1}", rf"no tensor of layer {s.n_blocks}"]),
        ("block_count_too_small", {"block_count": (s.n_blocks - 1, U32)},
         [rf"{arch}.block_count = {s.n_blocks - 1}", rf"blk\.{s.n_blocks - 1}\.\S+ belongs to layer"]),
        ("rms_eps_nan", {"attention.layer_norm_rms_epsilon": (math.nan, F32)},
         [rf"{arch}.attention.layer_norm_rms_epsilon = nan", "must be finite"]),
        ("rope_base_zero", {"rope.freq_base": (0.0, F32)}, [rf"{arch}.rope.freq_base = 0", "> 1"]),
        ("context_unbounded", {"context_length": (2**32 - 1, U32)},
         [rf"{arch}.context_length = 4294967295", "<= 1.67772e\\+07"]),
        ("rope_dims_huge", {"rope.dimension_count": (2**32 - 1, U32)},      # once a 16 GiB allocation
         [rf"{arch}.rope.dimension_count = 4294967295"]),
        ("negative_count", {"expert_count": (-1, I32)}, [rf"'{arch}.expert_count' = -1"]),
    ]
    if arch == "deepseek2":
        dk = s["qk_nope"] + s["qk_rope"]
        out += [
            ("heads_x_dims_vs_q", {"attention.key_length_mla": (dk + 16, U32)},
             [rf"{arch}.attention.head_count = {H}", rf"{arch}.attention.key_length_mla = {dk + 16}",
              rf"blk.0.attn_q.weight has shape \({H * dk}, {d}\)"]),
            ("rope_within_head_dim", {"rope.dimension_count": (dk + 2, U32)},
             [rf"{arch}.rope.dimension_count = {dk + 2}", "within the query/key head dimension"]),
            ("mla_kv_rank", {"attention.kv_lora_rank": (256, U32)},
             [rf"{arch}.attention.kv_lora_rank = 256"]),
            ("mla_value_vs_v_b", {"attention.value_length_mla": (s["v_head"] * 2, U32)},
             [rf"{arch}.attention.value_length_mla = {s['v_head'] * 2}", r"blk.0.attn_v_b.weight has shape"]),
            ("yarn_factor_negative", {"rope.scaling.factor": (-40.0, F32)},
             [rf"{arch}.rope.scaling.factor = -40", "> 0"]),
        ]
    else:
        Dk = D if arch in ("qwen3moe", "gpt-oss", "qwen35moe") else d // H
        L = 1 if arch == "qwen35moe" else 0            # the first layer with attention (qwen35moe's 0 is recurrent)
        Q = 2 * H * Dk if arch == "qwen35moe" else H * Dk       # qwen35moe: a gate beside each query head
        out += [
            ("heads_x_dims_vs_q", {"attention.key_length": (Dk // 2, U32), "rope.dimension_count": (16, U32)},
             [rf"{arch}.attention.key_length = {Dk // 2}", rf"{arch}.attention.head_count = {H}",
              rf"blk.{L}.attn_q.weight has shape \({Q}, {d}\)"]),
            ("value_dims_vs_v", {"attention.value_length": (Dk + 32, U32)},
             [rf"{arch}.attention.value_length = {Dk + 32}", rf"blk.{L}.attn_v.weight has shape \({Hkv * Dk}, {d}\)"]),
            ("rope_within_head_dim", {"rope.dimension_count": (Dk + 2, U32)},
             [rf"{arch}.rope.dimension_count = {Dk + 2}", "within the head dimension"]),
        ]
    # the expert FF width: its own key where the arch has one, else feed_forward_length
    ff_key = "expert_feed_forward_length" if arch in ("qwen2moe", "qwen3moe", "deepseek", "deepseek2", "glm4moe",
                                                      "gpt-oss", "qwen35moe") \
        else "feed_forward_length"
    out.append(("expert_width_vs_experts", {ff_key: (s["n_ff_exp"] + 32, U32)},
                [rf"{arch}.{ff_key} = {s['n_ff_exp'] + 32}",
                 rf"blk.{first_moe}.ffn_gate_exps.weight has shape \({E}, {s['n_ff_exp']}, {d}\)"]))
    if s["n_dense"]:
        out += [
            ("leading_dense_too_few", {"leading_dense_block_count": (0, U32)},
             [rf"{arch}.leading_dense_block_count = 0", r"blk.0.ffn_gate_inp.weight is missing"]),
            ("leading_dense_too_many", {"leading_dense_block_count": (2, U32)},
             [rf"{arch}.leading_dense_block_count = 2", r"blk.1.ffn_gate_inp.weight is present"]),
            ("dense_width", {"feed_forward_length": (s["n_ff"] + 32, U32)},
             [rf"{arch}.feed_forward_length = {s['n_ff'] + 32}", rf"blk.0.ffn_gate.weight has shape \({s['n_ff']}, {d}\)"]),
            ("shared_expert_count", {"expert_shared_count": (s["n_shared"] % 2 + 1, U32)},
             [rf"{arch}.expert_shared_count = {s['n_shared'] % 2 + 1}",
              rf"blk.1.ffn_gate_shexp.weight has shape \({s['n_ff_exp'] * s['n_shared']}, {d}\)"]),
        ]
    if arch == "qwen2moe":
        out.append(("shared_expert_width", {"expert_shared_feed_forward_length": (256, U32)},
                    [rf"{arch}.expert_shared_feed_forward_length = 256",
                     rf"blk.0.ffn_gate_shexp.weight has shape \({s['n_ff_shexp']}, {d}\)"]))
    if arch == "granitemoe":
        out += [("residual_scale_negative", {"residual_scale": (-0.5, F32)}, [rf"{arch}.residual_scale = -0.5", ">= 0"]),
                ("logit_scale_inf", {"logit_scale": (math.inf, F32)}, [rf"{arch}.logit_scale = inf", "finite"])]
    if arch == "glm4moe":      # the NextN block after the last layer: in the file, never run
        out += [("nextn_all_layers", {"nextn_predict_layers": (s.n_blocks, U32)},
                 [rf"{arch}.nextn_predict_layers = {s.n_blocks}", rf"below {arch}.block_count = {s.n_blocks}"]),
                ("nextn_block_missing", {"block_count": (s.n_blocks + 1, U32), "nextn_predict_layers": (2, U32)},
                 [rf"{arch}.block_count = {s.n_blocks + 1}", rf"no tensor of layer {s.n_blocks}"])]
    if arch == "gpt-oss":      # every other layer attends within the window: a window of 0 sees nothing
        out += [("sliding_window_zero", {"attention.sliding_window": (0, U32)},
                 [rf"'{arch}.attention.sliding_window' = 0", "integer >= 1"]),
                ("sliding_window_unbounded", {"attention.sliding_window": (2**32 - 1, U32)},
                 [rf"{arch}.attention.sliding_window = 4294967295", "<= 1.67772e\\+07"])]
    if arch == "qwen35moe":    # the gated delta net's ssm.* keys against its tensors and each other
        S, Hk, Hv = s["ssm_state"], s["ssm_k_heads"], s["ssm_v_heads"]
        C = 2 * Hk * S + Hv * S
        out += [("ssm_state_vs_qkv", {"ssm.state_size": (S * 2, U32), "ssm.inner_size": (Hv * S * 2, U32)},
                 [rf"{arch}.ssm.state_size = {S * 2}", rf"blk.0.attn_qkv.weight has shape \({C}, {d}\)"]),
                ("ssm_inner_vs_heads", {"ssm.inner_size": (Hv * S + 1, U32)},
                 [rf"{arch}.ssm.inner_size = {Hv * S + 1}", "multiple of ssm.time_step_rank"]),
                ("ssm_groups_vs_v_heads", {"ssm.group_count": (3, U32)},
                 [rf"{arch}.ssm.group_count = 3", "multiple of ssm.group_count"]),
                ("ssm_v_heads_vs_width", {"ssm.time_step_rank": (Hv * 2, U32)},
                 [rf"{arch}.ssm.time_step_rank = {Hv * 2}", "ssm.state_size wide"]),
                ("ssm_conv_one_tap", {"ssm.conv_kernel": (1, U32)}, [rf"{arch}.ssm.conv_kernel = 1", "at least 2"]),
                ("ssm_conv_vs_taps", {"ssm.conv_kernel": (s["ssm_conv"] + 1, U32)},
                 [rf"{arch}.ssm.conv_kernel = {s['ssm_conv'] + 1}", rf"blk.0.ssm_conv1d.weight has shape \({C}, {s['ssm_conv']}\)"]),
                ("attention_interval_vs_tensors", {"full_attention_interval": (3, U32)},
                 [r"blk.1.attn_qkv.weight is missing"]),
                ("rope_sections_not_four", {"rope.dimension_sections": ([4, 4], V.ARRAY)},
                 [rf"{arch}.rope.dimension_sections = \[4, 4\]", "array of 4"]),
                ("recurrent_flags_vs_tensors", {"attention.recurrent_layers": ([0, 1], V.ARRAY)},
                 [rf"{arch}.attention.recurrent_layers \(R recurrent, A attention\) = 'AR'",
                  r"blk.0.attn_q.weight is missing"]),
                ("recurrent_flags_short", {"attention.recurrent_layers": ([1], V.ARRAY)},
                 [rf"{arch}.attention.recurrent_layers has 1 flags", "a flag for every layer"]),
                ("recurrent_flags_not_bool", {"attention.recurrent_layers": ([1, 7], V.ARRAY)},
                 [rf"'{arch}.attention.recurrent_layers' = \[1, 7\]", "array of booleans"])]
    if arch == "deepseek":
        out.append(("weights_scale_inf", {"expert_weights_scale": (math.inf, F32)},
                    [rf"{arch}.expert_weights_scale = inf", "finite"]))
    return out


def _all_cases():
    from promoe_gguf.testing import factory
    return [(arch, cid, changes, want) for arch in ARCHS for cid, changes, want in _cases(factory, arch)]


@pytest.mark.parametrize("arch,cid,changes,want", _all_cases(), ids=[f"{a}-{c}" for a, c, _, _ in _all_cases()])
def test_validation_names_key_value_and_tensor_or_rule(test_models, tmp_path, arch, cid, changes, want):
    msg = _open_changed(test_models, tmp_path, arch, changes)
    for pattern in want:
        assert re.search(pattern, msg), f"{pattern!r} not in {msg!r}"


def test_v3_routing_rules(test_models, tmp_path):
    """DeepSeek-V3 style: expert groups must divide the experts; the used groups must hold top-k."""
    msg = _open_changed(test_models, tmp_path, "deepseek2", {"expert_group_count": (3, U32)}, "v3")
    assert "deepseek2.expert_group_count = 3" in msg and "must divide expert_count" in msg
    msg = _open_changed(test_models, tmp_path, "deepseek2", {"expert_group_used_count": (5, U32)}, "v3")
    assert "deepseek2.expert_group_used_count = 5" in msg and "must not exceed" in msg
    msg = _open_changed(test_models, tmp_path, "deepseek2", {"attention.q_lora_rank": (256, U32)}, "v3")
    assert "deepseek2.attention.q_lora_rank = 256" in msg and "blk.0.attn_q_a.weight has shape (512, 256)" in msg


def test_absent_key_names_its_default(test_models, tmp_path):
    """An absent key is named with where its value came from."""
    msg = _open_changed(test_models, tmp_path, "qwen2moe", {"embedding_length": (255, U32)})
    assert "qwen2moe.attention.key_length (absent" in msg and "qwen2moe.embedding_length" in msg


def test_every_factory_model_passes(test_models):
    """No false alarms: every layout, quant type and variant the factory makes opens."""
    for key, path in test_models.items():
        assert open_model(path).config.arch == key[0]


def test_kv_cache_is_sized_before_allocating(test_models, tmp_path, factory):
    """A context the metadata allows but memory does not: ModelError before the KV cache exists."""
    s = factory.spec("llama")
    gib = (1 << 24) * s.n_blocks * s["n_head_kv"] * 2 * s["head_dim"] * 4 / 2**30    # K and V, float32
    t = GGUFTemplate(test_models[("llama", "Q4_K_M", "default")])
    path = t.write(tmp_path / "m.gguf", {"llama.context_length": (1 << 24, U32)})
    with memory_limit(1 << 30), pytest.raises(ModelError, match=rf"KV cache of 16777216 positions needs {gib:.2f} GiB"):
        Engine(path, n_ctx=1 << 24)
    with Engine(path, n_ctx=64) as eng:            # the same file, a context that fits
        assert eng.logits([1, 2]).shape == (2, 260)


def test_tokenizer_llama_cpp_refuses_is_a_model_error(tmp_path):
    """Generation tokenizes through llama.cpp; a tokenizer it refuses is bad input, named."""
    from promoe_gguf import DEFAULT_MODEL
    path = GGUFTemplate(DEFAULT_MODEL).write(tmp_path / "t.gguf", {"tokenizer.ggml.model": ("nonsense", V.STRING)})
    with Engine(path) as eng, pytest.raises(ModelError, match=rf"^{re.escape(path)}: llama.cpp cannot load the tokenizer"):
        eng.tokenize("def f(")


def test_qwen35moe_recurrent_flags_decide_as_the_interval_does(test_models, tmp_path):
    """attention.recurrent_layers (llama.cpp reads it before full_attention_interval): flags that say what
    the interval said give the same logits with the interval key removed."""
    import numpy as np
    src = test_models[("qwen35moe", "Q4_K_M", "default")]
    path = GGUFTemplate(src).write(tmp_path / "flags.gguf", {"qwen35moe.attention.recurrent_layers": ([1, 0], V.ARRAY),
                                                            "qwen35moe.full_attention_interval": None})
    tokens = list(range(1, 20))
    with Engine(src, n_ctx=64) as a, Engine(path, n_ctx=64) as b:
        assert np.array_equal(a.logits(tokens), b.logits(tokens))
