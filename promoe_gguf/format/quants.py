"""GGML quant types: block geometry and vectorized dequantization in torch.

One small class per type, registered by `gguf.GGMLQuantizationType`. Each class turns a
[n_blocks, type_size] uint8 tensor into [n_blocks, block_size] float32. Torch (not numpy) so the
same decoders run on CPU tensors and on CUDA tensors (the runtime's fallback expert matmul).
The arithmetic follows ggml's reference dequantizers operation by operation (e.g. `(d*sc)*q - dmin*m`),
so results are bit-equal to gguf-py's `gguf.quants.dequantize` on the CPU.
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from ..errors import ModelError

QK_K = 256
IQ4_KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)

QUANT_TYPES: dict[T, "QuantType"] = {}


def view_as(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """b's bytes read as dtype. A one-block slice is already contiguous, at whatever offset the block
    put it: copied where dtype cannot start there (an int32 view of a Q5 block's high bits at byte 2)
    or a row stride it cannot step by."""
    b = b.contiguous()
    k = dtype.itemsize // b.element_size()
    if b.storage_offset() % k or any(s % k for s in b.stride()[:-1]):   # a size-1 dim keeps its parent's stride
        b = b.clone(memory_format=torch.contiguous_format)
    return b.view(dtype)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[n, 2] little-endian uint8 -> [n, 1] float32."""
    return view_as(b, torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, ..., m] bytes -> [n, ..., 2, m]: low nibbles first, then high nibbles."""
    return torch.stack((qs & 0x0F, qs >> 4), dim=-2)


def _bits(x: torch.Tensor, shifts: list[int], mask: int) -> torch.Tensor:
    """[n, ..., m] -> [n, ..., len(shifts), m] of (x >> s) & mask."""
    s = torch.tensor(shifts, dtype=x.dtype, device=x.device).view(len(shifts), 1)
    return (x.unsqueeze(-2) >> s) & mask


class QuantType:
    """Base: a GGML type's block geometry and its block decoder."""
    ggml_type: T
    block_size: int
    type_size: int

    def __init_subclass__(cls, ggml_type: T, **kw):
        super().__init_subclass__(**kw)
        cls.ggml_type = ggml_type
        cls.block_size, cls.type_size = GGML_QUANT_SIZES[ggml_type]
        QUANT_TYPES[ggml_type] = cls()

    @property
    def name(self) -> str:
        return self.ggml_type.name

    def row_bytes(self, n_cols: int) -> int:
        if n_cols % self.block_size:
            raise ModelError(f"{self.name}: row of {n_cols} values is not a multiple of the block size {self.block_size}")
        return n_cols // self.block_size * self.type_size

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class F32(QuantType, ggml_type=T.F32):
    def dequantize_blocks(self, blocks):
        return view_as(blocks, torch.float32)


class F16(QuantType, ggml_type=T.F16):
    def dequantize_blocks(self, blocks):
        return view_as(blocks, torch.float16).float()


class BF16(QuantType, ggml_type=T.BF16):
    def dequantize_blocks(self, blocks):
        return view_as(blocks, torch.bfloat16).float()


class Q4_0(QuantType, ggml_type=T.Q4_0):
    def dequantize_blocks(self, blocks):
        d, qs = _f16(blocks[:, :2]), blocks[:, 2:]
        q = _nibbles(qs).reshape(len(blocks), 32).to(torch.int8) - 8
        return d * q.float()


class Q4_1(QuantType, ggml_type=T.Q4_1):
    def dequantize_blocks(self, blocks):
        d, m, qs = _f16(blocks[:, :2]), _f16(blocks[:, 2:4]), blocks[:, 4:]
        return d * _nibbles(qs).reshape(len(blocks), 32).float() + m


def _q5_values(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1: 4 bytes of 5th bits (bit j -> element j) + 16 bytes of nibbles -> [n, 32] in 0..31."""
    qh = view_as(qh, torch.int32)                                   # [n, 1]
    hi = (qh >> torch.arange(32, dtype=torch.int32, device=qs.device)) & 1  # [n, 32]
    lo = _nibbles(qs).reshape(len(qs), 32)
    return lo.to(torch.int32) | (hi << 4)


class Q5_0(QuantType, ggml_type=T.Q5_0):
    def dequantize_blocks(self, blocks):
        d = _f16(blocks[:, :2])
        q = _q5_values(blocks[:, 2:6], blocks[:, 6:]) - 16
        return d * q.float()


class Q5_1(QuantType, ggml_type=T.Q5_1):
    def dequantize_blocks(self, blocks):
        d, m = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
        return d * _q5_values(blocks[:, 4:8], blocks[:, 8:]).float() + m


class Q8_0(QuantType, ggml_type=T.Q8_0):
    def dequantize_blocks(self, blocks):
        d = _f16(blocks[:, :2])
        return blocks[:, 2:].contiguous().view(torch.int8).float() * d


class Q2_K(QuantType, ggml_type=T.Q2_K):
    # scales[16] (lo nibble scale, hi nibble min), qs[64], d, dmin
    def dequantize_blocks(self, blocks):
        n = len(blocks)
        scales, qs = blocks[:, :16], blocks[:, 16:80]
        d, dmin = _f16(blocks[:, 80:82]), _f16(blocks[:, 82:84])
        dl = (d * (scales & 0x0F).float()).view(n, 16, 1)
        ml = (dmin * (scales >> 4).float()).view(n, 16, 1)
        q = _bits(qs.reshape(n, 2, 32), [0, 2, 4, 6], 3).reshape(n, 16, 16).float()
        return (dl * q - ml).reshape(n, QK_K)


class Q3_K(QuantType, ggml_type=T.Q3_K):
    # hmask[32], qs[64], scales[12] (16 packed 6-bit scales), d
    def dequantize_blocks(self, blocks):
        n = len(blocks)
        hmask, qs, sc, d = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108], _f16(blocks[:, 108:110])
        lo = _nibbles(sc[:, :8]).reshape(n, 16)
        hi = _bits(sc[:, 8:12], [0, 2, 4, 6], 3).reshape(n, 16)
        scales = ((lo | (hi << 4)).to(torch.int8) - 32).float()
        dl = (d * scales).view(n, 16, 1)
        low2 = _bits(qs.reshape(n, 2, 32), [0, 2, 4, 6], 3).reshape(n, 16, 16)
        hbit = _bits(hmask, list(range(8)), 1).reshape(n, 16, 16)
        q = (low2.to(torch.int8) - ((hbit ^ 1) << 2).to(torch.int8)).float()
        return (dl * q).reshape(n, QK_K)


def _k_scale_min(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins, each [n, 8] float32."""
    d, m, md = sc[:, 0:4], sc[:, 4:8], sc[:, 8:12]
    scale = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=1)
    mins = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=1)
    return scale.float(), mins.float()


class Q4_K(QuantType, ggml_type=T.Q4_K):
    # d, dmin, scales[12], qs[128]: sub-block 2c = low nibbles of qs[32c:32c+32], 2c+1 = high nibbles
    def dequantize_blocks(self, blocks):
        n = len(blocks)
        d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
        sc, m = _k_scale_min(blocks[:, 4:16])
        q = _nibbles(blocks[:, 16:].reshape(n, 4, 32)).reshape(n, 8, 32).float()
        return ((d * sc).view(n, 8, 1) * q - (dmin * m).view(n, 8, 1)).reshape(n, QK_K)


class Q5_K(QuantType, ggml_type=T.Q5_K):
    # d, dmin, scales[12], qh[32] (bit i of qh[l] = 5th bit of element l of sub-block i), qs[128]
    def dequantize_blocks(self, blocks):
        n = len(blocks)
        d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
        sc, m = _k_scale_min(blocks[:, 4:16])
        lo = _nibbles(blocks[:, 48:].reshape(n, 4, 32)).reshape(n, 8, 32)
        hi = _bits(blocks[:, 16:48], list(range(8)), 1)                      # [n, 8, 32]
        q = (lo | (hi << 4)).float()
        return ((d * sc).view(n, 8, 1) * q - (dmin * m).view(n, 8, 1)).reshape(n, QK_K)


class Q6_K(QuantType, ggml_type=T.Q6_K):
    # ql[128], qh[64], scales[16] int8, d
    def dequantize_blocks(self, blocks):
        n = len(blocks)
        ql, qh = blocks[:, :128], blocks[:, 128:192]
        scales = blocks[:, 192:208].contiguous().view(torch.int8).float()
        d = _f16(blocks[:, 208:210])
        dl = (d * scales).view(n, 16, 1)
        lo = _nibbles(ql.reshape(n, 2, 64)).reshape(n, 2, 4, 32)              # per half: 4 runs of 32
        hi = _bits(qh.reshape(n, 2, 32), [0, 2, 4, 6], 3)                     # [n, 2, 4, 32]
        q = ((lo | (hi << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
        return (dl * q).reshape(n, QK_K)


def _iq4_lookup(q: torch.Tensor) -> torch.Tensor:
    kv = torch.tensor(IQ4_KVALUES, dtype=torch.float32, device=q.device)
    return kv[q.long()]


class IQ4_NL(QuantType, ggml_type=T.IQ4_NL):
    def dequantize_blocks(self, blocks):
        d = _f16(blocks[:, :2])
        return d * _iq4_lookup(_nibbles(blocks[:, 2:]).reshape(len(blocks), 32))


class IQ4_XS(QuantType, ggml_type=T.IQ4_XS):
    # d, scales_h (u16), scales_l[4], qs[128]
    def dequantize_blocks(self, blocks):
        n = len(blocks)
        d = _f16(blocks[:, :2])
        sh = view_as(blocks[:, 2:4], torch.int16).to(torch.int32) & 0xFFFF   # [n, 1]
        sl = _nibbles(blocks[:, 4:8]).transpose(1, 2).reshape(n, 8)                   # ib -> (byte ib/2, nibble ib%2)
        hi = (sh >> (2 * torch.arange(8, dtype=torch.int32, device=blocks.device))) & 3
        ls = ((sl.to(torch.int32) | (hi << 4)) - 32).float()
        dl = (d * ls).view(n, 8, 1)
        q = _iq4_lookup(_nibbles(blocks[:, 8:].reshape(n, 8, 16)).reshape(n, 8, 32))
        return (dl * q).reshape(n, QK_K)


def quant_type(qtype) -> QuantType:
    """Look up a QuantType by GGMLQuantizationType, its integer id, or its name ("Q4_K")."""
    try:
        key = T[qtype.upper()] if isinstance(qtype, str) else T(qtype)
    except (KeyError, ValueError):
        raise ModelError(f"unknown quant type {qtype!r}") from None
    if key not in QUANT_TYPES:
        raise ModelError(f"unsupported quant type {key.name} (supported: {', '.join(t.name for t in QUANT_TYPES)})")
    return QUANT_TYPES[key]


def tensor_nbytes(qtype, shape) -> int:
    """Bytes of a tensor of `shape` (numpy order, last dim = row length) in `qtype`."""
    qt = quant_type(qtype)
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    return rows * qt.row_bytes(int(shape[-1]))


def dequantize_torch(raw: torch.Tensor, qtype, shape) -> torch.Tensor:
    """uint8 tensor (any device) -> float32 tensor of `shape` on the same device."""
    qt = quant_type(qtype)
    shape = tuple(int(s) for s in shape)
    want = tensor_nbytes(qt.ggml_type, shape)
    if raw.numel() != want:
        raise ModelError(f"{qt.name} tensor of shape {shape} needs {want} bytes, got {raw.numel()}")
    blocks = raw.reshape(-1, qt.type_size)
    return qt.dequantize_blocks(blocks).reshape(shape)


def dequantize(raw, qtype, shape) -> np.ndarray:
    """Contract: raw quantized bytes (bytes or uint8 array) -> numpy float32 array of `shape`."""
    if isinstance(raw, (bytes, bytearray, memoryview)):
        arr = np.frombuffer(raw, dtype=np.uint8)
    else:
        arr = np.asarray(raw)
        if arr.dtype != np.uint8:
            raise ModelError(f"dequantize expects raw uint8 bytes, got an array of {arr.dtype}")
        arr = arr.reshape(-1)
    t = torch.from_numpy(np.ascontiguousarray(arr).copy() if not arr.flags.writeable else np.ascontiguousarray(arr))
    return dequantize_torch(t, qtype, shape).numpy()
