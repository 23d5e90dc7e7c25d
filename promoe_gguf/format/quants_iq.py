"""The codebook quant types of 1-3-bit GGUFs (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S)
and MXFP4 (gpt-oss's experts), registered in quants.QUANT_TYPES beside the others.

A codebook type stores, per group of 8 (IQ2, IQ1) or 4 (IQ3) values, an index into a fixed grid of
small magnitudes, plus sign bits (IQ2/IQ3: 7 stored bits per 8 values, the 8th makes the parity
even, looked up in KSIGNS) or, for IQ1, a shared +-1/8 shift; a 4-bit (IQ1: 3-bit) scale per 32
(IQ3_S: per 32 too, IQ1: per 32 or 16) values multiplies the block's f16 d. The grids are gguf-py's
(`gguf.quants.IQ2_XXS.grid`, ...: the format's own tables), as float32 [n_entries, group].

The arithmetic follows gguf-py's dequantizers operation by operation, so results are bit-equal.
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from .quants import QK_K, QuantType, _f16, view_as


def _table(cls) -> np.ndarray:
    cls.init_grid()
    return np.ascontiguousarray(cls.grid.reshape(cls.grid_shape))


_GRIDS = {t: _table(getattr(gq, t.name)) for t in (T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ1_S,
                                                   T.IQ1_M)}
KSIGNS = np.frombuffer(gq.IQ2_XXS.ksigns, dtype=np.uint8).copy()       # 7 sign bits -> 8 (even parity)
IQ1_DELTA = float(gq.IQ1_S.delta)                                      # 1/8
MXFP4_VALUES = tuple(gq.MXFP4.kvalues)                                 # fp4 e2m1 values x 2


def _on(blocks: torch.Tensor, table: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(table).to(blocks.device)


def _grid(blocks: torch.Tensor, qtype: T, index: torch.Tensor) -> torch.Tensor:
    """index [n, ...] (int) -> the grid entries [n, ..., group] float32."""
    return _on(blocks, _GRIDS[qtype])[index.long()]


def _sign_bits(byte: torch.Tensor) -> torch.Tensor:
    """[...] uint8 -> [..., 8] float32: -1 where bit j is set, else 1."""
    j = torch.arange(8, dtype=torch.uint8, device=byte.device)
    return torch.where((byte.unsqueeze(-1) >> j) & 1 == 0, 1.0, -1.0)


def _ksigns(seven: torch.Tensor) -> torch.Tensor:
    """[...] 7-bit sign codes -> [..., 8] float32 signs."""
    return _sign_bits(_on(seven, KSIGNS)[seven.long()])


def _fields(x: torch.Tensor, shifts, mask: int) -> torch.Tensor:
    """[n, m] -> [n, m * len(shifts)]: (x >> s) & mask for each s, the fields of one element together."""
    return torch.stack([(x >> s) & mask for s in shifts], dim=-1).reshape(len(x), -1)


def _nibble_scales(sc: torch.Tensor) -> torch.Tensor:
    """[n, m] scale bytes -> [n, 2m] int32: the low nibble of each byte, then its high nibble."""
    return _fields(sc, (0, 4), 0x0F).to(torch.int32)


def _u32(b: torch.Tensor) -> torch.Tensor:
    """[n, 4m] uint8 -> [n, m] int64 of the little-endian 32-bit words."""
    return view_as(b, torch.int32).to(torch.int64) & 0xFFFFFFFF


def _u16(b: torch.Tensor) -> torch.Tensor:
    return view_as(b, torch.int16).to(torch.int32) & 0xFFFF


class IQ2_XXS(QuantType, ggml_type=T.IQ2_XXS):
    # d, then per 32 values two u32: 4 grid indices (bytes), and 4 x 7 sign bits + a 4-bit scale
    def dequantize_blocks(self, blocks):
        n = len(blocks)
        d = _f16(blocks[:, :2])
        qs = _u32(blocks[:, 2:]).view(n, 8, 2)
        db = (d * (0.5 + (qs[..., 1] >> 28).float()) * 0.25).view(n, 8, 1, 1)
        shifts = torch.tensor([0, 7, 14, 21], dtype=torch.int64, device=blocks.device)
        signs = _ksigns((qs[..., 1:2] >> shifts) & 0x7F)                             # [n, 8, 4, 8]
        grid = _grid(blocks, T.IQ2_XXS, blocks[:, 2:].reshape(n, 8, 8)[:, :, :4])     # [n, 8, 4, 8]
        return (db * grid * signs).reshape(n, QK_K)


class IQ2_XS(QuantType, ggml_type=T.IQ2_XS):
    # d, 32 u16 (9-bit grid index | 7 sign bits << 9), 8 bytes of two 4-bit scales
    def dequantize_blocks(self, blocks):
        n = len(blocks)
        d = _f16(blocks[:, :2])
        qs = _u16(blocks[:, 2:66])                                                   # [n, 32]
        db = (d * (0.5 + _nibble_scales(blocks[:, 66:74]).float()) * 0.25).view(n, 16, 1, 1)
        signs = _ksigns(qs >> 9).view(n, 16, 2, 8)
        grid = _grid(blocks, T.IQ2_XS, qs & 511).view(n, 16, 2, 8)
        return (db * grid * signs).reshape(n, QK_K)


class IQ2_S(QuantType, ggml_type=T.IQ2_S):
    # d, 32 grid index bytes, 32 sign bytes, 8 bytes of 2 high index bits x 4, 8 bytes of scales
    def dequantize_blocks(self, blocks):
        n = len(blocks)
        d = _f16(blocks[:, :2])
        qs, sb, qh, sc = blocks[:, 2:34], blocks[:, 34:66], blocks[:, 66:74], blocks[:, 74:82]
        db = (d * (0.5 + _nibble_scales(sc).float()) * 0.25).view(n, 16, 1, 1)
        signs = _sign_bits(sb).view(n, 16, 2, 8)
        hi = _fields(qh, (0, 2, 4, 6), 3).to(torch.int32)
        grid = _grid(blocks, T.IQ2_S, qs.to(torch.int32) | (hi << 8)).view(n, 16, 2, 8)
        return (db * grid * signs).reshape(n, QK_K)


class IQ3_XXS(QuantType, ggml_type=T.IQ3_XXS):
    # d, 64 grid index bytes (4 values each), then per 32 values a u32: 4 x 7 sign bits + a 4-bit scale
    def dequantize_blocks(self, blocks):
        n = len(blocks)
        d = _f16(blocks[:, :2])
        qs, sc = blocks[:, 2:66], _u32(blocks[:, 66:98])                             # [n, 64], [n, 8]
        db = (d * (0.5 + (sc >> 28).float()) * 0.5).view(n, 8, 1, 1)
        shifts = torch.tensor([0, 7, 14, 21], dtype=torch.int64, device=blocks.device)
        signs = _ksigns((sc.unsqueeze(-1) >> shifts) & 0x7F)                          # [n, 8, 4, 8]
        grid = _grid(blocks, T.IQ3_XXS, qs).view(n, 8, 4, 8)
        return (db * grid * signs).reshape(n, QK_K)


class IQ3_S(QuantType, ggml_type=T.IQ3_S):
    # d, 64 grid index bytes, 8 bytes of high index bits, 32 sign bytes, 4 bytes of two 4-bit scales
    def dequantize_blocks(self, blocks):
        n = len(blocks)
        d = _f16(blocks[:, :2])
        qs, qh, sb, sc = blocks[:, 2:66], blocks[:, 66:74], blocks[:, 74:106], blocks[:, 106:110]
        db = (d * (1 + 2 * _nibble_scales(sc)).float()).view(n, 8, 1, 1)
        signs = _sign_bits(sb).view(n, 8, 4, 8)
        hi = _fields(qh, range(8), 1).to(torch.int32)
        grid = _grid(blocks, T.IQ3_S, qs.to(torch.int32) | (hi << 8)).view(n, 8, 4, 8)
        return (db * grid * signs).reshape(n, QK_K)


class IQ1_S(QuantType, ggml_type=T.IQ1_S):
    # d, 32 grid index bytes, 8 u16: 4 x 3 high index bits, a 3-bit scale, the sign of the shift
    def dequantize_blocks(self, blocks):
        n = len(blocks)
        d = _f16(blocks[:, :2])
        qs, qh = blocks[:, 2:34], _u16(blocks[:, 34:50])                              # [n, 32], [n, 8]
        dl = (d * (2 * ((qh >> 12) & 7) + 1).float()).view(n, 8, 1, 1)
        delta = torch.where(qh & 0x8000 == 0, IQ1_DELTA, -IQ1_DELTA).view(n, 8, 1, 1)
        hi = _fields(qh, (0, 3, 6, 9), 7)
        grid = _grid(blocks, T.IQ1_S, qs.to(torch.int32) | (hi << 8)).view(n, 8, 4, 8)
        return (dl * (grid + delta)).reshape(n, QK_K)


class IQ1_M(QuantType, ggml_type=T.IQ1_M):
    # 32 grid index bytes, 16 bytes of (3 high index bits + the shift's sign) x 2, 4 u16 of 3-bit
    # scales whose top nibbles together hold the f16 d
    def dequantize_blocks(self, blocks):
        n = len(blocks)
        qs, qh, sc = blocks[:, :32], blocks[:, 32:48], _u16(blocks[:, 48:56])        # sc [n, 4]
        top = sc & 0xF000
        d_bits = (top[:, 0] >> 12) | (top[:, 1] >> 8) | (top[:, 2] >> 4) | top[:, 3]
        d = d_bits.to(torch.int16).view(torch.float16).float().view(n, 1)
        scales = _fields(sc, (0, 3, 6, 9), 7)
        dl = (d * (2 * scales + 1).float()).view(n, 8, 2, 1, 1)
        nib = _nibble_scales(qh)                                                     # per group of 8
        grid = _grid(blocks, T.IQ1_M, qs.to(torch.int32) | ((nib & 7) << 8)).view(n, 8, 2, 2, 8)
        delta = torch.where(nib & 8 == 0, IQ1_DELTA, -IQ1_DELTA).view(n, 8, 2, 2, 1)
        return (dl * (grid + delta)).reshape(n, QK_K)


class MXFP4(QuantType, ggml_type=T.MXFP4):
    # an e8m0 exponent, 16 bytes of fp4 codes (values j and j + 16 in byte j)
    def dequantize_blocks(self, blocks):
        e = blocks[:, :1].to(torch.int64)
        bits = torch.where(e < 2, 0x00200000 << e, (e - 1) << 23)                    # 2^(e - 128), as f32 bits
        d = bits.to(torch.int32).view(torch.float32)
        codes = torch.cat((blocks[:, 1:] & 0x0F, blocks[:, 1:] >> 4), dim=-1)        # [n, 32]
        values = torch.tensor(MXFP4_VALUES, dtype=torch.float32, device=blocks.device)
        return d * values[codes.long()]
