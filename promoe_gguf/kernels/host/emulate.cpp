// emulate.cpp: the kernels of promoe_gguf/kernels/cuda/*.cu built for the CPU (with cuda_emu.h), behind one
// generic C entry point, emu_launch(name, grid, block, args, sizes, n): the arguments come as an
// array of pointers to their values, as cuLaunchKernel takes them, and each one's size is checked
// against the kernel's parameter type. Every entry point is registered by its extern "C" name, the
// name the launcher asks CuPy for.
//
// Build: g++ -std=c++20 -O2 -ffp-contract=off -fPIC -shared -pthread -o libkemu.so emulate.cpp
#include "cuda_emu.h"

#include "../cuda/matvec.cu"
#include "../cuda/moe_fused.cu"
#include "../cuda/moe_combine.cu"
#include "../cuda/dequant.cu"
#include "../cuda/norm.cu"
#include "../cuda/quantize.cu"
#include "../cuda/rope.cu"
#include "../cuda/attention.cu"

#include <cstring>
#include <utility>

namespace {

typedef int (*invoker)(void* fn, emu_dim3 grid, unsigned threads, void* const* args, const int* sizes, int n);

struct entry { const char* name; void* fn; invoker call; };

template <class... A, size_t... I>
void call_with(void (*fn)(A...), void* const* args, std::index_sequence<I...>) {
    fn(*static_cast<A*>(args[I])...);
}

template <class... A>
int invoke(void* f, emu_dim3 grid, unsigned threads, void* const* args, const int* sizes, int n) {
    if (n != (int)sizeof...(A)) return -2;
    const int want[] = {(int)sizeof(A)..., 0};
    for (int i = 0; i < n; ++i)
        if (sizes[i] != want[i]) return -3 - i;
    auto fn = reinterpret_cast<void (*)(A...)>(f);
    emu::launch(grid, threads, [&] { call_with(fn, args, std::index_sequence_for<A...>{}); });
    return 0;
}

template <class... A>
entry reg(const char* name, void (*fn)(A...)) { return entry{name, reinterpret_cast<void*>(fn), &invoke<A...>}; }

#define EMU_MV(name, N) reg("matvec_" #name "_ncols" #N, &matvec_##name##_ncols##N), \
                        reg("matvec_q8_" #name "_ncols" #N, &matvec_q8_##name##_ncols##N),
#define EMU_ENTRIES(name, B)                                                                       \
    EMU_MV(name, 1) EMU_MV(name, 2) EMU_MV(name, 3) EMU_MV(name, 4)                                \
    EMU_MV(name, 5) EMU_MV(name, 6) EMU_MV(name, 7) EMU_MV(name, 8)                                \
    reg("moe_gate_up_" #name, &moe_gate_up_##name), reg("moe_gate_up_" #name "_q8", &moe_gate_up_##name##_q8), \
    reg("moe_matvec_" #name, &moe_matvec_##name), reg("moe_matvec_" #name "_q8", &moe_matvec_##name##_q8), \
    reg("moe_down_combine_" #name, &moe_down_combine_##name),                                     \
    reg("moe_down_combine_" #name "_q8", &moe_down_combine_##name##_q8),                          \
    reg("dequant_" #name "_f32", &dequant_##name##_f32), reg("dequant_" #name "_f16", &dequant_##name##_f16), \
    reg("get_rows_" #name "_f32", &get_rows_##name##_f32),

const entry kEntries[] = {PROMOE_FOR_EACH_QTYPE(EMU_ENTRIES)
                          reg("moe_combine", &moe_combine),
                          reg("rms_norm_f32", &rms_norm_f32),
                          reg("add_rms_norm_f32", &add_rms_norm_f32),
                          reg("quantize_q8_f32", &quantize_q8_f32),
                          reg("rope_f32", &rope_f32),
                          reg("kv_store_f16", &kv_store_f16),
                          reg("kv_store_f32", &kv_store_f32),
                          reg("attn_split_f16", &attn_split_f16),
                          reg("attn_split_f32", &attn_split_f32),
                          reg("attn_merge", &attn_merge)};

const entry* lookup(const char* name) {
    for (const auto& e : kEntries)
        if (std::strcmp(e.name, name) == 0) return &e;
    return nullptr;
}

#define EMU_TRAITS(name, B) \
    if (std::strcmp(qname, #name) == 0) { \
        out[0] = B::qk; out[1] = B::type_size; out[2] = B::nchunk; out[3] = B::nrun; out[4] = B::rps; return 0; }

}  // namespace

extern "C" {

// Buffers that loads may touch during the next launch; [p, p + n)
int emu_set_readable(const void* const* ptrs, const long long* sizes, int n) {
    emu::readable.clear();
    for (int i = 0; i < n; ++i) {
        const char* p = static_cast<const char*>(ptrs[i]);
        emu::readable.emplace_back(p, p + sizes[i]);
    }
    return 0;
}

// Number of errors since the last call; copies the first message into err.
long long emu_take_errors(char* err, int errlen) {
    const long long n = emu::n_errors;
    std::snprintf(err, (size_t)errlen, "%s", emu::first_error.c_str());
    emu::n_errors = 0;
    emu::first_error.clear();
    return n;
}

int emu_has_kernel(const char* name) { return lookup(name) != nullptr; }

// 0 on success; -1 unknown kernel, -2 wrong argument count, -3 - i: argument i has the wrong size
int emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned threads, void* const* args,
               const int* sizes, int n) {
    const entry* e = lookup(name);
    if (e == nullptr) return -1;
    return e->call(e->fn, emu_dim3{gx, gy, gz}, threads, args, sizes, n);
}

int emu_traits(const char* qname, int* out) {
    PROMOE_FOR_EACH_QTYPE(EMU_TRAITS)
    return -1;
}

int emu_matvec_rows_per_group(int ncols) { return matvec_rows_per_group(ncols); }
int emu_moe_gate_up_rows() { return MOE_GATE_UP_ROWS; }
int emu_moe_matvec_rows() { return MOE_MATVEC_ROWS; }
int emu_threads() { return PROMOE_THREADS; }
int emu_dequant_threads() { return DEQUANT_THREADS; }
int emu_q8_block() { return PROMOE_Q8_BLOCK; }
int emu_attn_split() { return ATTN_SPLIT; }
int emu_attn_max_dk() { return ATTN_MAX_DK; }

}  // extern "C"
