"""The embedded default model: promoe_gguf/data/default-moe-q4_k_m.gguf and its model card.

Checks the shipped file (size, metadata, llama.cpp loads it), its quality on held-out standard
library text as llama.cpp scores it, and that its routing is neither collapsed nor uniform."""
from __future__ import annotations

import json

import pytest

from promoe_gguf.format import byte_vocab
from promoe_gguf.testing import tiny_moe as T

GGUF_PATH = T.SHIPPED_GGUF
CARD_PATH = T.MODEL_CARD
MAX_BYTES = 10 * 1024 * 1024
HELDOUT_BYTES = 2000      # ~2k held-out bytes: 4 windows of 511 bytes
MAX_BPB = 2.3


def _field(reader, key):
    return T.gguf_field(reader, key)


@pytest.fixture(scope="module")
def windows():
    w = T.heldout_windows(512, max_bytes=HELDOUT_BYTES)
    assert sum(len(x) - 1 for x in w) >= HELDOUT_BYTES
    return w


def test_shipped_file_exists_and_small():
    assert GGUF_PATH.is_file(), GGUF_PATH
    assert GGUF_PATH.stat().st_size <= MAX_BYTES


def test_metadata():
    gguf = pytest.importorskip("gguf")
    r = gguf.GGUFReader(str(GGUF_PATH))
    assert _field(r, "general.architecture") == "llama"
    assert _field(r, "general.name") == "promoe-tiny-moe"
    assert _field(r, "llama.expert_count") == 8
    assert _field(r, "llama.expert_used_count") == 2
    assert _field(r, "llama.context_length") >= 512
    bv = byte_vocab
    assert _field(r, "llama.vocab_size") == bv.N_VOCAB
    names = {t.name: t for t in r.tensors}
    n_layers = _field(r, "llama.block_count")
    n_embd = _field(r, "llama.embedding_length")
    n_ff = _field(r, "llama.feed_forward_length")
    for i in range(n_layers):
        assert list(names[f"blk.{i}.ffn_gate_exps.weight"].shape) == [n_embd, n_ff, 8]
        assert list(names[f"blk.{i}.ffn_up_exps.weight"].shape) == [n_embd, n_ff, 8]
        assert list(names[f"blk.{i}.ffn_down_exps.weight"].shape) == [n_ff, n_embd, 8]
        assert names[f"blk.{i}.ffn_gate_exps.weight"].tensor_type.name == "Q4_K"


def test_heldout_files_disjoint_from_training():
    held = set(T.heldout_files())
    assert held and not held & set(T.train_files())
    assert 0.02 < len(held) / len(T.corpus_files()) < 0.10


def test_llama_cpp_heldout_bits_per_byte(windows):
    pytest.importorskip("llama_cpp")
    bpb, nbytes = T.llama_bits_per_byte(GGUF_PATH, windows)
    assert nbytes >= HELDOUT_BYTES
    assert bpb <= MAX_BPB, f"{bpb:.3f} bits/byte on {nbytes} held-out bytes"


def test_routing_not_collapsed_nor_uniform(windows):
    """Torch forward on the GGUF's router/expert weights as gguf-py dequantizes them."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(2)
    model = T.model_from_gguf(GGUF_PATH)
    stats = T.routing_stats(model, windows)
    for layer, h in enumerate(stats["expert_usage_entropy_bits"]):
        assert 1.0 < h < 2.999, f"layer {layer}: expert-usage entropy {h:.3f} bits"


def test_torch_forward_matches_llama_cpp_on_dequantized_weights(windows):
    """The torch forward (tiny_moe/model.py) on gguf-py-dequantized weights tracks llama.cpp's
    quantized run (llama.cpp rounds activations to 8 bits, so a few % relative L2 is expected)."""
    pytest.importorskip("llama_cpp")
    model = T.model_from_gguf(GGUF_PATH)
    w = windows[0][:128]
    llm = T.open_llama(GGUF_PATH, n_ctx=512)
    err = T.rel_l2(T.llama_logits(llm, w), T.torch_logits(model, w))
    assert err <= 5e-2, err


def test_model_card_agrees_with_the_file_the_corpus_and_llama_cpp():
    """Each checkable claim of the model card against an independent source: the file's size, its
    GGUF metadata as gguf-py reads it, the held-out split's size from the corpus, and the greedy
    samples decoded again by llama.cpp from the same prompts, token by token."""
    gguf = pytest.importorskip("gguf")
    llama_cpp = pytest.importorskip("llama_cpp")
    card = json.loads(CARD_PATH.read_text())
    assert card["file"] == GGUF_PATH.name and card["file_bytes"] == GGUF_PATH.stat().st_size
    r = gguf.GGUFReader(str(GGUF_PATH))
    shape = card["shape"]
    for field, key in (("n_embd", "embedding_length"), ("n_layers", "block_count"), ("n_head", "attention.head_count"),
                       ("n_head_kv", "attention.head_count_kv"), ("n_ff_expert", "feed_forward_length"),
                       ("n_expert", "expert_count"), ("n_expert_used", "expert_used_count"), ("n_vocab", "vocab_size")):
        assert shape[field] == _field(r, f"llama.{key}"), field
    ev = card["eval"]
    assert ev["heldout_windows_total"] == len(T.heldout_windows(ev["window_tokens"]))
    assert ev["heldout_bytes_scored"] == ev["heldout_windows"] * (ev["window_tokens"] - 1)
    llm = llama_cpp.Llama(str(GGUF_PATH), n_ctx=512, n_threads=2, n_threads_batch=2, verbose=False)
    for sample in card["samples"][:2]:
        want = sample["greedy"].encode("utf-8")
        got = []
        for t in llm.generate([byte_vocab.BOS_ID, *sample["prompt"].encode("utf-8")], reset=True, temp=0.0, top_k=1,
                              repeat_penalty=1.0):
            if t >= 256 or len(got) >= len(want):
                break
            got.append(t)
        assert bytes(got) == want, sample["prompt"]
