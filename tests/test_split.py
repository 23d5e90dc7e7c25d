"""An expert split by rows: the CPU computes the first rows of its intermediate layer (gate's and up's
rows, down's columns) from host memory while the device computes the rest from a partial copy (zeros
where the CPU's rows are), and the combine adds both.

Oracles: gguf-py's dequantization of the expert's bytes in the file (each part against the float64
product over its own rows), the placement's finish time computed here from its definition, and the
all-resident run (a split changes only the order of one dot product's additions).
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from gguf.quants import dequantize

import oracle
from kernel_emu import Emu, build_emulator
from promoe_gguf import Engine, open_model
from promoe_gguf.backends.base import expert_part, matrix_at, split_unit
from promoe_gguf.backends.cpu import CpuBackend
from promoe_gguf.runtime.cost import CostModel
from promoe_gguf.runtime.host_store import HostStore
from promoe_gguf.runtime.link import Link
from promoe_gguf.runtime.placement import Miss, cpu_share, place

TOKENS = np.random.default_rng(5).integers(0, 256, 20).tolist()


def _dequantized(model, key):
    """The expert's (gate, up, down) as float64 arrays, from the file's bytes by gguf-py."""
    out = []
    for m in model.expert_matrices(*key):
        out.append(dequantize(np.asarray(model.matrix_bytes(*key, m.matrix)), m.qtype).reshape(m.shape).astype(np.float64))
    return out


def _rows(x, gate, up, down, lo, hi):
    """The expert's output from intermediate rows [lo, hi) only, in float64."""
    g, u = x @ gate[lo:hi].T, x @ up[lo:hi].T
    return (g / (1 + np.exp(-g)) * u) @ down[:, lo:hi].T


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_0", "IQ4_NL", "F16"])
def test_each_side_of_a_split_computes_its_own_rows(test_models, quant):
    """The CPU's part (ggml over a pitched view of down's columns) and the device's part (the full
    kernels over a slot the split's pieces filled: zeros for the CPU's rows, over bytes that were
    garbage) each equal the float64 product over their rows of gguf-py's dequantized weights."""
    model = open_model(test_models[("llama", quant, "default")])
    store = HostStore(model)
    key = store.keys[5]
    mats = store.matrices(key)
    unit = split_unit(mats)
    ff = mats[2].cols
    assert unit and ff // unit >= 2
    lo = (ff // unit // 3) * unit                       # the CPU takes a third of the rows, rounded to down's block
    gate, up, down = _dequantized(model, key)
    x = np.random.default_rng(3).standard_normal((2, mats[0].cols)).astype(np.float32)
    be = CpuBackend(n_threads=1)
    bound = 1e-3 if quant == "F16" else 2e-2             # ggml's 16-bit / 8-bit activations

    cpu = be.expert_ffn(torch.from_numpy(x), *expert_part(mats, 0, lo)).numpy()
    assert oracle.rel_l2(cpu, _rows(x, gate, up, down, 0, lo)) < bound

    slot = torch.full((store.slot_bytes,), 0x7B, dtype=torch.uint8)          # not zeros: the pieces must write them
    link = Link("cpu")                                  # as the copy thread: strided rows packed, then copied
    pieces = store.store_layout.part_pieces(key, lo)
    assert any(p.rows > 1 and not p.zero for p in pieces)
    for piece in pieces:
        link.copy(piece.view(slot, 0), None if piece.zero else store.piece(key, piece))
    device = be.expert_ffn(torch.from_numpy(x), *(matrix_at(slot, off, m.matrix, m.qtype, m.shape)
                                                  for m, off in store.layout[key])).numpy()
    assert oracle.rel_l2(device, _rows(x, gate, up, down, lo, ff)) < bound
    whole = be.expert_ffn(torch.from_numpy(x), *mats).numpy()
    assert oracle.rel_l2(cpu + device, whole) < bound
    be.close()


def _finish(misses, cpu: set, split: dict, copy_seconds, handoff):
    """A layer's finish time by the definition: the CPU runs its misses and split shares back to back
    (a hand-off each); the link carries the whole misses in order, then a split's share, each behind
    the precise copies queued before it, and the device computes each when it lands (a split's whole
    slot: zeros where the CPU's rows are)."""
    t_cpu, link_bytes, t_link = 0.0, 0, 0.0
    on_link = [m for m in misses if m.key not in cpu and m.key not in split] + [m for m in misses if m.key in split]
    for m in misses:
        if m.key in cpu or m.key in split:
            t_cpu += (1.0 if m.key in cpu else split[m.key] / m.parts) * m.cpu_s + handoff
    for m in on_link:
        share = 1.0 - split.get(m.key, 0) / m.parts if m.key in split else 1.0
        link_bytes += share * m.copy_bytes
        t_link = max(t_link, copy_seconds(link_bytes + m.queued_bytes) + m.device_s)
    return max(t_cpu, t_link)


def test_one_miss_as_fast_on_either_side_splits_in_half():
    copy = CostModel(link_bps=1e9).copy_seconds
    miss = Miss((0, 3), cpu_s=0.010, copy_bytes=10_000_000, device_s=0.0, queued_bytes=0, parts=8)
    p = place([miss], copy)
    assert p.split == {(0, 3): 4} and not p.cpu
    assert _finish([miss], p.cpu, p.split, copy, 0.0) == pytest.approx(0.005)


def test_placement_never_finishes_later_than_whole_experts():
    """Random layers: the split never makes the layer later than cpu_share's whole-expert choice, and
    without splittable misses it is that choice."""
    rng = random.Random(1)
    for _ in range(500):
        copy = CostModel(link_bps=rng.uniform(0.5e9, 4e9), link_latency_s=rng.uniform(0, 2e-5)).copy_seconds
        handoff, queued = rng.uniform(0, 1e-4), rng.choice([0, 0, 2_000_000])     # earlier layers' copies still queued
        misses = [Miss((0, e), rng.uniform(1e-4, 5e-3), rng.randint(1, 8) * 1_000_000, rng.uniform(0, 2e-4),
                       queued, rng.choice([0, 2, 3, 8, 56]))
                  for e in range(rng.randint(1, 6))]
        whole = cpu_share(misses, copy, handoff)
        p = place(misses, copy, handoff)
        assert _finish(misses, p.cpu, p.split, copy, handoff) <= _finish(misses, whole, {}, copy, handoff) + 1e-12
        assert all(0 < j < next(m.parts for m in misses if m.key == k) for k, j in p.split.items())
        assert len(p.split) <= 1 and not (p.cpu & set(p.split))
        unsplittable = [Miss(m.key, m.cpu_s, m.copy_bytes, m.device_s, m.queued_bytes, 0) for m in misses]
        assert place(unsplittable, copy, handoff).cpu == cpu_share(unsplittable, copy, handoff)
        assert not place(unsplittable, copy, handoff).split


def _force_even_split(eng) -> None:
    """A cost model under which one expert's CPU time equals its copy time: every lone miss splits
    in half (the measured one would split at whatever ratio this machine's timings give)."""
    src = eng.source
    assert not src.expert_cache.staging          # measured here the device is this CPU: a split cannot pay
    sig = CostModel.signature(m for m, _ in src.store.layout[src.store.keys[0]])
    cost = CostModel(link_bps=1e9, cpu_handoff_s=0.0)
    t = cost.copy_seconds(src.store.expert_bytes[src.store.keys[0]])
    cost.cpu_s[sig], cost.device_s[sig] = (t, t), (0.0, 0.0)
    src.cost = cost
    assert src.reserve_staging() == (2 if src.cpu_experts == "auto" else 0)   # whole: never splits


def _decode_logits(path, **kw):
    """Logits of TOKENS one token per step (every step a fused decode step), and the stats."""
    eng = Engine(path, n_ctx=64, n_batch=1, **kw)
    try:
        if kw.get("cache_rate"):
            _force_even_split(eng)
        return eng.logits(TOKENS), eng.stats
    finally:
        eng.close()


def test_engine_splits_misses_and_keeps_the_all_resident_result(test_models):
    """CPU device (ggml both sides): decode steps with split experts stay within float rounding of
    the all-resident run; `whole` never splits."""
    path = test_models[("llama", "Q8_0", "default")]
    ref, _ = _decode_logits(path, cpu_repack=False)
    got, st = _decode_logits(path, cache_rate=0.5, policy="lru", cpu_experts="auto", link="ratio=1")
    assert st["split_experts"] > 0, st
    err = oracle.rel_l2(got, ref)
    print(f"split experts {st['split_experts']}, whole on the CPU {st['cpu_experts']}: {err:.2e} from all resident")
    assert err < 1e-5
    _, whole = _decode_logits(path, cache_rate=0.5, policy="lru", cpu_experts="whole", link="ratio=1")
    assert whole["split_experts"] == 0 and whole["cpu_experts"] > 0


@pytest.fixture(scope="module")
def emu():
    return Emu(build_emulator())


def test_cuda_path_split_is_within_the_bound(test_models, emu):
    """The CUDA code path (its kernels' host build): moe_pairs computes the split expert from its
    staging slot and moe_combine adds the CPU's rows to it; within the native bound of the
    all-resident CUDA-path run (fp32 activations there, ggml's 8-bit ones on the CPU)."""
    path = test_models[("llama", "Q8_0", "default")]
    ref, _ = _decode_logits(path, launcher=emu.launcher, activations="f32", kv_type="f32")
    got, st = _decode_logits(path, launcher=emu.launcher, activations="f32", kv_type="f32", cache_rate=0.5,
                             policy="lru", cpu_experts="auto", link="ratio=1")
    assert st["split_experts"] > 0, st
    err = oracle.rel_l2(got, ref)
    print(f"CUDA path, split experts {st['split_experts']}: {err:.2e} from all resident")
    assert err < 5e-2
