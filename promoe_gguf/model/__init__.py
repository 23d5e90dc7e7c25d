"""Forward passes in torch, one file per model family; `build_decoder` picks the family by arch."""
from ..errors import ModelError
from .deepseek import DeepSeek
from .glm4_moe import GLM4MoE
from .gpt_oss import GptOss
from .mixtral import Mixtral
from .olmoe import OLMoE
from .qwen35_moe import Qwen35MoE
from .qwen_moe import QwenMoE

FAMILIES = {arch: cls for cls in (Mixtral, QwenMoE, OLMoE, DeepSeek, GLM4MoE, GptOss, Qwen35MoE) for arch in cls.archs}


def build_decoder(model, experts, backend):
    cls = FAMILIES.get(model.config.arch)
    if cls is None:
        raise ModelError(f"{model.path}: no forward pass for architecture {model.config.arch!r} "
                         f"(supported: {', '.join(FAMILIES)})")
    return cls(model, experts, backend)
