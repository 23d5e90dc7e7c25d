"""End-to-end decode on a GPU: lru vs promoe at several cache rates, on a synthetic Mixtral-shaped GGUF.

The model has Mixtral-8x7B's real shapes (n_embd 4096, expert FF 14336, 8 experts top-2, 32 heads,
8 KV heads) and its Q4_K_M expert quant mix (gate/up Q4_K, down Q6_K), but only a few layers and
random blocks (finite f16 scales). Every configuration decodes the same token ids; the tokens are
checked to be identical to the all-resident run. For each run: decode tokens/s, stall time,
bytes copied per token, and the physical bound per token:
    max(bytes read from GPU memory / D2D bandwidth, bytes copied on the critical path / pinned H2D bandwidth)
(critical-path bytes approximated by the misses' bytes). Called by gpu_bench.py; also standalone:
    python scripts/gpu_e2e.py OUT.json [--layers 2] [--tokens 32]
"""
from __future__ import annotations

import json
import sys
import time
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

    def f16(*shape, std):
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float16)
    w.add_tensor("token_embd.weight", f16(N_VOCAB, N_EMBD, std=0.02))
    hd = N_EMBD // N_HEAD
    for i in range(n_layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(N_EMBD, np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(N_EMBD, np.float32))
        for name, rows in (("attn_q", N_EMBD), ("attn_k", N_KV * hd), ("attn_v", N_KV * hd), ("attn_output", N_EMBD)):
            w.add_tensor(p + name + ".weight", f16(rows, N_EMBD, std=N_EMBD ** -0.5))
        w.add_tensor(p + "ffn_gate_inp.weight", rng.standard_normal((N_EXPERT, N_EMBD), dtype=np.float32) * 0.05)
        q4k = N_EMBD // 256 * 144
        for name in ("ffn_gate_exps", "ffn_up_exps"):
            blocks = _random_blocks(rng, N_EXPERT * N_FF * N_EMBD // 256, 144, (0, 2))
            w.add_tensor(p + name + ".weight", blocks.reshape(N_EXPERT, N_FF, q4k), raw_dtype=T.Q4_K)
        q6k = N_FF // 256 * 210
        blocks = _random_blocks(rng, N_EXPERT * N_EMBD * N_FF // 256, 210, (208,))
        w.add_tensor(p + "ffn_down_exps.weight", blocks.reshape(N_EXPERT, N_EMBD, q6k), raw_dtype=T.Q6_K)
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, np.float32))
    w.add_tensor("output.weight", f16(N_VOCAB, N_EMBD, std=0.02))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def run(model: Path, tokens: int, d2d_GBps: float, h2d_GBps: float, rates=(0.25, 0.5, 0.75)) -> dict:
    import torch
    from promoe_gguf import Engine
    prompt = list(range(1, 17))
    rows = []

    def one(**kw):
        eng = Engine(str(model), device="cuda", n_ctx=256, **kw)
        try:
            out = list(eng.generate(prompt, max_tokens=1, temperature=0, ignore_eos=True))   # warm-up + compile
            eng.timing.decode_s = eng.timing.decode_tokens = 0
            torch.cuda.synchronize()
            out = list(eng.generate(prompt, max_tokens=tokens, temperature=0, ignore_eos=True))
            torch.cuda.synchronize()
            st = eng.stats
            resident = sum(eng.model.tensor_ref(n).nbytes for n in eng.model.resident_names)
            return out, eng.timing, st, resident
        finally:
            eng.close()

    ref, timing, _, resident = one()
    cfg_bytes = None
    for rate in rates:
        for policy, predictor in (("lru", "none"), ("promoe", "gate")):
            out, t, st, resident = one(cache_rate=rate, policy=policy, predictor=predictor)
            if out != ref:
                raise AssertionError(f"{policy}/{rate}: output differs from the all-resident run")
            pp, tg = t.rates()
            per_tok_h2d = st["bytes_h2d"] / max(1, t.prefill_tokens + t.decode_tokens)
            if cfg_bytes is None:
                from promoe_gguf import open_model
                m = open_model(str(model))
                cfg_bytes = sum(m.expert_nbytes(*k) for k in m.expert_keys) / len(m.expert_keys)
            # resident weights (mostly f16 here) are held dequantized to fp32 on the GPU: ~2x their bytes
            read = 2 * resident + N_USED * cfg_bytes * m.config.n_layers
            bound = max(read / (d2d_GBps * 1e9), per_tok_h2d / (h2d_GBps * 1e9))
            rows.append({"cache_rate": rate, "policy": policy, "predictor": predictor, "decode_tok_s": tg,
                         "prefill_tok_s": pp, "stall_s": st["stall_s"], "hits": st["hits"], "misses": st["misses"],
                         "bytes_h2d_per_token": per_tok_h2d, "bound_s_per_token": bound,
                         "gap_to_bound": (1 / tg) / bound if tg else None})
            print(f"e2e rate {rate:.2f} {policy:<6}: decode {tg:.1f} tok/s, stall {st['stall_s']:.3f} s, "
                  f"hits {st['hits']} misses {st['misses']}, gap to bound {rows[-1]['gap_to_bound']:.1f}x", flush=True)
    base_tg = timing.rates()[1]
    return {"status": "ok", "layers": None, "tokens": tokens, "all_resident_decode_tok_s": base_tg, "rows": rows}


def bench_end_to_end(torch, copies: dict, n_layers: int = 2, tokens: int = 32) -> dict:
    path = Path("/tmp/promoe-synth-mixtral.gguf")
    try:
        t0 = time.time()
        if not path.exists():
            build_model(path, n_layers)
        print(f"synthetic Mixtral-shaped model: {n_layers} layers, built in {time.time() - t0:.0f} s", flush=True)
        res = run(path, tokens, copies["d2d_GBps"], copies["h2d_pinned_GBps"])
        res["layers"] = n_layers
        return res
    except Exception as e:  # noqa: BLE001 - report, don't lose the rest of the benchmark
        import traceback
        traceback.print_exc()
        return {"status": "failed", "reason": f"{type(e).__name__}: {e}"}


if __name__ == "__main__":
    import torch
    out = Path(sys.argv[1])
    res = bench_end_to_end(torch, {"d2d_GBps": float(sys.argv[2]) if len(sys.argv) > 2 else 4000.0,
                                   "h2d_pinned_GBps": float(sys.argv[3]) if len(sys.argv) > 3 else 50.0})
    out.write_text(json.dumps(res, indent=1))
