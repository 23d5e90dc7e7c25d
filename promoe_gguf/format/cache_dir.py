"""CachedModel: a converted cache directory (see converter.py) behind the MoEModel interface.

Nothing in manifest.json is trusted: every field is type- and range-checked (an error names the
field, e.g. `experts[5].matrices[1].offset`), every matrix must lie inside experts.bin, and the
model is validated as a whole (validate.py) with the experts' shapes taken from the manifest.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np
from gguf import GGMLQuantizationType
from tqdm import tqdm

from ..errors import ModelError
from .config import config_from_metadata
from .converter import FORMAT, FORMAT_VERSION, MATRIX_ALIGN, file_sha256
from .expert_index import MATRICES, MatrixSlice
from .gguf_file import field_value, read_gguf
from .model_file import MoEModel
from .quants import QUANT_TYPES, tensor_nbytes
from .validate import MAX_DIM, check_ranges, checked_config

MAX_OFFSET = 1 << 50          # a petabyte: any offset beyond is damage, whatever experts.bin's size


class CachedModel(MoEModel):
    """`verify`: "full" hashes every expert on open (progress bar); "lazy" checks each on first read."""

    def __init__(self, path: str, verify: str = "full", progress: bool = False):
        if verify not in ("full", "lazy"):
            raise ValueError("verify must be 'full' or 'lazy'")
        self.path = os.fspath(path)
        manifest = self._load_manifest()
        resident_entry = self._field(manifest, "resident", dict)
        resident = self._member(self._field(resident_entry, "file", str, "resident.file"), "resident.file")
        self.gguf_path = resident  # metadata + tokenizer + resident tensors
        if verify == "full" and file_sha256(resident) != resident_entry.get("sha256"):
            raise self._fail(f"checksum mismatch for {os.path.basename(resident)} (corrupt)")
        reader = read_gguf(resident)
        self._init_resident(reader)
        meta = lambda k: field_value(reader, k)  # noqa: E731
        cfg = config_from_metadata(meta, resident)
        cfg = dataclasses.replace(cfg, n_ff_exp=self._int(manifest, "n_ff_exp", 1, MAX_DIM, "n_ff_exp"))
        check_ranges(cfg, meta, resident)        # bounded layer/expert counts before the index is built
        experts_path = self._member(self._field(manifest, "experts_file", str), "experts_file")
        self._data = np.memmap(experts_path, dtype=np.uint8, mode="c") if os.path.getsize(experts_path) else \
            np.zeros(0, np.uint8)
        self._experts, self._sha, self._verified = {}, {}, set()
        self._index(self._field(manifest, "experts", list), len(self._data), cfg)
        shapes, labels = self._shapes(cfg)
        self.config = checked_config(cfg, shapes, meta, resident, origin={"n_ff_exp": "manifest.json n_ff_exp"},
                                     labels=labels)
        self._drop_nextn_blocks()
        self._check_complete()
        if verify == "full":
            for key in tqdm(self.expert_keys, desc="verify experts", disable=not progress):
                self._verify(key)

    def _fail(self, what: str) -> ModelError:
        return ModelError(f"{self.path}: {what}")

    # ---- typed manifest fields ------------------------------------------------------------
    def _field(self, obj: dict, key: str, kind: type, name: str | None = None):
        name = name or key
        if not isinstance(obj, dict) or key not in obj:
            raise self._fail(f"manifest.json lacks {name!r}")
        v = obj[key]
        if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
            raise self._fail(f"manifest.json: {name} = {_short(v)} is not a {kind.__name__}")
        return v

    def _int(self, obj: dict, key: str, lo: int, hi: int, name: str) -> int:
        v = self._field(obj, key, int, name)
        if not lo <= v <= hi:
            raise self._fail(f"manifest.json: {name} = {v} is outside [{lo}, {hi}]")
        return v

    def _member(self, name: str, field: str) -> str:
        """A file of this directory, named by a manifest field (no path of its own)."""
        if not name or os.path.basename(name) != name or name in (".", ".."):
            raise self._fail(f"manifest.json: {field} = {name!r} is not a file name in the cache directory")
        p = os.path.join(self.path, name)
        if not os.path.isfile(p):
            raise self._fail(f"{name} is missing (manifest.json {field})")
        return p

    def _load_manifest(self) -> dict:
        mpath = os.path.join(self.path, "manifest.json")
        try:
            with open(mpath) as f:
                m = json.load(f)
        except FileNotFoundError:
            raise self._fail("not a promoe cache directory (manifest.json missing)") from None
        except (OSError, ValueError) as e:
            raise self._fail(f"manifest.json is unreadable: {e}") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise self._fail("manifest.json is not a promoe expert-cache manifest")
        if m.get("version") != FORMAT_VERSION:
            raise self._fail(f"cache format version {_short(m.get('version'))} is not supported "
                             f"(expected {FORMAT_VERSION})")
        return m

    # ---- the expert table -------------------------------------------------------------------
    def _matrix(self, m, name: str, where: str, size: int) -> MatrixSlice:
        if self._field(m, "matrix", str, f"{where}.matrix") != name:
            raise self._fail(f"manifest.json: {where}.matrix = {_short(m['matrix'])}, expected {name!r} "
                             f"(matrices are gate, up, down)")
        qname = self._field(m, "qtype", str, f"{where}.qtype")
        qtype = GGMLQuantizationType.__members__.get(qname)
        if qtype is None or qtype not in QUANT_TYPES:
            raise self._fail(f"manifest.json: {where}.qtype = {qname!r} is not a supported quant type")
        shape = self._field(m, "shape", list, f"{where}.shape")
        if len(shape) != 2 or not all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= MAX_DIM
                                      for d in shape):
            raise self._fail(f"manifest.json: {where}.shape = {_short(shape)} is not [rows, cols] within [1, {MAX_DIM}]")
        off = self._int(m, "offset", 0, MAX_OFFSET, f"{where}.offset")
        nb = self._int(m, "nbytes", 1, MAX_OFFSET, f"{where}.nbytes")
        try:
            want = tensor_nbytes(qtype, tuple(shape))
        except ModelError as e:
            raise self._fail(f"manifest.json: {where}: {e}") from None
        if nb != want:
            raise self._fail(f"manifest.json: {where}.nbytes = {nb}, but a {qname} {shape} matrix is {want} bytes")
        if off % MATRIX_ALIGN:
            raise self._fail(f"manifest.json: {where}.offset = {off} is not aligned to {MATRIX_ALIGN}")
        if off + nb > size:
            raise self._fail(f"manifest.json: {where} (bytes {off}..{off + nb}) lies outside experts.bin "
                             f"({size} bytes; truncated?)")
        return MatrixSlice(name, qtype, (shape[0], shape[1]), off, nb)

    def _index(self, entries: list, size: int, cfg) -> None:
        moe = set(cfg.moe_layers)
        for i, e in enumerate(entries):
            where = f"experts[{i}]"
            if not isinstance(e, dict):
                raise self._fail(f"manifest.json: {where} = {_short(e)} is not an object")
            layer = self._int(e, "layer", 0, cfg.n_layers - 1, f"{where}.layer")
            expert = self._int(e, "expert", 0, cfg.n_experts - 1, f"{where}.expert")
            if layer not in moe:
                raise self._fail(f"manifest.json: {where}.layer = {layer} is a dense layer (no routed experts)")
            if (layer, expert) in self._experts:
                raise self._fail(f"manifest.json: {where} lists expert {expert} of layer {layer} a second time")
            mats = self._field(e, "matrices", list, f"{where}.matrices")
            if len(mats) != len(MATRICES):
                raise self._fail(f"manifest.json: {where}.matrices has {len(mats)} entries, expected 3 (gate, up, down)")
            self._experts[(layer, expert)] = tuple(self._matrix(m, name, f"{where}.matrices[{j}]", size)
                                                   for j, (m, name) in enumerate(zip(mats, MATRICES)))
            self._sha[(layer, expert)] = str(self._field(e, "sha256", str, f"{where}.sha256"))

    def _check_complete(self) -> None:
        """Every expert of every MoE layer listed (after validation: the counts match the tensors)."""
        cfg = self.config
        want = {(layer, e) for layer in cfg.moe_layers for e in range(cfg.n_experts)}
        if set(self._experts) != want:
            missing = sorted(want - set(self._experts))[:3]
            raise self._fail(f"manifest does not list every expert of the model (missing e.g. {missing})")

    def _shapes(self, cfg) -> tuple[dict, dict]:
        """Tensor shapes for validation: the resident tensors', and per MoE layer the experts' matrices
        stacked as the GGUF holds them ([n_expert, rows, cols]); all experts of a layer must agree."""
        shapes = {name: ref.shape for name, ref in self._resident.items()}
        labels = {f"blk.{layer}.ffn_{m}_exps.weight": f"the {m} matrices of layer {layer} in manifest.json"
                  for layer in cfg.moe_layers for m in MATRICES}
        by_layer = {}
        for (layer, expert), mats in sorted(self._experts.items()):
            first = by_layer.setdefault(layer, (expert, mats))
            if tuple(m.shape for m in mats) != tuple(m.shape for m in first[1]):
                raise self._fail(f"manifest.json: expert {expert} of layer {layer} has matrix shapes "
                                 f"{[m.shape for m in mats]}, expert {first[0]} has {[m.shape for m in first[1]]}")
        counts = {layer: sum(1 for (lay, _) in self._experts if lay == layer) for layer in by_layer}
        for layer, (_, mats) in by_layer.items():
            for m in mats:
                shapes[f"blk.{layer}.ffn_{m.matrix}_exps.weight"] = (counts[layer], *m.shape)
        return shapes, labels

    def _verify(self, key: tuple[int, int]) -> None:
        h = hashlib.sha256()
        for m in self._experts[key]:
            h.update(self._data[m.offset:m.offset + m.nbytes])
        if h.hexdigest() != self._sha[key]:
            raise self._fail(f"checksum mismatch for expert {key[1]} of layer {key[0]} (experts.bin is corrupt)")
        self._verified.add(key)

    def _check_expert(self, layer, expert):
        mats = super()._check_expert(layer, expert)
        key = (int(layer), int(expert))
        if key not in self._verified:
            self._verify(key)
        return mats


def _short(v, limit: int = 60) -> str:
    """repr of a manifest value, cut short (a damaged field may hold a whole document)."""
    r = repr(v)
    return r if len(r) <= limit else r[:limit] + "..."
