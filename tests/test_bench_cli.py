"""`promoe bench --vs-llamacpp` end to end on the default model (tiny settings): every mode's row, stock
llama.cpp's row, JSON/markdown/PNG written, the ratios computed from the same run."""
from __future__ import annotations

import json

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
