"""Real-shape synthetic MoE models: the exact tensor shapes, metadata and Q4_K_M quant mix of five
published MoE models, with random (valid, finite) quant blocks, so benchmarks pay real kernel and
copy costs without downloading weights.

Shapes come from each model's published Hugging Face config.json, mapped to GGUF the way llama.cpp's
convert_hf_to_gguf.py (the one vendored by llama-cpp-python 0.3.35) maps them:

=================  ==========  ==============================================================================
name               arch        shape
=================  ==========  ==============================================================================
mixtral-8x7b       llama       32 layers, d 4096, 32/8 heads of 128, 8 experts top-2 of width 14336, vocab 32000
qwen3-30b-a3b      qwen3moe    48 layers, d 2048, 32/4 heads of 128 (q/k norms), 128 experts top-8 of 768,
                               vocab 151936
deepseek-v2-lite   deepseek2   27 layers (layer 0 dense, ffn 10944), d 2048, MLA 16 heads (kv_lora 512,
                               nope 128, rope 64, v 128; split attn_k_b/attn_v_b as the current converter
                               writes), 64 experts top-6 of 1408 + 2 shared, YaRN x40, vocab 102400
qwen1.5-moe-a2.7b  qwen2moe    24 layers, d 2048, 16/16 heads of 128 (q/k/v biases), 60 experts top-4 of
                               1408 + a gated shared expert of 5632, vocab 151936
olmoe-1b-7b        olmoe       16 layers, d 2048, 16/16 heads of 128 (full-width q/k norms), 64 experts
                               top-8 of 1024, vocab 50304
glm-4.5-air        glm4moe     46 layers (layer 0 dense, ffn 10944) + 1 NextN block, d 4096, 96/8 heads of
                               128 (q/k/v biases, half of each head rotated), 128 experts top-8 of 1408 + 1
                               shared, sigmoid routing with exp_probs_b, vocab 151552
qwen3-235b-a22b    qwen3moe    94 layers, d 4096, 64/4 heads of 128 (q/k norms), 128 experts top-8 of 1536,
                               vocab 151936
deepseek-v3        deepseek2   61 layers (layers 0-2 dense, ffn 18432), d 7168, MLA 128 heads (q_lora 1536,
                               kv_lora 512, nope 128, rope 64, v 128), 256 experts top-8 of 2048 + 1 shared,
                               8 groups of which 4 used, sigmoid routing with exp_probs_b, x2.5, vocab 129280
gpt-oss-20b        gpt-oss     24 layers, d 2880, 64/8 heads of 64 (q/k/v/output biases, a sink per head, a
                               128-position window on even layers), 32 experts top-4 of 2880 with biases,
                               YaRN x32 over 4096, vocab 201088
gpt-oss-120b       gpt-oss     the same with 36 layers and 128 experts
=================  ==========  ==============================================================================

The quant type of every tensor follows llama.cpp's Q4_K_M rules (src/llama-quant.cpp), for a file of
the chosen layer count (use_more_bits depends on it, so n_layers=None gives exactly the published
files' mix): ``q4_k_m_type``. The low-bit mixes (qwen3-235b-a22b at IQ2_XXS, deepseek-v3 at IQ1_M) and
gpt-oss's published MXFP4_MOE mix (experts MXFP4, the rest Q8_0) are
what llama.cpp's quantizer chooses for the whole model, recorded by quant_mix.py in
promoe_gguf/data/quant_mixes.json (``tensor_plan(name, ftype=...)``). tests/test_real_shapes.py checks it against llama.cpp's own quantizer
(a dry run on a sparse F16 skeleton of the same shapes).

Differences from the real files, all invisible to kernels and copies: the tokenizer is the project's
byte-level vocabulary padded with unused tokens up to the real vocabulary size, and a DeepSeek-V2-Lite
file with another layer count than 27 carries ``attention.q_lora_rank = 0`` (llama.cpp infers "Lite"
from 26/27 layers and otherwise requires the key).
"""
from __future__ import annotations

import functools
import json
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T

from ..format import byte_vocab

# bump when the bytes written would change (file names carry it, so caches never serve stale files)
VERSION = "rs3"
DEFAULT_LAYERS = 2           # DeepSeek-V2-Lite's layer 0 is dense: 2 is the least with a MoE layer
LLAMA_FTYPE_MOSTLY_Q4_K_M = 15


@dataclass(frozen=True)
class Shape:
    name: str
    arch: str
    hf_repo: str              # where the numbers come from (config.json)
    n_layer: int
    n_embd: int
    n_vocab: int
    n_ctx: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_expert: int
    n_used: int
    n_ff_exp: int
    n_ff: int                 # feed_forward_length: dense FFN width (deepseek2 layer 0, qwen*'s nominal)
    rms_eps: float
    rope_base: float
    n_ff_shexp: int = 0       # shared expert width (qwen2moe: one gated; deepseek2: n_shared * n_ff_exp)
    n_shared: int = 0
    n_dense: int = 0          # leading dense layers
    n_nextn: int = 0          # NextN (MTP) blocks after the last layer: written, never run
    extra: dict = field(default_factory=dict)


SHAPES = {s.name: s for s in (
    Shape("mixtral-8x7b", "llama", "mistralai/Mixtral-8x7B-v0.1", n_layer=32, n_embd=4096, n_vocab=32000,
          n_ctx=32768, n_head=32, n_head_kv=8, head_dim=128, n_expert=8, n_used=2, n_ff_exp=14336, n_ff=14336,
          rms_eps=1e-5, rope_base=1e6),
    Shape("qwen3-30b-a3b", "qwen3moe", "Qwen/Qwen3-30B-A3B", n_layer=48, n_embd=2048, n_vocab=151936,
          n_ctx=40960, n_head=32, n_head_kv=4, head_dim=128, n_expert=128, n_used=8, n_ff_exp=768, n_ff=6144,
          rms_eps=1e-6, rope_base=1e6),
    Shape("deepseek-v2-lite", "deepseek2", "deepseek-ai/DeepSeek-V2-Lite", n_layer=27, n_embd=2048,
          n_vocab=102400, n_ctx=163840, n_head=16, n_head_kv=1, head_dim=192, n_expert=64, n_used=6,
          n_ff_exp=1408, n_ff=10944, rms_eps=1e-6, rope_base=10000.0, n_ff_shexp=2816, n_shared=2, n_dense=1,
          extra=dict(kv_lora=512, qk_nope=128, qk_rope=64, v_head=128, yarn_factor=40.0, yarn_orig_ctx=4096,
                     yarn_log_mul=0.0707, weights_scale=1.0)),
    Shape("qwen1.5-moe-a2.7b", "qwen2moe", "Qwen/Qwen1.5-MoE-A2.7B", n_layer=24, n_embd=2048, n_vocab=151936,
          n_ctx=8192, n_head=16, n_head_kv=16, head_dim=128, n_expert=60, n_used=4, n_ff_exp=1408, n_ff=5632,
          rms_eps=1e-6, rope_base=1e6, n_ff_shexp=5632, n_shared=1),
    Shape("olmoe-1b-7b", "olmoe", "allenai/OLMoE-1B-7B-0924", n_layer=16, n_embd=2048, n_vocab=50304,
          n_ctx=4096, n_head=16, n_head_kv=16, head_dim=128, n_expert=64, n_used=8, n_ff_exp=1024, n_ff=1024,
          rms_eps=1e-5, rope_base=10000.0),
    Shape("glm-4.5-air", "glm4moe", "zai-org/GLM-4.5-Air", n_layer=46, n_embd=4096, n_vocab=151552,
          n_ctx=131072, n_head=96, n_head_kv=8, head_dim=128, n_expert=128, n_used=8, n_ff_exp=1408, n_ff=10944,
          rms_eps=1e-5, rope_base=1e6, n_ff_shexp=1408, n_shared=1, n_dense=1, n_nextn=1,
          extra=dict(rope_dims=64, weights_scale=1.0)),
    Shape("qwen3-235b-a22b", "qwen3moe", "Qwen/Qwen3-235B-A22B", n_layer=94, n_embd=4096, n_vocab=151936,
          n_ctx=40960, n_head=64, n_head_kv=4, head_dim=128, n_expert=128, n_used=8, n_ff_exp=1536, n_ff=12288,
          rms_eps=1e-6, rope_base=1e6),
    Shape("deepseek-v3", "deepseek2", "deepseek-ai/DeepSeek-V3", n_layer=61, n_embd=7168, n_vocab=129280,
          n_ctx=163840, n_head=128, n_head_kv=1, head_dim=192, n_expert=256, n_used=8, n_ff_exp=2048,
          n_ff=18432, rms_eps=1e-6, rope_base=10000.0, n_ff_shexp=2048, n_shared=1, n_dense=3,
          extra=dict(q_lora=1536, kv_lora=512, qk_nope=128, qk_rope=64, v_head=128, yarn_factor=40.0,
                     yarn_orig_ctx=4096, yarn_log_mul=0.1, weights_scale=2.5, sigmoid=True, n_group=8,
                     n_group_used=4)),
    Shape("gpt-oss-20b", "gpt-oss", "openai/gpt-oss-20b", n_layer=24, n_embd=2880, n_vocab=201088, n_ctx=131072,
          n_head=64, n_head_kv=8, head_dim=64, n_expert=32, n_used=4, n_ff_exp=2880, n_ff=2880, rms_eps=1e-5,
          rope_base=150000.0, extra=dict(sliding_window=128, yarn_factor=32.0, yarn_orig_ctx=4096)),
    Shape("gpt-oss-120b", "gpt-oss", "openai/gpt-oss-120b", n_layer=36, n_embd=2880, n_vocab=201088, n_ctx=131072,
          n_head=64, n_head_kv=8, head_dim=64, n_expert=128, n_used=4, n_ff_exp=2880, n_ff=2880, rms_eps=1e-5,
          rope_base=150000.0, extra=dict(sliding_window=128, yarn_factor=32.0, yarn_orig_ctx=4096)),
)}
MIX_TABLE = Path(__file__).resolve().parent.parent / "data" / "quant_mixes.json"


@functools.lru_cache(maxsize=1)
def recorded_mixes() -> dict:
    """{shape: {file type: {tensor: type name}}} as quant_mix.py recorded them (read once)."""
    return json.loads(MIX_TABLE.read_text())


def committed_mix(name: str, ftype: str) -> dict[str, str]:
    """{tensor: type name} llama.cpp's quantizer chose for the whole `name` model at file type `ftype`
    (quant_mix.py recorded it); ValueError when none is recorded."""
    table = recorded_mixes()
    try:
        return table[name][ftype]
    except KeyError:
        have = ", ".join(f"{n}:{f.lower()}" for n, fs in table.items() for f in fs)
        raise ValueError(f"no {ftype} mix for {name} (recorded: {have})") from None


def get_shape(name: str) -> Shape:
    try:
        return SHAPES[name]
    except KeyError:
        raise ValueError(f"unknown real shape {name!r}; expected one of {sorted(SHAPES)}") from None


# ----------------------------------------------------------------------------------------------
# llama.cpp's Q4_K_M rules (src/llama-quant.cpp of llama-cpp-python 0.3.35's vendored llama.cpp)
# ----------------------------------------------------------------------------------------------

# a K-quant that does not fit a row (ne0 % 256 != 0) falls back to a 32-block type
_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of the layers whose attn_v / ffn_down get more bits."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def is_quantized_by_llamacpp(name: str, ne) -> bool:
    """Which tensors llama.cpp's quantizer touches (the rest keep their F32 from the converter)."""
    return (len(ne) >= 2 and name.endswith("weight") and not name.endswith("_norm.weight")
            and "ffn_gate_inp.weight" not in name)


def q4_k_m_type(name: str, ne, n_layer: int, n_expert: int, i_attn_v: int = 0, n_attn_v: int = 0) -> T:
    """The type llama.cpp's quantizer gives tensor `name` (dims `ne`, ne0 first) in a Q4_K_M file of
    `n_layer` layers and `n_expert` experts. `i_attn_v`/`n_attn_v`: this tensor's rank among the
    file's attn_v-like tensors (attn_v, attn_qkv, attn_kv_b; one per layer -> the layer index) and
    their count. Tensors it does not quantize come back as F32."""
    if not is_quantized_by_llamacpp(name, ne):
        return T.F32
    t = T.Q4_K
    if name == "output.weight":
        t = T.Q8_0 if ne[0] % 256 else T.Q6_K
        return t
    if any(k in name for k in ("attn_v.weight", "attn_qkv.weight", "attn_kv_b.weight")):
        if use_more_bits(i_attn_v, n_attn_v):
            t = T.Q6_K
        if n_expert == 8:                 # "for the 8-expert model, bumping this to Q8_0 trades just ~128MB"
            t = T.Q8_0
    elif "attn_k.weight" in name:
        if n_expert == 8:
            t = T.Q8_0
    elif "ffn_down" in name:               # dense, _exps and _shexp alike; layer parsed from the name
        if use_more_bits(_layer_of(name), n_layer):
            t = T.Q6_K
    elif "attn_output.weight" in name:
        if n_expert == 8:
            t = T.Q5_K
    if ne[0] % gguf.GGML_QUANT_SIZES[t][0]:
        if t not in _FALLBACK:
            raise ValueError(f"{name}: ne0 {ne[0]} does not fit {t.name} and llama.cpp has no fallback for it")
        t = _FALLBACK[t]
        if ne[0] % gguf.GGML_QUANT_SIZES[t][0]:
            t = T.F16                      # "must use F16 due to unusual shape"
    return t


def _layer_of(name: str) -> int:
    if not name.startswith("blk."):
        raise ValueError(f"tensor {name!r} has no layer number")
    return int(name.split(".")[1])


# ----------------------------------------------------------------------------------------------
# tensors and metadata
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PlannedTensor:
    name: str
    ne: tuple[int, ...]        # GGUF order: ne0 (the input / fastest dim) first
    qtype: T

    @property
    def nbytes(self) -> int:
        blck, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.ne) // blck * size


def _layer_tensors(s: Shape, i: int):
    """(name, ne) of layer i, as llama.cpp's loader for s.arch names and sizes them."""
    E, H, Hkv, D, X, F = s.n_embd, s.n_head, s.n_head_kv, s.head_dim, s.n_expert, s.n_ff_exp
    p = f"blk.{i}."
    yield p + "attn_norm.weight", (E,)
    if s.arch == "deepseek2":
        x = s.extra
        if x.get("q_lora"):
            yield p + "attn_q_a.weight", (E, x["q_lora"])
            yield p + "attn_q_a_norm.weight", (x["q_lora"],)
            yield p + "attn_q_b.weight", (x["q_lora"], H * (x["qk_nope"] + x["qk_rope"]))
        else:
            yield p + "attn_q.weight", (E, H * (x["qk_nope"] + x["qk_rope"]))
        yield p + "attn_kv_a_mqa.weight", (E, x["kv_lora"] + x["qk_rope"])
        yield p + "attn_kv_a_norm.weight", (x["kv_lora"],)
        yield p + "attn_k_b.weight", (x["qk_nope"], x["kv_lora"], H)
        yield p + "attn_v_b.weight", (x["kv_lora"], x["v_head"], H)
        yield p + "attn_output.weight", (H * x["v_head"], E)
    else:
        yield p + "attn_q.weight", (E, H * D)
        yield p + "attn_k.weight", (E, Hkv * D)
        yield p + "attn_v.weight", (E, Hkv * D)
        if s.arch in ("qwen2moe", "glm4moe", "gpt-oss"):
            yield p + "attn_q.bias", (H * D,)
            yield p + "attn_k.bias", (Hkv * D,)
            yield p + "attn_v.bias", (Hkv * D,)
        if s.arch == "qwen3moe":           # per-head norms
            yield p + "attn_q_norm.weight", (D,)
            yield p + "attn_k_norm.weight", (D,)
        if s.arch == "olmoe":              # whole-projection norms
            yield p + "attn_q_norm.weight", (H * D,)
            yield p + "attn_k_norm.weight", (Hkv * D,)
        yield p + "attn_output.weight", (H * D, E)
        if s.arch == "gpt-oss":
            yield p + "attn_output.bias", (E,)
            yield p + "attn_sinks.weight", (H,)
    yield p + ("post_attention_norm.weight" if s.arch in ("glm4moe", "gpt-oss") else "ffn_norm.weight"), (E,)
    if i < s.n_dense:
        yield p + "ffn_gate.weight", (E, s.n_ff)
        yield p + "ffn_up.weight", (E, s.n_ff)
        yield p + "ffn_down.weight", (s.n_ff, E)
        return
    yield p + "ffn_gate_inp.weight", (E, X)
    if s.arch == "glm4moe" or s.extra.get("sigmoid"):
        yield p + "exp_probs_b.bias", (X,)
    yield p + "ffn_gate_exps.weight", (E, F, X)
    yield p + "ffn_up_exps.weight", (E, F, X)
    yield p + "ffn_down_exps.weight", (F, E, X)
    if s.arch == "gpt-oss":
        yield p + "ffn_gate_inp.bias", (X,)
        yield p + "ffn_gate_exps.bias", (F, X)
        yield p + "ffn_up_exps.bias", (F, X)
        yield p + "ffn_down_exps.bias", (E, X)
    if s.n_ff_shexp:
        if s.arch == "qwen2moe":
            yield p + "ffn_gate_inp_shexp.weight", (E,)
        yield p + "ffn_gate_shexp.weight", (E, s.n_ff_shexp)
        yield p + "ffn_up_shexp.weight", (E, s.n_ff_shexp)
        yield p + "ffn_down_shexp.weight", (s.n_ff_shexp, E)


def _n_layers(s: Shape, n_layers: int | None) -> int:
    n = s.n_layer if n_layers is None else int(n_layers)
    if not s.n_dense < n <= s.n_layer:
        raise ValueError(f"{s.name}: n_layers must be in {s.n_dense + 1}..{s.n_layer} (got {n_layers})")
    return n


def tensor_plan(name: str, n_layers: int | None = None, ftype: str = "Q4_K_M") -> list[PlannedTensor]:
    """Every tensor of the `name` model cut to n_layers (None: all), with its type in a llama.cpp file
    of type `ftype` (Q4_K_M: at any layer count; another: the recorded whole-model mix)."""
    s = get_shape(name)
    n = _n_layers(s, n_layers)
    if ftype != "Q4_K_M":
        if n != s.n_layer:
            raise ValueError(f"{name}: the {ftype} mix is recorded for all {s.n_layer} layers, not {n}")
        mix = committed_mix(name, ftype)
        return [PlannedTensor(t.name, t.ne, T[mix[t.name]]) for t in tensor_plan(name, None)]
    raw = [("token_embd.weight", (s.n_embd, s.n_vocab))]
    for i in range(n + s.n_nextn):
        raw += list(_layer_tensors(s, i))
        if i >= n:                         # a NextN block: a MoE layer plus its projection and norms
            p = f"blk.{i}.nextn."
            raw += [(p + "eh_proj.weight", (2 * s.n_embd, s.n_embd)), (p + "enorm.weight", (s.n_embd,)),
                    (p + "hnorm.weight", (s.n_embd,)), (p + "shared_head_norm.weight", (s.n_embd,))]
    raw += [("output_norm.weight", (s.n_embd,)), ("output.weight", (s.n_embd, s.n_vocab))]
    attn_v = [nm for nm, _ in raw if any(k in nm for k in ("attn_v.weight", "attn_qkv.weight", "attn_kv_b.weight"))]
    out = []
    for nm, ne in raw:
        i_v = attn_v.index(nm) if nm in attn_v else 0
        out.append(PlannedTensor(nm, tuple(ne), q4_k_m_type(nm, ne, n + s.n_nextn, s.n_expert, i_v, len(attn_v))))
    return out


def write_metadata(w: gguf.GGUFWriter, name: str, n_layers: int | None = None) -> None:
    """The GGUF metadata of the model, as convert_hf_to_gguf + llama-quantize write it."""
    s = get_shape(name)
    n = _n_layers(s, n_layers)
    w.add_name(f"{s.name} real-shape synthetic ({n} of {s.n_layer} layers, random weights)")
    w.add_file_type(LLAMA_FTYPE_MOSTLY_Q4_K_M)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(s.n_vocab)
    w.add_context_length(s.n_ctx)
    w.add_embedding_length(s.n_embd)
    w.add_block_count(n + s.n_nextn)
    w.add_feed_forward_length(s.n_ff)
    w.add_head_count(s.n_head)
    w.add_head_count_kv(s.n_head_kv)
    w.add_layer_norm_rms_eps(s.rms_eps)
    w.add_rope_freq_base(s.rope_base)
    w.add_expert_count(s.n_expert)
    w.add_expert_used_count(s.n_used)
    if s.arch == "llama":
        w.add_rope_dimension_count(s.head_dim)
    elif s.arch == "qwen3moe":
        w.add_key_length(s.head_dim)
        w.add_value_length(s.head_dim)
        w.add_expert_feed_forward_length(s.n_ff_exp)
    elif s.arch == "qwen2moe":
        w.add_expert_feed_forward_length(s.n_ff_exp)
        w.add_expert_shared_feed_forward_length(s.n_ff_shexp)
    elif s.arch == "deepseek2":
        x = s.extra
        w.add_leading_dense_block_count(s.n_dense)
        if x.get("q_lora"):
            w.add_q_lora_rank(x["q_lora"])
        elif n != s.n_layer:
            w.add_q_lora_rank(0)          # see the module docstring
        w.add_kv_lora_rank(x["kv_lora"])
        w.add_key_length(x["kv_lora"] + x["qk_rope"])
        w.add_value_length(x["kv_lora"])
        w.add_key_length_mla(x["qk_nope"] + x["qk_rope"])
        w.add_value_length_mla(x["v_head"])
        w.add_expert_feed_forward_length(s.n_ff_exp)
        w.add_expert_shared_count(s.n_shared)
        w.add_expert_weights_scale(x["weights_scale"])
        w.add_rope_dimension_count(x["qk_rope"])
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(x["yarn_factor"])
        w.add_rope_scaling_orig_ctx_len(x["yarn_orig_ctx"])
        w.add_rope_scaling_yarn_log_mul(x["yarn_log_mul"])
        if x.get("sigmoid"):
            w.add_expert_weights_norm(True)
            w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
            w.add_uint32(f"{s.arch}.expert_group_count", x["n_group"])
            w.add_uint32(f"{s.arch}.expert_group_used_count", x["n_group_used"])
    elif s.arch == "glm4moe":
        x = s.extra
        w.add_key_length(s.head_dim)          # 128, not embedding_length / head_count (42.7)
        w.add_value_length(s.head_dim)
        w.add_leading_dense_block_count(s.n_dense)
        w.add_rope_dimension_count(x["rope_dims"])
        w.add_expert_feed_forward_length(s.n_ff_exp)
        w.add_expert_shared_count(s.n_shared)
        w.add_expert_weights_scale(x["weights_scale"])
        w.add_expert_weights_norm(True)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        w.add_uint32(f"{s.arch}.nextn_predict_layers", s.n_nextn)
    elif s.arch == "gpt-oss":
        x = s.extra
        w.add_key_length(s.head_dim)          # 64: q is 4096 wide, d is 2880
        w.add_value_length(s.head_dim)
        w.add_expert_feed_forward_length(s.n_ff_exp)
        w.add_sliding_window(x["sliding_window"])
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(x["yarn_factor"])
        w.add_rope_scaling_orig_ctx_len(x["yarn_orig_ctx"])
    _add_padded_byte_vocab(w, s.n_vocab)


def _add_padded_byte_vocab(w: gguf.GGUFWriter, n_vocab: int) -> None:
    """The byte-level vocabulary (format.byte_vocab) padded with unused tokens to n_vocab, so the
    embedding and output matrices have their real sizes and llama.cpp still tokenizes text."""
    pad = n_vocab - byte_vocab.N_VOCAB
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(byte_vocab.token_texts() + [f"<|unused_{i}|>" for i in range(pad)])
    w.add_token_types(byte_vocab.token_types() + [int(gguf.TokenType.UNUSED)] * pad)
    w.add_token_merges(["<pad> <pad>"])          # one inert merge, as byte_vocab explains
    w.add_bos_token_id(byte_vocab.BOS_ID)
    w.add_eos_token_id(byte_vocab.EOS_ID)
    w.add_unk_token_id(byte_vocab.UNK_ID)
    w.add_pad_token_id(byte_vocab.PAD_ID)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    w.add_chat_template(byte_vocab.CHAT_TEMPLATE)


# ----------------------------------------------------------------------------------------------
# random blocks
# ----------------------------------------------------------------------------------------------

# type -> ((byte offset of an f16 scale, multiple of d), ...), rms of the dequantized codes at d = 1.
# The second scale of Q4_K / Q5_K (dmin) cancels the mean of d*sc*q, so weights are about zero-mean;
# d = 1 / (rms * sqrt(ne0)) then gives weights of rms ~1/sqrt(ne0) and activations O(1) at any depth.
_BLOCK_SCALES = {
    T.Q4_K: (((0, 1.0), (2, 7.5)), 245.0),      # w = d*sc*q - dmin*m, sc/m 6-bit, q 4-bit
    T.Q5_K: (((0, 1.0), (2, 15.5)), 527.0),     # q 5-bit
    T.Q6_K: (((208, 1.0),), 1366.0),            # w = d*sc*(q-32), sc int8, q 6-bit
    T.Q8_0: (((0, 1.0),), 73.9),                # w = d*q, q int8
    T.Q5_0: (((0, 1.0),), 9.25),                # w = d*(q-16)
    T.Q5_1: (((0, 1.0), (2, -15.5)), 9.23),     # w = d*q + m
}
_POOL_BYTES = 8 << 20      # random blocks drawn once per type, then reused at random offsets (fast)


class _BlockSource:
    """Valid random blocks of one type: random bytes with finite, small f16 scale fields."""

    def __init__(self, qtype: T, rng: np.random.Generator):
        if qtype not in _BLOCK_SCALES:
            raise ValueError(f"no random-block recipe for {qtype.name}")
        self.qtype, self.rng = qtype, rng
        self.size = gguf.GGML_QUANT_SIZES[qtype][1]
        self.pool = rng.integers(0, 256, size=(_POOL_BYTES // self.size, self.size), dtype=np.uint8)

    def blocks(self, n_blocks: int, ne0: int) -> np.ndarray:
        p = len(self.pool)
        start = int(self.rng.integers(p))
        reps = -(-(start + n_blocks) // p)
        out = np.tile(self.pool, (reps, 1))[start:start + n_blocks]
        fields, rms = _BLOCK_SCALES[self.qtype]
        d = 1.0 / (rms * math.sqrt(ne0))
        for off, mult in fields:
            out[:, off:off + 2] = np.frombuffer(np.float16(d * mult).tobytes(), np.uint8)
        return out


def _float_tensor(t: PlannedTensor, rng: np.random.Generator) -> np.ndarray:
    if t.name.endswith("norm.weight"):
        arr = np.ones(t.ne, np.float32)
    elif t.name.endswith(".bias"):
        arr = rng.standard_normal(t.ne, dtype=np.float32) * np.float32(0.02)
    else:   # routers (ffn_gate_inp[_shexp]): 2/sqrt(d) so routing is clearly not uniform
        arr = rng.standard_normal(tuple(reversed(t.ne)), dtype=np.float32) * np.float32(2 / math.sqrt(t.ne[0]))
    return arr.astype(np.float16 if t.qtype == T.F16 else np.float32)


def write_model(name: str, path, n_layers: int | None = None, seed: int = 0) -> Path:
    """Write the model to `path` (not atomically: callers rename). Streams one tensor at a time, so
    memory stays at the largest tensor (Mixtral's ffn_down_exps: 385 MB) whatever the layer count."""
    plan = tensor_plan(name, n_layers)
    s = get_shape(name)
    rng = np.random.default_rng([int(seed), zlib.crc32(s.name.encode())])
    w = gguf.GGUFWriter(str(path), s.arch)
    write_metadata(w, name, n_layers)
    for t in plan:
        w.add_tensor_info(t.name, tuple(reversed(t.ne)), np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    sources: dict[T, _BlockSource] = {}
    for t in plan:
        if t.qtype in (T.F32, T.F16):
            data = _float_tensor(t, rng)
        else:
            src = sources.get(t.qtype) or sources.setdefault(t.qtype, _BlockSource(t.qtype, rng))
            data = src.blocks(t.nbytes // src.size, t.ne[0]).reshape(-1)
        w.write_tensor_data(data)
    w.close()
    return Path(path)


def file_name(name: str, n_layers: int | None = None) -> str:
    s = get_shape(name)
    return f"real-{s.name}-{_n_layers(s, n_layers)}l-{VERSION}-Q4_K_M.gguf"
