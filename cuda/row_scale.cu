// row_scale.cu — buf[i, e] *= scales[i] over buf: [rows, cols] (row-major), scales: [rows].
// The shared expert's sigmoid gate, applied as its own rounded pass before the MoE reduce.
//
// Versions:
//   row_scale_f32_v1  one element per thread; 2-D grid (x: columns, y: rows of this chunk).
//                     The baseline, and the path for cols % 4 != 0.
//   row_scale_f32_v2  one float4 per thread (16-byte loads and stores) for cols % 4 == 0.
//
// Arithmetic: one IEEE multiply per element, so every version and launch shape gives the same
// bits. Rows beyond the 65,535 a grid's y dimension allows are covered by one launch per chunk
// (row0 = first row of the chunk); no integer division per element. `width` is a row's
// columns (v1) or float4s (v2).
// Reference: src/reference/row_scale.rs.

#include "common.cuh"

__device__ __forceinline__ float row_scale_op(float v, float s) {
#ifdef BITEXACT_MUTANT
    // Broken on purpose (see BITEXACT_MUTANT): the same product except at the extremes of the
    // exponent range, where halving v loses a subnormal bit or doubling s overflows.
    return (v * 0.5f) * (s * 2.0f);
#else
    return v * s;
#endif
}

// Both versions' parameters, declared once (build.rs makes the launch's RowScaleArgs of them).
#define ROW_SCALE_PARAMS \
    float* __restrict__ buf, const float* __restrict__ scales, u32 width, u32 row0

extern "C" __global__ void row_scale_f32_v1(ROW_SCALE_PARAMS) {
    bx_grid_begin();
    const u32 col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= width) return;
    const u64 row = (u64)row0 + blockIdx.y;
    float* p = buf + row * width + col;
    *p = row_scale_op(*p, scales[row]);
}

extern "C" __global__ void row_scale_f32_v2(ROW_SCALE_PARAMS) {
    bx_grid_begin();
    const u32 c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= width) return;
    const u64 row = (u64)row0 + blockIdx.y;
    float4* p = reinterpret_cast<float4*>(buf) + row * width + c;
    const float s = scales[row];
    float4 v = *p;
    v.x = row_scale_op(v.x, s);
    v.y = row_scale_op(v.y, s);
    v.z = row_scale_op(v.z, s);
    v.w = row_scale_op(v.w, s);
    *p = v;
}
