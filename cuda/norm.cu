// norm.cu — RMSNorm over rows: y[r, i] = (x[r, i] * rs) * w[i], rs = 1 / sqrtf(ms + eps),
// ms = ss / width, ss = sum of x[r, i]^2 in one fixed order: 32 lane partials over
// i = l, l + 32, .. (an fmaf chain from +0 each), then the butterfly of common.cuh.
// Used for the layer norms ([tokens, dim]) and the per-head QK norms ([tokens * heads, hd]).
// Reference: src/reference/norm.rs.
//
// Versions:
//   rmsnorm_f32      v1: one warp per row, eight loads in flight per lane (narrow rows: the
//                    per-head QK norms).
//   rmsnorm_f32_row  v2: one block per row (wide rows): all 256 threads load the row into
//                    shared memory in segments of 2048, the first warp runs the same 32 lane
//                    chains from there. A warp alone on a 2048-wide row waited out 8 load
//                    round trips and took 27 us (ncu, decode); the block takes one.

#include "common.cuh"

#define NORM_WARPS 8u

extern "C" __global__ void rmsnorm_f32(float* __restrict__ y, const float* __restrict__ x,
                                       const float* __restrict__ w, u32 rows, u32 width,
                                       float eps) {
    const u32 lane = threadIdx.x & 31u;
    const u64 row = (u64)blockIdx.x * NORM_WARPS + (threadIdx.x >> 5);
    if (row >= rows) return;
    const float* xr = x + row * width;
    // Eight loads in flight per lane before their fmas (the chain order is unchanged): with
    // one row per launch (decode) the loop was load-latency bound (ncu: 24 us for 2048 floats).
    float p = 0.0f;
    for (u32 base = lane; base < width; base += 256u) {
        float v[8];
#pragma unroll
        for (u32 u = 0; u < 8u; ++u) v[u] = base + 32u * u < width ? xr[base + 32u * u] : 0.0f;
#pragma unroll
        for (u32 u = 0; u < 8u; ++u)
            if (base + 32u * u < width) p = fmaf(v[u], v[u], p);
    }
    const float ss = bx_butterfly_sum(p);
#ifdef BITEXACT_MUTANT
    // Broken on purpose (see BITEXACT_MUTANT): multiply by 1 / width instead of dividing.
    const float ms = ss * (1.0f / (float)width);
#else
    const float ms = ss / (float)width;
#endif
    const float rs = 1.0f / sqrtf(ms + eps);
    float* yr = y + row * width;
#pragma unroll 8
    for (u32 i = lane; i < width; i += 32u) yr[i] = (xr[i] * rs) * w[i];
}

#define NORM_ROW_THREADS 256u
#define NORM_ROW_SEG 2048u

extern "C" __global__ void __launch_bounds__(256)
    rmsnorm_f32_row(float* __restrict__ y, const float* __restrict__ x,
                    const float* __restrict__ w, u32 rows, u32 width, float eps) {
    __shared__ float sx[NORM_ROW_SEG];
    __shared__ float s_rs;
    const u32 tid = threadIdx.x;
    const u64 row = blockIdx.x;
    if (row >= rows) return;  // the whole block
    const float* xr = x + row * width;
    // Lane l's chain takes i = l, l + 32, .. in increasing order across the segments (each
    // segment starts at a multiple of 32, so i mod 32 is the same within one).
    float p = 0.0f;
    for (u32 k0 = 0; k0 < width; k0 += NORM_ROW_SEG) {
        const u32 len = min(NORM_ROW_SEG, width - k0);
        __syncthreads();  // the chains are done with the previous segment
#pragma unroll 8
        for (u32 i = tid; i < len; i += NORM_ROW_THREADS) sx[i] = xr[k0 + i];
        __syncthreads();
        if (tid < 32u)
            for (u32 i = tid; i < len; i += 32u) p = fmaf(sx[i], sx[i], p);
    }
    if (tid < 32u) {
        const float ss = bx_butterfly_sum(p);
#ifdef BITEXACT_MUTANT
        const float ms = ss * (1.0f / (float)width);
#else
        const float ms = ss / (float)width;
#endif
        if (tid == 0) s_rs = 1.0f / sqrtf(ms + eps);
    }
    __syncthreads();
    const float rs = s_rs;
    float* yr = y + row * width;
#pragma unroll 8
    for (u32 i = tid; i < width; i += NORM_ROW_THREADS) yr[i] = (xr[i] * rs) * w[i];
}
