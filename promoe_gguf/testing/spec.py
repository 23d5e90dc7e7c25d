"""One description of a synthetic MoE GGUF per architecture: its metadata and its tensors (names,
GGUF shapes, how a float model fills them), as llama.cpp's loader names and sizes them.

Three writers read it: the factory (small models with random float weights, quantized by llama.cpp's
own quantizer: testing/factory.py), the real shapes (published sizes with random valid quant blocks:
bench/real_shapes.py) and the simulator's header-only models (sim/shapes.py, whose config is parsed
from this metadata exactly as from a file). Adding an architecture touches its config and rules
(format/), its model file (model/) and the branches below.

    ModelSpec          the numbers: widths, counts, heads, per-arch extras (MLA ranks, YaRN, window...)
    model_tensors()    every tensor of the file in llama.cpp's order: TensorSpec(name, ne, fill, scale)
    write_metadata()   the keys convert_hf_to_gguf writes for the arch, and the byte vocabulary
    metadata()         the same keys as a dict (a header-only model's metadata)

A float model fills each tensor by `fill`: "embedding" N(0, scale^2); "norm" 1 + 0.1 N; "linear" and
"experts" N * scale / sqrt(fan-in); "vector" N * scale; "decay" -exp(0.5 N) (a delta net's A, < 0); "kv_b" DeepSeek2's attn_k_b and attn_v_b cut
from one [heads x (nope + v), kv_lora] draw (as convert_hf_to_gguf splits kv_b_proj).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import gguf

from ..format import byte_vocab


@dataclass(frozen=True)
class ModelSpec:
    name: str
    arch: str
    n_layer: int              # the layers the forward pass runs (NextN blocks come after them)
    n_embd: int
    n_vocab: int
    n_ctx: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_expert: int
    n_used: int
    n_ff_exp: int
    n_ff: int                 # feed_forward_length: dense FFN width (leading dense layers), else nominal
    rms_eps: float
    rope_base: float
    n_ff_shexp: int = 0       # shared expert width (qwen2moe: one gated; deepseek*: n_shared * n_ff_exp)
    n_shared: int = 0
    n_dense: int = 0          # leading dense layers
    n_nextn: int = 0          # NextN (MTP) blocks after the last layer: written, never run
    hf_repo: str = ""         # where the numbers come from (a published model's config.json)
    variant: str = "default"
    extra: dict = field(default_factory=dict)

    @property
    def n_blocks(self) -> int:
        """block_count: the layers run plus the NextN blocks."""
        return self.n_layer + self.n_nextn

    def x(self, key: str, default=None):
        """An arch-specific number (MLA ranks, YaRN, window, Granite's scales...)."""
        return self.extra.get(key, default)

    def __getitem__(self, key: str):
        """spec["n_embd"] or spec["kv_lora"]: a field, else an extra."""
        if key in _FIELDS:
            return getattr(self, key)
        return self.extra[key]

    def with_(self, **kw) -> "ModelSpec":
        """A copy with fields and extras replaced (keys that are not fields go to extra)."""
        fields_kw = {k: v for k, v in kw.items() if k in _FIELDS}
        extra = {**self.extra, **{k: v for k, v in kw.items() if k not in _FIELDS}}
        return dataclasses.replace(self, **fields_kw, extra=extra)


_FIELDS = {f.name for f in dataclasses.fields(ModelSpec)}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    ne: tuple[int, ...]       # GGUF order: ne0 (the input / fastest dim) first
    fill: str                 # embedding | norm | linear | experts | vector | kv_b (see the module doc)
    scale: float = 1.0


# ---- tensors --------------------------------------------------------------------------------------

def is_recurrent(s: ModelSpec, i: int) -> bool:
    """qwen35moe: a gated linear-attention layer (llama.cpp's default: all but every 4th)."""
    return s.arch == "qwen35moe" and i < s.n_layer and (i + 1) % s.x("attn_interval", 4) != 0


def _linear_attention(s: ModelSpec, p: str):
    """Qwen3.5's gated delta net: qkv and gate projections, conv, decay (dt bias, A), beta, norm, out."""
    E, S, Hk, Hv = s.n_embd, s.x("ssm_state"), s.x("ssm_k_heads"), s.x("ssm_v_heads")
    conv = 2 * Hk * S + Hv * S
    yield TensorSpec(p + "attn_qkv.weight", (E, conv), "linear")
    yield TensorSpec(p + "attn_gate.weight", (E, Hv * S), "linear")
    yield TensorSpec(p + "ssm_conv1d.weight", (s.x("ssm_conv"), conv), "linear")
    yield TensorSpec(p + "ssm_dt.bias", (Hv,), "vector", 0.5)
    yield TensorSpec(p + "ssm_a", (Hv,), "decay")                  # -exp(A_log), as the converter writes it
    yield TensorSpec(p + "ssm_beta.weight", (E, Hv), "linear")
    yield TensorSpec(p + "ssm_alpha.weight", (E, Hv), "linear")
    yield TensorSpec(p + "ssm_norm.weight", (S,), "norm")
    yield TensorSpec(p + "ssm_out.weight", (Hv * S, E), "linear")


def _attention(s: ModelSpec, p: str):
    E, H, Hkv, D = s.n_embd, s.n_head, s.n_head_kv, s.head_dim
    if s.arch == "qwen35moe":        # gated attention: attn_q is [q | gate] per head
        yield TensorSpec(p + "attn_q.weight", (E, 2 * H * D), "linear")
        yield TensorSpec(p + "attn_k.weight", (E, Hkv * D), "linear")
        yield TensorSpec(p + "attn_v.weight", (E, Hkv * D), "linear")
        yield TensorSpec(p + "attn_q_norm.weight", (D,), "norm")
        yield TensorSpec(p + "attn_k_norm.weight", (D,), "norm")
        yield TensorSpec(p + "attn_output.weight", (H * D, E), "linear")
        return
    if s.arch == "deepseek2":
        nope, rope, vh, kvl, ql = s.x("qk_nope"), s.x("qk_rope"), s.x("v_head"), s.x("kv_lora"), s.x("q_lora", 0)
        if ql:
            yield TensorSpec(p + "attn_q_a.weight", (E, ql), "linear")
            yield TensorSpec(p + "attn_q_a_norm.weight", (ql,), "norm")
            yield TensorSpec(p + "attn_q_b.weight", (ql, H * (nope + rope)), "linear")
        else:
            yield TensorSpec(p + "attn_q.weight", (E, H * (nope + rope)), "linear")
        yield TensorSpec(p + "attn_kv_a_mqa.weight", (E, kvl + rope), "linear")
        yield TensorSpec(p + "attn_kv_a_norm.weight", (kvl,), "norm")
        if s.x("kv_b_unsplit"):          # old GGUFs: HF's kv_b_proj as it is
            yield TensorSpec(p + "attn_kv_b.weight", (kvl, H * (nope + vh)), "linear")
        else:                            # the current converter: k_b transposed, v_b, per head
            yield TensorSpec(p + "attn_k_b.weight", (nope, kvl, H), "kv_b")
            yield TensorSpec(p + "attn_v_b.weight", (kvl, vh, H), "kv_b")
        yield TensorSpec(p + "attn_output.weight", (H * vh, E), "linear")
        return
    yield TensorSpec(p + "attn_q.weight", (E, H * D), "linear")
    yield TensorSpec(p + "attn_k.weight", (E, Hkv * D), "linear")
    yield TensorSpec(p + "attn_v.weight", (E, Hkv * D), "linear")
    if s.arch in ("qwen2moe", "glm4moe", "gpt-oss"):
        yield TensorSpec(p + "attn_q.bias", (H * D,), "vector", 0.2)
        yield TensorSpec(p + "attn_k.bias", (Hkv * D,), "vector", 0.2)
        yield TensorSpec(p + "attn_v.bias", (Hkv * D,), "vector", 0.2)
    if s.arch == "qwen3moe" or s.x("qk_norm"):          # per-head norms (GLM-4.5's larger model too)
        yield TensorSpec(p + "attn_q_norm.weight", (D,), "norm")
        yield TensorSpec(p + "attn_k_norm.weight", (D,), "norm")
    if s.arch == "olmoe":                                # whole-projection norms
        yield TensorSpec(p + "attn_q_norm.weight", (H * D,), "norm")
        yield TensorSpec(p + "attn_k_norm.weight", (Hkv * D,), "norm")
    yield TensorSpec(p + "attn_output.weight", (H * D, E), "linear")
    if s.arch == "gpt-oss":
        yield TensorSpec(p + "attn_output.bias", (E,), "vector", 0.2)
        yield TensorSpec(p + "attn_sinks.weight", (H,), "vector", 2.0)


def _feed_forward(s: ModelSpec, i: int, p: str):
    E, X, F = s.n_embd, s.n_expert, s.n_ff_exp
    if i < s.n_dense:
        yield TensorSpec(p + "ffn_gate.weight", (E, s.n_ff), "linear")
        yield TensorSpec(p + "ffn_up.weight", (E, s.n_ff), "linear")
        yield TensorSpec(p + "ffn_down.weight", (s.n_ff, E), "linear")
        return
    # routers 2x the 1/sqrt(fan-in) scale: routing clearly not uniform (logits std ~2)
    yield TensorSpec(p + "ffn_gate_inp.weight", (E, X), "linear", 2.0)
    if s.arch == "glm4moe" or s.x("sigmoid"):
        yield TensorSpec(p + "exp_probs_b.bias", (X,), "vector", 0.1)
    xs = s.x("expert_scale", 1.0)        # gpt-oss's factory model: gate/up wide enough that its clamp bites
    yield TensorSpec(p + "ffn_gate_exps.weight", (E, F, X), "experts", xs)
    yield TensorSpec(p + "ffn_up_exps.weight", (E, F, X), "experts", xs)
    yield TensorSpec(p + "ffn_down_exps.weight", (F, E, X), "experts")
    if s.arch == "gpt-oss":
        yield TensorSpec(p + "ffn_gate_inp.bias", (X,), "vector", 0.5)
        yield TensorSpec(p + "ffn_gate_exps.bias", (F, X), "vector", 0.5)
        yield TensorSpec(p + "ffn_up_exps.bias", (F, X), "vector", 0.5)
        yield TensorSpec(p + "ffn_down_exps.bias", (E, X), "vector", 0.2)
    if s.n_ff_shexp:
        if s.arch in ("qwen2moe", "qwen35moe"):     # one gate per token, a 1D [n_embd] row
            yield TensorSpec(p + "ffn_gate_inp_shexp.weight", (E,), "vector", E ** -0.5)
        yield TensorSpec(p + "ffn_gate_shexp.weight", (E, s.n_ff_shexp), "linear")
        yield TensorSpec(p + "ffn_up_shexp.weight", (E, s.n_ff_shexp), "linear")
        yield TensorSpec(p + "ffn_down_shexp.weight", (s.n_ff_shexp, E), "linear")


FFN_NORM = {"glm4moe": "post_attention_norm", "gpt-oss": "post_attention_norm", "qwen35moe": "post_attention_norm"}


def layer_tensors(s: ModelSpec, i: int):
    p = f"blk.{i}."
    yield TensorSpec(p + "attn_norm.weight", (s.n_embd,), "norm")
    yield from (_linear_attention if is_recurrent(s, i) else _attention)(s, p)
    yield TensorSpec(p + FFN_NORM.get(s.arch, "ffn_norm") + ".weight", (s.n_embd,), "norm")
    yield from _feed_forward(s, i, p)


def model_tensors(s: ModelSpec):
    """Every tensor of the file, in the order the writers emit them (a NextN block is a MoE layer
    plus its projection and norms)."""
    E = s.n_embd
    yield TensorSpec("token_embd.weight", (E, s.n_vocab), "embedding", s.x("embd_std", 1.0))
    for i in range(s.n_blocks):
        yield from layer_tensors(s, i)
        if i >= s.n_layer:
            p = f"blk.{i}.nextn."
            yield TensorSpec(p + "eh_proj.weight", (2 * E, E), "linear")
            yield TensorSpec(p + "enorm.weight", (E,), "norm")
            yield TensorSpec(p + "hnorm.weight", (E,), "norm")
            yield TensorSpec(p + "shared_head_norm.weight", (E,), "norm")
    yield TensorSpec("output_norm.weight", (E,), "norm")
    if not s.x("tied"):
        yield TensorSpec("output.weight", (E, s.n_vocab), "linear", 2.0)


# ---- metadata -------------------------------------------------------------------------------------

def write_metadata(w: gguf.GGUFWriter, s: ModelSpec, file_type: int, title: str | None = None) -> None:
    """The GGUF metadata of the model, as convert_hf_to_gguf (+ llama-quantize's file_type) write it,
    then the byte vocabulary padded to n_vocab."""
    arch, x = s.arch, s.x
    w.add_name(title or s.name)
    w.add_file_type(file_type)
    if file_type:
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(s.n_vocab)
    w.add_context_length(s.n_ctx)
    w.add_embedding_length(s.n_embd)
    w.add_block_count(s.n_blocks)
    w.add_feed_forward_length(s.n_ff)
    w.add_head_count(s.n_head)
    w.add_head_count_kv(s.n_head_kv)
    w.add_layer_norm_rms_eps(s.rms_eps)
    w.add_rope_freq_base(s.rope_base)
    w.add_expert_count(s.n_expert)
    w.add_expert_used_count(s.n_used)
    if arch in ("llama", "deepseek", "granitemoe"):
        w.add_rope_dimension_count(s.head_dim)
    if arch in ("qwen3moe", "gpt-oss") or (arch == "glm4moe" and s.head_dim * s.n_head != s.n_embd):
        w.add_key_length(s.head_dim)          # not embedding_length / head_count
        w.add_value_length(s.head_dim)
    if arch == "qwen2moe":
        w.add_expert_feed_forward_length(s.n_ff_exp)
        w.add_expert_shared_feed_forward_length(s.n_ff_shexp)
    elif arch in ("qwen3moe", "gpt-oss"):
        w.add_expert_feed_forward_length(s.n_ff_exp)
    elif arch == "deepseek":
        w.add_rope_scaling_type(gguf.RopeScalingType.NONE)
        w.add_leading_dense_block_count(s.n_dense)
        w.add_expert_feed_forward_length(s.n_ff_exp)
        w.add_expert_weights_scale(1.0)
        w.add_expert_shared_count(s.n_shared)
    elif arch == "deepseek2":
        w.add_leading_dense_block_count(s.n_dense)
        # llama.cpp requires q_lora_rank unless n_layer is one of the Lite counts (26/27); 0 = attn_q
        if x("q_lora") is not None:
            w.add_q_lora_rank(x("q_lora"))
        w.add_kv_lora_rank(x("kv_lora"))
        if x("kv_b_unsplit"):                 # old GGUFs: per-head K/V sizes, unsplit attn_kv_b
            w.add_key_length(x("qk_nope") + x("qk_rope"))
            w.add_value_length(x("v_head"))
        else:                                 # current convert_hf_to_gguf: MLA as MQA over the latent
            w.add_key_length(x("kv_lora") + x("qk_rope"))
            w.add_value_length(x("kv_lora"))
            w.add_key_length_mla(x("qk_nope") + x("qk_rope"))
            w.add_value_length_mla(x("v_head"))
        w.add_expert_feed_forward_length(s.n_ff_exp)
        w.add_expert_shared_count(s.n_shared)
        w.add_expert_weights_scale(x("weights_scale", 1.0))
        if x("sigmoid"):
            w.add_expert_weights_norm(True)
            w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
            w.add_uint32(f"{arch}.expert_group_count", x("n_group"))
            w.add_uint32(f"{arch}.expert_group_used_count", x("n_group_used"))
        w.add_rope_dimension_count(x("qk_rope"))
    elif arch == "glm4moe":
        w.add_leading_dense_block_count(s.n_dense)
        w.add_rope_dimension_count(x("rope_dims"))
        w.add_expert_feed_forward_length(s.n_ff_exp)
        w.add_expert_shared_count(s.n_shared)
        w.add_expert_weights_scale(x("weights_scale"))
        w.add_expert_weights_norm(True)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        w.add_uint32(f"{arch}.nextn_predict_layers", s.n_nextn)
    elif arch == "qwen35moe":
        w.add_key_length(s.head_dim)
        w.add_value_length(s.head_dim)
        w.add_rope_dimension_count(x("rope_dims"))
        w.add_rope_dimension_sections(list(x("rope_sections")))
        w.add_expert_feed_forward_length(s.n_ff_exp)
        w.add_expert_shared_feed_forward_length(s.n_ff_shexp)
        w.add_ssm_conv_kernel(x("ssm_conv"))
        w.add_ssm_state_size(x("ssm_state"))
        w.add_ssm_group_count(x("ssm_k_heads"))
        w.add_ssm_time_step_rank(x("ssm_v_heads"))
        w.add_ssm_inner_size(x("ssm_v_heads") * x("ssm_state"))
        w.add_full_attention_interval(x("attn_interval", 4))
    elif arch == "granitemoe":
        w.add_embedding_scale(x("embedding_scale"))
        w.add_residual_scale(x("residual_scale"))
        w.add_attention_scale(x("attention_scale"))
        w.add_logit_scale(x("logit_scale"))
    if arch == "gpt-oss":
        w.add_sliding_window(x("sliding_window"))
    if x("yarn_factor"):
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(x("yarn_factor"))
        w.add_rope_scaling_orig_ctx_len(x("yarn_orig_ctx"))
        if x("yarn_log_mul"):
            w.add_rope_scaling_yarn_log_mul(x("yarn_log_mul"))
    byte_vocab.add_byte_vocab(w, n_vocab=s.n_vocab)


def metadata(s: ModelSpec) -> dict:
    """{key: value} of write_metadata (the values as written; no file: a GGUFWriter without a path
    only collects them)."""
    w = gguf.GGUFWriter(None, s.arch)
    write_metadata(w, s, file_type=0)
    return {k: v.value for kv in w.kv_data for k, v in kv.items()}
