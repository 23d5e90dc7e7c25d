// norm.cu: RMS norm of each row, alone or fused with the residual add before it (decode: one
// launch per norm instead of torch's six).
//
// rms_norm_f32:      y[t] = x[t] * (1 / sqrtf(mean(x[t]^2) + eps)) * w
// add_rms_norm_f32:  s[t] = x[t] + r[t] * r_scale;  y[t] = rms_norm(s[t]) * w   (s and y written)
// The scale is applied before the weight, as ggml_rms_norm then ggml_mul. The sum of squares is a
// fixed-order CTA reduction (vecdot.cuh's block_sum), so results are bitwise reproducible.
// Grid: (n_rows), block: PROMOE_THREADS; rows are contiguous with the given strides (floats).
//
// Entry points (type-independent, compiled without PROMOE_QTYPE): rms_norm_f32, add_rms_norm_f32.
#include "vecdot.cuh"

PROMOE_DEV float row_inv_rms(const float* __restrict__ v, int n, float eps) {
    float acc[1] = {0.0f};
    for (int i = threadIdx.x; i < n; i += PROMOE_THREADS) acc[0] = fmaf(v[i], v[i], acc[0]);
    const float* tot = block_sum(acc);
    return 1.0f / sqrtf(tot[0] / (float)n + eps);
}

extern "C" __global__ void __launch_bounds__(PROMOE_THREADS) rms_norm_f32(
        const float* __restrict__ x, int x_stride, const float* __restrict__ w, float* __restrict__ y,
        int y_stride, int n, float eps) {
    const float* xr = x + (long long)blockIdx.x * x_stride;
    float* yr = y + (long long)blockIdx.x * y_stride;
    const float s = row_inv_rms(xr, n, eps);
    for (int i = threadIdx.x; i < n; i += PROMOE_THREADS) yr[i] = (xr[i] * s) * w[i];
}

extern "C" __global__ void __launch_bounds__(PROMOE_THREADS) add_rms_norm_f32(
        const float* __restrict__ x, const float* __restrict__ r, float r_scale, float* __restrict__ sum,
        const float* __restrict__ w, float* __restrict__ y, int n, float eps) {
    const long long off = (long long)blockIdx.x * n;
    const float* xr = x + off;
    const float* rr = r + off;
    float* sr = sum + off;
    for (int i = threadIdx.x; i < n; i += PROMOE_THREADS) sr[i] = r_scale == 1.0f ? xr[i] + rr[i] : xr[i] + rr[i] * r_scale;
    __syncthreads();
    const float s = row_inv_rms(sr, n, eps);
    float* yr = y + off;
    for (int i = threadIdx.x; i < n; i += PROMOE_THREADS) yr[i] = (sr[i] * s) * w[i];
}
