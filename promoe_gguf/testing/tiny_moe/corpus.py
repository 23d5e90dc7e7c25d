"""The default model's corpus: the Python standard library's own .py sources, its deterministic
held-out split (a stable hash of each file's path relative to the standard library directory), the
token windows cut from it, and where the model's files live."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from ...format import byte_vocab
from ...paths import DATA

ROOT = Path(__file__).resolve().parents[3]    # the repository (build/ outputs go under it)
DATA_DIR = Path(DATA).resolve()               # the package's data dir, promoe_gguf/data
SHIPPED_GGUF = DATA_DIR / "default-moe-q4_k_m.gguf"
MODEL_CARD = DATA_DIR / "default-moe.json"
DEFAULT_OUT = ROOT / "build" / "tiny_moe"

MODEL_NAME = "promoe-tiny-moe"
SEED = 1234
HELDOUT_MODULUS = 20  # ~5% of files: sha256(relpath)[0:8] % 20 == 0
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                           "__pycache__"})


def stdlib_dir() -> str:
    return os.path.dirname(os.__file__)


def corpus_files() -> list[str]:
    """Sorted relative paths of the standard library's .py files (no tests, no site-packages)."""
    base = stdlib_dir()
    out = []
    for root, dirs, files in os.walk(base):
        dirs[:] = sorted(d for d in dirs if d not in EXCLUDED_DIRS)
        for f in files:
            if f.endswith(".py"):
                out.append(os.path.relpath(os.path.join(root, f), base).replace(os.sep, "/"))
    return sorted(out)


def is_heldout(relpath: str) -> bool:
    h = int.from_bytes(hashlib.sha256(relpath.encode("utf-8")).digest()[:8], "little")
    return h % HELDOUT_MODULUS == 0


def heldout_files() -> list[str]:
    """The held-out files (relative to `stdlib_dir()`); training never sees them."""
    return [f for f in corpus_files() if is_heldout(f)]


def train_files() -> list[str]:
    return [f for f in corpus_files() if not is_heldout(f)]


def load_stream(files: list[str]) -> np.ndarray:
    """The files' bytes concatenated in the given order, as uint8."""
    base = stdlib_dir()
    parts = []
    for f in files:
        with open(os.path.join(base, f), "rb") as fh:
            parts.append(np.frombuffer(fh.read(), dtype=np.uint8))
    return np.concatenate(parts) if parts else np.zeros(0, np.uint8)


def heldout_windows(n_ctx: int = 512, max_windows: int | None = None,
                    max_bytes: int | None = None) -> list[np.ndarray]:
    """Token windows [BOS, b0 .. b_{n_ctx-2}] cut without overlap from the held-out stream.

    Each window scores n_ctx-1 bytes. With max_windows, an evenly spaced deterministic subset.
    With max_bytes, the fewest windows that score at least that many bytes (evenly spaced)."""
    bos = byte_vocab.BOS_ID
    stream = load_stream(heldout_files())
    w = n_ctx - 1
    n_all = len(stream) // w
    idx = np.arange(n_all)
    if max_bytes is not None:
        max_windows = min(n_all, -(-max_bytes // w))
    if max_windows is not None and max_windows < n_all:
        idx = np.linspace(0, n_all - 1, max_windows).round().astype(np.int64)
    out = []
    for i in idx:
        chunk = stream[i * w:(i + 1) * w].astype(np.int64)
        out.append(np.concatenate([[bos], chunk]))
    return out
