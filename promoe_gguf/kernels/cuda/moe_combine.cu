// moe_combine.cu: the weighted sum of a layer's expert outputs, slot by slot, wherever each ran.
//
//   out[t, j] = (((o(t, 0) + o(t, 1)) + o(t, 2)) + ...)[j]
//   o(t, s)   = y[t, s] (when done[t * n_slots + s]: computed on the device, already scaled by its
//               routing weight, moe_matvec's scale; else 0)
//             + w[t, s] * ext[t, s]  (the CPU pool's unweighted rows, zero where the CPU took no part;
//               ext may be null when every pair ran on the device)
// A pair runs on the device, on the CPU, or on both (an expert split by rows: each side computes a
// share of its intermediate rows); adding a zero leaves the other side's value as it was, so a pair
// that ran on one side is exact. Slots are added in slot order, each product rounded once, so a
// result depends on where an expert ran, never on when. Grid ceil(n_tokens * n / 256), block 256.
//
// Entry point (type-independent): moe_combine.
extern "C" __global__ void __launch_bounds__(256) moe_combine(
        const int* __restrict__ done, const float* __restrict__ y, const float* __restrict__ ext,
        const float* __restrict__ w, int n_tokens, int n_slots, int n, float* __restrict__ out) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)n_tokens * n) return;
    const long long t = i / n, j = i % n;
    float s = 0.0f;
    for (int k = 0; k < n_slots; ++k) {
        const long long p = t * n_slots + k;
        float v = done[p] ? y[p * n + j] : 0.0f;
        if (ext != nullptr) v += w[p] * ext[p * n + j];
        s = k == 0 ? v : s + v;
    }
    out[i] = s;
}
