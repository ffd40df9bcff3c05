// elementwise.cu — data movement and the residual add of the model runner.
//   add_f32          a[j] = a[j] + b[j]            (the residual stream)
//   gather_rows_f32  out[r, :] = table[ids[r], :]  (the token embedding)
// Reference: src/reference/elementwise.rs.
//
// Versions:
//   add_f32, gather_rows_f32  v1: grid-stride loops.

#include "common.cuh"

extern "C" __global__ void add_f32(float* __restrict__ a, const float* __restrict__ b, u64 n) {
    bx_grid_begin();
    BX_GRID_STRIDE(j, n) {
#ifdef BITEXACT_MUTANT
        // Broken on purpose (see BITEXACT_MUTANT): the operands through an fma with 1.
        a[j] = fmaf(a[j], 1.0f, b[j]) * (1.0f + 0x1p-23f);
#else
        a[j] = a[j] + b[j];
#endif
    }
}

extern "C" __global__ void gather_rows_f32(float* __restrict__ out,
                                           const float* __restrict__ table,
                                           const u32* __restrict__ ids, u64 rows, u32 width) {
    bx_grid_begin();
    const u64 n = rows * width;
    BX_GRID_STRIDE(j, n) {
        const u64 r = j / width, c = j - r * width;
        out[j] = table[(u64)ids[r] * width + c];
    }
}
