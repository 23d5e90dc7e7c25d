"""Semantic fuzz: one metadata value of a real factory model changed (0, 1, off by one,
the neighbouring key's value, huge, negative, NaN, inf, removed), the model run through
Engine.logits under a deadline and a memory cap. Every case runs with finite logits or raises
ModelError; a rejection at open names the key that was changed. CI runs every read key of every
architecture with the core mutations (~1,600 cases); `pytest -m slow` adds extended mutations,
absent keys, other layouts and random multi-key cases (> 10,000 cases).
"""
import os

import gguf
import pytest

import semantic_fuzz as sf
from gguf_edit import GGUFTemplate

CI_MODELS = [("llama", "default"), ("qwen2moe", "default"), ("qwen3moe", "default"), ("olmoe", "default"),
             ("deepseek", "default"), ("deepseek2", "default"), ("granitemoe", "default"),
             ("glm4moe", "default"), ("gpt-oss", "default"), ("qwen35moe", "default"), ("deepseek2", "v3"),
             ("deepseek2", "kvb")]
SLOW_MODELS = CI_MODELS + [("llama", "legacy"), ("deepseek2", "merged"), ("deepseek", "narrow")]
SLOW_CASES_PER_MODEL = 850          # 14 models: 11,900 cases


def _template(test_models, arch, variant) -> GGUFTemplate:
    quant = "Q4_K_M" if (arch, "Q4_K_M", variant) in test_models else "MXFP4_MOE"       # gpt-oss ships MXFP4
    return GGUFTemplate(test_models[(arch, quant, variant)])


def _run(template, cases, tmp_path):
    d = "/dev/shm" if os.path.isdir("/dev/shm") else str(tmp_path)
    path = os.path.join(d, f"promoe-fuzz-{os.getpid()}.gguf")
    try:
        return sf.run_cases(template, cases, path)
    finally:
        if os.path.exists(path):
            os.remove(path)


def _check(report, path_hint="promoe-fuzz-"):
    print(report.summary())
    problems = [f"{o.case.label}: {o.detail}" for o in report.escapes]
    for o in report.outcomes:
        if o.kind != "rejected":
            continue
        if "\n" in o.detail:
            problems.append(f"{o.case.label}: multi-line message {o.detail[:200]!r}")
        # a single changed key, refused at open: the message names the file and that key
        if o.stage == "open" and len(o.case.keys) == 1 and \
                (o.case.keys[0] not in o.detail or path_hint not in o.detail):
            problems.append(f"{o.case.label}: message does not name {o.case.keys[0]}: {o.detail[:300]}")
    assert not problems, f"{len(problems)} problems in {len(report.outcomes)} cases:\n" + "\n".join(problems[:20])


def test_template_rewrites_only_the_metadata(test_models, tmp_path):
    """The KV rewrite is exact: no change gives the same bytes; a change is what gguf-py reads back,
    and every tensor's bytes are untouched."""
    t = _template(test_models, "qwen2moe", "default")
    assert t.with_metadata({}) == t.raw
    p = t.write(tmp_path / "m.gguf", {"qwen2moe.attention.head_count": (7, gguf.GGUFValueType.UINT32),
                                      "qwen2moe.rope.freq_base": None,
                                      "qwen2moe.new_key": (2.5, gguf.GGUFValueType.FLOAT32)})
    a, b = gguf.GGUFReader(t.path), gguf.GGUFReader(p)
    assert b.fields["qwen2moe.attention.head_count"].contents() == 7
    assert "qwen2moe.rope.freq_base" not in b.fields
    assert b.fields["qwen2moe.new_key"].contents() == 2.5
    assert len(a.tensors) == len(b.tensors)
    for x, y in zip(a.tensors, b.tensors):
        assert x.name == y.name and (x.data == y.data).all()


@pytest.mark.parametrize("arch,variant", CI_MODELS, ids=[f"{a}-{v}" for a, v in CI_MODELS])
def test_semantic_fuzz(test_models, tmp_path, arch, variant):
    t = _template(test_models, arch, variant)
    report = _run(t, sf.core_cases(t), tmp_path)
    _check(report)
    assert report.count("ran") and report.count("rejected")   # both outcomes occur: the fuzz has teeth


@pytest.mark.slow
@pytest.mark.parametrize("arch,variant", SLOW_MODELS, ids=[f"{a}-{v}" for a, v in SLOW_MODELS])
def test_semantic_fuzz_slow(test_models, tmp_path, arch, variant):
    t = _template(test_models, arch, variant)
    cases = sf.cases_for(t, max(SLOW_CASES_PER_MODEL, len(sf.core_cases(t)) + len(sf.extended_cases(t))), seed=1)
    _check(_run(t, cases, tmp_path))
