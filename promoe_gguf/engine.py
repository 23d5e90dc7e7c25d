"""Engine: one loaded model, its expert source (cache + prefetcher), tokenizer and sampler."""
from __future__ import annotations

import codecs
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import limits
from .errors import ModelError
from .format import open_model
from .model import build_decoder
from .model.common import check_tokens
from .model.decode import Decoding
from .model.experts import MoEExperts
from .numerics import attach as attach_numerics
from .sampling import Sampler, check_sampling
from .tokenizer import Tokenizer


@dataclass
class Timing:
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    extra: dict = field(default_factory=dict)

    def rates(self) -> tuple[float, float]:
        return (self.prefill_tokens / self.prefill_s if self.prefill_s else 0.0,
                self.decode_tokens / self.decode_s if self.decode_s else 0.0)

    def reset(self) -> None:
        """Count from zero (a benchmark's measured run after its warm-up)."""
        self.prefill_tokens, self.prefill_s, self.decode_tokens, self.decode_s = 0, 0.0, 0, 0.0
        self.extra.clear()


def default_threads() -> int:
    """ggml's CPU threads when none are given: one per physical core (about half the logical CPUs)."""
    return max(1, (os.cpu_count() or 2) // 2)


class Engine:
    """Contract: Engine(model_path, device, cache_rate, cache_mem, policy, predictor, ...).

    `n_ctx`: KV cache length (default: the model's training context, at most 4096).
    `n_batch`: prefill chunk size in tokens, 1..n_ctx (default: 512 on the CPU; on CUDA the longest of
    4096..64 whose activations take at most a tenth of the device budget; never above n_ctx). `link`: emulated host-to-device link on CPU
    (see runtime.link). `n_threads`: CPU threads of ggml's kernels, and of torch (process-wide; small
    models decode fastest with 1, since per-op threading overhead dominates); default one per
    physical core for ggml, torch's own default for torch. `cpu_experts`: with an expert cache,
    "auto" computes a miss on the CPU (ggml, `cpu_threads` threads) when the cost model says it
    finishes before its copy would, "all" computes every miss there, "off" copies every miss.
    `gpu_mem`: device bytes to use when neither cache_rate nor cache_mem is given: the expert cache
    gets what residents, KV cache and workspace leave (memory.fit_cache), or is not needed when
    everything fits; on CUDA it defaults to the free memory minus a margin (memory.default_gpu_mem).
    `cpu_repack`: an all-resident CPU engine copies weights into llama.cpp's CPU_REPACK layout where
    ggml has kernels for it (llama.cpp's default: same kernels, same results, faster prefill); an
    engine with an expert cache keeps the GGUF layout (the cache emulates device memory).
    `graphs`: decode steps recorded once as device graphs and replayed (CUDA; one replay and one
    wait per token with every expert resident, one wait per MoE layer with an expert cache); False
    runs every step eagerly (the same kernels, bitwise the same logits). `activations` ("q8": 8-bit
    activations and dp4a, as llama.cpp's CUDA kernels; "f32": exact fp32 products) and `kv_type`
    ("f16", llama.cpp's default; "f32") choose the CUDA arithmetic.
    `launcher`: tests only, runs the CUDA backend's kernel launches on another executor (the CPU
    build of the kernels). `check_numerics`: check every block for NaN/inf and name the first that
    produced one (the logits are always checked; decoding runs eagerly). Other expert caching
    options are passed to the runtime's source.
    """

    def __init__(self, model_path=None, device="cpu", cache_rate=None, cache_mem=None, policy="lru",
                 predictor="none", n_ctx=None, n_batch=None, link=None, n_threads=None, launcher=None,
                 cpu_experts="auto", cpu_threads=None, gpu_mem=None, cpu_repack=True, check_numerics=False,
                 graphs=True, activations=None, kv_type=None, **runtime_options):
        from .paths import DEFAULT_MODEL
        from .backends import make_backend, parse_device
        from .runtime import make_source
        for name, value in (("n_threads", n_threads), ("cpu_threads", cpu_threads)):
            if value is not None:
                limits.check(name, value)
        self.model_path = str(model_path or DEFAULT_MODEL)
        self.model = open_model(self.model_path)
        self.config = self.model.config
        self.device = parse_device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ModelError("device 'cuda' requested but torch sees no CUDA device")
        train_ctx = self.config.n_ctx_train or 4096
        if n_ctx is not None:
            limits.check("n_ctx", n_ctx, hi=train_ctx, why=" (up to the model's context length)")
        self.n_ctx = int(n_ctx or min(train_ctx, 4096))
        if n_batch is not None:
            ctx = ("n_ctx" if n_ctx is not None else f"by default {self.model_path}'s "
                   f"{self.config.arch}.context_length = {self.config.n_ctx_train}, capped at 4096")
            limits.check("n_batch", n_batch, hi=self.n_ctx, why=f" (up to the context: {ctx})")
        fitted = cache_rate is None and cache_mem is None
        limits.check_cache_budget(cache_rate, cache_mem, gpu_mem)
        from .runtime.link import parse_link
        parse_link(link)                            # a malformed link is an error whatever else is given
        if n_threads:
            torch.set_num_threads(int(n_threads))
        self.backend = make_backend(self.device, n_threads=n_threads or default_threads(), launcher=launcher,
                                    activations=activations, kv_type=kv_type)
        from .memory import check_kv_cache
        check_kv_cache(self.model, self.n_ctx, self.device, self.backend.kind, kv_type)   # before allocating it
        from .memory import default_gpu_mem, default_n_batch, fit_cache
        if cache_rate is None and cache_mem is None and gpu_mem is None and self.device.type == "cuda":
            gpu_mem = default_gpu_mem(self.device)
        n_batch = int(n_batch or default_n_batch(self.model, self.backend.kind, self.n_ctx, gpu_mem))
        if cache_rate is None and cache_mem is None:
            if gpu_mem is not None:
                cache_mem = fit_cache(self.model, self.backend.kind, self.n_ctx, int(n_batch), int(gpu_mem), kv_type)
        self.gpu_mem = gpu_mem
        resident = cache_rate is None and cache_mem is None
        if resident and predictor not in (None, "none"):    # a bad one is named as such, cache or not
            from .predict import make_predictor
            make_predictor(predictor, self.model, routes=runtime_options.get("routes"))
        limits.check_cache_options(resident, fitted and gpu_mem is not None, policy=policy, predictor=predictor,
                                   link=link, cpu_experts=cpu_experts, cpu_threads=cpu_threads)
        self.source = make_source(self.model, self.device, cache_rate=cache_rate, cache_mem=cache_mem,
                                  policy=policy, predictor=predictor, link=link, cpu_experts=cpu_experts,
                                  cpu_threads=int(cpu_threads or n_threads or default_threads()),
                                  in_place=self.backend.weights_in_place, **runtime_options)
        try:
            self.experts = MoEExperts(self.source, self.backend)
            self.decoder = build_decoder(self.model, self.experts, self.backend)
            attach_numerics(self.decoder, self.experts, check_numerics, self.model_path)
            self.kv_cache = self.decoder.new_cache(self.n_ctx)
            if cpu_repack and self.backend.kind == "cpu" and self.source.resident:
                self._repack()
            from .runtime import attach
            attach(self.source, self.decoder, self.experts)
        except BaseException:
            self.close()  # no threads left behind
            raise
        self.n_batch = int(n_batch)
        from .memory import workspace_bytes
        self.backend.reserve(workspace_bytes(self.model, self.backend.kind, self.n_batch))
        self.decoding = Decoding(self.decoder, self.kv_cache, graphs=graphs)
        self._tokenizer = None
        self.timing = Timing()
        self._sequence = 0                # which call owns the KV cache now

    def _repack(self) -> None:
        """All-resident on the CPU: weights go into llama.cpp's CPU_REPACK layout where it has kernels
        for them (as llama.cpp loads them by default), and every MoE step takes the fused mul_mat_id."""
        be = self.backend
        for name, m in self.decoder.W.mats.items():
            if name != "token_embd.weight":               # read by rows (get_rows), never repacked
                be.repack_weight(m)
        from .backends.cpu import merged_gate_up
        for st in self.source.stacks.values():
            merged = merged_gate_up(st)
            for m in ((merged, st.down) if merged else (st.gate, st.up, st.down)):
                be.repack_stack(m)
        self.source.fuse_any = True

    @property
    def memory(self) -> dict:
        """Contract: bytes this Engine holds on its device. resident: non-expert weights (on the CPU,
        the mapped file bytes they are read from); kv_cache; expert_arena: the expert cache's slots,
        or every routed expert when there is no cache; workspace: the backend's scratch buffers;
        activations: the room kept for one prefill chunk's intermediates (CUDA; torch allocates them)."""
        from .memory import activation_bytes
        out = {"resident": self.decoder.W.nbytes, "kv_cache": self.kv_cache.nbytes,
               "expert_arena": self.source.nbytes, "workspace": self.backend.workspace_bytes,
               "activations": activation_bytes(self.model, self.backend.kind, self.n_batch, self.n_ctx)}
        out["total"] = sum(out.values())
        return out

    # ---- tokens ------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self.model)
        return self._tokenizer

    def tokenize(self, text: str | bytes, add_bos: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_bos=add_bos)

    def detokenize(self, ids) -> str:
        return self.tokenizer.decode(ids).decode("utf-8", errors="replace")

    # ---- forward -----------------------------------------------------------------------------
    def _prefill(self, cache, tokens, last_only: bool = False) -> torch.Tensor:
        """Feed `tokens` in chunks of n_batch; returns logits of every position [T, vocab], or with
        last_only of the last one [1, vocab] (the output head then runs on one row)."""
        out = []
        for i in range(0, len(tokens), self.n_batch):
            out.append(self.decoder.forward(tokens[i:i + self.n_batch], cache, last_only=last_only))
        return out[-1] if last_only else torch.cat(out)

    def _new_sequence(self) -> int:
        """Claim the Engine's one KV cache for a new sequence (an earlier generator loses it); the
        predictor's per-sequence state is reset too."""
        self._sequence += 1
        self.kv_cache.reset()
        self.source.reset_sequence()
        return self._sequence

    def _check_length(self, n: int) -> None:
        if n > self.n_ctx:
            raise ModelError(f"sequence of {n} tokens exceeds the context of {self.n_ctx} tokens")

    def logits(self, token_ids) -> np.ndarray:
        """Contract: fresh sequence, full prefill -> float32 [n_tokens, n_vocab]."""
        tokens = check_tokens(token_ids, self.config.n_vocab)
        self._check_length(len(tokens))
        self._new_sequence()
        cache = self.kv_cache
        t0 = time.perf_counter()
        out = self._prefill(cache, tokens)
        self.timing.prefill_tokens += len(tokens)
        self.timing.prefill_s += time.perf_counter() - t0
        return out.float().cpu().numpy()

    def generate(self, prompt, max_tokens: int = 128, temperature: float = 0.8, top_k: int = 40,
                 top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0, seed=None,
                 stop=None, repeat_last_n: int = 64, ignore_eos: bool = False):
        """Stream generated token ids after `prompt` (text or ids). Stops at EOS, a stop string or max_tokens."""
        limits.check("max_tokens", max_tokens)
        sampling = check_sampling(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed)
        ids = self.tokenize(prompt) if isinstance(prompt, (str, bytes)) else list(prompt)
        if not ids or (isinstance(prompt, (str, bytes)) and not prompt):
            raise ModelError("empty prompt")
        tokens = check_tokens(ids, self.config.n_vocab)
        self._check_length(len(tokens) + max_tokens)
        sampler = Sampler(**sampling)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        eos = None if ignore_eos else self.tokenizer.eos_id
        seq, cache = self._new_sequence(), self.kv_cache
        history = tokens.tolist()
        t0 = time.perf_counter()
        logits = self._prefill(cache, tokens, last_only=True)[-1]
        self.timing.prefill_tokens += len(tokens)
        self.timing.prefill_s += time.perf_counter() - t0
        text, decoder = "", codecs.getincrementaldecoder("utf-8")("replace")
        for i in range(max_tokens):
            t1 = time.perf_counter()
            tok = sampler.sample(logits, history)
            if eos is not None and tok == eos:
                break
            if stops:  # the token that completes a stop string is not emitted
                text += decoder.decode(self.tokenizer.decode([tok]))
                if any(s in text for s in stops):
                    break
            history.append(tok)
            yield tok
            if i + 1 == max_tokens:
                break                     # no forward pass for a token nobody will sample
            if self._sequence != seq:
                raise ModelError("another generate() or logits() call took this Engine's KV cache while this "
                                 "generator was paused; finish one sequence before starting the next")
            logits = self.decoding.step(tok)
            self.timing.decode_tokens += 1
            self.timing.decode_s += time.perf_counter() - t1

    # ---- llama-cpp-python-shaped API (promoe_gguf/api.py) -------------------------------------
    def create_completion(self, prompt, **kwargs):
        """As llama_cpp.Llama.create_completion: a completion dict, or an iterator of chunks (stream=True)."""
        from .api import create_completion
        return create_completion(self, prompt, **kwargs)

    def create_chat_completion(self, messages, **kwargs):
        """As llama_cpp.Llama.create_chat_completion, with the GGUF's chat template."""
        from .api import create_chat_completion
        return create_chat_completion(self, messages, **kwargs)

    def __call__(self, prompt, **kwargs):
        return self.create_completion(prompt, **kwargs)

    # ---- runtime -----------------------------------------------------------------------------
    @property
    def stats(self) -> dict:
        """Contract: hits, misses, bytes_h2d, stall_s, prefetch_useful, prefetch_wasted (+ per layer);
        decode_dispatch: what decode steps cost the host, per token (graphs replayed, launches made
        outside them, host waits) and its time per layer."""
        from .model.decode import DecodeCounts
        out = self.source.stats()
        out["decode_dispatch"] = self.decoding.counts.since(DecodeCounts(mode=self.decoding.counts.mode),
                                                            self.config.n_layers)
        return out

    def close(self) -> None:
        source = getattr(self, "source", None)       # None when the constructor failed before it
        if source is not None:
            source.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
