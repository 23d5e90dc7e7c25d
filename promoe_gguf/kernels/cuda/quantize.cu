// quantize.cu: fp32 activations -> 8-bit, once per product (the input of the q8 matvec and MoE
// kernels), as llama.cpp's quantize_q8_1 before its mmvq kernels.
//
// Per block of 32 values: d = max|x| / 127, q = roundf(x * (1 / d)) (0 when d == 0), exactly as
// ggml's reference Q8_0 quantization (and gguf-py's) rounds, stored as int8
// xq[t * n + k] and fp32 xd[t * (n / 32) + k / 32]. One thread per block; n a multiple of 32.
// Grid: (ceil(n / 32 / 128), n_tokens), block 128.
//
// Entry point (type-independent): quantize_q8_f32.
#include "vecdot.cuh"

extern "C" __global__ void __launch_bounds__(PROMOE_THREADS) quantize_q8_f32(
        const float* __restrict__ x, int x_stride, int n, signed char* __restrict__ xq,
        float* __restrict__ xd) {
    const int nb = n / PROMOE_Q8_BLOCK;
    const int b = blockIdx.x * PROMOE_THREADS + threadIdx.x, t = blockIdx.y;
    if (b >= nb) return;
    const float* xb = x + (long long)t * x_stride + b * PROMOE_Q8_BLOCK;
    float v[PROMOE_Q8_BLOCK];
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < PROMOE_Q8_BLOCK; i += 4) {
        const float4 f = ld_x4(xb + i);
        v[i] = f.x; v[i + 1] = f.y; v[i + 2] = f.z; v[i + 3] = f.w;
    }
#pragma unroll
    for (int i = 0; i < PROMOE_Q8_BLOCK; ++i) amax = fmaxf(amax, fabsf(v[i]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    int* out = reinterpret_cast<int*>(xq + (long long)t * n + b * PROMOE_Q8_BLOCK);
#pragma unroll
    for (int i = 0; i < PROMOE_Q8_BLOCK; i += 4) {
        int w = 0;
#pragma unroll
        for (int j = 0; j < 4; ++j) w |= ((int)roundf(v[i + j] * id) & 0xFF) << (8 * j);
        out[i / 4] = w;
    }
    xd[(long long)t * nb + b] = d;
}
