"""Small shared helpers."""
from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def quiet_stderr():
    """Silence file descriptor 2 (llama.cpp logs from C, below Python's sys.stderr) for the duration."""
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)
