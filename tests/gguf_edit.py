"""Rewrite the metadata (KV) section of a real GGUF file and keep everything else byte for byte.

The semantic fuzz mutates one metadata value at a time; re-encoding whole models with gguf-py for
each case would cost more than running them. A GGUF is: 24-byte preamble (magic, version, tensor
count, KV count), the KV items, the tensor infos (offsets relative to the data section), padding to
`general.alignment`, the data. So a new KV section, the original tensor infos, fresh padding and the
original data bytes make a valid file whatever the new KV section's length.
"""
from __future__ import annotations

import struct

import gguf
from gguf import GGUFValueType as V

SCALAR_FORMATS = {
    V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
    V.FLOAT32: "<f", V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d",
}
NUMERIC_TYPES = frozenset(SCALAR_FORMATS) - {V.BOOL}


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def encode_kv(key: str, value, vtype: V) -> bytes:
    """One KV item: key, value type, scalar or string value (V.ARRAY: a list of int32)."""
    if vtype == V.STRING:
        payload = _string(value)
    elif vtype == V.ARRAY:
        payload = struct.pack("<IQ", int(V.INT32), len(value)) + struct.pack(f"<{len(value)}i", *value)
    else:
        payload = struct.pack(SCALAR_FORMATS[vtype], value)
    return _string(key) + struct.pack("<I", int(vtype)) + payload


class GGUFTemplate:
    """A GGUF file read once; `with_metadata(changes)` returns the bytes of an edited copy."""

    def __init__(self, path):
        self.path = str(path)
        with open(self.path, "rb") as f:
            self.raw = f.read()
        r = gguf.GGUFReader(self.path)
        self.items: list[tuple[str, bytes]] = []          # (key, encoded item) in file order
        self.values: dict[str, tuple[object, V]] = {}     # scalar and string values
        for name, field in r.fields.items():
            if name.startswith("GGUF."):
                continue
            end = field.offset + sum(int(p.nbytes) for p in field.parts)
            self.items.append((name, self.raw[field.offset:end]))
            if field.types and field.types[0] != V.ARRAY:
                self.values[name] = (field.contents(), field.types[0])
        first_info = r.tensors[0].field
        last_info = r.tensors[-1].field
        self.tensor_infos = self.raw[first_info.offset:last_info.offset + sum(int(p.nbytes) for p in last_info.parts)]
        self.n_tensors = len(r.tensors)
        self.data = self.raw[r.data_offset:]
        align = r.fields.get("general.alignment")
        self.alignment = int(align.contents()) if align is not None else 32
        self.arch = r.fields["general.architecture"].contents()

    def with_metadata(self, changes: dict) -> bytes:
        """changes: {key: (value, GGUFValueType)} to set or add, {key: None} to remove."""
        items = []
        for key, item in self.items:
            if key in changes:
                if changes[key] is not None:
                    items.append(encode_kv(key, *changes[key]))
            else:
                items.append(item)
        known = {k for k, _ in self.items}
        items += [encode_kv(k, *v) for k, v in changes.items() if k not in known and v is not None]
        head = b"GGUF" + struct.pack("<IQQ", 3, self.n_tensors, len(items)) + b"".join(items) + self.tensor_infos
        pad = -len(head) % self.alignment
        return head + b"\0" * pad + self.data

    def write(self, dst, changes: dict) -> str:
        with open(dst, "wb") as f:
            f.write(self.with_metadata(changes))
        return str(dst)


def poison(src, dst, tensor: str, byte_offset: int, data: bytes) -> str:
    """Copy src to dst with `data` written at `byte_offset` into tensor `tensor`'s bytes (e.g. a
    float32 NaN into an F32 weight, or an f16 inf into a quantized block's scale)."""
    r = gguf.GGUFReader(str(src))
    t = next((t for t in r.tensors if t.name == tensor), None)
    if t is None:
        raise KeyError(f"{src} has no tensor {tensor}")
    if byte_offset + len(data) > int(t.n_bytes):
        raise ValueError(f"offset {byte_offset} + {len(data)} is outside {tensor} ({t.n_bytes} bytes)")
    raw = bytearray(open(src, "rb").read())
    at = int(t.data_offset) + byte_offset
    raw[at:at + len(data)] = data
    with open(dst, "wb") as f:
        f.write(raw)
    return str(dst)
