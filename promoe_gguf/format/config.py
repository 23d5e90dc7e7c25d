"""ModelConfig: the typed view of a MoE GGUF's metadata, per architecture.

Keys follow llama.cpp (`{arch}.expert_count`, ...). Where llama.cpp hard-codes behaviour per
architecture (Qwen3-MoE always normalizes top-k weights, Mixtral's rope is NORM, ...) the table
ARCH_DEFAULTS says so in one place.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Callable

from ..errors import ModelError, clip

SUPPORTED_ARCHS = ("llama", "qwen2moe", "qwen3moe", "olmoe", "deepseek", "deepseek2", "granitemoe", "glm4moe",
                   "gpt-oss", "qwen35moe")
# gated linear attention (a gated delta net with a recurrent state) in every layer but each
# full_attention_interval-th (llama.cpp's is_recr: (L + 1) % interval != 0), which has gated attention
LINEAR_ATTENTION = ("qwen35moe",)
# the shared expert is expert_shared_count experts wide (no key of its own)
SHARED_FROM_COUNT = ("deepseek", "deepseek2", "glm4moe")
# leading_dense_block_count is read (llama.cpp ignores it elsewhere)
LEADING_DENSE = ("deepseek", "deepseek2", "glm4moe")
# a sliding-window attention layer every n-th: layer L has the window when L % n < n - 1 (llama.cpp's
# set_swa_pattern); attention.sliding_window is then required
SWA_PATTERN = {"gpt-oss": 2}


@dataclass(frozen=True)
class Fallback:
    """Where a width absent from the metadata comes from, per architecture: `derive` computes it from
    the values read so far; `says` is how validation messages name it ("=FIELD": another field's value)."""
    says: str
    derive: Callable[[dict], int]


# the expert FF width when {arch}.expert_feed_forward_length is absent
FF_EXP_FALLBACK = {
    **{a: Fallback("{arch}.feed_forward_length", lambda v: v["n_ff"]) for a in ("llama", "olmoe", "granitemoe")},
    **{a: Fallback("{arch}.feed_forward_length / {arch}.expert_used_count", lambda v: v["n_ff"] // v["n_used"])
       for a in ("qwen2moe", "qwen35moe")},
}
# the shared expert width when {arch}.expert_shared_feed_forward_length is absent (SHARED_FROM_COUNT:
# the expert FF width x expert_shared_count)
SHEXP_FALLBACK = {a: Fallback("=n_ff", lambda v: v["n_ff"]) for a in ("qwen2moe", "qwen35moe")}

# Per-architecture behaviour that llama.cpp fixes in code rather than reading from the file.
ARCH_DEFAULTS = {
    #             rope    norm top-k weights
    "llama":      ("norm", True),
    "qwen2moe":   ("neox", False),
    "qwen3moe":   ("neox", True),
    "olmoe":      ("neox", False),
    "deepseek":   ("norm", False),
    "deepseek2":  ("norm", None),   # None: read {arch}.expert_weights_norm (default false)
    "granitemoe": ("norm", True),
    "glm4moe":    ("neox", None),
    "gpt-oss":    ("neox", False),
    "qwen35moe":  ("imrope", True),
}
# the router's gating where llama.cpp fixes it in code (softmax_weight: the top-k of the raw logits,
# then a softmax over those k)
GATING = {"gpt-oss": "softmax_weight"}


@dataclass(frozen=True)
class RopeConfig:
    n_dims: int                     # rotated dims per head (rope.dimension_count)
    base: float = 10000.0
    kind: str = "norm"              # "norm": adjacent pairs; "neox": halves; "imrope": halves, by sections
    sections: tuple = ()            # imrope: rope.dimension_sections (pairs per t/h/w/e position; text: t=h=w)
    scaling: str = "none"           # none | linear | yarn
    factor: float = 1.0
    orig_ctx: int = 0
    yarn_log_mul: float = 0.0


@dataclass(frozen=True)
class LinearAttentionConfig:
    """A gated delta net (Qwen3.5 / Qwen3-Next's linear attention) as llama.cpp reads it: `ssm.*` keys.
    q and k have k_heads heads of state_size, v has v_heads heads of state_size (inner_size = v_heads x
    state_size); a causal depthwise conv of conv_kernel taps runs over [q | k | v] first."""
    conv_kernel: int                # ssm.conv_kernel
    inner_size: int                 # ssm.inner_size: the value width, v_heads x head dim
    state_size: int                 # ssm.state_size: the q/k (and v) head dim
    v_heads: int                    # ssm.time_step_rank
    k_heads: int                    # ssm.group_count
    interval: int = 4               # full_attention_interval: every interval-th layer is full attention
    recurrent: tuple = ()           # attention.recurrent_layers: a flag per layer, where the file says so

    @property
    def head_v(self) -> int:
        return self.inner_size // self.v_heads

    @property
    def conv_channels(self) -> int:
        """q, k and v side by side: what the conv runs over."""
        return 2 * self.k_heads * self.state_size + self.inner_size

    def state_floats(self) -> tuple[int, int]:
        """(conv state, delta-net state) floats per layer and sequence: the last conv_kernel - 1 inputs,
        and a [head_v x head_v] matrix per v head (llama.cpp's n_embd_r / n_embd_s)."""
        return (self.conv_kernel - 1) * self.conv_channels, self.head_v * self.head_v * self.v_heads


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    n_layers: int
    n_embd: int
    n_vocab: int
    n_ctx_train: int
    n_head: int
    n_head_kv: int
    head_dim_k: int                 # attention.key_length (qwen3moe: != n_embd / n_head)
    head_dim_v: int
    rms_eps: float
    rope: RopeConfig
    # experts
    n_experts: int
    n_experts_used: int
    n_ff_exp: int                   # routed expert hidden size
    n_ff: int                       # dense FFN hidden size (leading dense layers)
    n_ff_shexp: int = 0             # shared expert hidden size (0: none)
    n_expert_shared: int = 0
    n_leading_dense: int = 0        # deepseek, glm4moe: first layers are dense
    n_nextn_layers: int = 0         # glm4moe: NextN (MTP) blocks after the last layer, in the file, never run
    norm_topk: bool = False
    weights_scale: float = 0.0      # 0 or 1: none
    gating: str = "softmax"         # softmax | sigmoid | softmax_weight
    n_expert_groups: int = 1
    n_group_used: int = 1
    # sliding-window attention (gpt-oss): window in positions, and every swa_pattern-th layer is full
    sliding_window: int = 0
    swa_pattern: int = 0
    # granite
    embedding_scale: float = 0.0
    residual_scale: float = 0.0
    attention_scale: float = 0.0
    logit_scale: float = 0.0
    # deepseek2 (MLA)
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    linear_attention: LinearAttentionConfig | None = None    # qwen35moe
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def moe_layers(self) -> list[int]:
        """Layers that have routed experts (n_layers: the layers the forward pass runs)."""
        return list(range(self.n_leading_dense, self.n_layers))

    def is_swa(self, layer: int) -> bool:
        """Whether `layer` attends within the sliding window (llama.cpp's set_swa_pattern)."""
        n = self.swa_pattern
        return n > 0 and layer % n < n - 1

    def is_recurrent(self, layer: int) -> bool:
        """Whether `layer` is a gated linear-attention layer (a recurrent state, no KV cache)."""
        la = self.linear_attention
        if la is None:
            return False
        if la.recurrent:                   # llama.cpp reads the per-layer flags before the interval
            return layer < len(la.recurrent) and bool(la.recurrent[layer])
        return (layer + 1) % la.interval != 0

    @property
    def attention_layers(self) -> list[int]:
        """The layers that keep a KV cache (all but the recurrent ones)."""
        return [layer for layer in range(self.n_layers) if not self.is_recurrent(layer)]

    def as_dict(self) -> dict:
        return asdict(self)


def _require(meta, key: str, path: str):
    v = meta(key)
    if v is None:
        raise ModelError(f"{path}: metadata key {key!r} is missing")
    return v


def _int(v, key: str, path: str, lo: int = 0) -> int:
    if isinstance(v, list):  # per-layer arrays: llama.cpp allows them for a few keys
        if not v:
            raise ModelError(f"{path}: metadata key {key!r} is an empty array")
        v = max(v)
    ok = isinstance(v, int) and not isinstance(v, bool) or isinstance(v, float) and v.is_integer()
    if not ok or v < lo:
        raise ModelError(f"{path}: metadata key {key!r} = {v!r} is not an integer >= {lo}")
    return int(v)


def _flags(v, key: str, path: str) -> tuple:
    """A per-layer array of booleans (or 0/1), or () when the key is absent."""
    if v is None:
        return ()
    if not isinstance(v, list) or not v or any(not isinstance(x, (bool, int)) or x not in (0, 1) for x in v):
        raise ModelError(f"{path}: metadata key {key!r} = {clip(v)} is not a non-empty array of booleans")
    return tuple(bool(x) for x in v)


def config_from_metadata(meta, path: str) -> ModelConfig:
    """`meta(key)` returns a metadata value or None. Raises ModelError for missing/inconsistent keys."""
    arch = meta("general.architecture")
    if arch is None:
        raise ModelError(f"{path}: metadata key 'general.architecture' is missing")
    if arch not in SUPPORTED_ARCHS:
        raise ModelError(f"{path}: unsupported architecture {arch!r} (general.architecture; "
                         f"supported: {', '.join(SUPPORTED_ARCHS)})")
    def a(k):
        return meta(f"{arch}.{k}")

    def req(k, lo=1):
        return _int(_require(meta, f"{arch}.{k}", path), f"{arch}.{k}", path, lo)

    def opt(k, default, lo=0):
        return default if a(k) is None else _int(a(k), f"{arch}.{k}", path, lo)

    def optf(k, default):
        v = a(k)
        if v is None:
            return default
        if isinstance(v, (list, str)):
            raise ModelError(f"{path}: metadata key {arch}.{k} = {v!r} is not a number")
        return float(v)

    n_experts = opt("expert_count", 0)
    if n_experts == 0:
        raise ModelError(f"{path}: not a Mixture-of-Experts model (general.architecture = {arch!r}, "
                         f"{arch}.expert_count is missing or 0)")
    # rules between values (top-k within the experts, KV heads dividing heads, ...) and against the
    # tensors live in validate.py; here only presence and types
    n_used = req("expert_used_count")
    n_embd, n_head = req("embedding_length"), req("attention.head_count")
    n_head_kv = opt("attention.head_count_kv", n_head, 1)
    head_k = opt("attention.key_length", n_embd // n_head, 1)
    head_v = opt("attention.value_length", n_embd // n_head, 1)
    n_layers = req("block_count")
    n_nextn = opt("nextn_predict_layers", 0)
    if n_nextn >= n_layers:
        raise ModelError(f"{path}: {arch}.nextn_predict_layers = {n_nextn} must be below {arch}.block_count = "
                         f"{n_layers} (the NextN blocks follow the layers the model runs)")
    n_layers -= n_nextn
    n_ff = opt("feed_forward_length", 0)
    read = {"n_ff": n_ff, "n_used": n_used}
    n_ff_exp = opt("expert_feed_forward_length", 0)
    if not n_ff_exp and arch in FF_EXP_FALLBACK:
        n_ff_exp = FF_EXP_FALLBACK[arch].derive(read)
    n_dense = opt("leading_dense_block_count", 0) if arch in LEADING_DENSE else 0
    n_shared = opt("expert_shared_count", 0)
    n_ff_shexp = opt("expert_shared_feed_forward_length", 0)
    if not n_ff_shexp and arch in SHEXP_FALLBACK:
        n_ff_shexp = SHEXP_FALLBACK[arch].derive(read)
    if arch in SHARED_FROM_COUNT and n_shared and not n_ff_shexp:
        n_ff_shexp = n_ff_exp * n_shared
    rope_kind, norm = ARCH_DEFAULTS[arch]
    if norm is None:
        norm = bool(a("expert_weights_norm") or False)
    gating_raw = opt("expert_gating_func", 0)
    if gating_raw not in (0, 1, 2):
        raise ModelError(f"{path}: {arch}.expert_gating_func = {gating_raw} is not 1 (softmax) or 2 (sigmoid)")
    if gating_raw == 0:                      # unset: llama.cpp's glm4moe scores with sigmoid, the rest softmax
        gating_raw = 2 if arch == "glm4moe" else 1
    swa_pattern = SWA_PATTERN.get(arch, 0)
    sliding_window = req("attention.sliding_window") if swa_pattern else 0
    rope = RopeConfig(
        n_dims=opt("rope.dimension_count", head_k, 1),
        base=optf("rope.freq_base", 10000.0),
        kind=rope_kind,
        scaling=str(a("rope.scaling.type") or "none"),
        factor=optf("rope.scaling.factor", 1.0) or 1.0,
        orig_ctx=opt("rope.scaling.original_context_length", 0),
        yarn_log_mul=optf("rope.scaling.yarn_log_multiplier", 0.0),
    )
    if arch == "qwen35moe":
        sections = a("rope.dimension_sections")
        if not isinstance(sections, list) or len(sections) != 4:
            raise ModelError(f"{path}: metadata key {arch}.rope.dimension_sections = {sections!r} is not an array "
                             f"of 4 integers (required by {arch}'s multi-section RoPE)")
        rope = replace(rope, sections=tuple(_int(v, f"{arch}.rope.dimension_sections", path) for v in sections))
    linear = None
    if arch in LINEAR_ATTENTION:
        flags = _flags(a("attention.recurrent_layers"), f"{arch}.attention.recurrent_layers", path)
        if flags and len(flags) < n_layers:
            raise ModelError(f"{path}: metadata key {arch}.attention.recurrent_layers has {len(flags)} flags, but "
                             f"{arch}.block_count = {n_layers + n_nextn} needs a flag for every layer")
        linear = LinearAttentionConfig(
            conv_kernel=req("ssm.conv_kernel"), inner_size=req("ssm.inner_size"), state_size=req("ssm.state_size"),
            v_heads=req("ssm.time_step_rank"), k_heads=req("ssm.group_count"),
            interval=opt("full_attention_interval", 4, 1), recurrent=flags)
    vocab = a("vocab_size")
    if vocab is None:
        tokens = meta("tokenizer.ggml.tokens")
        vocab = len(tokens) if tokens else 0
    return ModelConfig(
        arch=arch, n_layers=n_layers, n_embd=n_embd, n_vocab=_int(vocab, f"{arch}.vocab_size", path),
        n_ctx_train=opt("context_length", 0), n_head=n_head, n_head_kv=n_head_kv,
        head_dim_k=head_k, head_dim_v=head_v,
        rms_eps=optf("attention.layer_norm_rms_epsilon", 1e-5), rope=rope,
        n_experts=n_experts, n_experts_used=n_used, n_ff_exp=n_ff_exp, n_ff=n_ff,
        n_ff_shexp=n_ff_shexp, n_expert_shared=n_shared, n_leading_dense=n_dense, n_nextn_layers=n_nextn,
        norm_topk=norm, weights_scale=optf("expert_weights_scale", 0.0),
        gating=GATING.get(arch) or ("sigmoid" if gating_raw == 2 else "softmax"),
        sliding_window=sliding_window, swa_pattern=swa_pattern,
        n_expert_groups=opt("expert_group_count", 1, 1), n_group_used=opt("expert_group_used_count", 1, 1),
        embedding_scale=optf("embedding_scale", 0.0), residual_scale=optf("residual_scale", 0.0),
        attention_scale=optf("attention.scale", 0.0), logit_scale=optf("logit_scale", 0.0),
        q_lora_rank=opt("attention.q_lora_rank", 0), kv_lora_rank=opt("attention.kv_lora_rank", 0),
        linear_attention=linear,
        extra={"rope_finetuned": a("rope.scaling.finetuned"),
               "key_length_mla": opt("attention.key_length_mla", None, 1),
               "value_length_mla": opt("attention.value_length_mla", None, 1)},
    )
