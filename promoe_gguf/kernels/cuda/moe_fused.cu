// moe_fused.cu: a layer's routed experts in decode, routed on the device.
//
// A "pair" p = t * n_slots + s is (token t, slot s): the s-th expert the router picked for token t,
// e = ids[p] (the router's top-k output, int64, on the device). Where its matrices are: the layer's
// slot table, slot = table[e] (-1: not on the device), the matrix at base + slot * stride. For
// every-expert-resident layers the table is the identity over the layer's packed stack; with an
// expert cache it is the cache's table (the copy stream marks a slot -1 before overwriting it).
// skip[e] != 0 (skip may be null) marks an expert computed elsewhere this step (the CPU pool).
// A pair whose expert is absent or skipped is not computed here: moe_combine adds its output from
// the CPU's rows instead. Nothing is read by the host: no address table, no synchronisation.
//
// 1. moe_gate_up_<type>[_q8]:  h[p, r] = silu(gate_p[r] . x[t]) * (up_p[r] . x[t])
//    grid (ceil(n_ff / rows_per_cta), n_pairs); each group streams NR rows of gate and the same NR
//    rows of up through one pass over x[t]. gate and up must have the same quant type.
// 2. moe_matvec_<type>[_q8]:   y[p, r] = scale[p] * (W_p[r] . x[p / x_div])  (scale may be null)
//    grid (ceil(nrows / rows_per_cta), n_pairs). The down projection (x = h, x_div = 1, scale =
//    the routing weights); gate or up alone (x_div = n_slots) when their types differ. done[p]
//    (may be null) records whether pair p was computed, for moe_combine.cu.
// 3. moe_down_combine_<type>[_q8]: out[t, r] = sum over s in slot order of w[t, s] * (down_(t,s)[r] . h[t, s])
//    grid (ceil(n_embd / rows_per_cta), n_tokens): the down projection and the weighted slot sum in
//    one launch (every expert on the device). Each product and sum is rounded exactly as 2. then
//    moe_combine round them, so both routes give the same bits.
// rows_per_cta = (PROMOE_THREADS / tpr) * NR: groups of tpr threads per row, as matvec.cu.
#include "vecdot.cuh"

#define MOE_GATE_UP_ROWS 2   // rows of gate (and of up) per group; mirrored by plans.py
#define MOE_MATVEC_ROWS 4    // rows per group of moe_matvec and moe_down_combine; mirrored by plans.py

// The slot of pair p's expert, or -1 when this launch does not compute it.
PROMOE_DEV int pair_slot(const long long* __restrict__ ids, const int* __restrict__ table,
                         const int* __restrict__ skip, int p) {
    const int e = (int)__ldg(ids + p);
    if (skip != nullptr && __ldg(skip + e) != 0) return -1;
    return __ldg(table + e);
}

// One activation row: fp32 (x) or q8 (xq, xd), row `t`.
struct act_row {
    const void* x;
    const float* xd;
    int stride, d_stride;
};

template <class B, int NR, bool Q8>
PROMOE_DEV void rows_dot(const u8* const (&rows)[NR], int nblocks, const act_row& a, int t, int lane, int tpr,
                         float (&acc)[NR]) {
#pragma unroll
    for (int i = 0; i < NR; ++i) acc[i] = 0.0f;
    if constexpr (Q8)
        vecdot_q8_partial<B, 1, NR>(rows, nblocks, static_cast<const signed char*>(a.x) + (long long)t * a.stride, 0,
                                    a.xd + (long long)t * a.d_stride, 0, lane, tpr, acc);
    else
        vecdot_partial<B, 1, NR>(rows, nblocks, static_cast<const float*>(a.x) + (long long)t * a.stride, 0, lane,
                                 tpr, acc);
}

template <class B, bool Q8>
PROMOE_DEV void moe_gate_up_kernel(const long long* ids, const int* table, const int* skip, const u8* gate_base,
                                   const u8* up_base, long long stride, int n_slots, int n_ff, int nblocks,
                                   long long row_bytes, const act_row& x, float* __restrict__ h, int h_stride,
                                   int tpr) {
    constexpr int NR = MOE_GATE_UP_ROWS;
    const int p = blockIdx.y, slot = pair_slot(ids, table, skip, p);
    if (slot < 0) return;                                  // the whole CTA: no barrier is skipped by some
    const int g = threadIdx.x / tpr, lane = threadIdx.x % tpr;
    const int row0 = (blockIdx.x * (PROMOE_THREADS / tpr) + g) * NR;
    const u8* gate = gate_base + (long long)slot * stride;
    const u8* up = up_base + (long long)slot * stride;
    const u8* rows[2 * NR];
#pragma unroll
    for (int i = 0; i < NR; ++i) {
        const long long off = (long long)imin(row0 + i, n_ff - 1) * row_bytes;
        rows[i] = gate + off;
        rows[NR + i] = up + off;
    }
    float acc[2 * NR];
    rows_dot<B, 2 * NR, Q8>(rows, nblocks, x, p / n_slots, lane, tpr, acc);
    const float* tot = group_sum(acc, tpr);
    if (lane < NR && row0 + lane < n_ff) {
        const float gv = tot[lane], uv = tot[NR + lane];
        h[(long long)p * h_stride + row0 + lane] = gv / (1.0f + expf(-gv)) * uv;
    }
}

template <class B, bool Q8>
PROMOE_DEV void moe_matvec_kernel(const long long* ids, const int* table, const int* skip, const u8* base,
                                  long long stride, int nrows, int nblocks, long long row_bytes, const act_row& x,
                                  int x_div, const float* __restrict__ scale, float* __restrict__ y, int y_stride,
                                  int* __restrict__ done, int tpr) {
    constexpr int NR = MOE_MATVEC_ROWS;
    const int p = blockIdx.y, slot = pair_slot(ids, table, skip, p);
    if (done != nullptr && blockIdx.x == 0 && threadIdx.x == 0) done[p] = slot >= 0;
    if (slot < 0) return;
    const int g = threadIdx.x / tpr, lane = threadIdx.x % tpr;
    const int row0 = (blockIdx.x * (PROMOE_THREADS / tpr) + g) * NR;
    const u8* w = base + (long long)slot * stride;
    const u8* rows[NR];
#pragma unroll
    for (int i = 0; i < NR; ++i) rows[i] = w + (long long)imin(row0 + i, nrows - 1) * row_bytes;
    float acc[NR];
    rows_dot<B, NR, Q8>(rows, nblocks, x, p / x_div, lane, tpr, acc);
    const float* tot = group_sum(acc, tpr);
    if (lane < NR && row0 + lane < nrows) {
        float v = tot[lane];
        if (scale != nullptr) v *= __ldg(scale + p);
        y[(long long)p * y_stride + row0 + lane] = v;
    }
}

template <class B, bool Q8>
PROMOE_DEV void moe_down_combine_kernel(const long long* ids, const int* table, const u8* base, long long stride,
                                        int n_slots, int nrows, int nblocks, long long row_bytes, const act_row& h,
                                        const float* __restrict__ w, float* __restrict__ out, int out_stride,
                                        int tpr) {
    constexpr int NR = MOE_MATVEC_ROWS;
    const int t = blockIdx.y;
    const int g = threadIdx.x / tpr, lane = threadIdx.x % tpr;
    const int row0 = (blockIdx.x * (PROMOE_THREADS / tpr) + g) * NR;
    float sum = 0.0f;                                       // lane i < NR: row row0 + i
    for (int s = 0; s < n_slots; ++s) {
        const int p = t * n_slots + s, slot = pair_slot(ids, table, nullptr, p);
        if (slot < 0) continue;                             // uniform over the CTA; never in a resident layer
        const u8* wm = base + (long long)slot * stride;
        const u8* rows[NR];
#pragma unroll
        for (int i = 0; i < NR; ++i) rows[i] = wm + (long long)imin(row0 + i, nrows - 1) * row_bytes;
        float acc[NR];
        rows_dot<B, NR, Q8>(rows, nblocks, h, p, lane, tpr, acc);
        const float* tot = group_sum(acc, tpr);
        if (lane < NR) {
            const float v = tot[lane] * __ldg(w + p);
            sum = s == 0 ? v : sum + v;
        }
        __syncthreads();                                    // tot is reused by the next slot
    }
    if (lane < NR && row0 + lane < nrows) out[(long long)t * out_stride + row0 + lane] = sum;
}

#define PROMOE_ROUTE_PARAMS const long long* __restrict__ ids, const int* __restrict__ table, const int* __restrict__ skip
#define PROMOE_X_F32 const float* __restrict__ x, int x_stride
#define PROMOE_X_Q8 const signed char* __restrict__ xq, int x_stride, const float* __restrict__ xd, int xd_stride

#define PROMOE_MOE_ENTRIES_ACT(name, B, SUFFIX, Q8, XPARAMS, XROW)                                 \
    extern "C" __global__ void __launch_bounds__(PROMOE_THREADS) moe_gate_up_##name##SUFFIX(       \
        PROMOE_ROUTE_PARAMS, const u8* __restrict__ gate_base, const u8* __restrict__ up_base,     \
        long long stride, int n_slots, int n_ff, int nblocks, long long row_bytes, XPARAMS,        \
        float* __restrict__ h, int h_stride, int tpr) {                                            \
        const act_row a = XROW;                                                                    \
        moe_gate_up_kernel<B, Q8>(ids, table, skip, gate_base, up_base, stride, n_slots, n_ff, nblocks, \
                                  row_bytes, a, h, h_stride, tpr);                                 \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(PROMOE_THREADS) moe_matvec_##name##SUFFIX(        \
        PROMOE_ROUTE_PARAMS, const u8* __restrict__ base, long long stride, int nrows, int nblocks, \
        long long row_bytes, XPARAMS, int x_div, const float* __restrict__ scale,                  \
        float* __restrict__ y, int y_stride, int* __restrict__ done, int tpr) {                    \
        const act_row a = XROW;                                                                    \
        moe_matvec_kernel<B, Q8>(ids, table, skip, base, stride, nrows, nblocks, row_bytes, a, x_div, scale, \
                                 y, y_stride, done, tpr);                                          \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(PROMOE_THREADS) moe_down_combine_##name##SUFFIX(  \
        const long long* __restrict__ ids, const int* __restrict__ table, const u8* __restrict__ base, \
        long long stride, int n_slots, int nrows, int nblocks, long long row_bytes, XPARAMS,       \
        const float* __restrict__ w, float* __restrict__ out, int out_stride, int tpr) {           \
        const act_row a = XROW;                                                                    \
        moe_down_combine_kernel<B, Q8>(ids, table, base, stride, n_slots, nrows, nblocks, row_bytes, a, w, out, \
                                       out_stride, tpr);                                           \
    }

#define PROMOE_MOE_ENTRIES(name, B)                                                                \
    PROMOE_MOE_ENTRIES_ACT(name, B, , false, PROMOE_X_F32, (act_row{x, nullptr, x_stride, 0})) \
    PROMOE_MOE_ENTRIES_ACT(name, B, _q8, true, PROMOE_X_Q8, (act_row{xq, xd, x_stride, xd_stride}))

PROMOE_FOR_EACH_QTYPE(PROMOE_MOE_ENTRIES)
