"""The model's own tokenizer, through llama.cpp (llama-cpp-python, vocab only); chat prompts are rendered
by api.py's ChatTemplate from `chat_template` (the GGUF's tokenizer.chat_template)."""
from __future__ import annotations

from .errors import ModelError, one_line
from .util import quiet_stderr


class Tokenizer:
    def __init__(self, model):
        self.model = model
        self.bos_id = model.metadata("tokenizer.ggml.bos_token_id")
        self.eos_id = model.metadata("tokenizer.ggml.eos_token_id")
        self.chat_template = model.metadata("tokenizer.chat_template")
        self._llama = None

    @property
    def llama(self):
        if self._llama is None:
            if self.model.metadata("tokenizer.ggml.model") in (None, "none", "no_vocab"):
                raise ModelError(f"{self.model.path}: the model has no tokenizer (pass token ids instead)")
            import llama_cpp
            try:
                with quiet_stderr():
                    self._llama = llama_cpp.Llama(self.model.gguf_path, vocab_only=True, verbose=False)
            except (ValueError, RuntimeError) as e:   # llama.cpp refuses the tokenizer.* metadata
                raise ModelError(f"{self.model.path}: llama.cpp cannot load the tokenizer (tokenizer.ggml.* "
                                 f"metadata): {one_line(e)}") from e
        return self._llama

    def encode(self, text: str | bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        """`text`: a str, or its UTF-8 bytes (llama.cpp's tokenizer replaces invalid sequences with U+FFFD).
        special=True parses control-token text (e.g. a chat template's markers) into those tokens."""
        if not text:
            raise ModelError("empty prompt")
        if isinstance(text, str):
            try:
                text = text.encode("utf-8")
            except UnicodeEncodeError as e:          # a lone surrogate: not text any encoding can carry
                raise ModelError(f"the prompt is not valid Unicode text: {e.reason} at character {e.start}") from None
        return self.llama.tokenize(bytes(text), add_bos=add_bos, special=special)

    def decode(self, ids) -> bytes:
        return self.llama.detokenize(list(ids))

