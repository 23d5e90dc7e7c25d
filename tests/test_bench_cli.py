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
