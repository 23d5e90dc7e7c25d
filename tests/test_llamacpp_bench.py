"""promoe_gguf.bench.llamacpp: stock llama.cpp's llama-bench in its offload modes, and the fit helper.

The llama-bench runs need the CPU binaries (scripts/build_llamacpp.sh build/llamacpp-cpu, or
$PROMOE_LLAMACPP_BIN); without them those tests skip and say how to build them. The fit helper's
tests need no binary: the layout read from a GGUF (gguf-py's tensor sizes) must equal the one
planned for a real-shape model, and the placements follow llama.cpp's rules (-ngl N puts the output
layer and the last N-1 layers on the device; --n-cpu-moe N keeps the experts of layers 0..N-1 off it).
"""
import re

import gguf
import pytest

import conftest
import promoe_gguf
from promoe_gguf import ModelError
from promoe_gguf.bench import llamacpp as lc
from promoe_gguf.bench.quant_mix import captured_llama_log


@pytest.fixture(scope="module")
def bin_dir():
    try:
        return lc.find_bin_dir()
    except lc.LlamaCppNotBuilt as e:
        pytest.skip(f"llama.cpp CPU binaries not built: {e}")


def test_llama_bench_cpu_on_default_model(bin_dir):
    assert lc.list_devices(bin_dir) == []            # a CPU build sees no accelerator
    rows = lc.bench_modes(promoe_gguf.DEFAULT_MODEL, 8 << 30, n_prompt=16, n_gen=8, reps=1, threads=2,
                          bin_dir=bin_dir)
    assert len(rows) == 1                             # no GPU: only the all-CPU row
    r = rows[0]
    assert (r.mode, r.n_gpu_layers, r.n_cpu_moe, r.n_threads) == ("cpu", 0, 0, 2)
    assert r.backends == "CPU"
    assert r.prefill_tok_s > 0 and r.decode_tok_s > 0
    by_test = {(t["n_prompt"], t["n_gen"]): t for t in r.raw}
    assert set(by_test) == {(16, 0), (0, 8)}
    assert by_test[(16, 0)]["model_filename"].endswith("default-moe-q4_k_m.gguf")
    assert len(by_test[(0, 8)]["samples_ts"]) == 1


def test_llama_bench_bad_input(tmp_path, bin_dir):
    with pytest.raises(ModelError, match="no such model file"):
        lc.run_llama_bench(tmp_path / "missing.gguf", bin_dir=bin_dir)
    with pytest.raises(ValueError, match="need at least one positive token count"):
        lc.run_llama_bench(promoe_gguf.DEFAULT_MODEL, n_prompt=0, n_gen=0, bin_dir=bin_dir)
    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(RuntimeError, match="exited with"):
        lc.run_llama_bench(bad, n_prompt=4, n_gen=0, reps=1, bin_dir=bin_dir)


def test_missing_binaries_are_named(tmp_path):
    with pytest.raises(lc.LlamaCppNotBuilt, match="no llama-bench in .*build_llamacpp.sh"):
        lc.find_bin_dir(tmp_path)


# ---- the fit helper --------------------------------------------------------------------------

def test_layout_from_file_equals_the_plan(factory):
    """Bytes per placement group, read back from a written real-shape file, equal the plan's; and
    every tensor is counted once."""
    path = factory.make_real_shape("mixtral-8x7b", conftest.test_models_dir(), 1)
    from_file = lc.ModelLayout.from_gguf(path)
    assert from_file == lc.ModelLayout.from_real_shape("mixtral-8x7b", 1)
    r = gguf.GGUFReader(str(path))
    total = sum(int(t.n_bytes) for t in r.tensors)
    assert sum(from_file.layer_bytes) + from_file.output_bytes + from_file.input_bytes == total
    exps = sum(int(t.n_bytes) for t in r.tensors if t.name.endswith("_exps.weight"))
    assert sum(from_file.expert_bytes) == exps
    assert from_file.kv_bytes_per_token_layer == 2 * 8 * 128 * 2        # F16 K and V, 8 KV heads of 128


def test_device_bytes_follow_llamacpps_placement():
    """Default model (4 layers): each placement's bytes, summed here from the GGUF tensor by tensor."""
    r = gguf.GGUFReader(promoe_gguf.DEFAULT_MODEL)
    size = {t.name: int(t.n_bytes) for t in r.tensors}
    lay = lc.ModelLayout.from_gguf(promoe_gguf.DEFAULT_MODEL)
    assert lay.n_layer == 4
    n_ctx, ub = 256, 32
    kv = lay.kv_bytes_per_token_layer * n_ctx

    def layer(i, experts=True):
        return sum(v for k, v in size.items() if k.startswith(f"blk.{i}.") and (experts or "_exps." not in k))

    def extra(host_layers):
        """Compute buffers: one ubatch's activations, and op offload's staging of one host expert
        tensor (a third of the largest host layer's experts)."""
        staged = max((sum(v for k, v in size.items() if k.startswith(f"blk.{i}.") and "_exps." in k) // 3
                      for i in host_layers), default=0)
        return lay.compute_bytes(ub, n_ctx) + staged
    out = size["output.weight"] + size["output_norm.weight"]
    assert lay.device_bytes(0, n_ctx=n_ctx, n_ubatch=ub) == 0
    assert lay.device_bytes(1, n_ctx=n_ctx, n_ubatch=ub) == out + extra(range(4))          # output layer only
    assert lay.device_bytes(3, n_ctx=n_ctx, n_ubatch=ub) == out + layer(2) + layer(3) + 2 * kv + extra((0, 1))
    assert lay.device_bytes(5, 2, n_ctx=n_ctx, n_ubatch=ub) == (out + layer(0, False) + layer(1, False) + layer(2)
                                                              + layer(3) + 4 * kv + extra((0, 1)))
    assert lay.device_bytes(5, n_ctx=n_ctx, n_ubatch=ub) == out + sum(map(layer, range(4))) + 4 * kv + extra(())
    assert "token_embd.weight" in size and lay.input_bytes == size["token_embd.weight"]   # never offloaded
    with pytest.raises(ValueError, match="ngl 6 must be in 0..5"):
        lay.device_bytes(6)


@pytest.mark.parametrize("name", ["mixtral-8x7b", "qwen3-30b-a3b"])
def test_fit_picks_the_largest_ngl_and_smallest_n_cpu_moe(name):
    lay = lc.ModelLayout.from_real_shape(name)
    L = lay.n_layer
    for k in (1, L // 2, L + 1):                     # a budget exactly at a placement's need
        need = lay.device_bytes(k)
        assert lc.fit_offload(lay, need).ngl == k
        assert lc.fit_offload(lay, need - 1).ngl == k - 1
    for m in (0, L // 3, L):
        need = lay.device_bytes(L + 1, m)
        f = lc.fit_offload(lay, need)
        assert f.n_cpu_moe == m and f.n_cpu_moe_bytes == need
        if m < L:
            assert lc.fit_offload(lay, need - 1).n_cpu_moe == m + 1
    nothing = lc.fit_offload(lay, 0)
    assert (nothing.ngl, nothing.ngl_bytes, nothing.n_cpu_moe) == (0, 0, None)
    everything = lc.fit_offload(lay, 1 << 50)
    assert (everything.ngl, everything.n_cpu_moe) == (L + 1, 0)


def _llamacpp_buffers_mib(factory, path) -> dict:
    """KV and compute buffer sizes llama.cpp logs loading `path` (CPU, n_ctx 4096, ubatch 512, flash attn)."""
    import llama_cpp
    log = []
    with captured_llama_log(log):
        llm = llama_cpp.Llama(str(path), n_ctx=4096, n_batch=512, n_ubatch=512, flash_attn=True, verbose=True)
    llm.close()
    text = "".join(log)
    return {k: float(re.search(rf"CPU {k} buffer size =\s*([\d.]+) MiB", text).group(1)) for k in ("KV", "compute")}


def test_kv_and_compute_estimates_against_llamacpp(factory, tmp_path):
    """Against llama.cpp's own load log: the KV cache estimate is exact (MLA caches only the K
    latent), the compute-buffer estimate errs high by less than 60% on a real shape."""
    path = factory.make_real_shape("mixtral-8x7b", conftest.test_models_dir(), 1)
    mib = _llamacpp_buffers_mib(factory, path)
    lay = lc.ModelLayout.from_gguf(path)
    assert lay.kv_bytes_per_token_layer * 4096 == mib["KV"] * 2**20
    ratio = lay.compute_bytes(512, 4096) / (mib["compute"] * 2**20)
    assert 1.0 <= ratio < 1.6, ratio
    mla = factory.make_float_model("deepseek2", tmp_path / "ds2.gguf")     # key_length 544 = kv_lora + rope
    lay = lc.ModelLayout.from_gguf(mla)
    assert lay.kv_bytes_per_token_layer * 4096 * lay.n_layer == _llamacpp_buffers_mib(factory, mla)["KV"] * 2**20


def test_fit_bad_input(tmp_path):
    with pytest.raises(ValueError, match="negative"):
        lc.fit_offload(lc.ModelLayout.from_real_shape("olmoe-1b-7b", 2), -1)
    with pytest.raises(ModelError, match="no such model file"):
        lc.fit_offload(tmp_path / "nope.gguf", 1 << 30)
    with pytest.raises(ValueError, match="unknown real shape"):
        lc.ModelLayout.from_real_shape("no-such-model-7b")
