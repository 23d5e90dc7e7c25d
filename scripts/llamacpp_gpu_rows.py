#!/usr/bin/env python3
"""Stock llama.cpp rows for a comparison on the GPU machine: llama-bench from the CUDA bundle
(bench/llamacpp-cuda/llamacpp-cuda.tar.xz, built by scripts/build_llamacpp.sh --cuda) in its offload modes.

For each device memory budget (--gpu-mem, repeatable; none: no limit) it runs the largest layer
offload (-ngl N) and the smallest experts-on-CPU placement (-ngl all --n-cpu-moe N) whose estimated
device bytes fit (promoe_gguf.bench.llamacpp.fit_offload), plus all on the GPU, and with --cpu the
all-CPU row. Prints a markdown table; --json writes the rows. Exit status: 0 ok, 2 usage, 3 no GPU
seen by llama.cpp, 1 a run failed.

    python3 scripts/llamacpp_gpu_rows.py --shape mixtral-8x7b --layers 4 --gpu-mem 8G --gpu-mem 12G \\
        --json OUT/llamacpp.json
    python3 scripts/llamacpp_gpu_rows.py --model M.gguf --bundle bench/llamacpp-cuda/llamacpp-cuda.tar.xz

Needs numpy and gguf (scripts/gpu_check.sh installs the carried wheels first) and the repo on
PYTHONPATH.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from promoe_gguf.bench import llamacpp as lc
from promoe_gguf.bench.real_shapes import SHAPES
from promoe_gguf.errors import ModelError

REPO = Path(__file__).resolve().parent.parent

DEFAULT_BUNDLE = REPO / "bench" / "llamacpp-cuda" / "llamacpp-cuda.tar.xz"


def bundle_dir(path: Path, work: Path) -> Path:
    """A folder holding run.sh: the bundle folder itself, or the .tar.xz unpacked under work."""
    if path.is_dir():
        return path
    if not path.is_file():
        raise FileNotFoundError(f"no llama.cpp CUDA bundle at {path}; build one with "
                                "bash scripts/build_llamacpp.sh --cuda build/llamacpp-cuda")
    with tarfile.open(path) as tf:
        if hasattr(tarfile, "data_filter"):          # Python >= 3.12 (and patched 3.10/3.11)
            tf.extractall(work, filter="data")
        else:
            tf.extractall(work)
    found = [p.parent for p in work.glob("*/run.sh")]
    if len(found) != 1:
        raise RuntimeError(f"{path}: expected one folder with run.sh inside, found {len(found)}")
    return found[0]


def gb(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def rate(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a GGUF file")
    src.add_argument("--shape", choices=sorted(SHAPES), help="write a real-shape synthetic model and use it")
    ap.add_argument("--layers", type=int, default=4, help="layers of the --shape model (default 4)")
    ap.add_argument("--models-dir", default=None, help="where --shape models are written (default: a temp dir)")
    ap.add_argument("--bundle", default=str(DEFAULT_BUNDLE), help="the CUDA bundle: .tar.xz or unpacked folder")
    ap.add_argument("--gpu-mem", action="append", default=[], help="device memory budget, e.g. 12G (repeatable)")
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cpu", action="store_true", help="also run the all-CPU row")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    from promoe_gguf.cli.flags import parse_mem
    budgets = []
    for text in args.gpu_mem:
        try:
            budgets.append(parse_mem(text))
        except ModelError:
            ap.error(f"--gpu-mem {text!r} is not a size (e.g. 12G)")

    with tempfile.TemporaryDirectory(prefix="llamacpp-rows-") as tmp:
        tmp = Path(tmp)
        try:
            bins = bundle_dir(Path(args.bundle), tmp / "bundle")
        except (FileNotFoundError, RuntimeError) as e:
            print(f"llamacpp_gpu_rows: {e}", file=sys.stderr)
            return 2
        devices = lc.list_devices(bins)
        if not devices:
            ldd = subprocess.run([str(bins / "run.sh"), "--ldd"], capture_output=True, text=True)
            print("llamacpp_gpu_rows: llama.cpp sees no GPU (no CUDA device, or the CUDA module did not load); "
                  f"its libraries:\n{ldd.stdout}{ldd.stderr}", file=sys.stderr)
            return 3
        print("devices:", "; ".join(devices))
        if args.shape:
            from promoe_gguf.testing import factory
            model = factory.make_real_shape(args.shape, args.models_dir or tmp / "models", args.layers)
        else:
            model = Path(args.model)
        layout = lc.ModelLayout.from_gguf(model)
        L = layout.n_layer
        n_ctx = args.n_prompt + args.n_gen
        common = dict(n_prompt=args.n_prompt, n_gen=args.n_gen, threads=args.threads, reps=args.reps, bin_dir=bins)
        plan = [(None, "ngl", L + 1, 0)]                    # (budget, mode, -ngl, --n-cpu-moe)
        for b in budgets:
            fit = lc.fit_offload(layout, b, n_ctx=n_ctx)
            plan.append((b, "ngl", fit.ngl, 0))
            if fit.n_cpu_moe:
                plan.append((b, "n-cpu-moe", L + 1, fit.n_cpu_moe))
        if args.cpu:
            plan.append((None, "cpu", 0, 0))
        rows, failed = [], 0
        print(f"\nllama.cpp on {Path(model).name} ({L} layers), -p {args.n_prompt} -n {args.n_gen}, {args.reps} reps\n")
        print("| budget GB | mode | -ngl | --n-cpu-moe | est. device GB | prefill tok/s | decode tok/s | backends |")
        print("|---|---|---|---|---|---|---|---|")
        for b, mode, ngl, ncmoe in plan:
            try:
                r = lc.run_llama_bench(model, n_gpu_layers=ngl, n_cpu_moe=ncmoe, mode=mode, **common)
            except (RuntimeError, ModelError) as e:
                print(f"| {gb(b)} | {mode} | {ngl} | {ncmoe} | failed: {str(e).splitlines()[0]} |||")
                failed += 1
                continue
            r.device_bytes_est = layout.device_bytes(ngl, ncmoe, n_ctx=n_ctx)
            rows.append(dict(budget=b, **r.as_dict()))
            print(f"| {gb(b)} | {mode} | {ngl} | {ncmoe} | {gb(r.device_bytes_est)} | {rate(r.prefill_tok_s)} "
                  f"| {rate(r.decode_tok_s)} | {r.backends} |")
        if args.json:
            Path(args.json).write_text(json.dumps({"model": str(model), "devices": devices, "rows": rows}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
