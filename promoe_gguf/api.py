"""Completions shaped like llama-cpp-python's (`llama_cpp.Llama.create_completion` /
`create_chat_completion`), on top of `Engine.generate`; the HTTP server and `promoe chat` use the same
pieces: `prepare_completion` / `prepare_chat` validate a request and give a `Generation`, whose text
stream the `*_chunks` / `*_response` functions shape.

Chat prompts are rendered with the GGUF's own Jinja template (`tokenizer.chat_template`), as llama.cpp
does; a model without one gets llama.cpp's fallback, ChatML (common/chat.cpp, CHATML_TEMPLATE_SRC).
"""
from __future__ import annotations

import codecs
import threading
import time
import uuid
from typing import Iterator

from . import limits
from .errors import ModelError, ParameterError, clip
from .sampling import DEFAULTS, check_sampling

ROLES = ("system", "developer", "user", "assistant")   # developer: OpenAI's newer name for system
MAX_STOPS = 16
CHATML_TEMPLATE = ("{%- for message in messages -%}\n"
                   "  {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' -}}\n"
                   "{%- endfor -%}\n"
                   "{%- if add_generation_prompt -%}\n"
                   "  {{- '<|im_start|>assistant\\n' -}}\n"
                   "{%- endif -%}")
# Parameters llama-cpp-python accepts that we do not implement: allowed only at their neutral value.
NEUTRAL = {"suffix": None, "logprobs": (None, False), "top_logprobs": None, "echo": False, "frequency_penalty": 0.0,
           "presence_penalty": 0.0, "typical_p": 1.0, "tfs_z": 1.0, "mirostat_mode": 0, "grammar": None,
           "logit_bias": None, "functions": None, "function_call": None, "tools": None, "tool_choice": None,
           "response_format": None, "logits_processor": None, "stopping_criteria": None, "n": 1, "best_of": (None, 1)}


class InvalidRequest(ParameterError):
    """A request the engine cannot serve; `param` names the offending field (OpenAI's error.param)."""

    def __init__(self, param: str, message: str):
        ModelError.__init__(self, message)
        self.param, self.detail = param, message


def check_stop(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else stop
    if stops is None:
        return []
    if not isinstance(stops, (list, tuple)):
        raise InvalidRequest("stop", f"stop must be a string or a list of strings, got {type(stop).__name__}")
    if len(stops) > MAX_STOPS:  # each is matched against the text after every token
        raise InvalidRequest("stop", f"stop has {len(stops)} strings; at most {MAX_STOPS} are allowed")
    for i, s in enumerate(stops):
        if not isinstance(s, str) or not s:
            raise InvalidRequest("stop", f"stop[{i}] must be a non-empty string, got {clip(s)}")
    return list(stops)


def check_unsupported(options: dict) -> None:
    for name, value in options.items():
        if name not in NEUTRAL:
            raise TypeError(f"unexpected keyword argument {name!r}")
        neutral = NEUTRAL[name] if isinstance(NEUTRAL[name], tuple) else (NEUTRAL[name],)
        if value not in neutral:
            raise InvalidRequest(name, f"{name}={clip(value)} is not supported by promoe-gguf")


def _max_tokens(max_tokens, n_prompt: int, n_ctx: int, prompt_param: str) -> int:
    """max_tokens checked against the room the prompt leaves in the context; None means all of it."""
    room = n_ctx - n_prompt
    if room < 1:
        raise InvalidRequest(prompt_param, f"the {prompt_param} has {n_prompt} tokens; the context holds {n_ctx}, "
                                       "which leaves no room to generate")
    if max_tokens is None:
        return room
    limits.check("max_tokens", max_tokens)
    if max_tokens > room:
        raise InvalidRequest("max_tokens", f"max_tokens {max_tokens} plus the prompt's {n_prompt} tokens exceeds "
                                           f"the context of {n_ctx} tokens (at most {room})")
    return max_tokens


# ---- chat template ---------------------------------------------------------------------------
def check_messages(messages) -> list[dict]:
    """OpenAI chat messages -> [{"role", "content"}] with text content; InvalidRequest names the field."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidRequest("messages", "messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise InvalidRequest(where, f"{where} must be an object with role and content")
        role = m.get("role")
        if role not in ROLES:
            raise InvalidRequest(f"{where}.role", f"{where}.role {clip(role)} is not one of {', '.join(ROLES)}")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: text only
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise InvalidRequest(f"{where}.content[{j}]", f"{where}.content[{j}] must be a text part "
                                                                  "{\"type\": \"text\", \"text\": ...}")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise InvalidRequest(f"{where}.content", f"{where}.content must be a string, got "
                                                     f"{type(content).__name__}")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


class ChatTemplate:
    """The model's chat template (or llama.cpp's ChatML fallback) and the stop strings it implies."""

    def __init__(self, tokenizer):
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        self.tokenizer = tokenizer
        source = tokenizer.chat_template
        self.is_fallback = not source or source == "chatml"
        self.source = CHATML_TEMPLATE if self.is_fallback else source
        self.bos = self._piece(tokenizer.bos_id)
        self.eos = self._piece(tokenizer.eos_id)
        self.formatter = Jinja2ChatFormatter(self.source, eos_token=self.eos, bos_token=self.bos,
                                             add_generation_prompt=True)
        self.stops = [s for s in (self.eos, "<|im_end|>" if self.is_fallback else "") if s]

    def _piece(self, token_id) -> str:
        if token_id is None:
            return ""
        return self.tokenizer.llama.detokenize([token_id], special=True).decode("utf-8", errors="replace")

    def render(self, messages: list[dict]) -> str:
        try:
            text = self.formatter(messages=messages).prompt
        except Exception as e:  # the template's own raise_exception, or a Jinja error
            raise InvalidRequest("messages", f"the chat template rejected the messages: {e}") from None
        # as llama.cpp: the tokenizer adds BOS itself, so a template's leading BOS is dropped
        if self.bos and text.startswith(self.bos):
            text = text[len(self.bos):]
        return text


# ---- generation ------------------------------------------------------------------------------
def _stop_at(text: str, stops: list[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that could begin a stop string (not safe to emit yet)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class Generation:
    """One validated request: iterate for text deltas. A stop string, and the token completing it, never
    appear in the text. Afterwards `finish_reason` ("stop", "length", or "cancelled" when `cancel` was
    set) and `usage` are filled in."""

    def __init__(self, engine, prompt_ids: list[int], max_tokens: int, sampling: dict, stops: list[str],
                 model: str, kind: str):
        self.engine, self.prompt_ids, self.max_tokens = engine, prompt_ids, max_tokens
        self.sampling, self.stops, self.model, self.kind = sampling, stops, model, kind
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.cancel = threading.Event()
        self.finish_reason = None
        self.completion_tokens = 0
        self.elapsed_s = 0.0

    @property
    def usage(self) -> dict:
        n = len(self.prompt_ids)
        return {"prompt_tokens": n, "completion_tokens": self.completion_tokens,
                "total_tokens": n + self.completion_tokens}

    def __iter__(self) -> Iterator[str]:
        t0 = time.perf_counter()
        decode = self.engine.tokenizer.decode
        utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        tokens = self.engine.generate(self.prompt_ids, max_tokens=self.max_tokens, **self.sampling)
        pending = ""  # decoded text not yet emitted: its tail may begin a stop string
        try:
            for tok in tokens:
                self.completion_tokens += 1
                pending += utf8.decode(decode([tok]))
                cut = _stop_at(pending, self.stops)
                if cut is not None:
                    if cut:
                        yield pending[:cut]
                    self.finish_reason = "stop"
                    return
                ready = len(pending) - _held_back(pending, self.stops)
                if ready > 0:
                    yield pending[:ready]
                    pending = pending[ready:]
                if self.cancel.is_set():
                    self.finish_reason = "cancelled"
                    return
            pending += utf8.decode(b"", final=True)
            cut = _stop_at(pending, self.stops)
            if pending[:cut]:
                yield pending[:cut]
            hit_length = cut is None and self.completion_tokens >= self.max_tokens
            self.finish_reason = "length" if hit_length else "stop"
        finally:
            tokens.close()  # ends engine.generate at once (a cancelled or failed request frees the engine)
            self.elapsed_s = time.perf_counter() - t0


def _engine_model_name(engine) -> str:
    import os
    return os.path.basename(str(engine.model_path))


def _tokenize_prompt(engine, text: str, param: str) -> list[int]:
    if not text:
        raise InvalidRequest(param, f"{param} is empty")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON can carry lone surrogates ("\ud800")
        raise InvalidRequest(param, f"{param} is not valid Unicode text: {e.reason} at {e.start}") from None
    # as llama.cpp's server and llama-cpp-python: BOS as the vocab says, special tokens parsed
    return engine.tokenizer.encode(text, add_bos=True, special=True)


def _check_prompt_ids(engine, ids) -> list[int]:
    n_vocab = engine.config.n_vocab
    for i, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < n_vocab:
            raise InvalidRequest("prompt", f"prompt[{i}] = {clip(t)} is not a token id in [0, {n_vocab})")
    if not ids:
        raise InvalidRequest("prompt", "prompt is empty")
    return list(ids)


def _sampling_args(kwargs: dict) -> tuple[dict, dict]:
    """Split kwargs into sampling parameters (defaults filled in) and the rest."""
    rest = dict(kwargs)
    sampling = {k: rest.pop(k, v) for k, v in DEFAULTS.items()}
    return check_sampling(**sampling), rest


def prepare_completion(engine, prompt, max_tokens=None, stop=None, model=None, **kwargs) -> Generation:
    """Validate a text completion: `prompt` is a string, a list of token ids, or a one-string list."""
    sampling, rest = _sampling_args(kwargs)
    check_unsupported(rest)
    if isinstance(prompt, (list, tuple)) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = _tokenize_prompt(engine, prompt, "prompt")
    elif isinstance(prompt, (list, tuple)):
        ids = _check_prompt_ids(engine, prompt)
    else:
        raise InvalidRequest("prompt", f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
    n = _max_tokens(max_tokens, len(ids), engine.n_ctx, "prompt")
    return Generation(engine, ids, n, sampling, check_stop(stop), model or _engine_model_name(engine), "text")


def chat_template(engine) -> ChatTemplate:
    template = getattr(engine, "_promoe_chat_template", None)
    if template is None:
        template = engine._promoe_chat_template = ChatTemplate(engine.tokenizer)
    return template


def prepare_chat(engine, messages, max_tokens=None, stop=None, model=None, **kwargs) -> Generation:
    """Validate a chat completion; the prompt is the chat template applied to `messages`."""
    sampling, rest = _sampling_args(kwargs)
    check_unsupported(rest)
    template = chat_template(engine)
    ids = _tokenize_prompt(engine, template.render(check_messages(messages)), "messages")
    n = _max_tokens(max_tokens, len(ids), engine.n_ctx, "messages")
    stops = check_stop(stop) + template.stops
    return Generation(engine, ids, n, sampling, stops, model or _engine_model_name(engine), "chat")


# ---- response shapes (llama_cpp.llama_types) -------------------------------------------------
def _envelope(gen: Generation, obj: str) -> dict:
    return {"id": gen.id, "object": obj, "created": gen.created, "model": gen.model}


def completion_chunks(gen: Generation) -> Iterator[dict]:
    def chunk(text, finish_reason):
        return {**_envelope(gen, "text_completion"),
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}]}
    for text in gen:
        yield chunk(text, None)
    yield chunk("", gen.finish_reason)


def completion_response(gen: Generation) -> dict:
    text = "".join(gen)
    return {**_envelope(gen, "text_completion"),
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": gen.finish_reason}],
            "usage": gen.usage}


def chat_chunks(gen: Generation) -> Iterator[dict]:
    def chunk(delta, finish_reason):
        return {**_envelope(gen, "chat.completion.chunk"),
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    yield chunk({"role": "assistant"}, None)
    for text in gen:
        yield chunk({"content": text}, None)
    yield chunk({}, gen.finish_reason)


def chat_response(gen: Generation) -> dict:
    text = "".join(gen)
    return {**_envelope(gen, "chat.completion"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": gen.finish_reason}],
            "usage": gen.usage}


# ---- the llama-cpp-python-shaped entry points (Engine.create_completion / create_chat_completion) ----
def create_completion(engine, prompt, max_tokens=16, temperature=DEFAULTS["temperature"], top_p=DEFAULTS["top_p"],
                      min_p=DEFAULTS["min_p"], stop=None, stream=False, seed=None,
                      repeat_penalty=DEFAULTS["repeat_penalty"], top_k=DEFAULTS["top_k"], model=None, **options):
    """As llama_cpp.Llama.create_completion: a dict, or an iterator of chunks with stream=True.
    max_tokens=None runs to the end of the context. Sampling defaults are llama-server's (sampling.DEFAULTS)."""
    gen = prepare_completion(engine, prompt, max_tokens=max_tokens, stop=stop, model=model,
                             temperature=temperature, top_p=top_p, min_p=min_p, seed=seed,
                             repeat_penalty=repeat_penalty, top_k=top_k, **options)
    return completion_chunks(gen) if stream else completion_response(gen)


def create_chat_completion(engine, messages, temperature=DEFAULTS["temperature"], top_p=DEFAULTS["top_p"],
                           top_k=DEFAULTS["top_k"], min_p=DEFAULTS["min_p"], stream=False, stop=None, seed=None,
                           max_tokens=None, repeat_penalty=DEFAULTS["repeat_penalty"], model=None, **options):
    """As llama_cpp.Llama.create_chat_completion: a dict, or chunks with stream=True. Sampling defaults are
    llama-server's (sampling.DEFAULTS), as everywhere in promoe (llama-cpp-python's chat uses temperature 0.2)."""
    gen = prepare_chat(engine, messages, max_tokens=max_tokens, stop=stop, model=model, temperature=temperature,
                       top_p=top_p, top_k=top_k, min_p=min_p, seed=seed, repeat_penalty=repeat_penalty, **options)
    return chat_chunks(gen) if stream else chat_response(gen)
