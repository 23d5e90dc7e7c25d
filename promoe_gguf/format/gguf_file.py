"""Open a GGUF file safely: a bounds-checked header walk, then gguf-py's reader.

gguf-py trusts the counts and offsets in the file: a huge array count makes it loop for ever and
a truncated file gives numpy reshape errors. So `read_gguf` first walks the header with every count,
length and offset checked against the file size, and only then hands the file to `gguf.GGUFReader`.
Every failure is a ModelError that names the file and the field or tensor.
"""
from __future__ import annotations

import os
import stat
import struct

from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFValueType, GGMLQuantizationType

from ..errors import ModelError

GGUF_MAGIC = b"GGUF"
MAX_NAME = 65535            # llama.cpp's own limit for key and tensor name lengths is far below this
MAX_DIMS = 4                # GGML_MAX_DIMS
SCALAR_SIZES = {
    GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.BOOL: 1,
    GGUFValueType.UINT16: 2, GGUFValueType.INT16: 2,
    GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4,
    GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8,
}


class _Cursor:
    """Reads little-endian values from a file, refusing to run past its end."""

    def __init__(self, f, size: int, path: str):
        self.f, self.size, self.path, self.pos = f, size, path, 0

    def fail(self, what: str) -> ModelError:
        return ModelError(f"{self.path}: {what}")

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"file ends inside {what} (at byte {self.pos}, needs {n} more; truncated?)")
        self.f.seek(self.pos)
        b = self.f.read(n)
        self.pos += n
        return b

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack("<Q", self.take(8, what))[0]

    def string(self, what: str, limit: int | None = None) -> bytes:
        n = self.u64(f"length of {what}")
        if limit is not None and n > limit:
            raise self.fail(f"{what} is {n} bytes long (limit {limit})")
        return self.take(n, what)

    def skip(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"file ends inside {what} (truncated?)")
        self.pos += n


def _value_type(raw: int, cur: _Cursor, key: str) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise cur.fail(f"metadata key {key!r} has unknown value type {raw}") from None


def _skip_value(cur: _Cursor, vtype: GGUFValueType, key: str, depth: int = 0) -> int | None:
    """Skip one metadata value; returns the value of a UINT32 (for general.alignment)."""
    if vtype == GGUFValueType.STRING:
        cur.string(f"string value of {key!r}")
    elif vtype == GGUFValueType.ARRAY:
        if depth:
            raise cur.fail(f"metadata key {key!r} holds a nested array (not supported)")
        itype = _value_type(cur.u32(f"array type of {key!r}"), cur, key)
        count = cur.u64(f"array length of {key!r}")
        min_item = 8 if itype == GGUFValueType.STRING else SCALAR_SIZES.get(itype, 12)
        if count * min_item > cur.size - cur.pos:
            raise cur.fail(f"metadata array {key!r} claims {count} items, more than the file holds")
        if itype in SCALAR_SIZES:
            cur.skip(count * SCALAR_SIZES[itype], f"array {key!r}")
        else:
            for _ in range(count):
                _skip_value(cur, itype, key, depth + 1)
    else:
        size = SCALAR_SIZES[vtype]
        b = cur.take(size, f"value of {key!r}")
        if vtype == GGUFValueType.UINT32:
            return struct.unpack("<I", b)[0]
    return None


def validate_gguf(path: str) -> None:
    """Walk the GGUF header of `path` with bounds checks; raise ModelError on anything off."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        cur = _Cursor(f, size, path)
        if size < 24 or cur.take(4, "magic") != GGUF_MAGIC:
            raise ModelError(f"{path}: not a GGUF file (bad magic)")
        version = cur.u32("version")
        if version not in (2, 3):
            raise ModelError(f"{path}: unsupported GGUF version {version} (big-endian files are not supported)")
        n_tensors, n_kv = cur.u64("tensor count"), cur.u64("metadata count")
        if n_kv * 13 > size or n_tensors * 24 > size:
            raise cur.fail(f"header claims {n_kv} metadata keys and {n_tensors} tensors, more than the file holds")
        keys, alignment = set(), 32
        for _ in range(n_kv):
            key = cur.string("metadata key", MAX_NAME).decode("utf-8", "replace")
            if key in keys:
                raise cur.fail(f"duplicate metadata key {key!r}")
            keys.add(key)
            vtype = _value_type(cur.u32(f"type of {key!r}"), cur, key)
            value = _skip_value(cur, vtype, key)
            if key == "general.alignment":
                if vtype != GGUFValueType.UINT32 or not value or value & (value - 1):
                    raise cur.fail("general.alignment must be a power-of-two uint32")
                alignment = value
        infos, names = [], set()
        for _ in range(n_tensors):
            name = cur.string("tensor name", MAX_NAME).decode("utf-8", "replace")
            if name in names:
                raise cur.fail(f"duplicate tensor {name!r}")
            names.add(name)
            n_dims = cur.u32(f"dimension count of tensor {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
            dims = [cur.u64(f"dimensions of tensor {name!r}") for _ in range(n_dims)]
            raw_type = cur.u32(f"type of tensor {name!r}")
            offset = cur.u64(f"offset of tensor {name!r}")
            infos.append((name, dims, raw_type, offset))
        data_start = -(-cur.pos // alignment) * alignment
        for name, dims, raw_type, offset in infos:
            try:
                qtype = GGMLQuantizationType(raw_type)
                block, type_size = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise cur.fail(f"tensor {name!r} has unknown type id {raw_type}") from None
            if any(d == 0 or d > size * block for d in dims):
                raise cur.fail(f"tensor {name!r} has impossible dimensions {dims}")
            if dims[0] % block:
                raise cur.fail(f"tensor {name!r} ({qtype.name}): row length {dims[0]} is not a multiple of {block}")
            n_el = 1
            for d in dims:
                n_el *= d
            n_bytes = n_el // block * type_size
            if offset % alignment:
                raise cur.fail(f"tensor {name!r} data offset {offset} is not aligned to {alignment}")
            if data_start + offset + n_bytes > size:
                raise cur.fail(f"tensor {name!r} data ({n_bytes} bytes at {data_start + offset}) "
                               f"runs past the end of the file ({size} bytes; truncated?)")


_SPECIAL = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
            (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def check_model_path(path: str, directory_ok: bool = True) -> None:
    """A model path must name a regular file (or a converted cache directory): a missing path, a
    device or a pipe gets its own message (opening a FIFO would block; /dev/zero reads forever)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ModelError(f"{path}: no such file") from None
    except OSError as e:
        raise ModelError(f"{path}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        if not directory_ok:
            raise ModelError(f"{path}: is a directory, not a GGUF file")
        return
    for test, kind in _SPECIAL:
        if test(st.st_mode):
            raise ModelError(f"{path}: is {kind}, not a model file")


def read_gguf(path: str) -> GGUFReader:
    """Validated GGUFReader over `path`, memory-mapped copy-on-write: the compute backends address
    the mapped tensors in place (torch needs a writable buffer); nothing is ever written back."""
    path = os.fspath(path)
    check_model_path(path, directory_ok=False)
    validate_gguf(path)
    try:
        return GGUFReader(path, "c")
    except Exception as e:  # gguf-py raises ValueError/KeyError/IndexError for malformed files
        raise ModelError(f"{path}: unreadable GGUF: {e}") from e


def field_value(reader: GGUFReader, key: str, default=None):
    """A metadata value as a Python scalar, str or list; `default` if absent."""
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception as e:
        raise ModelError(f"metadata key {key!r} is malformed: {e}") from e
