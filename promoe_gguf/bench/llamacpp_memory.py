"""Where llama.cpp puts a model's bytes and how much device memory that takes: one rule, read by
`promoe bench --vs-llamacpp` (which -ngl / --n-cpu-moe fit a budget) and by the simulator's llama.cpp
engine (sim/llamacpp.py: which layers it times on the device, and whether a mode fits a profile).

Placement, as llama.cpp's loader does it (src/llama-model.cpp, load_tensors):
  i_gpu_start = n_layer + 1 - ngl: layer slots n_layer + 1, the last one the output layer; so
  -ngl N (N >= 1) puts the output layer on the device first, then the last N - 1 blocks; -ngl
  n_layer + 1 is everything; token_embd always stays on the CPU (a row lookup).
  --n-cpu-moe N keeps the routed experts of blocks 0..N-1 in host memory.
Device bytes: the weights placed there, the f16 KV cache of device blocks, --moe-cache-mib, and the
compute buffers (one ubatch's activations and logits; with experts in host memory, the one host
weight tensor op offload stages at a time).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..errors import ModelError

_EXPS = re.compile(r"\.ffn_(up|down|gate|gate_up)_(ch|)exps")     # llama.cpp's LLM_FFN_EXPS_REGEX
_LAYER = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class ModelLayout:
    """Bytes of a model by where llama.cpp may place them."""
    n_layer: int
    layer_bytes: tuple[int, ...]      # every tensor of blk.i, routed experts included
    expert_bytes: tuple[int, ...]     # the routed-expert tensors of blk.i (--n-cpu-moe moves these)
    output_bytes: int                 # output.weight + output_norm (token_embd again if tied): the "output layer"
    input_bytes: int                  # token_embd: llama.cpp always keeps it on the CPU
    kv_bytes_per_token_layer: int     # F16 K + V per token per layer (MLA: the K latent only)
    n_vocab: int
    n_embd: int
    n_head: int
    ffn_bytes_per_token: int          # widest FFN activation per token (f32), for the compute buffer

    @classmethod
    def from_gguf(cls, path) -> "ModelLayout":
        """Tensor sizes as stored in the file (the project's bounds-checked GGUF reader)."""
        from ..format.config import config_from_metadata
        from ..format.gguf_file import field_value, read_gguf
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ModelError(f"{path}: no such model file")
        r = read_gguf(path)
        c = config_from_metadata(lambda k: field_value(r, k), path)
        # MLA (deepseek2 with *_mla keys) caches only the compressed K latent, which V is read from
        mla = c.extra.get("key_length_mla") is not None
        kv_dim = c.n_head_kv * (c.head_dim_k + (0 if mla else c.head_dim_v))
        return cls.from_sizes({t.name: int(t.n_bytes) for t in r.tensors}, n_layer=c.n_layers, n_vocab=c.n_vocab,
                              n_embd=c.n_embd, n_head=c.n_head, kv_dim=kv_dim,
                              ffn_width=max(c.n_ff_exp * c.n_experts_used, c.n_ff, c.n_ff_shexp),
                              n_nextn=c.n_nextn_layers)

    @classmethod
    def from_real_shape(cls, name: str, n_layers: int | None = None) -> "ModelLayout":
        """The layout of a real-shape model (real_shapes.SHAPES) without writing it."""
        from . import real_shapes
        s = real_shapes.get_shape(name)
        plan = real_shapes.tensor_plan(name, n_layers)
        kv = s.extra["kv_lora"] + s.extra["qk_rope"] if s.arch == "deepseek2" else 2 * s.n_head_kv * s.head_dim
        return cls.from_sizes({t.name: t.nbytes for t in plan}, n_layer=n_layers or s.n_layer, n_vocab=s.n_vocab,
                              n_embd=s.n_embd, n_head=s.n_head, kv_dim=kv,
                              ffn_width=max(s.n_ff_exp * s.n_used, s.n_ff, s.n_ff_shexp), n_nextn=s.n_nextn)

    @classmethod
    def from_sizes(cls, sizes: dict, *, n_layer: int, n_vocab: int, n_embd: int, n_head: int, kv_dim: int,
                   ffn_width: int, n_nextn: int = 0) -> "ModelLayout":
        """`n_layer` layers run; the `n_nextn` NextN blocks after them are never loaded (llama.cpp skips them)."""
        layer, experts = [0] * n_layer, [0] * n_layer
        out = inp = 0
        for name, nb in sizes.items():
            m = _LAYER.match(name)
            if m:
                i = int(m.group(1))
                if n_layer <= i < n_layer + n_nextn:
                    continue
                if i >= n_layer:
                    raise ModelError(f"tensor {name!r} is past the model's {n_layer} layers")
                layer[i] += nb
                if _EXPS.search(name):
                    experts[i] += nb
            elif name == "token_embd.weight":
                inp += nb
            else:                       # output.weight, output_norm.weight
                out += nb
        if "output.weight" not in sizes:  # tied: llama.cpp loads token_embd a second time as the output
            out += sizes.get("token_embd.weight", 0)
        return cls(n_layer, tuple(layer), tuple(experts), out, inp, 2 * kv_dim, n_vocab, n_embd, n_head,
                   4 * ffn_width)

    # ---- placement ------------------------------------------------------------------------------
    def _check(self, ngl: int, n_cpu_moe: int) -> None:
        L = self.n_layer
        if not 0 <= ngl <= L + 1 or not 0 <= n_cpu_moe <= L:
            raise ValueError(f"ngl {ngl} must be in 0..{L + 1} and n_cpu_moe {n_cpu_moe} in 0..{L}")

    def gpu_layers(self, ngl: int) -> list[bool]:
        """Per block: on the device with -ngl ngl (the last ngl - 1 blocks; all of them at n_layer + 1)."""
        self._check(ngl, 0)
        first = self.n_layer + 1 - ngl
        return [ngl > 0 and i >= first for i in range(self.n_layer)]

    def output_on_gpu(self, ngl: int) -> bool:
        """The output layer is the first slot -ngl fills."""
        self._check(ngl, 0)
        return ngl >= 1

    def experts_on_host(self, ngl: int, n_cpu_moe: int) -> list[bool]:
        """Per block: its routed experts live in host memory (a CPU block, or one of --n-cpu-moe's)."""
        self._check(ngl, n_cpu_moe)
        return [not g or i < n_cpu_moe for i, g in enumerate(self.gpu_layers(ngl))]

    # ---- device memory --------------------------------------------------------------------------
    def compute_bytes(self, n_ubatch: int = 512, n_ctx: int = 4096, flash_attn: bool = True,
                      staged_bytes: int = 0) -> int:
        """Estimate of llama.cpp's device compute buffer for a batch of n_ubatch tokens: logits,
        a few hidden-state and FFN activations (f32), without flash attention the KQ matrix, and
        `staged_bytes` (the host weight tensor op offload copies in)."""
        per_token = 4 * (self.n_vocab + 6 * self.n_embd) + 2 * self.ffn_bytes_per_token
        kq = 0 if flash_attn else 4 * self.n_head * n_ctx
        return n_ubatch * (per_token + kq) + staged_bytes

    def memory(self, ngl: int, n_cpu_moe: int = 0, *, moe_cache_bytes: int = 0, n_ctx: int = 4096,
               n_ubatch: int = 512, flash_attn: bool = True) -> dict:
        """Estimated device bytes of llama.cpp with -ngl ngl --n-cpu-moe n_cpu_moe [--moe-cache-mib]:
        weights, kv_cache, expert_cache, compute and their total (ngl 0: nothing on the device)."""
        gpu, host = self.gpu_layers(ngl), self.experts_on_host(ngl, n_cpu_moe)
        if ngl == 0:
            return {"weights": 0, "kv_cache": 0, "expert_cache": 0, "compute": 0, "total": 0}
        weights = self.output_bytes + sum(self.layer_bytes[i] - (self.expert_bytes[i] if host[i] else 0)
                                          for i in range(self.n_layer) if gpu[i])
        kv = sum(gpu) * self.kv_bytes_per_token_layer * n_ctx
        # op offload copies one host expert tensor (gate, up or down of every expert) at a time
        staged = max((self.expert_bytes[i] // 3 for i in range(self.n_layer) if host[i] and self.expert_bytes[i]),
                     default=0)
        compute = self.compute_bytes(n_ubatch, n_ctx, flash_attn, staged)
        return {"weights": weights, "kv_cache": kv, "expert_cache": moe_cache_bytes, "compute": compute,
                "total": weights + kv + moe_cache_bytes + compute}

    def device_bytes(self, ngl: int, n_cpu_moe: int = 0, *, n_ctx: int = 4096, n_ubatch: int = 512,
                     flash_attn: bool = True) -> int:
        """Estimated device bytes of llama.cpp with -ngl ngl --n-cpu-moe n_cpu_moe (ngl 0: none)."""
        return self.memory(ngl, n_cpu_moe, n_ctx=n_ctx, n_ubatch=n_ubatch, flash_attn=flash_attn)["total"]


@dataclass(frozen=True)
class OffloadFit:
    budget: int
    ngl: int                      # largest -ngl that fits (0: nothing fits beside the CPU)
    ngl_bytes: int
    n_cpu_moe: int | None         # smallest --n-cpu-moe with -ngl all that fits; None: not even n_layer
    n_cpu_moe_bytes: int | None


def fit_offload(model, budget: int, *, n_ctx: int = 4096, n_ubatch: int = 512, flash_attn: bool = True) -> OffloadFit:
    """For a device memory budget in bytes, llama.cpp's largest layer offload (-ngl) and smallest
    experts-on-CPU count (--n-cpu-moe, with -ngl all) whose estimated device bytes fit. `model` is a
    GGUF path or a ModelLayout."""
    lay = model if isinstance(model, ModelLayout) else ModelLayout.from_gguf(model)
    if budget < 0:
        raise ValueError(f"budget {budget} bytes is negative")
    kw = dict(n_ctx=n_ctx, n_ubatch=n_ubatch, flash_attn=flash_attn)
    L = lay.n_layer
    ngl = max(n for n in range(L + 2) if n == 0 or lay.device_bytes(n, **kw) <= budget)
    fits = [m for m in range(L + 1) if lay.device_bytes(L + 1, m, **kw) <= budget]
    m = min(fits) if fits else None
    return OffloadFit(budget, ngl, lay.device_bytes(ngl, **kw), m,
                      None if m is None else lay.device_bytes(L + 1, m, **kw))
