"""End-to-end decode on a GPU through Engine(device="cuda"): the fast path, the expert cache, the copy
stream, on a synthetic Mixtral-shaped GGUF. Exits non-zero on any failure.

The model has Mixtral-8x7B's real shapes (n_embd 4096, expert FF 14336, 8 experts top-2, 32 heads,
8 KV heads) and its Q4_K_M quant mix (attention Q4_K / Q8_0 / Q5_K, experts gate/up Q4_K, down Q6_K,
output Q6_K), only a few layers, random blocks with finite f16 scales. For each configuration
(all resident; lru, promoe and hybrid (promoe + CPU experts) at several rates) it decodes the same
prompt greedily and checks the tokens equal the all-resident run's when misses are copied (the cache
never changes results); hybrid reports its greedy agreement (the CPU rounds activations to 8 bits). It reports decode tokens/s,
stall, hits/misses, and per decoded token:
  * kernel launches, counted by the CUDA profiler (torch.profiler: every kernel, ours and torch's),
  * host synchronisations, counted by torch.cuda.set_sync_debug_mode("warn") warnings,
  * the backend's own counters (launches, routing-id syncs),
and the bound per token max(bytes read / device bandwidth, bytes copied / host-to-device bandwidth).

    python scripts/gpu_e2e.py OUT.json [--layers 2] [--tokens 32] [--d2d GBps] [--h2d GBps]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

N_EMBD, N_FF, N_EXPERT, N_USED, N_HEAD, N_KV = 4096, 14336, 8, 2, 32, 8


def _random_blocks(rng, n_blocks: int, type_size: int, scale_offsets) -> np.ndarray:
    b = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for off in scale_offsets:                       # finite, small f16 scales
        b[:, off:off + 2] = np.full(n_blocks, 2e-3, np.float16).view(np.uint8).reshape(n_blocks, 2)
    return b


# (type, bytes per block, offsets of the f16 scales in a block)
Q4_K, Q5_K, Q6_K, Q8_0 = ("Q4_K", 144, (0, 2)), ("Q5_K", 176, (0, 2)), ("Q6_K", 210, (208,)), ("Q8_0", 34, (0,))


def build_model(path: Path, n_layers: int, seed: int = 0) -> Path:
    import gguf
    from gguf import GGMLQuantizationType as T
    from promoe_gguf.format.byte_vocab import N_VOCAB, add_byte_vocab
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    for k, v in (("block_count", n_layers), ("context_length", 4096), ("embedding_length", N_EMBD),
                 ("feed_forward_length", N_FF), ("attention.head_count", N_HEAD), ("attention.head_count_kv", N_KV),
                 ("rope.dimension_count", N_EMBD // N_HEAD), ("expert_count", N_EXPERT),
                 ("expert_used_count", N_USED), ("vocab_size", N_VOCAB)):
        w.add_uint32(f"llama.{k}", v)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32("llama.rope.freq_base", 1e6)
    add_byte_vocab(w)

    def quant(shape, kind):
        name, size, scales = kind
        qk = 32 if name == "Q8_0" else 256
        *lead, rows, cols = shape
        blocks = _random_blocks(rng, int(np.prod(shape)) // qk, size, scales)
        return blocks.reshape(*lead, rows, cols // qk * size), getattr(T, name)

    def add(name, shape, kind):
        data, t = quant(shape, kind)
        w.add_tensor(name, data, raw_dtype=t)

    hd = N_EMBD // N_HEAD
    add("token_embd.weight", (N_VOCAB, N_EMBD), Q4_K)
    for i in range(n_layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(N_EMBD, np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(N_EMBD, np.float32))
        add(p + "attn_q.weight", (N_EMBD, N_EMBD), Q4_K)
        add(p + "attn_k.weight", (N_KV * hd, N_EMBD), Q8_0)
        add(p + "attn_v.weight", (N_KV * hd, N_EMBD), Q8_0)
        add(p + "attn_output.weight", (N_EMBD, N_EMBD), Q5_K)
        w.add_tensor(p + "ffn_gate_inp.weight", rng.standard_normal((N_EXPERT, N_EMBD), dtype=np.float32) * 0.05)
        add(p + "ffn_gate_exps.weight", (N_EXPERT, N_FF, N_EMBD), Q4_K)
        add(p + "ffn_up_exps.weight", (N_EXPERT, N_FF, N_EMBD), Q4_K)
        add(p + "ffn_down_exps.weight", (N_EXPERT, N_EMBD, N_FF), Q6_K)
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, np.float32))
    add("output.weight", (N_VOCAB, N_EMBD), Q6_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def count_per_token(torch, eng, prompt, n: int) -> dict:
    """Kernels (profiler) and host syncs (sync debug mode) of n decode tokens, per token; on the CPU
    (a dry run of this script) only the backend's own counters."""
    from torch.profiler import ProfilerActivity, profile
    gen = eng.generate(prompt, max_tokens=n + 1, temperature=0, ignore_eos=True)
    next(gen)                                          # prefill + first token outside the window
    be = eng.backend
    l0, s0 = be.launches, be.host_syncs
    moe = len(eng.config.moe_layers)
    if eng.device.type != "cuda":
        for _ in gen:
            pass
        return {"kernels_per_token": None, "syncs_per_token": None, "moe_layers": moe, "kernels_per_moe_layer": None,
                "backend_launches_per_token": (be.launches - l0) / n, "backend_syncs_per_token": (be.host_syncs - s0) / n}
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught, profile(activities=[ProfilerActivity.CUDA]) as prof:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in gen:
                pass
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    return {"kernels_per_token": len(kernels) / n, "syncs_per_token": len(syncs) / n,
            "backend_launches_per_token": (be.launches - l0) / n, "backend_syncs_per_token": (be.host_syncs - s0) / n,
            "moe_layers": moe, "kernels_per_moe_layer": len(kernels) / n / moe}


def run(model: Path, tokens: int, d2d_GBps: float, h2d_GBps: float, rates=(0.25, 0.5), device: str = "cuda") -> dict:
    import torch
    from promoe_gguf import Engine
    prompt = list(range(1, 17))
    rows = []
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    link = {} if device == "cuda" else {"link": "ratio=10"}            # CPU dry run: an emulated link

    def one(**kw):
        eng = Engine(str(model), device=device, n_ctx=256, **(link if kw else {}), **kw)
        try:
            list(eng.generate(prompt, max_tokens=2, temperature=0, ignore_eos=True))   # warm-up: compile
            eng.timing.__init__()
            sync()
            out = list(eng.generate(prompt, max_tokens=tokens, temperature=0, ignore_eos=True))
            sync()
            counts = count_per_token(torch, eng, prompt, 4)
            return out, eng.timing, eng.stats, eng.memory, counts, dict(getattr(eng.backend, "failed", {}))
        finally:
            eng.close()

    from promoe_gguf import open_model
    m = open_model(str(model))
    expert = sum(m.expert_nbytes(*k) for k in m.expert_keys) / len(m.expert_keys)
    configs = [{}] + [dict(cache_rate=r, policy=p, predictor=q, cpu_experts=c) for r in rates
                      for p, q, c in (("lru", "none", "off"), ("promoe", "gate", "off"), ("promoe", "gate", "auto"))]
    ref = None
    for kw in configs:
        out, t, st, mem, counts, failed = one(**kw)
        if failed:
            raise AssertionError(f"{kw}: kernels fell back to torch: {failed}")
        if ref is None:
            ref = out
        elif kw.get("cpu_experts") == "off" and out != ref:
            raise AssertionError(f"{kw}: tokens differ from the all-resident run")
        agree = sum(a == b for a, b in zip(out, ref)) / len(ref)       # hybrid: the CPU rounds to 8 bits
        pp, tg = t.rates()
        per_tok_h2d = st["bytes_h2d"] / max(1, t.prefill_tokens + t.decode_tokens)
        read = mem["resident"] + N_USED * expert * len(m.config.moe_layers)
        bound = max(read / (d2d_GBps * 1e9), per_tok_h2d / (h2d_GBps * 1e9))
        rows.append({**{k: v for k, v in kw.items()}, "decode_tok_s": tg, "prefill_tok_s": pp,
                     "stall_s": st["stall_s"], "hits": st["hits"], "misses": st["misses"], "greedy_agreement": agree,
                     "cpu_experts_run": st.get("cpu_experts", 0), "cost_model": st.get("cost_model"),
                     "bytes_h2d_per_token": per_tok_h2d, "bound_s_per_token": bound,
                     "gap_to_bound": (1 / tg) / bound if tg else None, "memory": mem, **counts})
        per_layer = (f"{counts['kernels_per_moe_layer']:.1f} kernels and {counts['syncs_per_token'] / counts['moe_layers']:.2f} "
                     f"syncs per MoE layer" if counts["kernels_per_token"] is not None else
                     f"{counts['backend_launches_per_token'] / counts['moe_layers']:.1f} backend calls per MoE layer")
        print(f"e2e {kw or 'all resident'}: decode {tg:.1f} tok/s (gap to bound {rows[-1]['gap_to_bound']:.1f}x), "
              f"prefill {pp:.0f} tok/s, stall {st['stall_s']:.3f} s, greedy agreement {agree:.2f}, {per_layer}",
              flush=True)
    return {"status": "ok", "tokens": tokens, "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--d2d", type=float, default=4000.0, help="device bandwidth, GB/s (gpu_bench measures it)")
    ap.add_argument("--h2d", type=float, default=50.0, help="pinned host-to-device bandwidth, GB/s")
    ap.add_argument("--device", default="cuda", help="cuda; cpu for a dry run of this script (emulated link)")
    args = ap.parse_args(argv)
    path = Path(f"/tmp/promoe-synth-mixtral-{args.layers}l.gguf")
    t0 = time.time()
    if not path.exists():
        build_model(path, args.layers)
    print(f"synthetic Mixtral-shaped model: {args.layers} layers, ready in {time.time() - t0:.0f} s", flush=True)
    try:
        res = run(path, args.tokens, args.d2d, args.h2d, device=args.device)
    except Exception as e:  # noqa: BLE001 - record the failure, then fail loudly
        import traceback
        traceback.print_exc()
        res = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
    Path(args.out).write_text(json.dumps(res, indent=1))
    return 0 if res["status"] == "ok" else 1


if __name__ == "__main__":
    raise SystemExit(main())
