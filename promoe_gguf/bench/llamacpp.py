"""Stock llama.cpp in its offload modes, through its own llama-bench binary.

llama-cpp-python's high-level API cannot place experts (no tensor-buffer overrides), so comparisons
run the llama-bench that scripts/build_llamacpp.sh builds from llama-cpp-python 0.3.35's vendored
llama.cpp: build/llamacpp-cpu (CPU) or the CUDA bundle (bench/llamacpp-cuda/llamacpp-cuda.tar.xz,
unpacked; its run.sh puts the machine's cuBLAS on the library path).

Modes, as llama.cpp names them:
  cpu        -ngl 0: everything on the CPU
  ngl        -ngl N: the last N-1 layers and the output layer on the GPU (N = n_layer + 1: all)
  n-cpu-moe  -ngl all --n-cpu-moe N: everything on the GPU except the routed experts of layers 0..N-1

``fit_offload`` picks, for a device memory budget, the largest -ngl and the smallest --n-cpu-moe
whose estimated device bytes (weights from the GGUF's tensor sizes + F16 KV cache + a compute-buffer
estimate) fit.
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

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CPU_DIR = REPO / "build" / "llamacpp-cpu"
BUILD_HINT = "build it with: bash scripts/build_llamacpp.sh build/llamacpp-cpu (about 30 min on 2 cores)"
_EXPS = re.compile(r"\.ffn_(up|down|gate|gate_up)_(ch|)exps")     # llama.cpp's LLM_FFN_EXPS_REGEX
_LAYER = re.compile(r"^blk\.(\d+)\.")


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


# ----------------------------------------------------------------------------------------------
# what fits: device bytes per placement, from the GGUF's tensor sizes
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelLayout:
    """Bytes of a model by where llama.cpp may place them."""
    n_layer: int
    layer_bytes: tuple[int, ...]      # every tensor of blk.i, routed experts included
    expert_bytes: tuple[int, ...]     # the routed-expert tensors of blk.i (--n-cpu-moe moves these)
    output_bytes: int                 # output.weight + output_norm (token_embd again if tied): the "output layer"
    input_bytes: int                  # token_embd: llama.cpp always keeps it on the CPU
    kv_bytes_per_token_layer: int     # F16 K + V per token per layer (MLA: the K latent only)
    n_vocab: int
    n_embd: int
    n_head: int
    ffn_bytes_per_token: int          # widest FFN activation per token (f32), for the compute buffer

    @classmethod
    def from_gguf(cls, path) -> "ModelLayout":
        """Tensor sizes as stored in the file (the project's bounds-checked GGUF reader)."""
        from ..format.config import config_from_metadata
        from ..format.gguf_file import field_value, read_gguf
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ModelError(f"{path}: no such model file")
        r = read_gguf(path)
        c = config_from_metadata(lambda k: field_value(r, k), path)
        # MLA (deepseek2 with *_mla keys) caches only the compressed K latent, which V is read from
        mla = c.extra.get("key_length_mla") is not None
        kv_dim = c.n_head_kv * (c.head_dim_k + (0 if mla else c.head_dim_v))
        return cls.from_sizes({t.name: int(t.n_bytes) for t in r.tensors}, n_layer=c.n_layers, n_vocab=c.n_vocab,
                              n_embd=c.n_embd, n_head=c.n_head, kv_dim=kv_dim,
                              ffn_width=max(c.n_ff_exp * c.n_experts_used, c.n_ff, c.n_ff_shexp),
                              n_nextn=c.n_nextn_layers)

    @classmethod
    def from_real_shape(cls, name: str, n_layers: int | None = None) -> "ModelLayout":
        """The layout of a real-shape model (real_shapes.SHAPES) without writing it."""
        from . import real_shapes
        s = real_shapes.get_shape(name)
        plan = real_shapes.tensor_plan(name, n_layers)
        kv = s.extra["kv_lora"] + s.extra["qk_rope"] if s.arch == "deepseek2" else 2 * s.n_head_kv * s.head_dim
        return cls.from_sizes({t.name: t.nbytes for t in plan}, n_layer=n_layers or s.n_layer, n_vocab=s.n_vocab,
                              n_embd=s.n_embd, n_head=s.n_head, kv_dim=kv,
                              ffn_width=max(s.n_ff_exp * s.n_used, s.n_ff, s.n_ff_shexp), n_nextn=s.n_nextn)

    @classmethod
    def from_sizes(cls, sizes: dict, *, n_layer: int, n_vocab: int, n_embd: int, n_head: int, kv_dim: int,
                   ffn_width: int, n_nextn: int = 0) -> "ModelLayout":
        """`n_layer` layers run; the `n_nextn` NextN blocks after them are never loaded (llama.cpp skips them)."""
        layer, experts = [0] * n_layer, [0] * n_layer
        out = inp = 0
        for name, nb in sizes.items():
            m = _LAYER.match(name)
            if m:
                i = int(m.group(1))
                if n_layer <= i < n_layer + n_nextn:
                    continue
                if i >= n_layer:
                    raise ModelError(f"tensor {name!r} is past the model's {n_layer} layers")
                layer[i] += nb
                if _EXPS.search(name):
                    experts[i] += nb
            elif name == "token_embd.weight":
                inp += nb
            else:                       # output.weight, output_norm.weight
                out += nb
        if "output.weight" not in sizes:  # tied: llama.cpp loads token_embd a second time as the output
            out += sizes.get("token_embd.weight", 0)
        return cls(n_layer, tuple(layer), tuple(experts), out, inp, 2 * kv_dim, n_vocab, n_embd, n_head,
                   4 * ffn_width)

    def compute_bytes(self, n_ubatch: int = 512, n_ctx: int = 4096, flash_attn: bool = True) -> int:
        """Estimate of llama.cpp's device compute buffer for a batch of n_ubatch tokens: logits,
        a few hidden-state and FFN activations (f32), and without flash attention the KQ matrix."""
        per_token = 4 * (self.n_vocab + 6 * self.n_embd) + 2 * self.ffn_bytes_per_token
        kq = 0 if flash_attn else 4 * self.n_head * n_ctx
        return n_ubatch * (per_token + kq)

    def device_bytes(self, ngl: int, n_cpu_moe: int = 0, *, n_ctx: int = 4096, n_ubatch: int = 512,
                     flash_attn: bool = True) -> int:
        """Estimated device bytes of llama.cpp with -ngl ngl --n-cpu-moe n_cpu_moe (ngl 0: none)."""
        L = self.n_layer
        if not 0 <= ngl <= L + 1 or not 0 <= n_cpu_moe <= L:
            raise ValueError(f"ngl {ngl} must be in 0..{L + 1} and n_cpu_moe {n_cpu_moe} in 0..{L}")
        if ngl == 0:
            return 0
        first = L + 1 - ngl                          # llama.cpp: i_gpu_start = n_layer + 1 - ngl
        total = self.output_bytes                     # the output layer goes first (ngl >= 1)
        for i in range(first, L):
            total += self.layer_bytes[i] - (self.expert_bytes[i] if i < n_cpu_moe else 0)
            total += self.kv_bytes_per_token_layer * n_ctx
        return total + self.compute_bytes(n_ubatch, n_ctx, flash_attn)


@dataclass(frozen=True)
class OffloadFit:
    budget: int
    ngl: int                      # largest -ngl that fits (0: nothing fits beside the CPU)
    ngl_bytes: int
    n_cpu_moe: int | None         # smallest --n-cpu-moe with -ngl all that fits; None: not even n_layer
    n_cpu_moe_bytes: int | None


def fit_offload(model, budget: int, *, n_ctx: int = 4096, n_ubatch: int = 512, flash_attn: bool = True) -> OffloadFit:
    """For a device memory budget in bytes, llama.cpp's largest layer offload (-ngl) and smallest
    experts-on-CPU count (--n-cpu-moe, with -ngl all) whose estimated device bytes fit. `model` is a
    GGUF path or a ModelLayout."""
    lay = model if isinstance(model, ModelLayout) else ModelLayout.from_gguf(model)
    if budget < 0:
        raise ValueError(f"budget {budget} bytes is negative")
    kw = dict(n_ctx=n_ctx, n_ubatch=n_ubatch, flash_attn=flash_attn)
    L = lay.n_layer
    ngl = max(n for n in range(L + 2) if n == 0 or lay.device_bytes(n, **kw) <= budget)
    fits = [m for m in range(L + 1) if lay.device_bytes(L + 1, m, **kw) <= budget]
    m = min(fits) if fits else None
    return OffloadFit(budget, ngl, lay.device_bytes(ngl, **kw), m,
                      None if m is None else lay.device_bytes(L + 1, m, **kw))
