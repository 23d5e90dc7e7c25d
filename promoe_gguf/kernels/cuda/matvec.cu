// matvec.cu: y[t, r] = sum_k W[r, k] * x[t, k] for 1..8 tokens (decode), W in GGUF quant blocks,
// for up to three matrices of one quant type that share their input (q, k and v in one launch).
//
// Each W is row-major: row r starts at w + r * row_bytes and is nblocks quant blocks. A CTA is
// PROMOE_THREADS / tpr groups of tpr threads (vecdot.cuh); group g computes NROWS consecutive rows,
// so a CTA covers rows_per_cta = (PROMOE_THREADS / tpr) * NROWS rows of one matrix. CTAs
// [0, nb0) take matrix 0, [nb0, nb0 + nb1) matrix 1, the rest matrix 2 (nb_i = ceil(rows_i /
// rows_per_cta); unused matrices have rows 0).
// Activations: fp32 x [ncols][x_stride] (16-byte aligned, x_stride a multiple of 4), or q8
// (quantize.cu) xq [ncols][xq_stride] int8 + xd [ncols][xd_stride] scales. y_i fp32 [ncols][y_stride_i].
// Grid: (nb0 + nb1 + nb2), block PROMOE_THREADS, no dynamic shared memory.
//
// Entry points: matvec_<type>_ncols<N> (fp32 x), matvec_q8_<type>_ncols<N> (q8 x), N = 1..8.
#include "vecdot.cuh"

// Rows per group: each activation load is reused for this many rows; fewer rows for more columns
// keep the accumulators and the loaded x in registers. Mirrored by plans.py.
__host__ __device__ constexpr int matvec_rows_per_group(int ncols) { return ncols <= 2 ? 4 : 2; }

// One of the launch's three matrices (selected without indexing an array: no local memory).
struct matvec_target {
    const u8* w;
    int rows;
    float* y;
    int y_stride;
};

template <class B, int NCOLS, bool Q8>
PROMOE_DEV void matvec_kernel(const matvec_target& tg, int cta_row0, long long row_bytes, int nblocks,
                              const void* __restrict__ x, int x_stride, const float* __restrict__ xd,
                              int xd_stride, int tpr) {
    constexpr int NROWS = matvec_rows_per_group(NCOLS);
    const int g = threadIdx.x / tpr, lane = threadIdx.x % tpr;
    const int nrows = tg.rows, row0 = cta_row0 + g * NROWS;
    const u8* rows[NROWS];
#pragma unroll
    for (int i = 0; i < NROWS; ++i)   // rows past the end re-read the last row; never stored
        rows[i] = tg.w + (long long)imin(row0 + i, nrows - 1) * row_bytes;

    float acc[NROWS * NCOLS];
#pragma unroll
    for (int i = 0; i < NROWS * NCOLS; ++i) acc[i] = 0.0f;
    if constexpr (Q8)
        vecdot_q8_partial<B, NCOLS, NROWS>(rows, nblocks, static_cast<const signed char*>(x), x_stride, xd,
                                           xd_stride, lane, tpr, acc);
    else
        vecdot_partial<B, NCOLS, NROWS>(rows, nblocks, static_cast<const float*>(x), x_stride, lane, tpr, acc);
    const float* tot = group_sum(acc, tpr);

    for (int o = lane; o < NROWS * NCOLS; o += tpr) {
        const int i = o / NCOLS, t = o % NCOLS;
        if (row0 + i < nrows) tg.y[(long long)t * tg.y_stride + row0 + i] = tot[o];
    }
}

// The matrix of this CTA ([0, nb0) the first, [nb0, nb0 + nb1) the second, the rest the third) and
// its first row.
PROMOE_DEV matvec_target matvec_pick(const u8* w0, const u8* w1, const u8* w2, int rows0, int rows1, int rows2,
                                     float* y0, float* y1, float* y2, int ys0, int ys1, int ys2, int nb0, int nb1,
                                     int rows_per_cta, int& row0) {
    const int b = blockIdx.x;
    if (b < nb0) { row0 = b * rows_per_cta; return matvec_target{w0, rows0, y0, ys0}; }
    if (b < nb0 + nb1) { row0 = (b - nb0) * rows_per_cta; return matvec_target{w1, rows1, y1, ys1}; }
    row0 = (b - nb0 - nb1) * rows_per_cta;
    return matvec_target{w2, rows2, y2, ys2};
}

#define PROMOE_MATVEC_PARAMS                                                                       \
    const u8* __restrict__ w0, const u8* __restrict__ w1, const u8* __restrict__ w2, int rows0,    \
        int rows1, int rows2, int nb0, int nb1, long long row_bytes, int nblocks
#define PROMOE_MATVEC_OUT                                                                          \
    float* __restrict__ y0, float* __restrict__ y1, float* __restrict__ y2, int y_stride0,         \
        int y_stride1, int y_stride2, int tpr
#define PROMOE_MATVEC_PICK(N)                                                                      \
    int row0;                                                                                      \
    const matvec_target tg = matvec_pick(w0, w1, w2, rows0, rows1, rows2, y0, y1, y2, y_stride0, y_stride1, \
                                         y_stride2, nb0, nb1, PROMOE_THREADS / tpr * matvec_rows_per_group(N), row0);

#define PROMOE_MATVEC_ENTRY(name, B, N)                                                            \
    extern "C" __global__ void __launch_bounds__(PROMOE_THREADS) matvec_##name##_ncols##N(         \
        PROMOE_MATVEC_PARAMS, const float* __restrict__ x, int x_stride, PROMOE_MATVEC_OUT) {      \
        PROMOE_MATVEC_PICK(N)                                                                      \
        matvec_kernel<B, N, false>(tg, row0, row_bytes, nblocks, x, x_stride, nullptr, 0, tpr);    \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(PROMOE_THREADS) matvec_q8_##name##_ncols##N(      \
        PROMOE_MATVEC_PARAMS, const signed char* __restrict__ xq, int xq_stride,                   \
        const float* __restrict__ xd, int xd_stride, PROMOE_MATVEC_OUT) {                          \
        PROMOE_MATVEC_PICK(N)                                                                      \
        matvec_kernel<B, N, true>(tg, row0, row_bytes, nblocks, xq, xq_stride, xd, xd_stride, tpr); \
    }

#define PROMOE_MATVEC_ENTRIES(name, B)                                                             \
    PROMOE_MATVEC_ENTRY(name, B, 1) PROMOE_MATVEC_ENTRY(name, B, 2) PROMOE_MATVEC_ENTRY(name, B, 3) \
    PROMOE_MATVEC_ENTRY(name, B, 4) PROMOE_MATVEC_ENTRY(name, B, 5) PROMOE_MATVEC_ENTRY(name, B, 6) \
    PROMOE_MATVEC_ENTRY(name, B, 7) PROMOE_MATVEC_ENTRY(name, B, 8)

PROMOE_FOR_EACH_QTYPE(PROMOE_MATVEC_ENTRIES)
