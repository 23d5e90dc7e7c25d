"""The strongest published design, as a baseline: FreeToken-like decode and prefill on a profile.

Read from FreeToken's wheel (shared/reference/peers.md; its numbers are second-hand):
  - every layer's dense weights and KV cache on the GPU; the routed experts in host memory, with one
    strict LRU per expert layout across layers (no predictor) over the device memory left, less two
    layers of staging for prefill;
  - decode: the whole forward is one CUDA graph (llama.cpp's per-layer cost); per layer the misses are
    split by count so that the link and the CPU finish together (fetch fraction link / (link + CPU)
    bandwidth, the integer count closest to it); fetched misses enter the cache and are computed on the
    GPU, the rest on the CPU (a flag hand-off each way); hits on the GPU;
  - prefill: while layer L computes, every expert of layer L+1 streams into a double buffer (whole
    layers, whatever the routing); the GPU computes every expert.
The hand-off is two flags in mapped memory, costed as our split_us; the two bandwidths are the profile's,
each as if the other were idle (FreeToken measures them running together, which can only be lower).
"""
from __future__ import annotations

import numpy as np

from ..errors import ModelError
from .costs import SimModel, layer_gpu_s, roofline
from .llamacpp import KV_BYTES, LLAMA_RESERVE, banks_for
from .ours import Phase

GiB = 2**30


def fetch_count(n: int, copy_s: float, cpu_s: float) -> int:
    """How many of a layer's n misses to fetch (the rest go to the CPU) so that both sides finish
    closest together; ties fetch more."""
    return min(range(n + 1), key=lambda f: (max(f * copy_s, (n - f) * cpu_s), -f))


class FreeTokenSim:
    def __init__(self, m: SimModel, prof, routing, n_ctx: int = 4096, n_ubatch: int = 512):
        self.m, self.prof, self.routing = m, prof, routing
        self.n_ctx, self.n_ubatch = int(n_ctx), int(n_ubatch)
        mem = self.memory()
        if mem["expert_cache"] <= 0:
            raise ModelError(f"FreeToken-like: {m.name}'s dense weights, KV cache, two layers of staging and compute "
                             f"buffers need {(mem['total'] - mem['expert_cache']) / GiB:.2f} GiB, more than the "
                             f"profile's {prof.gpu_mem_gb:g} GiB")
        self.banks = banks_for(m, m.moe_layers, mem["expert_cache"], spare=0)
        self.bank_of = {i: b for b in self.banks for i in b.layers}

    def memory(self) -> dict:
        m, prof = self.m, self.prof
        weights = sum(m.layer_bytes) + m.out_bytes
        kv = m.n_layers * self.n_ctx * m.kv_elems * KV_BYTES
        staging = 2 * max(m.E * m.expert_bytes[i] for i in m.moe_layers)
        ff = max([m.expert_params[i] // (3 * m.d) for i in m.moe_layers] + [1])
        compute = self.n_ubatch * 4 * (8 * m.d + 2 * m.k * ff + m.vocab)
        fixed = weights + kv + staging + compute + LLAMA_RESERVE
        cache = min(prof.gpu_mem - fixed, sum(m.E * m.expert_bytes[i] for i in m.moe_layers))
        return {"weights": weights, "kv_cache": kv, "staging": staging, "compute": compute,
                "reserve": LLAMA_RESERVE, "expert_cache": cache, "total": fixed + cache}

    # ---- decode ---------------------------------------------------------------------------------
    def _decode_token(self, pos: int, ids, ph: Phase) -> float:
        m, prof = self.m, self.prof
        t = 0.0
        for i in range(m.n_layers):
            t += layer_gpu_s(m, prof, i, 1, pos, KV_BYTES) + prof.gpu_layer_us * 1e-6
            ph.gpu_bytes += m.layer_bytes[i]
            if i not in m.expert_bytes:
                continue
            eb, bank = m.expert_bytes[i], self.bank_of[i]
            experts = [int(e) for e in ids[m.moe_layers.index(i)]]
            hits = [e for e in experts if bank.touch((i, e))]
            misses = [e for e in experts if e not in hits]
            copy_s = prof.h2d_latency_us * 1e-6 + eb / prof.h2d_bw
            cpu_s = eb / m.cpu_bw(prof)
            f = fetch_count(len(misses), copy_s, cpu_s)
            for e in misses[:f]:
                bank.admit((i, e))
            gpu = f * copy_s + (len(hits) + f) * eb / prof.gpu_bw
            cpu = (len(misses) - f) * cpu_s + (2 * prof.split_us * 1e-6 if f < len(misses) else 0.0)
            t += max(gpu, cpu)
            ph.hits, ph.misses = ph.hits + len(hits), ph.misses + len(misses)
            ph.h2d_bytes += f * eb
            ph.miss_bytes += len(misses) * eb
            ph.cpu_bytes += (len(misses) - f) * eb
            ph.cpu_experts += len(misses) - f
            ph.gpu_bytes += (len(hits) + f) * eb
        return t + m.out_bytes / prof.gpu_bw

    # ---- prefill --------------------------------------------------------------------------------
    def _prefill_ubatch(self, ids: np.ndarray, pos0: int, ph: Phase) -> float:
        m, prof = self.m, self.prof
        T = len(ids)
        ctx = pos0 + T / 2
        loads = [m.E * m.expert_bytes[i] / prof.h2d_bw if i in m.expert_bytes else 0.0 for i in range(m.n_layers)]
        t = loads[0]                                   # the first layer's experts: nothing to overlap with
        for i in range(m.n_layers):
            work = layer_gpu_s(m, prof, i, T, ctx, KV_BYTES) + prof.gpu_prefill_layer_us * 1e-6
            if i in m.expert_bytes:
                used = len(np.unique(ids[:, m.moe_layers.index(i)]))
                work += roofline(used * m.expert_bytes[i], 2 * m.expert_params[i] * T * m.k, prof.gpu_bw, prof.gpu_flops)
                ph.h2d_bytes += m.E * m.expert_bytes[i]
                ph.gpu_bytes += used * m.expert_bytes[i]
            nxt = loads[i + 1] if i + 1 < m.n_layers else 0.0
            t += max(work, nxt)
        return t + m.out_bytes / prof.gpu_bw

    def run(self, progress=None, warm: bool = False) -> dict:
        pre, dec = Phase(), Phase()
        for n, seq in enumerate(self.routing.sequences):
            pre_, dec_ = (Phase(), Phase()) if warm and n == 0 else (pre, dec)
            for lo in range(0, seq.n_prompt, self.n_ubatch):
                hi = min(lo + self.n_ubatch, seq.n_prompt)
                pre_.seconds += self._prefill_ubatch(seq.ids[lo:hi], lo, pre_)
            pre_.tokens += seq.n_prompt
            for pos in range(seq.n_prompt, len(seq.ids)):
                dec_.seconds += self._decode_token(pos, seq.ids[pos], dec_)
            dec_.tokens += seq.n_decode
            if progress is not None:
                progress.update(1)
        return {"prefill": pre, "decode": dec}
