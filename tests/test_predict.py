"""Routing traces, predictors (gate, mlp, history, freq, oracle), training and GOODPRED evaluation."""
import json

import numpy as np
import pytest
import torch

from promoe_gguf import ModelError, open_model
from promoe_gguf.predict import make_predictor
from promoe_gguf.predict.evaluate import (REQUIRED_KEYS, evaluate, fetch_timeline, parse_link, set_metrics,
                                          truth)
from promoe_gguf.predict.mlp import (FeatureSpec, MLPPredictor, PredictorNet, TraceTensors, load_mlp_predictor,
                                     read_predictor_file, record_digest, train_predictor)
from promoe_gguf.tokenizer import Tokenizer
from promoe_gguf.predict.trace import Trace, TraceWriter, default_split, load_prompts, trace_prompts

TEXTS = ["def f(x):\n    return x + 1\n", "import os\nprint(os.getcwd())\n", "class A:\n    pass\n",
         "for i in range(10):\n    print(i)\n", "x = [1, 2, 3]\ny = sum(x)\n", "while True:\n    break\n",
         "# a comment\nz = {'a': 1}\n", "try:\n    pass\nexcept Exception:\n    raise\n",
         "with open('f') as fh:\n    data = fh.read()\n", "lambda q: q * 2\n", "def g(*a, **k):\n    yield a\n",
         "assert 1 + 1 == 2\n"]


@pytest.fixture(scope="module")
def models(tmp_path_factory, factory):
    d = tmp_path_factory.mktemp("predict-models")
    a = factory.make_float_model("llama", d / "llama-a.gguf", seed=0)
    b = factory.make_float_model("llama", d / "llama-b.gguf", seed=1)
    q = factory.make_float_model("qwen2moe", d / "qwen2moe.gguf", seed=0)
    return {"a": str(a), "b": str(b), "qwen": str(q)}


class Recorder:
    """Keeps a copy of everything the observers are shown."""

    def __init__(self):
        self.steps = []

    def begin_step(self, positions):
        self.steps.append({"positions": list(positions), "layers": {}})

    def observe(self, layer, x, ids, logits=None):
        self.steps[-1]["layers"][layer] = (x.clone(), ids.clone(), logits.clone())


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    with open(p, "w") as f:
        for i, t in enumerate(TEXTS):
            f.write(json.dumps({"prompt": t}) + "\n")
    return p


@pytest.fixture(scope="module")
def traced(models, prompts_file, tmp_path_factory):
    """A small trace of model a, and what the observers saw while it was written."""
    from promoe_gguf import Engine
    torch.manual_seed(0)
    eng = Engine(models["a"], n_ctx=128, n_batch=16)
    rec = Recorder()
    eng.experts.observers.append(rec)
    out = tmp_path_factory.mktemp("trace") / "tr"
    trace_prompts(eng, load_prompts(prompts_file), out, n_decode=5, temperature=0.8, seed=3, progress=False)
    eng.close()
    return Trace(out), rec


# ---- trace --------------------------------------------------------------------------------------
def test_trace_round_trip(traced, models):
    tr, rec = traced
    model = open_model(models["a"])
    moe = model.config.moe_layers
    # rebuild the per-token rows from what the observers saw, in order
    xs, ids, lgs, pos = [], [], [], []
    for st in rec.steps:
        assert sorted(st["layers"]) == moe
        pos += st["positions"]
        xs.append(torch.stack([st["layers"][la][0] for la in moe], 1))
        ids.append(torch.stack([st["layers"][la][1] for la in moe], 1))
        lgs.append(torch.stack([st["layers"][la][2] for la in moe], 1))
    xs, ids, lgs = torch.cat(xs).numpy(), torch.cat(ids).numpy(), torch.cat(lgs).numpy()
    assert tr.N == len(pos) == len(xs)
    np.testing.assert_array_equal(np.asarray(tr.x), xs.astype(np.float16))
    np.testing.assert_array_equal(np.asarray(tr.logits), lgs)
    np.testing.assert_array_equal(np.asarray(tr.ids), ids)
    np.testing.assert_array_equal(np.asarray(tr.pos), pos)
    # sequences: rows in order, prefill then 5 decode rows, tokens = BOS + prompt bytes
    assert len(tr.sequences) == len(TEXTS)
    for s, text in zip(tr.sequences, TEXTS):
        r = slice(s["start"], s["start"] + s["n_prompt"] + s["n_decode"])
        assert s["n_decode"] == 5 and s["n_prompt"] == len(text.encode()) + 1
        assert (np.asarray(tr.seq[r]) == s["index"]).all()
        np.testing.assert_array_equal(np.asarray(tr.pos[r]), np.arange(s["n_prompt"] + 5))
        np.testing.assert_array_equal(np.asarray(tr.phase[r]), [0] * s["n_prompt"] + [1] * 5)
        assert np.asarray(tr.tokens[r])[:s["n_prompt"]].tolist() == Tokenizer(model).encode(text, add_bos=True)
        assert tr.split_of(s) == default_split(s["index"])
    np.testing.assert_array_equal(tr.routers[0], model.tensor_f32(f"blk.{moe[0]}.ffn_gate_inp.weight"))
    tr.check_model(model)


def test_trace_is_deterministic(models, prompts_file, tmp_path):
    from promoe_gguf import Engine
    outs = []
    for i in range(2):
        eng = Engine(models["a"], n_ctx=128, n_batch=16)
        outs.append(trace_prompts(eng, load_prompts(prompts_file)[:3], tmp_path / f"t{i}", n_decode=4, seed=7,
                                  progress=False))
    for f in ("x.f16", "logits.f32", "ids.i16", "tokens.i32"):
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes()


def test_trace_writer_streams(models, tmp_path):
    """Rows reach the files step by step (bounded memory), meta.json only at the end."""
    model = open_model(models["a"])
    w = TraceWriter(tmp_path / "t", model)
    w.start_sequence(0, None, [1, 2, 3], 3)
    E, d = model.config.n_experts, model.config.n_embd
    for step in ([0, 1], [2]):
        w.begin_step(step)
        for layer in model.config.moe_layers:
            w.observe(layer, torch.zeros(len(step), d), torch.zeros(len(step), 2, dtype=torch.long), torch.zeros(len(step), E))
    w.begin_step([3])                   # flushes the second step
    assert w.rows == 3 and not w.buf
    assert not (tmp_path / "t" / "meta.json").exists()
    with pytest.raises(ModelError, match="no meta.json"):
        Trace(tmp_path / "t")
    w.close()
    assert Trace(tmp_path / "t").N == 3
    with pytest.raises(ModelError, match="already exists"):
        TraceWriter(tmp_path / "t", model)


def test_load_prompts(tmp_path):
    p = tmp_path / "plain.txt"
    p.write_text("first prompt\n\nsecond prompt\n")
    assert [q["prompt"] for q in load_prompts(p)] == ["first prompt", "second prompt"]
    j = tmp_path / "p.jsonl"
    j.write_text(json.dumps({"prompt": "a\nb", "split": "eval"}) + "\n" + json.dumps({"prompt": "c"}) + "\n")
    assert load_prompts(j) == [{"prompt": "a\nb", "split": "eval"}, {"prompt": "c", "split": None}]
    j.write_text(json.dumps({"prompt": "a"}) + "\n{oops\n")
    with pytest.raises(ModelError, match=":2: not a JSON line"):
        load_prompts(j)
    j.write_text(json.dumps({"prompt": "a", "split": "test"}) + "\n")
    with pytest.raises(ModelError, match="split"):
        load_prompts(j)
    with pytest.raises(ModelError, match="does not exist"):
        load_prompts(tmp_path / "missing")


# ---- training -----------------------------------------------------------------------------------
def _train(tr, out=None, seed=0, **kw):
    kw = {"window": 2, "ctx": 2, "hidden": 16, "epochs": 2, "patience": 2, "batch": 128, "progress": False,
          **kw}
    return train_predictor(tr, out, seed=seed, **kw)


def test_training_is_deterministic(traced):
    tr, _ = traced
    r1, r2, r3 = _train(tr, seed=5), _train(tr, seed=5), _train(tr, seed=6)
    for n in r1["state"]:
        assert torch.equal(r1["state"][n], r2["state"][n]), n
    assert record_digest(r1) == record_digest(r2) != record_digest(r3)
    assert r1["train"]["history"] == r2["train"]["history"]


def test_split_is_by_prompt(traced):
    tr, _ = traced
    ev = {s["index"] for s in tr.seqs("eval")}
    assert ev == {i for i in range(len(TEXTS)) if i % 10 == 9}
    rec = _train(tr)
    assert rec["train"]["fit_prompts"] + rec["train"]["val_prompts"] == len(TEXTS) - len(ev)


def test_predictor_file_and_identity(traced, models, tmp_path):
    tr, _ = traced
    path = tmp_path / "p.pt"
    rec = _train(tr, path)
    back = read_predictor_file(path)
    assert back["version"] == 1 and back["window"] == 2 and back["model"] == tr.identity
    assert back["model"]["router_sha256"] and back["model"]["arch"] == "llama"
    p = load_mlp_predictor(path, open_model(models["a"]), lookahead=2)
    assert isinstance(p, MLPPredictor) and p.lookahead == 2
    assert isinstance(make_predictor(f"mlp:{path}", open_model(models["a"]), lookahead=2), MLPPredictor)
    # the same shapes, other router weights
    with pytest.raises(ModelError, match="router weights hash"):
        load_mlp_predictor(path, open_model(models["b"]))
    # another architecture / expert count
    with pytest.raises(ModelError, match=r"arch 'llama' != 'qwen2moe'.*n_experts 8 != 4"):
        load_mlp_predictor(path, open_model(models["qwen"]))
    with pytest.raises(ModelError, match="router weights hash"):
        tr.check_model(open_model(models["b"]))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ModelError, match="not a promoe predictor"):
        read_predictor_file(bad)
    torch.save({"format": "promoe-predictor", "version": 99, "kind": "mlp"}, bad)
    with pytest.raises(ModelError, match="version 99"):
        read_predictor_file(bad)
    assert rec["train"]["fit_rows"] > 0


@pytest.mark.parametrize("rank", [8, 0])
def test_runtime_features_match_training(traced, models, rank):
    """The runtime predictor, driven through the interface token by token, computes the same scores as
    the training-time feature gather + network on the same trace rows."""
    tr, _ = traced
    rec = _train(tr, window=2, ctx=3, rank=rank, epochs=1)
    model = open_model(models["a"])
    spec = FeatureSpec(**rec["spec"])
    net = PredictorNet(spec, rec["hidden"])
    # the runtime reads float16-rounded weights from the file: round the same way here
    stored = {n: (t.half() if n in ("U", "W1", "b1", "W2", "b2") else t) for n, t in rec["state"].items()}
    net.load_state_dict({n: t.float() for n, t in stored.items()})
    net.eval()
    p = MLPPredictor(model, {**rec, "state": stored}, lookahead=2)
    seqs = tr.seqs("train")[:2]
    tt = TraceTensors(tr, seqs, spec)
    with torch.no_grad():
        feats, _ = tt.batch(net, torch.arange(tt.n))
        want_all = net(feats)                                           # [P, n, E]
    moe, M = tr.moe_layers, len(tr.moe_layers)
    checked, base = 0, 0
    for s in seqs:
        n = s["n_prompt"] + s["n_decode"]
        p.reset()
        for r in range(n):
            g = s["start"] + r
            p.begin_step([int(tr.pos[g])])
            for a, layer in enumerate(moe):
                x = torch.from_numpy(np.asarray(tr.x[g, a]).astype(np.float32))[None]
                out = p.predict(layer, x)
                p.observe(layer, x, torch.from_numpy(np.asarray(tr.ids[g, a]).astype(np.int64))[None])
                for j in (1, 2):
                    b = a + j
                    target = moe[b] if b < M else moe[b - M] + tr.n_layers
                    want = want_all[spec.pairs().index((a, j)), base + r]
                    torch.testing.assert_close(out[target][0].float(), want, rtol=1e-3, atol=1e-3)
                    checked += 1
        base += n
    assert checked > 100


def test_stride_and_lookahead(traced, models, tmp_path):
    tr, _ = traced
    path = tmp_path / "p.pt"
    _train(tr, path, window=2)
    model = open_model(models["a"])
    n = model.config.n_layers
    full = load_mlp_predictor(path, model)                 # lookahead: the whole trained window
    one = load_mlp_predictor(path, model, lookahead=1)
    strided = load_mlp_predictor(path, model, stride=2)
    x = torch.from_numpy(np.asarray(tr.x[:3]).astype(np.float32))       # 3 tokens [3, M, d]
    ids = torch.from_numpy(np.asarray(tr.ids[:3]).astype(np.int64))
    outs = {id(p): [] for p in (full, one, strided)}
    for r in range(3):
        for p in (full, one, strided):
            p.begin_step([r])
            for a in range(2):
                outs[id(p)].append(p.predict(a, x[r, a][None]))
                p.observe(a, x[r, a][None], ids[r, a][None])
    assert [sorted(o) for o in outs[id(full)][:2]] == [[1, n], [n, n + 1]]
    assert [sorted(o) for o in outs[id(one)][:2]] == [[1], [n]]
    assert [sorted(o) for o in outs[id(strided)][:2]] == [[1, n], []]     # slot 1 does not predict
    for o_full, o_str in zip(outs[id(full)][::2], outs[id(strided)][::2]):   # same state, same scores
        for t in o_full:
            torch.testing.assert_close(o_full[t], o_str[t])
    with pytest.raises(ModelError, match="needs a file"):
        make_predictor("mlp", model)


# ---- metrics on hand-built cases ----------------------------------------------------------------
def test_set_metrics_by_hand():
    pred = np.array([[0, 1], [2, 3], [4, 5], [-1, -1]])     # last instance: no prediction
    true = np.array([[1, 0], [3, 7], [6, 7], [0, 1]])
    m = set_metrics(pred, true)
    # hits 2 + 1 + 0 = 3; predicted 6; true 8
    assert (m["hits"], m["n_pred"], m["n_true"]) == (3, 6, 8)
    assert m["accuracy"] == pytest.approx(0.5) and m["recall"] == pytest.approx(3 / 8)
    # more predicted than chosen: recall up, precision down
    m = set_metrics(np.array([[0, 1, 2]]), np.array([[2, 5]]))
    assert m["accuracy"] == pytest.approx(1 / 3) and m["recall"] == pytest.approx(1 / 2)
    assert set_metrics(np.full((2, 2), -1), np.zeros((2, 2)))["accuracy"] is None


def test_fetch_timeline_by_hand():
    # three copies of 1 s each, all issued at 0 with deadline 2: the first two make it, the third
    # would end at 3 > 2 and is skipped
    ok = fetch_timeline(np.zeros(3), np.full(3, 2.0), np.ones(3))
    assert ok.tolist() == [True, True, False]
    # a copy that cannot finish in time is skipped and does not hold the link: the second would end
    # at 2 > 1.5, so the third starts at 1 (its issue time) and ends at 2 <= 2.5
    ok = fetch_timeline(np.array([0.0, 0.0, 1.0]), np.array([1.0, 1.5, 2.5]), np.array([1.0, 1.0, 1.0]))
    assert ok.tolist() == [True, False, True]
    ok = fetch_timeline(np.array([0.0, 0.0, 0.5]), np.array([1.0, 2.0, 2.2]), np.array([1.0, 1.0, 1.0]))
    assert ok.tolist() == [True, True, False]      # third waits for the link until 2, would end at 3
    assert parse_link("25GB/s") == ("bw", 25e9)
    assert parse_link("1GiB/s") == ("bw", 2.0**30)
    assert parse_link("ratio=2.5") == ("ratio", 2.5)
    with pytest.raises(ModelError, match="is not 'NGB/s"):           # the runtime's grammar and message
        parse_link("fast")


def test_evaluate_definitions(traced, models, tmp_path):
    """Oracle: everything right; none: nothing predicted; gate: no cross-token predictions; goodpred =
    accuracy x fetch rate; the fetch rate in ratio mode by hand."""
    tr, _ = traced
    # ratio=1: one expert's copy takes one layer's compute; k = 2 copies are queued per source layer,
    # issued at the source (latency 0) and due one layer later: the first finishes exactly in time, the
    # second cannot and is skipped -> fetch rate 1/2 at distance 1
    rep = evaluate(models["a"], tr.path, ["oracle", "none", "gate", "freq", "history"], lookahead=2,
                   link="ratio=1", layer_time=1e-3, progress=False, pred_latency=0.0)
    rows = {(r["predictor"], r["lookahead"]): r for r in rep["rows"]}
    for r in rep["rows"]:
        assert all(k in r for k in REQUIRED_KEYS)
        if r["accuracy"] is not None and r["fetch_rate"] is not None:
            assert r["goodpred"] == pytest.approx(r["accuracy"] * r["fetch_rate"], abs=2e-4)
    assert rows[("freq", 1)]["fetch_rate"] == 0.5 and rows[("history", 1)]["fetch_rate"] == 0.5
    # the oracle's first copy per source layer is right and in time, the second skipped: it covers
    # half of what is used; a fast link covers everything
    assert rows[("oracle", 1)]["coverage"] == pytest.approx(0.5, abs=0.02)
    assert rows[("none", 1)]["coverage"] == 0.0
    # at distance 2 the first source layer gets both copies in (the link starts idle), then 1/2
    n = 2 * len(truth(tr, tr.rows("eval"), 1)[0])
    assert rows[("freq", 2)]["fetch_rate"] == pytest.approx((n + 1) / (2 * n), abs=1e-4)
    for ratio, want in (("0.5", 1.0), ("2", 0.0)):      # half a layer per copy: all in; two layers: none
        r = evaluate(models["a"], tr.path, ["freq"], lookahead=1, link=f"ratio={ratio}", layer_time=1e-3,
                     progress=False, pred_latency=0.0)["rows"][0]
        assert r["fetch_rate"] == want
        assert r["goodpred"] == (0.0 if want == 0 else r["accuracy"])
    assert rows[("oracle", 1)]["accuracy"] == 1.0 and rows[("oracle", 1)]["recall"] == 1.0
    assert rows[("oracle", 2)]["accuracy"] == 1.0
    assert rows[("none", 1)]["accuracy"] is None and rows[("none", 1)]["recall"] == 0.0
    # 2 MoE layers: at distance 1 the source layer 1 targets the next token -> gate says nothing
    assert rows[("gate", 1)]["accuracy_cross"] is None and rows[("gate", 1)]["recall_cross"] == 0.0
    assert rows[("gate", 1)]["accuracy_intra"] == rows[("gate", 1)]["accuracy"]
    # truth: the target of the last token's cross-token prediction does not exist
    T, V = truth(tr, tr.rows("eval"), 2)
    last = np.cumsum([s["n_prompt"] + s["n_decode"] for s in tr.seqs("eval")]) - 1
    assert not V[last, 1, 0].any() and V[last, 0, 0].all()
    # fast link: everything is fetchable
    rep = evaluate(models["a"], tr.path, ["freq", "oracle"], lookahead=1, link="25GB/s", layer_time=1e-3,
                   progress=False)
    assert rep["rows"][0]["fetch_rate"] == 1.0
    assert rep["rows"][0]["coverage"] == rep["rows"][0]["recall"] and rep["rows"][1]["coverage"] == 1.0


def test_history_and_freq_predictors(traced, models):
    tr, _ = traced
    model = open_model(models["a"])
    freq = make_predictor("freq", model, lookahead=2)            # online counts
    x = torch.zeros(1, model.config.n_embd)
    freq.begin_step([0])
    freq.observe(0, x, torch.tensor([[3, 5]]))
    out = freq.predict(1, x)
    assert set(out) == {model.config.n_layers + 0, model.config.n_layers + 1}   # next token's layers
    assert set(torch.topk(out[model.config.n_layers], 2).indices[0].tolist()) == {3, 5}
    hist = make_predictor(f"history:{tr.path}", model, lookahead=1)
    hist.reset()
    hist.begin_step([0])
    assert 1 in hist.predict(0, x)
    hist.observe(0, x, torch.tensor([[1, 2]]))
    n = len(hist.library)
    hist.reset()
    assert len(hist.library) == n + 1           # the finished request joins the library


def test_leading_dense_layer(factory, prompts_file, tmp_path):
    """DeepSeek layout: layer 0 is dense, MoE layers 1..; lookahead counts MoE layers, across tokens too."""
    from promoe_gguf import Engine
    path = factory.make_float_model("deepseek", tmp_path / "ds.gguf")
    eng = Engine(str(path), n_ctx=128, n_batch=16)
    tr = Trace(trace_prompts(eng, load_prompts(prompts_file), tmp_path / "tr", n_decode=3, progress=False))
    assert tr.moe_layers == [1, 2] and tr.n_layers == 3
    _train(tr, tmp_path / "p.pt", window=2)
    rep = evaluate(str(path), tr.path, ["oracle", f"mlp:{tmp_path / 'p.pt'}", "gate"], lookahead=2,
                   layer_time=1e-3, progress=False)
    rows = {(r["predictor"].split(":")[0], r["lookahead"]): r for r in rep["rows"]}
    assert rows[("oracle", 1)]["accuracy"] == 1.0 and rows[("oracle", 2)]["accuracy"] == 1.0
    assert rows[("mlp", 2)]["recall"] > 0 and rows[("gate", 2)]["recall"] == 0.0
    targets = {p["target"] for p in rep["pairs"] if p["predictor"] == "oracle"}
    assert targets == {2, "next:1", "next:2"}


# ---- CLI ----------------------------------------------------------------------------------------
def test_cli_smoke(models, prompts_file, tmp_path, capsys):
    from promoe_gguf.cli.main import main
    tr = tmp_path / "trace"
    assert main(["trace", models["a"], "--prompts", str(prompts_file), "--out", str(tr), "--decode", "3",
                 "--n-ctx", "128", "-q"]) == 0
    assert "wrote" in capsys.readouterr().out
    pred = tmp_path / "p.pt"
    assert main(["train-predictor", str(tr), "--out", str(pred), "--window", "2", "--ctx", "2", "--hidden", "8",
                 "--epochs", "1", "--model", models["a"], "-q"]) == 0
    assert "validation accuracy" in capsys.readouterr().out
    png = tmp_path / "acc.png"
    assert main(["eval-predictor", models["a"], "--trace", str(tr), "--predictors", f"gate,mlp:{pred},freq",
                 "--lookahead", "2", "--layer-time", "0.001", "--json", "--png", str(png),
                 "--out", str(tmp_path / "r.json"), "-q"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["predictor"], r["lookahead"]) for r in rows} == {(p, j) for p in ("gate", f"mlp:{pred}", "freq")
                                                               for j in (1, 2)}
    assert all(all(k in r for k in REQUIRED_KEYS) for r in rows)
    assert png.stat().st_size > 1000 and json.loads((tmp_path / "r.json").read_text())["cost"]
    # errors are clear and exit 2
    assert main(["eval-predictor", models["b"], "--trace", str(tr), "--layer-time", "0.001", "-q"]) == 2
    assert "router weights hash" in capsys.readouterr().err
    assert main(["train-predictor", str(tmp_path / "nope"), "--out", str(pred)]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["eval-predictor", models["a"], "--trace", str(tr), "--predictors", "psychic",
                 "--layer-time", "0.001", "-q"]) == 2
    assert "--predictors: 'psychic' is not one of none, gate" in capsys.readouterr().err
