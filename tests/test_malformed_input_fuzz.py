"""Malformed input against the real CLI and the real server (slow suite): flags x values through the
installed `promoe`, bodies x routes over loopback HTTP. Nothing may print a traceback, hang, exit 0 on a
value it should refuse, answer 5xx to a bad request, or echo more than 200 characters of the input."""
import json
import os
import signal
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from promoe_gguf import DEFAULT_MODEL
from test_server_strict import AUTH, start
from test_user_flags import promoe

pytestmark = pytest.mark.slow

LONG = "q" * 3000                                    # a value no response may echo more than 200 characters of
RUN = ["run", "-p", "x", "-n", "1"]
CACHED = RUN + ["--cache-rate", "0.5"]

# (command prefix, flag, values it must refuse, values it must accept)
CLI_FLAGS = [
    (RUN, "--threads", ["0", "-1", "100000", "1.5", "abc", "", LONG], ["1"]),
    (CACHED, "--cpu-threads", ["0", "-3", "9999", "x"], ["1"]),
    (RUN, "--n-ctx", ["0", "-1", "100000000", "1e3", "nan"], ["64"]),
    (RUN, "--n-batch", ["0", "-1", "100000000", "x"], ["1", "512"]),
    (RUN[:-2], "-n", ["0", "-5", "1.0", "many", LONG], ["2"]),
    (RUN, "--temp", ["-1", "nan", "inf", "-inf", "hot", LONG], ["0", "2.5"]),
    (RUN, "--top-k", ["1.5", "x", "1e3"], ["0", "-1", "5"]),
    (RUN, "--top-p", ["-0.1", "1.5", "nan", "x"], ["0", "1"]),
    (RUN, "--min-p", ["-1", "2", "inf"], ["0", "1"]),
    (RUN, "--repeat-penalty", ["0", "-1", "nan", "x"], ["1.1"]),
    (RUN, "--repeat-last-n", ["-2", "1.5", "x"], ["-1", "0"]),
    (RUN, "--seed", ["1.5", "x", str(2**70), str(-2**70)], ["0", "-5"]),
    (RUN, "--cache-rate", ["0", "-0.5", "1.5", "nan", "inf", "x"], ["1"]),
    (RUN, "--cache-mem", ["0", "-5G", "x", "1Q", "nanG", LONG], []),
    (RUN, "--gpu-mem", ["0", "-1", "abc", "inf"], ["64G"]),
    (RUN, "--link", ["25GB/s", "ratio=10", "garbage", LONG], []),        # no cache: every link is refused
    (CACHED, "--link", ["0GB/s", "-1GB/s", "ratio=0", "ratio=-1", "ratio=1e9", "ratio=x", "1e999GB/s", "25GB/s,1e9ms",
                        "garbage"], ["25GB/s", "1e10B/s", "ratio=2"]),
    (RUN, "--predictor", ["bogus", "mlp:", "mlp:/nonexistent", "gate", "history", LONG], ["none"]),
    (CACHED, "--predictor", ["bogus", "mlp:", "mlp:/dev/null", "freq:/nonexistent"], ["gate", "history"]),
    (RUN, "--policy", ["fifo", "promoe", "static"], ["lru"]),
    (RUN, "--cpu-experts", ["some", "all", "off"], ["auto"]),
    (RUN, "--device", ["tpu", "cuda:x", "", LONG], ["cpu"]),
    (RUN, "--activations", ["q4", "q8", "f32"], []),
    (RUN, "--kv-type", ["q8", "f16"], ["f32"]),
    (["serve"], "--port", ["-1", "65536", "99999", "x"], []),
    (["serve"], "--max-queue", ["0", "-1", "100000", "x"], []),
    (["info"], "--gpu-mem", ["0", "x"], ["1G"]),
    (["info"], "--n-ctx", ["0", "x"], []),
    (["bench", DEFAULT_MODEL], "--rates", ["0", "1.5", "x", ",", "0.5,,0.5"], []),
    (["bench", DEFAULT_MODEL], "--tokens", ["0", "-1", "x"], []),
    (["simulate", "--shape", "mixtral-8x7b", "--profile", "rtx4090-24g"], "--cache-rate", ["0", "2"], ["0.5"]),
    (["simulate", "--shape", "mixtral-8x7b", "--profile", "rtx4090-24g"], "--n-ctx", ["0", "x"], []),
    (["simulate", "--shape", "mixtral-8x7b", "--profile", "rtx4090-24g"], "--prompt", ["0", "-4"], []),
    (["trace", "default", "--prompts", "/nonexistent", "--out", "t"], "--decode", ["-1", "x"], []),
    (["train-predictor", "t", "--out", "p.pt"], "--window", ["0", "4", "x"], []),
    (["train-predictor", "t", "--out", "p.pt"], "--lr", ["0", "-1", "nan"], []),
    (["train-predictor", "t", "--out", "p.pt"], "--dropout", ["-0.1", "1.5"], []),
    (["eval-predictor", "default", "--trace", "t"], "--lookahead", ["0", "4"], []),
    (["chat"], "-n", ["0", "-1", "x"], []),
    (["logits", DEFAULT_MODEL, "--out", "x.npy"], "--tokens", ["a,b", "", "1,,x", "-1", "999999999"], []),
]
CLI_CASES = [(prefix + [flag, value], value in bad) for prefix, flag, bad, good in CLI_FLAGS for value in bad + good]


def _check_cli(case, tmp_path):
    args, must_refuse = case
    folder = tmp_path / str(abs(hash(tuple(args))))
    folder.mkdir()
    code, out, err = promoe(args, folder, timeout=300)
    problems = []
    if any("Traceback" in ln for ln in err):
        problems.append("traceback")
    if must_refuse:
        ours = [ln for ln in err if ln.startswith("promoe: ")]
        if code != 2 or len(ours) != 1 or not ours[0].startswith("promoe: error: "):
            problems.append(f"exit {code}, stderr {err[-3:]}")
        elif len(ours[0]) > 600 or LONG[:201] in ours[0]:
            problems.append(f"echoes the value: {len(ours[0])} characters")
    elif code != 0:
        problems.append(f"refused a valid value: exit {code}, {err[-2:]}")
    if os.listdir(folder):
        problems.append(f"left {os.listdir(folder)}")
    return problems


def test_cli_malformed_flags(tmp_path):
    assert len(CLI_CASES) >= 180
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda c: (c, _check_cli(c, tmp_path)), CLI_CASES))
    failures = [f"{' '.join(a)[-80:]}: {p}" for (a, _), p in results if p]
    assert not failures, f"{len(failures)} of {len(CLI_CASES)} cases:\n" + "\n".join(failures)


def _bodies():
    """(route, raw body, headers) for malformed requests; every one must be refused with a 4xx."""
    json_ct = {"Content-Type": "application/json"}
    fields = {
        "prompt": [3, None, [], [-1], [10**12], [1.5], {"a": 1}, True, "", LONG * 2, ["a", "b"], "\ud800"],
        "max_tokens": [0, -1, "8", 10**9, 2.5, True, [1]],
        "temperature": [-1, "hot", [0.5], {}, 1e400],
        "top_p": [2, -0.1, "x"], "min_p": [1.5, -1], "top_k": [1.5, "x"], "repeat_penalty": [0, -2],
        "repeat_last_n": [-5, 0.5], "seed": [1.5, 2**70, "s"],
        "stop": [3, [""], ["x"] * 20, [LONG, 3], {"a": LONG}],
        "model": [LONG, 3, ["m"]], "stream": ["yes", 3, LONG], "stream_options": [3, LONG],
        "n": [2, LONG], "echo": [True, LONG], "logit_bias": [{"1": 5}], "tools": [[{"type": "function"}]],
    }
    for field, values in fields.items():
        for v in values:
            body = {"prompt": "def f(", "max_tokens": 2, field: v}
            raw = json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
            yield "/v1/completions", raw, json_ct
    messages = [None, "hi", [], [None], [{"role": "robot", "content": "x"}], [{"role": LONG, "content": "x"}],
                [{"role": "user"}], [{"role": "user", "content": 5}], [{"role": "user", "content": [{"type": "image"}]}],
                [{"role": "user", "content": [{"type": "text", "text": 5}]}], [{"content": "x"}],
                [{"role": "user", "content": "z" * 2000}]]
    for m in messages:
        yield "/v1/chat/completions", json.dumps({"messages": m, "max_tokens": 2}).encode(), json_ct
    for field in ("max_tokens", "temperature", "model", "stream"):
        for v in fields[field]:
            body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, field: v}
            yield "/v1/chat/completions", json.dumps(body).encode(), json_ct
    raws = [b"", b"not json", b"[1, 2]", b'"a string"', b"null", b'{"prompt": ', b"\xff\xfe\x00",
            b"[" * 50000 + b"]" * 50000, b'{"prompt": "' + LONG.encode() + b'"', LONG.encode(),
            b'{"prompt": "x", "max_tokens": NaN}', b'{"prompt": "x", "max_tokens": Infinity}']
    for route in ("/v1/completions", "/v1/chat/completions"):
        for raw in raws:
            yield route, raw, json_ct
        for ct in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data", LONG):
            yield route, b'{"prompt": "x", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}', \
                {"Content-Type": ct}
        yield route, b'{"prompt": "x"}', {"Content-Type": "application/json", "Host": f"{LONG}.example"}
        yield route, b'{"prompt": "x"}', {"Content-Type": "application/json", "Authorization": f"Bearer {LONG}"}


def test_server_malformed_bodies(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(AUTH["Authorization"].split()[1])
    proc, url = start("--api-key-file", str(key_file))
    cases = list(_bodies())
    assert len(cases) >= 120
    failures = []
    try:
        for i, (route, raw, headers) in enumerate(cases):
            hdrs = {**AUTH, **headers}
            r = httpx.post(f"{url}{route}", content=raw, headers=hdrs, timeout=60)
            text = r.text
            label = f"case {i} {route} {raw[:60]!r} {str(headers)[:60]}"
            if not 400 <= r.status_code < 500:
                failures.append(f"{label}: status {r.status_code} {text[:200]}")
                continue
            try:
                err = r.json()["error"]
                assert isinstance(err["message"], str) and "type" in err
            except Exception:   # noqa: BLE001 - any shape but OpenAI's is a failure
                failures.append(f"{label}: not an OpenAI error body: {text[:200]}")
            if LONG[:201] in text or "q" * 201 in text or "z" * 201 in text:
                failures.append(f"{label}: echoes more than 200 characters of the input ({len(text)} bytes)")
        ok = httpx.post(f"{url}/v1/completions", json={"prompt": "def f(", "max_tokens": 2}, headers=AUTH, timeout=60)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2, ok.text
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        err = proc.stderr.read()
    assert not failures, f"{len(failures)} of {len(cases)} cases:\n" + "\n".join(failures)
    assert code == 0 and "Traceback" not in err, err[-2000:]
