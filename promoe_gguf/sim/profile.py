"""Hardware profiles: what a machine offers (bandwidths, memory, threads) plus the simulator's own
constants (kernel efficiencies, per-layer overheads), each documented in promoe_gguf/sim/MODEL.md.

A profile is a spec string `gpu_gbs=448,gpu_mem_gb=8,h2d_gbs=12,cpu_gbs=102,cpu_threads=10` (any field
below; the rest keep their defaults), a shipped name (`PROFILES`), or a JSON file of the same fields
(`promoe_gguf.sim.measure` writes one for this machine). Bandwidths are what a STREAM-like copy
benchmark reports, in GB/s (1e9 bytes/s); gpu_mem_gb is GiB as nvidia-smi counts it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field, fields

from ..errors import ModelError

GiB = 2**30


@dataclass
class Profile:
    name: str = "custom"
    # the machine
    gpu_gbs: float = 0.0            # device memory bandwidth; 0 = no GPU (a CPU-only machine)
    gpu_mem_gb: float = 0.0         # device memory, GiB
    h2d_gbs: float = 25.0           # pinned host-to-device copies
    cpu_gbs: float = 60.0           # host memory bandwidth
    cpu_threads: int = 8
    gpu_tflops: float = 0.0         # effective dense matmul rate of prefill kernels (0: gpu_gbs / 10)
    cpu_gflops: float = 75.0        # effective matmul rate of ONE CPU thread (ggml, quantized weights)
    cpu_thread_gbs: float = 3.5     # K-quant weight bytes one CPU thread streams through a matvec (compute-bound)
    h2d_latency_us: float = 10.0    # per copy (DMA setup, driver)
    # the simulator's constants (MODEL.md says where each comes from)
    gpu_eff: float = 0.80           # share of gpu_gbs a quantized matvec reaches (llama.cpp MMVQ, ours)
    cpu_eff: float = 1.00           # share of cpu_gbs a read-only matvec stream reaches when memory-bound
    gpu_layer_us: float = 69.0      # llama.cpp CUDA decode: fixed cost per layer (launches, small ops)
    gpu_prefill_layer_us: float = 400.0   # llama.cpp CUDA prefill: fixed cost per layer per ubatch
    cpu_op_us: float = 2.0          # ggml CPU: per graph op (thread-pool barrier)
    cpu_layer_ops: int = 30         # ggml CPU ops of one transformer layer (norms, rope, attention, ...)
    split_us: float = 25.0          # one GPU<->CPU hand-off in decode (sync + small copies)
    ours_layer_us: float = 69.0     # our runtime, decode: fixed cost per layer (= llama.cpp's, the design target)
    ours_prefill_layer_us: float = 400.0  # our runtime, prefill: fixed cost per layer per chunk
    expert_call_us: float = 0.0     # per expert computed by our runtime's per-expert path or CPU pool
    miss_us: float = 30.0           # our runtime: compute-thread cost of an expert it had to wait for
    cpu_job_us: float = 40.0        # our runtime: compute-thread cost of handing one expert to the CPU pool
    cpu_handoff_us: float = 20.0    # our runtime: an empty job's round trip through the CPU pool (what the
                                    # runtime's cost model measures as a CPU expert's cost beyond its compute)
    predictor_us: float = 100.0     # one predictor call (gate: a small matmul on the CPU)
    emulated: bool = False          # the "device" is this machine's CPU (promoe's emulated link)
    source: str = ""                # where the numbers come from
    extra: dict = field(default_factory=dict)

    @property
    def has_gpu(self) -> bool:
        return self.gpu_gbs > 0

    @property
    def gpu_bw(self) -> float:
        """Bytes/s a device matvec streams."""
        return self.gpu_gbs * 1e9 * self.gpu_eff

    @property
    def gpu_flops(self) -> float:
        return (self.gpu_tflops or self.gpu_gbs / 10) * 1e12

    def cpu_bw(self, thread_factor: float = 1.0) -> float:
        """Bytes/s ggml's matvecs stream with cpu_threads threads: memory-bound (cpu_gbs x cpu_eff) or
        compute-bound (cpu_thread_gbs per thread, x thread_factor for weights cheaper to decode than K-quants)."""
        return min(self.cpu_gbs * self.cpu_eff, self.cpu_threads * self.cpu_thread_gbs * thread_factor) * 1e9

    @property
    def cpu_flops(self) -> float:
        return self.cpu_threads * self.cpu_gflops * 1e9

    @property
    def h2d_bw(self) -> float:
        return self.h2d_gbs * 1e9

    @property
    def gpu_mem(self) -> int:
        return int(self.gpu_mem_gb * GiB)

    def with_(self, **kw) -> "Profile":
        return dataclasses.replace(self, **kw)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


_DESKTOP = dict(h2d_gbs=25.0, cpu_gbs=64.0, cpu_threads=8, h2d_latency_us=10.0)
PROFILES = {p.name: p for p in (
    # GPU bandwidths: ~90% of the datasheet figure (what a device-to-device copy reaches); host:
    # PCIe 4.0 x16 pinned copies ~25 GB/s, dual-channel DDR5-5600 ~64 GB/s STREAM copy, 8 cores.
    Profile("rtx3060-12g", gpu_gbs=325, gpu_mem_gb=12, gpu_tflops=25, **_DESKTOP,
            source="RTX 3060 12 GB (360 GB/s, PCIe 4.0 x16) + 8-core CPU, dual-channel DDR5-5600"),
    Profile("rtx4070ti-12g", gpu_gbs=455, gpu_mem_gb=12, gpu_tflops=80, **_DESKTOP,
            source="RTX 4070 Ti 12 GB (504 GB/s, PCIe 4.0 x16) + 8-core CPU, dual-channel DDR5-5600"),
    # the 8 and 16 GB cards people offload to: RTX 4060 / 4060 Ti are PCIe 4.0 x8 (~13 GB/s pinned)
    Profile("rtx4060-8g", gpu_gbs=245, gpu_mem_gb=8, gpu_tflops=30, **{**_DESKTOP, "h2d_gbs": 13.0},
            source="RTX 4060 8 GB (272 GB/s, PCIe 4.0 x8) + 8-core CPU, dual-channel DDR5-5600"),
    Profile("rtx4060ti-16g", gpu_gbs=260, gpu_mem_gb=16, gpu_tflops=35, **{**_DESKTOP, "h2d_gbs": 13.0},
            source="RTX 4060 Ti 16 GB (288 GB/s, PCIe 4.0 x8) + 8-core CPU, dual-channel DDR5-5600"),
    Profile("rtx4090-24g", gpu_gbs=910, gpu_mem_gb=24, gpu_tflops=165, **_DESKTOP,
            source="RTX 4090 24 GB (1008 GB/s, PCIe 4.0 x16) + 8-core CPU, dual-channel DDR5-5600"),
    Profile("h200", gpu_gbs=4300, gpu_mem_gb=139, gpu_tflops=500, h2d_gbs=50, cpu_gbs=150, cpu_threads=16,
            source="H200 141 GB (4.8 TB/s, PCIe 5.0 x16), 16 host cores (the lent GPU machine; host "
                   "figures assumed, not measured)"),
)}
_NUMERIC = {f.name: f.type for f in fields(Profile) if f.name not in ("name", "source", "extra")}


def _coerce(key: str, value, where: str):
    kind = _NUMERIC.get(key)
    if kind is None:
        raise ModelError(f"{where}: unknown profile field {key!r} (fields: {', '.join(_NUMERIC)})")
    try:
        if kind == "bool":
            return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
        v = int(value) if kind == "int" else float(value)
    except (TypeError, ValueError):
        raise ModelError(f"{where}: profile field {key}={value!r} is not a number") from None
    if v < 0:
        raise ModelError(f"{where}: profile field {key}={value!r} is negative")
    return v


def parse_profile(spec) -> Profile:
    """A Profile from a shipped name, a JSON file, or 'key=value,...' (optionally starting from a name:
    'rtx4090-24g,cpu_gbs=90')."""
    if isinstance(spec, Profile):
        return spec
    if spec is None or str(spec).strip() == "":
        raise ModelError(f"--profile is required: a name ({', '.join(PROFILES)}), a JSON file, or "
                         "'gpu_gbs=448,gpu_mem_gb=8,h2d_gbs=12,cpu_gbs=102,cpu_threads=10'")
    text = str(spec).strip()
    if text.endswith(".json") or os.path.isfile(text):
        try:
            data = json.loads(open(text).read())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelError(f"profile file {text}: {e}") from None
        if not isinstance(data, dict):
            raise ModelError(f"profile file {text}: not a JSON object")
        base = Profile(name=str(data.get("name", os.path.basename(text))), source=str(data.get("source", text)),
                       extra=dict(data.get("extra", {})))
        kw = {k: _coerce(k, v, text) for k, v in data.items() if k not in ("name", "source", "extra")}
        return base.with_(**kw)
    parts = [p for p in text.split(",") if p.strip()]
    base, named = Profile(name="custom", source=f"--profile {text}"), False
    if parts and "=" not in parts[0]:
        if parts[0] not in PROFILES:
            raise ModelError(f"unknown profile {parts[0]!r}: one of {', '.join(PROFILES)}, a JSON file, or key=value pairs")
        base, named, parts = PROFILES[parts[0]], True, parts[1:]
    kw = {}
    for p in parts:
        key, eq, value = p.partition("=")
        if not eq:
            raise ModelError(f"--profile {text!r}: {p!r} is not key=value")
        kw[key.strip()] = _coerce(key.strip(), value.strip(), f"--profile {text!r}")
    prof = base.with_(**kw)
    if kw and named:
        prof = prof.with_(name=f"{base.name}+" + ",".join(f"{k}={v}" for k, v in kw.items()))
    return prof


def layer_cost(spec) -> float:
    """Our fixed decode cost per layer in us: a number, or the ours_layer_us of a profile file (what
    `promoe bench` or scripts/gpu_e2e.py measured)."""
    text = str(spec).strip()
    try:
        value = float(text)
    except ValueError:
        value = parse_profile(text).ours_layer_us
    if not 0 <= value < 1e6:
        raise ModelError(f"--layer-cost {text!r}: a per-layer cost of {value} us is outside 0..1e6")
    return value
