"""Memory is what we say it is: Engine.memory (summed over the tensors the Engine allocated) equals
the plan `promoe info` prints for the same settings, and the host store packs experts."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from kernel_emu import Emu, build_emulator
from promoe_gguf import Engine, open_model
from promoe_gguf.runtime.host_store import REGION_ALIGN, HostStore

MODELS = [("llama", "Q4_K_M", "default"), ("deepseek2", "Q4_K_M", "default"), ("qwen2moe", "Q4_K_M", "default"),
          ("llama", "Q4_K_M", "legacy")]


def _info(path, device: str, n_ctx: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "promoe_gguf.cli.main", "info", str(path), "--json", "--device", device,
                          "--n-ctx", str(n_ctx)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["memory"]


def _allocated(eng) -> dict:
    """Bytes of the tensors the Engine holds, counted from the tensors themselves."""
    W = eng.decoder.W
    resident = sum(m.data.numel() * m.data.element_size() for n, m in W.mats.items() if n not in W.vecs) \
        + sum(v.numel() * v.element_size() for v in W.vecs.values())
    kv = sum(t.numel() * t.element_size() for t in eng.kv_cache.k + eng.kv_cache.v)
    src = eng.source
    if not src.resident:
        arena = src.expert_cache.arena.numel()
    else:                      # packed device buffers [E, stride], or the bytes a stack addresses in the file map
        arena = sum(st.owners[0].numel() if st.owners[0].dim() == 2 else
                    sum(m.count * m.rows * m.row_bytes for m in (st.gate, st.up, st.down)) for st in src.stacks.values())
    return {"resident": resident, "kv_cache": kv, "expert_arena": arena}


@pytest.mark.parametrize("n_ctx", [96, 100])      # 100: not a multiple of the CPU's 32-position KV padding
@pytest.mark.parametrize("key", MODELS, ids=lambda k: "/".join(k))
def test_cpu_engine_memory_matches_info(test_models, key, n_ctx):
    path = test_models[key]
    plans = _info(path, "cpu", n_ctx)
    for budget, kw in (("all_resident", {}), ("cache_rate=0.5", {"cache_rate": 0.5})):
        eng = Engine(path, n_ctx=n_ctx, **kw)
        try:
            mem = eng.memory
            want = {k: v for k, v in plans[budget].items() if k != "slots"}
            assert mem == want, (budget, mem, want)
            got = _allocated(eng)
            assert got == {k: mem[k] for k in got}, (got, mem)
            assert eng.backend.workspace_bytes == mem["workspace"]
        finally:
            eng.close()


def test_cuda_engine_memory_matches_info(test_models):
    """The CUDA backend's plan (no KV padding, a dequantization tile as workspace), on its code path
    run on the CPU: the cache budget's numbers agree with `promoe info --device cuda`."""
    path = test_models[("llama", "Q4_K_M", "default")]
    plans = _info(path, "cuda", 96)
    emu = Emu(build_emulator())
    eng = Engine(path, n_ctx=96, cache_rate=0.5, launcher=emu.launcher)
    try:
        want = {k: v for k, v in plans["cache_rate=0.5"].items() if k != "slots"}
        assert eng.memory == want
        assert eng.backend.workspace_bytes == want["workspace"] > 0
    finally:
        eng.close()


def test_info_lists_only_budgets_the_engine_accepts(test_models):
    path = test_models[("qwen2moe", "Q4_K_M", "default")]        # 4 experts top-2, 2 MoE layers: 8 experts
    plans = _info(path, "cuda", 64)
    for name, p in plans.items():
        if name == "all_resident":
            continue
        rate = float(name.split("=")[1])
        Engine(path, n_ctx=64, cache_rate=rate).close()               # accepted: no ModelError
        assert p["slots"] >= 2


def test_host_store_packs_experts_at_their_own_size(test_models):
    """Each expert takes its own size (rounded to one region alignment), not the largest expert's."""
    path = test_models[("deepseek", "Q4_K_M", "narrow")]             # down Q5_0/Q8_0 per layer: sizes differ
    model = open_model(path)
    store = HostStore(model)
    own = sum(-(-sum(m.nbytes for m in model.expert_matrices(*k)) // 256) * 256 for k in model.expert_keys)
    assert store.nbytes <= own + len(model.expert_keys) * REGION_ALIGN
    for key in model.expert_keys:                                    # the bytes are the file's
        region = store.region(key).numpy()
        for m, off in store.layout[key]:
            assert region[off:off + m.nbytes].tobytes() == model.matrix_bytes(key[0], key[1], m.matrix).tobytes()


_KV_LOG = re.compile(r"llama_kv_cache: size =\s*([\d.]+) MiB \(\s*(\d+) cells,\s*(\d+) layers.*?K \(f16\):\s*([\d.]+) MiB, "
                     r"V \(f16\):\s*([\d.]+) MiB")


_RS_LOG = re.compile(r"llama_memory_recurrent: size =\s*([\d.]+) MiB")


@pytest.mark.parametrize("arch", ["llama", "qwen2moe", "qwen3moe", "olmoe", "deepseek", "granitemoe", "gpt-oss",
                                  "glm4moe", "deepseek2", "qwen35moe"])
def test_kv_cache_bytes_against_llama_cpps_allocation_log(test_models, arch):
    """The CUDA plan's fp16 KV cache (memory.kv_cache_bytes, what Engine.memory reports) against what
    llama.cpp allocates for the same file and context, read from its own log. Equal where both keep K
    and V per layer (gpt-oss: llama-cpp-python keeps its windowed layers' cache full size). Two known
    differences, asserted exactly: llama.cpp also allocates glm4moe's NextN block, which it never runs;
    for deepseek2's latent attention llama.cpp keeps one latent row per position (V is a view of it)
    where we keep the latent K row and a separate V row of kv_lora_rank. qwen35moe: K and V of its
    attention layers only, plus its recurrent layers' conv and delta-net states (llama.cpp's R and S)."""
    from promoe_gguf import memory
    from promoe_gguf.bench.quant_mix import captured_llama_log
    import llama_cpp
    key = (arch, "Q4_K_M", "default") if (arch, "Q4_K_M", "default") in test_models else (arch, "MXFP4_MOE", "default")
    n_ctx = 4096                       # MiB with two decimals: 0.25% or better at this size
    log: list[str] = []
    with captured_llama_log(log):
        llm = llama_cpp.Llama(test_models[key], n_ctx=n_ctx, n_batch=64, type_k=1, type_v=1, n_threads=1, verbose=True)
    del llm
    caches = [tuple(float(g) for g in m.groups()) for m in _KV_LOG.finditer("".join(log))]
    assert caches, "llama.cpp logged no KV cache size"
    states = [float(m.group(1)) for m in _RS_LOG.finditer("".join(log))]
    theirs = (sum(c[0] for c in caches) + sum(states)) * 2**20
    model = open_model(test_models[key])
    ours = memory.kv_cache_bytes(model, n_ctx, "cuda")
    c = model.config
    if arch == "glm4moe":
        theirs = theirs * c.n_layers / (c.n_layers + c.n_nextn_layers)
    if arch == "deepseek2":
        theirs += c.n_layers * n_ctx * c.kv_lora_rank * 2
    assert abs(ours - theirs) <= 0.006 * 2**20 * (len(caches) + len(states)), (ours / 2**20, theirs / 2**20, caches)
    assert bool(states) == (c.linear_attention is not None)
    if states:                         # the states alone, to the log's rounding
        from promoe_gguf.model.common import recurrent_state_bytes
        assert abs(recurrent_state_bytes(c) - sum(states) * 2**20) <= 0.005 * 2**20, (recurrent_state_bytes(c), states)
