"""`promoe serve` held to llama-server's and the OpenAI API's strictness, as a user meets it (a real server
process on loopback, raw HTTP and the openai client): the key from a file or the environment and on every
route but /health (no OpenAPI schema when a key is set), JSON content type, a DNS-rebinding guard on the
Host header, /v1/models/{id}, the developer role, error responses counted in /metrics and never echoing
long values, bind errors as one line, and SIGTERM ending a running stream with an error event and [DONE]."""
import json
import os
import signal
import socket
import subprocess
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from test_server import PROMOE, wait_healthy

KEY = "strict-key-456"
AUTH = {"Authorization": f"Bearer {KEY}"}


def start(*args, env=None):
    """A server on a free port (--port 0; the URL is read from its first line)."""
    proc = subprocess.Popen([PROMOE, "serve", "--port", "0", "--n-ctx", "256", "--log-level", "warning", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    line = proc.stderr.readline()
    assert " on http://127.0.0.1:" in line, line
    url = line.rsplit(" on ", 1)[1].strip().removesuffix("/v1")
    wait_healthy(url, proc)
    return proc, url


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    key_file = tmp_path_factory.mktemp("key") / "key"
    key_file.write_text(KEY + "\n")
    proc, url = start("--api-key-file", str(key_file))
    yield proc, url
    proc.send_signal(signal.SIGTERM)
    proc.wait(20)


@pytest.fixture(scope="module")
def url(server):
    return server[1]


def metrics(url) -> dict:
    r = httpx.get(f"{url}/metrics", headers=AUTH, timeout=10)
    assert r.status_code == 200
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def post(url, path, body, headers=None, **kw):
    return httpx.post(f"{url}{path}", json=body, headers={**AUTH, **(headers or {})}, timeout=60, **kw)


def test_key_from_a_file_guards_every_route_but_health(url):
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    for path in ("/v1/models", "/v1/models/x", "/metrics"):
        r = httpx.get(f"{url}{path}", timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
    for path in ("/openapi.json", "/docs", "/redoc"):         # with a key, no schema or docs are served at all
        assert httpx.get(f"{url}{path}", headers=AUTH, timeout=10).status_code == 404, path


def test_key_from_the_environment():
    proc, url = start(env={"PROMOE_API_KEY": KEY})
    try:
        assert "strict-key" not in " ".join(open(f"/proc/{proc.pid}/cmdline").read().split("\0"))
        assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401
        assert httpx.get(f"{url}/v1/models", headers=AUTH, timeout=10).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def test_json_content_type_is_required(url):
    r = httpx.post(f"{url}/v1/completions", content=b'{"prompt": "x", "max_tokens": 1}',
                   headers={**AUTH, "Content-Type": "text/plain"}, timeout=30)
    assert r.status_code == 415 and r.json()["error"]["param"] == "Content-Type", r.text
    r = httpx.post(f"{url}/v1/completions", content=b'{"prompt": "x", "max_tokens": 1}', headers=AUTH, timeout=30)
    assert r.status_code == 415                                       # no Content-Type at all
    r = httpx.post(f"{url}/v1/completions", content=b'{"prompt": "x", "max_tokens": 1}', timeout=30,
                   headers={**AUTH, "Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200


@pytest.mark.parametrize("host, ok", [("localhost", True), ("127.0.0.1", True), ("[::1]", True),
                                      ("evil.example", False), ("127.0.0.1.nip.io", False), ("", False)])
def test_host_header_must_be_loopback(url, host, ok):
    """A page on evil.example whose DNS answers 127.0.0.1 sends Host: evil.example:PORT: refused."""
    port = url.rsplit(":", 1)[1]
    r = httpx.get(f"{url}/v1/models", headers={**AUTH, "Host": f"{host}:{port}" if host else ""}, timeout=10)
    assert (r.status_code == 200) == ok, (host, r.text)
    if not ok:
        assert r.status_code == 400 and r.json()["error"]["param"] == "Host"


def test_models_retrieve(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=30)
    model_id = client.models.list().data[0].id
    assert client.models.retrieve(model_id).id == model_id
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4o")
    assert e.value.body["code"] == "model_not_found"


def test_developer_role_is_system(url):
    """OpenAI's current name for the system message: the same prompt, so the same greedy reply."""
    def reply(role):
        r = post(url, "/v1/chat/completions", {"messages": [{"role": role, "content": "Answer in one word."},
                                                            {"role": "user", "content": "def f("}],
                                               "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"], r.json()["usage"]["prompt_tokens"]
    assert reply("developer") == reply("system")


def test_errors_are_counted_and_clipped(url):
    before = metrics(url)
    long = "x" * 5000
    r = post(url, "/v1/completions", {"prompt": "a", "model": long})
    assert r.status_code == 400 and "x" * 201 not in r.text and len(r.text) < 600, r.text
    r = post(url, "/v1/chat/completions", {"messages": [{"role": long, "content": "a"}]})
    assert r.status_code == 400 and "x" * 201 not in r.text and len(r.text) < 600, r.text
    r = post(url, "/v1/completions", {"prompt": "a", "stop": [long] * 3, "echo": long})
    assert r.status_code == 400 and "x" * 201 not in r.text, r.text
    httpx.post(f"{url}/v1/completions", content=b"{}", headers={**AUTH, "Content-Type": "text/plain"}, timeout=10)
    httpx.get(f"{url}/v1/models", timeout=10)                                             # 401
    after = metrics(url)

    def count(m, code):
        return m.get(("promoe_http_errors_total", frozenset({("code", code)})), 0)
    assert count(after, "400") - count(before, "400") == 3
    assert count(after, "415") - count(before, "415") == 1
    assert count(after, "401") - count(before, "401") == 1


def test_bind_errors_are_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        t0 = time.monotonic()
        proc = subprocess.run([PROMOE, "serve", "--port", str(port)], capture_output=True, text=True, timeout=60)
        assert time.monotonic() - t0 < 30
    assert (proc.returncode, proc.stderr) == (2, f"promoe: error: cannot listen on 127.0.0.1 port {port}: "
                                                 "Address already in use\n")
    proc = subprocess.run([PROMOE, "serve", "--host", "no-such-host.invalid"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("promoe: error: --host 'no-such-host.invalid' is not an "
                                                           "address to listen on") and proc.stderr.count("\n") == 1


def test_sigterm_ends_streams_with_an_error_event_and_done():
    """Within 2 s of SIGTERM: the stream gets an error event and [DONE], the process exits 0 without a
    traceback, and the port is free again."""
    proc, url = start()
    body = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 200, "stream": True,
            "temperature": 1.0, "seed": 1}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
        data = (line[len("data: "):] for line in r.iter_lines() if line.startswith("data: "))
        first = [next(data) for _ in range(3)]
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rest = [d if d == "[DONE]" else json.loads(d) for d in data]
    code = proc.wait(20)
    seconds = time.monotonic() - t0
    assert all("choices" in json.loads(d) for d in first)
    err = proc.stderr.read()
    assert code == 0 and seconds < 2.0, (code, seconds)
    assert rest[-1] == "[DONE]" and rest[-2]["error"]["message"] == "the server is shutting down", rest[-3:]
    assert "Traceback" not in err and "CancelledError" not in err, err
    with socket.socket() as s:                                      # nothing holds the port
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", int(url.rsplit(":", 1)[1])))
