// cuda_emu.h: just enough of CUDA, in plain C++20, to run the kernels in promoe_gguf/kernels/cuda/*.cu on the CPU.
//
// Not a simulator of GPU timing: one CTA at a time, each CUDA thread a fiber (ucontext) of one OS
// thread, scheduled in passes: a pass resumes every live fiber until it reaches a barrier
// (__syncthreads, or one of the two exchange points of __shfl_xor_sync) or returns; all live
// fibers must stop at the same kind of barrier (else: "divergent barrier"). __shared__ is a static
// (one CTA runs at a time). What it checks: the kernels' index math, element order, reductions and
// tails give the right numbers, every global load stays inside the buffers registered for the
// launch and is naturally aligned (a misaligned 32-bit load faults on a GPU), and the built-ins
// used behave like the PTX instructions they stand for.
// Arithmetic is IEEE fp32 like the GPU's (build with -ffp-contract=off; fmaf is a true FMA).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <ucontext.h>
#include <utility>
#include <vector>

#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct float4 { float x, y, z, w; };
struct uint2 { unsigned x, y; };
struct uint4 { unsigned x, y, z, w; };
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

struct emu_dim3 { unsigned x = 0, y = 0, z = 0; };
inline emu_dim3 threadIdx, blockIdx;
inline emu_dim3 blockDim, gridDim;

namespace emu {

inline std::mutex err_mutex;
inline std::string first_error;
inline long long n_errors = 0;

inline void fail(const std::string& msg) {
    std::lock_guard<std::mutex> g(err_mutex);
    if (n_errors++ == 0) first_error = msg;
}

// Buffers a launch may read: [begin, end)
inline std::vector<std::pair<const char*, const char*>> readable;

inline bool check_read(const void* p, size_t n) {
    const char* c = static_cast<const char*>(p);
    if (reinterpret_cast<uintptr_t>(p) % n != 0) {
        char buf[160];
        std::snprintf(buf, sizeof buf, "misaligned %zu-byte load at %p (thread %u, block %u,%u)", n, p,
                      threadIdx.x, blockIdx.x, blockIdx.y);
        fail(buf);
        return false;
    }
    for (auto& r : readable)
        if (c >= r.first && c + n <= r.second) return true;
    char buf[160];
    std::snprintf(buf, sizeof buf, "out-of-bounds %zu-byte load at %p (thread %u, block %u,%u)", n, p,
                  threadIdx.x, blockIdx.x, blockIdx.y);
    fail(buf);
    return false;
}

// --- fibers ---------------------------------------------------------------------------------------
// On x86-64 a fiber switch saves the callee-saved registers and swaps stack pointers (no system
// call: ucontext's swapcontext saves the signal mask with one, which made the emulation ~50x
// slower); elsewhere ucontext.
constexpr size_t kStackBytes = 256 * 1024;
inline std::vector<std::unique_ptr<char[]>> stacks;
inline std::function<void()> body_fn;
inline int current = -1;
inline float shfl_buf[32][32];

enum { BAR_SYNC = 1, BAR_SHFL_WRITE = 2, BAR_SHFL_READ = 3 };

#if defined(__x86_64__)
extern "C" void emu_fiber_switch(void** save_sp, void* load_sp);
extern "C" void emu_fiber_trampoline();
asm(R"(
    .text
    .globl emu_fiber_switch
    .type emu_fiber_switch, @function
emu_fiber_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_fiber_switch, .-emu_fiber_switch
    .globl emu_fiber_trampoline
    .type emu_fiber_trampoline, @function
emu_fiber_trampoline:
    movq %rbx, %rdi
    call emu_fiber_entry
    ud2
    .size emu_fiber_trampoline, .-emu_fiber_trampoline
)");

struct Fiber { void* sp; bool done; int barrier; };
inline void* sched_sp;
inline std::vector<Fiber> fibers;

extern "C" __attribute__((used)) void emu_fiber_entry(long idx) {
    body_fn();
    fibers[idx].done = true;
    void* dead;
    emu_fiber_switch(&dead, sched_sp);   // never resumed
}

inline void fiber_start(int t) {
    // the new stack as emu_fiber_switch leaves a suspended one: six saved registers (rbx = t), then
    // the return address (the trampoline), so that the trampoline's call is made from a 16-byte
    // aligned rsp (the top of the stack)
    char* top = stacks[t].get() + kStackBytes;
    void** sp = reinterpret_cast<void**>(reinterpret_cast<uintptr_t>(top) & ~uintptr_t(15));
    *--sp = reinterpret_cast<void*>(&emu_fiber_trampoline);
    for (int r = 0; r < 6; ++r) *--sp = nullptr;           // rbp rbx r12 r13 r14 r15 (r15 on top)
    sp[4] = reinterpret_cast<void*>(static_cast<intptr_t>(t));   // rbx
    fibers[t].sp = sp;
}
inline void fiber_resume(int t) { emu_fiber_switch(&sched_sp, fibers[t].sp); }
inline void fiber_yield() { emu_fiber_switch(&fibers[current].sp, sched_sp); }
#else
struct Fiber { ucontext_t ctx; bool done; int barrier; };
inline ucontext_t sched_ctx;
inline std::vector<Fiber> fibers;

inline void fiber_main(int idx) {
    body_fn();
    fibers[idx].done = true;       // returns to sched_ctx through uc_link
}

inline void fiber_start(int t) {
    Fiber& f = fibers[t];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stacks[t].get();
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &sched_ctx;
    makecontext(&f.ctx, reinterpret_cast<void (*)()>(fiber_main), 1, t);
}
inline void fiber_resume(int t) { swapcontext(&sched_ctx, &fibers[t].ctx); }
inline void fiber_yield() { swapcontext(&fibers[current].ctx, &sched_ctx); }
#endif

inline void barrier(int kind) {
    fibers[current].barrier = kind;
    fiber_yield();
}

// Run `body` for every thread of every CTA of the grid, one CTA at a time.
template <class F>
void launch(emu_dim3 grid, unsigned threads, F&& body) {
    gridDim = grid;
    blockDim = emu_dim3{threads, 1, 1};
    body_fn = body;
    while (stacks.size() < threads) stacks.emplace_back(new char[kStackBytes]);
    for (unsigned z = 0; z < (grid.z ? grid.z : 1); ++z)
        for (unsigned y = 0; y < (grid.y ? grid.y : 1); ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                blockIdx = emu_dim3{x, y, z};
                fibers.assign(threads, Fiber{});
                for (unsigned t = 0; t < threads; ++t) fiber_start((int)t);
                for (;;) {                                   // one pass per barrier
                    unsigned waiting = 0, finished = 0;
                    int kind = 0;
                    for (unsigned t = 0; t < threads; ++t) {
                        if (fibers[t].done) continue;
                        threadIdx = emu_dim3{t, 0, 0};
                        current = (int)t;
                        fibers[t].barrier = 0;
                        fiber_resume((int)t);
                        if (fibers[t].done) { ++finished; continue; }
                        ++waiting;
                        if (kind == 0) kind = fibers[t].barrier;
                        else if (kind != fibers[t].barrier) { fail("divergent barrier: threads of a CTA stopped at different barriers"); return; }
                    }
                    if (waiting == 0) break;
                    if (finished) { fail("divergent barrier: some threads returned while others wait at a barrier"); return; }
                }
            }
}

}  // namespace emu

template <class T>
inline T __ldg(const T* p) {
    if (!emu::check_read(p, sizeof(T) > 8 ? 16 : sizeof(T))) return T{};
    return *p;
}

inline void __syncthreads() { emu::barrier(emu::BAR_SYNC); }

inline int __popc(unsigned x) { return __builtin_popcount(x); }

inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
    if (mask != 0xFFFFFFFFu) emu::fail("__shfl_xor_sync: only full-warp masks are emulated");
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    emu::shfl_buf[warp][lane] = v;
    emu::barrier(emu::BAR_SHFL_WRITE);              // every lane has written
    const float r = emu::shfl_buf[warp][lane ^ (unsigned)lane_mask];
    emu::barrier(emu::BAR_SHFL_READ);               // every lane has read
    return r;
}

// PTX prmt.b32 (default mode), as __byte_perm: result byte n = byte (s >> 4n) & 7 of {y:x}.
// Selector bit 3 (sign replication in PTX) is never used by the kernels: flag it if it is.
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
    const uint64_t v = ((uint64_t)y << 32) | x;
    unsigned r = 0;
    for (int n = 0; n < 4; ++n) {
        const unsigned sel = (s >> (4 * n)) & 0xFu;
        if (sel & 8u) emu::fail("__byte_perm selector with bit 3 set");
        r |= (unsigned)((v >> (8 * (sel & 7u))) & 0xFFu) << (8 * n);
    }
    return r;
}

inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float expf(float v) { return std::exp(v); }
using std::fmaf;
using std::fmaxf;
using std::roundf;

// PTX dp4a.s32.s32: c + the sum of the four products of the signed bytes of a and b
inline int dp4a_s8(int a, int b, int c) {
    for (int i = 0; i < 4; ++i) c += (int)(signed char)(a >> (8 * i)) * (int)(signed char)(b >> (8 * i));
    return c;
}

inline float f16_to_f32(unsigned short h) { _Float16 v; std::memcpy(&v, &h, 2); return (float)v; }
inline unsigned short f32_to_f16(float f) { _Float16 v = (_Float16)f; unsigned short h; std::memcpy(&h, &v, 2); return h; }
