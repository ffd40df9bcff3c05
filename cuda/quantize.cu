// quantize.cu — activation quantization for the quantized matrix products.
//   quantize_q8_32  x: [rows, K] f32 -> codes: [rows, K] i8, d: [rows, K/32], a: [rows, K/32]
// Per block of 32 (each token's row on its own, so the result cannot depend on the batch):
//   any NaN/inf in the block -> d = a = NaN, codes 0;
//   amax = max |x_i| (exact); d = amax / 127; q_i = clamp(rint(x_i / d), -127, 127), 0 if NaN;
//   s = sum q_i (exact); a = d * s.
// Reference: src/quant/act.rs.
//
// Versions:
//   quantize_q8_32  v1: one warp per block (lane i holds x_i), warp max and sum by shuffles
//                   (both exact, so the tree shape does not matter); grid-stride over blocks.

#include "common.cuh"

extern "C" __global__ void quantize_q8_32(const float* __restrict__ x,
                                          signed char* __restrict__ codes,
                                          float* __restrict__ d, float* __restrict__ a,
                                          u64 n_blocks) {
    bx_grid_begin();
    const u32 lane = threadIdx.x & 31u;
    const u64 first = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const u64 stride = ((u64)gridDim.x * blockDim.x) >> 5;
    for (u64 b = first; b < n_blocks; b += stride) {
        const float v = x[b * 32u + lane];
        const bool bad = ((__float_as_uint(v) >> 23) & 0xffu) == 0xffu;  // NaN or inf
        const bool any_bad = __any_sync(BX_FULL_MASK, bad);
        float amax = fabsf(v);
        for (u32 off = 16u; off; off >>= 1)
            amax = fmaxf(amax, __shfl_xor_sync(BX_FULL_MASK, amax, off));
        const float dd = amax / 127.0f;
        const float r = rintf(v / dd);
        int q = (r != r) ? 0 : (int)fminf(fmaxf(r, -127.0f), 127.0f);
        if (any_bad) q = 0;
#ifdef BITEXACT_MUTANT
        // Broken on purpose (see BITEXACT_MUTANT): codes by truncation instead of rint.
        if (!any_bad && r == r) q = (int)fminf(fmaxf(truncf(v / dd), -127.0f), 127.0f);
#endif
        int s = q;
        for (u32 off = 16u; off; off >>= 1) s += __shfl_xor_sync(BX_FULL_MASK, s, off);
        codes[b * 32u + lane] = (signed char)q;
        if (lane == 0) {
            const float nan = __uint_as_float(BX_CANON_NAN_BITS);
            d[b] = any_bad ? nan : dd;
            a[b] = any_bad ? nan : dd * (float)s;
        }
    }
}
