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


def output_folder(path, what: str | None = None) -> str:
    """The folder `path` will be written into, which must exist and be writable. Errors name the path as
    the user gave it (`what`, e.g. "--out x.npy"), never the temporary file we write before renaming."""
    from .errors import ModelError
    what = what or os.fspath(path)
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(folder):
        raise ModelError(f"{what}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ModelError(f"{what}: the folder {folder} is not writable")
    return folder


def cannot_write(e: OSError, what: str):
    """The ModelError for an OSError while writing `what` (named as given, not our temporary file)."""
    from .errors import ModelError
    return ModelError(f"{what}: cannot write there: {e.strerror or e}")
