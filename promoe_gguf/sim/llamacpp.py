"""Stock llama.cpp's offload modes, timed on a profile (no cache, no prediction: placement is fixed).

Placement (as llama.cpp's loader does it):
  all on the CPU   no GPU, or --ngl 0
  --ngl N          the LAST N layers on the GPU with their experts and KV cache; the output layer too
                   when N > n_layers; token_embd always stays on the CPU (a row lookup)
  --n-cpu-moe N    every layer on the GPU, the routed experts of the FIRST N layers on the CPU
Decode (one token): a GPU layer streams its weights at gpu_bw + gpu_layer_us; experts on the CPU cost
two hand-offs (split_us each) and k experts at cpu_bw; a CPU layer streams everything at cpu_bw plus
cpu_layer_ops ggml ops. Prefill (ubatches of n_ubatch tokens): a batch of >= 32 tokens runs every
weight that lives in host memory on the GPU ("op offload"): the experts the ubatch uses (all weights
of a CPU layer) are copied over the link first, serially with compute; smaller batches compute on the
CPU. Device memory: weights on the GPU + f16 KV cache of GPU layers + compute buffers, within the
profile's memory less LLAMA_RESERVE (CUDA context).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ModelError
from .costs import SimModel, attention_work, layer_cpu_s, layer_gpu_s, roofline
from .ours import Phase

KV_BYTES = 2                    # llama.cpp's default KV cache type is f16
OP_OFFLOAD_MIN_BATCH = 32       # GGML_OP_OFFLOAD_MIN_BATCH default
LLAMA_RESERVE = 512 * 2**20     # CUDA context, cuBLAS handles, driver: not available to llama.cpp's buffers
MOE_CPU_OPS = 6                 # ggml ops of a MoE block on the CPU (3 mul_mat_id, swiglu, weights, sum)
GiB = 2**30


@dataclass
class Placement:
    ngl: int                    # layers on the GPU (the last ones); > n_layers: the output layer too
    n_cpu_moe: int              # of those, the first n_cpu_moe layers keep their experts on the CPU

    def label(self, n_layers: int) -> str:
        if self.ngl == 0:
            return "all on the CPU"
        if self.n_cpu_moe:
            return f"--n-cpu-moe {self.n_cpu_moe}" + ("" if self.ngl > n_layers else f" --ngl {self.ngl}")
        return "all on the GPU" if self.ngl > n_layers else f"--ngl {self.ngl}"


class LlamaCppSim:
    def __init__(self, m: SimModel, prof, routing, placement: Placement, n_ctx: int = 4096, n_ubatch: int = 512):
        self.m, self.prof, self.routing, self.p = m, prof, routing, placement
        self.n_ctx, self.n_ubatch = int(n_ctx), int(n_ubatch)
        if placement.ngl and not prof.has_gpu:
            raise ModelError(f"--ngl / --n-cpu-moe need a GPU; profile {prof.name} has none (gpu_gbs=0)")
        L = m.n_layers
        self.gpu_layer = [placement.ngl > 0 and i >= L - min(placement.ngl, L) for i in range(L)]
        self.cpu_experts = [not g or i < placement.n_cpu_moe for i, g in enumerate(self.gpu_layer)]
        self.out_on_gpu = placement.ngl > L

    # ---- memory ---------------------------------------------------------------------------------
    def memory(self) -> dict:
        m, L = self.m, self.m.n_layers
        weights = kv = 0
        for i in range(L):
            if self.gpu_layer[i]:
                weights += m.layer_bytes[i]
                kv += self.n_ctx * m.kv_elems * KV_BYTES
                if i in m.expert_bytes and not self.cpu_experts[i]:
                    weights += m.E * m.expert_bytes[i]
        if self.out_on_gpu:
            weights += m.out_bytes
        compute = 0
        if self.p.ngl:
            # activations of one ubatch (hidden states, the MoE intermediates, logits if the head is here)
            ff = max([m.expert_params[i] // (3 * m.d) for i in m.moe_layers] + [1])
            compute = self.n_ubatch * 4 * (8 * m.d + 2 * m.k * ff + (m.vocab if self.out_on_gpu else 0))
            host = [m.E * m.expert_bytes[i] // 3 for i in m.moe_layers if self.cpu_experts[i]]
            compute += max(host, default=0)          # op offload stages one host weight tensor at a time
        total = weights + kv + compute
        return {"weights": weights, "kv_cache": kv, "compute": compute, "reserve": LLAMA_RESERVE if self.p.ngl else 0,
                "total": total + (LLAMA_RESERVE if self.p.ngl else 0)}

    def check_fit(self) -> dict:
        mem = self.memory()
        if self.p.ngl and mem["total"] > self.prof.gpu_mem:
            over = mem["total"] - self.prof.gpu_mem
            raise ModelError(f"llama.cpp {self.p.label(self.m.n_layers)} needs {mem['total'] / GiB:.2f} GiB of device "
                             f"memory ({mem['weights'] / GiB:.2f} weights, {mem['kv_cache'] / GiB:.2f} KV cache, "
                             f"{mem['compute'] / GiB:.2f} compute buffers, {mem['reserve'] / GiB:.2f} CUDA context): "
                             f"{over / GiB:.2f} GiB ({over / 2**20:,.0f} MiB) more than the profile's "
                             f"{self.prof.gpu_mem_gb:g} GiB")
        return mem

    # ---- time -----------------------------------------------------------------------------------
    def _decode_token(self, ctx: float, ph: Phase) -> float:
        m, prof = self.m, self.prof
        t, on_gpu = 0.0, False
        for i in range(m.n_layers):
            g = self.gpu_layer[i]
            if g != on_gpu:
                t += prof.split_us * 1e-6
                on_gpu = g
            moe = i in m.expert_bytes
            eb = m.k * m.expert_bytes[i] if moe else 0
            if g:
                t += layer_gpu_s(m, prof, i, 1, ctx, KV_BYTES) + prof.gpu_layer_us * 1e-6
                ph.gpu_bytes += m.layer_bytes[i]
                if moe and self.cpu_experts[i]:
                    t += 2 * prof.split_us * 1e-6 + eb / m.cpu_bw(prof) + MOE_CPU_OPS * prof.cpu_op_us * 1e-6
                    ph.cpu_bytes += eb
                elif moe:
                    t += eb / prof.gpu_bw
                    ph.gpu_bytes += eb
            else:
                t += layer_cpu_s(m, prof, i, 1, ctx, KV_BYTES) + eb / m.cpu_bw(prof) + prof.cpu_layer_ops * prof.cpu_op_us * 1e-6
                ph.cpu_bytes += m.layer_bytes[i] + eb
        if self.out_on_gpu:
            t += m.out_bytes / prof.gpu_bw
            ph.gpu_bytes += m.out_bytes
        else:
            t += (prof.split_us * 1e-6 if on_gpu else 0) + m.out_bytes / m.cpu_bw(prof)
            ph.cpu_bytes += m.out_bytes
        return t

    def _prefill_ubatch(self, ids: np.ndarray, pos0: int, ph: Phase) -> float:
        """One ubatch: ids [T, M, k] of its tokens, starting at position pos0."""
        m, prof = self.m, self.prof
        T = len(ids)
        ctx = pos0 + T / 2
        offload = prof.has_gpu and T >= OP_OFFLOAD_MIN_BATCH
        t = 0.0
        for i in range(m.n_layers):
            moe = i in m.expert_bytes
            if moe:
                j = m.moe_layers.index(i)
                used = len(np.unique(ids[:, j]))
                ebytes, eflops = used * m.expert_bytes[i], 2 * m.expert_params[i] * T * m.k
            else:
                ebytes = eflops = 0
            g = self.gpu_layer[i]
            if g:
                t += layer_gpu_s(m, prof, i, T, ctx, KV_BYTES) + prof.gpu_prefill_layer_us * 1e-6
                ph.gpu_bytes += m.layer_bytes[i]
            elif offload:                     # a CPU layer's matmuls run on the GPU, weights copied; attention on the CPU
                kv, aflops = attention_work(m, T, ctx, KV_BYTES)
                t += m.layer_bytes[i] / prof.h2d_bw + roofline(m.layer_bytes[i], 2 * m.layer_params[i] * T,
                                                                prof.gpu_bw, prof.gpu_flops)
                t += roofline(kv, aflops, m.cpu_bw(prof), prof.cpu_flops) + prof.gpu_prefill_layer_us * 1e-6
                ph.h2d_bytes += m.layer_bytes[i]
            else:
                t += layer_cpu_s(m, prof, i, T, ctx, KV_BYTES) + prof.cpu_layer_ops * prof.cpu_op_us * 1e-6
                ph.cpu_bytes += m.layer_bytes[i]
            if not moe:
                continue
            if not self.cpu_experts[i]:
                t += roofline(ebytes, eflops, prof.gpu_bw, prof.gpu_flops)
                ph.gpu_bytes += ebytes
            elif offload:                     # op offload: the used experts cross the link, then the GPU computes
                t += ebytes / prof.h2d_bw + 3 * prof.h2d_latency_us * 1e-6 + roofline(ebytes, eflops, prof.gpu_bw, prof.gpu_flops)
                ph.h2d_bytes += ebytes
            else:
                t += roofline(ebytes, eflops, m.cpu_bw(prof), prof.cpu_flops) + MOE_CPU_OPS * prof.cpu_op_us * 1e-6
                t += 2 * prof.split_us * 1e-6 if g else 0
                ph.cpu_bytes += ebytes
        # the head: the last position's logits only
        t += m.out_bytes / (prof.gpu_bw if self.out_on_gpu else m.cpu_bw(prof))
        return t

    def run(self, progress=None) -> dict:
        self.check_fit()
        pre, dec = Phase(), Phase()
        for seq in self.routing.sequences:
            for lo in range(0, seq.n_prompt, self.n_ubatch):
                hi = min(lo + self.n_ubatch, seq.n_prompt)
                pre.seconds += self._prefill_ubatch(seq.ids[lo:hi], lo, pre)
            pre.tokens += seq.n_prompt
            for pos in range(seq.n_prompt, len(seq.ids)):
                dec.seconds += self._decode_token(pos, dec)
            dec.tokens += seq.n_decode
            if progress is not None:
                progress.update(1)
        return {"prefill": pre, "decode": dec}


def placements(m: SimModel, prof, n_ctx: int, n_ubatch: int, routing) -> dict:
    """llama.cpp's modes that fit the profile: all on the CPU, the most layers (--ngl), and the fewest
    expert layers on the CPU (--n-cpu-moe); None where a mode does not fit at all."""
    L = m.n_layers
    out = {"cpu": Placement(0, 0)}
    if not prof.has_gpu:
        return out

    def fits(p):
        return LlamaCppSim(m, prof, routing, p, n_ctx, n_ubatch).memory()["total"] <= prof.gpu_mem
    full = Placement(L + 1, 0)
    if fits(full):
        out["gpu"] = full
        return out
    out["ngl"] = next((Placement(n, 0) for n in range(L, 0, -1) if fits(Placement(n, 0))), None)
    out["n_cpu_moe"] = next((Placement(L + 1, n) for n in range(0, L + 1) if fits(Placement(L + 1, n))), None)
    return out
