"""Engine: one loaded model, its expert source (cache + prefetcher), tokenizer and sampler."""
from __future__ import annotations

import codecs
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import ModelError
from .format import open_model
from .format.validate import check_kv_cache
from .model import build_decoder
from .model.common import check_tokens
from .model.experts import MoEExperts
from .numerics import attach as attach_numerics
from .sampling import Sampler
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


class Engine:
    """Contract: Engine(model_path, device, cache_rate, cache_mem, policy, predictor, ...).

    `n_ctx`: KV cache length (default: the model's training context, at most 4096).
    `n_batch`: prefill chunk size in tokens. `link`: emulated host-to-device link on CPU
    (see runtime.link). `n_threads`: torch's CPU threads (process-wide; small models decode
    fastest with 1, since per-op threading overhead dominates). `check_numerics`: check every
    block for NaN/inf and name the first that produced one (the logits are always checked). Expert
    caching options are passed to the runtime's source.
    """

    def __init__(self, model_path=None, device="cpu", cache_rate=None, cache_mem=None, policy="lru",
                 predictor="none", n_ctx=None, n_batch=64, link=None, n_threads=None, check_numerics=False,
                 **runtime_options):
        from . import DEFAULT_MODEL
        if n_threads:
            torch.set_num_threads(int(n_threads))
        from .runtime import make_source
        self.model_path = str(model_path or DEFAULT_MODEL)
        self.model = open_model(self.model_path)
        self.config = self.model.config
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ModelError("device 'cuda' requested but torch sees no CUDA device")
        train_ctx = self.config.n_ctx_train or 4096
        self.n_ctx = int(n_ctx or min(train_ctx, 4096))
        if self.n_ctx > train_ctx:
            raise ModelError(f"n_ctx {self.n_ctx} exceeds the model's context length {train_ctx}")
        check_kv_cache(self.config, self.n_ctx, self.device, self.model_path)   # issue 13: before allocating
        self.source = make_source(self.model, self.device, cache_rate=cache_rate, cache_mem=cache_mem,
                                  policy=policy, predictor=predictor, link=link, **runtime_options)
        try:
            self.experts = MoEExperts(self.source)
            self.decoder = build_decoder(self.model, self.experts, self.device)
            attach_numerics(self.decoder, self.experts, check_numerics, self.model_path)   # issue 13
            from .runtime import attach
            attach(self.source, self.decoder, self.experts)
        except BaseException:
            self.close()  # no threads left behind
            raise
        self.n_batch = int(n_batch)
        self._tokenizer = None
        self.timing = Timing()

    # ---- tokens ------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self.model)
        return self._tokenizer

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_bos=add_bos)

    def detokenize(self, ids) -> str:
        return self.tokenizer.decode(ids).decode("utf-8", errors="replace")

    # ---- forward -----------------------------------------------------------------------------
    def _prefill(self, cache, tokens) -> torch.Tensor:
        """Feed `tokens` in chunks of n_batch; returns logits of every position [T, vocab]."""
        out = []
        for i in range(0, len(tokens), self.n_batch):
            out.append(self.decoder.forward(tokens[i:i + self.n_batch], cache))
        return torch.cat(out)

    def _check_length(self, n: int) -> None:
        if n > self.n_ctx:
            raise ModelError(f"sequence of {n} tokens exceeds the context of {self.n_ctx} tokens")

    def logits(self, token_ids) -> np.ndarray:
        """Contract: fresh sequence, full prefill -> float32 [n_tokens, n_vocab]."""
        tokens = check_tokens(token_ids, self.config.n_vocab)
        self._check_length(len(tokens))
        cache = self.decoder.new_cache(self.n_ctx)
        t0 = time.perf_counter()
        out = self._prefill(cache, tokens)
        self.timing.prefill_tokens += len(tokens)
        self.timing.prefill_s += time.perf_counter() - t0
        return out.float().cpu().numpy()

    def generate(self, prompt, max_tokens: int = 128, temperature: float = 0.8, top_k: int = 40,
                 top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0, seed=None,
                 stop=None, repeat_last_n: int = 64, ignore_eos: bool = False):
        """Stream generated token ids after `prompt` (text or ids). Stops at EOS, a stop string or max_tokens."""
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids or (isinstance(prompt, str) and not prompt):
            raise ModelError("empty prompt")
        tokens = check_tokens(ids, self.config.n_vocab)
        self._check_length(len(tokens) + max_tokens)
        sampler = Sampler(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        eos = None if ignore_eos else self.tokenizer.eos_id
        cache = self.decoder.new_cache(self.n_ctx)
        history = tokens.tolist()
        t0 = time.perf_counter()
        logits = self._prefill(cache, tokens)[-1]
        self.timing.prefill_tokens += len(tokens)
        self.timing.prefill_s += time.perf_counter() - t0
        text, decoder = "", codecs.getincrementaldecoder("utf-8")("replace")
        for _ in range(max_tokens):
            t1 = time.perf_counter()
            tok = sampler.sample(logits, history)
            if eos is not None and tok == eos:
                break
            history.append(tok)
            yield tok
            if stops:
                text += decoder.decode(self.tokenizer.decode([tok]))
                if any(s in text for s in stops):
                    break
            logits = self.decoder.forward(torch.tensor([tok]), cache)[-1]
            self.timing.decode_tokens += 1
            self.timing.decode_s += time.perf_counter() - t1

    # ---- runtime -----------------------------------------------------------------------------
    @property
    def stats(self) -> dict:
        """Contract: hits, misses, bytes_h2d, stall_s, prefetch_useful, prefetch_wasted (+ per layer)."""
        return self.source.stats()

    def close(self) -> None:
        if hasattr(self.source, "close"):
            self.source.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
