"""Header-only models: the published MoE architectures as llama.cpp's Q4_K_M (or F16) GGUFs lay them
out, without a byte of weights, so the simulator (and promoe_gguf.memory) can plan a 26 GB model.

`virtual_model(name)` returns an object with the MoEModel interface the planners read (`config`,
`resident_names`, `tensor_ref`, `has_tensor`, `expert_keys`, `expert_matrices`, sizes): every tensor's
GGUF name, dims and quant type, and therefore its exact byte size. Shapes and Q4_K_M types are
promoe_gguf.bench.real_shapes' (the real-shape model writer's, checked tensor by tensor against
llama.cpp's own quantizer); ':f16' keeps every tensor llama.cpp would quantize in F16 instead.
"""
from __future__ import annotations

from gguf import GGMLQuantizationType as T

from ..bench import real_shapes
from ..errors import ModelError
from ..format.config import config_from_metadata
from ..format.expert_index import MatrixSlice, is_expert_tensor
from ..format.model_file import MoEModel, TensorRef
from ..testing.spec import ModelSpec, metadata

QUANTS = ("q4_k_m", "f16")
ARCHS = real_shapes.SHAPES


class VirtualModel(MoEModel):
    """A MoEModel with an index and tensor table but no file: the planners' view of a model that does not
    exist here (reading bytes raises)."""

    def __init__(self, a: ModelSpec, quant: str = "q4_k_m", n_layers: int | None = None):
        mixes = {f.lower() for f in real_shapes.recorded_mixes().get(a.name, {})}
        if quant not in QUANTS and quant not in mixes:
            raise ModelError(f"shape quantization {quant!r}: one of {', '.join(QUANTS + tuple(sorted(mixes)))}")
        L = int(n_layers or a.n_layer)
        if not a.n_dense < L <= a.n_layer:
            raise ModelError(f"shape {a.name}: {L} layers is outside {a.n_dense + 1}..{a.n_layer}")
        if quant in mixes and L != a.n_layer:
            raise ModelError(f"shape {a.name}:{quant}: llama.cpp's mix is recorded for all {a.n_layer} layers, not {L}")
        self.arch_spec, self.quant = a, quant
        self.path = f"{a.name}:{quant}" + (f" ({L} layers)" if L != a.n_layer else "")
        # the config is parsed from the metadata a file of this shape carries, as from any GGUF
        meta = metadata(real_shapes.cut(a, L))
        self.config = config_from_metadata(meta.get, self.path)
        self._resident, self._experts = {}, {}
        ftype = "Q4_K_M" if quant in QUANTS else quant.upper()
        for t in real_shapes.tensor_plan(a.name, L if ftype == "Q4_K_M" else None, ftype):
            if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= L:
                continue                   # a NextN block: in the file, never loaded
            if quant == "f16" and real_shapes.is_quantized_by_llamacpp(t.name, t.ne):
                t = real_shapes.PlannedTensor(t.name, t.ne, T.F16)
            if not is_expert_tensor(t.name):      # gpt-oss's expert biases stay resident, as in a file
                self._resident[t.name] = TensorRef(t.name, t.qtype, tuple(reversed(t.ne)), 0, t.nbytes)
                continue
            layer, mat = int(t.name.split(".")[1]), t.name.split(".")[2][4:-5]     # blk.L.ffn_gate_exps.weight
            per_expert = MatrixSlice(mat, t.qtype, (t.ne[1], t.ne[0]), 0, t.nbytes // a.n_expert)
            for e in range(a.n_expert):
                self._experts[(layer, e)] = self._experts.get((layer, e), ()) + (per_expert,)

    def metadata(self, key, default=None):
        return default

    @property
    def metadata_keys(self) -> list[str]:
        return []

    def matrix_bytes(self, layer, expert, matrix):
        raise ModelError(f"{self.path} is a header-only shape: it has no weights to read")

    tensor_raw = read_expert = matrix_bytes

    def close(self) -> None:
        pass


def virtual_model(spec: str, n_layers: int | None = None) -> VirtualModel:
    """'qwen3-30b-a3b' or 'qwen3-30b-a3b:f16' -> its header-only model."""
    name, _, quant = spec.partition(":")
    if name not in ARCHS:
        raise ModelError(f"unknown shape {name!r}: one of {', '.join(ARCHS)} (or a GGUF file)")
    return VirtualModel(ARCHS[name], quant or "q4_k_m", n_layers)


def open_shape(spec: str):
    """A shape name, or any GGUF / converted cache directory (its header and index only are read)."""
    import os
    if os.path.exists(spec):
        from ..format import open_model
        return open_model(spec)
    return virtual_model(spec)
