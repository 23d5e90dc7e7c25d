"""open_model: a GGUF file or a converted cache directory (above both readers: no import cycle)."""
from __future__ import annotations

import os

from .cache_dir import CachedModel
from .gguf_file import check_model_path
from .model_file import GGUFModel, MoEModel


def open_model(path, **kw) -> MoEModel:
    """Contract: open a GGUF file or a converted cache directory."""
    path = os.fspath(path)
    check_model_path(path)
    if os.path.isdir(path):
        return CachedModel(path, **kw)
    return GGUFModel(path)
