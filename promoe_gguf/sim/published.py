"""Published llama.cpp runs the simulator is checked against (bench/results/sim/validation.md).

Each point: the source, the model, the hardware as a profile spec (datasheet GPU bandwidth x 0.9, the
STREAM-like figure a copy benchmark reports; host bandwidths and thread counts as stated by the source
or, where it states none, assumed as written in `assumed`), the placement, and the measured tok/s.
`role`: "calibration" points set one constant of the model (MODEL.md says which); "validation" points
are predictions made with those constants fixed.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Point:
    key: str
    source: str
    url: str
    shape: str
    hardware: str
    profile: str
    placement: dict          # simulate() keywords: ngl / n_cpu_moe (none: all on the CPU)
    metric: str              # decode_tok_s | prefill_tok_s
    measured: float
    role: str
    assumed: str = ""
    prompt: int = 0          # llama-bench tg128 decodes from an empty context
    decode: int = 128


POINTS = [
    Point("3090ti-gpu", "smeltcore recipe (llama.cpp Q4_K, -ngl 99, 4K context)",
          "https://smeltcore.com/recipes/qwen3-30b-a3b-rtx-3090-ti/", "qwen3-30b-a3b",
          "RTX 3090 Ti 24 GB, all layers on the GPU", "gpu_gbs=907,gpu_mem_gb=24,h2d_gbs=25,cpu_gbs=60,cpu_threads=8",
          {"ngl": 99}, "decode_tok_s", 166.9, "calibration", "host unused"),
    Point("4090-gpu", "runaihome guide ('up to 196 tok/s' on one RTX 4090)",
          "https://runaihome.com/blog/qwen3-30b-a3b-local-ai-guide-2026/", "qwen3-30b-a3b",
          "RTX 4090 24 GB, all layers on the GPU", "gpu_gbs=907,gpu_mem_gb=24,h2d_gbs=25,cpu_gbs=60,cpu_threads=8",
          {"ngl": 99}, "decode_tok_s", 196.0, "validation", "an 'up to' figure; engine, quantization and offload not stated (llama.cpp, Q4_K_M, all on the GPU assumed)"),
    Point("i7-8700-cpu", "InventiveHQ MoE-on-CPU benchmark (llama.cpp, CPU only)",
          "https://inventivehq.com/blog/moe-on-cpu-benchmark", "qwen3-30b-a3b",
          "Core i7-8700 (6 cores), no GPU", "gpu_gbs=0,cpu_gbs=34,cpu_threads=6",
          {}, "decode_tok_s", 10.6, "calibration", "dual-channel DDR4-2666 (the CPU's rated memory), STREAM ~0.8 x 42.7 GB/s; compute-bound here either way"),
    Point("7950x-cpu-tg", "ikawrakow, ik_llama.cpp #1075 (mainline llama.cpp, llama-bench, 16 threads)",
          "https://github.com/ikawrakow/ik_llama.cpp/issues/1075", "qwen3-30b-a3b",
          "Ryzen 9 7950X (16 cores), CPU only", "gpu_gbs=0,cpu_gbs=60,cpu_threads=16",
          {}, "decode_tok_s", 27.20, "validation", "dual-channel DDR5-6000: ~60 GB/s STREAM copy (memory not stated)"),
    Point("7950x-cpu-pp", "ikawrakow, ik_llama.cpp #1075 (mainline llama.cpp, llama-bench pp512)",
          "https://github.com/ikawrakow/ik_llama.cpp/issues/1075", "qwen3-30b-a3b",
          "Ryzen 9 7950X (16 cores), CPU only", "gpu_gbs=0,cpu_gbs=60,cpu_threads=16",
          {}, "prefill_tok_s", 210.37, "calibration", "sets cpu_gflops (AVX-512 VNNI); memory as above", prompt=512, decode=1),
    Point("2080-ncmoe36", "llmfit PR #755 (llama-server, -ngl 99 --n-cpu-moe 36, generation speed)",
          "https://github.com/AlexsJones/llmfit/pull/755", "qwen3-30b-a3b",
          "RTX 2080 8 GB + Core i9-10900X (10 cores, quad-channel DDR4 ~102 GB/s)",
          "gpu_gbs=448,gpu_mem_gb=8,h2d_gbs=12,cpu_gbs=102,cpu_threads=10",
          {"n_cpu_moe": 36}, "decode_tok_s", 36.7, "validation",
          "the README's example profile string (448 GB/s is the 2080's datasheet figure; 102 GB/s as the source measured)"),
    Point("e5-mixtral-f16-cpu", "JohannesGaessler, llama.cpp #5484 (llama-bench, CPU only)",
          "https://github.com/ggml-org/llama.cpp/issues/5484", "mixtral-8x7b:f16",
          "Xeon E5-2683 v4 (16 cores), quad-channel DDR4-2133", "gpu_gbs=0,cpu_gbs=55,cpu_threads=16",
          {}, "decode_tok_s", 2.32, "validation", "STREAM ~0.8 x 68.3 GB/s theoretical; Feb 2024 llama.cpp"),
    Point("e5-mixtral-f16-p40", "JohannesGaessler, llama.cpp #5484 (llama-bench, + one P40)",
          "https://github.com/ggml-org/llama.cpp/issues/5484", "mixtral-8x7b:f16",
          "Xeon E5-2683 v4 + Tesla P40 24 GB (347 GB/s, PCIe 3.0)",
          "gpu_gbs=312,gpu_mem_gb=24,h2d_gbs=12,cpu_gbs=55,cpu_threads=16",
          {"ngl": "auto"}, "decode_tok_s", 2.82, "validation",
          "layers offloaded not stated: as many as fit (-ngl auto); Pascal, Feb 2024 llama.cpp"),
]


def evaluate(points=POINTS, progress: bool = False) -> list[dict]:
    """Each point's prediction with the default constants, and the relative error."""
    from .run import simulate
    rows = []
    for p in points:
        r = simulate(shape=p.shape, profile=p.profile, engine="llamacpp", prompt=p.prompt, decode=p.decode,
                     **p.placement)
        pred = r[p.metric]
        rows.append({"key": p.key, "role": p.role, "source": p.source, "url": p.url, "model": p.shape,
                     "hardware": p.hardware, "profile": p.profile, "mode": r["mode"], "metric": p.metric,
                     "measured": p.measured, "simulated": round(pred, 2),
                     "error": round(pred / p.measured - 1, 3), "assumed": p.assumed})
    return rows


CALIBRATES = {"3090ti-gpu": "gpu_layer_us", "i7-8700-cpu": "cpu_thread_gbs", "7950x-cpu-pp": "cpu_gflops"}


def calibrate(points=POINTS) -> dict:
    """Solve each calibration point's constant (bisection on the profile field) so that its prediction
    equals the measurement, in the order listed; returns {field: value}."""
    from .profile import parse_profile
    from .run import simulate
    fitted = {}
    for p in points:
        field = CALIBRATES.get(p.key)
        if field is None:
            continue
        base = parse_profile(p.profile).with_(**fitted)

        def pred(v):
            return simulate(shape=p.shape, profile=base.with_(**{field: v}), engine="llamacpp", prompt=p.prompt,
                            decode=p.decode, **p.placement)[p.metric]
        lo, hi = 0.01, 2000.0
        increasing = pred(hi) > pred(lo)
        for _ in range(60):
            mid = (lo * hi) ** 0.5
            if (pred(mid) < p.measured) == increasing:
                lo = mid
            else:
                hi = mid
        fitted[field] = round((lo * hi) ** 0.5, 3)
    return fitted
