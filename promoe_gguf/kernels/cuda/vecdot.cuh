// vecdot.cuh: the per-thread dot-product loops shared by matvec.cu and moe_fused.cu, and the
// reductions that finish them.
//
// A CTA of PROMOE_THREADS threads is split into groups of `tpr` threads (a power of two, 1..128,
// chosen by the launcher so that a row's (block, chunk) items keep every thread of a group busy:
// a 768-wide Q4_K row has 24 items, so 8 threads per row, 16 rows in flight per CTA). Group g
// computes NROWS dot products (NROWS weight rows) against NCOLS activation rows; lane l of the
// group takes items q = l, l + tpr, ...: block q / nchunk, chunk q % nchunk.
//
// Two activation formats, one result layout: acc[i * NCOLS + t] += this thread's share of rows[i] . x[t].
//  * fp32 (vecdot_partial): x read as float4 per run; per scale group of rps runs,
//    acc += d * sum((b - bias) * x) [+ m * sum(x)]. Exact fp32 arithmetic (the dequantized-twin bound).
//  * q8 (vecdot_q8_partial): x quantized once per product to int8 with one fp32 scale per 32
//    values (quantize.cu), as llama.cpp's mmvq does; per scale group one dp4a per run:
//    isum = sum((b ^ 0x80) * xq) (signed bytes), xs = sum(xq), and
//    acc += d * dx * (isum + (128 - bias) * xs) [+ m * dx * xs]   (exact integer sums).
#pragma once
#include "blocks.cuh"

#define PROMOE_NWARPS 4
#define PROMOE_THREADS (32 * PROMOE_NWARPS)
#define PROMOE_Q8_BLOCK 32      // activation values per q8 scale (quantize.cu)

PROMOE_DEV float4 ld_x4(const float* p) { return __ldg(reinterpret_cast<const float4*>(p)); }
PROMOE_DEV int ld_i32(const signed char* p) { return __ldg(reinterpret_cast<const int*>(p)); }

#if defined(__CUDACC__)
// signed 4-way byte dot product with accumulate (sm_61+); the host emulation defines the same
PROMOE_DEV int dp4a_s8(int a, int b, int c) {
    int r;
    asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
}
#endif

// Partial sums of lane `lane` of a group of `step` threads. x[t] = x + t * x_stride, 16-byte
// aligned, nblocks * B::qk floats.
template <class B, int NCOLS, int NROWS>
PROMOE_DEV void vecdot_partial(const u8* const (&rows)[NROWS], int nblocks,
                               const float* __restrict__ x, int x_stride, int lane, int step,
                               float (&acc)[NROWS * NCOLS]) {
    const int nq = nblocks * B::nchunk;
    for (int q = lane; q < nq; q += step) {
        const int ib = q / B::nchunk, c = q % B::nchunk;
        typename B::chunk ch[NROWS];
#pragma unroll
        for (int i = 0; i < NROWS; ++i) B::decode(rows[i] + ib * B::type_size, c, ch[i]);
        const float* xb = x + ib * B::qk + B::chunk_base(c);
#pragma unroll
        for (int g = 0; g < B::ngrp; ++g) {          // runs g*rps .. g*rps + rps-1 share d, m
            float dot[NROWS * NCOLS];                // sum over the group of (b - bias) * x
            float xsum[NCOLS];                       // sum over the group of x (types with mins)
#pragma unroll
            for (int rr = 0; rr < B::rps; ++rr) {
                const int r = g * B::rps + rr;
                float4 xv[NCOLS];
#pragma unroll
                for (int t = 0; t < NCOLS; ++t) {
                    xv[t] = ld_x4(xb + t * x_stride + B::run_offset(r));
                    if constexpr (B::has_min) {
                        const float s4 = (xv[t].x + xv[t].y) + (xv[t].z + xv[t].w);
                        xsum[t] = rr == 0 ? s4 : xsum[t] + s4;
                    }
                }
#pragma unroll
                for (int i = 0; i < NROWS; ++i) {
                    const float q0 = byte_to_float<B::bias>(ch[i].q[r], 0);
                    const float q1 = byte_to_float<B::bias>(ch[i].q[r], 1);
                    const float q2 = byte_to_float<B::bias>(ch[i].q[r], 2);
                    const float q3 = byte_to_float<B::bias>(ch[i].q[r], 3);
#pragma unroll
                    for (int t = 0; t < NCOLS; ++t) {
                        float& s = dot[i * NCOLS + t];
                        s = rr == 0 ? q0 * xv[t].x : fmaf(q0, xv[t].x, s);
                        s = fmaf(q1, xv[t].y, s);
                        s = fmaf(q2, xv[t].z, s);
                        s = fmaf(q3, xv[t].w, s);
                    }
                }
            }
#pragma unroll
            for (int i = 0; i < NROWS; ++i) {
#pragma unroll
                for (int t = 0; t < NCOLS; ++t) {
                    float& a = acc[i * NCOLS + t];
                    a = fmaf(ch[i].d[g], dot[i * NCOLS + t], a);
                    if constexpr (B::has_min) a = fmaf(ch[i].m[g], xsum[t], a);
                }
            }
        }
    }
}

// The q8 form. xq[t] = xq + t * xq_stride (int8, 4-byte aligned runs), xd[t] = xd + t * xd_stride
// (one scale per PROMOE_Q8_BLOCK values). A scale group never straddles two q8 blocks: groups are
// aligned runs of 8 or 16 values inside a 32-value sub-block.
template <class B, int NCOLS, int NROWS>
PROMOE_DEV void vecdot_q8_partial(const u8* const (&rows)[NROWS], int nblocks,
                                  const signed char* __restrict__ xq, int xq_stride,
                                  const float* __restrict__ xd, int xd_stride, int lane, int step,
                                  float (&acc)[NROWS * NCOLS]) {
    const int nq = nblocks * B::nchunk;
    for (int q = lane; q < nq; q += step) {
        const int ib = q / B::nchunk, c = q % B::nchunk;
        typename B::chunk ch[NROWS];
#pragma unroll
        for (int i = 0; i < NROWS; ++i) B::decode(rows[i] + ib * B::type_size, c, ch[i]);
        const int e0 = ib * B::qk + B::chunk_base(c);
#pragma unroll
        for (int g = 0; g < B::ngrp; ++g) {
            int isum[NROWS * NCOLS];
            int xs[NCOLS];
            float dx[NCOLS];
#pragma unroll
            for (int t = 0; t < NCOLS; ++t) {
                dx[t] = __ldg(xd + t * xd_stride + (e0 + B::run_offset(g * B::rps)) / PROMOE_Q8_BLOCK);
                xs[t] = 0;
            }
#pragma unroll
            for (int i = 0; i < NROWS * NCOLS; ++i) isum[i] = 0;
#pragma unroll
            for (int rr = 0; rr < B::rps; ++rr) {
                const int r = g * B::rps + rr;
                int xv[NCOLS];
#pragma unroll
                for (int t = 0; t < NCOLS; ++t) {
                    xv[t] = ld_i32(xq + t * xq_stride + e0 + B::run_offset(r));
                    xs[t] = dp4a_s8(xv[t], 0x01010101, xs[t]);
                }
#pragma unroll
                for (int i = 0; i < NROWS; ++i) {
                    const int w = (int)(ch[i].q[r] ^ 0x80808080u);
#pragma unroll
                    for (int t = 0; t < NCOLS; ++t) isum[i * NCOLS + t] = dp4a_s8(w, xv[t], isum[i * NCOLS + t]);
                }
            }
#pragma unroll
            for (int i = 0; i < NROWS; ++i) {
#pragma unroll
                for (int t = 0; t < NCOLS; ++t) {
                    float& a = acc[i * NCOLS + t];
                    const int s = isum[i * NCOLS + t] + (128 - B::bias) * xs[t];
                    a = fmaf(ch[i].d[g] * dx[t], (float)s, a);
                    if constexpr (B::has_min) a = fmaf(ch[i].m[g] * dx[t], (float)xs[t], a);
                }
            }
        }
    }
}

PROMOE_DEV float warp_sum(float v, int width = 32) {
    for (int o = width >> 1; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
    return v;
}

// Sums v[0..N-1] over each group of `tpr` consecutive threads (a power of two, 1..PROMOE_THREADS),
// in a fixed order (butterfly inside a warp, then the group's warps in warp order), so results are
// bitwise reproducible. Every thread of the CTA must call it with the same tpr. Returns the
// calling thread's group totals (shared memory), valid until the next call.
template <int N>
PROMOE_DEV const float* group_sum(float (&v)[N], int tpr) {
    __shared__ float part[PROMOE_THREADS][N];
    __shared__ float tot[PROMOE_THREADS][N];
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int width = tpr < 32 ? tpr : 32;
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = warp_sum(v[i], width);
    if (tpr <= 32) {
        if (tid % tpr == 0) {
#pragma unroll
            for (int i = 0; i < N; ++i) tot[tid / tpr][i] = v[i];
        }
        __syncthreads();
        return tot[tid / tpr];
    }
    if (lane == 0) {
#pragma unroll
        for (int i = 0; i < N; ++i) part[warp][i] = v[i];
    }
    __syncthreads();
    const int wpg = tpr / 32, g = tid / tpr, j = tid % tpr;
    if (j < N) {
        float s = part[g * wpg][j];
        for (int w = 1; w < wpg; ++w) s += part[g * wpg + w][j];
        tot[g][j] = s;
    }
    __syncthreads();
    return tot[g];
}

// The whole CTA as one group (norm.cu).
template <int N>
PROMOE_DEV const float* block_sum(float (&v)[N]) {
    return group_sum<N>(v, PROMOE_THREADS);
}
