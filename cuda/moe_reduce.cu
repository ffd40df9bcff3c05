// moe_reduce.cu — the weighted MoE reduce over n tokens, na routed experts, dim columns:
//   acc = +0; for k in 0..na: acc = fmaf(partial[i, k, e], weight[i, k], acc);
//   out[i, e] = acc + shared[i, e]        (or acc when there is no shared expert)
// partial: [n, na, dim], weight: [n, na], shared: [n, dim], out: [n, dim], all row-major.
// Routed experts first in slot order, the shared (already gated) term last with a plain add:
// exactly the host loop of src/reference/moe_reduce.rs.
//
// Versions:
//   moe_weighted_reduce_f32_v1  one output element per thread; 2-D grid (x: columns, y: rows).
//                               The baseline, and the path for dim % 4 != 0.
//   moe_weighted_reduce_f32_v2  one float4 of outputs per thread for dim % 4 == 0: 16-byte
//                               loads, the na partial loads unrolled so they are in flight
//                               together before the fma chain consumes them.
//
// Every element's arithmetic is the same chain in every version, so no launch shape or batch
// size can change a bit. Rows beyond 65,535 are covered by one launch per chunk of rows.
// `width` is a row's columns (v1) or float4s (v2).

#include "common.cuh"

#ifdef BITEXACT_MUTANT
// Broken on purpose (see BITEXACT_MUTANT): the routed experts summed in reverse slot order.
#define MOE_SLOT(k, na) ((na) - 1u - (k))
#else
#define MOE_SLOT(k, na) (k)
#endif

// Both versions' parameters, declared once (build.rs makes the launch's ReduceArgs of them).
#define REDUCE_PARAMS                                                                          \
    float* __restrict__ out, const float* __restrict__ partial,                                \
        const float* __restrict__ weight, const float* __restrict__ shared, u32 na, u32 width, \
        u32 row0, u32 has_shared

extern "C" __global__ void moe_weighted_reduce_f32_v1(REDUCE_PARAMS) {
    bx_grid_begin();
    const u32 col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= width) return;
    const u64 row = (u64)row0 + blockIdx.y;
    const float* p = partial + row * na * width + col;
    const float* w = weight + row * na;
    float acc = 0.0f;
    for (u32 k = 0; k < na; ++k) {
        const u32 s = MOE_SLOT(k, na);
        acc = fmaf(p[(u64)s * width], w[s], acc);
    }
    if (has_shared) acc = acc + shared[row * width + col];
    out[row * width + col] = acc;
}

extern "C" __global__ void moe_weighted_reduce_f32_v2(REDUCE_PARAMS) {
    bx_grid_begin();
    const u32 c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= width) return;
    const u64 row = (u64)row0 + blockIdx.y;
    const float4* p = reinterpret_cast<const float4*>(partial) + row * na * width + c;
    const float* w = weight + row * na;
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 8
    for (u32 k = 0; k < na; ++k) {
        const u32 s = MOE_SLOT(k, na);
        const float4 v = __ldcs(p + (u64)s * width);
        const float ws = w[s];
        acc.x = fmaf(v.x, ws, acc.x);
        acc.y = fmaf(v.y, ws, acc.y);
        acc.z = fmaf(v.z, ws, acc.z);
        acc.w = fmaf(v.w, ws, acc.w);
    }
    if (has_shared) {
        const float4 sh = __ldcs(reinterpret_cast<const float4*>(shared) + row * width + c);
        acc.x = acc.x + sh.x;
        acc.y = acc.y + sh.y;
        acc.z = acc.z + sh.z;
        acc.w = acc.w + sh.w;
    }
    __stcs(reinterpret_cast<float4*>(out) + row * width + c, acc);
}
