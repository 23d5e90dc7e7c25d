"""`promoe chat` driven as a subprocess through stdin: replies equal the Python API's chat completions (so the
template and the conversation are what the API builds), /stats, /reset, /quit, streaming, Ctrl-C, and a
conversation longer than the context."""
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from promoe_gguf import DEFAULT_MODEL, Engine

PROMOE = str(Path(sys.executable).with_name("promoe"))
STATUS = re.compile(r"\[(\d+) tokens, [\d.]+ tokens/s, expert cache hit rate (\d+%|n/a[^,]*), (\w+)\]")


def chat(stdin: str, *args, timeout=90):
    return subprocess.run([PROMOE, "chat", "--threads", "1", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def engine():
    with Engine(DEFAULT_MODEL, n_ctx=256, n_threads=1) as eng:
        yield eng


def greedy_reply(engine, messages, n=24):
    return engine.create_chat_completion(messages, max_tokens=n, temperature=0,
                                         repeat_penalty=1.3)["choices"][0]["message"]["content"]


def test_conversation_commands_and_replies(engine):
    first, second = "import os", "def main():"
    p = chat(f"{first}\n/stats\n/reset\n{second}\n/bogus\n/quit\nnever answered\n",
             "--temp", "0", "--repeat-penalty", "1.3", "-n", "24", "--cache-rate", "0.5", "--n-ctx", "256")
    assert p.returncode == 0, p.stderr
    reply1 = greedy_reply(engine, [{"role": "user", "content": first}])
    reply2 = greedy_reply(engine, [{"role": "user", "content": second}])          # /reset forgot reply1
    without_reset = greedy_reply(engine, [{"role": "user", "content": first}, {"role": "assistant", "content": reply1},
                                          {"role": "user", "content": second}])
    assert without_reset != reply2                      # so the comparison below shows the reset
    assert p.stdout == f"{reply1}\n{reply2}\n"          # and /quit ended it before "never answered"
    statuses = STATUS.findall(p.stderr)
    assert [(n, reason) for n, _, reason in statuses] == [("24", "length"), ("24", "length")]
    assert all(rate.endswith("%") for _, rate, _ in statuses)          # --cache-rate 0.5: a real hit rate
    stats = json.loads(p.stderr[p.stderr.index("{"):p.stderr.index("}") + 1])
    assert stats["hits"] + stats["misses"] > 0 and stats["decode_tokens"] >= 23      # 24 tokens: the first comes from the prefill
    assert "(conversation reset)" in p.stderr and "unknown command /bogus" in p.stderr


def test_long_conversation_drops_oldest_exchanges():
    lines = [f"line number {i}: print('hello world')" for i in range(5)]
    p = chat("\n".join(lines) + "\n", "--temp", "0", "-n", "8", "--n-ctx", "96")
    assert p.returncode == 0, p.stderr
    assert len(STATUS.findall(p.stderr)) == 5                  # every line answered, to end of input
    assert "dropped the oldest exchange" in p.stderr
    assert "error" not in p.stderr


def test_streams_and_ctrl_c_stops_only_the_reply():
    # every expert miss crosses a 10 MB/s emulated link: tens of tokens/s, so the reply is still
    # streaming when Ctrl-C comes, however fast this machine is
    proc = subprocess.Popen([PROMOE, "chat", "--threads", "1", "-n", "400", "--n-ctx", "512", "--seed", "1",
                             "--cache-rate", "0.5", "--cpu-experts", "off", "--link", "10MB/s"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err = bytearray()

    def read_stderr():
        for byte in iter(lambda: proc.stderr.read(1), b""):
            err.extend(byte)
    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    def wait_stderr(text, timeout=30):
        deadline = time.monotonic() + timeout
        while text not in err and time.monotonic() < deadline:
            time.sleep(0.05)
        assert text in err, err.decode(errors="replace")
    try:
        wait_stderr(b"promoe chat:")                     # the banner: the engine is loaded
        proc.stdin.write(b"class Config:\n")
        proc.stdin.flush()
        first = proc.stdout.read(1)                      # the reply starts...
        assert first and b"tokens/s" not in err          # ...before it is finished: tokens stream
        proc.send_signal(signal.SIGINT)
        wait_stderr(b"interrupted]")
        proc.stdin.write(b"/quit\n")
        proc.stdin.flush()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        reader.join(10)
    n_tokens = int(STATUS.search(err.decode()).group(1))
    assert n_tokens < 400                                # Ctrl-C cut the reply short
