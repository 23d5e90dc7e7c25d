"""CachedModel: a converted cache directory (see converter.py) behind the MoEModel interface."""
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
from .quants import tensor_nbytes


class CachedModel(MoEModel):
    """`verify`: "full" hashes every expert on open (progress bar); "lazy" checks each on first read."""

    def __init__(self, path: str, verify: str = "full", progress: bool = False):
        if verify not in ("full", "lazy"):
            raise ValueError("verify must be 'full' or 'lazy'")
        self.path = os.fspath(path)
        manifest = self._load_manifest()
        resident = os.path.join(self.path, manifest["resident"]["file"])
        self.gguf_path = resident  # metadata + tokenizer + resident tensors
        reader = read_gguf(resident)
        self._init_resident(reader)
        cfg = config_from_metadata(lambda k: field_value(reader, k), resident)
        self.config = dataclasses.replace(cfg, n_ff_exp=int(manifest["n_ff_exp"]))
        experts_path = os.path.join(self.path, manifest["experts_file"])
        self._data = np.memmap(experts_path, dtype=np.uint8, mode="c") if os.path.getsize(experts_path) else \
            np.zeros(0, np.uint8)
        self._experts, self._sha, self._verified = {}, {}, set()
        self._index(manifest, len(self._data))
        if verify == "full":
            if file_sha256(resident) != manifest["resident"].get("sha256"):
                raise self._fail(f"checksum mismatch for {manifest['resident']['file']} (corrupt)")
            for key in tqdm(self.expert_keys, desc="verify experts", disable=not progress):
                self._verify(key)

    def _fail(self, what: str) -> ModelError:
        return ModelError(f"{self.path}: {what}")

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
            raise self._fail(f"cache format version {m.get('version')} is not supported (expected {FORMAT_VERSION})")
        for key in ("resident", "experts_file", "experts", "n_ff_exp"):
            if key not in m:
                raise self._fail(f"manifest.json lacks {key!r}")
        return m

    def _index(self, manifest: dict, size: int) -> None:
        cfg = self.config
        try:
            for e in manifest["experts"]:
                key = (int(e["layer"]), int(e["expert"]))
                mats = []
                for m, name in zip(e["matrices"], MATRICES, strict=True):
                    if m["matrix"] != name:
                        raise ValueError(f"matrix order {m['matrix']} != {name}")
                    qtype = GGMLQuantizationType[m["qtype"]]
                    shape = (int(m["shape"][0]), int(m["shape"][1]))
                    off, nb = int(m["offset"]), int(m["nbytes"])
                    if nb != tensor_nbytes(qtype, shape) or off % MATRIX_ALIGN or off < 0 or off + nb > size:
                        raise ValueError(f"matrix {name} geometry is inconsistent or outside experts.bin")
                    mats.append(MatrixSlice(name, qtype, shape, off, nb))
                self._experts[key] = tuple(mats)
                self._sha[key] = str(e["sha256"])
        except (KeyError, TypeError, ValueError) as err:
            raise self._fail(f"manifest.json expert table is malformed: {err}") from None
        want = {(layer, e) for layer in cfg.moe_layers for e in range(cfg.n_experts)}
        if set(self._experts) != want:
            missing = sorted(want - set(self._experts))[:3]
            raise self._fail(f"manifest does not list every expert of the model (missing e.g. {missing})")

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
