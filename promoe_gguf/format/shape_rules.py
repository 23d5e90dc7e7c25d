"""The rules of the validation pass (validate.py), as data and small generators:

  cross_field_rules(cfg)        (fields, holds, rule) between config values: KV heads divide heads,
                                top-k within the experts, expert groups, rope dims, MLA lengths
  global_expectations(cfg)      Expect(tensor, shape, fields, formula) for the embedding and head
  layer_expectations(chk, L)    the same for every tensor of layer L: attention per family (or MLA),
                                dense / routed / shared feed-forward

Shapes are in numpy order: [out, in] for a matrix, [n_expert, out, in] for stacked experts.
`chk` is validate's checker: `chk.cfg`, `chk.shapes`, and `chk.absent(tensor, fields, why)` for
tensors that must not be there.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .config import LEADING_DENSE, LINEAR_ATTENTION, SHARED_FROM_COUNT, ModelConfig

# the norm before the feed-forward block, where a family names it otherwise than ffn_norm
FFN_NORM = {"glm4moe": "post_attention_norm", "gpt-oss": "post_attention_norm", "qwen35moe": "post_attention_norm"}
# biases llama.cpp requires on the attention output, the router and every expert matrix, and per-head
# attention sinks (gpt-oss)
BIASED_EXPERTS = ("gpt-oss",)


# config fields of a gated delta net, as validation messages name them
SSM_FIELDS = {"ssm_conv": "conv_kernel", "ssm_inner": "inner_size", "ssm_state": "state_size",
              "ssm_v_heads": "v_heads", "ssm_groups": "k_heads", "attn_interval": "interval"}


def ffn_norm_name(c: ModelConfig, layer: int) -> str:
    return f"blk.{layer}.{FFN_NORM.get(c.arch, 'ffn_norm')}.weight"


def config_field(cfg: ModelConfig, name: str):
    """A config field by name: "rope.base" reads cfg.rope.base, "key_length_mla" cfg.extra (else key_length)."""
    if name.startswith("rope."):
        return getattr(cfg.rope, name[5:])
    if name in SSM_FIELDS:
        la = cfg.linear_attention
        if name == "attn_interval" and la.recurrent:          # the per-layer flags decide
            return "".join("R" if r else "A" for r in la.recurrent)
        return getattr(la, SSM_FIELDS[name])
    if name in ("key_length_mla", "value_length_mla"):
        return cfg.extra.get(name) or (cfg.head_dim_k if name == "key_length_mla" else cfg.head_dim_v)
    return getattr(cfg, name)


@dataclass(frozen=True)
class Expect:
    """Tensor `tensor` must have `shape`, which `fields` determine as `formula` says."""
    tensor: str
    shape: tuple
    fields: tuple
    formula: str
    required: bool = True


def cross_field_rules(c: ModelConfig):
    """(fields, holds, rule) for rules between config values (no tensor needed)."""
    groups_ok = c.n_expert_groups <= c.n_experts and c.n_experts % c.n_expert_groups == 0
    group_size = c.n_experts // c.n_expert_groups if groups_ok else 0
    yield (("n_head", "n_head_kv"), c.n_head % c.n_head_kv == 0,
           "head_count must be a multiple of head_count_kv (each KV head serves a whole group of heads)")
    yield (("n_experts_used", "n_experts"), c.n_experts_used <= c.n_experts,
           "expert_used_count must not exceed expert_count")
    yield (("n_leading_dense", "n_layers"), c.n_leading_dense < c.n_layers,
           "leading_dense_block_count must leave at least one MoE layer")
    yield (("rope.n_dims",), c.rope.n_dims % 2 == 0, "rope dimension count must be even (dims rotate in pairs)")
    if c.arch != "deepseek2":
        yield (("rope.n_dims", "head_dim_k"), c.rope.n_dims <= c.head_dim_k,
               "rope dimension count must be within the head dimension (key_length)")
    yield (("n_expert_groups", "n_experts"), groups_ok, "expert_group_count must divide expert_count")
    if c.n_expert_groups > 1:
        yield (("n_expert_groups", "n_experts"), group_size >= 2,
               "each expert group needs at least 2 experts (a group scores by its top 2)")
    if c.n_expert_groups > 1:            # (one group: no group-limited routing, the used count is moot)
        yield (("n_group_used", "n_expert_groups"), c.n_group_used <= c.n_expert_groups,
               "expert_group_used_count must not exceed expert_group_count")
        yield (("n_group_used", "n_expert_groups", "n_experts_used"),
               c.n_group_used * group_size >= c.n_experts_used,
               "the used expert groups must hold at least expert_used_count experts")
    la = c.linear_attention
    if la is not None:
        yield (("ssm_inner", "ssm_v_heads"), la.inner_size % la.v_heads == 0,
               "ssm.inner_size must be a multiple of ssm.time_step_rank (the value heads share it)")
        yield (("ssm_inner", "ssm_v_heads", "ssm_state"), la.inner_size == la.v_heads * la.state_size,
               "each value head must be ssm.state_size wide (the delta net's state is square)")
        yield (("ssm_v_heads", "ssm_groups"), la.v_heads % la.k_heads == 0,
               "ssm.time_step_rank must be a multiple of ssm.group_count (value heads share key heads)")
        yield (("ssm_conv",), la.conv_kernel >= 2, "ssm.conv_kernel must be at least 2 (a causal conv with a state)")
    if c.arch == "qwen35moe":
        yield (("rope.sections",), sum(c.rope.sections) >= 1,
               "rope.dimension_sections must give at least one pair a section (pairs take sections in turn)")
    if c.rope.scaling == "yarn":
        orig = c.rope.orig_ctx or c.n_ctx_train
        yield (("rope.orig_ctx", "n_ctx_train"), orig >= 1,
               "YaRN needs the original context length (rope.scaling.original_context_length or context_length)")
    if c.arch == "deepseek2":
        yield (("kv_lora_rank",), c.kv_lora_rank >= 1, "deepseek2's latent attention (MLA) needs kv_lora_rank >= 1")
        yield (("rope.n_dims", "key_length_mla"), c.rope.n_dims <= config_field(c, "key_length_mla"),
               "rope dimension count must be within the query/key head dimension (key_length_mla)")
        if c.extra.get("key_length_mla"):
            # the MQA-over-latent form: key_length = kv_lora_rank + rope dims, value_length = kv_lora_rank
            yield (("key_length_mla", "head_dim_k", "kv_lora_rank", "rope.n_dims"),
                   c.head_dim_k == c.kv_lora_rank + c.rope.n_dims,
                   "with key_length_mla present, key_length must be kv_lora_rank + rope dimension count")
            yield (("value_length_mla", "head_dim_v", "kv_lora_rank"), c.head_dim_v == c.kv_lora_rank,
                   "with value_length_mla present, value_length must be kv_lora_rank")


def global_expectations(c: ModelConfig, shapes: dict):
    d = c.n_embd
    yield Expect("token_embd.weight", (c.n_vocab, d), ("n_vocab", "n_embd"), "(vocab_size, embedding_length)")
    yield Expect("output_norm.weight", (d,), ("n_embd",), "(embedding_length,)")
    yield Expect("output.weight", (c.n_vocab, d), ("n_vocab", "n_embd"), "(vocab_size, embedding_length)",
                 required=False)


def _linear_attention_expectations(c: ModelConfig, p: str):
    """A gated delta net layer (qwen35moe): the ssm.* keys size it."""
    la, d = c.linear_attention, c.n_embd
    C, V, Hv = la.conv_channels, la.inner_size, la.v_heads
    conv = ("ssm_groups", "ssm_state", "ssm_inner")
    yield Expect(p + "attn_qkv.weight", (C, d), conv + ("n_embd",),
                 "(2 x ssm.group_count x ssm.state_size + ssm.inner_size, embedding_length)")
    yield Expect(p + "attn_gate.weight", (V, d), ("ssm_inner", "n_embd"), "(ssm.inner_size, embedding_length)")
    yield Expect(p + "ssm_conv1d.weight", (C, la.conv_kernel), conv + ("ssm_conv",),
                 "(2 x ssm.group_count x ssm.state_size + ssm.inner_size, ssm.conv_kernel)")
    yield Expect(p + "ssm_dt.bias", (Hv,), ("ssm_v_heads",), "(ssm.time_step_rank,)")
    yield Expect(p + "ssm_a", (Hv,), ("ssm_v_heads",), "(ssm.time_step_rank,)")
    yield Expect(p + "ssm_beta.weight", (Hv, d), ("ssm_v_heads", "n_embd"), "(ssm.time_step_rank, embedding_length)")
    yield Expect(p + "ssm_alpha.weight", (Hv, d), ("ssm_v_heads", "n_embd"), "(ssm.time_step_rank, embedding_length)")
    yield Expect(p + "ssm_norm.weight", (la.head_v,), ("ssm_inner", "ssm_v_heads"),
                 "(ssm.inner_size / ssm.time_step_rank,)")
    yield Expect(p + "ssm_out.weight", (d, V), ("n_embd", "ssm_inner"), "(embedding_length, ssm.inner_size)")


def _attention_expectations(c: ModelConfig, p: str, shapes: dict):
    d, H, Hkv, Dk, Dv = c.n_embd, c.n_head, c.n_head_kv, c.head_dim_k, c.head_dim_v
    q_fields, kv_fields = ("n_head", "head_dim_k", "n_embd"), ("n_head_kv", "head_dim_k", "n_embd")
    if c.arch in LINEAR_ATTENTION:       # gated attention: a gate beside each query head
        yield Expect(p + "attn_q.weight", (2 * H * Dk, d), q_fields, "(2 x head_count x key_length, embedding_length)")
    else:
        yield Expect(p + "attn_q.weight", (H * Dk, d), q_fields, "(head_count x key_length, embedding_length)")
    yield Expect(p + "attn_k.weight", (Hkv * Dk, d), kv_fields, "(head_count_kv x key_length, embedding_length)")
    yield Expect(p + "attn_v.weight", (Hkv * Dv, d), ("n_head_kv", "head_dim_v", "n_embd"),
                 "(head_count_kv x value_length, embedding_length)")
    yield Expect(p + "attn_output.weight", (d, H * Dv), ("n_embd", "n_head", "head_dim_v"),
                 "(embedding_length, head_count x value_length)")
    yield Expect(p + "attn_q.bias", (H * Dk,), ("n_head", "head_dim_k"), "(head_count x key_length,)", required=False)
    yield Expect(p + "attn_k.bias", (Hkv * Dk,), ("n_head_kv", "head_dim_k"), "(head_count_kv x key_length,)",
                 required=False)
    yield Expect(p + "attn_v.bias", (Hkv * Dv,), ("n_head_kv", "head_dim_v"), "(head_count_kv x value_length,)",
                 required=False)
    if c.arch in ("qwen3moe", "glm4moe", "qwen35moe"):     # RMS norm per head (GLM-4.5's larger model has them)
        has = p + "attn_q_norm.weight" in shapes or c.arch == "qwen35moe"
        yield Expect(p + "attn_q_norm.weight", (Dk,), ("head_dim_k",), "(key_length,)", required=has)
        yield Expect(p + "attn_k_norm.weight", (Dk,), ("head_dim_k",), "(key_length,)", required=has)
    if c.arch in BIASED_EXPERTS:
        yield Expect(p + "attn_output.bias", (d,), ("n_embd",), "(embedding_length,)")
        yield Expect(p + "attn_sinks.weight", (H,), ("n_head",), "(head_count,)")
    if c.arch == "olmoe":        # RMS norm over the whole projection
        yield Expect(p + "attn_q_norm.weight", (H * Dk,), ("n_head", "head_dim_k"), "(head_count x key_length,)")
        yield Expect(p + "attn_k_norm.weight", (Hkv * Dk,), ("n_head_kv", "head_dim_k"),
                     "(head_count_kv x key_length,)")


def _mla_expectations(chk, p: str):
    """DeepSeek2 multi-head latent attention (see model/deepseek.py for the computation)."""
    c, shapes = chk.cfg, chk.shapes
    d, H, kvl, ql, rot = c.n_embd, c.n_head, c.kv_lora_rank, c.q_lora_rank, c.rope.n_dims
    dk_f, dv_f = "key_length_mla", "value_length_mla"        # (absent: key_length / value_length)
    dk, dv = config_field(c, dk_f), config_field(c, dv_f)
    nope = dk - rot
    if ql:
        chk.absent(p + "attn_q.weight", ("q_lora_rank",), "q_lora_rank > 0 means q comes from attn_q_a/attn_q_b")
        yield Expect(p + "attn_q_a.weight", (ql, d), ("q_lora_rank", "n_embd"), "(q_lora_rank, embedding_length)")
        yield Expect(p + "attn_q_a_norm.weight", (ql,), ("q_lora_rank",), "(q_lora_rank,)")
        yield Expect(p + "attn_q_b.weight", (H * dk, ql), ("n_head", dk_f, "q_lora_rank"),
                     "(head_count x key_length_mla, q_lora_rank)")
    else:
        chk.absent(p + "attn_q_a.weight", ("q_lora_rank",), "q_lora_rank = 0 means q comes from attn_q alone")
        yield Expect(p + "attn_q.weight", (H * dk, d), ("n_head", dk_f, "n_embd"),
                     "(head_count x key_length_mla, embedding_length)")
    yield Expect(p + "attn_kv_a_mqa.weight", (kvl + rot, d), ("kv_lora_rank", "rope.n_dims", "n_embd"),
                 "(kv_lora_rank + rope dimension count, embedding_length)")
    yield Expect(p + "attn_kv_a_norm.weight", (kvl,), ("kv_lora_rank",), "(kv_lora_rank,)")
    if p + "attn_kv_b.weight" in shapes:
        yield Expect(p + "attn_kv_b.weight", (H * (nope + dv), kvl), ("n_head", dk_f, "rope.n_dims", dv_f, "kv_lora_rank"),
                     "(head_count x (key_length_mla - rope dims + value_length_mla), kv_lora_rank)")
    else:
        yield Expect(p + "attn_k_b.weight", (H, kvl, nope), ("n_head", "kv_lora_rank", dk_f, "rope.n_dims"),
                     "(head_count, kv_lora_rank, key_length_mla - rope dimension count)")
        yield Expect(p + "attn_v_b.weight", (H, dv, kvl), ("n_head", dv_f, "kv_lora_rank"),
                     "(head_count, value_length_mla, kv_lora_rank)")
    yield Expect(p + "attn_output.weight", (d, H * dv), ("n_embd", "n_head", dv_f),
                 "(embedding_length, head_count x value_length_mla)")


def _routed_expectations(chk, layer: int, p: str):
    c, shapes = chk.cfg, chk.shapes
    d, E, F = c.n_embd, c.n_experts, c.n_ff_exp
    moe = ("n_leading_dense",) if c.n_leading_dense or c.arch in LEADING_DENSE else ()
    yield Expect(p + "ffn_gate_inp.weight", (E, d), moe + ("n_experts", "n_embd"),
                 "(expert_count, embedding_length) (the router of a MoE layer)")
    yield Expect(p + "exp_probs_b.bias", (E,), ("n_experts",), "(expert_count,)", required=False)
    w = ("n_experts", "n_ff_exp", "n_embd")
    if p + "ffn_gate_up_exps.weight" in shapes:
        yield Expect(p + "ffn_gate_up_exps.weight", (E, 2 * F, d), w, "(expert_count, 2 x expert FF width, embedding_length)")
        yield Expect(p + "ffn_down_exps.weight", (E, d, F), w, "(expert_count, embedding_length, expert FF width)")
    elif p + "ffn_down_exps.weight" in shapes or p + "ffn_down.0.weight" not in shapes:
        yield Expect(p + "ffn_gate_exps.weight", (E, F, d), w, "(expert_count, expert FF width, embedding_length)")
        yield Expect(p + "ffn_up_exps.weight", (E, F, d), w, "(expert_count, expert FF width, embedding_length)")
        yield Expect(p + "ffn_down_exps.weight", (E, d, F), w, "(expert_count, embedding_length, expert FF width)")
    else:    # legacy: one 2D tensor per expert and matrix
        for e in range(E):
            yield Expect(f"{p}ffn_gate.{e}.weight", (F, d), w, "(expert FF width, embedding_length)")
            yield Expect(f"{p}ffn_up.{e}.weight", (F, d), w, "(expert FF width, embedding_length)")
            yield Expect(f"{p}ffn_down.{e}.weight", (d, F), w, "(embedding_length, expert FF width)")
        chk.absent(f"{p}ffn_down.{E}.weight", ("n_experts",), f"expert_count says layer {layer} has {E} experts")
    if c.arch in BIASED_EXPERTS:
        yield Expect(p + "ffn_gate_inp.bias", (E,), ("n_experts",), "(expert_count,)")
        yield Expect(p + "ffn_gate_exps.bias", (E, F), ("n_experts", "n_ff_exp"), "(expert_count, expert FF width)")
        yield Expect(p + "ffn_up_exps.bias", (E, F), ("n_experts", "n_ff_exp"), "(expert_count, expert FF width)")
        yield Expect(p + "ffn_down_exps.bias", (E, d), ("n_experts", "n_embd"), "(expert_count, embedding_length)")


def _shared_expectations(chk, p: str):
    c, shapes = chk.cfg, chk.shapes
    d, Fs = c.n_embd, c.n_ff_shexp
    present = p + "ffn_up_shexp.weight" in shapes
    if c.arch in SHARED_FROM_COUNT:
        if not c.n_expert_shared:
            chk.absent(p + "ffn_up_shexp.weight", ("n_expert_shared",), "expert_shared_count = 0 means no shared expert")
            return
    elif not present and not (c.arch in ("qwen2moe", "qwen35moe") and Fs):
        return                   # no shared expert (granitemoe: optional)
    if not Fs and present:
        Fs = shapes[p + "ffn_up_shexp.weight"][0]
    f = ("n_ff_shexp", "n_embd")
    yield Expect(p + "ffn_gate_shexp.weight", (Fs, d), f, "(shared expert FF width, embedding_length)")
    yield Expect(p + "ffn_up_shexp.weight", (Fs, d), f, "(shared expert FF width, embedding_length)")
    yield Expect(p + "ffn_down_shexp.weight", (d, Fs), f, "(embedding_length, shared expert FF width)")
    yield Expect(p + "ffn_gate_inp_shexp.weight", (d,), ("n_embd",), "(embedding_length,)",
                 required=c.arch in ("qwen2moe", "qwen35moe"))


def layer_expectations(chk, layer: int):
    c, p = chk.cfg, f"blk.{layer}."
    d = c.n_embd
    yield Expect(p + "attn_norm.weight", (d,), ("n_embd",), "(embedding_length,)")
    yield Expect(ffn_norm_name(c, layer), (d,), ("n_embd",), "(embedding_length,)")
    if c.arch == "deepseek2":
        yield from _mla_expectations(chk, p)
    elif c.linear_attention is not None:      # full_attention_interval decides which layers these are
        kind = _linear_attention_expectations(c, p) if c.is_recurrent(layer) else _attention_expectations(c, p, chk.shapes)
        yield from (replace(e, fields=("attn_interval", *e.fields)) for e in kind)
    else:
        yield from _attention_expectations(c, p, chk.shapes)
    if layer < c.n_leading_dense:
        f = ("n_leading_dense", "n_ff", "n_embd")
        chk.absent(p + "ffn_gate_inp.weight", ("n_leading_dense",),
                   f"leading_dense_block_count = {c.n_leading_dense} makes layer {layer} a dense layer")
        yield Expect(p + "ffn_gate.weight", (c.n_ff, d), f, "(feed_forward_length, embedding_length)")
        yield Expect(p + "ffn_up.weight", (c.n_ff, d), f, "(feed_forward_length, embedding_length)")
        yield Expect(p + "ffn_down.weight", (d, c.n_ff), f, "(embedding_length, feed_forward_length)")
        return
    yield from _routed_expectations(chk, layer, p)
    yield from _shared_expectations(chk, p)


