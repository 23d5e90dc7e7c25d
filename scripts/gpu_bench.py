#!/usr/bin/env python3
"""GPU benchmark of the decode kernels, through the calls the Engine makes (CudaBackend), against
the machine's own copy bandwidth.

Measures, on one CUDA GPU:
  * device-to-device copy bandwidth (bytes read + bytes written per second, torch copy_),
  * pinned host-to-device bandwidth (one 1 GiB cudaMemcpyAsync),
  * per quant type, `CudaBackend.linear` at 1 and 8 tokens (the matvec: the activation quantized to
    8 bits once, then dp4a, as llama.cpp's mmvq; and the fp32-activation path), in GB/s of quantized
    weight bytes and as a share of the device-to-device bandwidth, on Mixtral-8x7B's expert matrices
    (14336 x 4096 and 4096 x 14336) and Qwen3-30B-A3B's (768 x 2048 and 2048 x 768: rows of 8 to 64
    threads); the target: >= 0.8 at 1 token for Q4_K, Q6_K, Q8_0, Q5_0 on the Mixtral shapes,
  * per quant type, one expert's upload (gate + up + down bytes, pinned -> device, in 3 chunks)
    and its ratio to the pinned bandwidth,
  * `CudaBackend.moe` for one token, routed on the device: top-2 of 8 Mixtral experts and top-8 of
    128 Qwen3-30B-A3B experts.
Writes OUT_DIR/bench.json and OUT_DIR/bench.md (the copy bandwidths also to OUT_DIR/copies.json,
which scripts/gpu_e2e.py uses for its bound per token). llama.cpp's own kernels on the same
matrices are measured end to end by scripts/gpu_e2e.py (llama-bench, every layer on the GPU).

Timing: N back-to-back calls recorded as one CUDA graph and replayed between CUDA events (the
kernels' device time and the GPU's own gaps between them, as in a replayed decode step), and, as
`us_eager`, the same calls launched from Python behind a GPU sleep (the first H200 run timed only
that way: the small matrices and the fused MoE measured Python, about 20 and 190 us a call). Each
call reads a different copy of the matrix, with all copies together several times the L2 cache, so
the weights come from HBM.

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

GiB = 1 << 30
MIXTRAL = (14336, 4096)          # n_ff, n_embd
QWEN3 = (768, 2048)              # Qwen3-30B-A3B: expert n_ff, n_embd
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


def graph_time(torch, fn, n: int, reps: int = 3) -> float:
    """Seconds per call of fn() on the device alone: n calls recorded as one CUDA graph (as a decode
    step replays them), the best of reps replays timed with events. No Python between the kernels,
    so this is kernel time (and the GPU's gaps between kernels), whatever the host costs."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        g.capture_begin(capture_error_mode="thread_local")     # as the Engine records (backends/graph.py)
        try:
            for _ in range(n):
                fn()
        finally:
            g.capture_end()
    torch.cuda.current_stream().wait_stream(side)
    g.replay()
    torch.cuda.synchronize()
    best = math.inf
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / n)
    del g
    return best


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


def _qmatrix(torch, qtype, shape, g):
    from promoe_gguf.backends import QMatrix
    from promoe_gguf.format.quants import quant_type
    from promoe_gguf.kernels.testdata import random_blocks
    return QMatrix("w", quant_type(qtype).ggml_type, tuple(shape), random_blocks(qtype, shape, g, device="cuda"))


def bench_matvec(torch, qtype: str, l2_bytes: int, iters: int, d2d_GBps: float) -> list[dict]:
    from promoe_gguf.backends.cuda import CudaBackend
    from promoe_gguf.format.quants import quant_type
    out = []
    for shape in (MIXTRAL, MIXTRAL[::-1], QWEN3, QWEN3[::-1]):
        nbytes = shape[0] * quant_type(qtype).row_bytes(shape[1])
        g = torch.Generator(device="cuda").manual_seed(0)
        mats = [_qmatrix(torch, qtype, shape, g) for _ in range(max(2, math.ceil(4 * l2_bytes / nbytes)))]
        for activations in ("q8", "f32"):
            be = CudaBackend(torch.device("cuda"), activations=activations)
            for ntok in (1, 8):
                x = torch.randn(ntok, shape[1], device="cuda")
                i = [0]

                def call():
                    be.linear(x, mats[i[0] % len(mats)])
                    i[0] += 1
                t = graph_time(torch, call, iters)
                te = best_of(torch, call, iters)
                gbps = nbytes / t / 1e9
                out.append({"qtype": qtype, "rows": shape[0], "cols": shape[1], "tokens": ntok, "activations": activations,
                            "bytes": nbytes, "us": t * 1e6, "us_eager": te * 1e6, "GBps": gbps,
                            "ratio_to_d2d": gbps / d2d_GBps})
            if be.failed:
                raise RuntimeError(f"kernels fell back to torch: {be.failed}")
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


def bench_moe(torch, shape: tuple[int, int], n_exp: int, k: int, gate: str, down: str, iters: int,
              d2d_GBps: float) -> dict:
    """One token's routed experts through CudaBackend.moe: ids on the device, the identity slot table."""
    from promoe_gguf.backends import ExpertStack, StackedMatrix
    from promoe_gguf.backends.cuda import CudaBackend
    from promoe_gguf.format.quants import quant_type
    from promoe_gguf.kernels.testdata import random_blocks
    n_ff, n_embd = shape
    qts = [quant_type(t) for t in (gate, gate, down)]
    sizes = [n_ff * qts[0].row_bytes(n_embd)] * 2 + [n_embd * qts[2].row_bytes(n_ff)]
    offs = [0, -(-sizes[0] // 256) * 256]
    offs.append(offs[1] + -(-sizes[1] // 256) * 256)
    stride = -(-(offs[2] + sizes[2]) // 4096) * 4096
    g = torch.Generator(device="cuda").manual_seed(1)
    arena = torch.empty((n_exp, stride), dtype=torch.uint8, device="cuda")
    for e in range(n_exp):
        for qt, shp, off, n in zip(qts, ((n_ff, n_embd), (n_ff, n_embd), (n_embd, n_ff)), offs, sizes):
            arena[e, off:off + n] = random_blocks(qt.ggml_type, shp, g, device="cuda")
    stack = ExpertStack(*(StackedMatrix(qt.ggml_type, shp[0], shp[1], arena.data_ptr() + off, stride, n_exp)
                          for qt, shp, off in zip(qts, ((n_ff, n_embd), (n_ff, n_embd), (n_embd, n_ff)), offs)),
                        owners=(arena, arena, arena))
    be = CudaBackend(torch.device("cuda"))
    x = torch.randn(1, n_embd, device="cuda")
    w = torch.rand(1, k, device="cuda")
    choices = [torch.randperm(n_exp, generator=torch.Generator().manual_seed(i))[:k].view(1, k).cuda() for i in range(64)]
    i = [0]

    def call():
        be.moe(x, stack, choices[i[0] % len(choices)], w)
        i[0] += 1
    t = graph_time(torch, call, iters)
    te = best_of(torch, call, iters)
    nbytes = k * sum(sizes)
    return {"layout": f"{n_ff}x{n_embd} top-{k} of {n_exp}, gate/up {gate}, down {down}", "tokens": 1, "experts": k,
            "bytes": nbytes, "us": t * 1e6, "us_eager": te * 1e6, "GBps": nbytes / t / 1e9,
            "ratio_to_d2d": nbytes / t / 1e9 / d2d_GBps}


def write_markdown(res: dict, path: Path) -> None:
    env, cp = res["env"], res["copies"]
    L = [f"# GPU benchmark: {env['gpu']}", "",
         f"{env['date']}; driver {env.get('driver', '?')}; torch {env['torch']} (CUDA {env['cuda']}); "
         f"cupy {env['cupy']}; {env['sms']} SMs, L2 {env['l2_MB']:.0f} MB.", "",
         f"- device-to-device copy: **{cp['d2d_GBps']:.0f} GB/s** ({cp['d2d_note']})",
         f"- pinned host-to-device: **{cp['h2d_pinned_GBps']:.1f} GB/s** ({cp['h2d_note']})", "",
         "## Decode matvec: CudaBackend.linear (GB/s of quantized weight bytes; ratio to the D2D copy bandwidth)", "",
         "Device time: the calls recorded as one CUDA graph and replayed (no host between kernels); "
         "bench.json also has each call's eager time (`us_eager`, Python's launch cost included when it "
         "is longer than the kernel).", "",
         "| type | activations | 14336x4096 1/8 tok | 4096x14336 1/8 tok | 768x2048 1/8 tok | 2048x768 1/8 tok | "
         "target (Mixtral, 1 tok >= 0.8) |", "|---|---|---:|---:|---:|---:|---|"]
    by = {}
    for r in res["matvec"]:
        by.setdefault((r["qtype"], r["activations"]), {})[(r["rows"], r["tokens"])] = r
    for (q, act), d in by.items():
        cells = []
        for rows in (14336, 4096, 768, 2048):
            rs = [d.get((rows, n)) for n in (1, 8)]
            cells.append(" / ".join(f"{r['GBps']:.0f} ({r['ratio_to_d2d']:.2f})" if r else "-" for r in rs))
        tgt = ""
        if q in TARGET_TYPES:
            ok = all(d[k]["ratio_to_d2d"] >= TARGET_RATIO for k in ((14336, 1), (4096, 1)) if k in d)
            tgt = "met" if ok else "**not met**"
        L.append(f"| {q} | {act} | " + " | ".join(cells) + f" | {tgt} |")
    L += ["", "## Expert upload (one Mixtral expert, gate+up+down, pinned -> device in 3 chunks)", "",
          "| type | MB | ms | GB/s | ratio to pinned |", "|---|---:|---:|---:|---:|"]
    for r in res["upload"]:
        L.append(f"| {r['qtype']} | {r['expert_bytes'] / 1e6:.1f} | {r['ms']:.2f} | {r['GBps']:.1f} | {r['ratio_to_pinned']:.2f} |")
    L += ["", "## CudaBackend.moe (1 token, routed on the device, resident experts)", "",
          "| layout | us (graph) | GB/s | ratio to D2D | us (eager, host included) |", "|---|---:|---:|---:|---:|"]
    for r in res["moe"]:
        L.append(f"| {r['layout']} | {r['us']:.1f} | {r['GBps']:.0f} | {r['ratio_to_d2d']:.2f} | {r['us_eager']:.1f} |")
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
        print(f"{q:7s} " + "  ".join(f"{r['rows']}x{r['cols']}/{r['tokens']}/{r['activations']}: {r['GBps']:.0f} GB/s "
                                     f"({r['ratio_to_d2d']:.2f})" for r in rows), flush=True)
    d2d = res["copies"]["d2d_GBps"]
    res["moe"] = [bench_moe(torch, MIXTRAL, 8, 2, "Q4_K", "Q6_K", args.iters, d2d),
                  bench_moe(torch, MIXTRAL, 8, 2, "Q8_0", "Q8_0", args.iters, d2d),
                  bench_moe(torch, QWEN3, 128, 8, "Q4_K", "Q6_K", args.iters, d2d)]
    for r in res["moe"]:
        print(f"moe {r['layout']}: {r['us']:.1f} us, {r['GBps']:.0f} GB/s ({r['ratio_to_d2d']:.2f})", flush=True)
    (args.out / "copies.json").write_text(json.dumps(res["copies"]))
    res["wall_s"] = time.time() - t0
    (args.out / "bench.json").write_text(json.dumps(res, indent=1))
    write_markdown(res, args.out / "bench.md")
    print(f"wrote {args.out / 'bench.json'} and {args.out / 'bench.md'} in {res['wall_s']:.0f} s")
    missed = [r for r in res["matvec"] if r["qtype"] in TARGET_TYPES and r["tokens"] == 1 and r["ratio_to_d2d"] < TARGET_RATIO
              and r["rows"] in MIXTRAL and r["activations"] == "q8"]
    for r in missed:
        print(f"below target: {r['qtype']} {r['rows']}x{r['cols']} 1 token at {r['ratio_to_d2d']:.2f} of D2D", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
