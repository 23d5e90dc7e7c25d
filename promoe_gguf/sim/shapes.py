"""Header-only models: the published MoE architectures as llama.cpp's Q4_K_M (or F16) GGUFs lay them
out, without a byte of weights, so the simulator (and promoe_gguf.memory) can plan a 26 GB model.

`virtual_model(name)` returns an object with the MoEModel interface the planners read (`config`,
`resident_names`, `tensor_ref`, `has_tensor`, `expert_keys`, `expert_matrices`, sizes): every tensor's
GGUF name, dims and quant type, and therefore its exact byte size. Dimensions come from each model's
published config.json (URL in `Arch.source`), mapped to GGUF the way convert_hf_to_gguf.py names them;
quant types follow llama.cpp's Q4_K_M rules (/work/shared/reference/gguf-notes.md section 3):
base Q4_K; output -> Q6_K; attn_v / attn_kv_b -> Q6_K and ffn_down* -> Q6_K on the layers
use_more_bits picks; 8 experts: attn_k, attn_v -> Q8_0, attn_output -> Q5_K; a row that is not a
multiple of 256 falls back (Q4_K -> Q5_0, Q6_K -> Q8_0, Q5_K -> Q5_1); 1-D tensors, norms and
ffn_gate_inp stay F32.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from ..errors import ModelError
from ..format.config import ModelConfig, RopeConfig
from ..format.expert_index import MatrixSlice
from ..format.model_file import MoEModel, TensorRef


@dataclass(frozen=True)
class Arch:
    name: str
    arch: str                 # GGUF general.architecture
    source: str               # published config the numbers come from
    n_layer: int
    d: int
    vocab: int
    n_ctx: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_expert: int
    n_used: int
    ff_exp: int
    ff_dense: int = 0         # leading dense layers' FFN width
    n_dense: int = 0          # leading dense layers
    ff_shexp: int = 0         # shared expert width (all shared experts together)
    n_shared: int = 0
    norm_topk: bool = False
    mla: dict = field(default_factory=dict)    # deepseek2: q/kv ranks and head dims


ARCHS = {a.name: a for a in (
    Arch("mixtral-8x7b", "llama", "https://huggingface.co/mistralai/Mixtral-8x7B-v0.1/blob/main/config.json",
         n_layer=32, d=4096, vocab=32000, n_ctx=32768, n_head=32, n_head_kv=8, head_dim=128,
         n_expert=8, n_used=2, ff_exp=14336, norm_topk=True),
    Arch("qwen3-30b-a3b", "qwen3moe", "https://huggingface.co/Qwen/Qwen3-30B-A3B/blob/main/config.json",
         n_layer=48, d=2048, vocab=151936, n_ctx=40960, n_head=32, n_head_kv=4, head_dim=128,
         n_expert=128, n_used=8, ff_exp=768, norm_topk=True),
    Arch("deepseek-v2-lite", "deepseek2", "https://huggingface.co/deepseek-ai/DeepSeek-V2-Lite/blob/main/config.json",
         n_layer=27, d=2048, vocab=102400, n_ctx=163840, n_head=16, n_head_kv=1, head_dim=192,
         n_expert=64, n_used=6, ff_exp=1408, ff_dense=10944, n_dense=1, ff_shexp=2816, n_shared=2,
         mla=dict(kv_lora=512, nope=128, rope=64, v=128)),
    Arch("qwen1.5-moe-a2.7b", "qwen2moe", "https://huggingface.co/Qwen/Qwen1.5-MoE-A2.7B/blob/main/config.json",
         n_layer=24, d=2048, vocab=151936, n_ctx=8192, n_head=16, n_head_kv=16, head_dim=128,
         n_expert=60, n_used=4, ff_exp=1408, ff_shexp=5632, n_shared=1),
    Arch("olmoe-1b-7b", "olmoe", "https://huggingface.co/allenai/OLMoE-1B-7B-0924/blob/main/config.json",
         n_layer=16, d=2048, vocab=50304, n_ctx=4096, n_head=16, n_head_kv=16, head_dim=128,
         n_expert=64, n_used=8, ff_exp=1024),
)}
QUANTS = ("q4_k_m", "f16")
_FALLBACK = {T.Q4_K: T.Q5_0, T.Q6_K: T.Q8_0, T.Q5_K: T.Q5_1}


def more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def quant_of(name: str, ne: tuple, n_layer: int, n_expert: int, quant: str = "q4_k_m") -> T:
    """The type llama.cpp's quantizer gives tensor `name` (dims ne, ne0 first)."""
    if len(ne) < 2 or name.endswith("_norm.weight") or "ffn_gate_inp" in name:
        return T.F32
    if quant == "f16":
        return T.F16
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    t = T.Q4_K
    if name == "output.weight":
        t = T.Q6_K
    elif name.endswith(("attn_v.weight", "attn_kv_b.weight")):
        t = T.Q8_0 if n_expert == 8 else (T.Q6_K if more_bits(layer, n_layer) else T.Q4_K)
    elif name.endswith("attn_k.weight") and n_expert == 8:
        t = T.Q8_0
    elif name.endswith("attn_output.weight") and n_expert == 8:
        t = T.Q5_K
    elif ".ffn_down" in name and more_bits(layer, n_layer):
        t = T.Q6_K
    if ne[0] % GGML_QUANT_SIZES[t][0]:
        t = _FALLBACK.get(t, T.F16)
    return t


def _layer_tensors(a: Arch, i: int):
    """(name, ne) of layer i's non-expert tensors, ne0 (the input dim) first."""
    d, p = a.d, f"blk.{i}."
    yield p + "attn_norm.weight", (d,)
    yield p + "ffn_norm.weight", (d,)
    if a.arch == "deepseek2":
        m = a.mla
        yield p + "attn_q.weight", (d, a.n_head * (m["nope"] + m["rope"]))
        yield p + "attn_kv_a_mqa.weight", (d, m["kv_lora"] + m["rope"])
        yield p + "attn_kv_a_norm.weight", (m["kv_lora"],)
        yield p + "attn_k_b.weight", (m["nope"], m["kv_lora"], a.n_head)
        yield p + "attn_v_b.weight", (m["kv_lora"], m["v"], a.n_head)
        yield p + "attn_output.weight", (a.n_head * m["v"], d)
    else:
        q, kv = a.n_head * a.head_dim, a.n_head_kv * a.head_dim
        yield p + "attn_q.weight", (d, q)
        yield p + "attn_k.weight", (d, kv)
        yield p + "attn_v.weight", (d, kv)
        yield p + "attn_output.weight", (q, d)
        if a.arch == "qwen2moe":
            for n, w in (("q", q), ("k", kv), ("v", kv)):
                yield p + f"attn_{n}.bias", (w,)
        if a.arch == "qwen3moe":
            yield p + "attn_q_norm.weight", (a.head_dim,)
            yield p + "attn_k_norm.weight", (a.head_dim,)
        if a.arch == "olmoe":
            yield p + "attn_q_norm.weight", (q,)
            yield p + "attn_k_norm.weight", (kv,)
    if i < a.n_dense:
        yield p + "ffn_gate.weight", (d, a.ff_dense)
        yield p + "ffn_up.weight", (d, a.ff_dense)
        yield p + "ffn_down.weight", (a.ff_dense, d)
        return
    yield p + "ffn_gate_inp.weight", (d, a.n_expert)
    if a.ff_shexp:
        if a.arch == "qwen2moe":
            yield p + "ffn_gate_inp_shexp.weight", (d,)
        yield p + "ffn_gate_shexp.weight", (d, a.ff_shexp)
        yield p + "ffn_up_shexp.weight", (d, a.ff_shexp)
        yield p + "ffn_down_shexp.weight", (a.ff_shexp, d)


def _nbytes(qtype: T, ne: tuple) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return int(np.prod(ne, dtype=np.int64)) // block * size


class VirtualModel(MoEModel):
    """A MoEModel with an index and tensor table but no file: the planners' view of a model that does not
    exist here (reading bytes raises)."""

    def __init__(self, a: Arch, quant: str = "q4_k_m", n_layers: int | None = None):
        if quant not in QUANTS:
            raise ModelError(f"shape quantization {quant!r}: one of {', '.join(QUANTS)}")
        L = int(n_layers or a.n_layer)
        if not a.n_dense < L <= a.n_layer:
            raise ModelError(f"shape {a.name}: {L} layers is outside {a.n_dense + 1}..{a.n_layer}")
        self.arch_spec, self.quant = a, quant
        self.path = f"{a.name}:{quant}" + (f" ({L} layers)" if L != a.n_layer else "")
        m = a.mla
        self.config = ModelConfig(
            arch=a.arch, n_layers=L, n_embd=a.d, n_vocab=a.vocab, n_ctx_train=a.n_ctx, n_head=a.n_head,
            n_head_kv=a.n_head_kv, head_dim_k=a.head_dim, head_dim_v=m.get("v", a.head_dim), rms_eps=1e-6,
            rope=RopeConfig(n_dims=m.get("rope", a.head_dim)), n_experts=a.n_expert, n_experts_used=a.n_used,
            n_ff_exp=a.ff_exp, n_ff=a.ff_dense or a.ff_exp, n_ff_shexp=a.ff_shexp, n_expert_shared=a.n_shared,
            n_leading_dense=a.n_dense, norm_topk=a.norm_topk, kv_lora_rank=m.get("kv_lora", 0))
        tensors = [("token_embd.weight", (a.d, a.vocab)), ("output_norm.weight", (a.d,)),
                   ("output.weight", (a.d, a.vocab))]
        for i in range(L):
            tensors += list(_layer_tensors(a, i))
        self._resident = {}
        for name, ne in tensors:
            q = quant_of(name, ne, L, a.n_expert, quant)
            self._resident[name] = TensorRef(name, q, tuple(reversed(ne)), 0, _nbytes(q, ne))
        self._experts = {}
        for i in range(a.n_dense, L):
            mats = []
            for mat, ne in (("gate", (a.d, a.ff_exp)), ("up", (a.d, a.ff_exp)), ("down", (a.ff_exp, a.d))):
                q = quant_of(f"blk.{i}.ffn_{mat}_exps.weight", ne + (a.n_expert,), L, a.n_expert, quant)
                mats.append(MatrixSlice(mat, q, (ne[1], ne[0]), 0, _nbytes(q, ne)))
            for e in range(a.n_expert):
                self._experts[(i, e)] = tuple(mats)

    def metadata(self, key, default=None):
        return default

    @property
    def metadata_keys(self) -> list[str]:
        return []

    def matrix_bytes(self, layer, expert, matrix):
        raise ModelError(f"{self.path} is a header-only shape: it has no weights to read")

    tensor_raw = read_expert = matrix_bytes

    def close(self) -> None:
        pass


def virtual_model(spec: str, n_layers: int | None = None) -> VirtualModel:
    """'qwen3-30b-a3b' or 'qwen3-30b-a3b:f16' -> its header-only model."""
    name, _, quant = spec.partition(":")
    if name not in ARCHS:
        raise ModelError(f"unknown shape {name!r}: one of {', '.join(ARCHS)} (or a GGUF file)")
    return VirtualModel(ARCHS[name], quant or "q4_k_m", n_layers)


def open_shape(spec: str):
    """A shape name, or any GGUF / converted cache directory (its header and index only are read)."""
    import os
    if os.path.exists(spec):
        from ..format import open_model
        return open_model(spec)
    return virtual_model(spec)
