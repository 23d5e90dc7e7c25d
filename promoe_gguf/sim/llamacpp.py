"""Stock llama.cpp's offload modes, timed on a profile (no cache, no prediction: placement is fixed).

Placement and device memory: bench/llamacpp_memory.py, the rule `promoe bench --vs-llamacpp` fits with:
  all on the CPU   no GPU, or --ngl 0
  --ngl N          the output layer, then the LAST N - 1 layers on the GPU with their experts and KV
                   cache; token_embd always stays on the CPU (a row lookup)
  --n-cpu-moe N    every layer on the GPU, the routed experts of the FIRST N layers on the CPU
  --moe-cache-mib M  (with --n-cpu-moe) llama.cpp's expert cache over the layers whose experts live in host
                   memory: one device bank and one strict LRU per group of layers with the same expert
                   layout (types and shapes), the budget split in proportion to expert bytes (every group
                   caches the same fraction), one spare slot per bank. A batch of at most 32 tokens reads
                   the chosen ids back (one hand-off per layer), uploads its misses into LRU slots (evicting
                   from the front) and computes every expert of the layer on the GPU; no CPU compute. A larger
                   batch uses the cache read-only: cached experts copied device to device, the rest from
                   host memory as op offload does. (llama.cpp PR #29887, src/llama-moe-cache.cpp, as read in
                   shared/reference/peers.md; no published run of it is in the validation table.)
Decode (one token): a GPU layer streams its weights at gpu_bw + gpu_layer_us; experts on the CPU cost
two hand-offs (split_us each) and k experts at cpu_bw; a CPU layer streams everything at cpu_bw plus
cpu_layer_ops ggml ops. Prefill (ubatches of n_ubatch tokens): a batch of >= 32 tokens runs every
weight that lives in host memory on the GPU ("op offload"): the experts the ubatch uses (all weights
of a CPU layer) are copied over the link first, serially with compute; smaller batches compute on the
CPU. Device memory: weights on the GPU + f16 KV cache of GPU layers + the expert cache + compute
buffers, within the profile's memory less LLAMA_RESERVE (CUDA context).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..bench.llamacpp_memory import ModelLayout
from ..errors import ModelError
from .costs import SimModel, attention_work, layer_cpu_s, layer_gpu_s, roofline
from .ours import Phase

KV_BYTES = 2                    # llama.cpp's default KV cache type is f16
OP_OFFLOAD_MIN_BATCH = 32       # GGML_OP_OFFLOAD_MIN_BATCH default
LLAMA_RESERVE = 512 * 2**20     # CUDA context, cuBLAS handles, driver: not available to llama.cpp's buffers
MOE_CACHE_MAX_BATCH = 32        # llama-moe-cache.cpp: larger batches read the cache without changing it
MiB = 2**20
MOE_CPU_OPS = 6                 # ggml ops of a MoE block on the CPU (3 mul_mat_id, swiglu, weights, sum)
GiB = 2**30


@dataclass(frozen=True)
class Placement:
    ngl: int                    # layer slots on the GPU: the output layer, then the last ngl - 1 blocks
    n_cpu_moe: int              # of those, the first n_cpu_moe layers keep their experts on the CPU
    moe_cache_mib: int = 0      # llama.cpp's expert cache over those layers (0: off)
    n_ubatch: int = 512         # prefill micro-batch (-ub)

    def label(self, n_layers: int) -> str:
        ub = "" if self.n_ubatch == 512 else f" -ub {self.n_ubatch}"
        if self.ngl == 0:
            return "all on the CPU" + ub
        if self.n_cpu_moe:
            return (f"--n-cpu-moe {self.n_cpu_moe}" + ("" if self.ngl > n_layers else f" --ngl {self.ngl}")
                    + (f" --moe-cache-mib {self.moe_cache_mib}" if self.moe_cache_mib else "") + ub)
        return ("all on the GPU" if self.ngl > n_layers else f"--ngl {self.ngl}") + ub


class ExpertBank:
    """One group's device bank and strict LRU (llama-moe-cache.cpp): keys (layer, expert)."""

    def __init__(self, layers: list, slots: int):
        self.layers, self.slots = layers, slots
        self.lru: dict = {}                  # insertion order = LRU order (front = least recent)

    def lookup(self, key, admit: bool) -> bool:
        """True on a hit (the key moves to the back when `admit`); a miss is uploaded into the front slot
        when `admit`."""
        if key in self.lru:
            if admit:
                self.touch(key)
            return True
        if admit:
            self.admit(key)
        return False

    def touch(self, key) -> bool:
        """A hit moves to the back; False (nothing changes) on a miss."""
        if key not in self.lru:
            return False
        self.lru[key] = self.lru.pop(key)
        return True

    def admit(self, key) -> None:
        if self.slots:
            if len(self.lru) >= self.slots:
                del self.lru[next(iter(self.lru))]
            self.lru[key] = None


def layout_groups(m: SimModel, layers) -> list:
    """`layers` grouped by their experts' layout (types and shapes): one bank each."""
    groups: dict = {}
    for i in layers:
        groups.setdefault(tuple((ms.qtype, ms.shape) for ms, _ in m.layout.matrices[(i, 0)]), []).append(i)
    return list(groups.values())


def layout_of(m: SimModel) -> ModelLayout:
    """The simulated model's bytes as llama.cpp places them (per layer, experts included)."""
    L = m.n_layers
    experts = tuple(m.E * m.expert_bytes.get(i, 0) for i in range(L))
    ff = max([m.expert_params[i] // (3 * m.d) for i in m.moe_layers] + [1])
    return ModelLayout(L, tuple(m.layer_bytes[i] + experts[i] for i in range(L)), experts, m.out_bytes, m.embd_bytes,
                       m.kv_elems * KV_BYTES, m.vocab, m.d, m.n_head, 4 * m.k * ff)


def banks_for(m: SimModel, layers, budget: int, spare: int = 1) -> list:
    """One bank per layout group of `layers`, each caching the same fraction of its experts."""
    groups = layout_groups(m, layers)
    total = sum(m.E * m.expert_bytes[i] for g in groups for i in g)
    frac = min(1.0, budget / total) if total else 0.0
    return [ExpertBank(g, max(0, int(frac * len(g) * m.E) - spare)) for g in groups]


class LlamaCppSim:
    def __init__(self, m: SimModel, prof, routing, placement: Placement, n_ctx: int = 4096):
        self.m, self.prof, self.routing, self.p = m, prof, routing, placement
        self.n_ctx, self.n_ubatch = int(n_ctx), int(placement.n_ubatch)
        if placement.ngl and not prof.has_gpu:
            raise ModelError(f"--ngl / --n-cpu-moe need a GPU; profile {prof.name} has none (gpu_gbs=0)")
        self.layout = layout_of(m)
        self.gpu_layer = self.layout.gpu_layers(placement.ngl)
        self.cpu_experts = self.layout.experts_on_host(placement.ngl, placement.n_cpu_moe)
        self.out_on_gpu = self.layout.output_on_gpu(placement.ngl)
        if placement.moe_cache_mib and not placement.n_cpu_moe:
            raise ModelError("--moe-cache-mib caches the experts --n-cpu-moe leaves in host memory: give --n-cpu-moe N > 0")
        cached = [i for i in m.moe_layers if self.gpu_layer[i] and self.cpu_experts[i]]
        self.banks = banks_for(m, cached, placement.moe_cache_mib * MiB) if placement.moe_cache_mib else []
        self._ids: dict = {}                 # decode: layer -> the token's experts
        self.bank_of = {i: b for b in self.banks for i in b.layers}

    # ---- memory ---------------------------------------------------------------------------------
    def memory(self) -> dict:
        """Device bytes by kind (the shared rule) and the CUDA context's reserve."""
        mem = self.layout.memory(self.p.ngl, self.p.n_cpu_moe, moe_cache_bytes=self.p.moe_cache_mib * MiB,
                                 n_ctx=self.n_ctx, n_ubatch=self.n_ubatch)
        reserve = LLAMA_RESERVE if self.p.ngl else 0
        return {**mem, "reserve": reserve, "total": mem["total"] + reserve}

    def check_fit(self) -> dict:
        mem = self.memory()
        if self.p.ngl and mem["total"] > self.prof.gpu_mem:
            over = mem["total"] - self.prof.gpu_mem
            cache = f"{mem['expert_cache'] / GiB:.2f} expert cache, " if mem["expert_cache"] else ""
            raise ModelError(f"llama.cpp {self.p.label(self.m.n_layers)} needs {mem['total'] / GiB:.2f} GiB of device "
                             f"memory ({mem['weights'] / GiB:.2f} weights, {mem['kv_cache'] / GiB:.2f} KV cache, {cache}"
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
                bank = self.bank_of.get(i)
                if moe and bank is not None and bank.slots >= m.k:
                    t += self._cached_moe(bank, i, self._ids[i], ph)
                elif moe and self.cpu_experts[i]:
                    t += 2 * prof.split_us * 1e-6 + eb / m.cpu_bw(prof) + MOE_CPU_OPS * prof.cpu_op_us * 1e-6
                    ph.cpu_bytes += eb
                    ph.miss_bytes += eb
                elif moe:
                    t += eb / prof.gpu_bw
                    ph.gpu_bytes += eb
            else:
                t += layer_cpu_s(m, prof, i, 1, ctx, KV_BYTES) + eb / m.cpu_bw(prof) + prof.cpu_layer_ops * prof.cpu_op_us * 1e-6
                ph.cpu_bytes += m.layer_bytes[i] + eb
                ph.miss_bytes += m.layer_bytes[i] + eb
        if self.out_on_gpu:
            t += m.out_bytes / prof.gpu_bw
            ph.gpu_bytes += m.out_bytes
        else:
            t += (prof.split_us * 1e-6 if on_gpu else 0) + m.out_bytes / m.cpu_bw(prof)
            ph.cpu_bytes += m.out_bytes
        return t

    def _cached_moe(self, bank: ExpertBank, i: int, experts, ph: Phase) -> float:
        """A small batch through the expert cache: the ids read back, misses uploaded, all on the GPU."""
        m, prof = self.m, self.prof
        eb = m.expert_bytes[i]
        t = prof.split_us * 1e-6                         # the ids read back to the host
        for e in experts:
            if bank.lookup((i, int(e)), admit=True):
                ph.hits += 1
            else:
                ph.misses += 1
                t += prof.h2d_latency_us * 1e-6 + eb / prof.h2d_bw
                ph.h2d_bytes += eb
                ph.miss_bytes += eb
        t += len(experts) * eb / prof.gpu_bw
        ph.gpu_bytes += len(experts) * eb
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
            bank = self.bank_of.get(i)
            if not self.cpu_experts[i]:
                t += roofline(ebytes, eflops, prof.gpu_bw, prof.gpu_flops)
                ph.gpu_bytes += ebytes
            elif bank is not None and bank.slots >= m.k and T <= MOE_CACHE_MAX_BATCH:
                t += self._cached_moe(bank, i, np.unique(ids[:, j]), ph) + roofline(0, eflops, prof.gpu_bw, prof.gpu_flops)
            elif offload:                     # op offload: the used experts cross the link, then the GPU computes
                # the expert cache, read-only: cached experts copied device to device, the rest from host memory
                held = 0 if bank is None else sum(bank.lookup((i, int(e)), admit=False) for e in np.unique(ids[:, j]))
                ph.hits, ph.misses = ph.hits + held, ph.misses + (used - held if bank is not None else 0)
                hb = held * m.expert_bytes[i]
                t += (ebytes - hb) / prof.h2d_bw + 3 * prof.h2d_latency_us * 1e-6 + 2 * hb / prof.gpu_bw
                t += roofline(ebytes, eflops, prof.gpu_bw, prof.gpu_flops)
                ph.h2d_bytes += ebytes - hb
            else:
                t += roofline(ebytes, eflops, m.cpu_bw(prof), prof.cpu_flops) + MOE_CPU_OPS * prof.cpu_op_us * 1e-6
                t += 2 * prof.split_us * 1e-6 if g else 0
                ph.cpu_bytes += ebytes
        # the head: the last position's logits only
        t += m.out_bytes / (prof.gpu_bw if self.out_on_gpu else m.cpu_bw(prof))
        return t

    def run(self, progress=None, warm: bool = False) -> dict:
        """`warm`: the first sequence only warms the expert cache (a server), as for our runtime."""
        self.check_fit()
        pre, dec = Phase(), Phase()
        for n, seq in enumerate(self.routing.sequences):
            if warm and n == 0:
                pre_, dec_ = Phase(), Phase()
            else:
                pre_, dec_ = pre, dec
            for lo in range(0, seq.n_prompt, self.n_ubatch):
                hi = min(lo + self.n_ubatch, seq.n_prompt)
                pre_.seconds += self._prefill_ubatch(seq.ids[lo:hi], lo, pre_)
            pre_.tokens += seq.n_prompt
            for pos in range(seq.n_prompt, len(seq.ids)):
                self._ids = {layer: seq.ids[pos, j] for j, layer in enumerate(self.m.moe_layers)}
                dec_.seconds += self._decode_token(pos, dec_)
            dec_.tokens += seq.n_decode
            if progress is not None:
                progress.update(1)
        return {"prefill": pre, "decode": dec}


def fits(m: SimModel, prof, p: Placement, n_ctx: int) -> bool:
    return LlamaCppSim(m, prof, None, p, n_ctx).memory()["total"] <= prof.gpu_mem


def free_mib(m: SimModel, prof, p: Placement, n_ctx: int) -> int:
    """Device memory a placement leaves unused, in whole MiB (what --moe-cache-mib can take)."""
    return max(0, int((prof.gpu_mem - LlamaCppSim(m, prof, None, p, n_ctx).memory()["total"]) // MiB))


def placements(m: SimModel, prof, n_ctx: int, n_ubatch: int = 512) -> dict:
    """llama.cpp's modes that fit the profile: all on the CPU, the most layers (--ngl), and the fewest
    expert layers on the CPU (--n-cpu-moe); None where a mode does not fit at all."""
    L = m.n_layers
    out = {"cpu": Placement(0, 0, n_ubatch=n_ubatch)}
    if not prof.has_gpu:
        return out
    full = Placement(L + 1, 0, n_ubatch=n_ubatch)
    if fits(m, prof, full, n_ctx):
        out["gpu"] = full
        return out
    out["ngl"] = next((p for n in range(L, 0, -1) if fits(m, prof, p := Placement(n, 0, n_ubatch=n_ubatch), n_ctx)), None)
    out["n_cpu_moe"] = next((p for n in range(0, L + 1)
                             if fits(m, prof, p := Placement(L + 1, n, n_ubatch=n_ubatch), n_ctx)), None)
    return out


def with_moe_cache(m: SimModel, prof, p: Placement, n_ctx: int) -> Placement | None:
    """`p` with an expert cache of all the device memory it leaves (--moe-cache-mib at its largest)."""
    mib = free_mib(m, prof, p, n_ctx)
    return Placement(p.ngl, p.n_cpu_moe, mib, p.n_ubatch) if p.n_cpu_moe and mib else None


def moe_cache_placements(m: SimModel, prof, n_ctx: int, n_ubatch: int = 512, steps: int = 4) -> list:
    """Candidates for llama.cpp's expert cache: from the fewest CPU expert layers that fit to all of them,
    each with the rest of the device memory as cache (more CPU layers free memory for a larger cache
    over more layers); `steps` + 1 points."""
    first = placements(m, prof, n_ctx, n_ubatch).get("n_cpu_moe")
    if first is None:
        return []
    L, lo = m.n_layers, first.n_cpu_moe
    ns = sorted({max(1, lo + (L - lo) * s // steps) for s in range(steps + 1)})
    out = [with_moe_cache(m, prof, Placement(L + 1, n, n_ubatch=n_ubatch), n_ctx) for n in ns]
    return [p for p in out if p is not None]
