// attention.cu: the KV cache on the device and decode attention over it, positions read on the
// device (a decode step captured once replays at every position).
//
// Cache layout: K [Hkv][n_alloc][Dk], V [Hkv][n_alloc][Dv], fp16 (as llama.cpp's default cache) or
// fp32; entry points end in _f16 / _f32.
//
// kv_store_<c>: k [T][Hkv][Dk] and v [T][Hkv][Dv] (fp32, token/head strides in floats) into the
//   cache at positions pos[t]. One thread per element. Grid ceil(T * Hkv * (Dk + Dv) / 256), block 256.
// attn_split_<c>: query t (head h, kv head h / (H / Hkv): grouped heads share K and V, nothing is
//   copied) against keys 0..pos[t], in splits of ATTN_SPLIT positions; CTA (split, h, t) writes its
//   split's max score m, sum of exp(score - m) l and the unnormalised sum of exp(score - m) * V
//   (l = 0 for a split past pos[t]). Scores: a warp per position, lanes over Dk, then the butterfly;
//   the sums run in position order: bitwise reproducible. Grid (n_split, H, T), block 128.
// attn_merge: the splits of (t, h) merged in split order: out[t][h * Dv + d]. Grid (H, T), block 128.
#include "vecdot.cuh"

#define ATTN_SPLIT 256       // positions per split; mirrored by plans.py
#define ATTN_MAX_DK 576      // DeepSeek2's absorbed MLA: kv_lora 512 + rope 64
#define ATTN_NEG_INF (-__uint_as_float(0x7F800000u))

template <class C> PROMOE_DEV float cache_load(const C* p);
template <> PROMOE_DEV float cache_load<float>(const float* p) { return *p; }
template <> PROMOE_DEV float cache_load<u16>(const u16* p) { return f16_to_f32(*p); }
template <class C> PROMOE_DEV C cache_value(float v);
template <> PROMOE_DEV float cache_value<float>(float v) { return v; }
template <> PROMOE_DEV u16 cache_value<u16>(float v) { return f32_to_f16(v); }

template <class C>
PROMOE_DEV void kv_store_kernel(const float* __restrict__ k, int k_tstride, int k_hstride, const float* __restrict__ v,
                                int v_tstride, int v_hstride, int n_tokens, int hkv, int dk, int dv,
                                const int* __restrict__ pos, C* __restrict__ kc, C* __restrict__ vc, int n_alloc) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long per_token = (long long)hkv * (dk + dv);
    if (i >= per_token * n_tokens) return;
    const int t = (int)(i / per_token), r = (int)(i % per_token);
    const long long p = __ldg(pos + t);
    if (r < hkv * dk) {
        const int h = r / dk, d = r % dk;
        kc[((long long)h * n_alloc + p) * dk + d] = cache_value<C>(k[(long long)t * k_tstride + (long long)h * k_hstride + d]);
    } else {
        const int h = (r - hkv * dk) / dv, d = (r - hkv * dk) % dv;
        vc[((long long)h * n_alloc + p) * dv + d] = cache_value<C>(v[(long long)t * v_tstride + (long long)h * v_hstride + d]);
    }
}

template <class C>
PROMOE_DEV void attn_split_kernel(const float* __restrict__ q, int q_tstride, int q_hstride, const C* __restrict__ kc,
                                  const C* __restrict__ vc, int n_head, int hkv, int dk, int dv, int n_alloc,
                                  const int* __restrict__ pos, float scale, float* __restrict__ part_o,
                                  float* __restrict__ part_ml) {
    __shared__ float qs[ATTN_MAX_DK];
    __shared__ float sc[ATTN_SPLIT];
    const int split = blockIdx.x, h = blockIdx.y, t = blockIdx.z, n_split = gridDim.x;
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int start = split * ATTN_SPLIT;
    const int end = imin(start + ATTN_SPLIT, __ldg(pos + t) + 1);
    const long long slot = ((long long)t * n_head + h) * n_split + split;
    if (start >= end) {                                     // uniform: the whole CTA leaves
        if (tid == 0) { part_ml[2 * slot] = ATTN_NEG_INF; part_ml[2 * slot + 1] = 0.0f; }
        return;
    }
    const int kvh = h / (n_head / hkv);
    const C* K = kc + (long long)kvh * n_alloc * dk;
    const C* V = vc + (long long)kvh * n_alloc * dv;
    for (int d = tid; d < dk; d += PROMOE_THREADS) qs[d] = q[(long long)t * q_tstride + (long long)h * q_hstride + d];
    __syncthreads();
    const int n = end - start;
    for (int jb = 0; jb < n; jb += PROMOE_NWARPS) {       // every warp takes the same number of turns
        const int j = start + jb + warp;
        float dot = 0.0f;
        if (j < end) {
            const C* kr = K + (long long)j * dk;
            for (int d = lane; d < dk; d += 32) dot = fmaf(qs[d], cache_load<C>(kr + d), dot);
        }
        dot = warp_sum(dot);
        if (lane == 0 && j < end) sc[j - start] = dot * scale;
    }
    __syncthreads();
    float mx = ATTN_NEG_INF;
    for (int j = tid; j < n; j += PROMOE_THREADS) mx = fmaxf(mx, sc[j]);
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, o));
    __shared__ float wmax[PROMOE_NWARPS];
    if (lane == 0) wmax[warp] = mx;
    __syncthreads();
    mx = wmax[0];
    for (int w = 1; w < PROMOE_NWARPS; ++w) mx = fmaxf(mx, wmax[w]);
    __syncthreads();
    for (int j = tid; j < n; j += PROMOE_THREADS) sc[j] = expf(sc[j] - mx);
    __syncthreads();
    float l[1] = {0.0f};
    for (int j = tid; j < n; j += PROMOE_THREADS) l[0] += sc[j];
    const float lsum = block_sum(l)[0];
    for (int d = tid; d < dv; d += PROMOE_THREADS) {
        float acc = 0.0f;
        for (int j = 0; j < n; ++j) acc = fmaf(sc[j], cache_load<C>(V + (long long)(start + j) * dv + d), acc);
        part_o[slot * dv + d] = acc;
    }
    if (tid == 0) { part_ml[2 * slot] = mx; part_ml[2 * slot + 1] = lsum; }
}

extern "C" __global__ void __launch_bounds__(PROMOE_THREADS) attn_merge(
        const float* __restrict__ part_o, const float* __restrict__ part_ml, int n_split, int n_head, int dv,
        float* __restrict__ out, int out_tstride) {
    const int h = blockIdx.x, t = blockIdx.y;
    const long long base = ((long long)t * n_head + h) * n_split;
    float mx = ATTN_NEG_INF;
    for (int s = 0; s < n_split; ++s)
        if (part_ml[2 * (base + s) + 1] > 0.0f) mx = fmaxf(mx, part_ml[2 * (base + s)]);
    float lsum = 0.0f;
    for (int s = 0; s < n_split; ++s) {
        const float ls = part_ml[2 * (base + s) + 1];
        if (ls > 0.0f) lsum = fmaf(ls, expf(part_ml[2 * (base + s)] - mx), lsum);
    }
    for (int d = threadIdx.x; d < dv; d += PROMOE_THREADS) {
        float acc = 0.0f;
        for (int s = 0; s < n_split; ++s) {
            const float ls = part_ml[2 * (base + s) + 1];
            if (ls > 0.0f) acc = fmaf(part_o[(base + s) * dv + d], expf(part_ml[2 * (base + s)] - mx), acc);
        }
        out[(long long)t * out_tstride + (long long)h * dv + d] = acc / lsum;
    }
}

#define PROMOE_ATTN_ENTRIES(name, C)                                                               \
    extern "C" __global__ void __launch_bounds__(256) kv_store_##name(                              \
        const float* __restrict__ k, int k_tstride, int k_hstride, const float* __restrict__ v,    \
        int v_tstride, int v_hstride, int n_tokens, int hkv, int dk, int dv,                       \
        const int* __restrict__ pos, C* __restrict__ kc, C* __restrict__ vc, int n_alloc) {        \
        kv_store_kernel<C>(k, k_tstride, k_hstride, v, v_tstride, v_hstride, n_tokens, hkv, dk, dv, pos, kc, \
                           vc, n_alloc);                                                           \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(PROMOE_THREADS) attn_split_##name(                \
        const float* __restrict__ q, int q_tstride, int q_hstride, const C* __restrict__ kc,       \
        const C* __restrict__ vc, int n_head, int hkv, int dk, int dv, int n_alloc,                \
        const int* __restrict__ pos, float scale, float* __restrict__ part_o,                     \
        float* __restrict__ part_ml) {                                                             \
        attn_split_kernel<C>(q, q_tstride, q_hstride, kc, vc, n_head, hkv, dk, dv, n_alloc, pos, scale, part_o, \
                             part_ml);                                                             \
    }

PROMOE_ATTN_ENTRIES(f16, u16)
PROMOE_ATTN_ENTRIES(f32, float)
