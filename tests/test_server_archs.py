"""`promoe serve` on the architectures added after the server was written (glm4moe, gpt-oss,
qwen35moe): a real server process per model, with an expert cache, answers a completion and a
streamed chat exactly as the Python API does in this process."""
import httpx
import openai
import pytest

from promoe_gguf import Engine
from test_server import N_CTX, start_server, stop_server

ARCH_MODELS = [("glm4moe", "Q4_K_M", "default"), ("gpt-oss", "MXFP4_MOE", "default"),
               ("qwen35moe", "Q4_K_M", "default")]


@pytest.mark.parametrize("key", ARCH_MODELS, ids=lambda k: k[0])
def test_serve_answers_as_the_python_api(test_models, key):
    path = test_models[key]
    proc, url = start_server(path, "--cache-rate", "0.5")
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        model_id = client.models.list().data[0].id
        r = client.completions.create(model=model_id, prompt="def f(x):", max_tokens=12, temperature=0)
        chunks = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=8, temperature=0, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    finally:
        code, _ = stop_server(proc)
    assert code == 0
    with Engine(path, n_ctx=N_CTX, n_threads=1, cache_rate=0.5) as eng:     # as the server runs it
        ref = eng.create_completion("def f(x):", max_tokens=12, temperature=0)
        chat = eng.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=8, temperature=0)
    assert r.choices[0].text == ref["choices"][0]["text"]
    assert r.usage.completion_tokens == ref["usage"]["completion_tokens"]
    assert streamed == chat["choices"][0]["message"]["content"]
