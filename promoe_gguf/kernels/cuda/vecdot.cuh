// vecdot.cuh: the per-thread dot-product loop shared by matvec.cu and moe_fused.cu, and the
// CTA-wide reduction. Activations stay fp32 (see README.md: "Activation precision").
//
// A CTA of PROMOE_THREADS threads computes NROWS dot products (NROWS weight rows, each a run of
// quant blocks) against NCOLS activation rows. The threads stride over the (block, chunk) pairs of
// a row: thread tid takes q = tid, tid + 128, ..., i.e. block q / nchunk and chunk q % nchunk, so
// a warp reads 32 consecutive 4-byte words (or 2-byte halves) of consecutive blocks. Each x load
// (a float4 per run and column) is reused for all NROWS rows; each decoded quant for all NCOLS
// columns. Per scale group (rps runs): acc += d * sum((b - bias) * x) [+ m * sum(x)].
#pragma once
#include "blocks.cuh"

#define PROMOE_NWARPS 4
#define PROMOE_THREADS (32 * PROMOE_NWARPS)

PROMOE_DEV float4 ld_x4(const float* p) { return __ldg(reinterpret_cast<const float4*>(p)); }

// Partial sums of thread `tid` (before the CTA reduction). acc[i * NCOLS + t] += this thread's
// share of rows[i] . x[t]; x[t] = x + t * x_stride, 16-byte aligned, nblocks * B::qk floats.
template <class B, int NCOLS, int NROWS>
PROMOE_DEV void vecdot_partial(const u8* const (&rows)[NROWS], int nblocks,
                               const float* __restrict__ x, int x_stride, int tid,
                               float (&acc)[NROWS * NCOLS]) {
    const int nq = nblocks * B::nchunk;
    for (int q = tid; q < nq; q += PROMOE_THREADS) {
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

PROMOE_DEV float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
    return v;
}

// CTA-wide sums of v[0..N-1] over all PROMOE_THREADS threads, in a fixed order (butterfly within
// each warp, then warp 0 + 1 + 2 + 3), so results are bitwise reproducible. Every thread must call
// it. Returns a shared array holding the N totals, valid for all threads until the next call.
template <int N>
PROMOE_DEV const float* block_sum(float (&v)[N]) {
    __shared__ float part[PROMOE_NWARPS][N];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = warp_sum(v[i]);
    if (lane == 0) {
#pragma unroll
        for (int i = 0; i < N; ++i) part[warp][i] = v[i];
    }
    __syncthreads();
    if (threadIdx.x < N) {
        float s = part[0][threadIdx.x];
#pragma unroll
        for (int w = 1; w < PROMOE_NWARPS; ++w) s += part[w][threadIdx.x];
        part[0][threadIdx.x] = s;
    }
    __syncthreads();
    return part[0];
}
