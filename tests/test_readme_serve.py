"""The README's serving examples, run as written (port aside) against the default model: the `promoe serve`
line, the curl commands and the openai-client program."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_server import free_port, stop_server, wait_healthy

REPO = Path(__file__).resolve().parent.parent
PROMOE = str(Path(sys.executable).with_name("promoe"))


def serving_blocks() -> list[tuple[str, str]]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Serving"):]
    section = section[:section.index("\n## ", 1)]
    return re.findall(r"```(\w+)\n(.*?)```", section, re.S)


@pytest.fixture(scope="module")
def readme_server():
    blocks = serving_blocks()
    serve_line = next(code for lang, code in blocks if "promoe serve" in code).split("#")[0].split()
    assert serve_line[:2] == [".venv/bin/promoe", "serve"] and "8080" in serve_line
    port = free_port()
    cmd = [PROMOE] + [str(port) if a == "8080" else a for a in serve_line[1:]]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        yield port, blocks
    finally:
        if proc.poll() is None:
            code, _ = stop_server(proc)
            assert code == 0


def test_curl_examples(readme_server):
    port, blocks = readme_server
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    script = next(code for lang, code in blocks if lang == "bash" and "curl" in code)
    commands = script.replace("\\\n", " ").replace("8080", str(port)).strip().splitlines()
    assert len(commands) == 2
    completion = subprocess.run(["bash", "-c", commands[0]], capture_output=True, text=True, timeout=120)
    body = json.loads(completion.stdout)
    assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] >= 1
    stream = subprocess.run(["bash", "-c", commands[1]], capture_output=True, text=True, timeout=120)
    events = [line[6:] for line in stream.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[0])["choices"][0]["delta"] == {"role": "assistant"}


def test_openai_client_example(readme_server):
    port, blocks = readme_server
    program = next(code for lang, code in blocks if lang == "python").replace("8080", str(port))
    run = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert re.search(r"completion_tokens=[1-9]\d*", run.stdout), run.stdout   # the chat reply's usage
    assert len(run.stdout.splitlines()) >= 2                                     # then the streamed text
