// activation.cu — elementwise activations of the MoE block.
//   swiglu_f32   out[j] = silu(gate[j]) * up[j], silu(g) = g / (1 + exp(-g))
//   swiglu_halves_f32  out[r, i] = silu(gu[r, i]) * gu[r, f + i]: the gate and up halves of
//                one stacked product's row (an expert's [gate; up] rows, one launch)
//   swiglu_halves_q8_f32  the same, f % 32 == 0, writing beside out its Q8 quantization
//                (codes [rows, f], d and a [rows, f / 32]: quantize.cu's rule), the input
//                of the down product, which then launches no quantization of its own
//   sigmoid_f32  out[j] = 1 / (1 + exp(-x[j]))     (the shared expert's gate)
//   gate_heads_sigmoid_f32  a[r, h, i] *= sigmoid(qg[r * width + offset + h * head_stride + i])
//                (a gated attention layer's output gate, read from its query product)
// exp is bitexact's own fma polynomial (common.cuh), the same bits as src/math.rs.
//
// Versions:
//   swiglu_f32, swiglu_halves_f32, sigmoid_f32, gate_heads_sigmoid_f32  v1: grid-stride loop
//                over the flat index, one element per step.
//   swiglu_halves_q8_f32  v1: one warp per 32-block of out (lane i its element i), then
//                common.cuh's bx_quantize_block32 on the warp's 32 values.
//
// References: src/reference/activation.rs.

#include "common.cuh"

__device__ __forceinline__ float swiglu_op(float g, float u) {
#ifdef BITEXACT_MUTANT
    // Broken on purpose (see BITEXACT_MUTANT): silu as g * sigmoid(g), one rounding more.
    return (g * bx_sigmoid(g)) * u;
#else
    return bx_silu(g) * u;
#endif
}

extern "C" __global__ void swiglu_f32(float* __restrict__ out, const float* __restrict__ gate,
                                      const float* __restrict__ up, u64 n) {
    bx_grid_begin();
    BX_GRID_STRIDE(j, n) {
        out[j] = swiglu_op(gate[j], up[j]);
    }
}

extern "C" __global__ void swiglu_halves_f32(float* __restrict__ out,
                                             const float* __restrict__ gu, u64 rows, u32 f) {
    bx_grid_begin();
    const u64 n = rows * f;
    BX_GRID_STRIDE(j, n) {
        const u64 r = j / f, i = j - r * f;
        const float* row = gu + r * 2u * f;
        out[j] = swiglu_op(row[i], row[f + i]);
    }
}

extern "C" __global__ void swiglu_halves_q8_f32(float* __restrict__ out,
                                                signed char* __restrict__ codes,
                                                float* __restrict__ d, float* __restrict__ a,
                                                const float* __restrict__ gu, u64 rows, u32 f) {
    bx_grid_begin();
    const u32 lane = threadIdx.x & 31u;
    const u64 n_blocks = rows * (f / 32u);
    const u64 first = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const u64 stride = ((u64)gridDim.x * blockDim.x) >> 5;
    for (u64 b = first; b < n_blocks; b += stride) {
        const u64 j = b * 32u + lane, r = j / f, i = j - r * f;
        const float* row = gu + r * 2u * f;
        const float v = swiglu_op(row[i], row[f + i]);
        out[j] = v;
        // A 32-block never straddles two rows (f % 32 == 0): its codes are row r's.
        bx_quantize_block32<false>(v, lane, codes + b * 32u, d + b, a + b);
    }
}

extern "C" __global__ void sigmoid_f32(float* __restrict__ out, const float* __restrict__ x,
                                       u64 n) {
    bx_grid_begin();
    BX_GRID_STRIDE(j, n) {
        out[j] = bx_sigmoid(x[j]);
    }
}

extern "C" __global__ void gate_heads_sigmoid_f32(float* __restrict__ a,
                                                  const float* __restrict__ qg, u64 n, u32 nh,
                                                  u32 hd, u64 width, u64 offset,
                                                  u64 head_stride) {
    bx_grid_begin();
    const u64 per_row = (u64)nh * hd, total = n * per_row;
    BX_GRID_STRIDE(j, total) {
        const u64 r = j / per_row, rem = j - r * per_row, h = rem / hd, i = rem - h * hd;
        a[j] = a[j] * bx_sigmoid(qg[r * width + offset + h * head_stride + i]);
    }
}
