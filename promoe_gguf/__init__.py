"""promoe-gguf: GGUF MoE models on GPUs too small for all their experts (ProMoE-style prefetching)."""
from .errors import ModelError
from .format import ModelConfig, dequantize, open_model
from .paths import DEFAULT_MODEL

__all__ = ["ModelError", "ModelConfig", "dequantize", "open_model", "DEFAULT_MODEL", "Engine"]


def __getattr__(name):
    # Engine pulls in the torch model code; import it only when asked for.
    if name == "Engine":
        from .engine import Engine
        return Engine
    raise AttributeError(name)
