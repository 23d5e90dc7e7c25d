"""Test-model factory: small random-weight MoE GGUFs in the exact layouts stock llama.cpp loads.

Every model is written as F32 with gguf-py's GGUFWriter and quantized by llama.cpp's own quantizer
(``llama_cpp.llama_model_quantize``), so the quantized blocks are exactly what users have. What a
model's file holds (metadata, tensors, how they are filled) is testing/spec.py's; `spec()` here only
picks the numbers of each test model.

From tests (the `factory` fixture) and scripts::

    from promoe_gguf.testing import factory
    models = factory.build_models(out_dir)      # {(arch, quant, variant): path}

Command line (scripts/make_test_model.py)::

    python scripts/make_test_model.py OUT_DIR [--arch A ...] [--quant Q ...]
    python scripts/make_test_model.py OUT_DIR --real-shape mixtral-8x7b [--layers 4]

Real-shape models (make_real_shape): the exact tensor shapes, metadata and Q4_K_M quant mix of the
published models bench/real_shapes.py lists (Mixtral-8x7B ... Qwen3.5-35B-A3B) with fewer layers and
random valid blocks written directly (promoe_gguf/bench/real_shapes.py), for benchmarks.

Architectures (n_embd 256, 4 heads, byte vocabulary of 260 tokens, context 512):

==========  =========================================================================================
llama       Mixtral layout: ffn_gate_inp + ffn_{gate,up,down}_exps, 8 experts top-2, GQA 4/2
qwen2moe    4 experts top-2 + shared expert (512 wide, ffn_gate_inp_shexp 1D), q/k/v biases, GQA 4/2
qwen3moe    8 experts top-2, head_dim (key_length) 128 != 256/4, per-head attn_q_norm/attn_k_norm [128]
olmoe       8 experts top-2, full-width attn_q_norm/attn_k_norm [256], no GQA (as llama.cpp requires)
deepseek    v1: layer 0 dense (ffn 768), layers 1-2 MoE: 8 experts top-2 + 2 shared (shexp 512), GQA 4/2
deepseek2   V2-Lite MLA (attn_q, attn_kv_a_mqa, attn_kv_a_norm, split attn_k_b/attn_v_b, head_count_kv 1,
            key_length 544 / value_length 512, key_length_mla 96 / value_length_mla 64, rope dims 32,
            YaRN factor 40 like V2-Lite), layer 0 dense, 8 experts top-2 + 2 shared
granitemoe  4 experts top-2, tied embeddings, embedding/residual/attention/logit scales, GQA 4/2
glm4moe     GLM-4.5-Air layout: layer 0 dense (ffn 768), 8 experts top-2 + 1 shared, sigmoid routing with
            exp_probs_b, normalized weights x2.5, q/k/v biases, half the head rotated (NEOX), the norm before
            the FFN named post_attention_norm, and one NextN (MTP) block after the last layer that
            llama.cpp loads but never runs (nextn_predict_layers 1)
gpt-oss     gpt-oss-20b layout: 8 heads of 64 (q wider than n_embd), GQA 8/2, biases on q/k/v/output,
            the router and every expert matrix, per-head attention sinks, a 16-token sliding window on
            even layers, YaRN, 8 experts top-4 with softmax over the chosen logits, clamped SwiGLU
            (gate/up 2.5x wider so the clamp at 7 bites); made as F32, Q8_0 and MXFP4_MOE
qwen35moe   Qwen3.5-35B-A3B layout: layer 0 a gated delta net (2 k heads, 4 v heads of 32, a 4-tap conv,
            full_attention_interval 2 here), layer 1 gated attention (attn_q [q | gate] per head, q/k
            norms, 16 of 64 dims rotated by sections 3/3/2/0), top-2 + a sigmoid-gated shared expert;
            made as F32, Q8_0 and Q4_K_M
==========  =========================================================================================

Variants: "default"; "narrow" (expert FF width 352 = 11*32, like the real 1408: K-quants fall back
to Q5_0/Q8_0 for ffn_down_exps); deepseek2 only: "kvb" (legacy unsplit attn_kv_b, no *_mla keys,
head_count_kv 4; same weights as "default", so its logits match) and "v3" (q_lora attn_q_a/_norm/_b,
sigmoid gating, exp_probs_b, normalized weights x2.5, 4 expert groups of which 2 are used);
glm4moe only: "qknorm" (per-head attn_q_norm/attn_k_norm, as the 355B GLM-4.5 has);
"legacy" (per-expert 2D ffn_{gate,up,down}.E tensors, rewritten from a stacked file; llama.cpp
refuses it); "merged" (ffn_gate_up_exps, rewritten from a stacked deepseek2 file; llama.cpp loads it).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T

from ..format import byte_vocab
from .spec import ModelSpec, model_tensors, write_metadata

# bump whenever the produced files would change (names carry it, so stale caches are never reused)
FACTORY_VERSION = "fv2"

ARCHS = ("llama", "qwen2moe", "qwen3moe", "olmoe", "deepseek", "deepseek2", "granitemoe", "glm4moe", "gpt-oss",
         "qwen35moe")

# name -> llama_ftype (llama.h)
QUANTS = {
    "F32": 0, "F16": 1, "BF16": 32,
    "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9,
    "Q2_K": 10, "Q3_K_M": 12, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18,
    "IQ4_NL": 25, "IQ4_XS": 30,
    "IQ1_S": 24, "IQ1_M": 31, "IQ2_XXS": 19, "IQ2_XS": 20, "IQ2_M": 29, "IQ3_XXS": 23, "IQ3_S": 26,
    "MXFP4_MOE": 38,
}
CORE_QUANTS = ("F32", "F16", "Q4_K_M", "Q5_K_M", "Q8_0", "Q4_0", "Q2_K", "IQ4_XS")
# made for the llama arch only: together with CORE_QUANTS every quant block type appears somewhere
EXTRA_QUANTS = ("BF16", "Q4_1", "Q5_0", "Q5_1", "Q3_K_M", "Q6_K", "IQ4_NL",
                "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_M", "IQ3_XXS", "IQ3_S", "MXFP4_MOE")

# the quants an arch gets instead of CORE_QUANTS: gpt-oss ships as MXFP4 experts (the rest Q8_0)
ARCH_QUANTS = {"gpt-oss": ("F32", "Q8_0", "MXFP4_MOE"), "qwen35moe": ("F32", "Q8_0", "Q4_K_M")}

# the type llama.cpp gives the routed-expert gate/up tensors for each ftype (ne0 = 256)
BASE_TYPE = {
    "F32": T.F32, "F16": T.F16, "BF16": T.BF16,
    "Q4_0": T.Q4_0, "Q4_1": T.Q4_1, "Q8_0": T.Q8_0, "Q5_0": T.Q5_0, "Q5_1": T.Q5_1,
    "Q2_K": T.Q2_K, "Q3_K_M": T.Q3_K, "Q4_K_M": T.Q4_K, "Q5_K_M": T.Q5_K, "Q6_K": T.Q6_K,
    "IQ4_NL": T.IQ4_NL, "IQ4_XS": T.IQ4_XS,
    "IQ1_S": T.IQ1_S, "IQ1_M": T.IQ1_M, "IQ2_XXS": T.IQ2_XXS, "IQ2_XS": T.IQ2_XS, "IQ2_M": T.IQ2_S,
    "IQ3_XXS": T.IQ3_XXS, "IQ3_S": T.IQ3_S, "MXFP4_MOE": T.MXFP4,
}

VARIANTS = ("default", "narrow", "kvb", "v3", "qknorm", "legacy", "merged")
# variants made by make_float_model (the others are rewritten from a quantized stacked file)
FLOAT_VARIANTS = ("default", "narrow", "kvb", "v3", "qknorm")
# what stock llama.cpp (llama-cpp-python 0.3.35) refuses to load
LLAMA_CPP_REFUSES = frozenset({"legacy"})

N_EMBD = 256
N_HEAD = 4
N_CTX = 512
N_MOE_LAYERS = 2
NARROW_FF = 352          # 11 * 32, like the real 1408 = 11 * 128


def llama_cpp_loads(key) -> bool:
    """Whether stock llama.cpp loads the model under this build_models() key (arch, quant, variant)."""
    return key[2] not in LLAMA_CPP_REFUSES


# ----------------------------------------------------------------------------------------------
# architecture specs
# ----------------------------------------------------------------------------------------------

def spec(arch: str, variant: str = "default") -> ModelSpec:
    """Hyperparameters of one test model (testing/spec.py describes its file from them)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    if variant not in FLOAT_VARIANTS:
        raise ValueError(f"unknown float-model variant {variant!r}; expected one of {FLOAT_VARIANTS}")
    if variant in ("kvb", "v3") and arch != "deepseek2":
        raise ValueError(f"variant {variant!r} exists only for deepseek2")
    if variant == "qknorm" and arch != "glm4moe":
        raise ValueError("variant 'qknorm' exists only for glm4moe")
    s = ModelSpec(name=f"promoe-test-{arch}-{variant}", arch=arch, variant=variant, n_layer=N_MOE_LAYERS,
                  n_embd=N_EMBD, n_vocab=byte_vocab.N_VOCAB, n_ctx=N_CTX, n_head=N_HEAD, n_head_kv=2,
                  head_dim=N_EMBD // N_HEAD, n_expert=8, n_used=2, n_ff_exp=256, n_ff=256, rms_eps=1e-5,
                  rope_base=10000.0)
    if arch == "llama":
        s = s.with_(rope_base=1e6)
    elif arch == "qwen2moe":
        s = s.with_(n_expert=4, n_ff_shexp=512, n_ff=512, rms_eps=1e-6, rope_base=1e6)
    elif arch == "qwen3moe":
        s = s.with_(head_dim=128, n_ff=768, rms_eps=1e-6, rope_base=1e6)
    elif arch == "olmoe":
        s = s.with_(n_head_kv=N_HEAD)          # llama.cpp's olmoe: k_norm is [n_embd], so no GQA
    elif arch == "deepseek":
        s = s.with_(n_dense=1, n_ff=768, n_shared=2, n_ff_shexp=2 * 256)
    elif arch == "deepseek2":
        s = s.with_(n_dense=1, n_ff=768, n_shared=2, n_ff_shexp=2 * 256, n_head_kv=1, rms_eps=1e-6,
                    kv_lora=512, qk_nope=64, qk_rope=32, v_head=64, q_lora=0,
                    yarn_factor=40.0, yarn_orig_ctx=4096, yarn_log_mul=0.0707)
        if variant == "kvb":
            s = s.with_(n_head_kv=N_HEAD, kv_b_unsplit=True)
        if variant == "v3":
            s = s.with_(q_lora=512, sigmoid=True, weights_scale=2.5, n_group=4, n_group_used=2)
    elif arch == "glm4moe":
        s = s.with_(n_dense=1, n_ff=768, n_shared=1, n_ff_shexp=256, rope_dims=N_EMBD // N_HEAD // 2,
                    weights_scale=2.5, n_nextn=1, qk_norm=variant == "qknorm")
    elif arch == "gpt-oss":
        # gpt-oss-20b's layout, small: q is 8 x 64 wide (not n_embd), top-4, biases everywhere, sinks, every
        # other layer a sliding window (16 here, so the tests' 64 tokens cross it), YaRN (factor 4 over 128)
        s = s.with_(n_head=8, head_dim=64, n_used=4, rope_base=150000.0, sliding_window=16, yarn_factor=4.0,
                    yarn_orig_ctx=128, expert_scale=2.5)
    elif arch == "qwen35moe":
        # Qwen3.5-35B-A3B's layout, small: layers alternate gated delta net / gated attention (interval 2
        # here, 4 there), 2 k heads and 4 v heads of 32 (v heads share k heads, as 16/32 there), a 4-tap
        # conv, 2 KV heads of 64 with a quarter rotated by multi-section RoPE, top-2 + a gated shared expert
        s = s.with_(head_dim=64, n_ff_shexp=256, rms_eps=1e-6, rope_base=1e7, rope_dims=16, rope_sections=(3, 3, 2, 0),
                    ssm_conv=4, ssm_state=32, ssm_k_heads=2, ssm_v_heads=4, attn_interval=2)
    elif arch == "granitemoe":
        # scales chosen so that every term matters (embeddings ~0.1 * 8, layers * 0.5, tied logits / 0.5)
        s = s.with_(n_expert=4, tied=True, embd_std=0.1, embedding_scale=8.0, residual_scale=0.5,
                    attention_scale=0.25, logit_scale=0.5)
    if variant == "narrow":
        s = s.with_(n_ff_exp=NARROW_FF, n_ff_shexp=s.n_shared * NARROW_FF if s.n_shared else s.n_ff_shexp)
        if arch in ("llama", "olmoe", "granitemoe"):
            s = s.with_(n_ff=NARROW_FF)     # these archs take the expert width from feed_forward_length
    return s.with_(n_layer=s.n_dense + N_MOE_LAYERS)


def _tensors(s: ModelSpec, rng: np.random.Generator):
    """Yield (name, float32 array in numpy order = reversed GGUF ne), filled as testing/spec.py says."""
    kv_b_v = None
    for t in model_tensors(s):
        shape = tuple(reversed(t.ne))
        if t.fill == "embedding":
            arr = rng.standard_normal(shape, dtype=np.float32) * np.float32(t.scale)
        elif t.fill == "norm":
            arr = (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
        elif t.fill in ("linear", "experts"):
            arr = rng.standard_normal(shape, dtype=np.float32) * np.float32(t.scale / math.sqrt(t.ne[0]))
        elif t.fill == "decay":
            arr = (-np.exp(0.5 * rng.standard_normal(shape, dtype=np.float32))).astype(np.float32)
        elif t.fill == "vector":
            arr = (t.scale * rng.standard_normal(math.prod(shape), dtype=np.float32)).astype(np.float32).reshape(shape)
        elif t.fill == "kv_b" and kv_b_v is None:
            # HF's kv_b_proj [heads x (nope + v), kv_lora], split as convert_hf_to_gguf does: k_b transposed
            H, nope, vh, kvl = s.n_head, s["qk_nope"], s["v_head"], s["kv_lora"]
            kv_b = (rng.standard_normal((H * (nope + vh), kvl), dtype=np.float32)
                    * np.float32(1.0 / math.sqrt(kvl))).reshape(H, nope + vh, kvl)
            arr, kv_b_v = np.ascontiguousarray(kv_b[:, :nope, :].transpose(0, 2, 1)), np.ascontiguousarray(kv_b[:, nope:, :])
        elif t.fill == "kv_b":
            arr, kv_b_v = kv_b_v, None
        else:
            raise ValueError(f"{t.name}: unknown fill {t.fill!r}")
        yield t.name, arr


# ----------------------------------------------------------------------------------------------
# file helpers
# ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _atomic(dst):
    """Yield a temporary path beside dst; rename it onto dst when the block succeeds."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}.gguf")
    try:
        yield tmp
        os.replace(tmp, dst)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _seed_for(arch: str, seed: int) -> list[int]:
    return [int(seed), ARCHS.index(arch)]


def make_float_model(arch: str, path, seed: int = 0, variant: str = "default"):
    """Write the F32 model; deterministic in (arch, seed, variant). Returns path."""
    s = spec(arch, variant)
    rng = np.random.default_rng(_seed_for(arch, seed))
    with _atomic(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        write_metadata(w, s, file_type=0)                   # LLAMA_FTYPE_ALL_F32
        for name, arr in _tensors(s, rng):
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def make_mixtral_shaped(out_dir, n_layers: int = 4, n_embd: int = 2048, n_ff: int = 7168, quant: str = "Q4_K_M",
                        seed: int = 0) -> Path:
    """A Mixtral-layout benchmark model at a real width (default: d 2048, expert FF 7168, 8 experts
    top-2, 16 heads / 4 KV heads of 128): random weights written as F16, then llama.cpp's quantizer,
    so the quant mix is exactly llama.cpp's for `quant`. Cached under out_dir by its parameters."""
    out_dir = Path(out_dir)
    name = f"mixtral-shaped-{n_layers}l-{n_embd}d-{n_ff}ff-{FACTORY_VERSION}"
    dst = out_dir / f"{name}-{quant}.gguf"
    if dst.exists():
        return dst
    s = spec("llama").with_(variant="bench", n_embd=n_embd, n_head=n_embd // 128, n_head_kv=max(1, n_embd // 512),
                            head_dim=128, n_ff_exp=n_ff, n_ff=n_ff, n_layer=n_layers, n_ctx=4096)
    rng = np.random.default_rng([int(seed), 99])
    src = out_dir / f"{name}-F16.gguf"
    with _atomic(src) as tmp:
        w = gguf.GGUFWriter(str(tmp), "llama")
        write_metadata(w, s, file_type=0)
        for tname, arr in _tensors(s, rng):
            w.add_tensor(tname, np.ascontiguousarray(arr, dtype=np.float16 if arr.ndim > 1 else np.float32))
        _finish(w)
    try:
        quantize(src, dst, quant)
    finally:
        src.unlink(missing_ok=True)
    return dst


def make_real_shape(name: str, out_dir, n_layers: int | None = None) -> Path:
    """A GGUF with the exact tensor shapes, metadata and Q4_K_M quant mix of a published MoE model
    (promoe_gguf.bench.real_shapes.SHAPES), cut to n_layers (default real_shapes.DEFAULT_LAYERS; None is not
    "all" here: the full models are 4-28 GB). Random valid blocks written directly, no quantizer pass.
    Cached under out_dir by name, layer count and version; written atomically under the dir lock."""
    from ..bench import real_shapes
    n = real_shapes.DEFAULT_LAYERS if n_layers is None else n_layers
    dst = Path(out_dir) / real_shapes.file_name(name, n)          # checks name and n first
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        with _dir_lock(dst.parent):
            if not dst.exists():
                with _atomic(dst) as tmp:
                    real_shapes.write_model(name, tmp, n)
    return dst


def quantize(src, dst, quant_name: str):
    """Quantize an F32/F16/BF16 GGUF with llama.cpp's quantizer (llama_model_quantize). Returns dst."""
    if quant_name not in QUANTS:
        raise ValueError(f"unknown quant {quant_name!r}; expected one of {sorted(QUANTS)}")
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTS[quant_name]
    params.nthread = 2
    # llama.cpp quantizes its 1-2-bit file types only with an importance matrix: a uniform one
    from ..bench.quant_mix import NEEDS_IMATRIX, captured_llama_log, uniform_imatrix
    keep = uniform_imatrix(src) if quant_name in NEEDS_IMATRIX else None
    if keep is not None:
        params.imatrix = keep[0]
    log: list[str] = []
    with _atomic(dst) as tmp:
        with captured_llama_log(log):
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            tail = "".join(log)[-2000:]
            raise RuntimeError(f"llama_model_quantize({src} -> {quant_name}) failed with rc={rc}:\n{tail}")
    return dst


def _writer_like(reader: gguf.GGUFReader, path, file_type: int | None = None) -> gguf.GGUFWriter:
    """A GGUFWriter at path carrying every metadata key of reader (optionally a new general.file_type)."""
    arch = reader.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(path), arch)
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        if field.name == "general.alignment":
            w.data_alignment = int(field.contents())
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        val = field.contents()
        if field.name == "general.file_type" and file_type is not None:
            val = file_type
        w.add_key_value(field.name, val, vtype, sub_type=sub)
    return w


def _finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


_EXPS = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")


def make_legacy_from(stacked_path, dst):
    """Rewrite a stacked (3D *_exps) model into the legacy per-expert layout: each
    blk.N.ffn_{gate,up,down}_exps.weight becomes n_expert 2D tensors blk.N.ffn_{gate,up,down}.E.weight
    holding exactly the bytes of that expert's slice. All metadata is copied. Returns dst."""
    r = gguf.GGUFReader(str(stacked_path))
    with _atomic(dst) as tmp:
        w = _writer_like(r, tmp)
        for t in r.tensors:
            m = _EXPS.match(t.name)
            if m is None:
                w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
                continue
            layer, kind = m.group(1), m.group(2)
            data = np.asarray(t.data)
            for e in range(data.shape[0]):
                w.add_tensor(f"blk.{layer}.ffn_{kind}.{e}.weight", np.ascontiguousarray(data[e]),
                             raw_dtype=t.tensor_type)
        _finish(w)
    return dst


def make_merged_from(stacked_path, dst):
    """Rewrite a stacked model so that each layer's ffn_gate_exps and ffn_up_exps become one
    blk.N.ffn_gate_up_exps.weight, ne = [n_embd, 2*n_ff, n_expert]: per expert the gate rows, then the
    up rows (bytes copied exactly; both must have the same type). Returns dst."""
    r = gguf.GGUFReader(str(stacked_path))
    by_name = {t.name: t for t in r.tensors}
    with _atomic(dst) as tmp:
        w = _writer_like(r, tmp)
        for t in r.tensors:
            m = _EXPS.match(t.name)
            if m is None or m.group(2) == "down":
                w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
                continue
            if m.group(2) == "up":
                continue                               # written together with gate
            up = by_name[f"blk.{m.group(1)}.ffn_up_exps.weight"]
            if up.tensor_type != t.tensor_type:
                raise ValueError(f"{t.name} is {t.tensor_type.name} but its up tensor is "
                                 f"{up.tensor_type.name}; cannot merge")
            merged = np.concatenate([np.asarray(t.data), np.asarray(up.data)], axis=1)
            w.add_tensor(f"blk.{m.group(1)}.ffn_gate_up_exps.weight", np.ascontiguousarray(merged),
                         raw_dtype=t.tensor_type)
        _finish(w)
    return dst


def twin_path(src) -> Path:
    src = Path(src)
    return src.with_name(src.name[:-len(".gguf")] + ".twin.gguf")


def dequantized_twin(src, dst=None):
    """Write src with every tensor dequantized to F32 by gguf.quants.dequantize (same metadata except
    general.file_type = 0, ALL_F32), so llama.cpp's arithmetic on it is exact. dst defaults to
    twin_path(src) and is then reused when it already exists and is newer than src. Returns dst."""
    if dst is None:
        dst = twin_path(src)
        if Path(dst).exists() and Path(dst).stat().st_mtime >= Path(src).stat().st_mtime:
            return dst
    r = gguf.GGUFReader(str(src))
    with _atomic(dst) as tmp:
        w = _writer_like(r, tmp, file_type=0)
        for t in r.tensors:
            if t.tensor_type == T.F32:
                arr = np.asarray(t.data, dtype=np.float32)
            else:
                arr = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
            ne = [int(x) for x in t.shape]
            arr = np.ascontiguousarray(arr.reshape(tuple(reversed(ne))))
            w.add_tensor(t.name, arr, raw_dtype=T.F32)
        _finish(w)
    return dst


# ----------------------------------------------------------------------------------------------
# the full set
# ----------------------------------------------------------------------------------------------

def model_filename(arch: str, quant: str, variant: str = "default") -> str:
    return f"{arch}-{variant}-{quant}.{FACTORY_VERSION}.gguf"


def plan(archs=ARCHS, quants=None) -> list[tuple[str, str, str]]:
    """The keys build_models makes, in dependency order."""
    for a in archs:
        if a not in ARCHS:
            raise ValueError(f"unknown arch {a!r}; expected one of {ARCHS}")
    if quants is not None:
        for q in quants:
            if q not in QUANTS:
                raise ValueError(f"unknown quant {q!r}; expected one of {sorted(QUANTS)}")
    keys = []

    def want(q, default_set):
        return q in default_set if quants is None else q in quants

    for a in archs:
        qs = ARCH_QUANTS.get(a, CORE_QUANTS) + (EXTRA_QUANTS if a == "llama" else ())
        all_q = ["F32"] + [q for q in QUANTS if q != "F32"]
        for q in all_q:
            if want(q, qs):
                keys.append((a, q, "default"))
        extra = []
        if a == "deepseek":
            extra = [("narrow", q) for q in ("F32", "Q4_K_M")]
        if a == "deepseek2":
            extra = [(v, q) for v in ("kvb", "v3") for q in ("F32", "Q4_K_M")]
        if a == "glm4moe":
            extra = [("qknorm", q) for q in ("F32", "Q4_K_M")]
        for v, q in extra:
            if want(q, ("F32", "Q4_K_M")):
                keys.append((a, q, v))
        if a == "llama" and want("Q4_K_M", ("Q4_K_M",)):
            keys.append((a, "Q4_K_M", "legacy"))
        if a == "deepseek2" and want("Q4_K_M", ("Q4_K_M",)):
            keys.append((a, "Q4_K_M", "merged"))
    return keys


def _clean_stale(out_dir: Path, min_age_s: float = 3600.0) -> None:
    """Delete models (and files derived from them, e.g. twins) of other factory versions, once they
    are an hour old: a test session that started before a version bump may still be reading them."""
    pat = re.compile(r"\.(fv\d+)\..*gguf$")
    now = time.time()
    for p in out_dir.iterdir():
        m = pat.search(p.name)
        if m and m.group(1) != FACTORY_VERSION:
            with contextlib.suppress(OSError):
                if p.is_file() and now - p.stat().st_mtime > min_age_s:
                    p.unlink()


@contextlib.contextmanager
def _dir_lock(out_dir: Path):
    """Serialize concurrent builders of one directory (pytest-xdist workers, colleagues' runs)."""
    try:
        import fcntl
    except ImportError:          # not POSIX: atomic renames still keep files whole
        yield
        return
    with open(out_dir / ".build.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_models(out_dir, archs=ARCHS, quants=None, progress: bool = True) -> dict:
    """Build (or reuse) every test model; returns {(arch, quant_name, variant): path}.

    Default set: each arch x CORE_QUANTS ("F32" is the float model itself), the EXTRA_QUANTS for
    llama, deepseek "narrow" (F32, Q4_K_M), deepseek2 "kvb" and "v3" and glm4moe "qknorm" (F32, Q4_K_M), the "legacy"
    llama Q4_K_M and the "merged" deepseek2 Q4_K_M. ``quants`` restricts every group to those quant
    names. Files are named by model_filename() (factory version included) and written atomically.
    An F32 model needed only as a quantization source is still built (and cached) but not listed
    unless "F32" is wanted."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = plan(archs, quants)
    path = {k: out_dir / model_filename(*k) for k in keys}

    jobs = []          # (path, callable)
    scheduled = set()

    def need(p, fn):
        if p not in scheduled:
            scheduled.add(p)
            if not p.exists():
                jobs.append((p, fn))

    for (a, q, v) in keys:
        if v in ("legacy", "merged"):
            src = out_dir / model_filename(a, q, "default")
            need(out_dir / model_filename(a, "F32", "default"),
                 lambda a=a, p=out_dir / model_filename(a, "F32", "default"): make_float_model(a, p))
            need(src, lambda s=src, f=out_dir / model_filename(a, "F32", "default"), q=q: quantize(f, s, q))
            fn = make_legacy_from if v == "legacy" else make_merged_from
            need(path[(a, q, v)], lambda fn=fn, s=src, d=path[(a, q, v)]: fn(s, d))
            continue
        fp = out_dir / model_filename(a, "F32", v)
        need(fp, lambda a=a, v=v, p=fp: make_float_model(a, p, variant=v))
        if q != "F32":
            need(path[(a, q, v)], lambda f=fp, d=path[(a, q, v)], q=q: quantize(f, d, q))

    if jobs:
        with _dir_lock(out_dir):
            _clean_stale(out_dir)
            todo = [(p, fn) for p, fn in jobs if not p.exists()]     # another process may have built them
            bar = None
            if progress and todo:
                from tqdm import tqdm
                bar = tqdm(total=len(todo), desc="test models", unit="file", leave=False)
            try:
                for p, fn in todo:
                    if bar is not None:
                        bar.set_postfix_str(p.name, refresh=False)
                    if not p.exists():
                        fn()
                    if bar is not None:
                        bar.update(1)
            finally:
                if bar is not None:
                    bar.close()
    return {k: str(p) for k, p in path.items()}


def main(argv=None) -> int:
    from ..bench import real_shapes
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--arch", action="append", choices=ARCHS, help="arch to build (repeatable; default all)")
    ap.add_argument("--quant", action="append", choices=sorted(QUANTS),
                    help="quant to build (repeatable; default CORE_QUANTS + llama extras)")
    ap.add_argument("--real-shape", action="append", metavar="NAME",
                    help="write only this real-shape model (repeatable): " + ", ".join(real_shapes.SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="layers of the --real-shape models (default 2)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if args.real_shape:
        for name in args.real_shape:
            try:
                print(make_real_shape(name, args.out_dir, args.layers))
            except ValueError as e:
                ap.error(str(e))
        print(f"{len(args.real_shape)} models in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        return 0
    models = build_models(args.out_dir, archs=tuple(args.arch or ARCHS), quants=args.quant)
    for (a, q, v), p in models.items():
        flag = "" if llama_cpp_loads((a, q, v)) else "  (llama.cpp refuses this layout)"
        print(f"{a:11s} {q:7s} {v:8s} {p}{flag}")
    print(f"{len(models)} models in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
