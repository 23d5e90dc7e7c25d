"""How the `promoe` command reports errors: one line `promoe: error: ...` naming the file,
key and rule with exit status 2 for bad input; `promoe: internal error: ...` with exit status 1 for
a failure of ours; --debug (before or after the subcommand) adds the traceback."""
import math
import os
import struct
import subprocess
import sys

import pytest
from gguf import GGUFValueType as V

import promoe_gguf.cli.info
from gguf_edit import GGUFTemplate, poison
from promoe_gguf.cli.main import main


def _bad_model(test_models, tmp_path):
    t = GGUFTemplate(test_models[("qwen2moe", "Q4_K_M", "default")])
    return t.write(tmp_path / "bad.gguf", {"qwen2moe.attention.head_count_kv": (3, V.UINT32)})


def _stderr_lines(capsys):
    """stderr from our first `promoe:` line on (ggml's own log lines, e.g. its weight repacking under
    pytest's capture, may come before it); a continuation of our message would follow it."""
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    first = next((i for i, ln in enumerate(lines) if ln.startswith("promoe:")), len(lines))
    return lines[first:]


def test_bad_input_is_one_line_and_exit_2(test_models, tmp_path, capsys):
    path = _bad_model(test_models, tmp_path)
    assert main(["info", path]) == 2
    lines = _stderr_lines(capsys)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"promoe: error: {path}: ")
    assert "qwen2moe.attention.head_count_kv = 3" in lines[0] and "multiple of head_count_kv" in lines[0]


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_adds_the_traceback(test_models, tmp_path, capsys, where):
    path = _bad_model(test_models, tmp_path)
    argv = ["--debug", "info", path] if where == "before" else ["info", path, "--debug"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "validate.py" in err
    assert err.rstrip().splitlines()[-1].startswith("promoe: error: ")


def test_internal_failure_is_exit_1(test_models, monkeypatch, capsys):
    """A failure of ours (here injected into `info`) is not blamed on the input."""
    def broken(args):
        raise RuntimeError("index out of range in self\nsecond line of a long torch message")
    monkeypatch.setattr(promoe_gguf.cli.info, "run", broken)
    path = test_models[("llama", "Q4_K_M", "default")]
    assert main(["info", path]) == 1
    assert _stderr_lines(capsys) == ["promoe: internal error: RuntimeError: index out of range in self "
                                     "(run with --debug for the traceback)"]


def test_unwritable_output_is_bad_input(test_models, tmp_path, capsys):
    path = test_models[("llama", "Q4_K_M", "default")]
    out = tmp_path / "no-such-dir" / "x.npy"
    assert main(["logits", path, "--tokens", "1,2", "--out", str(out)]) == 2
    (line,) = _stderr_lines(capsys)
    assert line == f"promoe: error: --out {out}: the folder {tmp_path / 'no-such-dir'} does not exist"


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "-p", "x", "--threads", "0"])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"promoe: error: --threads must be an integer in [1, {2 * os.cpu_count()}] (1 to twice this machine's "
        "CPUs), got 0 (see 'promoe run --help')"]


def test_check_numerics_from_the_command_line(test_models, tmp_path):
    """The installed `promoe` command: a NaN weight, named with --check-numerics; exit 2, one line,
    and no output file left behind."""
    src = test_models[("granitemoe", "F32", "default")]
    bad = poison(src, tmp_path / "nan.gguf", "blk.1.attn_norm.weight", 0, struct.pack("<f", math.nan))
    out = tmp_path / "logits.npy"
    exe = os.path.join(os.path.dirname(sys.executable), "promoe")
    cmd = [exe, "logits", bad, "--tokens", "1,2,3", "--out", str(out)]
    proc = subprocess.run(cmd + ["--check-numerics"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"promoe: error: {bad}: NaN first produced by layer 1, attention (at position 0)"
    assert not out.exists() and os.listdir(tmp_path) == ["nan.gguf"]
