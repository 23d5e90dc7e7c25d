"""Inputs (model, routing, profile), budgets, one simulated configuration, sweeps."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ModelError
from ..memory import default_n_batch, fit_cache, plan
from ..runtime.cache import slots_for_budget
from .costs import SimModel
from .llamacpp import LlamaCppSim, Placement, free_mib, moe_cache_placements, placements
from .ours import OursSim
from .profile import GiB, Profile, parse_profile
from .routing import SyntheticRouting, TraceRouting, parse_synth, preset
from .shapes import VirtualModel, open_shape

GPU_MARGIN = 0.10          # memory.default_gpu_mem: 10% of the device (at least 1 GiB) left to CUDA


@dataclass
class Inputs:
    model: SimModel
    routing: object
    profile: Profile
    calibrated: bool | None = None      # synthetic routing: a calibrated preset?


def load_inputs(shape=None, trace=None, profile=None, prompt: int = 512, decode: int = 128, sequences: int = 1,
                routing: str | None = None, seed: int = 0, max_sequences: int | None = None) -> Inputs:
    """The model (a shape name, a GGUF or cache directory; with a trace and no shape, the embedded
    default model if the trace was recorded on it), the routing (the trace, else synthetic) and the profile."""
    prof = parse_profile(profile)
    calibrated = None
    if trace is not None:
        from ..predict.trace import Trace
        tr = Trace(trace)
        if shape is None:
            from ..paths import DEFAULT_MODEL
            shape = DEFAULT_MODEL
        model = open_shape(shape)
        _check_trace(tr, model)
        rt = TraceRouting(tr, max_sequences)
    else:
        if shape is None:
            raise ModelError("give --shape NAME|MODEL.gguf (synthetic routing) or --trace TRACE")
        model = open_shape(shape)
        cfg = model.config
        params, calibrated = preset(str(shape))
        params = parse_synth(routing, params.__class__(**{**params.__dict__, "seed": seed}))
        if prompt < 0 or decode < 1 or sequences < 1:
            raise ModelError("--prompt must be >= 0, --decode and --sequences >= 1")
        rt = SyntheticRouting(cfg.n_experts, cfg.n_experts_used, cfg.moe_layers, cfg.n_layers, params,
                              n_prompt=prompt, n_decode=decode, n_sequences=sequences)
    return Inputs(SimModel.of(model), rt, prof, calibrated)


def _check_trace(tr, model) -> None:
    cfg = model.config
    want = {"n_layers": cfg.n_layers, "n_experts": cfg.n_experts, "n_experts_used": cfg.n_experts_used,
            "moe_layers": list(cfg.moe_layers)}
    got = {k: tr.identity.get(k) for k in want}
    diffs = [f"{k} {got[k]!r} != {want[k]!r}" for k in want if got[k] != want[k]]
    if diffs:
        raise ModelError(f"trace {tr.path} does not fit {getattr(model, 'path', 'the model')} "
                         f"({'; '.join(diffs)}): pass the traced model's GGUF or shape with --shape")
    if not isinstance(model, VirtualModel):    # a real file: the routers must be the traced ones
        tr.check_model(model)


def usable_gpu_mem(prof: Profile) -> int:
    """What our Engine takes by default on that device: memory.default_gpu_mem with free == total."""
    return int(prof.gpu_mem - max(GPU_MARGIN * prof.gpu_mem, GiB))


def ours_budget(inp: Inputs, cache_rate=None, gpu_mem=None, n_ctx: int = 4096, n_batch: int | None = None) -> dict:
    """Slots, prefill chunk and device memory of our Engine: --cache-rate, --gpu-mem, or fitted to the
    profile's GPU as Engine(gpu_mem=default) fits it; refuses what does not fit the profile. n_batch
    None: the Engine's default for that budget (memory.default_n_batch)."""
    m, prof = inp.model, inp.profile
    model, layout = m.model, m.layout
    if n_batch is None:
        device_budget = None if prof.emulated or not prof.has_gpu else (
            usable_gpu_mem(prof) if gpu_mem is None else int(gpu_mem))
        n_batch = default_n_batch(model, "cuda", n_ctx, None if cache_rate is not None else device_budget)
    if cache_rate is not None:
        n = slots_for_budget(layout, m.k, cache_rate=cache_rate)
        what = f"--cache-rate {cache_rate}"
    else:
        if prof.emulated or not prof.has_gpu:
            raise ModelError(f"profile {prof.name} has no GPU memory to fit: give --cache-rate")
        budget = usable_gpu_mem(prof) if gpu_mem is None else int(gpu_mem)
        what = f"--gpu-mem {budget / GiB:.2f} GiB" if gpu_mem is not None else "the profile's GPU"
        if gpu_mem is not None and budget > prof.gpu_mem:
            raise ModelError(f"--gpu-mem {budget / GiB:.2f} GiB is {(budget - prof.gpu_mem) / GiB:.2f} GiB more than "
                             f"the profile's {prof.gpu_mem_gb:g} GiB")
        arena = fit_cache(model, "cuda", n_ctx, n_batch, budget)
        n = len(layout.keys) if arena is None else slots_for_budget(layout, m.k, cache_mem=arena)
    n = min(n, len(layout.keys))
    mem = plan(model, "cuda", n_ctx, n_batch, None if n >= len(layout.keys) else n)
    if prof.has_gpu and not prof.emulated:
        limit = usable_gpu_mem(prof) if gpu_mem is None else int(gpu_mem)
        if mem["total"] > limit:
            over = mem["total"] - limit
            raise ModelError(f"promoe with {what} needs {mem['total'] / GiB:.2f} GiB of device memory (resident "
                             f"{mem['resident'] / GiB:.2f}, KV cache {mem['kv_cache'] / GiB:.2f}, expert cache "
                             f"{mem['expert_arena'] / GiB:.2f}, workspace {mem['workspace'] / GiB:.2f}, prefill activations "
                             f"{mem['activations'] / GiB:.2f} at --n-batch {n_batch}): "
                             f"{over / GiB:.2f} GiB ({over / 2**20:,.0f} MiB) more than the {limit / GiB:.2f} GiB "
                             f"available on the profile's {prof.gpu_mem_gb:g} GiB GPU")
    return {"slots": n, "cache_rate": n / len(layout.keys), "memory": mem, "n_batch": n_batch}


def _placement(inp: Inputs, ngl, n_cpu_moe, n_ctx: int, n_ubatch: int, moe_cache_mib=None) -> Placement:
    m, prof, L = inp.model, inp.profile, inp.model.n_layers
    if "auto" in (str(ngl), str(n_cpu_moe)):
        found = placements(m, prof, n_ctx, n_ubatch)
        if "gpu" in found:
            if moe_cache_mib is not None:
                raise ModelError(f"the whole model fits the profile's {prof.gpu_mem_gb:g} GiB on the GPU: no expert "
                                 "lives in host memory for --moe-cache-mib to cache")
            return found["gpu"]
        p = found.get("n_cpu_moe" if str(n_cpu_moe) == "auto" else "ngl")
        if p is None:
            raise ModelError(f"no llama.cpp placement of that kind fits the profile's {prof.gpu_mem_gb:g} GiB")
    elif n_cpu_moe is not None or ngl is not None:
        if ngl is not None and int(ngl) < 0:
            raise ModelError(f"--ngl {int(ngl)} is negative")
        n = 0 if n_cpu_moe is None else int(n_cpu_moe)
        if not 0 <= n <= L:
            raise ModelError(f"--n-cpu-moe {n}: 0..{L}")
        p = Placement(L + 1 if ngl is None else min(int(ngl), L + 1), n, n_ubatch=n_ubatch)
    else:
        p = Placement(0, 0, n_ubatch=n_ubatch)
    if moe_cache_mib is None:
        return p
    if not p.n_cpu_moe:
        raise ModelError("--moe-cache-mib caches the experts --n-cpu-moe leaves in host memory: give --n-cpu-moe N > 0 "
                         "(or auto)")
    mib = free_mib(m, prof, p, n_ctx) if str(moe_cache_mib) == "auto" else int(moe_cache_mib)
    if mib < 1:
        raise ModelError(f"--moe-cache-mib {moe_cache_mib}: {p.label(L)} leaves no device memory for an expert cache")
    return Placement(p.ngl, p.n_cpu_moe, mib, n_ubatch)


def llamacpp_modes(inp: Inputs, n_ctx: int = 4096, ubatches=(512, 2048, 4096), warm: bool = False) -> list[dict]:
    """Every llama.cpp mode that fits the profile, simulated: all on the CPU, --ngl and --n-cpu-moe at their
    most, --n-cpu-moe with --moe-cache-mib (a few splits between resident experts and cache), each at
    every -ub in `ubatches` whose compute buffers fit (an -ub longer than every prompt adds nothing)."""
    longest = max(s.n_prompt for s in inp.routing.sequences)
    ubs = sorted({min(u, max(longest, 1)) for u in ubatches})
    seen, rows = set(), []
    for ub in ubs:
        found = [p for p in placements(inp.model, inp.profile, n_ctx, ub).values() if p is not None]
        found += moe_cache_placements(inp.model, inp.profile, n_ctx, ub)
        for p in found:
            if p in seen:
                continue
            seen.add(p)
            rows.append(_run_llamacpp(inp, p, n_ctx, warm=warm))
    return rows


def best(rows: list[dict], phase: str) -> dict:
    """The fastest row for `phase` (decode or prefill)."""
    return max(rows, key=lambda r: r[f"{phase}_tok_s"])


def _run_llamacpp(inp: Inputs, place: Placement, n_ctx: int, progress=None, warm: bool = False) -> dict:
    m = inp.model
    sim = LlamaCppSim(m, inp.profile, inp.routing, place, n_ctx)
    mem = sim.check_fit()
    res = sim.run(progress, warm=warm)
    extra = {"ngl": place.ngl, "n_cpu_moe": place.n_cpu_moe, "moe_cache_mib": place.moe_cache_mib,
             "n_ubatch": place.n_ubatch, "device_memory": mem, "warm": warm}
    return summarize(inp, "llamacpp", place.label(m.n_layers) + (", warm cache" if warm and place.moe_cache_mib else ""),
                     res, extra)


def simulate(shape=None, trace=None, profile=None, engine: str = "promoe", policy: str = "lru",
             predictor: str = "none", cpu_experts: str = "auto", cache_rate=None, gpu_mem=None, ngl=None,
             n_cpu_moe=None, moe_cache_mib=None, n_ctx: int = 4096, n_batch: int | None = None, n_ubatch: int = 512,
             lookahead: int = 1,
             prompt: int = 512, decode: int = 128, sequences: int = 1, routing: str | None = None, seed: int = 0,
             inputs: Inputs | None = None, progress: bool = False, warm: bool = False) -> dict:
    """One configuration; returns the summary dict (decode_tok_s, prefill_tok_s, ...). `warm`: our cache
    carries over between sequences (a server) and the first sequence only warms it."""
    inp = inputs or load_inputs(shape, trace, profile, prompt, decode, sequences, routing, seed)
    m, prof = inp.model, inp.profile
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(inp.routing.sequences), desc="simulate", unit="seq", leave=False)
    try:
        if engine == "promoe":
            if ngl is not None or n_cpu_moe is not None or moe_cache_mib is not None:
                raise ModelError("--ngl / --n-cpu-moe / --moe-cache-mib are llama.cpp's: use them with --engine llamacpp")
            budget = ours_budget(inp, cache_rate, gpu_mem, n_ctx, n_batch)
            sim = OursSim(m, prof, inp.routing, policy, predictor, cpu_experts, budget["slots"], lookahead,
                          budget["n_batch"])
            res = sim.run(bar, warm=warm)
            mode = ("all experts resident" if sim.all_resident else
                    f"{policy}+{predictor}, cpu-experts {cpu_experts}, {budget['slots']} slots ({budget['cache_rate']:.0%})"
                    ) + f", --n-batch {budget['n_batch']}" + (", warm cache" if warm and not sim.all_resident else "")
            extra = {"slots": budget["slots"], "cache_rate": round(budget["cache_rate"], 4), "n_batch": budget["n_batch"],
                     "device_memory": budget["memory"], "policy": policy, "predictor": predictor,
                     "cpu_experts": cpu_experts, "warm": warm}
        elif engine == "llamacpp":
            place = _placement(inp, ngl, n_cpu_moe, n_ctx, n_ubatch, moe_cache_mib)
            return _run_llamacpp(inp, place, n_ctx, bar, warm)
        elif engine == "freetoken":
            from .freetoken import FreeTokenSim
            if prof.emulated or not prof.has_gpu:
                raise ModelError(f"--engine freetoken needs a profile with a GPU; {prof.name} has none")
            sim = FreeTokenSim(m, prof, inp.routing, n_ctx, n_ubatch)
            res = sim.run(bar, warm=warm)
            mem = sim.memory()
            mode = (f"FreeToken-like: LRU per layout ({mem['expert_cache'] / GiB:.2f} GiB), link/CPU split, "
                    f"double-buffered prefill" + (", warm cache" if warm else ""))
            extra = {"device_memory": mem, "n_ubatch": n_ubatch, "warm": warm}
        else:
            raise ModelError(f"--engine {engine!r}: promoe, llamacpp or freetoken")
    finally:
        if bar is not None:
            bar.close()
    return summarize(inp, engine, mode, res, extra)


def decode_bound(prof: Profile, ph, m: SimModel, layer_s: float = 0.0) -> float | None:
    """The fastest decode the same hits and misses allow: the device streams what it reads while the
    link and the CPU share the missed bytes, both busy all the time:
    max(device bytes / device bandwidth, missed bytes / (link + CPU bandwidth)) per token.
    `layer_s`: a fixed device cost per token added to the device side (the engine's per-layer cost x
    layers: launches and small ops that no placement removes)."""
    if not ph.tokens:
        return None
    device = ph.gpu_bytes / ph.tokens / prof.gpu_bw + layer_s if prof.has_gpu else 0.0
    host = ph.miss_bytes / ph.tokens / ((prof.h2d_bw if prof.has_gpu else 0.0) + m.cpu_bw(prof))
    t = max(device, host)
    return 1 / t if t > 0 else None


def summarize(inp: Inputs, engine: str, mode: str, res: dict, extra: dict) -> dict:
    pre, dec = res["prefill"], res["decode"]

    def rate(n, s):
        return n / s if s > 0 else float("inf") if n else 0.0

    def hit(ph):
        n = ph.hits + ph.misses
        return ph.hits / n if n else None
    out = {"engine": engine, "mode": mode, "model": inp.model.name, "profile": inp.profile.name,
           "routing": inp.routing.label, "simulated": True,
           "decode_tok_s": rate(dec.tokens, dec.seconds), "prefill_tok_s": rate(pre.tokens, pre.seconds),
           "decode_tokens": dec.tokens, "prefill_tokens": pre.tokens,
           "decode_hit_rate": hit(dec), "prefill_hit_rate": hit(pre),
           "decode_stall_share": dec.wait_copy_s / dec.seconds if dec.seconds else 0.0,
           "decode_cpu_wait_share": dec.wait_cpu_s / dec.seconds if dec.seconds else 0.0,
           "prefill_stall_share": pre.wait_copy_s / pre.seconds if pre.seconds else 0.0}
    out["decode_bound_tok_s"] = decode_bound(inp.profile, dec, inp.model)
    out["decode_of_bound"] = out["decode_tok_s"] / out["decode_bound_tok_s"] if out["decode_bound_tok_s"] else None
    # the same bound with our fixed per-layer cost on the device side: what placement alone could reach
    out["decode_bound_layer_cost_tok_s"] = (
        decode_bound(inp.profile, dec, inp.model, inp.model.n_layers * inp.profile.ours_layer_us * 1e-6)
        if engine == "promoe" and inp.profile.has_gpu else None)
    for name, ph in (("decode", dec), ("prefill", pre)):
        n = max(ph.tokens, 1)
        out[f"{name}_bytes_per_token"] = {"h2d": ph.h2d_bytes / n, "cpu_read": ph.cpu_bytes / n,
                                          "gpu_read": ph.gpu_bytes / n}
        out[f"{name}_cpu_experts_per_token"] = ph.cpu_experts / n
        out[f"{name}_split_experts_per_token"] = ph.split_experts / n
    if inp.calibrated is not None:
        out["routing_calibrated"] = inp.calibrated
    return {**out, **extra}


def sweep(inp: Inputs, configs: list[dict], rates=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
          n_ctx: int = 4096, n_batch: int | None = None, n_ubatch: int = 512, progress: bool = True) -> list[dict]:
    """tok/s against device memory: every config of our runtime at each cache rate that fits, and
    llama.cpp's --n-cpu-moe from all-on-CPU to none (and -ngl when a GPU cannot hold the rest)."""
    from tqdm import tqdm
    m = inp.model
    jobs = [("promoe", c, r) for c in configs for r in rates] + \
           [("llamacpp", {"n_cpu_moe": n}, None) for n in range(m.n_layers + 1)]
    rows = []
    for engine, c, r in tqdm(jobs, desc="sweep", unit="run", disable=not progress):
        try:
            if engine == "promoe":
                res = simulate(engine="promoe", cache_rate=r, n_ctx=n_ctx, n_batch=n_batch, inputs=inp, **c)
            else:
                res = simulate(engine="llamacpp", n_ctx=n_ctx, n_ubatch=n_ubatch, inputs=inp, **c)
        except ModelError:
            continue                                  # a budget that does not fit the profile
        res["device_gib"] = res["device_memory"]["total"] / GiB
        rows.append(res)
    return rows
