"""Stock llama.cpp in its offload modes, through its own llama-bench binary.

llama-cpp-python's high-level API cannot place experts (no tensor-buffer overrides), so comparisons
run the llama-bench that scripts/build_llamacpp.sh builds from llama-cpp-python 0.3.35's vendored
llama.cpp: build/llamacpp-cpu (CPU) or the CUDA bundle (bench/llamacpp-cuda/llamacpp-cuda.tar.xz,
unpacked; its run.sh puts the machine's cuBLAS on the library path).

Modes, as llama.cpp names them:
  cpu        -ngl 0: everything on the CPU
  ngl        -ngl N: the last N-1 layers and the output layer on the GPU (N = n_layer + 1: all)
  n-cpu-moe  -ngl all --n-cpu-moe N: everything on the GPU except the routed experts of layers 0..N-1

``fit_offload`` (llamacpp_memory.py, the rule the simulator uses too) picks, for a device memory
budget, the largest -ngl and the smallest --n-cpu-moe whose estimated device bytes (weights from the
GGUF's tensor sizes + F16 KV cache + a compute-buffer estimate) fit.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from ..errors import ModelError
from .llamacpp_memory import ModelLayout, OffloadFit, fit_offload  # noqa: F401 - the fit rule, used with bench_modes

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CPU_DIR = REPO / "build" / "llamacpp-cpu"
BUILD_HINT = "build it with: bash scripts/build_llamacpp.sh build/llamacpp-cpu (about 30 min on 2 cores)"


class LlamaCppNotBuilt(FileNotFoundError):
    """The llama.cpp binaries are not where they were looked for."""


# ----------------------------------------------------------------------------------------------
# running llama-bench
# ----------------------------------------------------------------------------------------------

def find_bin_dir(bin_dir=None) -> Path:
    """The folder holding llama-bench: bin_dir, else $PROMOE_LLAMACPP_BIN, else build/llamacpp-cpu."""
    d = Path(bin_dir or os.environ.get("PROMOE_LLAMACPP_BIN") or DEFAULT_CPU_DIR)
    if not (d / "llama-bench").is_file():
        raise LlamaCppNotBuilt(f"no llama-bench in {d}; {BUILD_HINT}")
    return d


def _command(bin_dir: Path, binary: str, args) -> list[str]:
    # the CUDA bundle's run.sh finds the machine's libcublas first; CPU builds run directly
    if (bin_dir / "run.sh").is_file():
        return [str(bin_dir / "run.sh"), binary, *map(str, args)]
    return [str(bin_dir / binary), *map(str, args)]


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{' '.join(cmd)} did not finish in {timeout:.0f} s") from None
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {p.returncode}:\n{p.stderr[-3000:]}")
    return p


def moe_cache_support(bin_dir=None, timeout: float = 60) -> tuple[bool, str]:
    """Does this llama-bench take llama.cpp's expert cache (--moe-cache-mib, PR #29887)? (answer, why)."""
    try:
        d = find_bin_dir(bin_dir)
    except LlamaCppNotBuilt:
        return False, "no llama-bench built; llama-cpp-python 0.3.35 vendors a llama.cpp that predates it"
    p = subprocess.run(_command(d, "llama-bench", ["--help"]), capture_output=True, text=True, timeout=timeout)
    if "moe-cache" in p.stdout + p.stderr:
        return True, f"llama-bench in {d} lists --moe-cache-mib"
    return False, f"llama-bench in {d} (llama-cpp-python 0.3.35's llama.cpp) has no --moe-cache-mib"


def list_devices(bin_dir=None, timeout: float = 60) -> list[str]:
    """The accelerator devices llama.cpp sees (llama-bench --list-devices), e.g. ['CUDA0: NVIDIA H200 ...']."""
    d = find_bin_dir(bin_dir)
    out = _run(_command(d, "llama-bench", ["--list-devices"]), timeout).stdout
    return [ln.strip() for ln in out.splitlines() if re.match(r"\s*\w+\d+: ", ln)]


@dataclass
class BenchRow:
    """One llama.cpp configuration: prefill (pp) and decode (tg) tokens/s, means over repetitions."""
    mode: str                      # cpu | ngl | n-cpu-moe
    n_gpu_layers: int
    n_cpu_moe: int
    n_prompt: int                  # the longest prompt tested
    n_gen: int
    prefill_tok_s: float | None    # at n_prompt tokens
    decode_tok_s: float | None
    backends: str                  # what llama-bench reports, e.g. "CPU" or "CUDA"
    n_threads: int
    device_bytes_est: int | None = None
    prefill_by_length: dict = field(default_factory=dict)    # prompt tokens -> prefill tokens/s
    raw: list = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("raw")
        return d


def run_llama_bench(model, *, n_prompt: int | Sequence[int] = 512, n_gen: int = 128, n_gpu_layers: int = 0, n_cpu_moe: int = 0,
                    threads: int | None = None, reps: int = 3, bin_dir=None, extra=(), mode: str | None = None,
                    timeout: float = 3600) -> BenchRow:
    """Run llama-bench once (-p n_prompt -n n_gen, -r reps) and parse its JSON. n_prompt may be a list
    of prompt lengths (one pp test each); n_prompt or n_gen may be 0 to skip that test. A GPU placement
    that ran on the CPU (the CUDA module did not load) is an error, not a slow row."""
    model = Path(model)
    if not model.is_file():
        raise ModelError(f"{model}: no such model file")
    prompts = sorted({int(n) for n in ([n_prompt] if isinstance(n_prompt, int) else n_prompt)})
    if not prompts or prompts[0] < 0 or n_gen < 0 or prompts[-1] + n_gen == 0:
        raise ValueError(f"n_prompt={n_prompt}, n_gen={n_gen}: need at least one positive token count")
    prompts = [n for n in prompts if n > 0] or [0]
    if n_gpu_layers < 0 or n_cpu_moe < 0 or reps < 1:
        raise ValueError(f"n_gpu_layers={n_gpu_layers}, n_cpu_moe={n_cpu_moe}, reps={reps}: must be >= 0 (reps >= 1)")
    d = find_bin_dir(bin_dir)
    threads = threads or os.cpu_count() or 1
    args = ["-m", model, "-p", ",".join(map(str, prompts)), "-n", n_gen, "-ngl", n_gpu_layers, "-ncmoe", n_cpu_moe,
            "-t", threads, "-r", reps, "-o", "json", *extra]
    out = _run(_command(d, "llama-bench", args), timeout).stdout
    try:
        tests = json.loads(out)
    except json.JSONDecodeError:
        raise RuntimeError(f"llama-bench printed no JSON:\n{out[-2000:]}") from None
    pp = sorted((t for t in tests if t["n_prompt"] > 0 and t["n_gen"] == 0), key=lambda t: t["n_prompt"])
    tg = [t for t in tests if t["n_gen"] > 0 and t["n_prompt"] == 0]
    backends = tests[0]["backends"] if tests else "?"
    if n_gpu_layers > 0 and backends.strip().upper() == "CPU":
        raise RuntimeError(f"llama-bench ran -ngl {n_gpu_layers} on the CPU: no GPU backend loaded from {d} "
                           "(CUDA bundle on a machine without a GPU or without libcublas.so.13?)")
    if mode is None:
        mode = "cpu" if n_gpu_layers == 0 else ("n-cpu-moe" if n_cpu_moe else "ngl")
    return BenchRow(mode=mode, n_gpu_layers=n_gpu_layers, n_cpu_moe=n_cpu_moe, n_prompt=prompts[-1], n_gen=n_gen,
                    prefill_tok_s=float(pp[-1]["avg_ts"]) if pp else None,
                    decode_tok_s=float(tg[0]["avg_ts"]) if tg else None,
                    backends=backends, n_threads=int(tests[0]["n_threads"]) if tests else threads,
                    prefill_by_length={int(t["n_prompt"]): float(t["avg_ts"]) for t in pp}, raw=tests)


def bench_modes(model, gpu_mem: int | None = None, *, n_prompt: int | Sequence[int] = 512, n_gen: int = 128, threads=None,
                reps: int = 3, bin_dir=None, n_ctx: int | None = None, gpu: bool | None = None) -> list[BenchRow]:
    """llama.cpp's offload modes on one model: all on the CPU; and where a GPU is there, the largest
    layer offload and the smallest --n-cpu-moe that fit gpu_mem bytes (None: no limit, all on the GPU).
    gpu=None asks llama.cpp whether it sees a device."""
    d = find_bin_dir(bin_dir)
    common = dict(n_prompt=n_prompt, n_gen=n_gen, threads=threads, reps=reps, bin_dir=d)
    rows = [run_llama_bench(model, mode="cpu", **common)]
    if gpu is None:
        gpu = bool(list_devices(d))
    if not gpu:
        return rows
    layout = ModelLayout.from_gguf(model)
    longest = n_prompt if isinstance(n_prompt, int) else max(n_prompt)
    fit = fit_offload(layout, gpu_mem if gpu_mem is not None else 1 << 62,
                      n_ctx=n_ctx or longest + n_gen)
    rows[0].device_bytes_est = 0
    if fit.ngl > 0:
        r = run_llama_bench(model, n_gpu_layers=fit.ngl, mode="ngl", **common)
        r.device_bytes_est = fit.ngl_bytes
        rows.append(r)
    if fit.n_cpu_moe:               # None: not even all experts on the CPU fit; 0: the all-GPU ngl row again
        r = run_llama_bench(model, n_gpu_layers=layout.n_layer + 1, n_cpu_moe=fit.n_cpu_moe, mode="n-cpu-moe",
                            **common)
        r.device_bytes_est = fit.n_cpu_moe_bytes
        rows.append(r)
    return rows
