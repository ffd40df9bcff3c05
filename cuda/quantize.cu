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
//                   The block rule is common.cuh's bx_quantize_block32, which the kernels
//                   that also write a quantized copy of their output (add_rmsnorm_q8_f32_row)
//                   call too.

#include "common.cuh"

// The family's mutant site (see BITEXACT_MUTANT) is in bx_quantize_block32: codes by truncation
// instead of rint.
#ifdef BITEXACT_MUTANT
#define QUANTIZE_MUTANT true
#else
#define QUANTIZE_MUTANT false
#endif

extern "C" __global__ void quantize_q8_32(const float* __restrict__ x,
                                          signed char* __restrict__ codes,
                                          float* __restrict__ d, float* __restrict__ a,
                                          u64 n_blocks) {
    bx_grid_begin();
    const u32 lane = threadIdx.x & 31u;
    const u64 first = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const u64 stride = ((u64)gridDim.x * blockDim.x) >> 5;
    for (u64 b = first; b < n_blocks; b += stride)
        bx_quantize_block32<QUANTIZE_MUTANT>(x[b * 32u + lane], lane, codes + b * 32u, d + b, a + b);
}
