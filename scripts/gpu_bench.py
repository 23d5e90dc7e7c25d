#!/usr/bin/env python3
"""GPU benchmark of the expert kernels against the machine's own copy bandwidths.

Measures, on one CUDA GPU:
  * device-to-device copy bandwidth (bytes read + bytes written per second, torch copy_),
  * pinned host-to-device bandwidth (one 1 GiB cudaMemcpyAsync),
  * per quant type, the decode matvec's throughput in GB/s of quantized weight bytes on Mixtral
    expert matrices (14336 x 4096 and 4096 x 14336) at 1 and 8 tokens, and its ratio to the
    device-to-device bandwidth (the speed target: >= 0.8 at 1 token for Q4_K, Q6_K, Q8_0, Q5_0),
  * per quant type, one expert's upload (gate + up + down bytes, pinned -> device, in 3 chunks)
    and its ratio to the pinned bandwidth,
  * moe_decode for one token, top-2 of 8 resident Mixtral experts (Q4_K_M and Q8_0 layouts).
Writes OUT_DIR/bench.json and OUT_DIR/bench.md (the copy bandwidths also to OUT_DIR/copies.json,
which scripts/gpu_e2e.py uses for its bound per token).

Timing: CUDA events around N back-to-back launches, queued behind a GPU sleep so that Python's
launch overhead is hidden (the time includes the GPU's own gaps between consecutive kernels, as
in decode). Each launch reads a different copy of the matrix, with all copies together several
times the L2 cache, so the weights come from HBM.

    python scripts/gpu_bench.py OUT_DIR [--types Q4_K,Q6_K] [--iters 50]
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GiB = 1 << 30
MIXTRAL = (14336, 4096)          # n_ff, n_embd
TARGET_TYPES = ("Q4_K", "Q6_K", "Q8_0", "Q5_0")
TARGET_RATIO = 0.8


def need_cuda():
    """First GPU call: exits with a clear message when there is no usable CUDA device."""
    try:
        import torch
    except ImportError:
        sys.exit("ERROR: PyTorch is not installed, so no CUDA device can be used")
    if not torch.cuda.is_available():
        sys.exit("ERROR: no CUDA device: torch.cuda.is_available() is False "
                 f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
    try:
        import cupy  # noqa: F401
    except ImportError:
        sys.exit("ERROR: CuPy is not installed (pip install cupy-cuda12x or cupy-cuda13x)")
    return torch


def gpu_time(torch, fn, n: int) -> float:
    """Seconds per call of fn() over n back-to-back calls, queued behind a GPU sleep."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if hasattr(torch.cuda, "_sleep"):
        # ~150 us of GPU clock cycles per call to come (more than Python needs to enqueue one), so
        # the whole batch is queued before the GPU reaches the start event
        torch.cuda._sleep(int(3e5 * n))
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / n


def best_of(torch, fn, n: int, reps: int = 3) -> float:
    return min(gpu_time(torch, fn, n) for _ in range(reps))


def bench_copies(torch) -> dict:
    n = GiB
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = best_of(torch, lambda: dst.copy_(src), 10)
    d2d = 2 * n / t
    del src, dst
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    t = best_of(torch, lambda: dev.copy_(host, non_blocking=True), 3)
    h2d = n / t
    del host, dev
    torch.cuda.empty_cache()
    return {"d2d_GBps": d2d / 1e9, "d2d_note": "bytes read + bytes written per second (1 GiB copy_)",
            "h2d_pinned_GBps": h2d / 1e9, "h2d_note": "1 GiB pinned host -> device, one copy"}


def _copies(torch, qtype, shape, l2_bytes: int, n_min: int = 2):
    """Enough random copies of a quantized matrix that together they are >= 4x the L2 cache."""
    from promoe_gguf.format.quants import quant_type
    from promoe_gguf.kernels.testdata import random_blocks
    nbytes = shape[0] * quant_type(qtype).row_bytes(shape[1])
    n = max(n_min, math.ceil(4 * l2_bytes / nbytes))
    g = torch.Generator(device="cuda").manual_seed(0)
    return [random_blocks(qtype, shape, g, device="cuda") for _ in range(n)], nbytes


def bench_matvec(torch, qtype: str, l2_bytes: int, iters: int, d2d_GBps: float) -> list[dict]:
    from promoe_gguf.kernels import launch
    out = []
    for shape in (MIXTRAL, MIXTRAL[::-1]):
        mats, nbytes = _copies(torch, qtype, shape, l2_bytes)
        for ntok in (1, 8):
            x = torch.randn(ntok, shape[1], device="cuda")
            y = torch.empty(ntok, shape[0], device="cuda")
            plans = [launch.plan_matvec(qtype, shape, ntok, m.data_ptr(), x.data_ptr(), shape[1], y.data_ptr(), shape[0])
                     for m in mats]
            dev = x.device
            i = [0]

            def call():
                launch.run(plans[i[0] % len(plans)], dev)
                i[0] += 1
            t = best_of(torch, call, iters)
            gbps = nbytes / t / 1e9
            out.append({"qtype": qtype, "rows": shape[0], "cols": shape[1], "tokens": ntok, "bytes": nbytes,
                        "us": t * 1e6, "GBps": gbps, "ratio_to_d2d": gbps / d2d_GBps})
        del mats
        torch.cuda.empty_cache()
    return out


def bench_upload(torch, qtype: str, h2d_GBps: float) -> dict:
    from promoe_gguf.format.quants import quant_type
    qt = quant_type(qtype)
    n_ff, n_embd = MIXTRAL
    sizes = [n_ff * qt.row_bytes(n_embd)] * 2 + [n_embd * qt.row_bytes(n_ff)]
    total = sum(sizes)
    host = torch.randint(0, 256, (total,), dtype=torch.uint8).pin_memory()
    dev = torch.empty(total, dtype=torch.uint8, device="cuda")
    bounds = [0, sizes[0], sizes[0] + sizes[1], total]

    def call():
        for a, b in zip(bounds, bounds[1:]):
            dev[a:b].copy_(host[a:b], non_blocking=True)
    t = best_of(torch, call, 5)
    gbps = total / t / 1e9
    return {"qtype": qtype, "expert_bytes": total, "ms": t * 1e3, "GBps": gbps, "ratio_to_pinned": gbps / h2d_GBps}


def bench_moe(torch, gate: str, down: str, l2_bytes: int, iters: int, d2d_GBps: float) -> dict:
    from promoe_gguf.kernels import launch
    n_ff, n_embd = MIXTRAL
    layout = launch.ExpertLayout(n_embd=n_embd, n_ff=n_ff, gate=gate, up=gate, down=down)
    n_exp = max(8, math.ceil(4 * l2_bytes / layout.expert_bytes))
    g = torch.Generator(device="cuda").manual_seed(1)
    from promoe_gguf.kernels.testdata import random_blocks
    experts = [{w: random_blocks(getattr(layout, w), (n_embd, n_ff) if w == "down" else (n_ff, n_embd), g, device="cuda")
                for w in ("gate", "up", "down")} for _ in range(n_exp)]
    ptrs = torch.tensor([[e[w].data_ptr() for w in ("gate", "up", "down")] for e in experts], dtype=torch.int64, device="cuda")
    tables = [ptrs[torch.tensor([[i % n_exp, (i + 1) % n_exp]], device="cuda")].contiguous() for i in range(0, n_exp, 2)]
    x = torch.randn(1, n_embd, device="cuda")
    w = torch.rand(1, 2, device="cuda")
    i = [0]

    def call():
        launch.moe_decode(tables[i[0] % len(tables)], layout, x, w)
        i[0] += 1
    t = best_of(torch, call, iters)
    nbytes = 2 * layout.expert_bytes
    del experts
    torch.cuda.empty_cache()
    return {"layout": f"gate/up {gate}, down {down}", "tokens": 1, "experts": 2, "bytes": nbytes, "us": t * 1e6,
            "GBps": nbytes / t / 1e9, "ratio_to_d2d": nbytes / t / 1e9 / d2d_GBps}


def write_markdown(res: dict, path: Path) -> None:
    env, cp = res["env"], res["copies"]
    L = [f"# GPU benchmark: {env['gpu']}", "",
         f"{env['date']}; driver {env.get('driver', '?')}; torch {env['torch']} (CUDA {env['cuda']}); "
         f"cupy {env['cupy']}; {env['sms']} SMs, L2 {env['l2_MB']:.0f} MB.", "",
         f"- device-to-device copy: **{cp['d2d_GBps']:.0f} GB/s** ({cp['d2d_note']})",
         f"- pinned host-to-device: **{cp['h2d_pinned_GBps']:.1f} GB/s** ({cp['h2d_note']})", "",
         "## Decode matvec (GB/s of quantized weight bytes; ratio to the D2D copy bandwidth)", "",
         "| type | 14336x4096 1 tok | 14336x4096 8 tok | 4096x14336 1 tok | 4096x14336 8 tok | target (1 tok >= 0.8) |",
         "|---|---:|---:|---:|---:|---|"]
    by = {}
    for r in res["matvec"]:
        by.setdefault(r["qtype"], {})[(r["rows"], r["tokens"])] = r
    for q, d in by.items():
        cells = []
        for key in ((14336, 1), (14336, 8), (4096, 1), (4096, 8)):
            r = d.get(key)
            cells.append(f"{r['GBps']:.0f} ({r['ratio_to_d2d']:.2f})" if r else "-")
        tgt = ""
        if q in TARGET_TYPES:
            ok = all(d[k]["ratio_to_d2d"] >= TARGET_RATIO for k in ((14336, 1), (4096, 1)) if k in d)
            tgt = "met" if ok else "**not met**"
        L.append(f"| {q} | " + " | ".join(cells) + f" | {tgt} |")
    L += ["", "## Expert upload (one Mixtral expert, gate+up+down, pinned -> device in 3 chunks)", "",
          "| type | MB | ms | GB/s | ratio to pinned |", "|---|---:|---:|---:|---:|"]
    for r in res["upload"]:
        L.append(f"| {r['qtype']} | {r['expert_bytes'] / 1e6:.1f} | {r['ms']:.2f} | {r['GBps']:.1f} | {r['ratio_to_pinned']:.2f} |")
    L += ["", "## moe_decode (1 token, top-2 of resident Mixtral experts)", "",
          "| layout | us | GB/s | ratio to D2D |", "|---|---:|---:|---:|"]
    for r in res["moe"]:
        L.append(f"| {r['layout']} | {r['us']:.1f} | {r['GBps']:.0f} | {r['ratio_to_d2d']:.2f} |")
    path.write_text("\n".join(L))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--types", default="Q4_0,Q4_1,Q5_0,Q5_1,Q8_0,Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,IQ4_NL,IQ4_XS")
    ap.add_argument("--iters", type=int, default=40)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    torch = need_cuda()
    import cupy
    props = torch.cuda.get_device_properties(0)
    l2 = int(getattr(props, "L2_cache_size", 64 << 20) or (64 << 20))
    res = {"env": {"gpu": props.name, "sms": props.multi_processor_count, "l2_MB": l2 / 1e6,
                   "mem_GB": props.total_memory / 1e9, "torch": torch.__version__, "cuda": torch.version.cuda,
                   "cupy": cupy.__version__, "python": platform.python_version(),
                   "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}
    try:
        import subprocess
        res["env"]["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                              capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    t0 = time.time()
    res["copies"] = bench_copies(torch)
    print(f"D2D {res['copies']['d2d_GBps']:.0f} GB/s, pinned H2D {res['copies']['h2d_pinned_GBps']:.1f} GB/s", flush=True)
    res["matvec"], res["upload"] = [], []
    for q in args.types.split(","):
        rows = bench_matvec(torch, q, l2, args.iters, res["copies"]["d2d_GBps"])
        res["matvec"] += rows
        res["upload"].append(bench_upload(torch, q, res["copies"]["h2d_pinned_GBps"]))
        print(f"{q:7s} " + "  ".join(f"{r['rows']}x{r['cols']}/{r['tokens']}: {r['GBps']:.0f} GB/s ({r['ratio_to_d2d']:.2f})"
                                     for r in rows), flush=True)
    res["moe"] = [bench_moe(torch, "Q4_K", "Q6_K", l2, args.iters, res["copies"]["d2d_GBps"]),
                  bench_moe(torch, "Q8_0", "Q8_0", l2, args.iters, res["copies"]["d2d_GBps"])]
    for r in res["moe"]:
        print(f"moe_decode {r['layout']}: {r['us']:.1f} us, {r['GBps']:.0f} GB/s ({r['ratio_to_d2d']:.2f})", flush=True)
    (args.out / "copies.json").write_text(json.dumps(res["copies"]))
    res["wall_s"] = time.time() - t0
    (args.out / "bench.json").write_text(json.dumps(res, indent=1))
    write_markdown(res, args.out / "bench.md")
    print(f"wrote {args.out / 'bench.json'} and {args.out / 'bench.md'} in {res['wall_s']:.0f} s")
    missed = [r for r in res["matvec"] if r["qtype"] in TARGET_TYPES and r["tokens"] == 1 and r["ratio_to_d2d"] < TARGET_RATIO]
    for r in missed:
        print(f"below target: {r['qtype']} {r['rows']}x{r['cols']} 1 token at {r['ratio_to_d2d']:.2f} of D2D", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
