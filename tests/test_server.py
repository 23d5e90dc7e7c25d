"""`promoe serve` as users run it: a real server process on loopback, driven by the `openai` client and by
raw HTTP (httpx): completions and chat (streamed as server-sent events), sampling parameters, stop strings,
auth, malformed input, client disconnects, queue overflow (503 + Retry-After), a bounded load test, and
shutdown. Prometheus output is parsed with prometheus_client's own parser."""
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from promoe_gguf import DEFAULT_MODEL, Engine

KEY = "test-key-123"
N_CTX = 256
MAX_QUEUE = 4
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMOE = str(Path(sys.executable).with_name("promoe"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc=None, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not healthy after {timeout} s")


def start_server(*extra):
    port = free_port()
    proc = subprocess.Popen([PROMOE, "serve", "--port", str(port), "--n-ctx", str(N_CTX), "--threads", "1",
                             "--log-level", "warning", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
    except BaseException:
        proc.kill()
        proc.wait(10)
        raise
    return proc, url


def stop_server(proc, timeout: float = 20.0) -> tuple[int, float]:
    """SIGTERM, as a service manager stops it; returns (exit code, seconds to exit)."""
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise AssertionError(f"server did not exit within {timeout} s of SIGTERM")
    return code, time.monotonic() - t0


@pytest.fixture(scope="module")
def server():
    proc, url = start_server("--api-key", KEY, "--max-queue", str(MAX_QUEUE), "--cache-rate", "0.5")
    yield proc, url
    if proc.poll() is None:
        stop_server(proc)


@pytest.fixture(scope="module")
def url(server):
    return server[1]


@pytest.fixture(scope="module")
def slow_url():
    """A server whose expert misses all cross a 10 MB/s emulated link (tens of tokens/s, not
    thousands): a stream holds the engine for seconds whatever this machine's speed."""
    proc, url = start_server("--api-key", KEY, "--cache-rate", "0.5", "--cpu-experts", "off", "--link", "10MB/s")
    yield url
    if proc.poll() is None:
        stop_server(proc)


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def engine():
    """The same model in this process: what the server answers must equal the Python API's answer."""
    with Engine(DEFAULT_MODEL, n_ctx=N_CTX, n_threads=1) as eng:
        yield eng


def metrics(url) -> dict:
    """{(name, frozenset(labels)): value} parsed by prometheus_client's parser."""
    r = httpx.get(f"{url}/metrics", headers=AUTH, timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def metric(m: dict, name: str, **labels) -> float:
    return m[(name, frozenset(labels.items()))]


def wait_for(predicate, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def sse_events(response) -> list:
    """Parse a text/event-stream body: the JSON of every data line, and "[DONE]"."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


# ---- the OpenAI surface ----------------------------------------------------------------------
def test_models_and_health(url, client):
    models = client.models.list().data
    assert [m.id for m in models] == [os.path.basename(DEFAULT_MODEL)]
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}       # no key needed


def test_completion_matches_python_api(client, model_id, engine):
    r = client.completions.create(model=model_id, prompt="def parse_args(", max_tokens=12, temperature=0)
    ref = engine.create_completion("def parse_args(", max_tokens=12, temperature=0)
    assert r.choices[0].text == ref["choices"][0]["text"]
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == \
        (ref["usage"]["prompt_tokens"], 12, ref["usage"]["prompt_tokens"] + 12)


def test_chat_stream_equals_non_stream(client, model_id):
    messages = [{"role": "system", "content": "Python only."}, {"role": "user", "content": "import sys"}]
    args = dict(model=model_id, messages=messages, max_tokens=16, temperature=0.9, seed=42)
    full = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content and len(text) > 0
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_sampling_parameters_reach_the_sampler(client, model_id, engine):
    prompt = "for i in range("
    greedy = client.completions.create(model=model_id, prompt=prompt, max_tokens=24, temperature=0).choices[0].text
    # top_k=1 and min_p=1 keep only the argmax: a hot temperature changes nothing
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        r = client.completions.create(model=model_id, prompt=prompt, max_tokens=24, temperature=1.5, seed=1,
                                      extra_body=extra)
        assert r.choices[0].text == greedy, extra
    # repeat_penalty and top_p/seed: the server answers as the Python API does with the same values
    prompt = "x = [1, 2, 3, "
    greedy = client.completions.create(model=model_id, prompt=prompt, max_tokens=24, temperature=0).choices[0].text
    for extra, kwargs in (({"repeat_penalty": 1.5}, dict(temperature=0, repeat_penalty=1.5)),
                          ({"top_k": 5}, dict(temperature=1.0, top_p=0.7, seed=9, top_k=5))):
        r = client.completions.create(model=model_id, prompt=prompt, max_tokens=24, extra_body=extra,
                                      **{k: v for k, v in kwargs.items() if k in ("temperature", "top_p", "seed")})
        assert r.choices[0].text == engine.create_completion(prompt, max_tokens=24, **kwargs)["choices"][0]["text"]
    penalized = engine.create_completion(prompt, max_tokens=24, temperature=0, repeat_penalty=1.5)
    assert penalized["choices"][0]["text"] != greedy   # so the check above could tell


def test_stop_strings(client, model_id):
    prompt = "class Parser:\n"
    full = client.completions.create(model=model_id, prompt=prompt, max_tokens=40, temperature=0).choices[0].text
    stop = full[10:13]
    r = client.completions.create(model=model_id, prompt=prompt, max_tokens=40, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.find(stop)] and r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=model_id, prompt=prompt, max_tokens=40, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full[:full.find(stop)]


def test_raw_sse(url, model_id):
    body = {"model": model_id, "prompt": "import ", "max_tokens": 5, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]


# ---- auth ------------------------------------------------------------------------------------
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}])
def test_api_key_required_everywhere_but_health(url, headers):
    for method, path, body in (("GET", "/v1/models", None), ("GET", "/metrics", None),
                               ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 1}),
                               ("POST", "/v1/chat/completions",
                                {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1})):
        r = httpx.request(method, f"{url}{path}", json=body, headers=headers, timeout=10)
        assert r.status_code == 401, (path, headers)
        assert r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{url}/health", headers=headers).status_code == 200


def test_openai_client_with_wrong_key(url, model_id):
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=model_id, prompt="x", max_tokens=1)


# ---- bad requests ----------------------------------------------------------------------------
BAD = [  # (path, body (dict, or raw bytes), expected param)
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, "model"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -5}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**12}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ("/v1/completions", {"prompt": "y" * (N_CTX + 10), "max_tokens": 1}, "prompt"),
    ("/v1/completions", {"prompt": list(range(N_CTX + 1)), "max_tokens": 1}, "prompt"),
    ("/v1/completions", {"prompt": {"text": "x"}}, "prompt"),
    ("/v1/completions", {"max_tokens": 3}, "prompt"),
    ("/v1/completions", {"prompt": "x", "temperature": "warm"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": [0.5]}, "top_p"),
    ("/v1/completions", {"prompt": "x", "seed": 1.5}, "seed"),
    ("/v1/completions", {"prompt": "x", "stop": {"a": 1}}, "stop"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "x", "n": 3}, "n"),
    ("/v1/completions", b'{"prompt": "\\ud800"}', "prompt"),      # a lone surrogate
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 4', "body"),
    ("/v1/completions", b'{"prompt": "x", "temperature": NaN}', "temperature"),
    ("/v1/completions", b"[1, 2, 3]", "body"),
    ("/v1/completions", b"\xff\xfe not utf-8", "body"),
    ("/v1/completions", b"[" * 100000 + b"]" * 100000, "body"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": "hello"}, "messages"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"prompt": "x"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "z" * (N_CTX * 2)}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
]


@pytest.mark.parametrize("path, body, param", BAD, ids=[f"{p.split('/')[-1]}-{i}" for i, (p, _, _) in enumerate(BAD)])
def test_bad_request_is_400_naming_the_field(url, path, body, param):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{url}{path}", headers={**AUTH, "Content-Type": "application/json"}, timeout=30, **kwargs)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert param.split("[")[0].split(".")[0] in err["message"] or param == "body"


def test_server_survives_bad_requests(url, client, model_id):
    """After everything above (and an oversized body), the engine still answers normally."""
    r = httpx.post(f"{url}/v1/completions", headers=AUTH, content=b"x" * (5 << 20), timeout=30)
    assert r.status_code == 413
    m = metrics(url)
    assert metric(m, "promoe_requests_running") == 0 and metric(m, "promoe_queue_depth") == 0
    r = client.completions.create(model=model_id, prompt="def ", max_tokens=3)
    assert r.usage.completion_tokens == 3


# ---- scheduling ------------------------------------------------------------------------------
def long_stream(url, model_id, max_tokens=N_CTX - 30):
    body = {"model": model_id, "messages": [{"role": "user", "content": "go"}], "max_tokens": max_tokens,
            "stream": True, "temperature": 1.0, "seed": 1}
    return httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=60)


def read_events(response, n):
    """Read n SSE events; returns the line iterator, which the caller keeps (dropping it closes the stream)."""
    lines = response.iter_lines()
    got = 0
    while got < n:
        if next(lines).startswith("data: "):
            got += 1
    return lines


def test_disconnect_mid_stream_stops_generation(url, client, model_id):
    before = metrics(url)
    max_tokens = N_CTX - 30
    with long_stream(url, model_id, max_tokens) as r:
        assert r.status_code == 200
        read_events(r, 3)
    # the client hung up: the job is cancelled at the next token and the engine is free again
    wait_for(lambda: metric(metrics(url), "promoe_requests_total", outcome="cancelled") ==
             metric(before, "promoe_requests_total", outcome="cancelled") + 1, what="the cancelled count")
    after = metrics(url)
    assert metric(after, "promoe_requests_running") == 0
    generated = metric(after, "promoe_completion_tokens_total") - metric(before, "promoe_completion_tokens_total")
    assert 2 <= generated < max_tokens / 2, generated
    r = client.completions.create(model=model_id, prompt="x = ", max_tokens=2)
    assert r.usage.completion_tokens == 2


def test_queue_overflow_gets_503_with_retry_after(url, model_id):
    results = []

    def queued_request():
        r = httpx.post(f"{url}/v1/completions", headers=AUTH, timeout=60,
                       json={"model": model_id, "prompt": "a = ", "max_tokens": 2})
        results.append(r.status_code)

    with long_stream(url, model_id) as holder:          # occupies the engine
        lines = read_events(holder, 2)
        threads = [threading.Thread(target=queued_request) for _ in range(MAX_QUEUE)]
        for t in threads:
            t.start()
        wait_for(lambda: metric(metrics(url), "promoe_queue_depth") == MAX_QUEUE, what="a full queue")
        over = httpx.post(f"{url}/v1/completions", headers=AUTH, timeout=10,
                          json={"model": model_id, "prompt": "b = ", "max_tokens": 2})
        assert over.status_code == 503
        assert int(over.headers["Retry-After"]) >= 1
        assert over.json()["error"]["code"] == "queue_full"
        del lines
    for t in threads:   # the holder hung up; the queued requests run in order
        t.join(60)
    assert results == [200] * MAX_QUEUE


def test_client_leaving_the_queue_is_never_run(slow_url, model_id):
    """A non-streamed request whose client gives up while it waits is dropped: it never reaches the engine.
    The holder runs on the slow server, so it still holds the engine when the waiter gives up."""
    url = slow_url
    before = metrics(url)
    with long_stream(url, model_id) as holder:
        lines = read_events(holder, 2)
        with pytest.raises(httpx.ReadTimeout):      # the client gives up after 1 s in the queue
            httpx.post(f"{url}/v1/completions", headers=AUTH, timeout=httpx.Timeout(10, read=1.0),
                       json={"model": model_id, "prompt": "z = ", "max_tokens": 50})
        del lines
    cancelled = lambda m: metric(m, "promoe_requests_total", outcome="cancelled")  # noqa: E731
    wait_for(lambda: cancelled(metrics(url)) == cancelled(before) + 2, what="holder and waiter cancelled")
    after = metrics(url)
    assert metric(after, "promoe_requests_total", outcome="completed") == \
        metric(before, "promoe_requests_total", outcome="completed")
    # only the holder's prompt reached the engine: the dropped request's prompt was never prefilled
    holder_prompt = metric(after, "promoe_prompt_tokens_total") - metric(before, "promoe_prompt_tokens_total")
    assert metric(after, "promoe_prefill_tokens_total") - metric(before, "promoe_prefill_tokens_total") == holder_prompt


def test_failed_request_leaves_engine_usable():
    """A request that raises on the engine thread fails alone: the next one is served. Run in-process, where a
    job that fails can be submitted (no client input makes the engine raise)."""
    import uvicorn
    from promoe_gguf.server import Job, build_app

    threads_before = set(threading.enumerate())
    eng = Engine(DEFAULT_MODEL, n_ctx=N_CTX, n_threads=1, cache_rate=0.5)   # the cache runtime has threads
    app = build_app(eng, max_queue=2)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_healthy(f"http://127.0.0.1:{port}")

        def broken():
            yield {"partial": True}
            raise RuntimeError("boom in the middle of a request")

        async def run_broken():
            job = Job(broken, asyncio.get_running_loop())
            app.state.scheduler.submit(job)
            return [await asyncio.wait_for(job.items.get(), 30) for _ in range(2)]

        events = asyncio.run(run_broken())
        assert events[0] == ("item", {"partial": True})
        assert events[1][0] == "error" and "boom" in str(events[1][1])
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        r = c.completions.create(model=os.path.basename(DEFAULT_MODEL), prompt="def ", max_tokens=3)
        assert r.usage.completion_tokens == 3
        m = metrics(f"http://127.0.0.1:{port}")
        assert metric(m, "promoe_requests_total", outcome="failed") == 1
        assert metric(m, "promoe_requests_total", outcome="completed") == 1
    finally:
        server.should_exit = True
        thread.join(20)
    assert not thread.is_alive()
    # shutdown stopped the engine thread and closed the engine (its copy thread): no thread left behind
    # (tqdm's monitor thread is tqdm's own, kept for the process's lifetime)
    wait_for(lambda: not [t for t in threading.enumerate() if t not in threads_before and t.name != "tqdm_monitor"],
             timeout=10,
             what="the server's and the engine's threads to end")


# ---- load ------------------------------------------------------------------------------------
def test_load_every_request_answered_or_refused(server, url, model_id):
    """200 requests from 8 concurrent clients (queue bound 4): each gets 200 or 503, none lost, the counts
    match the server's own, the server is alive after and its memory is flat."""
    proc = server[0]
    n_requests, n_clients, time_limit = 200, 8, 150.0
    warm = httpx.Client(headers=AUTH, timeout=60)
    for i in range(10):
        warm.post(f"{url}/v1/completions", json={"prompt": f"x{i} = ", "max_tokens": 4}).raise_for_status()
    rss_before = rss_bytes(proc.pid)
    before = metrics(url)

    def one(i: int):
        with httpx.Client(headers=AUTH, timeout=60) as c:
            if i % 2:
                body = {"model": model_id, "prompt": f"value_{i} = ", "max_tokens": 4, "seed": i}
                path = "/v1/completions"
            else:
                body = {"model": model_id, "messages": [{"role": "user", "content": f"item {i}"}], "max_tokens": 4,
                        "seed": i, "stream": i % 4 == 0}
                path = "/v1/chat/completions"
            r = c.post(f"{url}{path}", json=body)
            if r.status_code == 200 and body.get("stream"):
                assert sse_events(r)[-1] == "[DONE]"
            elif r.status_code == 200:
                assert 1 <= r.json()["usage"]["completion_tokens"] <= 4
            elif r.status_code == 503:
                assert int(r.headers["Retry-After"]) >= 1
                time.sleep(0.1)  # a client backs off before its next request (less than Retry-After: bounded test)
            return r.status_code

    t0 = time.monotonic()
    with ThreadPoolExecutor(n_clients) as pool:
        statuses = list(pool.map(one, range(n_requests), timeout=time_limit))
    elapsed = time.monotonic() - t0
    ok, refused = statuses.count(200), statuses.count(503)
    print(f"\nload: {n_requests} requests, {n_clients} clients: {ok} answered, {refused} refused (503), "
          f"{elapsed:.1f} s")
    assert ok + refused == n_requests, sorted(set(statuses))
    assert ok >= n_clients
    after = metrics(url)
    done = metric(after, "promoe_requests_total", outcome="completed") - \
        metric(before, "promoe_requests_total", outcome="completed")
    rejected = metric(after, "promoe_requests_total", outcome="rejected") - \
        metric(before, "promoe_requests_total", outcome="rejected")
    assert (done, rejected) == (ok, refused)
    assert metric(after, "promoe_queue_depth") == 0 and metric(after, "promoe_requests_running") == 0
    assert httpx.get(f"{url}/health").status_code == 200
    growth = rss_bytes(proc.pid) - rss_before
    print(f"load: RSS {rss_before / 2**20:.1f} MiB before, growth {growth / 2**20:+.1f} MiB")
    assert growth < 32 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB"


def test_metrics_report_the_engine(url, client, model_id):
    client.completions.create(model=model_id, prompt="import ", max_tokens=4)
    m = metrics(url)
    for name in ("promoe_queue_depth", "promoe_decode_tokens_per_second", "promoe_prefill_tokens_per_second",
                 "promoe_expert_cache_hit_rate", "promoe_expert_stall_seconds_total",
                 "promoe_expert_cache_hits_total", "promoe_completion_tokens_total"):
        assert (name, frozenset()) in m, name
    assert 0 < metric(m, "promoe_expert_cache_hit_rate") < 1          # --cache-rate 0.5 misses sometimes
    assert metric(m, "promoe_expert_runs_total", where="device_cache") == metric(m, "promoe_expert_cache_hits_total")
    assert metric(m, "promoe_decode_tokens_per_second") > 0


# ---- shutdown --------------------------------------------------------------------------------
def test_sigterm_mid_stream_exits_promptly(server, url, model_id):
    """Last: SIGTERM while a stream is running ends the stream, closes the engine and exits 0."""
    proc = server[0]
    with long_stream(url, model_id) as r:
        lines = read_events(r, 2)
        code, seconds = stop_server(proc)
        del lines
    assert code == 0 and seconds < 10, (code, seconds)
