"""One validation pass at open: every configuration value the forward pass reads, checked against
sane ranges and against the tensors it describes, before any weight is used.

`checked_config(cfg, shapes, meta, path)` is called by both model sources (a GGUF file, a converted
cache directory) with the parsed ModelConfig, every tensor's shape (numpy order: [out, in] for a
matrix, [n_expert, out, in] for stacked experts) and the metadata. It fills the expert FF width from
the tensors when the metadata leaves it out and raises ModelError naming the metadata key, its value
and the tensor or rule it contradicts. The rules:

  RANGES (here)          finite, positive where it must be, bounded (context, rope, scales, counts)
  shape_rules.py         rules between values (KV heads divide heads, top-k within the experts,
                         groups divide experts, ...) and, per layer, each tensor's expected shape
                         from the values that determine it (attention per family, MLA ranks,
                         dense / routed / shared FFN widths)

"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

from ..errors import ModelError
from .config import FF_EXP_FALLBACK, SHARED_FROM_COUNT, SHEXP_FALLBACK, ModelConfig
from .shape_rules import Expect, config_field, cross_field_rules, global_expectations, layer_expectations

# ---- how each config field is named in the file ------------------------------------------------
# field -> (key after "{arch}.", what applies when the key is absent: a literal, "=FIELD" for the
# value of another field, or a formula over keys)
KEYS = {
    "n_layers": ("block_count", None),
    "n_embd": ("embedding_length", None),
    "n_vocab": ("vocab_size", "the number of tokenizer.ggml.tokens"),
    "n_ctx_train": ("context_length", "unknown"),
    "n_head": ("attention.head_count", None),
    "n_head_kv": ("attention.head_count_kv", "=n_head"),
    "head_dim_k": ("attention.key_length", "{arch}.embedding_length / {arch}.attention.head_count"),
    "head_dim_v": ("attention.value_length", "{arch}.embedding_length / {arch}.attention.head_count"),
    "rms_eps": ("attention.layer_norm_rms_epsilon", "default"),
    "rope.n_dims": ("rope.dimension_count", "=head_dim_k"),
    "rope.base": ("rope.freq_base", "default"),
    "rope.sections": ("rope.dimension_sections", None),
    "rope.scaling": ("rope.scaling.type", "default"),
    "rope.factor": ("rope.scaling.factor", "default"),
    "rope.orig_ctx": ("rope.scaling.original_context_length", "default"),
    "rope.yarn_log_mul": ("rope.scaling.yarn_log_multiplier", "default"),
    "n_experts": ("expert_count", None),
    "n_experts_used": ("expert_used_count", None),
    "n_ff_exp": ("expert_feed_forward_length", "default"),
    "n_ff": ("feed_forward_length", "default"),
    "n_ff_shexp": ("expert_shared_feed_forward_length", "default"),
    "n_expert_shared": ("expert_shared_count", "default"),
    "n_leading_dense": ("leading_dense_block_count", "default"),
    "n_nextn_layers": ("nextn_predict_layers", "default"),
    "weights_scale": ("expert_weights_scale", "default"),
    "n_expert_groups": ("expert_group_count", "default"),
    "n_group_used": ("expert_group_used_count", "default"),
    "embedding_scale": ("embedding_scale", "default"),
    "residual_scale": ("residual_scale", "default"),
    "attention_scale": ("attention.scale", "default"),
    "logit_scale": ("logit_scale", "default"),
    "q_lora_rank": ("attention.q_lora_rank", "default"),
    "kv_lora_rank": ("attention.kv_lora_rank", "default"),
    "sliding_window": ("attention.sliding_window", None),
    "key_length_mla": ("attention.key_length_mla", "=head_dim_k"),
    "value_length_mla": ("attention.value_length_mla", "=head_dim_v"),
    "ssm_conv": ("ssm.conv_kernel", None),
    "ssm_inner": ("ssm.inner_size", None),
    "ssm_state": ("ssm.state_size", None),
    "ssm_v_heads": ("ssm.time_step_rank", None),
    "ssm_groups": ("ssm.group_count", None),
    "attn_interval": ("full_attention_interval", "default"),
}

# ---- sane ranges ------------------------------------------------------------------------------
MAX_LAYERS = 4096
MAX_DIM = 1 << 20          # widths (embedding, FF, ranks)
MAX_HEAD_DIM = 1 << 16
MAX_HEADS = 1 << 12
MAX_EXPERTS = 1 << 16
MAX_VOCAB = 1 << 24
MAX_CTX = 1 << 24          # 16M positions: beyond any released model


@dataclass(frozen=True)
class Range:
    field: str
    lo: float
    hi: float
    lo_open: bool = False        # lo itself is outside the range
    zero_means_unset: bool = False

    def holds(self, v) -> bool:
        if v is None:
            return True
        if isinstance(v, float) and not math.isfinite(v):
            return False
        if self.zero_means_unset and v == 0:
            return True
        return (v > self.lo if self.lo_open else v >= self.lo) and v <= self.hi

    def text(self) -> str:
        lo = f"> {self.lo:g}" if self.lo_open else f">= {self.lo:g}"
        unset = " (or 0: unset)" if self.zero_means_unset else ""
        return f"must be finite, {lo} and <= {self.hi:g}{unset}"


RANGES = (
    Range("n_layers", 1, MAX_LAYERS),
    Range("n_embd", 1, MAX_DIM),
    Range("n_vocab", 1, MAX_VOCAB),
    Range("n_ctx_train", 1, MAX_CTX, zero_means_unset=True),
    Range("n_head", 1, MAX_HEADS),
    Range("n_head_kv", 1, MAX_HEADS),
    Range("head_dim_k", 1, MAX_HEAD_DIM),
    Range("head_dim_v", 1, MAX_HEAD_DIM),
    Range("rms_eps", 0.0, 1.0, lo_open=True),
    Range("rope.n_dims", 2, MAX_HEAD_DIM),
    Range("rope.base", 1.0, 1e15, lo_open=True),            # ln(base) divides in YaRN; 1 rotates nothing
    Range("rope.factor", 0.0, 1e6, lo_open=True),
    Range("rope.orig_ctx", 1, MAX_CTX, zero_means_unset=True),
    Range("rope.yarn_log_mul", -100.0, 100.0),
    Range("n_experts", 1, MAX_EXPERTS),
    Range("n_experts_used", 1, MAX_EXPERTS),
    Range("n_ff_exp", 0, MAX_DIM),
    Range("n_ff", 0, MAX_DIM),
    Range("n_ff_shexp", 0, MAX_DIM),
    Range("n_expert_shared", 0, MAX_EXPERTS),
    Range("n_leading_dense", 0, MAX_LAYERS),
    Range("n_nextn_layers", 0, MAX_LAYERS),
    Range("weights_scale", 0.0, 1e6),
    Range("n_expert_groups", 1, MAX_EXPERTS),
    Range("n_group_used", 1, MAX_EXPERTS),
    Range("embedding_scale", 0.0, 1e6),
    Range("residual_scale", 0.0, 1e6),
    Range("attention_scale", 0.0, 1e6),
    Range("logit_scale", 0.0, 1e6),
    Range("q_lora_rank", 0, MAX_DIM),
    Range("kv_lora_rank", 0, MAX_DIM),
    Range("sliding_window", 0, MAX_CTX),
    Range("key_length_mla", 1, MAX_HEAD_DIM),
    Range("value_length_mla", 1, MAX_HEAD_DIM),
)
ROPE_SCALINGS = ("none", "linear", "yarn")


class _Namer:
    """Names config fields the way the file spells them: `llama.attention.head_count = 4`, or, for
    an absent key, where the value came from: `llama.attention.key_length (absent:
    llama.embedding_length / llama.attention.head_count = 64)`."""

    def __init__(self, cfg: ModelConfig, meta, origin: dict):
        self.cfg, self.meta, self.origin = cfg, meta, origin

    def _shown(self, name: str) -> str:
        v = config_field(self.cfg, name)
        if name == "n_layers":
            v += self.cfg.n_nextn_layers             # block_count counts the NextN blocks too
        return f"{v:g}" if isinstance(v, float) else repr(v) if isinstance(v, str) else str(v)

    def _default(self, name: str) -> str:
        """Where an absent key's value came from."""
        arch = self.cfg.arch
        default = KEYS[name][1]
        if name == "n_ff_exp" and arch in FF_EXP_FALLBACK:
            default = FF_EXP_FALLBACK[arch].says
        if name == "n_ff_shexp" and arch in SHEXP_FALLBACK:
            default = SHEXP_FALLBACK[arch].says
        if default.startswith("="):
            return f"as {self(default[1:])}"
        if default == "default":
            return f"default {self._shown(name)}"
        return f"{default.format(arch=arch)} = {self._shown(name)}"

    def __call__(self, name: str) -> str:
        if name in self.origin:
            return f"{self.origin[name]} = {self._shown(name)}"
        arch = self.cfg.arch
        key = f"{arch}.{KEYS[name][0]}"
        if name == "n_ff_shexp" and arch in SHARED_FROM_COUNT and self.meta(key) is None:
            return (f"{arch}.expert_shared_count = {self.cfg.n_expert_shared} (shared expert width: expert FF "
                    f"width x expert_shared_count = {self._shown(name)})")
        if self.meta(key) is not None:
            return f"{key} = {self._shown(name)}"
        return f"{key} (absent: {self._default(name)})"

    def all(self, names) -> str:
        return ", ".join(self(n) for n in names)


class _Checker:
    def __init__(self, cfg: ModelConfig, shapes: dict, meta, path: str, origin: dict, labels: dict):
        self.cfg, self.shapes, self.path, self.labels = cfg, shapes, path, labels
        self.name = _Namer(cfg, meta, origin)

    def label(self, tensor: str) -> str:
        return self.labels.get(tensor, f"tensor {tensor}")

    def fail(self, fields, rule: str) -> ModelError:
        return ModelError(f"{self.path}: {self.name.all(fields)}: {rule}")

    # ---- ranges and cross-field rules -----------------------------------------------------
    def ranges(self) -> None:
        for r in RANGES:
            if not r.holds(config_field(self.cfg, r.field)):
                raise self.fail([r.field], r.text())
        if self.cfg.rope.scaling not in ROPE_SCALINGS:
            raise self.fail(["rope.scaling"], f"rope scaling must be one of {', '.join(ROPE_SCALINGS)}")

    def cross_fields(self) -> None:
        c = self.cfg
        for fields, ok, rule in cross_field_rules(c):
            if not ok:
                raise self.fail(fields, rule)

    # ---- tensors ----------------------------------------------------------------------------
    def expect(self, e: Expect) -> None:
        have = self.shapes.get(e.tensor)
        if have is None:
            if e.required:
                raise self.fail(e.fields, f"{self.label(e.tensor)} is missing (it must be {e.formula} = {e.shape})")
            return
        if tuple(have) != tuple(e.shape):
            raise self.fail(e.fields, f"{self.label(e.tensor)} has shape {tuple(have)}, but {e.formula} = {e.shape}")

    def absent(self, tensor: str, fields, why: str) -> None:
        if tensor in self.shapes:
            raise self.fail(fields, f"{self.label(tensor)} is present, but {why}")

    def layers_within_block_count(self) -> None:
        n = self.cfg.n_layers + self.cfg.n_nextn_layers      # NextN blocks: in the file, never run
        for name in self.shapes:
            m = re.match(r"blk\.(\d+)\.", name)
            if m and int(m.group(1)) >= n:
                raise self.fail(["n_layers"], f"tensor {name} belongs to layer {m.group(1)}, beyond the "
                                              f"{n} layers block_count declares")

    def layers_present(self) -> None:
        have = {int(m.group(1)) for m in (re.match(r"blk\.(\d+)\.", n) for n in self.shapes) if m}
        c = self.cfg
        fields = ["n_layers", "n_nextn_layers"] if c.n_nextn_layers else ["n_layers"]
        for layer in range(c.n_layers + c.n_nextn_layers):
            if layer not in have:
                raise self.fail(fields, f"the file has no tensor of layer {layer} (blk.{layer}.*)")

    def run(self) -> None:
        self.ranges()
        self.cross_fields()
        self.layers_within_block_count()
        self.layers_present()
        for e in global_expectations(self.cfg, self.shapes):
            self.expect(e)
        for layer in range(self.cfg.n_layers):
            for e in layer_expectations(self, layer):
                self.expect(e)


# ---- entry points ------------------------------------------------------------------------------

def _expert_width(cfg: ModelConfig, shapes: dict) -> int:
    """The expert FF width the first MoE layer's down tensor holds (0: no such tensor)."""
    p = f"blk.{cfg.n_leading_dense}."
    down = shapes.get(p + "ffn_down_exps.weight") or shapes.get(p + "ffn_down.0.weight")
    return int(down[-1]) if down else 0


def check_ranges(cfg: ModelConfig, meta, path: str) -> None:
    """The checks that need no tensor: ranges and rules between values (bounded work)."""
    chk = _Checker(cfg, {}, meta, path, {}, {})
    chk.ranges()
    chk.cross_fields()


def checked_config(cfg: ModelConfig, shapes: dict, meta, path: str, origin: dict | None = None,
                   labels: dict | None = None) -> ModelConfig:
    """Validate `cfg` against ranges and `shapes` ({tensor: numpy-order shape}); fill the expert FF
    width (and DeepSeek's shared width) from the tensors when the metadata leaves it out.
    `origin` names fields that come from elsewhere than the metadata ({"n_ff_exp": "manifest.json
    n_ff_exp"}); `labels` names tensors that are not GGUF tensors ({name: "experts of layer 1 in ..."})."""
    origin, labels = origin or {}, labels or {}
    check_ranges(cfg, meta, path)       # first: the rest loops over layers and experts
    if not cfg.n_ff_exp:
        cfg = dataclasses.replace(cfg, n_ff_exp=_expert_width(cfg, shapes))
        origin = {**origin, "n_ff_exp": f"expert FF width (no metadata key: from layer {cfg.n_leading_dense}'s experts)"}
        if cfg.arch in SHARED_FROM_COUNT and cfg.n_expert_shared and not cfg.n_ff_shexp:
            cfg = dataclasses.replace(cfg, n_ff_shexp=cfg.n_ff_exp * cfg.n_expert_shared)
    if cfg.linear_attention is not None and cfg.linear_attention.recurrent:      # the flags decide, not the interval
        origin = {**origin, "attn_interval": f"{cfg.arch}.attention.recurrent_layers (R recurrent, A attention)"}
    _Checker(cfg, shapes, meta, path, origin, labels).run()
    return cfg
