// rope.cu — rotary position embedding, NEOX pairing, in place on x: [rows, heads, hd].
// For i < rd/2 (rd = rotary dims <= hd; dims rd.. are left alone), with c = cos[pos, i] and
// s = sin[pos, i] from a table computed once on the CPU in f64 and rounded to f32:
//   a = x[i], b = x[i + rd/2];  x[i] = a * c - b * s;  x[i + rd/2] = a * s + b * c
// (each product rounded, then one add or subtract). Reference: src/reference/rope.rs.
//
// Versions:
//   rope_neox_f32  v1: one thread per rotated pair; 2-D grid (x: head * rd/2 + i, y: rows).

#include "common.cuh"

extern "C" __global__ void rope_neox_f32(float* __restrict__ x, const u32* __restrict__ pos,
                                         const float* __restrict__ cos_t,
                                         const float* __restrict__ sin_t, u32 heads, u32 hd,
                                         u32 half, u32 row0) {
    bx_grid_begin();
    const u32 idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= heads * half) return;
    const u32 head = idx / half, i = idx - head * half;
    const u64 row = (u64)row0 + blockIdx.y;
    const u64 t = (u64)pos[row] * half + i;
    const float c = cos_t[t], s = sin_t[t];
    float* v = x + (row * heads + head) * hd;
    const float a = v[i], b = v[i + half];
#ifdef BITEXACT_MUTANT
    // Broken on purpose (see BITEXACT_MUTANT): one fused multiply-add in each rotation.
    v[i] = fmaf(a, c, -(b * s));
    v[i + half] = fmaf(a, s, b * c);
#else
    v[i] = a * c - b * s;
    v[i + half] = a * s + b * c;
#endif
}
