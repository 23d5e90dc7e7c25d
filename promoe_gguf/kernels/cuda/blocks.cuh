// blocks.cuh: GGUF quant block decoders shared by every kernel in this directory.
//
// One traits struct per GGML type (blk_q4_0 ... blk_iq4_xs). A block of `qk` values is stored in
// `type_size` bytes, exactly as in the GGUF file. `nchunk` threads share one block: thread c
// (0 <= c < nchunk) reads 8 (or 16) consecutive bytes of each quant array of the block, as 4-byte
// words (a warp's loads then cover contiguous bytes), and decodes `nrun` runs of 4 consecutive
// elements. Run r of chunk c covers the elements
//
//     chunk_base(c) + run_offset(r) + {0, 1, 2, 3}            (element index inside the block)
//
// decode() returns, per run, a word of 4 unsigned bytes b[i]; runs come in groups of `rps`
// consecutive runs that share one scale d and one offset m (a sub-block of the type):
//
//     value = d[r / rps] * (b[i] - bias) + m[r / rps]          (m == 0 unless has_min)
//
// Every decoder mirrors the element order of the torch decoders in promoe_gguf/format/quants.py
// (the comments cite the tensor expressions there) and the dequantized value is rounded the same way
// (see chunk_value), so dequant.cu reproduces dequantize_torch bit for bit in fp32.
//
// Loads follow the alignment the block size allows, given a matrix base aligned to it:
//   Q4_K (144 bytes), Q5_K (176): 16-byte header load, 8-byte quant loads -> base 16-byte aligned
//   IQ4_XS (136): 8-byte loads -> base 8-byte aligned
//   Q4_1 (20), Q5_1 (24), Q2_K (84): 32-bit loads -> base 4-byte aligned
//   Q4_0 (18), Q5_0 (22), Q8_0 (34), Q3_K (110), Q6_K (210), IQ4_NL (18): pairs of 16-bit loads
// (launch.py's ALIGNMENT checks this before each launch).
//
// This header also compiles as plain C++ on the host (tests/kernels_host/cuda_emu.h supplies the
// CUDA built-ins), which is how the decoders and kernels are checked on machines without a GPU.
#pragma once

typedef unsigned char      u8;
typedef unsigned short     u16;
typedef unsigned int       u32;
typedef unsigned long long u64;

#define PROMOE_DEV __device__ __forceinline__

#define QK_K 256

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

#if defined(__CUDACC__)
// fp16 <-> fp32 without cuda_fp16.h (NVRTC then needs no include path). On the host these come
// from the emulation header.
PROMOE_DEV float f16_to_f32(u16 h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
PROMOE_DEV u16 f32_to_f16(float f) { u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
#endif

PROMOE_DEV int imin(int a, int b) { return a < b ? a : b; }

PROMOE_DEV u16 ld_u16(const u8* p) { return __ldg(reinterpret_cast<const u16*>(p)); }
// p must be 4-byte aligned
PROMOE_DEV u32 ld_u32(const u8* p) { return __ldg(reinterpret_cast<const u32*>(p)); }
// p only 2-byte aligned: two 16-bit loads, little-endian
PROMOE_DEV u32 ld_u32_a2(const u8* p) { return (u32)ld_u16(p) | ((u32)ld_u16(p + 2) << 16); }
// vector loads: p must be 8- / 16-byte aligned
PROMOE_DEV uint2 ld_u32x2(const u8* p) { return __ldg(reinterpret_cast<const uint2*>(p)); }
PROMOE_DEV uint4 ld_u32x4(const u8* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }
PROMOE_DEV float ld_f16(const u8* p) { return f16_to_f32(ld_u16(p)); }
PROMOE_DEV float lo_f16(u32 w) { return f16_to_f32((u16)(w & 0xFFFFu)); }
PROMOE_DEV float hi_f16(u32 w) { return f16_to_f32((u16)(w >> 16)); }

// byte i of w (i may be a run-time value)
PROMOE_DEV u32 byte_of(u32 w, int i) { return (w >> (8 * i)) & 0xFFu; }
// byte i of w as a signed int8
PROMOE_DEV int sbyte_of(u32 w, int i) { return (int)(w << (24 - 8 * i)) >> 24; }

// Exact int -> float without I2F (a quarter-rate instruction on sm_80/sm_90): put the integer in
// the low mantissa bits of a power of two and subtract it (one LOP/IADD + one FADD).
// u_to_float: 0 <= v < 2^23 (0x4B000000 == 2^23). i_to_float: -2^22 <= v < 2^22 (0x4B400000 == 1.5 * 2^23).
PROMOE_DEV float u_to_float(u32 v) { return __uint_as_float(0x4B000000u | v) - 8388608.0f; }
PROMOE_DEV float i_to_float(int v) { return __uint_as_float(0x4B400000u + (u32)v) - 12582912.0f; }

// Exact float of (byte i of w) - BIAS: byte_perm places the byte under 2^23 in one instruction.
template <int BIAS>
PROMOE_DEV float byte_to_float(u32 w, int i) {
    return __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7650u | (u32)i)) - (8388608.0f + (float)BIAS);
}

// bits 0..3 of v -> 0x10 in bytes 0..3 (the 5th bit of four 5-bit quants). The four shifted copies
// of the nibble made by the multiply never overlap.
PROMOE_DEV u32 bits4_to_b4(u32 v) { return ((v & 0xFu) * 0x02040810u) & 0x10101010u; }

// IQ4 non-linear grid (kvalues_iq4nl), stored +128 so that it fits unsigned bytes: bias 128.
__host__ __device__ constexpr u32 pack_biased4(int a, int b, int c, int d) {
    return (u32)((a + 128) & 0xFF) | ((u32)((b + 128) & 0xFF) << 8) |
           ((u32)((c + 128) & 0xFF) << 16) | ((u32)((d + 128) & 0xFF) << 24);
}

// 4 nibbles (one per byte, values 0..15) -> 4 bytes table[n], the 16-entry table in words t0..t3.
// Two byte_perm lookups in the 8-entry halves of the table, then a third one picks per byte by bit
// 3 of the nibble.
template <u32 t0, u32 t1, u32 t2, u32 t3>
PROMOE_DEV u32 lookup16(u32 nib) {
    u32 sel = nib | (nib >> 4);                       // byte k: n_k | n_(k+1) << 4
    sel = (sel & 0xFFu) | ((sel >> 8) & 0xFF00u);     // bits 4k..4k+3: n_k
    const u32 lo = __byte_perm(t0, t1, sel & 0x7777u);
    const u32 hi = __byte_perm(t2, t3, sel & 0x7777u);
    return __byte_perm(lo, hi, 0x3210u | ((sel & 0x8888u) >> 1));
}

// IQ4's grid (kvalues_iq4nl) + 128
PROMOE_DEV u32 iq4_lookup4(u32 nib) {
    return lookup16<pack_biased4(-127, -104, -83, -65), pack_biased4(-49, -35, -22, -10),
                    pack_biased4(1, 13, 25, 38), pack_biased4(53, 69, 89, 113)>(nib);
}

// MXFP4's values (fp4 e2m1 x 2) + 128
PROMOE_DEV u32 mxfp4_lookup4(u32 nib) {
    return lookup16<pack_biased4(0, 1, 2, 3), pack_biased4(4, 6, 8, 12),
                    pack_biased4(0, -1, -2, -3), pack_biased4(-4, -6, -8, -12)>(nib);
}

// One thread's decoded part of a block: NRUN runs of 4 elements, NGRP scale groups.
template <int NRUN, int NGRP>
struct qchunk {
    u32   q[NRUN];   // 4 quants per run, one unsigned byte each
    float d[NGRP];   // scale of runs g*rps .. g*rps + rps - 1
    float m[NGRP];   // offset of those runs (types with mins), else unused
};

#define PROMOE_CHUNK_TYPE(NRUN, RPS)                                                              \
    static constexpr int nrun = NRUN, rps = RPS, ngrp = NRUN / RPS;                               \
    typedef qchunk<NRUN, NRUN / RPS> chunk;

// Value of element i (0..3) of run r, rounded exactly like quants.py: d*q (one product), or
// d*q + m as a product then a sum (no FMA contraction).
template <class B>
PROMOE_DEV float chunk_value(const typename B::chunk& ch, int r, int i) {
    const float v = __fmul_rn(ch.d[r / B::rps], byte_to_float<B::bias>(ch.q[r], i));
    if constexpr (B::has_min) return __fadd_rn(v, ch.m[r / B::rps]);
    else return v;
}

// ---------------------------------------------------------------------------------------------
// Legacy 32-value blocks: 2 threads per block, 16 elements (4 runs, one scale) each.
// Chunk c reads qs[8c .. 8c+7] as words A (bytes 0-3) and B (bytes 4-7): runs
// low(A), low(B) -> elements 8c + 0..7, high(A), high(B) -> elements 16 + 8c + 0..7.
// ---------------------------------------------------------------------------------------------
PROMOE_DEV int legacy_run_offset(int r) { return 4 * (r & 1) + 16 * (r >> 1); }

#define PROMOE_LEGACY_NIBBLES(o, a, b)                                                            \
    o.q[0] = (a) & 0x0F0F0F0Fu;        o.q[1] = (b) & 0x0F0F0F0Fu;                                \
    o.q[2] = ((a) >> 4) & 0x0F0F0F0Fu; o.q[3] = ((b) >> 4) & 0x0F0F0F0Fu;

// What every legacy block shares: 32 values, 2 chunks of 4 runs under one scale, the run layout above.
struct legacy_block {
    static constexpr int qk = 32, nchunk = 2;
    PROMOE_CHUNK_TYPE(4, 4)
    PROMOE_DEV static int chunk_base(int c) { return 8 * c; }
    PROMOE_DEV static int run_offset(int r) { return legacy_run_offset(r); }
};

// Q5_*: OR the fifth bits (qh bit j = element j) of chunk c's four runs into o.q
#define PROMOE_Q5_HIGH_BITS(o, qh, c)                                                             \
    _Pragma("unroll")                                                                             \
    for (int r = 0; r < 4; ++r) o.q[r] |= bits4_to_b4((qh) >> (8 * (c) + legacy_run_offset(r)));

// Q4_0: d, qs[16]. Element j = low nibble of qs[j], element j+16 = high nibble; value d*(q-8).
// quants.py: q = _nibbles(qs) - 8; d * q
struct blk_q4_0 : legacy_block {
    static constexpr int type_size = 18, bias = 8;
    static constexpr bool has_min = false;
    PROMOE_DEV static void decode(const u8* b, int c, chunk& o) {
        const u32 a = ld_u32_a2(b + 2 + 8 * c), bb = ld_u32_a2(b + 6 + 8 * c);
        PROMOE_LEGACY_NIBBLES(o, a, bb)
        o.d[0] = ld_f16(b);
    }
};

// Q4_1: d, m, qs[16] (Q4_0 nibble order); value d*q + m.  quants.py: d * _nibbles(qs) + m
struct blk_q4_1 : legacy_block {
    static constexpr int type_size = 20, bias = 0;
    static constexpr bool has_min = true;
    PROMOE_DEV static void decode(const u8* b, int c, chunk& o) {
        const u32 dm = ld_u32(b);
        const u32 a = ld_u32(b + 4 + 8 * c), bb = ld_u32(b + 8 + 8 * c);
        PROMOE_LEGACY_NIBBLES(o, a, bb)
        o.d[0] = lo_f16(dm);
        o.m[0] = hi_f16(dm);
    }
};

// Q5_0: d, qh (u32 LE, bit j = 5th bit of element j), qs[16]; value d*((lo | hi<<4) - 16).
// quants.py: _q5_values(qh, qs) - 16
struct blk_q5_0 : legacy_block {
    static constexpr int type_size = 22, bias = 16;
    static constexpr bool has_min = false;
    PROMOE_DEV static void decode(const u8* b, int c, chunk& o) {
        const u32 qh = ld_u32_a2(b + 2);
        const u32 a = ld_u32_a2(b + 6 + 8 * c), bb = ld_u32_a2(b + 10 + 8 * c);
        PROMOE_LEGACY_NIBBLES(o, a, bb)
        PROMOE_Q5_HIGH_BITS(o, qh, c)
        o.d[0] = ld_f16(b);
    }
};

// Q5_1: d, m, qh, qs[16]; value d*q + m.  quants.py: d * _q5_values(qh, qs) + m
struct blk_q5_1 : legacy_block {
    static constexpr int type_size = 24, bias = 0;
    static constexpr bool has_min = true;
    PROMOE_DEV static void decode(const u8* b, int c, chunk& o) {
        const u32 dm = ld_u32(b), qh = ld_u32(b + 4);
        const u32 a = ld_u32(b + 8 + 8 * c), bb = ld_u32(b + 12 + 8 * c);
        PROMOE_LEGACY_NIBBLES(o, a, bb)
        PROMOE_Q5_HIGH_BITS(o, qh, c)
        o.d[0] = lo_f16(dm);
        o.m[0] = hi_f16(dm);
    }
};

// IQ4_NL: d, qs[16] (Q4_0 nibble order); value d*kv[q].  quants.py: d * _iq4_lookup(_nibbles(qs))
struct blk_iq4_nl : legacy_block {
    static constexpr int type_size = 18, bias = 128;
    static constexpr bool has_min = false;
    PROMOE_DEV static void decode(const u8* b, int c, chunk& o) {
        const u32 a = ld_u32_a2(b + 2 + 8 * c), bb = ld_u32_a2(b + 6 + 8 * c);
        PROMOE_LEGACY_NIBBLES(o, a, bb)
#pragma unroll
        for (int r = 0; r < 4; ++r) o.q[r] = iq4_lookup4(o.q[r]);
        o.d[0] = ld_f16(b);
    }
};

// Q8_0: d, int8 qs[32]; value d*q. Signed bytes are flipped to unsigned (^0x80), bias 128.
// quants.py: qs.view(int8).float() * d. Chunk c: qs[16c .. 16c+15] -> elements 16c + 0..15.
struct blk_q8_0 {
    static constexpr int qk = 32, type_size = 34, nchunk = 2, bias = 128;
    static constexpr bool has_min = false;
    PROMOE_CHUNK_TYPE(4, 4)
    PROMOE_DEV static int chunk_base(int c) { return 16 * c; }
    PROMOE_DEV static int run_offset(int r) { return 4 * r; }
    PROMOE_DEV static void decode(const u8* b, int c, chunk& o) {
#pragma unroll
        for (int r = 0; r < 4; ++r) o.q[r] = ld_u32_a2(b + 2 + 16 * c + 4 * r) ^ 0x80808080u;
        o.d[0] = ld_f16(b);
    }
};

// ---------------------------------------------------------------------------------------------
// K-quants and IQ4_XS: 256-value super-blocks, 8 threads per block, 32 elements (8 runs) each;
// two consecutive runs (8 consecutive elements) always share a scale.
// ---------------------------------------------------------------------------------------------

// Q2_K: scales[16] (low nibble scale, high nibble min), qs[64], d, dmin.
// Element 128h + 32k + l = (qs[32h + l] >> 2k) & 3, sub-block (of 16) = element / 16;
// value = (d*sc)*q - dmin*m.   quants.py: dl * q - ml, dl = d*(scales & 15), ml = dmin*(scales >> 4)
// Chunk c: h = c/4, l8 = 8(c%4): qs[32h + l8 .. +7] (= qs[8c ..]); run 2k + half = shift 2k of
// word `half` -> elements 128h + 32k + l8 + 4half, sub-block 8h + 2k + hl with hl = (c%4)/2.
struct blk_q2_k {
    static constexpr int qk = QK_K, type_size = 84, nchunk = 8, bias = 0;
    static constexpr bool has_min = true;
    PROMOE_CHUNK_TYPE(8, 2)
    PROMOE_DEV static int chunk_base(int c) { return 128 * (c >> 2) + 8 * (c & 3); }
    PROMOE_DEV static int run_offset(int r) { return 4 * (r & 1) + 32 * (r >> 1); }
    PROMOE_DEV static void decode(const u8* b, int c, chunk& o) {
        const int h = c >> 2, hl = (c & 3) >> 1;
        const u32 qs[2] = {ld_u32(b + 16 + 8 * c), ld_u32(b + 20 + 8 * c)};
        const u32 sc01 = ld_u32(b + 8 * h), sc23 = ld_u32(b + 8 * h + 4);   // scales[8h .. 8h+7]
        const u32 dd = ld_u32(b + 80);
        const float d = lo_f16(dd), dmin = hi_f16(dd);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            o.q[2 * k]     = (qs[0] >> (2 * k)) & 0x03030303u;
            o.q[2 * k + 1] = (qs[1] >> (2 * k)) & 0x03030303u;
            // sub-block 8h + 2k + hl = byte 2k + hl of the 8 loaded scale bytes
            const u32 sc = byte_of(k < 2 ? sc01 : sc23, 2 * (k & 1) + hl);
            o.d[k] = d * u_to_float(sc & 0xFu);
            o.m[k] = -(dmin * u_to_float(sc >> 4));
        }
    }
};

// Q3_K: hmask[32], qs[64], scales[12] (16 packed 6-bit scales), d.
// Element 128h + 32k + l: low2 = (qs[32h + l] >> 2k) & 3, hbit = bit (4h + k) of hmask[l],
// q = low2 - (hbit ? 0 : 4) = (low2 | hbit << 2) - 4; sub-block j = element / 16,
// scale_j = (lo4 | hi2 << 4) - 32 with lo4 = scales[j] & 15 (j < 8) or scales[j-8] >> 4,
// hi2 = (scales[8 + j%4] >> 2(j/4)) & 3; value = (d*scale)*q.
// quants.py: dl = d * ((lo | hi << 4).to(int8) - 32), q = low2 - ((hbit ^ 1) << 2), dl * q
// Chunk c as Q2_K, plus hmask[l8 .. l8+7].
struct blk_q3_k {
    static constexpr int qk = QK_K, type_size = 110, nchunk = 8, bias = 4;
    static constexpr bool has_min = false;
    PROMOE_CHUNK_TYPE(8, 2)
    PROMOE_DEV static int chunk_base(int c) { return 128 * (c >> 2) + 8 * (c & 3); }
    PROMOE_DEV static int run_offset(int r) { return 4 * (r & 1) + 32 * (r >> 1); }
    PROMOE_DEV static void decode(const u8* b, int c, chunk& o) {
        const int h = c >> 2, l8 = 8 * (c & 3), hl = (c & 3) >> 1;
        const u32 qs[2] = {ld_u32_a2(b + 32 + 8 * c), ld_u32_a2(b + 36 + 8 * c)};
        const u32 hm[2] = {ld_u32_a2(b + l8), ld_u32_a2(b + l8 + 4)};
        const u32 s0 = ld_u32_a2(b + 96), s1 = ld_u32_a2(b + 100), s2 = ld_u32_a2(b + 104);
        const float d = ld_f16(b + 108);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
#pragma unroll
            for (int half = 0; half < 2; ++half)
                o.q[2 * k + half] = ((qs[half] >> (2 * k)) & 0x03030303u) |
                                    (((hm[half] >> (4 * h + k)) & 0x01010101u) << 2);
            // j = 8h + 2k + hl: lo4 from scales byte 2k + hl (low nibble if h == 0, high if h == 1);
            // hi2 from scales byte 8 + j%4 = 8 + 2(k&1) + hl, bits 2(j/4) = 2(2h + k/2)
            const int jb = 2 * (k & 1) + hl;
            const u32 lo4 = (byte_of(k < 2 ? s0 : s1, jb) >> (4 * h)) & 0xFu;
            const u32 hi2 = (byte_of(s2, jb) >> (2 * (2 * h + (k >> 1)))) & 0x3u;
            o.d[k] = d * i_to_float((int)(lo4 | (hi2 << 4)) - 32);
        }
    }
};

// Q4_K / Q5_K scales: 12 bytes = 8 six-bit scales and 8 six-bit mins (see quants.py _k_scale_min).
// j < 4: sc = s[j] & 63, m = s[j+4] & 63.
// j >= 4: sc = (s[j+4] & 15) | (s[j-4] >> 6) << 4, m = (s[j+4] >> 4) | (s[j] >> 6) << 4.
// w0, w1, w2 = the three little-endian words of s. The sub-block of scale group g of chunk c is
// j = 2p + (g & 1) + 4(g >> 1) with p = c / 4, so groups 0, 1 take the j < 4 form, 2, 3 the other.
PROMOE_DEV void k_scale_min(u32 w0, u32 w1, u32 w2, int p, int g, float d, float dmin, float& dl, float& ml) {
    const int j4 = 2 * p + (g & 1);            // j % 4 (== j for g < 2)
    u32 sc, m;
    if (g < 2) {
        sc = byte_of(w0, j4) & 63u;
        m  = byte_of(w1, j4) & 63u;
    } else {
        const u32 md = byte_of(w2, j4);
        sc = (md & 15u) | ((byte_of(w0, j4) >> 6) << 4);
        m  = (md >> 4)  | ((byte_of(w1, j4) >> 6) << 4);
    }
    dl = d * u_to_float(sc);
    ml = -(dmin * u_to_float(m));
}

// Q4_K: d, dmin, scales[12], qs[128]. Sub-block (of 32) 2p = low nibbles of qs[32p .. 32p+31],
// 2p+1 = high nibbles; value = (d*sc)*q - dmin*m.
// quants.py: (d * sc) * _nibbles(qs.reshape(4, 32)) - (dmin * m)
// Chunk c: p = c/4, l8 = 8(c%4); bytes qs[32p + l8 ..+7] (= qs[8c ..]) and qs[32(p+2) + l8 ..+7]
// (= qs[64 + 8c ..]). Groups: low nibbles of the first 8 bytes (sub-block 2p), their high nibbles
// (2p+1), low of the second (2p+4), high of the second (2p+5); elements 32*sub-block + l8 + 0..7.
struct blk_q4_k {
    static constexpr int qk = QK_K, type_size = 144, nchunk = 8, bias = 0;
    static constexpr bool has_min = true;
    PROMOE_CHUNK_TYPE(8, 2)
    PROMOE_DEV static int chunk_base(int c) { return 64 * (c >> 2) + 8 * (c & 3); }
    PROMOE_DEV static int run_offset(int r) { return 4 * (r & 1) + 32 * ((r >> 1) & 1) + 128 * (r >> 2); }
    PROMOE_DEV static void decode(const u8* b, int c, chunk& o) {
        const int p = c >> 2;
        const uint4 hd = ld_u32x4(b);                      // d | dmin << 16, scales[0..11]
        const uint2 qa = ld_u32x2(b + 16 + 8 * c), qb = ld_u32x2(b + 80 + 8 * c);
        const u32 qs[4] = {qa.x, qa.y, qb.x, qb.y};
        const u32 w0 = hd.y, w1 = hd.z, w2 = hd.w;
        const float d = lo_f16(hd.x), dmin = hi_f16(hd.x);
#pragma unroll
        for (int g = 0; g < 4; ++g) {
            const int s = g >> 1, sh = 4 * (g & 1);       // source bytes, nibble
            o.q[2 * g]     = (qs[2 * s] >> sh) & 0x0F0F0F0Fu;
            o.q[2 * g + 1] = (qs[2 * s + 1] >> sh) & 0x0F0F0F0Fu;
            k_scale_min(w0, w1, w2, p, g, d, dmin, o.d[g], o.m[g]);
        }
    }
};

// Q5_K: d, dmin, scales[12], qh[32], qs[128]. As Q4_K plus a 5th bit: element l of sub-block i
// has bit (qh[l] >> i) & 1.  quants.py: lo | _bits(qh, range(8), 1) << 4
// Chunk c as Q4_K, plus qh[l8 .. l8+7].
struct blk_q5_k {
    static constexpr int qk = QK_K, type_size = 176, nchunk = 8, bias = 0;
    static constexpr bool has_min = true;
    PROMOE_CHUNK_TYPE(8, 2)
    PROMOE_DEV static int chunk_base(int c) { return 64 * (c >> 2) + 8 * (c & 3); }
    PROMOE_DEV static int run_offset(int r) { return 4 * (r & 1) + 32 * ((r >> 1) & 1) + 128 * (r >> 2); }
    PROMOE_DEV static void decode(const u8* b, int c, chunk& o) {
        const int p = c >> 2, l8 = 8 * (c & 3);
        const uint4 hd = ld_u32x4(b);                      // d | dmin << 16, scales[0..11]
        const uint2 h2 = ld_u32x2(b + 16 + l8);
        const uint2 qa = ld_u32x2(b + 48 + 8 * c), qb = ld_u32x2(b + 112 + 8 * c);
        const u32 qh[2] = {h2.x, h2.y};
        const u32 qs[4] = {qa.x, qa.y, qb.x, qb.y};
        const u32 w0 = hd.y, w1 = hd.z, w2 = hd.w;
        const float d = lo_f16(hd.x), dmin = hi_f16(hd.x);
#pragma unroll
        for (int g = 0; g < 4; ++g) {
            const int s = g >> 1, sh = 4 * (g & 1);
            const int j = 2 * p + (g & 1) + 4 * s;        // sub-block
            o.q[2 * g]     = ((qs[2 * s] >> sh) & 0x0F0F0F0Fu)     | (((qh[0] >> j) & 0x01010101u) << 4);
            o.q[2 * g + 1] = ((qs[2 * s + 1] >> sh) & 0x0F0F0F0Fu) | (((qh[1] >> j) & 0x01010101u) << 4);
            k_scale_min(w0, w1, w2, p, g, d, dmin, o.d[g], o.m[g]);
        }
    }
};

// Q6_K: ql[128], qh[64], int8 scales[16], d. Element 128h + 32g + l (g = 0..3, l < 32):
// g=0: ql[64h+l] & 15,  g=1: ql[64h+32+l] & 15,  g=2: ql[64h+l] >> 4,  g=3: ql[64h+32+l] >> 4,
// each | ((qh[32h+l] >> 2g) & 3) << 4, minus 32; scale = scales[element / 16]; value = (d*sc)*q.
// quants.py: lo = _nibbles(ql.reshape(2, 64)).reshape(2, 4, 32), hi = _bits(qh.reshape(2, 32), [0,2,4,6], 3)
// Chunk c: h = c/4, l8 = 8(c%4): ql[64h + l8 ..+7], ql[64h + 32 + l8 ..+7], qh[32h + l8 ..+7]
// (= qh[8c ..]); run 2g + half -> elements 128h + 32g + l8 + 4half, sub-block 8h + 2g + (c%4)/2.
struct blk_q6_k {
    static constexpr int qk = QK_K, type_size = 210, nchunk = 8, bias = 32;
    static constexpr bool has_min = false;
    PROMOE_CHUNK_TYPE(8, 2)
    PROMOE_DEV static int chunk_base(int c) { return 128 * (c >> 2) + 8 * (c & 3); }
    PROMOE_DEV static int run_offset(int r) { return 4 * (r & 1) + 32 * (r >> 1); }
    PROMOE_DEV static void decode(const u8* b, int c, chunk& o) {
        const int h = c >> 2, l8 = 8 * (c & 3), hl = (c & 3) >> 1;
        const u32 qla[2] = {ld_u32_a2(b + 64 * h + l8), ld_u32_a2(b + 64 * h + l8 + 4)};
        const u32 qlb[2] = {ld_u32_a2(b + 64 * h + 32 + l8), ld_u32_a2(b + 64 * h + 36 + l8)};
        const u32 qh[2] = {ld_u32_a2(b + 128 + 8 * c), ld_u32_a2(b + 132 + 8 * c)};
        const u32 sa = ld_u32_a2(b + 192 + 8 * h), sb = ld_u32_a2(b + 196 + 8 * h);  // scales[8h .. 8h+7]
        const float d = ld_f16(b + 208);
#pragma unroll
        for (int g = 0; g < 4; ++g) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const u32 ql = (g & 1) ? qlb[half] : qla[half];
                o.q[2 * g + half] = ((ql >> (4 * (g >> 1))) & 0x0F0F0F0Fu) |
                                    (((qh[half] >> (2 * g)) & 0x03030303u) << 4);
            }
            // sub-block 8h + 2g + hl = scales byte 2g + hl of the 8 loaded
            o.d[g] = d * i_to_float(sbyte_of(g < 2 ? sa : sb, 2 * (g & 1) + hl));
        }
    }
};

// IQ4_XS: d, scales_h (u16), scales_l[4], qs[128]. Sub-block ib (of 32): qs[16ib + j] low nibble
// -> element 32ib + j, high nibble -> 32ib + 16 + j; ls = ((scales_l[ib/2] >> 4(ib%2)) & 15 |
// ((scales_h >> 2ib) & 3) << 4) - 32; value = (d*ls)*kv[q].
// quants.py: dl = d * ls, q = _iq4_lookup(_nibbles(qs.reshape(8, 16))), dl * q
// Chunk c: ib = c/2, j8 = 8(c%2): bytes qs[16s + j8 ..+7] for s = ib (= qs[8c ..]) and s = ib + 4
// (= qs[64 + 8c ..]); per s, 4 runs with one scale: low nibbles -> elements 32s + j8 + 0..7,
// high nibbles -> 32s + 16 + j8 + 0..7.
struct blk_iq4_xs {
    static constexpr int qk = QK_K, type_size = 136, nchunk = 8, bias = 128;
    static constexpr bool has_min = false;
    PROMOE_CHUNK_TYPE(8, 4)
    PROMOE_DEV static int chunk_base(int c) { return 32 * (c >> 1) + 8 * (c & 1); }
    PROMOE_DEV static int run_offset(int r) { return 4 * (r & 1) + 16 * ((r >> 1) & 1) + 128 * (r >> 2); }
    PROMOE_DEV static void decode(const u8* b, int c, chunk& o) {
        const int ib = c >> 1;
        const uint2 hd = ld_u32x2(b);                              // d | scales_h << 16, scales_l[0..3]
        const uint2 qa = ld_u32x2(b + 8 + 8 * c), qb = ld_u32x2(b + 72 + 8 * c);
        const u32 qs[4] = {qa.x, qa.y, qb.x, qb.y};
        const float d = lo_f16(hd.x);
        const u32 sh = hd.x >> 16, sl = hd.y;
#pragma unroll
        for (int g = 0; g < 2; ++g) {
            o.q[4 * g + 0] = iq4_lookup4(qs[2 * g] & 0x0F0F0F0Fu);
            o.q[4 * g + 1] = iq4_lookup4(qs[2 * g + 1] & 0x0F0F0F0Fu);
            o.q[4 * g + 2] = iq4_lookup4((qs[2 * g] >> 4) & 0x0F0F0F0Fu);
            o.q[4 * g + 3] = iq4_lookup4((qs[2 * g + 1] >> 4) & 0x0F0F0F0Fu);
            const int s = ib + 4 * g;
            // the scales_l nibble of sub-block s is at bit 8(s/2) + 4(s%2) = 4s
            const int ls = (int)(((sl >> (4 * s)) & 15u) | (((sh >> (2 * s)) & 3u) << 4)) - 32;
            o.d[g] = d * i_to_float(ls);
        }
    }
};

// ---------------------------------------------------------------------------------------------
// Codebook types (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M) and MXFP4. A codebook block
// stores per group of 8 (IQ3: 4) values an index into a grid of small magnitudes (iq_grids.cuh,
// one value per byte) and signs; the decoders write each value as the unsigned byte 128 + v
// (bias 128), so every kernel above reads them unchanged. IQ1's values g + 1/8 or g - 1/8
// (g in -1, 0, 1) are written as 8g +- 1 under a scale of d/8: the same product, rounded once.
// Blocks are 2-byte aligned (MXFP4's 17-byte blocks: byte loads). One chunk = one 32-value
// sub-block: runs of 4 consecutive values, chunk_base(c) = 32c.
// ---------------------------------------------------------------------------------------------
#include "iq_grids.cuh"

PROMOE_DEV u8 ld_u8(const u8* p) { return __ldg(p); }
// 4 bytes at any alignment
PROMOE_DEV u32 ld_u32_a1(const u8* p) {
    return (u32)ld_u8(p) | ((u32)ld_u8(p + 1) << 8) | ((u32)ld_u8(p + 2) << 16) | ((u32)ld_u8(p + 3) << 24);
}

// bits 0..3 of s -> 0xFF in bytes 0..3 (the 4 shifted copies of s made by the multiply never overlap)
PROMOE_DEV u32 sign_mask4(u32 s) { return ((s & 0xFu) * 0x00204081u & 0x01010101u) * 0xFFu; }
// 4 magnitudes (bytes < 128) with sign bits s (bit j: byte j negative) -> bytes 128 + (+-m)
PROMOE_DEV u32 signed_biased4(u32 mag, u32 s) {
    const u32 neg = sign_mask4(s);
    return ((0x80808080u + mag) & ~neg) | ((0x80808080u - mag) & neg);
}
// IQ2/IQ3's 7 stored sign bits -> 8: the 8th makes the number of set bits even (gguf-py's KSIGNS)
PROMOE_DEV u32 ksigns8(u32 s7) { return s7 | ((__popc(s7) & 1u) << 7); }
// d * (0.5 + ls) * mul, as quants_iq.py rounds it (two products)
PROMOE_DEV float half_step_scale(float d, u32 ls, float mul) {
    return __fmul_rn(__fmul_rn(d, 0.5f + u_to_float(ls)), mul);
}

// group l (8 values, runs 2l and 2l+1) of a chunk from an 8-value grid entry and 8 sign bits
template <class C>
PROMOE_DEV void put_signed8(C& o, int l, u64 g, u32 s) {
    o.q[2 * l] = signed_biased4((u32)g, s);
    o.q[2 * l + 1] = signed_biased4((u32)(g >> 32), s >> 4);
}

// IQ2_XS / IQ2_S: the sub-block's two 4-bit scales (its first and second 16 values) in one byte
template <class C>
PROMOE_DEV void two_half_step_scales(C& o, float d, u32 sc) {
    o.d[0] = half_step_scale(d, sc & 15u, 0.25f);
    o.d[1] = half_step_scale(d, sc >> 4, 0.25f);
}

struct iq_block {
    static constexpr int qk = QK_K, nchunk = 8, bias = 128;
    static constexpr bool has_min = false;
    PROMOE_DEV static int chunk_base(int c) { return 32 * c; }
    PROMOE_DEV static int run_offset(int r) { return 4 * r; }
};

// IQ2_XXS: d, then per sub-block two u32: 4 grid indices (bytes), 4 x 7 sign bits | scale << 28.
// quants_iq.py: db = d * (0.5 + ls) * 0.25; db * grid * signs
struct blk_iq2_xxs : iq_block {
    static constexpr int type_size = 66;
    PROMOE_CHUNK_TYPE(8, 8)
    PROMOE_DEV static void decode(const u8* b, int c, chunk& o) {
        const u32 idx = ld_u32_a2(b + 2 + 8 * c), aux = ld_u32_a2(b + 6 + 8 * c);
#pragma unroll
        for (int l = 0; l < 4; ++l) {
            put_signed8(o, l, IQ2XXS_GRID[byte_of(idx, l)], ksigns8((aux >> (7 * l)) & 127u));
        }
        o.d[0] = half_step_scale(ld_f16(b), aux >> 28, 0.25f);
    }
};

// IQ2_XS: d, u16 qs[32] (9-bit grid index | 7 sign bits << 9), scales[8] (two 4-bit scales per
// sub-block: its first and second 16 values). quants_iq.py: db * grid * signs
struct blk_iq2_xs : iq_block {
    static constexpr int type_size = 74;
    PROMOE_CHUNK_TYPE(8, 4)
    PROMOE_DEV static void decode(const u8* b, int c, chunk& o) {
        const u32 w[2] = {ld_u32_a2(b + 2 + 8 * c), ld_u32_a2(b + 6 + 8 * c)};
        const u32 sc = byte_of(ld_u16(b + 66 + 2 * (c >> 1)), c & 1);
#pragma unroll
        for (int l = 0; l < 4; ++l) {
            const u32 q = (w[l >> 1] >> (16 * (l & 1))) & 0xFFFFu;
            put_signed8(o, l, IQ2XS_GRID[q & 511u], ksigns8(q >> 9));
        }
        two_half_step_scales(o, ld_f16(b), sc);
    }
};

// IQ2_S: d, qs[32] (grid index low bytes), signs[32], qh[8] (2 high index bits per group of 8),
// scales[8] (as IQ2_XS).
struct blk_iq2_s : iq_block {
    static constexpr int type_size = 82;
    PROMOE_CHUNK_TYPE(8, 4)
    PROMOE_DEV static void decode(const u8* b, int c, chunk& o) {
        const u32 idx = ld_u32_a2(b + 2 + 4 * c), sg = ld_u32_a2(b + 34 + 4 * c);
        const u32 pair = ld_u16(b + 66 + 2 * (c >> 1));                 // qh[c], qh[c^1] (and so on)
        const u32 qh = byte_of(pair, c & 1);
        const u32 sc = byte_of(ld_u16(b + 74 + 2 * (c >> 1)), c & 1);
#pragma unroll
        for (int l = 0; l < 4; ++l) {
            put_signed8(o, l, IQ2S_GRID[byte_of(idx, l) | (((qh >> (2 * l)) & 3u) << 8)], byte_of(sg, l));
        }
        two_half_step_scales(o, ld_f16(b), sc);
    }
};

// IQ3_XXS: d, qs[64] (grid indices, 4 values each), then per sub-block a u32: 4 x 7 sign bits |
// scale << 28. quants_iq.py: db = d * (0.5 + ls) * 0.5
struct blk_iq3_xxs : iq_block {
    static constexpr int type_size = 98;
    PROMOE_CHUNK_TYPE(8, 8)
    PROMOE_DEV static void decode(const u8* b, int c, chunk& o) {
        const u32 idx[2] = {ld_u32_a2(b + 2 + 8 * c), ld_u32_a2(b + 6 + 8 * c)};
        const u32 aux = ld_u32_a2(b + 66 + 4 * c);
#pragma unroll
        for (int l = 0; l < 4; ++l) {
            const u32 s = ksigns8((aux >> (7 * l)) & 127u);
            o.q[2 * l] = signed_biased4(IQ3XXS_GRID[byte_of(idx[l >> 1], 2 * (l & 1))], s);
            o.q[2 * l + 1] = signed_biased4(IQ3XXS_GRID[byte_of(idx[l >> 1], 2 * (l & 1) + 1)], s >> 4);
        }
        o.d[0] = half_step_scale(ld_f16(b), aux >> 28, 0.5f);
    }
};

// IQ3_S: d, qs[64] (grid index low bytes), qh[8] (the 9th bit of each of a sub-block's 8 indices),
// signs[32], scales[4] (a nibble per sub-block). quants_iq.py: db = d * (1 + 2 * sc)
struct blk_iq3_s : iq_block {
    static constexpr int type_size = 110;
    PROMOE_CHUNK_TYPE(8, 8)
    PROMOE_DEV static void decode(const u8* b, int c, chunk& o) {
        const u32 idx[2] = {ld_u32_a2(b + 2 + 8 * c), ld_u32_a2(b + 6 + 8 * c)};
        const u32 qh = byte_of(ld_u16(b + 66 + 2 * (c >> 1)), c & 1);
        const u32 sg = ld_u32_a2(b + 74 + 4 * c);
        const u32 sc = (byte_of(ld_u16(b + 106 + 2 * (c >> 2)), (c >> 1) & 1) >> (4 * (c & 1))) & 15u;
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const u32 g = IQ3S_GRID[byte_of(idx[k >> 2], k & 3) | (((qh >> k) & 1u) << 8)];
            o.q[k] = signed_biased4(g, byte_of(sg, k >> 1) >> (4 * (k & 1)));
        }
        o.d[0] = __fmul_rn(ld_f16(b), u_to_float(1 + 2 * sc));
    }
};

// IQ1 grid entry (values + 1, bytes 0..2) -> bytes 128 + 8g + 1 (shift +1/8) or 128 + 8g - 1
PROMOE_DEV u32 iq1_biased4(u32 g1, bool minus) { return g1 * 8u + (minus ? 0x77777777u : 0x79797979u); }

// IQ1_S: d, qs[32] (grid index low bytes), u16 qh[8]: 4 x 3 high index bits | 3-bit scale << 12 |
// the shift's sign << 15. quants_iq.py: dl = d * (2 * sc + 1); dl * (grid + delta)
struct blk_iq1_s : iq_block {
    static constexpr int type_size = 50;
    PROMOE_CHUNK_TYPE(8, 8)
    PROMOE_DEV static void decode(const u8* b, int c, chunk& o) {
        const u32 idx = ld_u32_a2(b + 2 + 4 * c), qh = ld_u16(b + 34 + 2 * c);
        const bool minus = (qh & 0x8000u) != 0;
#pragma unroll
        for (int l = 0; l < 4; ++l) {
            const u64 g = IQ1S_GRID[byte_of(idx, l) | (((qh >> (3 * l)) & 7u) << 8)];
            o.q[2 * l] = iq1_biased4((u32)g, minus);
            o.q[2 * l + 1] = iq1_biased4((u32)(g >> 32), minus);
        }
        o.d[0] = __fmul_rn(__fmul_rn(ld_f16(b), u_to_float(2 * ((qh >> 12) & 7u) + 1)), 0.125f);
    }
};

// IQ1_M: qs[32] (grid index low bytes), qh[16] (per group of 8: 3 high index bits | the shift's
// sign << 3, a nibble each), u16 scales[4]: 3-bit scales (4 per u16), their top nibbles the f16 d.
struct blk_iq1_m : iq_block {
    static constexpr int type_size = 56;
    PROMOE_CHUNK_TYPE(8, 4)
    PROMOE_DEV static void decode(const u8* b, int c, chunk& o) {
        const u32 idx = ld_u32_a2(b + 4 * c), qh = ld_u16(b + 32 + 2 * c);
        const u32 s01 = ld_u32_a2(b + 48), s23 = ld_u32_a2(b + 52);
        const u32 dbits = ((s01 >> 12) & 0xFu) | ((s01 >> 24) & 0xF0u) | ((s23 >> 4) & 0xF00u) | ((s23 >> 16) & 0xF000u);
        const float d = f16_to_f32((u16)dbits);
        const u32 sc = (((c >> 1) < 2 ? s01 : s23) >> (16 * ((c >> 1) & 1) + 6 * (c & 1))) & 0x3Fu;
#pragma unroll
        for (int l = 0; l < 4; ++l) {
            const u32 nib = (qh >> (4 * l)) & 0xFu;                       // qh[2c + l/2], nibble l%2
            const u64 g = IQ1S_GRID[byte_of(idx, l) | ((nib & 7u) << 8)];
            o.q[2 * l] = iq1_biased4((u32)g, nib & 8u);
            o.q[2 * l + 1] = iq1_biased4((u32)(g >> 32), nib & 8u);
        }
#pragma unroll
        for (int h = 0; h < 2; ++h)
            o.d[h] = __fmul_rn(__fmul_rn(d, u_to_float(2 * ((sc >> (3 * h)) & 7u) + 1)), 0.125f);
    }
};

// MXFP4: an e8m0 exponent e (d = 2^(e - 128)), qs[16]: element j = low nibble of qs[j], element
// j + 16 = high nibble; value d * kv[q] (kv: fp4 e2m1 x 2). Q4_0's element order, byte loads.
struct blk_mxfp4 : legacy_block {
    static constexpr int type_size = 17, bias = 128;
    static constexpr bool has_min = false;
    PROMOE_DEV static void decode(const u8* b, int c, chunk& o) {
        const u32 a = ld_u32_a1(b + 1 + 8 * c), bb = ld_u32_a1(b + 5 + 8 * c);
        PROMOE_LEGACY_NIBBLES(o, a, bb)
#pragma unroll
        for (int r = 0; r < 4; ++r) o.q[r] = mxfp4_lookup4(o.q[r]);
        const u32 e = ld_u8(b);
        o.d[0] = __uint_as_float(e < 2 ? 0x00200000u << e : (e - 1) << 23);
    }
};

// ---------------------------------------------------------------------------------------------
// Which types a compilation instantiates: all, or only -DPROMOE_QTYPE=<ggml type id> (the
// launcher compiles one module per op and quant type). X(name, traits).
// ---------------------------------------------------------------------------------------------
#if !defined(PROMOE_QTYPE)
#define PROMOE_FOR_EACH_QTYPE(X) \
    X(q4_0, blk_q4_0) X(q4_1, blk_q4_1) X(q5_0, blk_q5_0) X(q5_1, blk_q5_1) X(q8_0, blk_q8_0) \
    X(q2_k, blk_q2_k) X(q3_k, blk_q3_k) X(q4_k, blk_q4_k) X(q5_k, blk_q5_k) X(q6_k, blk_q6_k) \
    X(iq4_nl, blk_iq4_nl) X(iq4_xs, blk_iq4_xs) \
    X(iq2_xxs, blk_iq2_xxs) X(iq2_xs, blk_iq2_xs) X(iq2_s, blk_iq2_s) X(iq3_xxs, blk_iq3_xxs) \
    X(iq3_s, blk_iq3_s) X(iq1_s, blk_iq1_s) X(iq1_m, blk_iq1_m) X(mxfp4, blk_mxfp4)
#elif PROMOE_QTYPE == 2
#define PROMOE_FOR_EACH_QTYPE(X) X(q4_0, blk_q4_0)
#elif PROMOE_QTYPE == 3
#define PROMOE_FOR_EACH_QTYPE(X) X(q4_1, blk_q4_1)
#elif PROMOE_QTYPE == 6
#define PROMOE_FOR_EACH_QTYPE(X) X(q5_0, blk_q5_0)
#elif PROMOE_QTYPE == 7
#define PROMOE_FOR_EACH_QTYPE(X) X(q5_1, blk_q5_1)
#elif PROMOE_QTYPE == 8
#define PROMOE_FOR_EACH_QTYPE(X) X(q8_0, blk_q8_0)
#elif PROMOE_QTYPE == 10
#define PROMOE_FOR_EACH_QTYPE(X) X(q2_k, blk_q2_k)
#elif PROMOE_QTYPE == 11
#define PROMOE_FOR_EACH_QTYPE(X) X(q3_k, blk_q3_k)
#elif PROMOE_QTYPE == 12
#define PROMOE_FOR_EACH_QTYPE(X) X(q4_k, blk_q4_k)
#elif PROMOE_QTYPE == 13
#define PROMOE_FOR_EACH_QTYPE(X) X(q5_k, blk_q5_k)
#elif PROMOE_QTYPE == 14
#define PROMOE_FOR_EACH_QTYPE(X) X(q6_k, blk_q6_k)
#elif PROMOE_QTYPE == 20
#define PROMOE_FOR_EACH_QTYPE(X) X(iq4_nl, blk_iq4_nl)
#elif PROMOE_QTYPE == 23
#define PROMOE_FOR_EACH_QTYPE(X) X(iq4_xs, blk_iq4_xs)
#elif PROMOE_QTYPE == 16
#define PROMOE_FOR_EACH_QTYPE(X) X(iq2_xxs, blk_iq2_xxs)
#elif PROMOE_QTYPE == 17
#define PROMOE_FOR_EACH_QTYPE(X) X(iq2_xs, blk_iq2_xs)
#elif PROMOE_QTYPE == 22
#define PROMOE_FOR_EACH_QTYPE(X) X(iq2_s, blk_iq2_s)
#elif PROMOE_QTYPE == 18
#define PROMOE_FOR_EACH_QTYPE(X) X(iq3_xxs, blk_iq3_xxs)
#elif PROMOE_QTYPE == 21
#define PROMOE_FOR_EACH_QTYPE(X) X(iq3_s, blk_iq3_s)
#elif PROMOE_QTYPE == 19
#define PROMOE_FOR_EACH_QTYPE(X) X(iq1_s, blk_iq1_s)
#elif PROMOE_QTYPE == 29
#define PROMOE_FOR_EACH_QTYPE(X) X(iq1_m, blk_iq1_m)
#elif PROMOE_QTYPE == 39
#define PROMOE_FOR_EACH_QTYPE(X) X(mxfp4, blk_mxfp4)
#else
#error "PROMOE_QTYPE: not a supported ggml type id"
#endif
