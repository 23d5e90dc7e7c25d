"""GGUF reading, quant types, the expert index and the expert-major cache layout."""
from .config import ModelConfig, SUPPORTED_ARCHS
from .loader import open_model
from .model_file import MoEModel
from .quants import QUANT_TYPES, dequantize, dequantize_torch, quant_type
from . import quants_iq  # noqa: F401,E402 - registers the codebook types and MXFP4 in QUANT_TYPES

__all__ = ["ModelConfig", "SUPPORTED_ARCHS", "MoEModel", "open_model", "QUANT_TYPES", "dequantize",
           "dequantize_torch", "quant_type"]
