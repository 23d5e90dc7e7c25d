"""`promoe convert`: rewrite a MoE GGUF into the expert-major cache layout.

OUT_DIR/
  experts.bin    every routed expert as one contiguous region aligned to EXPERT_ALIGN (one expert =
                 one DMA from pinned memory); inside it gate, up, down, each aligned to MATRIX_ALIGN
                 (a matrix is the copy chunk, so a precise request waits behind at most one)
  resident.gguf  the source's metadata and every non-expert tensor, copied (the directory is
                 self-contained: the source GGUF may be moved or deleted afterwards)
  manifest.json  format version, source identity (size, mtime, sha256 of its header), the config
                 fields derived from tensors, per expert: offset, size, sha256 of its bytes (the
                 concatenation read_expert returns), and per matrix: quant type, shape, offset, size
Streaming: one expert in memory at a time. Atomic: written to a temp dir beside OUT_DIR, renamed
at the end; any failure removes the temp dir.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time

from gguf import GGUFValueType, GGUFWriter
from gguf.quants import quant_shape_to_byte_shape
from tqdm import tqdm

from ..errors import ModelError
from ..util import cannot_write, output_folder
from .expert_index import MATRICES
from .model_file import GGUFModel

FORMAT = "promoe-expert-cache"
FORMAT_VERSION = 1
EXPERT_ALIGN = 4096
MATRIX_ALIGN = 256


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


def region_layout(matrices) -> tuple[list[int], int]:
    """Where an expert's gate, up and down sit in its region (each at a multiple of MATRIX_ALIGN from
    the region's start), and the region's size; regions start at multiples of EXPERT_ALIGN. The
    converted file, the host store and the resident packed buffers all lay experts out this way."""
    offs, pos = [], 0
    for m in matrices:
        pos = _align(pos, MATRIX_ALIGN)
        offs.append(pos)
        pos += m.nbytes
    return offs, pos


def header_sha256(model: GGUFModel) -> str:
    """Hash of the source GGUF's header (metadata + tensor infos): identifies the file cheaply."""
    return hashlib.sha256(model._reader.data[:model._reader.data_offset].tobytes()).hexdigest()


def _copy_metadata(reader, writer: GGUFWriter) -> None:
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vtype = field.types[0]
        value = field.contents()
        if vtype == GGUFValueType.ARRAY:
            if not value:
                continue  # gguf-py cannot write empty arrays; nothing we read depends on one
            writer.add_key_value(name, value, vtype, sub_type=field.types[-1])
        else:
            writer.add_key_value(name, value, vtype)


def _write_resident(model: GGUFModel, path: str) -> None:
    reader = model._reader
    writer = GGUFWriter(path, model.config.arch)
    _copy_metadata(reader, writer)
    for ref in [*model._resident.values(), *model.nextn_refs]:
        data = model.resident_data[ref.offset:ref.offset + ref.nbytes]
        writer.add_tensor(ref.name, data, raw_shape=quant_shape_to_byte_shape(ref.shape, ref.qtype),
                          raw_dtype=ref.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _write_experts(model: GGUFModel, path: str, progress: bool) -> list[dict]:
    entries, pos = [], 0
    keys = model.expert_keys
    with open(path, "wb") as out, tqdm(total=model.expert_bytes_total(), unit="B", unit_scale=True,
                                       desc="experts", disable=not progress) as bar:
        for layer, expert in keys:
            region, h, mats = pos, hashlib.sha256(), []
            matrices = model.expert_matrices(layer, expert)
            offs, size = region_layout(matrices)
            for m, off in zip(matrices, offs):
                data = model.matrix_bytes(layer, expert, m.matrix)
                out.seek(region + off)
                out.write(data.tobytes())
                h.update(data)
                mats.append({"matrix": m.matrix, "qtype": m.qtype.name, "shape": list(m.shape),
                             "offset": region + off, "nbytes": m.nbytes})
                bar.update(m.nbytes)
            entries.append({"layer": layer, "expert": expert, "offset": region, "size": size,
                            "sha256": h.hexdigest(), "matrices": mats})
            pos = _align(region + size, EXPERT_ALIGN)
        out.truncate(pos)
    return entries


def convert(model_path: str, out_dir: str, progress: bool = True) -> str:
    """Convert `model_path` (GGUF) into `out_dir` (must not exist). Returns out_dir."""
    given = os.fspath(out_dir)
    out_dir = os.path.abspath(given)
    if os.path.exists(out_dir):
        raise ModelError(f"{given}: output directory already exists (refusing to overwrite)")
    parent = output_folder(out_dir, given)
    model = GGUFModel(model_path)
    st = os.stat(model.path)
    try:
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    except OSError as e:
        raise cannot_write(e, given) from None
    try:
        experts = _write_experts(model, os.path.join(tmp, "experts.bin"), progress)
        _write_resident(model, os.path.join(tmp, "resident.gguf"))
        manifest = {
            "format": FORMAT, "version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": {"path": os.path.abspath(model.path), "size": st.st_size, "mtime": st.st_mtime,
                       "header_sha256": header_sha256(model)},
            "expert_align": EXPERT_ALIGN, "matrix_align": MATRIX_ALIGN, "matrices": list(MATRICES),
            "n_ff_exp": model.config.n_ff_exp,
            "resident": {"file": "resident.gguf",
                         "sha256": file_sha256(os.path.join(tmp, "resident.gguf"))},
            "experts_file": "experts.bin",
            "experts": experts,
        }
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
        model.close()
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        os.rename(tmp, out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (ModelError, KeyboardInterrupt)):
            raise
        if isinstance(e, OSError):                  # disk full, no access: named as given, not our temp dir
            raise ModelError(f"{cannot_write(e, given)}; nothing was written") from e
        raise ModelError(f"converting {model_path} failed ({type(e).__name__}: {e}); nothing was written") from e
    return out_dir
