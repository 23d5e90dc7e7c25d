"""`promoe bench --vs-llamacpp` end to end on the default model (tiny settings): every mode's row, stock
llama.cpp's row, JSON/markdown/PNG written, the ratios computed from the same run."""
from __future__ import annotations

import json

import pytest

from promoe_gguf import DEFAULT_MODEL
from promoe_gguf.cli.main import main


def test_bench_vs_llamacpp(tmp_path, capsys):
    out = tmp_path / "b"
    assert main(["bench", DEFAULT_MODEL, "--vs-llamacpp", "--tokens", "4", "--rates", "0.5",
                 "--out", str(out)]) == 0
    res = json.loads((out / "bench.json").read_text())
    modes = [r["mode"] for r in res["rows"]]
    assert modes == ["all resident", "lru", "promoe", "hybrid", "llama.cpp (all on the CPU)"]
    for r in res["rows"]:
        assert r["decode"]["tok_s"] > 0 and all(p["tok_s"] > 0 for p in r["prefill"])
    hybrid = res["rows"][3]["decode"]
    assert hybrid["cpu_experts"] >= 0 and "wait_cpu_share" in hybrid
    assert all(r["gap_to_bound"] >= 0.5 for r in res["rows"][:4])
    assert (out / "bench.png").stat().st_size > 1000
    assert "vs llama.cpp" in (out / "bench.md").read_text()
    # llama.cpp's expert cache: said to be unmeasured, and why (llama-cpp-python's llama.cpp predates it)
    assert res["llamacpp_moe_cache"]["measured"] is False and res["llamacpp_moe_cache"]["why"]
    assert "--moe-cache-mib) is not measured here" in (out / "bench.md").read_text()
    # the measured rates as a simulator profile, usable as it is
    from promoe_gguf.sim.profile import parse_profile
    prof = parse_profile(str(out / "profile.json"))
    assert prof.emulated and prof.gpu_gbs > 0 and prof.cpu_gbs > 0
    assert abs(prof.h2d_gbs - res["rates_GBps"]["link"]) < 1e-9
    capsys.readouterr()
    assert main(["simulate", "--shape", DEFAULT_MODEL, "--profile", str(out / "profile.json"), "--cache-rate", "0.5",
                 "--prompt", "16", "--decode", "8", "--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["decode_tok_s"] > 0


def test_bench_vs_llama_bench(tmp_path, monkeypatch):
    """With llama.cpp's llama-bench built, its rows come from it: one pp test per prompt length."""
    from promoe_gguf.bench import llamacpp as lc
    try:
        bin_dir = lc.find_bin_dir()
    except lc.LlamaCppNotBuilt as e:
        pytest.skip(f"llama.cpp CPU binaries not built: {e}")
    monkeypatch.setenv("PROMOE_LLAMACPP_BIN", str(bin_dir))
    out = tmp_path / "b"
    assert main(["bench", DEFAULT_MODEL, "--vs-llamacpp", "--tokens", "4", "--rates", "0.5", "--modes", "hybrid",
                 "--out", str(out)]) == 0
    res = json.loads((out / "bench.json").read_text())
    llama = res["rows"][-1]
    assert llama["mode"] == "llama.cpp (all on the CPU)" and llama["source"].startswith("llama-bench (CPU")
    assert [p["tokens"] for p in llama["prefill"]] == res["prompt_lengths"]
    assert llama["decode"]["tok_s"] > 0
    assert "llama-bench" in (out / "bench.md").read_text()


def test_bench_custom_mode_and_bad_mode(tmp_path, capsys):
    out = tmp_path / "b"
    assert main(["bench", DEFAULT_MODEL, "--tokens", "2", "--rates", "0.5", "--modes", "static/none/off",
                 "--out", str(out)]) == 0
    res = json.loads((out / "bench.json").read_text())
    assert [r["mode"] for r in res["rows"]] == ["all resident", "static/none/off"]
    assert res["rows"][1]["decode"]["cpu_experts"] == 0
    assert main(["bench", DEFAULT_MODEL, "--modes", "lru,fast", "--out", str(out)]) == 2
    assert "--modes: 'fast' is neither" in capsys.readouterr().err
