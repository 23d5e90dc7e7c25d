"""A byte-level tokenizer that stock llama.cpp accepts: token id b (0..255) is exactly raw byte b.

Design (checked against llama-cpp-python 0.3.35 / its vendored llama.cpp):

- ``tokenizer.ggml.model = "gpt2"`` (byte-level BPE). Token b's text is GPT-2's byte-to-unicode
  character for byte b (the same table llama.cpp uses in ``unicode_byte_to_utf8``), so llama.cpp's
  byte-level BPE maps every input byte to exactly one token and ``token_to_piece`` maps it back.
- No merges that can ever fire: gguf-py refuses an empty array, and llama.cpp's "gpt2" model
  requires the key, so it holds one inert merge of two multi-character symbols. BPE symbols start as
  single characters and nothing merges, so such a pair never occurs and every byte stays one token.
- ``tokenizer.ggml.pre = "qwen2"``: any regex pre-tokenizer works (with no merges, words are split
  into single characters anyway), but "default" turns on llama.cpp's ``clean_spaces``, which makes
  ``llama_detokenize`` drop the space in " ." / " ," / " 's" ...; "qwen2" has it off, so the C
  detokenizer is exact too.
- Special tokens after the bytes: BOS, EOS, UNK, PAD (control/unknown types, so they are only ever
  produced from text when parsing specials is asked for). add_bos true, add_eos false, no space prefix.

Caveat outside our control: llama-cpp-python's ``Llama.detokenize`` drops one leading space when the
first id is BOS (an SPM-era hack); detokenize ids without the BOS to get the exact bytes back.
"""
from __future__ import annotations

import gguf

N_BYTES = 256
BOS_ID = 256
EOS_ID = 257
UNK_ID = 258
PAD_ID = 259
N_VOCAB = 260

SPECIAL_TOKENS = {BOS_ID: "<s>", EOS_ID: "</s>", UNK_ID: "<unk>", PAD_ID: "<pad>"}

# A plain-text chat template (no special tokens in it, so it tokenizes byte for byte).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)

# never fires: BPE symbols start as single characters and no other merge exists
_INERT_MERGE = "<pad> <pad>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character table (as in llama.cpp's unicode.cpp)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
          + list(range(ord("\u00ae"), ord("\u00ff") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def token_texts() -> list[str]:
    """The token list, index = token id."""
    table = bytes_to_unicode()
    texts = [table[b] for b in range(N_BYTES)]
    texts += [SPECIAL_TOKENS[i] for i in range(N_BYTES, N_VOCAB)]
    return texts


def token_types() -> list[int]:
    types = [int(gguf.TokenType.NORMAL)] * N_BYTES
    for i in range(N_BYTES, N_VOCAB):
        types.append(int(gguf.TokenType.UNKNOWN if i == UNK_ID else gguf.TokenType.CONTROL))
    return types


def add_byte_vocab(writer: gguf.GGUFWriter, chat_template: bool = True, n_vocab: int = N_VOCAB) -> None:
    """Write the byte tokenizer's metadata into ``writer`` (call before ``write_header_to_file``);
    n_vocab above N_VOCAB pads it with unused tokens (a real model's embedding and output sizes)."""
    pad = n_vocab - N_VOCAB
    if pad < 0:
        raise ValueError(f"n_vocab {n_vocab} is below the byte vocabulary's {N_VOCAB} tokens")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(token_texts() + [f"<|unused_{i}|>" for i in range(pad)])
    writer.add_token_types(token_types() + [int(gguf.TokenType.UNUSED)] * pad)
    writer.add_token_merges([_INERT_MERGE])
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_unk_token_id(UNK_ID)
    writer.add_pad_token_id(PAD_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    if chat_template:
        writer.add_chat_template(CHAT_TEMPLATE)


def encode(text: str | bytes, add_bos: bool = False) -> list[int]:
    """Python-side tokenization, identical to llama.cpp's on this vocab (no specials parsed)."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return ([BOS_ID] if add_bos else []) + list(data)


def decode(ids) -> bytes:
    """Bytes of the byte tokens; special tokens decode to nothing (as llama.cpp with special=False)."""
    return bytes(int(i) for i in ids if 0 <= int(i) < N_BYTES)
