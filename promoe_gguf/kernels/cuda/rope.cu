// rope.cu: rotary position embedding of up to two tensors (q and k), positions read on the device,
// angles from tables built once per model (no per-step host work).
//
// x_i, y_i: [T][H_i][D] fp32 with strides (floats) per token and head; y_i = RoPE(x_i): the first
// n_dims of each head rotate, NORM pairs (2j, 2j+1) or NEOX pairs (j, j + n_dims/2); the dims past
// n_dims are copied. Pair j of token t uses c = cos_t[pos[t] * half + j], s = sin_t[...]
// (half = n_dims / 2; YaRN's magnitude is folded into the tables): a' = a*c - b*s, b' = a*s + b*c,
// each product rounded, no FMA (as the torch reference rounds them).
// One thread per (token, head, pair of dims) over both tensors. Grid ceil(T * (H0 + H1) * D/2 / 128), block 128.
//
// Entry point (type-independent): rope_f32.
#include "vecdot.cuh"

struct rope_io {
    const float* x;
    int heads, x_tstride, x_hstride;
    float* y;
    int y_tstride, y_hstride;
};

extern "C" __global__ void __launch_bounds__(PROMOE_THREADS) rope_f32(
        const float* __restrict__ x0, int h0, int xt0, int xh0, float* __restrict__ y0, int yt0, int yh0,
        const float* __restrict__ x1, int h1, int xt1, int xh1, float* __restrict__ y1, int yt1, int yh1,
        int n_tokens, int head_dim, int n_dims, int neox, const int* __restrict__ pos,
        const float* __restrict__ cos_t, const float* __restrict__ sin_t) {
    const int pairs = head_dim / 2, half = n_dims / 2;
    const long long i = (long long)blockIdx.x * PROMOE_THREADS + threadIdx.x;
    const long long per_token = (long long)(h0 + h1) * pairs;
    if (i >= per_token * n_tokens) return;
    const int t = (int)(i / per_token), rest = (int)(i % per_token);
    const int j = rest % pairs;
    int head = rest / pairs;
    const rope_io io = head < h0 ? rope_io{x0, h0, xt0, xh0, y0, yt0, yh0} : rope_io{x1, h1, xt1, xh1, y1, yt1, yh1};
    if (head >= h0) head -= h0;
    const float* x = io.x + (long long)t * io.x_tstride + (long long)head * io.x_hstride;
    float* y = io.y + (long long)t * io.y_tstride + (long long)head * io.y_hstride;
    if (j >= half) {                                   // past the rotated dims: copy two of them
        const int d = n_dims + 2 * (j - half);
        y[d] = x[d];
        y[d + 1] = x[d + 1];
        return;
    }
    const int ia = neox ? j : 2 * j, ib = neox ? j + half : 2 * j + 1;
    const long long row = (long long)__ldg(pos + t) * half + j;
    const float c = __ldg(cos_t + row), s = __ldg(sin_t + row);
    const float a = x[ia], b = x[ib];
    y[ia] = __fadd_rn(__fmul_rn(a, c), -__fmul_rn(b, s));
    y[ib] = __fadd_rn(__fmul_rn(a, s), __fmul_rn(b, c));
}
