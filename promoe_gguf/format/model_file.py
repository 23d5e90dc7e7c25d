"""MoEModel: one opened model, from a GGUF file or a converted cache directory.

Both sources give the same interface: `config`, the expert index (`expert_matrices`), raw expert
bytes (`read_expert`, `matrix_bytes`), the resident (non-expert) tensors and the metadata.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from ..errors import ModelError
from .config import ModelConfig, config_from_metadata
from .expert_index import MATRICES, MatrixSlice, build_expert_index, is_expert_tensor
from .gguf_file import field_value, read_gguf
from .quants import dequantize, quant_type
from .validate import checked_config


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """A resident tensor: `shape` in numpy order (ne reversed), raw bytes at `offset` in the file."""
    name: str
    qtype: object
    shape: tuple[int, ...]
    offset: int
    nbytes: int


class MoEModel:
    """Common interface; subclasses fill `_data` (uint8 memmap), `_experts`, `_resident`, `_reader`."""
    path: str
    config: ModelConfig
    _data: np.ndarray
    _experts: dict[tuple[int, int], tuple[MatrixSlice, ...]]

    def _init_resident(self, reader) -> None:
        self._reader = reader
        self._resident = {
            t.name: TensorRef(t.name, t.tensor_type, tuple(int(d) for d in reversed(t.shape)),
                              int(t.data_offset), int(t.n_bytes))
            for t in reader.tensors if not is_expert_tensor(t.name)}

    def _drop_nextn_blocks(self) -> None:
        """(once config is known) The NextN blocks after the last layer are in the file but never run:
        their tensors are not resident weights (llama.cpp skips loading them too)."""
        n = self.config.n_layers
        nextn = {name for name in self._resident if name.startswith("blk.") and int(name.split(".", 2)[1]) >= n}
        self._nextn = {name: self._resident.pop(name) for name in sorted(nextn)}

    @property
    def nextn_refs(self) -> list[TensorRef]:
        """The NextN blocks' non-expert tensors: kept by a conversion (the cache describes the same
        file), never read by the forward pass."""
        return list(self._nextn.values())

    # ---- metadata -------------------------------------------------------------------------
    def metadata(self, key: str, default=None):
        return field_value(self._reader, key, default)

    @property
    def metadata_keys(self) -> list[str]:
        return [k for k in self._reader.fields if not k.startswith("GGUF.")]

    # ---- experts --------------------------------------------------------------------------
    def _check_expert(self, layer: int, expert: int) -> tuple[MatrixSlice, ...]:
        try:
            return self._experts[(int(layer), int(expert))]
        except (KeyError, TypeError, ValueError):
            cfg = self.config
            if not 0 <= int(layer) < cfg.n_layers:
                raise ModelError(f"{self.path}: layer {layer} out of range (0..{cfg.n_layers - 1})") from None
            if int(layer) not in cfg.moe_layers:
                raise ModelError(f"{self.path}: layer {layer} has no routed experts (dense layer)") from None
            raise ModelError(f"{self.path}: expert {expert} out of range (0..{cfg.n_experts - 1})") from None

    def expert_matrices(self, layer: int, expert: int) -> tuple[MatrixSlice, ...]:
        """(gate, up, down) slices; offsets index this model's expert data."""
        return self._check_expert(layer, expert)

    def expert_nbytes(self, layer: int, expert: int) -> int:
        return sum(m.nbytes for m in self._check_expert(layer, expert))

    def matrix_bytes(self, layer: int, expert: int, matrix: str) -> np.ndarray:
        """Zero-copy uint8 view of one expert matrix."""
        m = self._check_expert(layer, expert)[MATRICES.index(matrix)]
        return self._data[m.offset:m.offset + m.nbytes]

    def read_expert(self, layer: int, expert: int) -> bytes:
        """Contract: the expert's quantized bytes, gate then up then down, exactly as in the GGUF."""
        return b"".join(self._data[m.offset:m.offset + m.nbytes].tobytes()
                        for m in self._check_expert(layer, expert))

    @property
    def expert_data(self) -> np.ndarray:
        """The uint8 map every MatrixSlice.offset indexes (the GGUF file, or experts.bin)."""
        return self._data

    @property
    def expert_keys(self) -> list[tuple[int, int]]:
        return sorted(self._experts)

    # ---- resident tensors -----------------------------------------------------------------
    @property
    def resident_names(self) -> list[str]:
        return list(self._resident)

    def has_tensor(self, name: str) -> bool:
        return name in self._resident

    def tensor_ref(self, name: str) -> TensorRef:
        try:
            return self._resident[name]
        except KeyError:
            raise ModelError(f"{self.path}: tensor {name!r} is missing") from None

    @property
    def resident_data(self) -> np.ndarray:
        """The uint8 map every resident TensorRef.offset indexes."""
        return self._reader.data

    def tensor_raw(self, name: str) -> np.ndarray:
        t = self.tensor_ref(name)
        return self._reader.data[t.offset:t.offset + t.nbytes]

    def tensor_f32(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """Dequantized float32 copy of a resident tensor; `shape` (numpy order) is checked if given."""
        t = self.tensor_ref(name)
        if shape is not None and tuple(shape) != t.shape:
            raise ModelError(f"{self.path}: tensor {name!r} has shape {t.shape}, expected {tuple(shape)}")
        return dequantize(self.tensor_raw(name), t.qtype, t.shape)

    # ---- sizes ----------------------------------------------------------------------------
    def expert_bytes_total(self) -> int:
        return sum(m.nbytes for ms in self._experts.values() for m in ms)

    def resident_bytes_total(self) -> int:
        return sum(t.nbytes for t in self._resident.values())

    def close(self) -> None:
        for obj in (getattr(self, "_data", None), getattr(self._reader, "data", None)):
            mm = getattr(obj, "_mmap", None)
            if mm is not None:
                try:
                    mm.close()
                except (BufferError, ValueError):
                    pass  # views still alive; the OS unmaps when they go

    def __repr__(self):
        c = self.config
        return f"<{type(self).__name__} {self.path!r} {c.arch} L={c.n_layers} E={c.n_experts} k={c.n_experts_used}>"


class GGUFModel(MoEModel):
    """A MoE model read in place from a GGUF file (memory-mapped)."""

    def __init__(self, path: str):
        self.path = self.gguf_path = os.fspath(path)
        reader = read_gguf(self.path)
        self._init_resident(reader)
        self._data = reader.data
        meta = lambda k: field_value(reader, k)  # noqa: E731
        cfg = config_from_metadata(meta, self.path)
        tensors = {t.name: t for t in reader.tensors}
        shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
        self.config = checked_config(cfg, shapes, meta, self.path)  # before any weight is read
        self._drop_nextn_blocks()
        self._experts = build_expert_index(tensors, self.config, self.path)
        for t in self._resident.values():
            if t.name.endswith(".weight") and not t.name.endswith("norm.weight"):
                quant_type(t.qtype)  # unsupported quant type -> ModelError
