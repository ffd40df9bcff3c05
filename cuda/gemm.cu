// gemm.cu — matrix products with f32 weights, every output one canonical dot product.
//   gemm_f32_v1          y[n, m] = dot(x[n, :], w[m, :])            x: [N, K], w: [M, K]
//   gemm_grouped_f32_v1  y[y_rows[r], m] = dot(x[x_rows[r], :], w[experts[r], m, :])
//                        w: [E, M, K]; one routed row r per (token, expert slot)
//
// The canonical order (CANON-F32, src/reference/gemm.rs): K in blocks of 32 (the last may be
// shorter); block b feeds partial b % 4; each partial is one fmaf chain over its blocks in
// increasing b and k, starting from +0; result = (p0 + p1) + (p2 + p3). It depends on K only,
// so a GEMV, a GEMM over any N and the grouped GEMM return the same bits for the same row.
//
// Versions:
//   v1  one thread per output element, the four chains run in order by that thread; 2-D grid
//       (x: output features, y: rows of this chunk). The baseline and the second witness.

#include "common.cuh"

#define DOT_BLOCK 32u

__device__ __forceinline__ float dot_chain(const float* __restrict__ x,
                                           const float* __restrict__ w, u32 k0, u32 k1,
                                           float acc) {
    for (u32 k = k0; k < k1; ++k) acc = fmaf(w[k], x[k], acc);
    return acc;
}

__device__ __forceinline__ float dot_f32_canonical(const float* __restrict__ x,
                                                   const float* __restrict__ w, u32 K) {
    float p0 = 0.0f, p1 = 0.0f, p2 = 0.0f, p3 = 0.0f;
    for (u32 base = 0; base < K; base += 4u * DOT_BLOCK) {
        const u32 b1 = min(base + DOT_BLOCK, K);
        const u32 b2 = min(base + 2u * DOT_BLOCK, K);
        const u32 b3 = min(base + 3u * DOT_BLOCK, K);
        const u32 b4 = min(base + 4u * DOT_BLOCK, K);
        p0 = dot_chain(x, w, base, b1, p0);
        p1 = dot_chain(x, w, b1, b2, p1);
        p2 = dot_chain(x, w, b2, b3, p2);
        p3 = dot_chain(x, w, b3, b4, p3);
    }
#ifdef BITEXACT_MUTANT
    // Broken on purpose (see BITEXACT_MUTANT): a left-to-right combination instead of the tree.
    return ((p0 + p1) + p2) + p3;
#else
    return (p0 + p1) + (p2 + p3);
#endif
}

extern "C" __global__ void gemm_f32_v1(float* __restrict__ y, const float* __restrict__ x,
                                       const float* __restrict__ w, u32 M, u32 K, u32 row0) {
    const u32 m = blockIdx.x * blockDim.x + threadIdx.x;
    if (m >= M) return;
    const u64 n = (u64)row0 + blockIdx.y;
    y[n * M + m] = dot_f32_canonical(x + n * K, w + (u64)m * K, K);
}

extern "C" __global__ void gemm_grouped_f32_v1(float* __restrict__ y, const float* __restrict__ x,
                                               const float* __restrict__ w,
                                               const u32* __restrict__ x_rows,
                                               const u32* __restrict__ experts,
                                               const u32* __restrict__ y_rows, u32 M, u32 K,
                                               u32 row0) {
    const u32 m = blockIdx.x * blockDim.x + threadIdx.x;
    if (m >= M) return;
    const u64 r = (u64)row0 + blockIdx.y;
    const float* xr = x + (u64)x_rows[r] * K;
    const float* wr = w + ((u64)experts[r] * M + m) * K;
    y[(u64)y_rows[r] * M + m] = dot_f32_canonical(xr, wr, K);
}
