"""Random valid quant blocks and float64 references, for the kernel tests and scripts/gpu_bench.py.

A random block is random bytes with its fp16 scale fields (d, dmin, m) overwritten by small finite
fp16 values: every other bit pattern of the GGUF block formats is a valid block.
"""
from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as T

from ..format.quants import dequantize_torch, quant_type

# byte offsets of the fp16 fields inside one block
F16_FIELDS: dict[T, tuple[int, ...]] = {
    T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,),
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
    T.IQ4_NL: (0,), T.IQ4_XS: (0,),
    T.IQ2_XXS: (0,), T.IQ2_XS: (0,), T.IQ2_S: (0,), T.IQ3_XXS: (0,), T.IQ3_S: (0,), T.IQ1_S: (0,),
    T.IQ1_M: (), T.MXFP4: (),          # their scales are not an fp16 field: _SCALE_FIX
}


def _iq1_m_scale(raw: torch.Tensor, d: torch.Tensor) -> None:
    """IQ1_M keeps d's 16 bits in the top nibbles of its four u16 scales (bytes 48..55)."""
    bits = d.view(torch.int16).to(torch.int32) & 0xFFFF
    for i in range(4):
        hi = 49 + 2 * i
        nib = ((bits >> (4 * i)) & 0xF).to(torch.uint8)
        raw[:, hi] = (raw[:, hi] & 0x0F) | (nib << 4)


def _mxfp4_scale(raw: torch.Tensor, d: torch.Tensor) -> None:
    """MXFP4's e8m0 exponent: d = 2^(e - 128), |d| near the requested fp16 scale's."""
    e = torch.log2(d.float().abs()).round().to(torch.int64) + 128
    raw[:, 0] = e.clamp(2, 254).to(torch.uint8)


_SCALE_FIX = {T.IQ1_M: _iq1_m_scale, T.MXFP4: _mxfp4_scale}


def random_blocks(qtype, shape, generator: torch.Generator | None = None, device="cpu",
                  scale: float = 0.01) -> torch.Tensor:
    """uint8 tensor of rows * row_bytes random valid bytes of a `qtype` matrix of `shape` (rows, cols).
    fp16 fields get values of magnitude scale * [0.25, 1.25) with random signs."""
    qt = quant_type(qtype)
    rows, cols = (int(s) for s in shape)
    nblk = rows * (cols // qt.block_size)
    qt.row_bytes(cols)
    gen_dev = generator.device if generator is not None else torch.device(device)
    raw = torch.randint(0, 256, (nblk, qt.type_size), dtype=torch.uint8, generator=generator, device=gen_dev)
    for off in F16_FIELDS[qt.ggml_type]:
        mag = torch.rand(nblk, generator=generator, device=gen_dev) + 0.25
        sign = torch.randint(0, 2, (nblk,), generator=generator, device=gen_dev) * 2 - 1
        vals = (mag * sign * scale).to(torch.float16)
        raw[:, off:off + 2] = vals.view(torch.uint8).view(nblk, 2)
    fix = _SCALE_FIX.get(qt.ggml_type)
    if fix is not None:
        mag = torch.rand(nblk, generator=generator, device=gen_dev) + 0.25
        sign = torch.randint(0, 2, (nblk,), generator=generator, device=gen_dev) * 2 - 1
        fix(raw, (mag * sign * scale).to(torch.float16))
    return raw.reshape(-1).to(device)


def reference_matmul(raw: torch.Tensor, qtype, shape, x: torch.Tensor) -> torch.Tensor:
    """float64 x @ W.T with W dequantized on the CPU by dequantize_torch: [T, rows]."""
    w = dequantize_torch(raw.cpu(), qtype, shape).double()
    return x.cpu().double().reshape(-1, w.shape[1]) @ w.T


def reference_moe(experts: list[dict], slots: list[list[int]], x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """float64 MoE reference: experts[e] = {"gate": W, "up": W, "down": W} float tensors (dequantized),
    slots[t] = expert ids of token t in slot order, weights [T, S]. Returns [T, n_embd]."""
    out = []
    for t, ids in enumerate(slots):
        xt = x[t].cpu().double()
        acc = None
        for s, e in enumerate(ids):
            g = experts[e]["gate"].double() @ xt
            u = experts[e]["up"].double() @ xt
            h = torch.nn.functional.silu(g) * u
            y = float(weights[t, s]) * (experts[e]["down"].double() @ h)
            acc = y if acc is None else acc + y
        out.append(acc)
    return torch.stack(out)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-300))


# Relative L2 error bounds of the fp32-activation kernels against the float64 reference. The CPU
# emulation (same fp32 operations per thread, another reduction order) measured at most 4e-7 on
# random blocks, rows of 4096 and 14336, 1 and 8 tokens, zero-mean and mean-3 activations; the
# bounds leave 25x margin for the GPU's reduction order and real weights.
REL_L2_BOUND: dict[T, float] = {t: 1e-5 for t in F16_FIELDS} | {
    T.Q4_1: 2e-5, T.Q5_1: 2e-5, T.Q2_K: 2e-5, T.Q4_K: 2e-5, T.Q5_K: 2e-5}
