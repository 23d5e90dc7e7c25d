"""Engine.create_completion / create_chat_completion: llama-cpp-python's dict shapes (its own TypedDicts in
llama_cpp.llama_types are the oracle), stop strings, chat templates (llama.cpp's ChatML fallback against
llama.cpp's own template code), and bad input naming its field."""
import ctypes
import typing

import llama_cpp
import pytest
from llama_cpp import llama_types

from promoe_gguf import DEFAULT_MODEL, Engine
from promoe_gguf.api import ChatTemplate, InvalidRequest
from promoe_gguf.errors import ParameterError
from promoe_gguf.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def engine():
    with Engine(DEFAULT_MODEL, n_ctx=256, n_threads=1) as eng:
        yield eng


# ---- shapes ----------------------------------------------------------------------------------
def conforms(value, tp, path="$"):
    """Check `value` against a llama_types annotation: TypedDict keys (required present, nothing unknown),
    lists, unions/Optional, Literal and plain types. Returns a list of problems."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if hasattr(tp, "__required_keys__"):  # a TypedDict (typing or typing_extensions)
        if not isinstance(value, dict):
            return [f"{path}: expected an object, got {type(value).__name__}"]
        hints = typing.get_type_hints(tp)
        problems = [f"{path}: missing {k!r}" for k in tp.__required_keys__ if k not in value]
        problems += [f"{path}: unknown key {k!r}" for k in value if k not in hints]
        for k in value.keys() & hints.keys():
            problems += conforms(value[k], hints[k], f"{path}.{k}")
        return problems
    if origin is typing.Union:
        options = [conforms(value, a, path) for a in args]
        return [] if any(not p for p in options) else [f"{path}: {value!r} matches none of {args}"]
    if origin is typing.Literal:
        return [] if value in args else [f"{path}: {value!r} not in {args}"]
    if origin in (list, typing.List):
        if not isinstance(value, list):
            return [f"{path}: expected a list"]
        return [p for i, v in enumerate(value) for p in conforms(v, args[0], f"{path}[{i}]")]
    if tp is type(None):
        return [] if value is None else [f"{path}: expected null, got {value!r}"]
    if tp in (int, str, bool):
        ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
        return [] if ok else [f"{path}: expected {tp.__name__}, got {value!r}"]
    return []  # JSON-ish catch-alls (Dict[str, JsonType]) are not produced by us


def test_conforms_catches_wrong_shapes():
    good = {"id": "x", "object": "text_completion", "created": 1, "model": "m",
            "choices": [{"text": "a", "index": 0, "logprobs": None, "finish_reason": "stop"}]}
    assert conforms(good, llama_types.CreateCompletionResponse) == []
    assert conforms({**good, "extra": 1}, llama_types.CreateCompletionResponse)
    assert conforms({**good, "object": "chat.completion"}, llama_types.CreateCompletionResponse)
    bad_choice = {**good, "choices": [{"text": 3, "index": 0, "logprobs": None, "finish_reason": "stop"}]}
    assert conforms(bad_choice, llama_types.CreateCompletionResponse)


def test_completion_shapes(engine):
    r = engine.create_completion("def parse_args(", max_tokens=8, seed=1)
    assert conforms(r, llama_types.CreateCompletionResponse) == []
    assert r["usage"]["prompt_tokens"] == len(engine.tokenize("def parse_args("))
    assert r["usage"]["completion_tokens"] == 8 and r["choices"][0]["finish_reason"] == "length"
    chunks = list(engine.create_completion("def parse_args(", max_tokens=8, seed=1, stream=True))
    for c in chunks:
        assert conforms(c, llama_types.CreateCompletionStreamResponse) == []
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert "".join(c["choices"][0]["text"] for c in chunks) == r["choices"][0]["text"]  # same seed, same text


def test_chat_shapes(engine):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "import os"}]
    r = engine.create_chat_completion(messages, max_tokens=6, seed=3)
    assert conforms(r, llama_types.CreateChatCompletionResponse) == []
    chunks = list(engine.create_chat_completion(messages, max_tokens=6, seed=3, stream=True))
    for c in chunks:
        assert conforms(c, llama_types.CreateChatCompletionStreamResponse) == []
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == r["choices"][0]["message"]["content"]


def test_seed_fixes_the_text(engine):
    def text(seed):
        return engine.create_completion("class ", max_tokens=24, temperature=1.0, top_k=0, min_p=0.0,
                                        seed=seed)["choices"][0]["text"]
    assert text(5) == text(5)
    assert text(5) != text(6)


# ---- stop strings ----------------------------------------------------------------------------
def test_stop_string_cuts_text_and_its_completing_token(engine):
    prompt = "def parse_args(argv):\n"
    full = engine.create_completion(prompt, max_tokens=40, temperature=0)["choices"][0]["text"]
    stop = full[12:15]                       # 3 bytes: spans three tokens of the byte-level model
    expected = full[:full.find(stop)]
    r = engine.create_completion(prompt, max_tokens=40, temperature=0, stop=[stop, "never-there"])
    assert r["choices"][0]["text"] == expected and r["choices"][0]["finish_reason"] == "stop"
    assert r["usage"]["completion_tokens"] == len(engine.tokenize(expected + stop, add_bos=False))
    chunks = [c["choices"][0]["text"] for c in engine.create_completion(prompt, max_tokens=40, temperature=0,
                                                                       stop=stop, stream=True)]
    assert "".join(chunks) == expected
    # the generate() token stream: the token completing the stop string is not emitted either
    ids = list(engine.generate(prompt, max_tokens=40, temperature=0, stop=[stop]))
    assert engine.detokenize(ids) == expected + stop[:-1]


def test_generate_stops_at_stop_string_and_keeps_earlier_tokens(engine):
    prompt = "import os\n"
    free = list(engine.generate(prompt, max_tokens=30, temperature=0))
    text = engine.detokenize(free)
    stop = text[5:7]
    first = next(i for i in range(len(free)) if stop in engine.detokenize(free[:i + 1]))
    assert list(engine.generate(prompt, max_tokens=30, temperature=0, stop=stop)) == free[:first]


# ---- chat templates --------------------------------------------------------------------------
def llama_cpp_chatml(messages) -> str:
    """llama.cpp's own rendering of its built-in "chatml" template (src/llama-chat.cpp)."""
    keep = [(m["role"].encode(), m["content"].encode()) for m in messages]
    arr = (llama_cpp.llama_chat_message * len(keep))(*[llama_cpp.llama_chat_message(r, c) for r, c in keep])
    buf = ctypes.create_string_buffer(4096)
    n = llama_cpp.llama_chat_apply_template(b"chatml", arr, len(keep), True, buf, len(buf))
    assert 0 < n < len(buf)
    return buf.raw[:n].decode()


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What is 2+2?"}]


def test_default_model_template(engine):
    template = ChatTemplate(engine.tokenizer)
    assert not template.is_fallback
    # the GGUF's template: "{role}: {content}\n" per message, then "assistant: "
    assert template.render(MESSAGES) == ("system: Be brief.\nuser: Hi there\nassistant: Hello.\n"
                                         "user: What is 2+2?\nassistant: ")


def test_no_template_falls_back_to_chatml_as_llama_cpp(engine):
    tokenizer = Tokenizer(engine.model)
    tokenizer.chat_template = None           # the same vocab, as a GGUF without tokenizer.chat_template
    template = ChatTemplate(tokenizer)
    assert template.is_fallback and "<|im_end|>" in template.stops
    assert template.render(MESSAGES) == llama_cpp_chatml(MESSAGES)


def test_chat_prompt_tokens(engine):
    """BOS once (the vocab adds it), then the rendered template's bytes."""
    r = engine.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=1)
    rendered = "user: hi\nassistant: "
    assert r["usage"]["prompt_tokens"] == 1 + len(rendered.encode())


# ---- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, param", [
    (dict(max_tokens=-1), "max_tokens"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=10**9), "max_tokens"),
    (dict(max_tokens="8"), "max_tokens"),
    (dict(max_tokens=2.5), "max_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature="hot"), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(min_p=-1), "min_p"),
    (dict(top_k=1.5), "top_k"),
    (dict(repeat_penalty=0), "repeat_penalty"),
    (dict(seed=2**70), "seed"),
    (dict(seed=True), "seed"),
    (dict(stop=[""]), "stop"),
    (dict(stop=3), "stop"),
    (dict(stop=[str(i) for i in range(17)]), "stop"),
    (dict(echo=True), "echo"),
    (dict(frequency_penalty=0.5), "frequency_penalty"),
])
def test_bad_completion_arguments_name_the_field(engine, kwargs, param):
    with pytest.raises(ParameterError) as e:
        engine.create_completion("def f(", **kwargs)
    assert e.value.param == param and param in str(e.value)


@pytest.mark.parametrize("prompt, fragment", [
    ("", "empty"), ([], "empty"), ([1, 2, 999], "prompt[2]"), ([1, "a"], "prompt[1]"), (3, "prompt"),
    ("x" * 300, "context"), ("\ud800", "Unicode"),
])
def test_bad_prompts(engine, prompt, fragment):
    with pytest.raises(InvalidRequest) as e:
        engine.create_completion(prompt, max_tokens=1)
    assert e.value.param == "prompt" and fragment in str(e.value)


@pytest.mark.parametrize("messages, param", [
    ([], "messages"),
    ("hello", "messages"),
    ([{"role": "wizard", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": "x"}, {"role": "user"}], "messages[1].content"),
    ([{"role": "user", "content": 5}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "messages[0].content[0]"),
    ([{"role": "user", "content": "x" * 400}], "messages"),
    (["hi"], "messages[0]"),
])
def test_bad_messages_name_the_field(engine, messages, param):
    with pytest.raises(InvalidRequest) as e:
        engine.create_chat_completion(messages, max_tokens=1)
    assert e.value.param == param


def test_content_parts_are_text(engine):
    parts = [{"type": "text", "text": "import "}, {"type": "text", "text": "os"}]
    a = engine.create_chat_completion([{"role": "user", "content": parts}], max_tokens=4, temperature=0)
    b = engine.create_chat_completion([{"role": "user", "content": "import os"}], max_tokens=4, temperature=0)
    assert a["choices"][0]["message"] == b["choices"][0]["message"]
    assert a["usage"] == b["usage"]


def test_unknown_keyword_is_a_type_error(engine):
    with pytest.raises(TypeError, match="colour"):
        engine.create_completion("x", colour="red")
