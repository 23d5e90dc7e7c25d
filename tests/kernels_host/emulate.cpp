// emulate.cpp: the kernels of promoe_gguf/kernels/cuda/*.cu built for the CPU (with cuda_emu.h), behind a small C
// ABI for tests/test_kernels_emulated.py. Every entry point is called by its extern "C" name,
// the same name launch.py asks CuPy for, with the grid launch.py computes.
//
// Build: g++ -std=c++20 -O1 -ffp-contract=off -fPIC -shared -pthread -o libkemu.so emulate.cpp
#include "cuda_emu.h"

#include "../../promoe_gguf/kernels/cuda/matvec.cu"
#include "../../promoe_gguf/kernels/cuda/moe_fused.cu"
#include "../../promoe_gguf/kernels/cuda/dequant.cu"
#include "../../promoe_gguf/kernels/cuda/norm.cu"

#include <cstring>

namespace {

typedef void (*matvec_fn)(const u8*, long long, int, int, const float*, int, float*, int);
typedef void (*gate_up_fn)(const u64*, int, int, int, long long, const float*, int, float*, int);
typedef void (*moe_matvec_fn)(const u64*, int, int, int, long long, const float*, int, int, const float*, float*, int);
typedef void (*dequant_fn)(const u8*, long long, int, int, void*, long long);

struct entry { const char* name; void* fn; };

#define EMU_MV(name, N) {"matvec_" #name "_ncols" #N, (void*)&matvec_##name##_ncols##N},
#define EMU_ENTRIES(name, B)                                                                       \
    EMU_MV(name, 1) EMU_MV(name, 2) EMU_MV(name, 3) EMU_MV(name, 4)                                \
    EMU_MV(name, 5) EMU_MV(name, 6) EMU_MV(name, 7) EMU_MV(name, 8)                                \
    {"moe_gate_up_" #name, (void*)&moe_gate_up_##name},                                             \
    {"moe_matvec_" #name, (void*)&moe_matvec_##name},                                               \
    {"dequant_" #name "_f32", (void*)&dequant_##name##_f32},                                        \
    {"dequant_" #name "_f16", (void*)&dequant_##name##_f16},

const entry kEntries[] = {PROMOE_FOR_EACH_QTYPE(EMU_ENTRIES){"moe_combine", (void*)&moe_combine},
                          {"rms_norm_f32", (void*)&rms_norm_f32},
                          {"add_rms_norm_f32", (void*)&add_rms_norm_f32}};

void* lookup(const char* name) {
    for (const auto& e : kEntries)
        if (std::strcmp(e.name, name) == 0) return e.fn;
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

int emu_traits(const char* qname, int* out) {
    PROMOE_FOR_EACH_QTYPE(EMU_TRAITS)
    return -1;
}

int emu_matvec_rows_per_cta(int ncols) { return matvec_rows_per_cta(ncols); }
int emu_moe_gate_up_rows() { return MOE_GATE_UP_ROWS; }
int emu_moe_matvec_rows() { return MOE_MATVEC_ROWS; }
int emu_threads() { return PROMOE_THREADS; }
int emu_dequant_threads() { return DEQUANT_THREADS; }

int emu_matvec(const char* name, unsigned gx, unsigned threads, const u8* w, long long row_bytes,
               int nrows, int nblocks, const float* x, int x_stride, float* y, int y_stride) {
    auto fn = reinterpret_cast<matvec_fn>(lookup(name));
    if (!fn) return -1;
    emu::launch({gx, 1, 1}, threads, [&] { fn(w, row_bytes, nrows, nblocks, x, x_stride, y, y_stride); });
    return 0;
}

int emu_moe_gate_up(const char* name, unsigned gx, unsigned gy, unsigned threads, const u64* table,
                    int n_slots, int n_ff, int nblocks, long long row_bytes, const float* x, int x_stride,
                    float* h, int h_stride) {
    auto fn = reinterpret_cast<gate_up_fn>(lookup(name));
    if (!fn) return -1;
    emu::launch({gx, gy, 1}, threads,
                [&] { fn(table, n_slots, n_ff, nblocks, row_bytes, x, x_stride, h, h_stride); });
    return 0;
}

int emu_moe_matvec(const char* name, unsigned gx, unsigned gy, unsigned threads, const u64* table,
                   int which, int nrows, int nblocks, long long row_bytes, const float* x, int x_stride,
                   int x_div, const float* scale, float* y, int y_stride) {
    auto fn = reinterpret_cast<moe_matvec_fn>(lookup(name));
    if (!fn) return -1;
    emu::launch({gx, gy, 1}, threads, [&] {
        fn(table, which, nrows, nblocks, row_bytes, x, x_stride, x_div, scale, y, y_stride);
    });
    return 0;
}

int emu_moe_combine(unsigned gx, unsigned threads, const float* slot_out, int n_tokens, int n_slots,
                    int n, float* out) {
    emu::launch({gx, 1, 1}, threads, [&] { moe_combine(slot_out, n_tokens, n_slots, n, out); });
    return 0;
}

int emu_rms_norm(unsigned gx, unsigned threads, const float* x, int x_stride, const float* w, float* y,
                 int y_stride, int n, float eps) {
    emu::launch({gx, 1, 1}, threads, [&] { rms_norm_f32(x, x_stride, w, y, y_stride, n, eps); });
    return 0;
}

int emu_add_rms_norm(unsigned gx, unsigned threads, const float* x, const float* r, float r_scale, float* sum,
                     const float* w, float* y, int n, float eps) {
    emu::launch({gx, 1, 1}, threads, [&] { add_rms_norm_f32(x, r, r_scale, sum, w, y, n, eps); });
    return 0;
}

int emu_dequant(const char* name, unsigned gx, unsigned threads, const u8* w, long long row_bytes,
                int nrows, int nblocks, void* y, long long y_stride) {
    auto fn = reinterpret_cast<dequant_fn>(lookup(name));
    if (!fn) return -1;
    emu::launch({gx, 1, 1}, threads, [&] { fn(w, row_bytes, nrows, nblocks, y, y_stride); });
    return 0;
}

}  // extern "C"
