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
//   add_rmsnorm_f32_row  the residual add and the norm after it in one launch (any width):
//                    h[r, i] = h[r, i] + o[r, i] (elementwise.cu's add_f32), then y = the norm
//                    of the new h, as rmsnorm_f32_row. Two launches of a decode step fewer a
//                    layer, the same bits as add_f32 then rmsnorm_f32(_row).
//   add_rmsnorm_q8_f32_row  add_rmsnorm_f32_row that also writes y's Q8 quantization (the rule
//                    of quantize.cu) for the matrix products that read it.
//   qkv_norm_rope_f32  the attention's inputs from the QKV products (one stacked product
//                    [n, (nh + 2 nkv) * hd] read at three offsets, or three products):
//                    a warp per (token, head slot); q and k heads get rmsnorm_f32's norm (the
//                    same lane chains) and rope.cu's NEOX rotation of the normed values, q into
//                    [n, nh, hd], k into its cache row; v heads are copied to theirs. One
//                    launch for what took five (two norms, two ropes, the cache write), the
//                    same bits.

#include "common.cuh"

#define NORM_WARPS 8u

// rs = 1 / sqrtf(ss / width + eps): the family's one mutant site.
__device__ __forceinline__ float norm_rs(float ss, u32 width, float eps) {
#ifdef BITEXACT_MUTANT
    // Broken on purpose (see BITEXACT_MUTANT): multiply by 1 / width instead of dividing.
    const float ms = ss * (1.0f / (float)width);
#else
    const float ms = ss / (float)width;
#endif
    return 1.0f / sqrtf(ms + eps);
}

extern "C" __global__ void rmsnorm_f32(float* __restrict__ y, const float* __restrict__ x,
                                       const float* __restrict__ w, u32 rows, u32 width,
                                       float eps) {
    bx_grid_begin();
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
    const float rs = norm_rs(bx_butterfly_sum(p), width, eps);
    float* yr = y + row * width;
#pragma unroll 8
    for (u32 i = lane; i < width; i += 32u) yr[i] = (xr[i] * rs) * w[i];
}

#define NORM_ROW_THREADS 256u
#define NORM_ROW_SEG 2048u

// One block per row; with ADD, h += o first (each element's sum stored, then normed); with
// Q8 (width % 32 == 0), y's quantized copy too: warp v's 32 lanes hold block v + (T / 32) j of
// the row. T threads (the order does not depend on it: the chains are warp 0's).
template <bool ADD, bool Q8, u32 T = NORM_ROW_THREADS>
__device__ __forceinline__ void rmsnorm_row_body(float* __restrict__ y, float* __restrict__ h,
                                                 const float* __restrict__ o,
                                                 const float* __restrict__ w, u32 rows,
                                                 u32 width, float eps,
                                                 signed char* __restrict__ qc = nullptr,
                                                 float* __restrict__ qd = nullptr,
                                                 float* __restrict__ qa = nullptr) {
    __shared__ float sx[NORM_ROW_SEG];
    __shared__ float s_rs;
    const u32 tid = threadIdx.x;
    const u64 row = blockIdx.x;
    if (row >= rows) return;  // the whole block
    float* xr = h + row * width;
    const float* orow = ADD ? o + row * width : nullptr;
    // Lane l's chain takes i = l, l + 32, .. in increasing order across the segments (each
    // segment starts at a multiple of 32, so i mod 32 is the same within one).
    float p = 0.0f;
    for (u32 k0 = 0; k0 < width; k0 += NORM_ROW_SEG) {
        const u32 len = min(NORM_ROW_SEG, width - k0);
        __syncthreads();  // the chains are done with the previous segment
#pragma unroll 8
        for (u32 i = tid; i < len; i += T) {
            if (ADD) {
                const float v = xr[k0 + i] + orow[k0 + i];
                xr[k0 + i] = v;
                sx[i] = v;
            } else {
                sx[i] = xr[k0 + i];
            }
        }
        __syncthreads();
        if (tid < 32u)
            for (u32 i = tid; i < len; i += 32u) p = fmaf(sx[i], sx[i], p);
    }
    if (tid < 32u) {
        const float rs = norm_rs(bx_butterfly_sum(p), width, eps);
        if (tid == 0) s_rs = rs;
    }
    __syncthreads();  // also orders every thread's h stores before the reads below
    const float rs = s_rs;
    float* yr = y + row * width;
#pragma unroll 8
    for (u32 i = tid; i < width; i += T) {
        const float v = (xr[i] * rs) * w[i];
        yr[i] = v;
        if (Q8) {
            const u64 blk = row * (width / 32u) + i / 32u;
            bx_quantize_block32<false>(v, tid & 31u, qc + blk * 32u, qd + blk, qa + blk);
        }
    }
}

extern "C" __global__ void __launch_bounds__(256)
    rmsnorm_f32_row(float* __restrict__ y, const float* __restrict__ x,
                    const float* __restrict__ w, u32 rows, u32 width, float eps) {
    bx_grid_begin();
    rmsnorm_row_body<false, false>(y, const_cast<float*>(x), nullptr, w, rows, width, eps);
}

// Both residual-add kernels take add_rmsnorm_q8_f32_row's parameters (one AddNormArgs; build.rs
// checks the two lists are the same): qc, qd and qa are null here and never read.
extern "C" __global__ void __launch_bounds__(256)
    add_rmsnorm_f32_row(float* __restrict__ y, float* __restrict__ h, const float* __restrict__ o,
                        const float* __restrict__ w, u32 rows, u32 width, float eps,
                        signed char* __restrict__ qc, float* __restrict__ qd,
                        float* __restrict__ qa) {
    bx_grid_begin();
    rmsnorm_row_body<true, false>(y, h, o, w, rows, width, eps);
}

// add_rmsnorm_f32_row writing y's quantization (quantize.cu's rule) beside y: codes
// [rows, width], d and a [rows, width / 32]; width % 32 == 0. The launch of quantize_q8_32 the
// next matrix product would make, saved. 1024 threads: with 256, one block's warps took 8
// quantization blocks each of a 2048-wide row in turn, and the step was no faster for the
// launch saved (H200, decode).
#define NORM_Q8_THREADS 1024u
extern "C" __global__ void __launch_bounds__(1024)
    add_rmsnorm_q8_f32_row(float* __restrict__ y, float* __restrict__ h,
                           const float* __restrict__ o, const float* __restrict__ w, u32 rows,
                           u32 width, float eps, signed char* __restrict__ qc,
                           float* __restrict__ qd, float* __restrict__ qa) {
    bx_grid_begin();
    rmsnorm_row_body<true, true, NORM_Q8_THREADS>(y, h, o, w, rows, width, eps, qc, qd, qa);
}

// A warp per (token row0 + blockIdx.y, head slot 4 * blockIdx.x + warp); slots 0..nh are q heads
// (head h at h * q_head_stride of its row: hd, or 2 hd when each head is followed by its output
// gate), nh..nh + nkv k heads, then v heads. Shared memory: hd floats per warp (the normed row, read
// back in rotation pairs).
// ROWS (qkv_norm_rope_rows_f32, a paged cache): token row's cache row is crow[row] (its page
// slot), its rotation still pos[row]'s; otherwise the cache row is the position.
// The parameters of both kernels, declared once (build.rs makes the launch's QkvNormRopeArgs of
// this list); crow is read by the ROWS kernel alone (null for the other).
#define QKV_PARAMS                                                                             \
    float* __restrict__ q_out, float* __restrict__ kc, float* __restrict__ vc,                 \
        const float* __restrict__ qs, const float* __restrict__ ks,                            \
        const float* __restrict__ vs, u64 q_stride, u64 k_stride, u64 v_stride,                \
        const float* __restrict__ q_norm, const float* __restrict__ k_norm,                    \
        const u32* __restrict__ pos, const u32* __restrict__ crow,                             \
        const float* __restrict__ cos_t, const float* __restrict__ sin_t, u32 nh, u32 nkv,     \
        u32 hd, u32 half, u32 cap, float eps, u32 row0, u32 q_head_stride
#define QKV_ARGS                                                                               \
    q_out, kc, vc, qs, ks, vs, q_stride, k_stride, v_stride, q_norm, k_norm, pos, crow, cos_t, \
        sin_t, nh, nkv, hd, half, cap, eps, row0, q_head_stride

template <bool ROWS>
__device__ __forceinline__ void qkv_norm_rope_body(QKV_PARAMS) {
    extern __shared__ float qkv_sm[];
    const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31u;
    const u32 slot = blockIdx.x * 4u + warp;
    const u32 slots = nh + 2u * nkv;
    if (slot >= slots) return;  // the whole warp
    const u64 row = (u64)row0 + blockIdx.y;
    // Token row's heads: q at qs + row * q_stride, k and v likewise (one stacked product's row
    // at three offsets, or three products).
    const float* x = slot < nh          ? qs + row * q_stride + (u64)slot * q_head_stride
                     : slot < nh + nkv ? ks + row * k_stride + (u64)(slot - nh) * hd
                                       : vs + row * v_stride + (u64)(slot - nh - nkv) * hd;
    const u32 t = pos[row];
    const u32 cr = ROWS ? crow[row] : t;
    if (slot >= nh + nkv) {
        float* dst = vc + ((u64)(slot - nh - nkv) * cap + cr) * hd;
        for (u32 i = lane; i < hd; i += 32u) dst[i] = x[i];
        return;
    }
    const bool is_q = slot < nh;
    const float* w = is_q ? q_norm : k_norm;
    float* dst = is_q ? q_out + (row * nh + slot) * hd : kc + ((u64)(slot - nh) * cap + cr) * hd;
    // rmsnorm_f32's lane chains: lane l over i = l, l + 32, .. in increasing order.
    float p = 0.0f;
    for (u32 i = lane; i < hd; i += 32u) {
        const float v = x[i];
        p = fmaf(v, v, p);
    }
    const float rs = norm_rs(bx_butterfly_sum(p), hd, eps);
    float* s = qkv_sm + warp * hd;
    for (u32 i = lane; i < hd; i += 32u) s[i] = (x[i] * rs) * w[i];
    __syncwarp();
    // rope.cu's rotation of the normed values (dims 2 * half .. hd are left as they are).
    const u64 tp = (u64)t * half;
    for (u32 i = lane; i < half; i += 32u) {
        const float a = s[i], b = s[i + half];
        const float c = cos_t[tp + i], sn = sin_t[tp + i];
        dst[i] = a * c - b * sn;
        dst[i + half] = a * sn + b * c;
    }
    for (u32 i = 2u * half + lane; i < hd; i += 32u) dst[i] = s[i];
}

extern "C" __global__ void __launch_bounds__(128) qkv_norm_rope_f32(QKV_PARAMS) {
    bx_grid_begin();
    qkv_norm_rope_body<false>(QKV_ARGS);
}

extern "C" __global__ void __launch_bounds__(128) qkv_norm_rope_rows_f32(QKV_PARAMS) {
    bx_grid_begin();
    qkv_norm_rope_body<true>(QKV_ARGS);
}
