"""The CUDA backend's whole code path, run on the CPU: the kernels of promoe_gguf/kernels/cuda built
for the host (tests/kernels_host, one fiber per CUDA thread) stand in for CuPy, so the launch plans,
slot tables, fused MoE decode, tiled prefill GEMMs, norms and the host synchronisations of a GPU
decode step all run here, on CPU tensors.

* the decode-step budget: device operations (aten ops through a torch dispatch mode, plus kernel
  launches) and host syncs per MoE layer of a Mixtral-layout model, with and without the cache;
* numerics: logits against stock llama.cpp on the dequantized twin (the same GGUF, every tensor
  dequantized to F32 by gguf-py), the oracle for a path that keeps fp32 activations.
What this cannot show: GPU timing, streams and events (scripts/gpu_check.sh on a GPU).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import oracle
from kernel_emu import Emu, build_emulator
from promoe_gguf import Engine

MAX_OPS_PER_LAYER = 30
# ops that only describe memory (no kernel), allocations included
FREE = {"view", "_unsafe_view", "slice", "select", "expand", "as_strided", "t", "transpose", "permute",
        "unsqueeze", "squeeze", "alias", "detach", "view_as_real", "view_as_complex", "unbind", "split",
        "empty", "empty_like", "empty_strided", "lift_fresh", "_reshape_alias", "reshape", "flatten"}
# ops that wait for the device on a GPU
SYNCING = {"_local_scalar_dense", "nonzero", "unique", "_unique2", "unique_consecutive", "masked_select",
           "item", "equal", "is_nonzero"}


@pytest.fixture(scope="module")
def emu():
    return Emu(build_emulator())


class Recorder(TorchDispatchMode):
    """Records every aten op with a kernel, and markers the test inserts (layer starts, launches,
    host syncs), in order."""

    def __init__(self):
        super().__init__()
        self.events = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        out = func(*args, **(kwargs or {}))
        noop = args and out is args[0] and not name.endswith("_")   # .to() to its own dtype, resolve_conj...
        if name not in FREE and not noop:
            self.events.append(("sync" if name in SYNCING else "op", name))
        return out


def _instrument(eng, rec: Recorder):
    """Markers: the start of each layer's attention, the output head, launches, routing-id syncs."""
    dec, be = eng.decoder, eng.backend
    attention, launch, to_host = dec.attention, be._launch, be.to_host

    def att(layer, h, step):
        rec.events.append(("layer", layer))
        return attention(layer, h, step)

    def lch(launches, op, qtype):
        rec.events.append(("launch", len(launches)))
        return launch(launches, op, qtype)

    def host(t):
        rec.events.append(("sync", "to_host"))
        return to_host(t)
    dec.attention, be._launch, be.to_host = att, lch, host
    check = dec.numerics.logits

    def logits_check(t):                              # after the output head: the step's logits check
        rec.events.append(("head", None))
        return check(t)
    dec.numerics.logits = logits_check


def _per_layer(events) -> list[dict]:
    """One record per layer, and a last one for the step's logits check (kind "head")."""
    layers, cur = [], None
    for kind, what in events:
        if kind in ("layer", "head"):
            cur = {"ops": [], "launches": 0, "syncs": []}
            layers.append(cur)
        elif cur is None:
            continue                                  # the step's preamble (embedding, positions)
        elif kind == "op":
            cur["ops"].append(what)
        elif kind == "launch":
            cur["launches"] += what
        else:
            cur["syncs"].append(what)
    return layers


@pytest.mark.parametrize("cache", [{}, {"cache_rate": 0.5, "policy": "promoe"}], ids=["resident", "cache"])
def test_decode_step_budget(test_models, emu, cache):
    """One decode token through the CUDA path: <= 30 device operations and exactly one host sync
    (the routing ids) per MoE layer of a Mixtral-layout model."""
    path = test_models[("llama", "Q4_K_M", "default")]
    eng = Engine(path, launcher=emu.launcher, n_ctx=32, **cache)
    try:
        kv = eng.decoder.new_cache(32)
        eng.decoder.forward(torch.tensor([1, 2, 3]), kv)                # prefill, warm
        eng.decoder.forward(torch.tensor([4]), kv)                      # first decode step: plans built
        rec = Recorder()
        _instrument(eng, rec)
        with rec:
            eng.decoder.forward(torch.tensor([5]), kv)
    finally:
        eng.close()
    *layers, head = _per_layer(rec.events)
    assert len(layers) == eng.config.n_layers
    # issue 13: the logits are checked for NaN/inf once per step (one sync, which the sampler's own
    # read of the token would wait for anyway)
    assert head["syncs"] == ["is_nonzero"] and len(head["ops"]) <= 3, head
    for i, L in enumerate(layers):
        n = len(L["ops"]) + L["launches"]
        print(f"layer {i}: {len(L['ops'])} aten ops + {L['launches']} launches = {n}; syncs {L['syncs']}; "
              f"ops {sorted(set(L['ops']))}")
        assert n <= MAX_OPS_PER_LAYER, (i, n, L["ops"])
        assert L["syncs"] == ["to_host"], (i, L["syncs"])


# Mixtral layout (Q4_K/Q8_0/Q5_K/Q6_K kernels), DeepSeek2 (MLA's per-head attn_k_b/attn_v_b through the
# batched matvec, shared experts, a dense layer), Qwen2-MoE (biases, gated shared expert, Q5_K/Q6_K)
CUDA_PATH_MODELS = [("llama", "Q4_K_M", "default"), ("deepseek2", "Q4_K_M", "default"),
                    ("qwen2moe", "Q5_K_M", "default")]


@pytest.mark.parametrize("key", CUDA_PATH_MODELS, ids=lambda k: "/".join(k))
def test_cuda_path_matches_dequantized_twin(test_models, factory, emu, key):
    """A 9-token prefill (more than 8 tokens: tiled dequantize + GEMM, expert by expert) then 2
    decode steps (matvec and the fused MoE kernels) against llama.cpp on the dequantized twin."""
    path = test_models[key]
    twin = path[:-len(".gguf")] + ".twin-f32.gguf"
    if not os.path.exists(twin):
        factory.dequantized_twin(path, twin)
    tokens = np.random.default_rng(3).integers(0, 256, 11).tolist()
    eng = Engine(path, launcher=emu.launcher, n_ctx=32)
    try:
        kv = eng.decoder.new_cache(32)
        out = [eng.decoder.forward(torch.tensor(tokens[:9]), kv)]
        out += [eng.decoder.forward(torch.tensor([t]), kv) for t in tokens[9:]]
        ours = torch.cat(out).numpy()
        assert not eng.backend.failed, eng.backend.failed
    finally:
        eng.close()
    ref = oracle.logits(twin, tokens, n_ctx=32, chunk=9, n_prefill=9, repack=False)
    err = oracle.rel_l2(ours, ref)
    print(f"{'/'.join(key)}: CUDA path vs llama.cpp on the dequantized twin {err:.2e}")
    assert err <= 1e-3, err


def test_kernel_failure_falls_back_to_torch(test_models, emu, caplog):
    """A launcher that fails for one quant type: a warning names the kernel and the type, that type
    runs through torch from then on, and the logits stay those of the working kernels (fp32 both)."""
    path = test_models[("llama", "Q4_K_M", "default")]
    tokens = [5, 6, 7]
    ref_eng = Engine(path, launcher=emu.launcher, n_ctx=16)
    ref = ref_eng.logits(tokens)

    def broken(launches, device):
        if any(ln.qtype is not None and ln.qtype.name == "Q8_0" for ln in launches):
            raise RuntimeError("simulated NVRTC compile error")
        emu.launcher(launches, device)
    eng = Engine(path, launcher=broken, n_ctx=16)
    with caplog.at_level("WARNING", logger="promoe.cuda"):
        got = eng.logits(tokens)
    assert ("matvec", 8) in eng.backend.failed                      # Q8_0 attn_k / attn_v
    assert any("matvec_q8_0" in r.message and "Q8_0" in r.message for r in caplog.records)
    assert oracle.rel_l2(got, ref) < 1e-5
