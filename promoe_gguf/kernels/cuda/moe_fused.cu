// moe_fused.cu: all selected experts of one MoE layer in decode, in three launches.
//
// A "pair" p = t * n_slots + s is (token t, slot s): the s-th expert the router picked for token t.
// table[3p + 0/1/2] holds the device addresses of that expert's gate, up and down matrices (raw
// GGUF quant blocks, row-major, rows of row_bytes). Tokens that share an expert simply point at the
// same bytes. Nothing is copied or synchronised: the table is filled on the GPU (or copied
// asynchronously) and every launch reads it.
//
// 1. moe_gate_up_<type>:  h[p, r] = silu(gate_p[r] . x[t]) * (up_p[r] . x[t])
//    grid (ceil(n_ff / 2), n_pairs), block 128; each CTA does 2 rows of gate and the same 2 rows of
//    up in one pass over x[t] (4 row streams). gate and up must have the same quant type.
// 2. moe_matvec_<type>:   y[p, r] = scale[p] * (W_p[r] . x[p / x_div])   with W_p = table[3p + which]
//    grid (ceil(nrows / 4), n_pairs), block 128. Down projection: which = 2, x = h, x_div = 1,
//    scale = router weights -> out_slot[t, s, :] = w[t, s] * down . h. With which = 0 or 1,
//    x_div = n_slots and scale = NULL it computes gate or up alone (when their types differ).
// 3. moe_combine:          out[t, j] = (((o[t, 0, j] + o[t, 1, j]) + o[t, 2, j]) + ...)
//    slots summed in slot order, so results do not depend on which experts were cached or in what
//    order the slots were computed. grid ceil(n_tokens * n / 256), block 256.
#include "vecdot.cuh"

#define MOE_GATE_UP_ROWS 2   // rows of gate (and of up) per CTA; mirrored by launch.py
#define MOE_MATVEC_ROWS 4    // rows per CTA of moe_matvec; mirrored by launch.py

PROMOE_DEV const u8* table_ptr(const u64* __restrict__ table, int p, int which) {
    return reinterpret_cast<const u8*>(__ldg(table + 3 * (long long)p + which));
}

template <class B>
PROMOE_DEV void moe_gate_up_kernel(const u64* __restrict__ table, int n_slots, int n_ff, int nblocks,
                                   long long row_bytes, const float* __restrict__ x, int x_stride,
                                   float* __restrict__ h, int h_stride) {
    constexpr int NR = MOE_GATE_UP_ROWS;
    const int p = blockIdx.y, t = p / n_slots;
    const u8* gate = table_ptr(table, p, 0);
    const u8* up = table_ptr(table, p, 1);
    const int row0 = blockIdx.x * NR;
    const u8* rows[2 * NR];
#pragma unroll
    for (int i = 0; i < NR; ++i) {
        const long long off = (long long)imin(row0 + i, n_ff - 1) * row_bytes;
        rows[i] = gate + off;
        rows[NR + i] = up + off;
    }
    float acc[2 * NR];
#pragma unroll
    for (int i = 0; i < 2 * NR; ++i) acc[i] = 0.0f;
    vecdot_partial<B, 1, 2 * NR>(rows, nblocks, x + (long long)t * x_stride, 0, threadIdx.x, acc);
    const float* tot = block_sum(acc);

    if (threadIdx.x < NR && row0 + (int)threadIdx.x < n_ff) {
        const float g = tot[threadIdx.x], u = tot[NR + threadIdx.x];
        h[(long long)p * h_stride + row0 + threadIdx.x] = g / (1.0f + expf(-g)) * u;
    }
}

template <class B>
PROMOE_DEV void moe_matvec_kernel(const u64* __restrict__ table, int which, int nrows, int nblocks,
                                  long long row_bytes, const float* __restrict__ x, int x_stride,
                                  int x_div, const float* __restrict__ scale,
                                  float* __restrict__ y, int y_stride) {
    constexpr int NR = MOE_MATVEC_ROWS;
    const int p = blockIdx.y;
    const u8* w = table_ptr(table, p, which);
    const int row0 = blockIdx.x * NR;
    const u8* rows[NR];
#pragma unroll
    for (int i = 0; i < NR; ++i) rows[i] = w + (long long)imin(row0 + i, nrows - 1) * row_bytes;
    float acc[NR];
#pragma unroll
    for (int i = 0; i < NR; ++i) acc[i] = 0.0f;
    vecdot_partial<B, 1, NR>(rows, nblocks, x + (long long)(p / x_div) * x_stride, 0, threadIdx.x, acc);
    const float* tot = block_sum(acc);

    if (threadIdx.x < NR && row0 + (int)threadIdx.x < nrows) {
        float v = tot[threadIdx.x];
        if (scale != nullptr) v *= __ldg(scale + p);
        y[(long long)p * y_stride + row0 + threadIdx.x] = v;
    }
}

#define PROMOE_MOE_ENTRIES(name, B)                                                                \
    extern "C" __global__ void __launch_bounds__(PROMOE_THREADS) moe_gate_up_##name(               \
        const u64* __restrict__ table, int n_slots, int n_ff, int nblocks, long long row_bytes,     \
        const float* __restrict__ x, int x_stride, float* __restrict__ h, int h_stride) {          \
        moe_gate_up_kernel<B>(table, n_slots, n_ff, nblocks, row_bytes, x, x_stride, h, h_stride); \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(PROMOE_THREADS) moe_matvec_##name(                \
        const u64* __restrict__ table, int which, int nrows, int nblocks, long long row_bytes,     \
        const float* __restrict__ x, int x_stride, int x_div, const float* __restrict__ scale,     \
        float* __restrict__ y, int y_stride) {                                                     \
        moe_matvec_kernel<B>(table, which, nrows, nblocks, row_bytes, x, x_stride, x_div, scale,   \
                             y, y_stride);                                                         \
    }

PROMOE_FOR_EACH_QTYPE(PROMOE_MOE_ENTRIES)

// slot_out: [n_tokens][n_slots][n], out: [n_tokens][n]
extern "C" __global__ void __launch_bounds__(256) moe_combine(const float* __restrict__ slot_out,
                                                              int n_tokens, int n_slots, int n,
                                                              float* __restrict__ out) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)n_tokens * n) return;
    const long long t = i / n, j = i % n;
    const float* src = slot_out + t * n_slots * (long long)n + j;
    float s = src[0];
    for (int k = 1; k < n_slots; ++k) s += src[(long long)k * n];
    out[i] = s;
}
