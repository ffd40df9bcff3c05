// activation.cu — elementwise activations of the MoE block.
//   swiglu_f32   out[j] = silu(gate[j]) * up[j], silu(g) = g / (1 + exp(-g))
//   swiglu_halves_f32  out[r, i] = silu(gu[r, i]) * gu[r, f + i]: the gate and up halves of
//                one stacked product's row (an expert's [gate; up] rows, one launch)
//   sigmoid_f32  out[j] = 1 / (1 + exp(-x[j]))     (the shared expert's gate)
//   gate_heads_sigmoid_f32  a[r, h, i] *= sigmoid(qg[r * width + offset + h * head_stride + i])
//                (a gated attention layer's output gate, read from its query product)
// exp is bitexact's own fma polynomial (common.cuh), the same bits as src/math.rs.
//
// Versions:
//   swiglu_f32, swiglu_halves_f32, sigmoid_f32, gate_heads_sigmoid_f32  v1: grid-stride loop
//                over the flat index, one element per step.
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
    for (u64 j = (u64)blockIdx.x * blockDim.x + threadIdx.x; j < n;
         j += (u64)gridDim.x * blockDim.x) {
        out[j] = swiglu_op(gate[j], up[j]);
    }
}

extern "C" __global__ void swiglu_halves_f32(float* __restrict__ out,
                                             const float* __restrict__ gu, u64 rows, u32 f) {
    bx_grid_begin();
    const u64 n = rows * f;
    for (u64 j = (u64)blockIdx.x * blockDim.x + threadIdx.x; j < n;
         j += (u64)gridDim.x * blockDim.x) {
        const u64 r = j / f, i = j - r * f;
        const float* row = gu + r * 2u * f;
        out[j] = swiglu_op(row[i], row[f + i]);
    }
}

extern "C" __global__ void sigmoid_f32(float* __restrict__ out, const float* __restrict__ x,
                                       u64 n) {
    bx_grid_begin();
    for (u64 j = (u64)blockIdx.x * blockDim.x + threadIdx.x; j < n;
         j += (u64)gridDim.x * blockDim.x) {
        out[j] = bx_sigmoid(x[j]);
    }
}

extern "C" __global__ void gate_heads_sigmoid_f32(float* __restrict__ a,
                                                  const float* __restrict__ qg, u64 n, u32 nh,
                                                  u32 hd, u64 width, u64 offset,
                                                  u64 head_stride) {
    bx_grid_begin();
    const u64 per_row = (u64)nh * hd, total = n * per_row;
    for (u64 j = (u64)blockIdx.x * blockDim.x + threadIdx.x; j < total;
         j += (u64)gridDim.x * blockDim.x) {
        const u64 r = j / per_row, rem = j - r * per_row, h = rem / hd, i = rem - h * hd;
        a[j] = a[j] * bx_sigmoid(qg[r * width + offset + h * head_stride + i]);
    }
}
