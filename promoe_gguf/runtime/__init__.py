"""Expert cache, host store, transfer engine, prefetcher, policies and stats.

`make_source` wires them into the expert source an Engine computes through.
"""
from __future__ import annotations

import logging
import time

import torch

from ..backends import ExpertStack, StackedMatrix
from ..errors import ModelError, ParameterError, clip
from ..model.experts import ExpertSource, ResidentSource
from ..predict import make_predictor
from .cache import READY, ExpertCache, make_policy, slots_for_budget
from .cost import CostModel, measure
from .cpu_pool import CpuExpertPool
from .host_store import HostStore
from .link import Link, parse_link
from .prefetcher import Prefetcher
from .placement import CPU_EXPERTS
from .source import CachedExpertSource
from .stats import Stats
from .transfer import HIGH, TransferEngine

log = logging.getLogger("promoe.runtime")


def make_source(model, device, cache_rate=None, cache_mem=None, policy="lru", predictor="none", link=None,
                lookahead: int = 1, use_counts=None, routes=None, progress: bool = False,
                wait_timeout: float = 60.0, fault=None, cpu_experts: str = "auto", cpu_threads: int = 1,
                cpu_fault=None, in_place: bool = False, profile=None) -> ExpertSource:
    """Every expert resident when no budget is given (read where the file maps them when
    `in_place`, the CPU backend's way); else the cache runtime.

    cpu_experts: "auto" (the cost model sends misses to the CPU pool when that is faster than a
    copy, or splits one by rows so the CPU and the link finish together), "whole" (auto, but a miss
    runs whole on one side), "all" (every miss on the CPU), "off" (misses are copied: the ProMoE runtime).
    use_counts: {(layer, expert): uses} for the static policy (`profile`: its earlier name, still
    taken); routes: a recorded routing for the
    oracle predictor; fault / cpu_fault: tests only, called in the copy thread / CPU worker.
    """
    if profile is not None:
        if use_counts is not None:
            raise ParameterError("use_counts", "given twice (profile is its earlier name)")
        use_counts = profile
    if cpu_experts not in CPU_EXPERTS:
        raise ParameterError("cpu_experts", f"{clip(cpu_experts)} is not one of {', '.join(CPU_EXPERTS)}")
    if cache_rate is None and cache_mem is None:
        if predictor not in (None, "none") or policy != "lru" or link:
            log.info("every expert is resident: policy, predictor and link are not used")
        return ResidentSource(model, device, in_place)
    device = torch.device(device)
    cfg = model.config
    pred = make_predictor(predictor, model, lookahead, routes)  # first: a bad predictor file leaves no copy thread
    store = HostStore(model, pin=device.type == "cuda", progress=progress)
    n_slots = slots_for_budget(store, cfg.n_experts_used, cache_rate, cache_mem)
    cache = ExpertCache(n_slots, store.slot_bytes, device, make_policy(policy, cfg.n_experts_used, use_counts),
                        cfg.moe_layers)
    spec = parse_link(link)
    stats = Stats()
    transfer = TransferEngine(store, cache, Link(device, spec.get("bandwidth"), spec.get("latency", 0.0), spec.get("jitter", 0.0)),
                              stats, fault=fault)
    prefetcher = Prefetcher(pred, transfer, cache, stats, cfg.n_layers, cfg.n_experts_used) if pred else None
    pool = None
    if cpu_experts != "off":
        try:
            pool = CpuExpertPool(cpu_threads, fault=cpu_fault)
        except ModelError as e:              # no llama.cpp / ggml on this machine: misses are copied
            log.warning("CPU experts are off: %s", e)
            cpu_experts = "off"
    source = CachedExpertSource(model, device, store, cache, transfer, stats, prefetcher, wait_timeout,
                                cpu_pool=pool, cpu_experts=cpu_experts)
    source.link_ratio = spec.get("ratio")
    hot = cache.policy.hot_set(store.keys, n_slots)
    if hot:
        _preload_hot(source, hot, wait_timeout)
    return source


def _preload_hot(source: CachedExpertSource, hot: list, timeout: float) -> None:
    for key in hot:
        source.transfer.request(key, HIGH)
    deadline = time.monotonic() + timeout
    cache = source.expert_cache
    with cache.cv:
        while not all(k in cache.where and cache.where[k].state == READY for k in hot):
            if time.monotonic() > deadline:
                raise RuntimeError("static policy: hot experts were not loaded in time")
            cache.cv.wait(0.05)
        for k in hot:
            cache.keep(cache.where[k])


def calibrate_link_ratio(source: CachedExpertSource, decoder, experts, ratio: float, steps: int = 3) -> float:
    """Set the emulated bandwidth so one expert's copy takes `ratio` x one layer's decode compute.

    Decode compute is measured here, all experts resident, on this machine. Returns bytes/s.
    """
    resident = ResidentSource(source.model, source.device, decoder.backend.weights_in_place)
    experts.source = resident
    try:
        cache = decoder.new_cache(steps + 2)
        decoder.forward(torch.tensor([1]), cache)                # warm-up
        t0 = time.perf_counter()
        for _ in range(steps):
            decoder.forward(torch.tensor([1]), cache)
        per_layer = (time.perf_counter() - t0) / steps / source.model.config.n_layers
    finally:
        experts.source = source
    mean_expert = sum(source.store.expert_bytes.values()) / len(source.store.expert_bytes)
    bandwidth = mean_expert / (ratio * per_layer)
    source.transfer.link.bandwidth = bandwidth
    source.calibration = {"layer_decode_s": per_layer, "expert_bytes": mean_expert, "ratio": ratio,
                          "bandwidth": bandwidth}
    log.info("emulated link: one layer's decode compute %.3f ms, expert %.0f bytes, ratio %.1f -> %.3g MB/s",
             per_layer * 1e3, mean_expert, ratio, bandwidth / 1e6)
    return bandwidth


def attach(source, decoder, experts) -> None:
    """Called by the Engine once the decoder exists: link calibration needs the forward pass, and the
    cost model the calibrated link and the device backend."""
    if source.resident:
        return
    ratio = source.link_ratio
    if ratio:
        if source.device.type != "cpu":
            raise ParameterError("link", "ratio=R is a CPU emulation; on a GPU the real link is used")
        calibrate_link_ratio(source, decoder, experts, ratio)
    if source.cpu_pool is not None:
        source.cost = measure_costs(source, decoder.backend)
        log.info("cost model: %s", source.cost.describe())
        if source.reserve_staging():
            log.info("split experts on: %d cache slots kept as staging", len(source.expert_cache.staging))


def measure_costs(source: CachedExpertSource, backend) -> CostModel:
    """Probe the CPU pool, the device and (on CUDA) the real link on one expert per signature."""
    store, link = source.store, source.transfer.link
    if source.device.type == "cpu":       # emulation: the "device" runs the same ggml kernels as the pool
        cost = measure(store, source.cpu_pool, link)
        cost.device_s = dict(cost.cpu_s)
        return cost
    tmp = torch.empty(store.slot_bytes, dtype=torch.uint8, device=source.device)
    timing = {}

    def on_device(key, x):
        region = store.region(key)
        t0 = time.perf_counter()
        tmp[:region.numel()].copy_(region, non_blocking=True)
        torch.cuda.synchronize(source.device)
        timing.setdefault("copy", []).append((region.numel(), time.perf_counter() - t0))
        mats = [m for m, _ in store.layout[key]]
        offs = [off for _, off in store.layout[key]]
        one = ExpertStack(*(StackedMatrix(m.qtype, m.shape[0], m.shape[1], tmp.data_ptr() + o, store.slot_bytes, 1)
                            for m, o in zip(mats, offs)), owners=(tmp, tmp, tmp))
        T = x.shape[0]
        ids = torch.zeros((T, 1), dtype=torch.int64, device=source.device)
        backend.moe(x.to(source.device), one, ids, torch.ones((T, 1), device=source.device))
        torch.cuda.synchronize(source.device)
    cost = measure(store, source.cpu_pool, link, on_device)
    nbytes, secs = sum(n for n, _ in timing["copy"]), sum(t for _, t in timing["copy"])
    cost.link_bps = nbytes / secs                      # pinned host-to-device, as the copy thread sees it
    return cost


__all__ = ["make_source", "attach", "HostStore", "ExpertCache", "TransferEngine", "Prefetcher", "Link",
           "CachedExpertSource", "Stats"]
