"""Real-shape synthetic MoE models: the exact tensor shapes, metadata and Q4_K_M quant mix of five
published MoE models, with random (valid, finite) quant blocks, so benchmarks pay real kernel and
copy costs without downloading weights.

Shapes come from each model's published Hugging Face config.json, mapped to GGUF the way llama.cpp's
convert_hf_to_gguf.py (the one vendored by llama-cpp-python 0.3.35) maps them; the tensors and
metadata of each architecture are testing/spec.py's (the factory's test models use the same):

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
qwen3.5-35b-a3b    qwen35moe   40 layers (30 gated delta nets: 16 k / 32 v heads of 128, a 4-tap conv; 10
                               gated attention: 16/2 heads of 256, a quarter rotated by 11/11/10 sections), d
                               2048, 256 experts top-8 of 512 + a gated shared expert of 512, vocab 248320
                               (no NextN block: the GGUFs users run carry none)
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T

from ..testing import spec
from ..testing.spec import ModelSpec, model_tensors

# bump when the bytes written would change (file names carry it, so caches never serve stale files)
VERSION = "rs4"
DEFAULT_LAYERS = 2           # DeepSeek-V2-Lite's layer 0 is dense: 2 is the least with a MoE layer
LLAMA_FTYPE_MOSTLY_Q4_K_M = 15


SHAPES = {s.name: s for s in (
    ModelSpec("mixtral-8x7b", "llama", hf_repo="mistralai/Mixtral-8x7B-v0.1", n_layer=32, n_embd=4096, n_vocab=32000,
          n_ctx=32768, n_head=32, n_head_kv=8, head_dim=128, n_expert=8, n_used=2, n_ff_exp=14336, n_ff=14336,
          rms_eps=1e-5, rope_base=1e6),
    ModelSpec("qwen3-30b-a3b", "qwen3moe", hf_repo="Qwen/Qwen3-30B-A3B", n_layer=48, n_embd=2048, n_vocab=151936,
          n_ctx=40960, n_head=32, n_head_kv=4, head_dim=128, n_expert=128, n_used=8, n_ff_exp=768, n_ff=6144,
          rms_eps=1e-6, rope_base=1e6),
    ModelSpec("deepseek-v2-lite", "deepseek2", hf_repo="deepseek-ai/DeepSeek-V2-Lite", n_layer=27, n_embd=2048,
          n_vocab=102400, n_ctx=163840, n_head=16, n_head_kv=1, head_dim=192, n_expert=64, n_used=6,
          n_ff_exp=1408, n_ff=10944, rms_eps=1e-6, rope_base=10000.0, n_ff_shexp=2816, n_shared=2, n_dense=1,
          extra=dict(kv_lora=512, qk_nope=128, qk_rope=64, v_head=128, yarn_factor=40.0, yarn_orig_ctx=4096,
                     yarn_log_mul=0.0707, weights_scale=1.0)),
    ModelSpec("qwen1.5-moe-a2.7b", "qwen2moe", hf_repo="Qwen/Qwen1.5-MoE-A2.7B", n_layer=24, n_embd=2048, n_vocab=151936,
          n_ctx=8192, n_head=16, n_head_kv=16, head_dim=128, n_expert=60, n_used=4, n_ff_exp=1408, n_ff=5632,
          rms_eps=1e-6, rope_base=1e6, n_ff_shexp=5632, n_shared=1),
    ModelSpec("olmoe-1b-7b", "olmoe", hf_repo="allenai/OLMoE-1B-7B-0924", n_layer=16, n_embd=2048, n_vocab=50304,
          n_ctx=4096, n_head=16, n_head_kv=16, head_dim=128, n_expert=64, n_used=8, n_ff_exp=1024, n_ff=1024,
          rms_eps=1e-5, rope_base=10000.0),
    ModelSpec("glm-4.5-air", "glm4moe", hf_repo="zai-org/GLM-4.5-Air", n_layer=46, n_embd=4096, n_vocab=151552,
          n_ctx=131072, n_head=96, n_head_kv=8, head_dim=128, n_expert=128, n_used=8, n_ff_exp=1408, n_ff=10944,
          rms_eps=1e-5, rope_base=1e6, n_ff_shexp=1408, n_shared=1, n_dense=1, n_nextn=1,
          extra=dict(rope_dims=64, weights_scale=1.0)),
    ModelSpec("qwen3-235b-a22b", "qwen3moe", hf_repo="Qwen/Qwen3-235B-A22B", n_layer=94, n_embd=4096, n_vocab=151936,
          n_ctx=40960, n_head=64, n_head_kv=4, head_dim=128, n_expert=128, n_used=8, n_ff_exp=1536, n_ff=12288,
          rms_eps=1e-6, rope_base=1e6),
    ModelSpec("deepseek-v3", "deepseek2", hf_repo="deepseek-ai/DeepSeek-V3", n_layer=61, n_embd=7168, n_vocab=129280,
          n_ctx=163840, n_head=128, n_head_kv=1, head_dim=192, n_expert=256, n_used=8, n_ff_exp=2048,
          n_ff=18432, rms_eps=1e-6, rope_base=10000.0, n_ff_shexp=2048, n_shared=1, n_dense=3,
          extra=dict(q_lora=1536, kv_lora=512, qk_nope=128, qk_rope=64, v_head=128, yarn_factor=40.0,
                     yarn_orig_ctx=4096, yarn_log_mul=0.1, weights_scale=2.5, sigmoid=True, n_group=8,
                     n_group_used=4)),
    ModelSpec("gpt-oss-20b", "gpt-oss", hf_repo="openai/gpt-oss-20b", n_layer=24, n_embd=2880, n_vocab=201088, n_ctx=131072,
          n_head=64, n_head_kv=8, head_dim=64, n_expert=32, n_used=4, n_ff_exp=2880, n_ff=2880, rms_eps=1e-5,
          rope_base=150000.0, extra=dict(sliding_window=128, yarn_factor=32.0, yarn_orig_ctx=4096)),
    ModelSpec("qwen3.5-35b-a3b", "qwen35moe", hf_repo="Qwen/Qwen3.5-35B-A3B", n_layer=40, n_embd=2048, n_vocab=248320,
          n_ctx=262144, n_head=16, n_head_kv=2, head_dim=256, n_expert=256, n_used=8, n_ff_exp=512, n_ff=512,
          rms_eps=1e-6, rope_base=1e7, n_ff_shexp=512,
          extra=dict(rope_dims=64, rope_sections=(11, 11, 10, 0), ssm_conv=4, ssm_state=128, ssm_k_heads=16,
                     ssm_v_heads=32, attn_interval=4)),
    ModelSpec("gpt-oss-120b", "gpt-oss", hf_repo="openai/gpt-oss-120b", n_layer=36, n_embd=2880, n_vocab=201088, n_ctx=131072,
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


def get_shape(name: str) -> ModelSpec:
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
            and "ffn_gate_inp.weight" not in name and "ssm_conv1d.weight" not in name)


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
    fill: str = "linear"       # testing.spec's fill (what an unquantized tensor holds)

    @property
    def nbytes(self) -> int:
        blck, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.ne) // blck * size


def _n_layers(s: ModelSpec, n_layers: int | None) -> int:
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
        return [PlannedTensor(t.name, t.ne, T[mix[t.name]], t.fill) for t in tensor_plan(name, None)]
    raw = list(model_tensors(cut(s, n)))
    attn_v = [t.name for t in raw if any(k in t.name for k in ("attn_v.weight", "attn_qkv.weight", "attn_kv_b.weight"))]
    out = []
    for t in raw:
        i_v = attn_v.index(t.name) if t.name in attn_v else 0
        out.append(PlannedTensor(t.name, tuple(t.ne),
                                 q4_k_m_type(t.name, t.ne, n + s.n_nextn, s.n_expert, i_v, len(attn_v)), t.fill))
    return out


def cut(s: ModelSpec, n: int) -> ModelSpec:
    """The model cut to its first n layers (NextN blocks kept after them). A DeepSeek-V2-Lite file of
    another layer count than 26/27 carries q_lora_rank = 0 (llama.cpp infers "Lite" from the count)."""
    if n == s.n_layer:
        return s
    extra = {"q_lora": 0} if s.arch == "deepseek2" and s.x("q_lora") is None else {}
    return s.with_(n_layer=n, **extra)


def write_metadata(w: gguf.GGUFWriter, name: str, n_layers: int | None = None) -> None:
    """The GGUF metadata of the model, as convert_hf_to_gguf + llama-quantize write it."""
    s = get_shape(name)
    n = _n_layers(s, n_layers)
    spec.write_metadata(w, cut(s, n), LLAMA_FTYPE_MOSTLY_Q4_K_M,
                        title=f"{s.name} real-shape synthetic ({n} of {s.n_layer} layers, random weights)")


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
    """A tensor llama.cpp leaves unquantized: norms 1, vectors (biases, sinks) small, routers 2/sqrt(d)
    so routing is clearly not uniform."""
    if t.fill == "norm":
        arr = np.ones(t.ne, np.float32)
    elif t.fill == "vector":
        arr = rng.standard_normal(tuple(reversed(t.ne)), dtype=np.float32) * np.float32(0.02)
    else:
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
