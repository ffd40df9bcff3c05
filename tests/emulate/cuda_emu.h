// cuda_emu.h — a CPU stand-in for the CUDA features bitexact's kernels use, so that a kernel
// family's source (cuda/common.cuh + cuda/FAMILY.cu, the dynamic shared-memory declarations
// rewritten by tests/parity/emulate.rs) compiles with g++ and runs on a machine without a GPU.
//   - A launch runs the grid's blocks one after another; a block's threads are OS threads,
//     __syncthreads their barrier, warp shuffles an exchange through a barrier of the warp's
//     32 threads (every lane must take part, as the kernels' full masks say).
//   - f32 arithmetic is the CPU's IEEE single precision (x86-64 SSE: no excess precision, no
//     flush to zero), fmaf the C library's correctly rounded fma, sqrtf correctly rounded: the
//     operations the kernels are allowed (add, mul, fmaf, div, sqrt) give the GPU's bits. The
//     program is compiled with -ffp-contract=off, as NVRTC with --fmad=false.
//   - Kernels become inline functions: those a driver does not call are never emitted (their
//     PTX inline assembly is parsed, not assembled). Static __shared__ arrays become statics
//     (one block runs at a time); griddepcontrol sits behind __CUDA_ARCH__, undefined here.
//     The PTX a called kernel needs is rewritten by the test: f16 conversions as calls below,
//     cp.async copies as plain copies (complete at once: a subset of what the GPU may do,
//     never seen before the kernel's own wait and barrier would allow).
// What it cannot see: races between blocks (they never overlap), the memory model, timing.
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define __device__
#define __global__ inline
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(x) __attribute__((aligned(x)))
#define __shared__ static

struct EmuDim {
    unsigned x = 1, y = 1, z = 1;
};
inline thread_local EmuDim threadIdx, blockIdx;
inline EmuDim blockDim, gridDim;

struct uint4 {
    unsigned x, y, z, w;
};
struct float2 {
    float x, y;
};
struct float4 {
    float x, y, z, w;
};
inline float2 make_float2(float a, float b) { return {a, b}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }

inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline int __float_as_int(float f) { int u; std::memcpy(&u, &f, 4); return u; }
template <class T> inline T __ldg(const T* p) { return *p; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned __cvta_generic_to_shared(const void*) { return 0; }

struct EmuWarp {
    std::barrier<> bar;
    float v[32];
    int p[32];
    explicit EmuWarp(std::ptrdiff_t lanes) : bar(lanes) {}
};
struct EmuBlock {
    std::unique_ptr<std::barrier<>> bar;
    std::vector<std::unique_ptr<EmuWarp>> warps;
};
inline EmuBlock* emu_block;
// The launch's dynamic shared memory (poisoned before every block).
inline std::vector<float> emu_dynamic;
inline float* emu_dynamic_smem() { return emu_dynamic.data(); }

inline void __syncthreads() { emu_block->bar->arrive_and_wait(); }
// Blocks never overlap: a fence has nothing to order, an atomic nothing to race with.
inline void __threadfence() {}
inline unsigned atomicAdd(unsigned* p, unsigned v) {
    static std::mutex mu;
    std::lock_guard<std::mutex> g(mu);
    const unsigned old = *p;
    *p = old + v;
    return old;
}
// f16 conversions (the PTX cvt instructions the Rust side rewrites into these calls): round to
// nearest even, as cvt.rn.f16.f32; exact the other way.
inline unsigned short emu_f32_to_f16(float f) {
    const _Float16 h = static_cast<_Float16>(f);
    unsigned short r;
    std::memcpy(&r, &h, 2);
    return r;
}
inline float emu_f16_to_f32(unsigned short b) {
    _Float16 h;
    std::memcpy(&h, &b, 2);
    return static_cast<float>(h);
}
inline float __shfl_sync(unsigned, float v, unsigned src) {
    EmuWarp& w = *emu_block->warps[threadIdx.x / 32u];
    w.v[threadIdx.x & 31u] = v;
    w.bar.arrive_and_wait();
    const float r = w.v[src & 31u];
    w.bar.arrive_and_wait();
    return r;
}
inline void __syncwarp() { emu_block->warps[threadIdx.x / 32u]->bar.arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned m, float v, unsigned x) {
    return __shfl_sync(m, v, (threadIdx.x & 31u) ^ x);
}
inline bool __any_sync(unsigned, bool pred) {
    EmuWarp& w = *emu_block->warps[threadIdx.x / 32u];
    w.p[threadIdx.x & 31u] = pred;
    w.bar.arrive_and_wait();
    bool r = false;
    for (int i = 0; i < 32; ++i) r = r || w.p[i] != 0;
    w.bar.arrive_and_wait();
    return r;
}

// Runs `kernel` over grid (x, y) with `threads` threads a block (a last partial warp's lanes
// exchange among themselves) and
// `smem_bytes` of dynamic shared memory: one set of threads walks the blocks in order, a barrier
// between blocks. A kernel that returns early must do so for the whole block.
inline void emu_launch(EmuDim grid, unsigned threads, size_t smem_bytes,
                       const std::function<void()>& kernel) {
    gridDim = grid;
    blockDim = {threads, 1, 1};
    EmuBlock blk;
    blk.bar = std::make_unique<std::barrier<>>(threads);
    for (unsigned w = 0; w * 32u < threads; ++w)
        blk.warps.push_back(std::make_unique<EmuWarp>(std::min(32u, threads - 32u * w)));
    emu_block = &blk;
    emu_dynamic.assign(smem_bytes / 4 + 4, __uint_as_float(0x7fa5a5a5u));
    std::barrier<> between(threads);
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t)
        pool.emplace_back([&, t] {
            threadIdx = {t, 0, 0};
            for (unsigned by = 0; by < grid.y; ++by)
                for (unsigned bx = 0; bx < grid.x; ++bx) {
                    blockIdx = {bx, by, 0};
                    kernel();
                    between.arrive_and_wait();
                    if (t == 0)
                        std::fill(emu_dynamic.begin(), emu_dynamic.end(),
                                  __uint_as_float(0x7fa5a5a5u));
                    between.arrive_and_wait();
                }
        });
    for (auto& th : pool) th.join();
}
