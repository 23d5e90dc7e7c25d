// dequant.cu: a quantized matrix (GGUF blocks, row-major, rows of row_bytes) -> fp32 or fp16,
// y[r * y_stride + k]. Used for prefill: dequantize one expert's matrix into a scratch tile, then
// a cuBLAS GEMM over the tokens routed to that expert.
//
// One thread per (row, block, chunk): it decodes its 4-element runs (blocks.cuh) and stores each
// run as one float4 (fp32) or one 8-byte word of 4 halves (fp16), so y must be 16- (fp32) or
// 8-byte (fp16) aligned with y_stride a multiple of 4. The fp32 values are bit-identical to
// promoe_gguf.format.quants.dequantize_torch; fp16 is that value rounded to nearest even.
// Grid: ceil(nrows * nblocks * nchunk / 256), block 256.
//
// get_rows_<type>_f32 is the same with row r of y taken from row ids[r] of W (int32, on the device):
// the token embedding of a decode step, reading the token id where the step's inputs were copied.
//
// Entry points: dequant_<type>_f32, dequant_<type>_f16, get_rows_<type>_f32.
#include "blocks.cuh"

#define DEQUANT_THREADS 256   // mirrored by launch.py

template <class B, bool F16>
PROMOE_DEV void dequant_kernel(const u8* __restrict__ w, long long row_bytes, int nrows, int nblocks,
                               void* __restrict__ y, long long y_stride, const int* __restrict__ ids = nullptr) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)nrows * nblocks * B::nchunk) return;
    const int c = (int)(i % B::nchunk);
    const long long blk = i / B::nchunk;
    const long long row = blk / nblocks;
    const int ib = (int)(blk % nblocks);
    const long long src = ids != nullptr ? (long long)__ldg(ids + row) : row;

    typename B::chunk ch;
    B::decode(w + src * row_bytes + (long long)ib * B::type_size, c, ch);
    const long long e0 = row * y_stride + (long long)ib * B::qk + B::chunk_base(c);
#pragma unroll
    for (int r = 0; r < B::nrun; ++r) {
        const long long e = e0 + B::run_offset(r);
        const float v0 = chunk_value<B>(ch, r, 0), v1 = chunk_value<B>(ch, r, 1);
        const float v2 = chunk_value<B>(ch, r, 2), v3 = chunk_value<B>(ch, r, 3);
        if constexpr (F16) {
            uint2 packed;
            packed.x = (u32)f32_to_f16(v0) | ((u32)f32_to_f16(v1) << 16);
            packed.y = (u32)f32_to_f16(v2) | ((u32)f32_to_f16(v3) << 16);
            *reinterpret_cast<uint2*>(static_cast<u16*>(y) + e) = packed;
        } else {
            *reinterpret_cast<float4*>(static_cast<float*>(y) + e) = make_float4(v0, v1, v2, v3);
        }
    }
}

#define PROMOE_DEQUANT_ENTRIES(name, B)                                                            \
    extern "C" __global__ void __launch_bounds__(DEQUANT_THREADS) dequant_##name##_f32(            \
        const u8* __restrict__ w, long long row_bytes, int nrows, int nblocks,                     \
        float* __restrict__ y, long long y_stride) {                                               \
        dequant_kernel<B, false>(w, row_bytes, nrows, nblocks, y, y_stride);                       \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(DEQUANT_THREADS) dequant_##name##_f16(            \
        const u8* __restrict__ w, long long row_bytes, int nrows, int nblocks,                     \
        u16* __restrict__ y, long long y_stride) {                                                 \
        dequant_kernel<B, true>(w, row_bytes, nrows, nblocks, y, y_stride);                        \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(DEQUANT_THREADS) get_rows_##name##_f32(           \
        const u8* __restrict__ w, long long row_bytes, const int* __restrict__ ids, int n_ids,     \
        int nblocks, float* __restrict__ y, long long y_stride) {                                  \
        dequant_kernel<B, false>(w, row_bytes, n_ids, nblocks, y, y_stride, ids);                  \
    }

PROMOE_FOR_EACH_QTYPE(PROMOE_DEQUANT_ENTRIES)
