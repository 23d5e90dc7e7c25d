"""The command line as a new user meets it, run as a user runs it (the installed `promoe`, in a fresh
folder): every numeric flag has a range and a refused value is one line naming the flag, the value and
the range (exit 2, nothing written); a flag that would do nothing is refused or warned about; one set of
sampling defaults (llama-server's) for `run`, `chat`, the server and the Python API; errors name the real
cause (special files, output paths as given, damaged predictor files, non-UTF-8 prompts)."""
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

from promoe_gguf import DEFAULT_MODEL, Engine, open_model
from promoe_gguf.api import create_chat_completion, create_completion
from promoe_gguf.cli.main import build_parser
from promoe_gguf.sampling import DEFAULTS

PROMOE = str(Path(sys.executable).with_name("promoe"))
PREDICTOR = os.path.join(os.path.dirname(DEFAULT_MODEL), "default-moe.predictor.pt")
MAX_THREADS = 2 * os.cpu_count()
ARCH = open_model(DEFAULT_MODEL).config.arch


def promoe(args, cwd, timeout=120, env=None):
    """Run the installed command in `cwd`; (exit code, stdout, stderr lines that are ours or tracebacks)."""
    proc = subprocess.run([PROMOE, *args], cwd=cwd, capture_output=True, timeout=timeout, env=env)
    err = proc.stderr.decode(errors="replace")
    return proc.returncode, proc.stdout.decode(errors="replace"), [ln for ln in err.splitlines() if ln.strip()]


def refused(args, tmp_path, expected: str):
    """`args` exits 2 with exactly the line `promoe: error: <expected>`, prints nothing else and leaves
    nothing in the folder it ran in."""
    before = set(os.listdir(tmp_path))
    code, out, err = promoe(args, tmp_path)
    assert (code, out, err) == (2, "", [f"promoe: error: {expected}"]), (args, code, err)
    assert set(os.listdir(tmp_path)) == before


RUN = ["run", "-p", "def f("]
RANGE_CASES = [
    (RUN + ["--threads", "100000"], f"--threads must be an integer in [1, {MAX_THREADS}] (1 to twice this "
                                    "machine's CPUs), got 100000 (see 'promoe run --help')"),
    (RUN + ["--threads", "10000"], f"--threads must be an integer in [1, {MAX_THREADS}] (1 to twice this "
                                   "machine's CPUs), got 10000 (see 'promoe run --help')"),
    (RUN + ["--cpu-threads", "0"], f"--cpu-threads must be an integer in [1, {MAX_THREADS}] (1 to twice this "
                                   "machine's CPUs), got 0 (see 'promoe run --help')"),
    (RUN + ["--n-batch", "100000000"], f"--n-batch must be an integer in [1, 512] (up to the context: by default "
                                       f"{DEFAULT_MODEL}'s {ARCH}.context_length = 512, capped at 4096), "
                                       "got 100000000"),
    (RUN + ["--n-ctx", "100000"], "--n-ctx must be an integer in [1, 512] (up to the model's context length), "
                                  "got 100000"),
    (RUN + ["-n", "0"], "-n must be an integer >= 1, got 0 (see 'promoe run --help')"),
    (RUN + ["-n", "-5"], "-n must be an integer >= 1, got -5 (see 'promoe run --help')"),
    (["chat", "-n", "0"], "-n must be an integer >= 1, got 0 (see 'promoe chat --help')"),
    (RUN + ["--temp", "-1"], "--temp must be a number >= 0 (0: greedy), got -1.0 (see 'promoe run --help')"),
    (RUN + ["--top-p", "1.5"], "--top-p must be a number in [0, 1], got 1.5 (see 'promoe run --help')"),
    (RUN + ["--cache-rate", "0"], "--cache-rate must be a number in (0, 1] (the fraction of routed experts "
                                  "cached), got 0.0 (see 'promoe run --help')"),
    (RUN + ["--cache-mem=-5G"], "--cache-mem must be a size of at least 1 byte such as 512M or 8G, got '-5G' "
                                "(see 'promoe run --help')"),
    (RUN + ["--cache-rate", "0.5", "--link", "0GB/s"], "--link rate 0GB/s must be > 0 and finite"),
    (RUN + ["--cache-rate", "0.5", "--link", "ratio=0"],
     "--link ratio 0 must be in (0, 10000]: the copy of one expert takes ratio x one layer's decode compute"),
    (RUN + ["--cache-rate", "0.5", "--link", "ratio=1e9"],
     "--link ratio 1e9 must be in (0, 10000]: the copy of one expert takes ratio x one layer's decode compute"),
    (["serve", "--port", "99999"], "--port must be an integer in [0, 65535] (0: any free port), got 99999 "
                                   "(see 'promoe serve --help')"),
    (["serve", "--max-queue", "0"], "--max-queue must be an integer in [1, 4096], got 0 (see 'promoe serve --help')"),
    (["bench", DEFAULT_MODEL, "--rates", "0.5,2"], "--rates must be comma-separated cache rates, each in (0, 1], "
                                                   "got '2' in '0.5,2' (see 'promoe bench --help')"),
]


@pytest.mark.parametrize("args, expected", RANGE_CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_every_numeric_flag_has_a_range(tmp_path, args, expected):
    refused(args, tmp_path, expected)


NEEDS_CACHE = "needs an expert cache, but every expert is resident (no cache rate, cache memory or GPU memory was given)"


@pytest.mark.parametrize("args, expected", [
    (RUN + ["--predictor", "bogus"], "--predictor 'bogus' is not one of none, gate, oracle, mlp:PATH, "
                                     "history[:TRACE], freq[:TRACE]"),
    (RUN + ["--predictor", "mlp:/nonexistent"], "predictor file /nonexistent does not exist"),
    (RUN + ["--predictor", "gate"], f"--predictor 'gate' {NEEDS_CACHE}"),
    (RUN + ["--policy", "promoe"], f"--policy 'promoe' {NEEDS_CACHE}"),
    (RUN + ["--link", "garbage"], "--link 'garbage' is not 'NGB/s[,Lus][,jitter=Jus]' or 'ratio=R'"),
    (RUN + ["--link", "25GB/s"], f"--link '25GB/s' {NEEDS_CACHE}"),
    (RUN + ["--cpu-experts", "all"], f"--cpu-experts 'all' {NEEDS_CACHE}"),
    (RUN + ["--cpu-threads", "2"], f"--cpu-threads 2 {NEEDS_CACHE}"),
    (RUN + ["--activations", "f32"], "--activations 'f32' chooses the CUDA kernels' arithmetic; the CPU computes "
                                     "as llama.cpp's CPU kernels do (8-bit activations)"),
    (RUN + ["--cache-rate", "0.5", "--cache-mem", "1G"],
     "--cache-mem and a cache rate both size the expert cache: give one of them"),
    (RUN + ["--device", "tpu"], "--device 'tpu' is not a device (cpu, cuda or cuda:N)"),
    (["info", "--trace", "t"], "--trace gives the expected hit rate of a --gpu-mem plan: add --gpu-mem"),
    (["bench", DEFAULT_MODEL, "--rates", "0.5", "--gpu-mem", "1G"],
     "--rates and --gpu-mem both choose the cache budgets: give one of them"),
    (["simulate", "--shape", "mixtral-8x7b", "--profile", "rtx4090-24g", "--n-cpu-moe", "3"],
     "--n-cpu-moe does not apply to --engine promoe"),
    (["simulate", "--shape", "mixtral-8x7b", "--profile", "rtx4090-24g", "--engine", "llamacpp", "--policy",
      "promoe"], "--policy does not apply to --engine llamacpp"),
])
def test_a_flag_that_would_do_nothing_is_refused(tmp_path, args, expected):
    refused(args, tmp_path, expected)


def test_a_flag_the_memory_fit_made_unused_is_a_warning(tmp_path):
    """--gpu-mem decides residency itself: the user could not know the cache flags would go unused."""
    code, out, err = promoe(RUN + ["-n", "2", "--gpu-mem", "64G", "--predictor", "gate", "--policy", "promoe"],
                            tmp_path)
    assert code == 0 and out
    assert err[0] == ("every expert fits in the device memory, so these expert-cache settings are not used: "
                      "policy=promoe, predictor=gate"), err


@pytest.mark.parametrize("args, expected", [
    (["run"], "the following arguments are required: -p/--prompt (see 'promoe run --help')"),
    (RUN + ["--bogus"], "unrecognized arguments: --bogus (see 'promoe run --help')"),
    (RUN + ["--threads", "two"], "--threads must be an integer, got 'two' (see 'promoe run --help')"),
    (RUN + ["--policy", "fifo"], "--policy: invalid choice: 'fifo' (choose from "),
    (["frobnicate"], "COMMAND: invalid choice: 'frobnicate' (choose from "),
])
def test_usage_errors_are_one_line_and_a_hint(tmp_path, args, expected):
    code, out, err = promoe(args, tmp_path)
    assert code == 2 and out == "" and len(err) == 1, err
    if expected.endswith("(choose from "):          # argparse lists the choices (quoted or not, by version)
        assert err[0].startswith(f"promoe: error: {expected}"), err
        assert err[0].endswith(f"(see 'promoe{' run' if args[0] == 'run' else ''} --help')"), err
    else:
        assert err[0] == f"promoe: error: {expected}"


# ---- one set of defaults -----------------------------------------------------------------------------------
def test_defaults_agree_everywhere():
    """run, chat, the server's request fields and the Python API all default to llama-server's values."""
    assert DEFAULTS == {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.0,
                        "repeat_last_n": 64, "seed": None}
    parser = build_parser()
    for command in (["run", "-p", "x"], ["chat"]):
        a = parser.parse_args(command)
        assert (a.temp, a.top_k, a.top_p, a.min_p, a.repeat_penalty, a.repeat_last_n, a.seed) == \
            tuple(DEFAULTS.values()), command
    for fn in (create_completion, create_chat_completion, Engine.generate):
        sig = inspect.signature(fn).parameters
        named = [k for k in DEFAULTS if k in sig]
        assert len(named) >= 6 and {k: sig[k].default for k in named} == {k: DEFAULTS[k] for k in named}, fn


def test_help_shows_the_defaults_and_ranges(tmp_path):
    code, out, _ = promoe(["run", "--help"], tmp_path)
    text = " ".join(out.split())
    assert code == 0
    for shown in ("temperature, >= 0 (0: greedy) (default: 0.8)", "(default: 40)", "(default: 0.95)",
                  "(default: 0.05)", "repeat penalty, > 0 (1: off) (default: 1.0)", "tokens to generate, >= 1 "
                  "(default: 128)", "1 to twice this machine's CPUs", "1 to --n-ctx", "0 < R <= 10000"):
        assert shown in text, shown


def test_run_temp_0_equals_the_api_at_temperature_0(tmp_path):
    """The same greedy tokens from `promoe run --temp 0` and from the Python API at temperature 0."""
    prompt = "def parse_args("
    code, out, _ = promoe(["run", "-p", prompt, "-n", "24", "--temp", "0"], tmp_path)
    assert code == 0
    with Engine(DEFAULT_MODEL, n_threads=1) as eng:
        api = eng.create_completion(prompt, max_tokens=24, temperature=0)["choices"][0]["text"]
    assert out == api + "\n"


# ---- errors name the real cause --------------------------------------------------------------------------
def test_non_utf8_prompt_is_refused_with_the_position(tmp_path):
    """argv is bytes: a Latin-1 prompt is not text the tokenizer reads (llama.cpp would replace the byte
    silently); the first bad byte is named. Valid UTF-8 of any script runs."""
    proc = subprocess.run([PROMOE.encode(), b"run", b"-p", "café = 1".encode("latin-1"), b"-n", b"2"],
                          cwd=tmp_path, capture_output=True, timeout=120)
    assert (proc.returncode, proc.stdout) == (2, b"")
    assert proc.stderr == b"promoe: error: -p: the prompt is not UTF-8: byte 0xe9 at byte 3 (the tokenizer reads " \
                          b"UTF-8 text)\n"
    proc = subprocess.run([PROMOE.encode(), b"run", b"-p", "café = 1".encode(), b"-n", b"2"], cwd=tmp_path,
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_special_files_are_refused_as_such(tmp_path):
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    refused(["info", str(fifo)], tmp_path, f"{fifo}: is a named pipe (FIFO), not a model file")
    refused(["info", "/dev/zero"], tmp_path, "/dev/zero: is a character device, not a model file")
    refused(["run", "/dev/null", "-p", "x"], tmp_path, "/dev/null: is a character device, not a model file")
    refused(["info", str(tmp_path / "missing.gguf")], tmp_path, f"{tmp_path / 'missing.gguf'}: no such file")


def test_output_paths_are_named_as_given(tmp_path):
    refused(["logits", DEFAULT_MODEL, "--tokens", "1,2", "--out", "missing/x.npy"], tmp_path,
            f"--out missing/x.npy: the folder {tmp_path / 'missing'} does not exist")
    code, out, err = promoe(["convert", DEFAULT_MODEL, "/proc/promoe-out"], tmp_path)
    assert code == 2 and len(err) == 1 and err[0].startswith("promoe: error: /proc/promoe-out: "), err
    assert ".tmp-" not in err[0] and not os.path.exists("/proc/promoe-out")


def test_damaged_predictor_file_says_what_is_wrong(tmp_path):
    raw = bytearray(Path(PREDICTOR).read_bytes())
    raw[len(raw) // 2] ^= 0x10                         # inside a tensor's bytes: unpickling alone would pass
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(raw))
    code, out, err = promoe(RUN + ["--cache-rate", "0.5", "--predictor", f"mlp:{bad}"], tmp_path)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"promoe: error: predictor file {bad} is damaged: archive member ") and \
        err[0].endswith("fails its CRC-32 check")
    bad.write_bytes(bytes(raw[:1000]))
    code, out, err = promoe(RUN + ["--cache-rate", "0.5", "--predictor", f"mlp:{bad}"], tmp_path)
    assert code == 2 and err[0].startswith(f"promoe: error: predictor file {bad} is not a promoe predictor, or is "
                                           "truncated"), err


# ---- small confusions --------------------------------------------------------------------------------------
def test_info_defaults_to_the_embedded_model_and_says_where_experts_live(tmp_path):
    code, out, _ = promoe(["info"], tmp_path)
    assert code == 0 and os.path.basename(DEFAULT_MODEL) in out
    code, out, _ = promoe(["info", "--gpu-mem", "12G"], tmp_path)
    assert code == 0 and "experts resident on the device, none in host memory" in out
    assert "the rest in host memory" not in out


def test_run_counts_tokens_and_steps_apart(tmp_path):
    code, _, err = promoe(RUN + ["-n", "12", "--temp", "0"], tmp_path)
    assert code == 0
    summary = next(ln for ln in err if ln.startswith("generated"))
    n = int(summary.split()[1])
    assert f"{n - 1} decode steps" in summary           # the first token comes from the prefill


def test_bench_writes_a_named_folder_and_lists_what_it_wrote(tmp_path):
    code, out, err = promoe(["bench", DEFAULT_MODEL, "--tokens", "2", "--rates", "0.5", "--modes", "lru"],
                            tmp_path, timeout=600)
    assert code == 0, err
    folder = tmp_path / "promoe-bench"
    assert sorted(os.listdir(folder)) == ["bench.json", "bench.md", "bench.png", "profile.json"]
    assert err[-1] == f"wrote {folder}/: bench.json, bench.md, bench.png, profile.json (for promoe simulate --profile)"
