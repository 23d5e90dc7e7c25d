"""Damaged converted cache directories and damaged or mismatched predictor files.

Every case changes one thing of a real file (a manifest field, the length of experts.bin, a byte of
resident.gguf, a field or tensor of a predictor record, a cut-off predictor file) and then uses it
as a user would: open it and run Engine.logits. Each case must either run with finite logits or
raise ModelError with a one-line message naming the file; anything else is an escape. The slow
variants (pytest -m slow) run every expert's fields and more random damage.
"""
import copy
import itertools
import json
import math
import os
import random
import shutil
import threading

import numpy as np
import pytest
import torch

from promoe_gguf import DEFAULT_MODEL, ModelError, open_model
from promoe_gguf.engine import Engine
from promoe_gguf.format.converter import convert
from semantic_fuzz import deadline, memory_limit

TOKENS = [1, 2, 3]
DELETE = object()      # the field is removed


def _values(v, neighbour):
    """name -> replacement for a manifest or record field holding `v`."""
    out = {"zero": 0, "one": 1, "huge": 2**63, "negative": -1, "nan": math.nan, "inf": math.inf,
           "null": None, "string": "x", "list": [], "object": {}, "absent": DELETE}
    if isinstance(v, int) and not isinstance(v, bool):
        out.update(minus_one=v - 1, plus_one=v + 1)
    if neighbour is not None and neighbour != v:
        out["neighbour"] = neighbour
    return out


def _leaves(obj, path=()):
    """(path, value) of every scalar in a JSON-like tree."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(obj, list) and obj and all(isinstance(x, (dict, list)) for x in obj):
        for i, v in enumerate(obj):
            yield from _leaves(v, path + (i,))
    elif isinstance(obj, list) and obj and all(isinstance(x, int) for x in obj):
        for i, v in enumerate(obj):
            yield path + (i,), v
        yield path, obj
    else:
        yield path, obj


def _set(tree, path, value):
    parent = tree
    for k in path[:-1]:
        parent = parent[k]
    if value is DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _label(path) -> str:
    return ".".join(str(p) for p in path)


class Escapes:
    """Collects cases that neither ran cleanly nor raised a one-line ModelError naming `name`; each
    case runs under a deadline and with the address space capped at 2 GiB more than now."""

    def __init__(self):
        self.items, self.counts = [], {"ran": 0, "rejected": 0}

    def run(self, label: str, name: str, fn) -> None:
        try:
            with memory_limit(2 << 30), deadline(20.0):
                fn()
            self.counts["ran"] += 1
        except ModelError as e:
            self.counts["rejected"] += 1
            msg = str(e)
            if "\n" in msg or name not in msg:
                self.items.append((label, f"ModelError not one line naming {name}: {msg[:300]!r}"))
        except Exception as e:  # noqa: BLE001 - what the fuzz hunts
            self.items.append((label, f"{type(e).__name__}: {str(e)[:300]}"))

    def check(self, what: str) -> None:
        total = self.counts["ran"] + self.counts["rejected"] + len(self.items)
        print(f"{what}: {total} cases, {self.counts['ran']} ran, {self.counts['rejected']} ModelError, "
              f"{len(self.items)} escapes")
        assert not self.items, f"{len(self.items)} escapes, e.g.:\n" + "\n".join(f"{a}: {b}" for a, b in self.items[:15])


def _finite_logits(eng):
    out = eng.logits(TOKENS)
    assert np.isfinite(out).all()


# ---- converted cache directories ---------------------------------------------------------------

@pytest.fixture(scope="module")
def converted(test_models, tmp_path_factory):
    """A converted deepseek model (dense layer 0, MoE + shared experts after), its manifest."""
    out = convert(test_models[("deepseek", "Q4_K_M", "default")], tmp_path_factory.mktemp("conv") / "c",
                  progress=False)
    with open(os.path.join(out, "manifest.json")) as f:
        return out, json.load(f)


def _case_dir(base, dst, manifest=None, experts=None, resident=None):
    """A cache directory at dst: the base's files hard-linked, except those given (bytes / a JSON tree)."""
    os.makedirs(dst)
    for name, data in (("experts.bin", experts), ("resident.gguf", resident)):
        if data is None:
            os.link(os.path.join(base, name), os.path.join(dst, name))
        else:
            with open(os.path.join(dst, name), "wb") as f:
                f.write(data)
    text = manifest if isinstance(manifest, (str, bytes)) else None
    with open(os.path.join(dst, "manifest.json"), "w") as f:
        if text is not None:
            f.write(text if isinstance(text, str) else text.decode())
        else:
            json.dump(manifest, f)
    return str(dst)


def _use_cache_dir(path):
    with Engine(path) as eng:                      # opens with full verification
        _finite_logits(eng)
    lazy = open_model(path, verify="lazy")
    for key in lazy.expert_keys:
        lazy.read_expert(*key)


def _manifest_cases(manifest, expert_indices):
    """(label, mutated manifest) for every scalar field of the top level and of the chosen experts."""
    n = len(manifest["experts"])
    for path, v in _leaves(manifest):
        if path[:1] == ("experts",) and path[1] % n not in expert_indices:
            continue
        neighbour = None
        if path[:1] == ("experts",):
            try:
                neighbour = _get(manifest, ("experts", (path[1] + 1) % n) + path[2:])
            except (KeyError, IndexError):
                pass
        for name, value in _values(v, neighbour).items():
            m = copy.deepcopy(manifest)
            _set(m, path, value)
            yield f"{_label(path)}={name}", m
    for name, m in (("experts=short", {**manifest, "experts": manifest["experts"][:-1]}),
                    ("experts=duplicate", {**manifest, "experts": manifest["experts"] + manifest["experts"][:1]}),
                    ("experts=reversed", {**manifest, "experts": manifest["experts"][::-1]}),
                    ("top=list", [manifest]), ("top=null", None)):
        yield name, m
    text = json.dumps(manifest)
    for name, t in (("text=cut", text[:len(text) // 2]), ("text=empty", ""), ("text=garbage", "\x00\xff{")):
        yield name, t


def _random_manifest_cases(manifest, n: int, seed: int):
    """n manifests with 1-3 random fields of random experts set to random values (the slow run)."""
    rng = random.Random(seed)
    leaves = list(_leaves(manifest))
    for i in range(n):
        m = copy.deepcopy(manifest)
        picks = rng.sample(leaves, rng.randint(1, 3))
        for path, v in picks:
            values = list(_values(v, None).values()) + [rng.randint(-2**40, 2**40), rng.random() * 1e6]
            try:
                _set(m, path, rng.choice(values))
            except (KeyError, IndexError, TypeError):
                pass                                   # an earlier pick removed or replaced its parent
        yield f"random#{i}:" + ",".join(_label(p) for p, _ in picks), m


def _file_cases(base):
    """(label, {file: bytes}) for truncated, flipped and missing files."""
    experts = open(os.path.join(base, "experts.bin"), "rb").read()
    resident = open(os.path.join(base, "resident.gguf"), "rb").read()
    for cut in (0, 1, 4096, len(experts) // 2, len(experts) - 1):
        yield f"experts.bin[:{cut}]", {"experts": experts[:cut]}
    yield "experts.bin+4096", {"experts": experts + b"\0" * 4096}
    for at in (100, len(experts) // 3, len(experts) - 50):
        flipped = bytearray(experts)
        flipped[at] ^= 0xFF
        yield f"experts.bin^{at}", {"experts": bytes(flipped)}
    for cut in (0, 100, len(resident) // 2, len(resident) - 1):
        yield f"resident.gguf[:{cut}]", {"resident": resident[:cut]}
    for at in (50, 600, len(resident) - 10):
        flipped = bytearray(resident)
        flipped[at] ^= 0x55
        yield f"resident.gguf^{at}", {"resident": bytes(flipped)}


def _fuzz_cache_dir(converted, tmp_path, expert_indices, n_random=0):
    base, manifest = converted
    esc = Escapes()
    cases = itertools.chain(_manifest_cases(manifest, expert_indices), _random_manifest_cases(manifest, n_random, 1))
    for i, (label, m) in enumerate(cases):
        d = _case_dir(base, tmp_path / f"m{i}", manifest=m)
        esc.run(label, d, lambda d=d: _use_cache_dir(d))
        shutil.rmtree(d)
    for i, (label, files) in enumerate(_file_cases(base)):
        d = _case_dir(base, tmp_path / f"f{i}", manifest=manifest, **files)
        esc.run(label, d, lambda d=d: _use_cache_dir(d))
        shutil.rmtree(d)
    for gone in ("experts.bin", "resident.gguf", "manifest.json"):
        d = _case_dir(base, tmp_path / f"g-{gone}", manifest=manifest)
        os.remove(os.path.join(d, gone))
        esc.run(f"{gone} removed", d, lambda d=d: _use_cache_dir(d))
    return esc


def test_cache_dir_undamaged_runs(converted):
    _use_cache_dir(converted[0])


def test_fuzz_cache_dir(converted, tmp_path):
    n = len(converted[1]["experts"])
    esc = _fuzz_cache_dir(converted, tmp_path, expert_indices={0, n // 2, n - 1})
    esc.check("cache-dir fuzz")
    assert esc.counts["rejected"] > esc.counts["ran"]


@pytest.mark.slow
def test_fuzz_cache_dir_every_expert(converted, tmp_path):
    """Every field of every expert (5,383 cases), then random multi-field damage: 10,000+ cases."""
    esc = _fuzz_cache_dir(converted, tmp_path, expert_indices=set(range(len(converted[1]["experts"]))),
                          n_random=4700)
    esc.check("cache-dir fuzz, every expert and random")


# ---- predictor files ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def predictor_record():
    from promoe_gguf.predict.mlp import read_predictor_file
    return read_predictor_file(os.path.join(os.path.dirname(DEFAULT_MODEL), "default-moe.predictor.pt"))


def _use_predictor(path, model=DEFAULT_MODEL):
    """Load it and predict with it: a predictor that fails in the prefetch thread (which only logs
    and turns prefetching off) counts as an escape, not as running."""
    eng = Engine(model, cache_rate=0.5, policy="promoe", predictor=f"mlp:{path}")
    try:
        _finite_logits(eng)
    finally:
        eng.close()                                 # joins the prefetch thread
    errors = eng.stats["predictor_errors"]
    assert errors == 0, f"the predictor failed {errors} time(s) at run time instead of at load"


def _predict_directly(path, model):
    """Load the predictor for `model` (an opened model) and run it over two decode steps of random
    router inputs: the cheap use, for byte damage (the record cases go through a whole Engine)."""
    from promoe_gguf.predict.mlp import load_mlp_predictor
    pred = load_mlp_predictor(path, model)
    rng = np.random.default_rng(0)
    for pos in range(2):
        pred.begin_step([pos])
        for layer in model.config.moe_layers:
            x = torch.from_numpy(rng.standard_normal((1, model.config.n_embd), dtype=np.float32))
            pred.predict(layer, x)
            pred.observe(layer, x, torch.tensor([[0, 1]]))


def _record_cases(rec):
    """(label, record) with one field, tensor or identity value changed."""
    for name, value in (("absent", DELETE), ("null", None), ("string", "x")):
        r = dict(rec)
        _set(r, ("train",), value)                 # the training report: not read at run time
        yield f"train={name}", r
    for path, v in _leaves({k: rec[k] for k in rec if k not in ("state", "train")}):
        for name, value in _values(v, None).items():
            r = copy.copy(rec)
            r.update(copy.deepcopy({path[0]: rec[path[0]]}))
            _set(r, path, value)
            yield f"{_label(path)}={name}", r
    for name, t in rec["state"].items():
        variants = {"absent": DELETE, "short": t[:-1], "transposed": t.transpose(0, -1).contiguous(),
                    "int": t.to(torch.int32), "list": t.tolist()[:1], "flat": t.reshape(-1)}
        nan = t.clone().float()
        nan.view(-1)[0] = math.nan
        variants["nan"] = nan
        inf = t.clone().float()
        inf.view(-1)[-1] = math.inf
        variants["inf"] = inf
        variants["zeros"] = torch.zeros_like(t)
        for vname, value in variants.items():
            r = dict(rec, state=dict(rec["state"]))
            _set(r, ("state", name), value)
            yield f"state.{name}={vname}", r


def _predictor_file_cases(raw: bytes, rng: random.Random, n_flips: int):
    for frac in (0.0, 0.001, 0.1, 0.5, 0.9, 0.999):
        yield f"cut@{frac}", raw[:int(len(raw) * frac)]
    for _ in range(n_flips):
        at = rng.randrange(len(raw))
        b = bytearray(raw)
        b[at] ^= 1 << rng.randrange(8)
        yield f"flip@{at}", bytes(b)
    yield "text", b"not a predictor\n" * 10
    yield "gguf", open(DEFAULT_MODEL, "rb").read()[:4096]


def _threads() -> set:
    return {t for t in threading.enumerate() if t.name.startswith("promoe-")}


def _fuzz_predictor(rec, tmp_path, n_flips, seed=0):
    esc = Escapes()
    before = _threads()
    path = str(tmp_path / "p.pt")
    for label, r in _record_cases(rec):
        torch.save(r, path)
        esc.run(label, path, lambda: _use_predictor(path))
    torch.save(rec, path)
    raw = open(path, "rb").read()
    model = open_model(DEFAULT_MODEL)
    for label, data in _predictor_file_cases(raw, random.Random(seed), n_flips):
        with open(path, "wb") as f:
            f.write(data)
        esc.run(label, path, lambda: _predict_directly(path, model))
    assert _threads() <= before, f"threads left behind: {_threads() - before}"
    return esc


def test_predictor_undamaged_runs(predictor_record, tmp_path):
    p = str(tmp_path / "p.pt")
    torch.save(predictor_record, p)
    _use_predictor(p)


def test_fuzz_predictor_file(predictor_record, tmp_path):
    esc = _fuzz_predictor(predictor_record, tmp_path, n_flips=40)
    esc.check("predictor fuzz")
    assert esc.counts["rejected"] > esc.counts["ran"]


@pytest.mark.slow
def test_fuzz_predictor_file_many_flips(predictor_record, tmp_path):
    _fuzz_predictor(predictor_record, tmp_path, n_flips=9700, seed=1).check("predictor fuzz, 9,700 flips")


@pytest.mark.parametrize("arch", ["llama", "qwen2moe", "deepseek2"])
def test_mismatched_predictor_names_file_and_fields(test_models, arch):
    """The default model's predictor on another model: one line naming the file and what differs."""
    p = os.path.join(os.path.dirname(DEFAULT_MODEL), "default-moe.predictor.pt")
    with pytest.raises(ModelError) as err:
        _use_predictor(p, test_models[(arch, "Q4_K_M", "default")])
    msg = str(err.value)
    assert "\n" not in msg and p in msg and "was made for another model" in msg
    assert "router weights hash" in msg
    if arch != "llama":
        assert f"arch 'llama' != '{arch}'" in msg
