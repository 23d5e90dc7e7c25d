"""How far hybrid execution moves results when the device keeps fp32 activations (CUDA) and the CPU
rounds them to 8 bits (ggml): relative L2 of the logits of decode steps (one token at a time, where
misses run on the CPU) and greedy-token agreement against the all-resident run, on the default model.

    python scripts/hybrid_deviation.py [--tokens 24] [--decode 16] [--launcher emu]

Without a GPU the CUDA backend's code path runs with its kernels built for the host
(promoe_gguf/kernels/emulator.py); on a GPU pass --launcher cuda to use the real device.
"""
from __future__ import annotations

import argparse
import json

import numpy as np



def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=24, help="tokens scored one decode step at a time (logits)")
    ap.add_argument("--decode", type=int, default=16, help="greedy tokens generated")
    ap.add_argument("--launcher", default="emu", choices=("emu", "cuda"))
    ap.add_argument("--rates", default="0.25,0.5")
    args = ap.parse_args(argv)
    from promoe_gguf import DEFAULT_MODEL, Engine
    if args.launcher == "emu":
        from promoe_gguf.kernels.emulator import Emu, build_emulator
        kw = {"launcher": Emu(build_emulator()).launcher}
    else:
        kw = {"device": "cuda"}
    prompt = np.random.default_rng(0).integers(1, 256, args.tokens).tolist()

    def run(**extra):
        import torch
        eng = Engine(DEFAULT_MODEL, n_ctx=128, **kw, **extra)
        try:
            kv = eng.decoder.new_cache(128)
            eng.decoder.forward(torch.tensor(prompt[:4]), kv)
            logits = torch.cat([eng.decoder.forward(torch.tensor([t]), kv) for t in prompt[4:]]).cpu().numpy()
            gen = list(eng.generate(prompt[:8], max_tokens=args.decode, temperature=0, ignore_eos=True))
            return logits, gen, eng.stats
        finally:
            eng.close()
    ref_logits, ref_gen, _ = run()
    rows = []
    for rate in (float(r) for r in args.rates.split(",")):
        logits, gen, st = run(cache_rate=rate, policy="promoe", cpu_experts="all")
        err = float(np.linalg.norm(logits - ref_logits) / np.linalg.norm(ref_logits))
        agree = sum(a == b for a, b in zip(gen, ref_gen)) / len(ref_gen)
        first = next((i for i, (a, b) in enumerate(zip(gen, ref_gen)) if a != b), None)
        rows.append({"cache_rate": rate, "rel_l2": err, "greedy_agreement": agree, "first_divergence": first,
                     "cpu_experts": st["cpu_experts"], "lookups": st["hits"] + st["misses"]})
        print(json.dumps(rows[-1]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
