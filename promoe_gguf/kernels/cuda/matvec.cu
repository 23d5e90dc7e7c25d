// matvec.cu: y[t, r] = sum_k W[r, k] * x[t, k] for 1..8 tokens (decode), W in GGUF quant blocks.
//
// W is row-major: row r starts at w + r * row_bytes and is nblocks quant blocks. x is fp32,
// [ncols][x_stride] with x_stride a multiple of 4 and a 16-byte aligned base; y is fp32,
// [ncols][y_stride]. One CTA = 4 warps computes matvec_rows_per_cta(NCOLS) consecutive rows; all
// 128 threads stride along the rows (vecdot.cuh), then one CTA-wide reduction.
// Grid: (ceil(nrows / rows_per_cta), 1, 1), block: (128, 1, 1), no dynamic shared memory.
//
// Entry points: matvec_<type>_ncols<N>, N = 1..8, e.g. matvec_q4_k_ncols1.
#include "vecdot.cuh"

// Rows per CTA: each activation load is reused for this many rows; fewer rows for more columns
// keep the accumulators and the loaded x in registers. Mirrored by launch.py (MATVEC_ROWS).
__host__ __device__ constexpr int matvec_rows_per_cta(int ncols) { return ncols <= 2 ? 4 : 2; }

template <class B, int NCOLS>
PROMOE_DEV void matvec_kernel(const u8* __restrict__ w, long long row_bytes, int nrows, int nblocks,
                              const float* __restrict__ x, int x_stride,
                              float* __restrict__ y, int y_stride) {
    constexpr int NROWS = matvec_rows_per_cta(NCOLS);
    const int row0 = blockIdx.x * NROWS;
    const u8* rows[NROWS];
#pragma unroll
    for (int i = 0; i < NROWS; ++i)   // rows past the end re-read the last row; never stored
        rows[i] = w + (long long)imin(row0 + i, nrows - 1) * row_bytes;

    float acc[NROWS * NCOLS];
#pragma unroll
    for (int i = 0; i < NROWS * NCOLS; ++i) acc[i] = 0.0f;
    vecdot_partial<B, NCOLS, NROWS>(rows, nblocks, x, x_stride, threadIdx.x, acc);
    const float* tot = block_sum(acc);

    if (threadIdx.x < NROWS * NCOLS) {
        const int i = threadIdx.x / NCOLS, t = threadIdx.x % NCOLS;
        if (row0 + i < nrows) y[(long long)t * y_stride + row0 + i] = tot[threadIdx.x];
    }
}

#define PROMOE_MATVEC_ENTRY(name, B, N)                                                            \
    extern "C" __global__ void __launch_bounds__(PROMOE_THREADS) matvec_##name##_ncols##N(         \
        const u8* __restrict__ w, long long row_bytes, int nrows, int nblocks,                     \
        const float* __restrict__ x, int x_stride, float* __restrict__ y, int y_stride) {          \
        matvec_kernel<B, N>(w, row_bytes, nrows, nblocks, x, x_stride, y, y_stride);               \
    }

#define PROMOE_MATVEC_ENTRIES(name, B)                                                             \
    PROMOE_MATVEC_ENTRY(name, B, 1) PROMOE_MATVEC_ENTRY(name, B, 2) PROMOE_MATVEC_ENTRY(name, B, 3) \
    PROMOE_MATVEC_ENTRY(name, B, 4) PROMOE_MATVEC_ENTRY(name, B, 5) PROMOE_MATVEC_ENTRY(name, B, 6) \
    PROMOE_MATVEC_ENTRY(name, B, 7) PROMOE_MATVEC_ENTRY(name, B, 8)

PROMOE_FOR_EACH_QTYPE(PROMOE_MATVEC_ENTRIES)
