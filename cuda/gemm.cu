// gemm.cu — matrix products y[r, m] = dot(x[r, :], W[expert, m, :]) for every weight format.
// W rows are stored as GGUF stores them (src/quant/mod.rs); x is f32 [rows, K] for the float
// formats and the int8 block quantization of quantize.cu for the quantized ones.
//
// THE CANONICAL ORDER (src/reference/gemm.rs states it with the reference code). K is cut into
// blocks of 32 (block b = k in 32b .. 32b + 32, the last float block may be shorter). Block b
// feeds partial p = b % 4; each partial starts at +0 and takes its blocks in increasing b; the
// result is (p0 + p1) + (p2 + p3). One block's step, per weight format:
//   F32/F16/BF16  for k in the block, increasing: p = fmaf(w[k], x[k], p)   (f16/bf16 widened
//                 exactly to f32)
//   Q8_0          p = fmaf(d * dx, (float)isum, p)
//   Q4_K, Q5_K    p = fmaf(ws * dx, (float)isum, p); p = fmaf(wm, ax, p)
//                 with ws = d * sc and wm = -(dmin * m), each rounded once
//   Q6_K          p = fmaf(d * dx, (float)(sc_lo * isum_lo + sc_hi * isum_hi), p)
// where isum is the exact integer dot of the block's weight codes and activation codes (the
// tensor cores may form it in any order), dx the activation block scale and ax = dx * sum(codes).
// The order depends on K and the format only: GEMV, GEMM over any N, the grouped expert GEMM,
// every tile shape and every dispatch choice produce the same bits.
//
// Row tiles: a launch covers tiles of routed rows that share one expert. tiles[3t..3t+3] =
// (expert, first row, rows); with tiles == 0 the rows 0..n_rows are cut into tiles of the
// kernel's height, expert 0. Routed row r reads input row x_rows[r] and writes output row
// y_rows[r] (identity where the pointer is 0).
//
// Versions:
//   gemm_f32_v1, gemm_grouped_f32_v1   one thread per output, f32 weights; the baseline and
//                                      second witness (dense and routed).
//   gemv_<fmt>_t<NT>                   v2, for tiles of at most NT rows (decode): one warp per
//                                      weight row, lane 4n + p runs partial p of token n, all
//                                      32 lanes stage weights (float) or form the blocks'
//                                      integer dots (quantized); every weight byte is read once
//                                      per tile; the tree is two shuffles.
//   gemv_f32_wide                      v3, F32, tiles of one row (decode's router): a block of
//                                      128 threads per row stages it in shared memory with
//                                      16-byte loads, 4 chain threads.
//   gemv_q8_0_mma                      v3, Q8_0, tiles of one row, K % 256 == 0, 16384 rows or
//                                      more (the LM head): the int8 tensor cores form 16
//                                      rows' isums a block at once, 8 warps per 16 rows, a
//                                      256-wide chunk each per pass (3.0 TB/s on 151936 x 2048
//                                      in ncu, gemv_body 2.6).
//   gemv_<q8_0|q4_k|q5_k>_async        v3, tiles of one row (decode), K % 256 == 0: a block
//                                      of one warp takes 8 weight rows, lane 4r + p runs
//                                      partial p of row r; the rows' 256-wide chunks are
//                                      copied raw into shared memory by cp.async, several
//                                      chunks in flight (gemv_body's warp per row waited on
//                                      each row's loads: 1.3 TB/s). Q8_0 takes it for K <=
//                                      1024 only (the expert down product: 7.8 us against
//                                      gemv_body's 12.4); for wider rows of fewer than 16384
//                                      (the attention and expert gate/up products) neither
//                                      v3 kernel beat gemv_body in ncu.
//   gemm_ffma_<fmt>                    v2, float formats, tiles of 64 rows: 64 x 64 outputs per
//                                      block, four groups of 64 threads, group g runs partial g
//                                      (blocks g, g + 4, ..) in 16-wide K steps with an 8 x 8
//                                      register tile, the next step's loads in flight during
//                                      the fmas, then the tree through shared memory.
//   gemm_mma_<fmt>                     v2, quantized formats, tiles of 64 rows: 64 x 64 outputs
//                                      per block, int8 mma.sync m16n8k32 (k16 for Q6_K) forms
//                                      each block's isum, every thread keeps its 16 outputs'
//                                      four partials in registers (block j of a 256-wide chunk
//                                      feeds partial j % 4, a compile-time index).
//   gemm_mma_q4_k_async, _q5_k_async   v3, the same for Q4_K and Q5_K (a chunk is one super-block),
//                                      their scale products staged once per chunk.
//   gemm_mma_q8_0_async                v3, Q8_0 with K % 256 == 0: gemm_mma_q8_0's tile and
//                                      epilogue, its operands copied raw into shared memory by
//                                      cp.async, three chunks in flight (the register staging
//                                      and decode pass of v2 left the SMs waiting on loads).

#include "common.cuh"

#define FMT_F32 0
#define FMT_F16 1
#define FMT_BF16 2
#define FMT_Q8_0 3
#define FMT_Q4_K 4
#define FMT_Q5_K 5
#define FMT_Q6_K 6

#define DOT_BLOCK 32u

typedef unsigned char u8;
typedef unsigned short u16;

// ------------------------------------------------------------------------------------------
// The combination of the four partials. The family's mutant (BITEXACT_MUTANT) changes its
// association here and in the two kernels that combine through shuffles or shared memory
// instead of calling this: gemv_body (left to right) and gemm_ffma_body ((p0 + p3) + (p2 +
// p1)): three sites, each a wrong tree.

__device__ __forceinline__ float canon_tree(float p0, float p1, float p2, float p3) {
#ifdef BITEXACT_MUTANT
    // Broken on purpose (see BITEXACT_MUTANT): a left-to-right combination instead of the tree.
    return ((p0 + p1) + p2) + p3;
#else
    return (p0 + p1) + (p2 + p3);
#endif
}

// ------------------------------------------------------------------------------------------
// v1: one thread per output, f32 weights.

__device__ __forceinline__ float dot_f32_canonical(const float* __restrict__ x,
                                                   const float* __restrict__ w, u32 K) {
    float p0, p1, p2, p3;
    bx_dot_partials(x, w, K, p0, p1, p2, p3);
    return canon_tree(p0, p1, p2, p3);
}

extern "C" __global__ void gemm_f32_v1(float* __restrict__ y, const float* __restrict__ x,
                                       const float* __restrict__ w, u32 M, u32 K, u32 row0) {
    bx_grid_begin();
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
    bx_grid_begin();
    const u32 m = blockIdx.x * blockDim.x + threadIdx.x;
    if (m >= M) return;
    const u64 r = (u64)row0 + blockIdx.y;
    const float* xr = x + (u64)x_rows[r] * K;
    const float* wr = w + ((u64)experts[r] * M + m) * K;
    y[(u64)y_rows[r] * M + m] = dot_f32_canonical(xr, wr, K);
}

// ------------------------------------------------------------------------------------------
// Shared pieces of the v2 kernels.

struct Tile {
    u32 expert, row0, rows;
};

__device__ __forceinline__ Tile get_tile(const u32* __restrict__ tiles, u32 t, u32 height,
                                         u32 n_rows) {
    Tile tl;
    if (tiles) {
        tl.expert = tiles[3u * t];
        tl.row0 = tiles[3u * t + 1u];
        tl.rows = tiles[3u * t + 2u];
    } else {
        tl.expert = 0;
        tl.row0 = t * height;
        tl.rows = min(height, n_rows - tl.row0);
    }
    return tl;
}

__device__ __forceinline__ u32 map_row(const u32* __restrict__ rows, u32 r) {
    return rows ? rows[r] : r;
}

__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }

__device__ __forceinline__ u16 ld_u16(const u8* p) {
    return *reinterpret_cast<const u16*>(p);
}

// Little-endian u32 from a 2-byte-aligned address.
__device__ __forceinline__ u32 ld_u32_a2(const u8* p) {
    return (u32)ld_u16(p) | ((u32)ld_u16(p + 2) << 16);
}

__device__ __forceinline__ u32 ld_u32(const u8* p) { return *reinterpret_cast<const u32*>(p); }

// Weight element k of a float-format row.
template <int FMT>
__device__ __forceinline__ float load_w1(const u8* __restrict__ row, u32 k) {
    if (FMT == FMT_F32) return reinterpret_cast<const float*>(row)[k];
    const u16 h = reinterpret_cast<const u16*>(row)[k];
    return FMT == FMT_F16 ? f16_to_f32(h) : bf16_to_f32(h);
}

// 16 weights k0 .. k0 + 16 of a float-format row; vector loads (the caller checked alignment).
template <int FMT>
__device__ __forceinline__ void load_w16(const u8* __restrict__ row, u32 k0, float* w) {
    if (FMT == FMT_F32) {
        const float4* p = reinterpret_cast<const float4*>(row + 4u * k0);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float4 v = p[i];
            w[4 * i] = v.x;
            w[4 * i + 1] = v.y;
            w[4 * i + 2] = v.z;
            w[4 * i + 3] = v.w;
        }
    } else {
        const uint4* p = reinterpret_cast<const uint4*>(row + 2u * k0);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const uint4 v = p[i];
            const u32 words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const u16 lo = (u16)(words[j] & 0xffffu), hi = (u16)(words[j] >> 16);
                w[8 * i + 2 * j] = FMT == FMT_F16 ? f16_to_f32(lo) : bf16_to_f32(lo);
                w[8 * i + 2 * j + 1] = FMT == FMT_F16 ? f16_to_f32(hi) : bf16_to_f32(hi);
            }
        }
    }
}

// One decoded 32-element weight block of a quantized row: codes packed 4 per int (little-endian
// bytes, k increasing) and the scalars of the block's step.
struct WBlk {
    int q[8];
    float s1;  // Q8_0, Q6_K: d;  Q4_K/Q5_K: ws = d * sc
    float s2;  // Q4_K/Q5_K: wm = -(dmin * m)
    int sc0, sc1;  // Q6_K: the two 16-element sub-block scales
};

// Q4_K/Q5_K 6-bit scale and min of sub-block j from the 12 scale bytes (get_scale_min_k4).
__device__ __forceinline__ void scale_min_k4(int j, const u8* s, int& sc, int& m) {
    if (j < 4) {
        sc = s[j] & 63;
        m = s[j + 4] & 63;
    } else {
        sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
        m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

template <int FMT>
__device__ __forceinline__ WBlk decode_wblock(const u8* __restrict__ row, u32 b) {
    WBlk o;
    o.s2 = 0.0f;
    o.sc0 = o.sc1 = 0;
    if (FMT == FMT_Q8_0) {
        const u8* blk = row + 34u * b;
        o.s1 = f16_to_f32(ld_u16(blk));
#pragma unroll
        for (int i = 0; i < 8; ++i) o.q[i] = (int)ld_u32_a2(blk + 2 + 4 * i);
    } else if (FMT == FMT_Q4_K || FMT == FMT_Q5_K) {
        const bool five = FMT == FMT_Q5_K;
        const u8* sb = row + (five ? 176u : 144u) * (b >> 3);
        const int j = (int)(b & 7u);
        const float d = f16_to_f32(ld_u16(sb));
        const float dmin = f16_to_f32(ld_u16(sb + 2));
        int sc, m;
        scale_min_k4(j, sb + 4, sc, m);
        o.s1 = d * (float)sc;
        o.s2 = -(dmin * (float)m);
        const u8* qs = sb + (five ? 48 : 16) + 32 * (j >> 1);
        const int shift = 4 * (j & 1);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            u32 v = (ld_u32(qs + 4 * i) >> shift) & 0x0F0F0F0Fu;
            if (five) v |= ((ld_u32(sb + 16 + 4 * i) >> j) & 0x01010101u) << 4;
            o.q[i] = (int)v;
        }
    } else {  // FMT_Q6_K
        const u8* sb = row + 210u * (b >> 3);
        const int j = (int)(b & 7u);
        const int half = j >> 2, t = j & 3;
        const u8* ql = sb + 64 * half + ((t & 1) ? 32 : 0);
        const u8* qh = sb + 128 + 32 * half;
        o.s1 = f16_to_f32(ld_u16(sb + 208));
        o.sc0 = (int)(signed char)sb[192 + 2 * j];
        o.sc1 = (int)(signed char)sb[192 + 2 * j + 1];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const u32 lo = (ld_u32_a2(ql + 4 * i) >> (4 * (t >> 1))) & 0x0F0F0F0Fu;
            const u32 hi = ((ld_u32_a2(qh + 4 * i) >> (2 * t)) & 0x03030303u) << 4;
            o.q[i] = (int)__vsub4(lo | hi, 0x20202020u);
        }
    }
    return o;
}

// ------------------------------------------------------------------------------------------
// GEMV: tiles of at most NT (<= 8) rows. One warp per weight row, 8 rows per block. The row is
// walked in segments of 32 blocks. Lane 4n + p runs the chain of partial p for
// token n; the other work is spread over all 32 lanes:
//   float formats: the lanes stage the segment's weights in shared memory with coalesced loads,
//                  then the chain lanes run their fmaf chains from it;
//   quantized:     lane l decodes blocks l and l + 32 of the segment and forms their exact
//                  integer dots for every token, leaving (scale product, isum) in shared
//                  memory, then the chain lanes apply the blocks' steps in order.

#define GEMV_WARPS 8u
#define GEMV_SEG_F 32u  // blocks per segment, float formats (the staged weights)
#define GEMV_SEG_Q 32u  // blocks per segment, quantized formats (NT * 3 floats per block)
#define GEMV_SMEM (GEMV_SEG_F * 33u)  // floats per warp; also >= GEMV_SEG_Q * 8 * 3

// The exact float value of an int below 2^22 in magnitude: its bits added to those of 1.5 * 2^23
// form that float plus the int, and the subtraction is exact. Two full-rate operations instead
// of a conversion.
__device__ __forceinline__ float small_int_to_float(int i) {
    return __int_as_float(0x4B400000 + i) - 12582912.0f;
}

template <int FMT>
__device__ __forceinline__ float isum_to_float(int i) {
    // |isum| < 2^22 for Q8_0 (32 * 127 * 127), Q4_K and Q5_K (32 * 31 * 127); Q6_K's scaled
    // sum reaches 2^24 and takes the conversion instruction.
    return FMT == FMT_Q6_K ? __int2float_rn(i) : small_int_to_float(i);
}

template <int FMT, int NT>
__device__ __forceinline__ void gemv_body(float* __restrict__ y, const float* __restrict__ x,
                                          const signed char* __restrict__ xq,
                                          const float* __restrict__ xd,
                                          const float* __restrict__ xa, const u8* __restrict__ W,
                                          const u32* __restrict__ tiles,
                                          const u32* __restrict__ x_rows,
                                          const u32* __restrict__ y_rows, u32 n_rows, u32 M,
                                          u32 K, u64 row_bytes, u32 tile0) {
    // Float formats: [warp][block][33] staged weights (33: the chain lanes read 4 blocks at
    // once without bank conflicts). Quantized: [warp][block][token] scale products and isums.
    __shared__ float s_a[GEMV_WARPS][GEMV_SMEM];
    __shared__ float s_wm[GEMV_WARPS][GEMV_SEG_Q];

    const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31u;
    const u32 m = blockIdx.x * GEMV_WARPS + warp;
    if (m >= M) return;  // the whole warp: rows are per warp, synchronization is per warp
    const Tile tl = get_tile(tiles, tile0 + blockIdx.y, NT, n_rows);
    if (tl.rows == 0u) return;  // a padding tile of a device-built table
    const u8* wrow = W + ((u64)tl.expert * M + m) * row_bytes;
    const u32 nb = (K + DOT_BLOCK - 1u) / DOT_BLOCK;
    const u32 p = lane & 3u, cn = lane >> 2;  // this lane's chain: partial p of token cn
    const bool chain = cn < tl.rows && cn < (u32)NT;
    const u32 cx = map_row(x_rows, tl.row0 + min(cn, tl.rows - 1u));
    float* sa = s_a[warp];
    float acc = 0.0f;

    const u32 seg_len = FMT <= FMT_BF16 ? GEMV_SEG_F : GEMV_SEG_Q;
    for (u32 seg = 0; seg < nb; seg += seg_len) {
        const u32 seg_blocks = min(seg_len, nb - seg);
        if (FMT <= FMT_BF16) {
            const u32 k_base = seg * DOT_BLOCK;
            const u32 k_end = min(K, k_base + GEMV_SEG_F * DOT_BLOCK);
#pragma unroll 8
            for (u32 e = lane; e < GEMV_SEG_F * DOT_BLOCK; e += 32u) {
                const u32 k = k_base + e;
                sa[(e >> 5) * 33u + (e & 31u)] = k < k_end ? load_w1<FMT>(wrow, k) : 0.0f;
            }
            __syncwarp();
            if (chain) {
                const float* xr = x + (u64)cx * K;
                for (u32 b = p; b < seg_blocks; b += 4u) {
                    const u32 k0 = k_base + b * DOT_BLOCK;
                    const u32 len = min(DOT_BLOCK, K - k0);
                    const float* wb = sa + b * 33u;
                    if (len == DOT_BLOCK) {
#pragma unroll
                        for (u32 i = 0; i < DOT_BLOCK; ++i) acc = fmaf(wb[i], __ldg(xr + k0 + i), acc);
                    } else {
                        for (u32 i = 0; i < len; ++i) acc = fmaf(wb[i], __ldg(xr + k0 + i), acc);
                    }
                }
            }
        } else {
            // Phase 1: lanes form the blocks' integer dots and scale products.
#pragma unroll
            for (u32 h = 0; h < GEMV_SEG_Q; h += 32u) {
                const u32 bl = h + lane;
                if (bl < seg_blocks) {
                    const u32 b = seg + bl;
                    const WBlk w = decode_wblock<FMT>(wrow, b);
                    if (FMT == FMT_Q4_K || FMT == FMT_Q5_K) s_wm[warp][bl] = w.s2;
#pragma unroll
                    for (int n = 0; n < NT; ++n) {
                        if ((u32)n < tl.rows) {
                            const u32 xr = map_row(x_rows, tl.row0 + n);
                            const int4* xp = reinterpret_cast<const int4*>(xq + (u64)xr * K + b * 32u);
                            const int4 x0 = __ldg(xp), x1 = __ldg(xp + 1);
                            int lo = 0, hi = 0;
                            lo = __dp4a(w.q[0], x0.x, lo);
                            lo = __dp4a(w.q[1], x0.y, lo);
                            lo = __dp4a(w.q[2], x0.z, lo);
                            lo = __dp4a(w.q[3], x0.w, lo);
                            hi = __dp4a(w.q[4], x1.x, hi);
                            hi = __dp4a(w.q[5], x1.y, hi);
                            hi = __dp4a(w.q[6], x1.z, hi);
                            hi = __dp4a(w.q[7], x1.w, hi);
                            const int isum = FMT == FMT_Q6_K ? w.sc0 * lo + w.sc1 * hi : lo + hi;
                            const float t = w.s1 * __ldg(xd + (u64)xr * nb + b);
                            float* o = sa + (bl * NT + n) * 3u;
                            o[0] = t;
                            o[1] = isum_to_float<FMT>(isum);
                            if (FMT == FMT_Q4_K || FMT == FMT_Q5_K) o[2] = __ldg(xa + (u64)xr * nb + b);
                        }
                    }
                }
            }
            __syncwarp();
            // Phase 2: the chains, block by block in order.
            if (chain) {
                for (u32 bl = p; bl < seg_blocks; bl += 4u) {
                    const float* o = sa + (bl * NT + cn) * 3u;
                    acc = fmaf(o[0], o[1], acc);
                    if (FMT == FMT_Q4_K || FMT == FMT_Q5_K) acc = fmaf(s_wm[warp][bl], o[2], acc);
                }
            }
        }
        __syncwarp();
    }

    // Lanes 4n..4n+3 hold p0..p3 of token n: (p0 + p1) + (p2 + p3) by two butterflies.
    const float other = __shfl_xor_sync(BX_FULL_MASK, acc, 1);
    const float pair = (p & 1u) ? other + acc : acc + other;
    const float pair2 = __shfl_xor_sync(BX_FULL_MASK, pair, 2);
#ifdef BITEXACT_MUTANT
    // Broken on purpose (see BITEXACT_MUTANT): left to right, ((p0 + p1) + p2) + p3.
    const u32 g0 = lane & ~3u;
    const float s = ((__shfl_sync(BX_FULL_MASK, acc, g0) + __shfl_sync(BX_FULL_MASK, acc, g0 | 1u)) +
                     __shfl_sync(BX_FULL_MASK, acc, g0 | 2u)) +
                    __shfl_sync(BX_FULL_MASK, acc, g0 | 3u);
    (void)pair2;
#else
    const float s = (p & 2u) ? pair2 + pair : pair + pair2;
#endif
    if (p == 0u && chain) y[(u64)map_row(y_rows, tl.row0 + cn) * M + m] = s;
}

// ------------------------------------------------------------------------------------------
// F32 GEMV for tiles of one row (the router of a decode step): one weight row per block of 128
// threads. The threads stage a 2048-wide segment of the row and of x in shared memory with
// 16-byte loads, all in flight at once; then threads 0..3 run partials 0..3 from there. The
// chains are 512 fmaf long at K = 2048 (the canonical order), so a block per row spreads the
// router's 128 rows over the SMs: 4 rows a block left 32 SMs waiting on loads (12.7 us for the
// 128 x 2048 router in ncu). Block b of a segment sits at 36b floats (the 4 chain threads read
// 4 different bank groups).

#define GEMV_F32W_SEG 2048u
#define GEMV_F32W_PAD 36u  // floats per staged 32-block

extern "C" __global__ void __launch_bounds__(128)
    gemv_f32_wide(float* __restrict__ y, const float* __restrict__ x,
                  const signed char* __restrict__ xq, const float* __restrict__ xd,
                  const float* __restrict__ xa, const u8* __restrict__ W,
                  const u32* __restrict__ tiles, const u32* __restrict__ x_rows,
                  const u32* __restrict__ y_rows, u32 n_rows, u32 M, u32 K, u64 row_bytes,
                  u32 tile0) {
    bx_grid_begin();
    __shared__ __align__(16) float sw[GEMV_F32W_SEG / 32u * GEMV_F32W_PAD];
    __shared__ __align__(16) float sx[GEMV_F32W_SEG / 32u * GEMV_F32W_PAD];
    const u32 tid = threadIdx.x, m = blockIdx.x;
    const Tile tl = get_tile(tiles, tile0 + blockIdx.y, 1u, n_rows);
    if (tl.rows == 0u) return;  // a padding tile of a device-built table
    const float* xr = x + (u64)map_row(x_rows, tl.row0) * K;
    const float* wr = reinterpret_cast<const float*>(W + ((u64)tl.expert * M + m) * row_bytes);
    // Rows and x start 16-byte aligned when K % 4 == 0 (allocations are).
    const bool vec = (K & 3u) == 0u;
    float acc = 0.0f;
    for (u32 k0 = 0; k0 < K; k0 += GEMV_F32W_SEG) {
        const u32 len = min(GEMV_F32W_SEG, K - k0);
        __syncthreads();  // the chains are done with the previous segment
        if (vec) {
            float4 wv[4], xv[4];
#pragma unroll
            for (u32 s = 0; s < 4u; ++s) {
                const u32 e = 4u * (tid + 128u * s);
                const bool ok = e < len;
                wv[s] = ok ? __ldg(reinterpret_cast<const float4*>(wr + k0 + e)) : make_float4(0, 0, 0, 0);
                xv[s] = ok ? __ldg(reinterpret_cast<const float4*>(xr + k0 + e)) : make_float4(0, 0, 0, 0);
            }
#pragma unroll
            for (u32 s = 0; s < 4u; ++s) {
                const u32 e = 4u * (tid + 128u * s);
                const u32 at = (e >> 5) * GEMV_F32W_PAD + (e & 31u);
                *reinterpret_cast<float4*>(sw + at) = wv[s];
                *reinterpret_cast<float4*>(sx + at) = xv[s];
            }
        } else {
            for (u32 e = tid; e < GEMV_F32W_SEG; e += 128u) {
                const u32 at = (e >> 5) * GEMV_F32W_PAD + (e & 31u);
                sw[at] = e < len ? __ldg(wr + k0 + e) : 0.0f;
                sx[at] = e < len ? __ldg(xr + k0 + e) : 0.0f;
            }
        }
        __syncthreads();
        if (tid < 4u) {
            const u32 nblk = (len + DOT_BLOCK - 1u) / DOT_BLOCK;
            for (u32 b = tid; b < nblk; b += 4u) {
                const float* wb = sw + b * GEMV_F32W_PAD;
                const float* xb = sx + b * GEMV_F32W_PAD;
                if (b * DOT_BLOCK + DOT_BLOCK <= len) {
#pragma unroll
                    for (u32 i = 0; i < DOT_BLOCK; i += 4u) {
                        const float4 w4 = *reinterpret_cast<const float4*>(wb + i);
                        const float4 x4 = *reinterpret_cast<const float4*>(xb + i);
                        acc = fmaf(w4.x, x4.x, acc);
                        acc = fmaf(w4.y, x4.y, acc);
                        acc = fmaf(w4.z, x4.z, acc);
                        acc = fmaf(w4.w, x4.w, acc);
                    }
                } else {
                    for (u32 i = 0; i < len - b * DOT_BLOCK; ++i) acc = fmaf(wb[i], xb[i], acc);
                }
            }
        }
    }
    if (tid < 32u) {
        const float p0 = __shfl_sync(BX_FULL_MASK, acc, 0), p1 = __shfl_sync(BX_FULL_MASK, acc, 1);
        const float p2 = __shfl_sync(BX_FULL_MASK, acc, 2), p3 = __shfl_sync(BX_FULL_MASK, acc, 3);
        if (tid == 0u) y[(u64)map_row(y_rows, tl.row0) * M + m] = canon_tree(p0, p1, p2, p3);
    }
}

// ------------------------------------------------------------------------------------------
// FFMA GEMM for the float formats: 64 rows x 64 outputs per block, 4 groups of 64 threads.

#define TILE 64u
#define FFMA_BK 16u
#define FFMA_GROUP 64u

__device__ __forceinline__ void group_sync(u32 g) {
    asm volatile("bar.sync %0, %1;" ::"r"(g + 1u), "r"(FFMA_GROUP));
}

template <int FMT>
__device__ __forceinline__ void gemm_ffma_body(float* __restrict__ y, const float* __restrict__ x,
                                               const u8* __restrict__ W,
                                               const u32* __restrict__ tiles,
                                               const u32* __restrict__ x_rows,
                                               const u32* __restrict__ y_rows, u32 n_rows, u32 M,
                                               u32 K, u64 row_bytes, u32 tile0) {
    // [group][k][64] for activations and weights; reused for the final tree.
    __shared__ __align__(16) float sA[4][FFMA_BK][TILE];
    __shared__ __align__(16) float sB[4][FFMA_BK][TILE];

    const u32 g = threadIdx.x / FFMA_GROUP;
    const u32 t = threadIdx.x % FFMA_GROUP;
    const u32 tr = t / 8u, tc = t % 8u;
    const Tile tl = get_tile(tiles, tile0 + blockIdx.y, TILE, n_rows);
    if (tl.rows == 0u) return;  // a padding tile of a device-built table (block-uniform)
    const u32 m0 = blockIdx.x * TILE;

    // Thread t loads row t of the activation tile and row t of the weight tile.
    const bool x_ok = t < tl.rows;
    const float* xrow = x + (u64)map_row(x_rows, tl.row0 + (x_ok ? t : 0u)) * K;
    const bool w_ok = m0 + t < M;
    const u8* wrow = W + ((u64)tl.expert * M + (w_ok ? m0 + t : 0u)) * row_bytes;
    const bool vec = (FMT == FMT_F32 ? (K % 4u) : (K % 8u)) == 0u;

    float acc[8][8];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;

    const u32 nb = (K + DOT_BLOCK - 1u) / DOT_BLOCK;
    // Group g's K steps: blocks g, g + 4, .. in halves of 16; the next step's global loads are
    // issued before the current step's fmas, so they are in flight while the group computes.
    float xv[16], wv[16];
    const auto load_step = [&](u32 k0) {
        if (vec && k0 + FFMA_BK <= K) {
            const float4* xp = reinterpret_cast<const float4*>(xrow + k0);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const float4 v = xp[i];
                xv[4 * i] = v.x;
                xv[4 * i + 1] = v.y;
                xv[4 * i + 2] = v.z;
                xv[4 * i + 3] = v.w;
            }
            load_w16<FMT>(wrow, k0, wv);
        } else {
            // Past K: x = +0 and w = -0, so the fma adds an exact -0 and leaves every partial
            // (a -0 one included) unchanged.
#pragma unroll
            for (int i = 0; i < 16; ++i) {
                const bool in = k0 + i < K;
                xv[i] = in ? xrow[k0 + i] : 0.0f;
                wv[i] = in ? load_w1<FMT>(wrow, k0 + i) : -0.0f;
            }
        }
    };
    const u32 steps = g < nb ? 2u * ((nb - g + 3u) / 4u) : 0u;
    if (steps) load_step(g * DOT_BLOCK);
    for (u32 s = 0; s < steps; ++s) {
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            sA[g][i][t] = x_ok ? xv[i] : 0.0f;
            sB[g][i][t] = w_ok ? wv[i] : 0.0f;
        }
        group_sync(g);
        if (s + 1u < steps) {
            const u32 n = s + 1u;
            load_step((g + 4u * (n >> 1)) * DOT_BLOCK + (n & 1u) * FFMA_BK);
        }
#pragma unroll
        for (int kk = 0; kk < (int)FFMA_BK; ++kk) {
            const float4 a0 = *reinterpret_cast<const float4*>(&sA[g][kk][tr * 4u]);
            const float4 a1 = *reinterpret_cast<const float4*>(&sA[g][kk][32u + tr * 4u]);
            const float4 b0 = *reinterpret_cast<const float4*>(&sB[g][kk][tc * 4u]);
            const float4 b1 = *reinterpret_cast<const float4*>(&sB[g][kk][32u + tc * 4u]);
            const float av[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
            const float bv[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
            for (int i = 0; i < 8; ++i)
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(bv[j], av[i], acc[i][j]);
        }
        group_sync(g);
    }

    // The tree (p0 + p1) + (p2 + p3) across the groups, through shared memory: groups 1 and 3
    // hand over their partials, groups 0 and 2 add them, group 2 hands over p2 + p3.
    float* buf1 = &sA[0][0][0];  // 4096 floats each
    float* buf3 = &sB[0][0][0];
#ifdef BITEXACT_MUTANT
    // Broken on purpose (see BITEXACT_MUTANT): the tree (p0 + p3) + (p2 + p1).
    const bool swap = true;
#else
    const bool swap = false;
#endif
    __syncthreads();
    if (g == 1u || g == 3u) {
        float* buf = g == 1u ? buf1 : buf3;
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
            for (int j = 0; j < 8; ++j) buf[(i * 8 + j) * FFMA_GROUP + t] = acc[i][j];
    }
    __syncthreads();
    if (g == 0u || g == 2u) {
        const float* buf = ((g == 0u) != swap) ? buf1 : buf3;
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[i][j] = acc[i][j] + buf[(i * 8 + j) * FFMA_GROUP + t];
    }
    __syncthreads();
    if (g == 2u) {
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
            for (int j = 0; j < 8; ++j) buf1[(i * 8 + j) * FFMA_GROUP + t] = acc[i][j];
    }
    __syncthreads();
    if (g == 0u) {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const u32 r = (i < 4 ? tr * 4u + i : 32u + tr * 4u + (i - 4));
            if (r >= tl.rows) continue;
            float* yrow = y + (u64)map_row(y_rows, tl.row0 + r) * M;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const u32 m = m0 + (j < 4 ? tc * 4u + j : 32u + tc * 4u + (j - 4));
                if (m < M) yrow[m] = acc[i][j] + buf1[(i * 8 + j) * FFMA_GROUP + t];
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// Int8 tensor-core GEMM for the quantized formats: 64 rows x 64 outputs per block, 8 warps as
// 2 (outputs) x 4 (rows), warp tile 32 outputs x 16 rows, K in chunks of 256 (8 blocks).

#define MMA_CHUNK 256u
#define MMA_STRIDE 272u  // bytes per smem code row: 256 + 16, so fragment loads avoid conflicts

__device__ __forceinline__ void mma_k32(int (&c)[4], const int (&a)[4], int b0, int b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void mma_k16(int (&c)[4], int a0, int a1, int b0) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5}, {%6}, "
        "{%0,%1,%2,%3};"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a0), "r"(a1), "r"(b0));
}

template <int FMT>
__device__ __forceinline__ void gemm_mma_body(float* __restrict__ y,
                                              const signed char* __restrict__ xq,
                                              const float* __restrict__ xd,
                                              const float* __restrict__ xa,
                                              const u8* __restrict__ W,
                                              const u32* __restrict__ tiles,
                                              const u32* __restrict__ x_rows,
                                              const u32* __restrict__ y_rows, u32 n_rows, u32 M,
                                              u32 K, u64 row_bytes, u32 tile0) {
    __shared__ __align__(16) u8 sW[TILE * MMA_STRIDE];
    __shared__ __align__(16) u8 sX[TILE * MMA_STRIDE];
    __shared__ float sWs[TILE][8], sWm[TILE][8];
    __shared__ int sWsc[TILE][8];  // Q6_K: sc0 | sc1 << 16
    __shared__ float sXd[TILE][8], sXa[TILE][8];

    const u32 tid = threadIdx.x;
    const u32 warp = tid >> 5, lane = tid & 31u;
    const u32 gq = lane >> 2, tq = lane & 3u;  // mma groupID, threadID_in_group
    const u32 wm = warp & 1u, wn = warp >> 1;
    const Tile tl = get_tile(tiles, tile0 + blockIdx.y, TILE, n_rows);
    if (tl.rows == 0u) return;  // a padding tile of a device-built table (block-uniform)
    const u32 m0 = blockIdx.x * TILE;
    const u32 nb = K / DOT_BLOCK;

    float acc[4][2][2][4];
#pragma unroll
    for (int p = 0; p < 4; ++p)
#pragma unroll
        for (int a = 0; a < 2; ++a)
#pragma unroll
            for (int b = 0; b < 2; ++b)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[p][a][b][e] = 0.0f;

    // One chunk (8 blocks) of this thread's share of the tiles, held in registers so that the
    // next chunk's global loads are in flight while the current one is multiplied.
    int st_wq[2][8];
    float st_ws[2], st_wm[2], st_xd[2], st_xa[2];
    int st_sc[2];
    int4 st_x[4];
    const auto load_chunk = [&](u32 c) {
        // Weights: 64 rows x 8 blocks, two (row, block) pairs per thread, decoded to int8.
#pragma unroll
        for (u32 s = 0; s < 2u; ++s) {
            const u32 pair = tid + s * 256u;
            const u32 r = pair >> 3, j = pair & 7u;
            if (m0 + r < M && c + j < nb) {
                const u8* wrow = W + ((u64)tl.expert * M + m0 + r) * row_bytes;
                const WBlk w = decode_wblock<FMT>(wrow, c + j);
#pragma unroll
                for (int i = 0; i < 8; ++i) st_wq[s][i] = w.q[i];
                st_ws[s] = w.s1;
                st_wm[s] = w.s2;
                st_sc[s] = (w.sc0 & 0xffff) | (w.sc1 << 16);
            } else {
#pragma unroll
                for (int i = 0; i < 8; ++i) st_wq[s][i] = 0;
                st_ws[s] = 0.0f;
                st_wm[s] = 0.0f;
                st_sc[s] = 0;
            }
        }
        // Activations: 64 rows x 256 codes (16 x 16 bytes per row), and the block scalars.
#pragma unroll
        for (u32 s = 0; s < 4u; ++s) {
            const u32 idx = tid + s * 256u;
            const u32 r = idx >> 4, part = idx & 15u;
            st_x[s] = make_int4(0, 0, 0, 0);
            if (r < tl.rows && c * 32u + part * 16u < K) {
                const u32 xr = map_row(x_rows, tl.row0 + r);
                st_x[s] = *reinterpret_cast<const int4*>(xq + (u64)xr * K + c * 32u + part * 16u);
            }
        }
#pragma unroll
        for (u32 s = 0; s < 2u; ++s) {
            const u32 pair = tid + s * 256u;
            const u32 r = pair >> 3, j = pair & 7u;
            st_xd[s] = 0.0f;
            st_xa[s] = 0.0f;
            if (r < tl.rows && c + j < nb) {
                const u64 at = (u64)map_row(x_rows, tl.row0 + r) * nb + c + j;
                st_xd[s] = xd[at];
                st_xa[s] = xa[at];
            }
        }
    };
    const auto store_chunk = [&]() {
#pragma unroll
        for (u32 s = 0; s < 2u; ++s) {
            const u32 pair = tid + s * 256u;
            const u32 r = pair >> 3, j = pair & 7u;
            int* dst = reinterpret_cast<int*>(sW + r * MMA_STRIDE + j * 32u);
#pragma unroll
            for (int i = 0; i < 8; ++i) dst[i] = st_wq[s][i];
            sWs[r][j] = st_ws[s];
            sWm[r][j] = st_wm[s];
            sWsc[r][j] = st_sc[s];
            sXd[r][j] = st_xd[s];
            sXa[r][j] = st_xa[s];
        }
#pragma unroll
        for (u32 s = 0; s < 4u; ++s) {
            const u32 idx = tid + s * 256u;
            *reinterpret_cast<int4*>(sX + (idx >> 4) * MMA_STRIDE + (idx & 15u) * 16u) = st_x[s];
        }
    };

    load_chunk(0);
    // A warp whose 16 token rows (or whose second 8) lie past the tile's rows skips their
    // products: an expert's last tile is often part-empty, and the issue slots go to the
    // block's other warps. Warp-uniform, so the mma's full-warp contract holds.
    const bool busy0 = wn * 16u < tl.rows, busy1 = wn * 16u + 8u < tl.rows;
    for (u32 c0 = 0; c0 < nb; c0 += 8u) {
        store_chunk();
        __syncthreads();
        if (c0 + 8u < nb) load_chunk(c0 + 8u);

#pragma unroll
        for (int j = 0; j < 8; ++j) {
            if (busy0 && c0 + j < nb) {
                int af[2][4], bf[2][2];
#pragma unroll
                for (int mt = 0; mt < 2; ++mt) {
                    const u32 r = wm * 32u + mt * 16u + gq;
                    const u8* base = sW + j * 32 + tq * 4u;
                    af[mt][0] = *reinterpret_cast<const int*>(base + r * MMA_STRIDE);
                    af[mt][1] = *reinterpret_cast<const int*>(base + (r + 8u) * MMA_STRIDE);
                    af[mt][2] = *reinterpret_cast<const int*>(base + r * MMA_STRIDE + 16);
                    af[mt][3] = *reinterpret_cast<const int*>(base + (r + 8u) * MMA_STRIDE + 16);
                }
#pragma unroll
                for (int nt = 0; nt < 2; ++nt) {
                    const u32 r = wn * 16u + nt * 8u + gq;
                    const u8* base = sX + r * MMA_STRIDE + j * 32 + tq * 4u;
                    bf[nt][0] = *reinterpret_cast<const int*>(base);
                    bf[nt][1] = *reinterpret_cast<const int*>(base + 16);
                }
                // This block's scalars for the thread's 4 output rows and 4 token rows.
                float ws[4], wmn[4], dx[4], ax[4];
                int sc0[4], sc1[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const u32 mr = wm * 32u + (i >> 1) * 16u + gq + ((i & 1) ? 8u : 0u);
                    const u32 nr = wn * 16u + (i >> 1) * 8u + tq * 2u + (i & 1);
                    ws[i] = sWs[mr][j];
                    if (FMT == FMT_Q4_K || FMT == FMT_Q5_K) {
                        wmn[i] = sWm[mr][j];
                        ax[i] = sXa[nr][j];
                    }
                    if (FMT == FMT_Q6_K) {
                        const int scp = sWsc[mr][j];
                        sc0[i] = (int)(short)(scp & 0xffff);
                        sc1[i] = scp >> 16;
                    }
                    dx[i] = sXd[nr][j];
                }
#pragma unroll
                for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
                    for (int nt = 0; nt < 2; ++nt) {
                        if (nt == 1 && !busy1) continue;
                        int lo[4] = {0, 0, 0, 0}, hi[4] = {0, 0, 0, 0};
                        if (FMT == FMT_Q6_K) {
                            mma_k16(lo, af[mt][0], af[mt][1], bf[nt][0]);
                            mma_k16(hi, af[mt][2], af[mt][3], bf[nt][1]);
                        } else {
                            mma_k32(lo, af[mt], bf[nt][0], bf[nt][1]);
                        }
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            const int mi = mt * 2 + (e >> 1), ni = nt * 2 + (e & 1);
                            const int isum =
                                FMT == FMT_Q6_K ? sc0[mi] * lo[e] + sc1[mi] * hi[e] : lo[e];
                            float a = fmaf(ws[mi] * dx[ni], isum_to_float<FMT>(isum),
                                           acc[j & 3][mt][nt][e]);
                            if (FMT == FMT_Q4_K || FMT == FMT_Q5_K) a = fmaf(wmn[mi], ax[ni], a);
                            acc[j & 3][mt][nt][e] = a;
                        }
                    }
                }
            }
        }
        __syncthreads();
    }

#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const u32 m = m0 + wm * 32u + mt * 16u + gq + ((e & 2) ? 8u : 0u);
                const u32 r = wn * 16u + nt * 8u + tq * 2u + (e & 1);
                if (m < M && r < tl.rows)
                    y[(u64)map_row(y_rows, tl.row0 + r) * M + m] =
                        canon_tree(acc[0][mt][nt][e], acc[1][mt][nt][e], acc[2][mt][nt][e],
                                   acc[3][mt][nt][e]);
            }
}

// ------------------------------------------------------------------------------------------
// Q8_0 with K % 256 == 0: the tile, warps, fragments and epilogue of gemm_mma_body, fed by
// cp.async instead of registers. A chunk of 8 blocks of a weight row is 8 * 34 = 272
// contiguous bytes at a 16-byte aligned offset (row_bytes = 34 * nb, nb % 8 == 0), so it is
// copied into shared memory as stored, with no decode pass: block j's scale at byte 34j, its
// codes at 34j + 2 (4-byte aligned for odd j; for even j each fragment word is two aligned
// words funnel-shifted). Activation codes and scales are copied the same way; Q8A_STAGES
// chunks are in flight while one is multiplied.

#define Q8A_STAGES 3u
#define Q8A_ROW 272u                                   // bytes per row and chunk, W and X
#define Q8A_STAGE_BYTES (2u * TILE * Q8A_ROW + TILE * 8u * 4u)  // W, X codes, X scales
#define Q8A_SMEM (Q8A_STAGES * Q8A_STAGE_BYTES)

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, u32 bytes) {
    const u32 dst = (u32)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(gmem),
                 "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N));
}

// The 4 code bytes at `off` of a raw Q8_0 chunk row in shared memory; `off` is 2 mod 4 when
// `odd` is false (a compile-time fact of the block index), 0 mod 4 otherwise.
template <bool ODD>
__device__ __forceinline__ int q8a_word(const u8* row, u32 off) {
    if (ODD) return *reinterpret_cast<const int*>(row + off);
    const u32 lo = *reinterpret_cast<const u32*>(row + off - 2u);
    const u32 hi = *reinterpret_cast<const u32*>(row + off + 2u);
    return (int)__funnelshift_r(lo, hi, 16);
}

extern "C" __global__ void __launch_bounds__(256, 2)
    gemm_mma_q8_0_async(float* __restrict__ y, const float* __restrict__ x,
                        const signed char* __restrict__ xq, const float* __restrict__ xd,
                        const float* __restrict__ xa, const u8* __restrict__ W,
                        const u32* __restrict__ tiles, const u32* __restrict__ x_rows,
                        const u32* __restrict__ y_rows, u32 n_rows, u32 M, u32 K,
                        u64 row_bytes, u32 tile0) {
    bx_grid_begin();
    extern __shared__ __align__(16) u8 q8a_smem[];
    const u32 tid = threadIdx.x;
    const u32 warp = tid >> 5, lane = tid & 31u;
    const u32 gq = lane >> 2, tq = lane & 3u;
    const u32 wm = warp & 1u, wn = warp >> 1;
    const Tile tl = get_tile(tiles, tile0 + blockIdx.y, TILE, n_rows);
    if (tl.rows == 0u) return;  // a padding tile of a device-built table (block-uniform)
    const u32 m0 = blockIdx.x * TILE;
    const u32 nb = K / DOT_BLOCK, nchunks = nb / 8u;

    // This thread's copies of a chunk: W 64 rows x 17 pieces, X 64 rows x 16 pieces, X scales
    // 64 rows x 2 pieces (16 bytes each). Out-of-range rows copy 0 bytes (zero fill).
    const auto load = [&](u32 c, u32 stage) {
        u8* sw = q8a_smem + stage * Q8A_STAGE_BYTES;
        u8* sx = sw + TILE * Q8A_ROW;
        u8* sd = sx + TILE * Q8A_ROW;
        for (u32 i = tid; i < TILE * 17u; i += 256u) {
            const u32 r = i / 17u, part = i % 17u;
            const bool ok = m0 + r < M;
            const u8* src = ok ? W + ((u64)tl.expert * M + m0 + r) * row_bytes + c * Q8A_ROW + part * 16u : W;
            cp_async16(sw + r * Q8A_ROW + part * 16u, src, ok ? 16u : 0u);
        }
#pragma unroll
        for (u32 s = 0; s < 4u; ++s) {
            const u32 i = tid + s * 256u;
            const u32 r = i >> 4, part = i & 15u;
            const bool ok = r < tl.rows;
            const signed char* src =
                ok ? xq + (u64)map_row(x_rows, tl.row0 + r) * K + c * 256u + part * 16u : xq;
            cp_async16(sx + r * Q8A_ROW + part * 16u, src, ok ? 16u : 0u);
        }
        if (tid < TILE * 2u) {
            const u32 r = tid >> 1, part = tid & 1u;
            const bool ok = r < tl.rows;
            const float* src = ok ? xd + (u64)map_row(x_rows, tl.row0 + r) * nb + c * 8u + part * 4u : xd;
            cp_async16(sd + tid * 16u, src, ok ? 16u : 0u);
        }
    };

    float acc[4][2][2][4];
#pragma unroll
    for (int p = 0; p < 4; ++p)
#pragma unroll
        for (int a = 0; a < 2; ++a)
#pragma unroll
            for (int b = 0; b < 2; ++b)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[p][a][b][e] = 0.0f;

    const bool busy0 = wn * 16u < tl.rows, busy1 = wn * 16u + 8u < tl.rows;
#pragma unroll
    for (u32 s = 0; s < Q8A_STAGES - 1u; ++s) {
        if (s < nchunks) load(s, s);
        cp_async_commit();
    }
    for (u32 c = 0; c < nchunks; ++c) {
        cp_async_wait<Q8A_STAGES - 2u>();
        __syncthreads();  // chunk c is in; every warp is done with chunk c - 1's stage
        if (c + Q8A_STAGES - 1u < nchunks) load(c + Q8A_STAGES - 1u, (c + Q8A_STAGES - 1u) % Q8A_STAGES);
        cp_async_commit();
        if (!busy0) continue;
        const u8* sw = q8a_smem + (c % Q8A_STAGES) * Q8A_STAGE_BYTES;
        const u8* sx = sw + TILE * Q8A_ROW;
        const float* sd = reinterpret_cast<const float*>(sx + TILE * Q8A_ROW);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            int af[2][4], bf[2][2];
            float ws[4], dx[4];
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
                const u32 r = wm * 32u + mt * 16u + gq;
                const u32 off = (u32)j * 34u + 2u + tq * 4u;
                const u8* r0 = sw + r * Q8A_ROW;
                const u8* r8 = sw + (r + 8u) * Q8A_ROW;
                if (j & 1) {
                    af[mt][0] = q8a_word<true>(r0, off);
                    af[mt][1] = q8a_word<true>(r8, off);
                    af[mt][2] = q8a_word<true>(r0, off + 16u);
                    af[mt][3] = q8a_word<true>(r8, off + 16u);
                } else {
                    af[mt][0] = q8a_word<false>(r0, off);
                    af[mt][1] = q8a_word<false>(r8, off);
                    af[mt][2] = q8a_word<false>(r0, off + 16u);
                    af[mt][3] = q8a_word<false>(r8, off + 16u);
                }
            }
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) {
                const u8* base = sx + (wn * 16u + nt * 8u + gq) * Q8A_ROW + j * 32 + tq * 4u;
                bf[nt][0] = *reinterpret_cast<const int*>(base);
                bf[nt][1] = *reinterpret_cast<const int*>(base + 16);
            }
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const u32 mr = wm * 32u + (i >> 1) * 16u + gq + ((i & 1) ? 8u : 0u);
                const u32 nr = wn * 16u + (i >> 1) * 8u + tq * 2u + (i & 1);
                ws[i] = f16_to_f32(ld_u16(sw + mr * Q8A_ROW + (u32)j * 34u));
                dx[i] = sd[nr * 8u + j];
            }
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
                for (int nt = 0; nt < 2; ++nt) {
                    if (nt == 1 && !busy1) continue;
                    int lo[4] = {0, 0, 0, 0};
                    mma_k32(lo, af[mt], bf[nt][0], bf[nt][1]);
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int mi = mt * 2 + (e >> 1), ni = nt * 2 + (e & 1);
                        acc[j & 3][mt][nt][e] = fmaf(ws[mi] * dx[ni],
                                                     isum_to_float<FMT_Q8_0>(lo[e]),
                                                     acc[j & 3][mt][nt][e]);
                    }
                }
            }
        }
    }
    cp_async_wait<0>();

#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const u32 m = m0 + wm * 32u + mt * 16u + gq + ((e & 2) ? 8u : 0u);
                const u32 r = wn * 16u + nt * 8u + tq * 2u + (e & 1);
                if (m < M && r < tl.rows)
                    y[(u64)map_row(y_rows, tl.row0 + r) * M + m] =
                        canon_tree(acc[0][mt][nt][e], acc[1][mt][nt][e], acc[2][mt][nt][e],
                                   acc[3][mt][nt][e]);
            }
}

// ------------------------------------------------------------------------------------------
// Q4_K and Q5_K through cp.async: a 256-wide chunk of a row is one super-block (144 or 176
// contiguous bytes, 16-byte aligned), copied raw like the Q8_0 chunks. After each chunk lands,
// the block's 64 x 8 scale products (ws = d * sc, wm = -(dmin * m), each rounded once, as
// decode_wblock forms them) go to shared memory once; fragment words are the nibbles of one
// aligned word (and, for Q5_K, the fifth bits of another), so no decode pass stages codes.

#define KQA_STAGES 3u
#define KQA_X_BYTES (TILE * Q8A_ROW + 2u * TILE * 8u * 4u)  // codes, then d and a per block

template <int FMT>
struct KqaShape {
    static constexpr u32 SB = FMT == FMT_Q5_K ? 176u : 144u;  // super-block bytes
    static constexpr u32 QS = FMT == FMT_Q5_K ? 48u : 16u;    // offset of the 4-bit codes
    static constexpr u32 STAGE = TILE * SB + KQA_X_BYTES;
    static constexpr u32 SMEM = KQA_STAGES * STAGE;
};

template <int FMT>
__device__ __forceinline__ void gemm_mma_kq_async_body(
    float* __restrict__ y, const signed char* __restrict__ xq, const float* __restrict__ xd,
    const float* __restrict__ xa, const u8* __restrict__ W, const u32* __restrict__ tiles,
    const u32* __restrict__ x_rows, const u32* __restrict__ y_rows, u32 n_rows, u32 M, u32 K,
    u64 row_bytes, u32 tile0) {
    typedef KqaShape<FMT> S;
    extern __shared__ __align__(16) u8 kqa_smem[];
    __shared__ float sWs[TILE][8], sWm[TILE][8];
    const u32 tid = threadIdx.x;
    const u32 warp = tid >> 5, lane = tid & 31u;
    const u32 gq = lane >> 2, tq = lane & 3u;
    const u32 wm = warp & 1u, wn = warp >> 1;
    const Tile tl = get_tile(tiles, tile0 + blockIdx.y, TILE, n_rows);
    if (tl.rows == 0u) return;  // a padding tile of a device-built table (block-uniform)
    const u32 m0 = blockIdx.x * TILE;
    const u32 nb = K / DOT_BLOCK, nchunks = nb / 8u;

    const auto load = [&](u32 c, u32 stage) {
        u8* sw = kqa_smem + stage * S::STAGE;
        u8* sx = sw + TILE * S::SB;
        u8* sd = sx + TILE * Q8A_ROW;
        const u32 per_row = S::SB / 16u;
        for (u32 i = tid; i < TILE * per_row; i += 256u) {
            const u32 r = i / per_row, part = i % per_row;
            const bool ok = m0 + r < M;
            const u8* src = ok ? W + ((u64)tl.expert * M + m0 + r) * row_bytes + (u64)c * S::SB + part * 16u : W;
            cp_async16(sw + r * S::SB + part * 16u, src, ok ? 16u : 0u);
        }
#pragma unroll
        for (u32 s = 0; s < 4u; ++s) {
            const u32 i = tid + s * 256u;
            const u32 r = i >> 4, part = i & 15u;
            const bool ok = r < tl.rows;
            const signed char* src =
                ok ? xq + (u64)map_row(x_rows, tl.row0 + r) * K + c * 256u + part * 16u : xq;
            cp_async16(sx + r * Q8A_ROW + part * 16u, src, ok ? 16u : 0u);
        }
        {
            // tid < 128: d of row tid >> 1, half tid & 1; tid >= 128: a, the same way.
            const u32 t = tid & 127u, r = t >> 1, part = t & 1u;
            const bool ok = r < tl.rows;
            const float* base = tid < 128u ? xd : xa;
            const float* src = ok ? base + (u64)map_row(x_rows, tl.row0 + r) * nb + c * 8u + part * 4u : base;
            cp_async16(sd + (tid < 128u ? 0u : TILE * 8u * 4u) + t * 16u, src, ok ? 16u : 0u);
        }
    };

    float acc[4][2][2][4];
#pragma unroll
    for (int p = 0; p < 4; ++p)
#pragma unroll
        for (int a = 0; a < 2; ++a)
#pragma unroll
            for (int b = 0; b < 2; ++b)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[p][a][b][e] = 0.0f;

    const bool busy0 = wn * 16u < tl.rows, busy1 = wn * 16u + 8u < tl.rows;
#pragma unroll
    for (u32 s = 0; s < KQA_STAGES - 1u; ++s) {
        if (s < nchunks) load(s, s);
        cp_async_commit();
    }
    for (u32 c = 0; c < nchunks; ++c) {
        cp_async_wait<KQA_STAGES - 2u>();
        __syncthreads();  // chunk c is in; every warp is done with chunk c - 1 and its scales
        if (c + KQA_STAGES - 1u < nchunks) load(c + KQA_STAGES - 1u, (c + KQA_STAGES - 1u) % KQA_STAGES);
        cp_async_commit();
        const u8* sw = kqa_smem + (c % KQA_STAGES) * S::STAGE;
        const u8* sx = sw + TILE * S::SB;
        const float* sd = reinterpret_cast<const float*>(sx + TILE * Q8A_ROW);
        const float* sa = sd + TILE * 8u;
#pragma unroll
        for (u32 s = 0; s < 2u; ++s) {
            const u32 pair = tid + s * 256u;
            const u32 r = pair >> 3, j = pair & 7u;
            const u8* sb = sw + r * S::SB;
            int sc, mn;
            scale_min_k4((int)j, sb + 4, sc, mn);
            sWs[r][j] = f16_to_f32(ld_u16(sb)) * (float)sc;
            sWm[r][j] = -(f16_to_f32(ld_u16(sb + 2)) * (float)mn);
        }
        __syncthreads();
        if (!busy0) continue;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            int af[2][4], bf[2][2];
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
                const u32 r = wm * 32u + mt * 16u + gq;
#pragma unroll
                for (int h = 0; h < 4; ++h) {
                    const u32 rr = r + ((h & 1) ? 8u : 0u);
                    const u32 e = tq * 4u + ((h & 2) ? 16u : 0u);  // element of the block
                    const u8* sb = sw + rr * S::SB;
                    u32 v = (*reinterpret_cast<const u32*>(sb + S::QS + 32u * (j >> 1) + e) >> (4 * (j & 1))) &
                            0x0F0F0F0Fu;
                    if (FMT == FMT_Q5_K)
                        v |= ((*reinterpret_cast<const u32*>(sb + 16u + e) >> j) & 0x01010101u) << 4;
                    af[mt][h] = (int)v;
                }
            }
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) {
                const u8* base = sx + (wn * 16u + nt * 8u + gq) * Q8A_ROW + j * 32 + tq * 4u;
                bf[nt][0] = *reinterpret_cast<const int*>(base);
                bf[nt][1] = *reinterpret_cast<const int*>(base + 16);
            }
            float ws[4], wmn[4], dx[4], ax[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const u32 mr = wm * 32u + (i >> 1) * 16u + gq + ((i & 1) ? 8u : 0u);
                const u32 nr = wn * 16u + (i >> 1) * 8u + tq * 2u + (i & 1);
                ws[i] = sWs[mr][j];
                wmn[i] = sWm[mr][j];
                dx[i] = sd[nr * 8u + j];
                ax[i] = sa[nr * 8u + j];
            }
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
                for (int nt = 0; nt < 2; ++nt) {
                    if (nt == 1 && !busy1) continue;
                    int lo[4] = {0, 0, 0, 0};
                    mma_k32(lo, af[mt], bf[nt][0], bf[nt][1]);
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int mi = mt * 2 + (e >> 1), ni = nt * 2 + (e & 1);
                        float a = fmaf(ws[mi] * dx[ni], isum_to_float<FMT>(lo[e]), acc[j & 3][mt][nt][e]);
                        acc[j & 3][mt][nt][e] = fmaf(wmn[mi], ax[ni], a);
                    }
                }
            }
        }
    }
    cp_async_wait<0>();

#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const u32 m = m0 + wm * 32u + mt * 16u + gq + ((e & 2) ? 8u : 0u);
                const u32 r = wn * 16u + nt * 8u + tq * 2u + (e & 1);
                if (m < M && r < tl.rows)
                    y[(u64)map_row(y_rows, tl.row0 + r) * M + m] =
                        canon_tree(acc[0][mt][nt][e], acc[1][mt][nt][e], acc[2][mt][nt][e],
                                   acc[3][mt][nt][e]);
            }
}

#define KQA_ENTRY(fmt, FMT)                                                                    \
    extern "C" __global__ void __launch_bounds__(256, 2)                                       \
        gemm_mma_##fmt##_async(float* __restrict__ y, const float* __restrict__ x,             \
                               const signed char* __restrict__ xq,                             \
                               const float* __restrict__ xd, const float* __restrict__ xa,     \
                               const u8* __restrict__ W, const u32* __restrict__ tiles,        \
                               const u32* __restrict__ x_rows, const u32* __restrict__ y_rows, \
                               u32 n_rows, u32 M, u32 K, u64 row_bytes, u32 tile0) {           \
        bx_grid_begin();                                                                       \
        gemm_mma_kq_async_body<FMT>(y, xq, xd, xa, W, tiles, x_rows, y_rows, n_rows, M, K,     \
                                    row_bytes, tile0);                                         \
    }

KQA_ENTRY(q4_k, FMT_Q4_K)
KQA_ENTRY(q5_k, FMT_Q5_K)

// ------------------------------------------------------------------------------------------
// Routing tables built on the device from the router's ids [len = n * k] (a decode step queues
// its MoE products without a host round trip). Two packed tables in RoutedRows' layout
// (x_rows | experts | y_rows | gemm tiles | gemv tiles), rows in (token, slot) order, one row
// per tile: `up` reads token r / k, `down` reads routed row r; both write row r. The router
// never returns an id >= n_experts; the clamp only keeps a broken table inside the weights.

extern "C" __global__ void route_rows(u32* __restrict__ up, u32* __restrict__ down,
                                      const u32* __restrict__ ids, u32 len, u32 k,
                                      u32 n_experts) {
    bx_grid_begin();
    const u32 r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= len) return;
    const u32 e = min(ids[r], n_experts - 1u);
    u32* tabs[2] = {up, down};
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        u32* t = tabs[i];
        t[r] = i == 0 ? r / k : r;
        t[len + r] = e;
        t[2u * len + r] = r;
        t[3u * len + 3u * r] = e;
        t[3u * len + 3u * r + 1u] = r;
        t[3u * len + 3u * r + 2u] = 1u;
        t[6u * len + 3u * r] = e;
        t[6u * len + 3u * r + 1u] = r;
        t[6u * len + 3u * r + 2u] = 1u;
    }
}

// Sorted routing tables built on the device (a prefill's MoE block, no host round trip): the
// rows of every expert together, in (token, slot) order within an expert, cut into tiles of at
// most 64 (GEMM) and 8 (GEMV) rows. Two kernels, one block per expert e:
//   route_count  counts[e] = routed rows with id e (an integer sum: any order);
//   route_sort   its rows' place = the rows of lower experts, its tiles' place = their tiles;
//                a stable compaction in row order writes x_rows (up: r / k; down: r), experts,
//                y_rows (r) and the tiles; block 0 fills the tile tables past the last tile
//                with empty tiles (rows 0), which the products skip. The host sizes those
//                tables for the most tiles any routing can need.
// Ids >= n_experts (which the router never writes) count as the last expert, as in route_rows.

#define ROUTE_THREADS 256u

__device__ __forceinline__ u32 route_id(const u32* __restrict__ ids, u32 r, u32 n_experts) {
    return min(ids[r], n_experts - 1u);
}

// The sum of v over the block (every thread gets it); integers, so the order is free.
__device__ __forceinline__ u32 route_block_sum(u32 v, u32* __restrict__ scratch) {
    v = __reduce_add_sync(0xffffffffu, v);
    const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31u;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    u32 t = 0;
    for (u32 w = 0; w < ROUTE_THREADS / 32u; ++w) t += scratch[w];
    return t;
}

extern "C" __global__ void __launch_bounds__(256)
    route_count(u32* __restrict__ counts, const u32* __restrict__ ids, u32 len, u32 n_experts) {
    bx_grid_begin();
    __shared__ u32 scratch[ROUTE_THREADS / 32u];
    const u32 e = blockIdx.x;
    u32 c = 0;
    for (u32 r = threadIdx.x; r < len; r += ROUTE_THREADS) c += route_id(ids, r, n_experts) == e;
    c = route_block_sum(c, scratch);
    if (threadIdx.x == 0) counts[e] = c;
}

extern "C" __global__ void __launch_bounds__(256)
    route_sort(u32* __restrict__ up, u32* __restrict__ down, const u32* __restrict__ counts,
               const u32* __restrict__ ids, u32 len, u32 k, u32 n_experts, u32 gemm_tiles,
               u32 gemv_tiles) {
    bx_grid_begin();
    __shared__ u32 scratch[ROUTE_THREADS / 32u];
    __shared__ u32 warp_hits[ROUTE_THREADS / 32u];
    const u32 e = blockIdx.x, tid = threadIdx.x, warp = tid >> 5, lane = tid & 31u;
    // Rows and tiles of the experts below e (and, for block 0, of all experts).
    u32 row0 = 0, gt0 = 0, vt0 = 0, gt_all = 0, vt_all = 0;
    for (u32 f = tid; f < n_experts; f += ROUTE_THREADS) {
        const u32 c = counts[f];
        const u32 g = (c + 63u) / 64u, v = (c + 7u) / 8u;
        if (f < e) {
            row0 += c;
            gt0 += g;
            vt0 += v;
        }
        gt_all += g;
        vt_all += v;
    }
    row0 = route_block_sum(row0, scratch);
    gt0 = route_block_sum(gt0, scratch);
    vt0 = route_block_sum(vt0, scratch);
    if (e == 0) {
        gt_all = route_block_sum(gt_all, scratch);
        vt_all = route_block_sum(vt_all, scratch);
    }
    u32* tabs[2] = {up, down};
    const u32 gt_at = 3u * len, vt_at = 3u * len + 3u * gemm_tiles;
    // The stable compaction: chunks of 256 rows in order; within a chunk, warps in order, lanes
    // in order.
    u32 placed = 0;
    for (u32 base = 0; base < len; base += ROUTE_THREADS) {
        const u32 r = base + tid;
        const bool hit = r < len && route_id(ids, r, n_experts) == e;
        const u32 ballot = __ballot_sync(0xffffffffu, hit);
        __syncthreads();
        if (lane == 0) warp_hits[warp] = __popc(ballot);
        __syncthreads();
        u32 before = placed;
        for (u32 w = 0; w < warp; ++w) before += warp_hits[w];
        if (hit) {
            const u32 at = row0 + before + __popc(ballot & ((1u << lane) - 1u));
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                tabs[i][at] = i == 0 ? r / k : r;
                tabs[i][len + at] = e;
                tabs[i][2u * len + at] = r;
            }
        }
        for (u32 w = 0; w < ROUTE_THREADS / 32u; ++w) placed += warp_hits[w];
    }
    // This expert's tiles.
    const u32 c = counts[e];
    for (u32 t = tid; t < (c + 63u) / 64u; t += ROUTE_THREADS) {
        const u32 rows = min(64u, c - 64u * t);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            u32* tl = tabs[i] + gt_at + 3u * (gt0 + t);
            tl[0] = e;
            tl[1] = row0 + 64u * t;
            tl[2] = rows;
        }
    }
    for (u32 t = tid; t < (c + 7u) / 8u; t += ROUTE_THREADS) {
        const u32 rows = min(8u, c - 8u * t);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            u32* tl = tabs[i] + vt_at + 3u * (vt0 + t);
            tl[0] = e;
            tl[1] = row0 + 8u * t;
            tl[2] = rows;
        }
    }
    if (e == 0) {
        for (u32 t = gt_all + tid; t < gemm_tiles; t += ROUTE_THREADS)
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 3; ++j) tabs[i][gt_at + 3u * t + j] = 0u;
        for (u32 t = vt_all + tid; t < gemv_tiles; t += ROUTE_THREADS)
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 3; ++j) tabs[i][vt_at + 3u * t + j] = 0u;
    }
}

// ------------------------------------------------------------------------------------------
// Entry points. Float formats read x (f32); quantized ones read xq/xd/xa (quantize.cu).

#define GEMV_ENTRY(name, FMT, NT)                                                              \
    extern "C" __global__ void __launch_bounds__(256)                                          \
        name(float* __restrict__ y, const float* __restrict__ x,                               \
             const signed char* __restrict__ xq, const float* __restrict__ xd,                 \
             const float* __restrict__ xa, const u8* __restrict__ W,                           \
             const u32* __restrict__ tiles, const u32* __restrict__ x_rows,                    \
             const u32* __restrict__ y_rows, u32 n_rows, u32 M, u32 K, u64 row_bytes,          \
             u32 tile0) {                                                                      \
        bx_grid_begin();                                                                       \
        gemv_body<FMT, NT>(y, x, xq, xd, xa, W, tiles, x_rows, y_rows, n_rows, M, K,           \
                           row_bytes, tile0);                                                  \
    }

#define GEMV_ALL_NT(fmt, FMT)              \
    GEMV_ENTRY(gemv_##fmt##_t1, FMT, 1)    \
    GEMV_ENTRY(gemv_##fmt##_t2, FMT, 2)    \
    GEMV_ENTRY(gemv_##fmt##_t4, FMT, 4)    \
    GEMV_ENTRY(gemv_##fmt##_t8, FMT, 8)

GEMV_ALL_NT(f32, FMT_F32)
GEMV_ALL_NT(f16, FMT_F16)
GEMV_ALL_NT(bf16, FMT_BF16)
GEMV_ALL_NT(q8_0, FMT_Q8_0)
GEMV_ALL_NT(q4_k, FMT_Q4_K)
GEMV_ALL_NT(q5_k, FMT_Q5_K)
GEMV_ALL_NT(q6_k, FMT_Q6_K)

// ------------------------------------------------------------------------------------------
// GEMV for tiles of one row (decode) with K % 256 == 0, Q8_0, Q4_K, Q5_K: a block is one warp
// and 8 consecutive weight rows of one expert; lane 4r + p runs the chain of partial p of row
// r. The 8 rows' 256-wide chunks (272, 144 or 176 bytes a row: 8 rows are contiguous bytes)
// and the activation chunk (256 codes, 8 scales, 8 sums) are copied raw into shared memory by
// cp.async, RING chunks in flight; in chunk c lane 4r + p applies the steps of blocks
// 8c + p and 8c + p + 4 of its row (partial p's blocks in increasing order, as the canonical
// order takes them). Nothing is decoded into an intermediate buffer and no lane idles.

template <int FMT>
struct GkaShape {
    static constexpr u32 CB = FMT == FMT_Q8_0 ? 272u : (FMT == FMT_Q5_K ? 176u : 144u);
    static constexpr u32 ROWS = 8u;
    static constexpr u32 W_BYTES = ROWS * CB;
    static constexpr u32 STAGE = W_BYTES + 256u + 2u * 32u;  // W, X codes, X scales, X sums
    // Chunks in flight, a ring (a Q8_0 stage holds twice the weight bytes of a Q4_K one).
    // Copying a whole row group at once was slower (fewer blocks fit an SM).
    static constexpr u32 RING = FMT == FMT_Q8_0 ? 4u : 6u;
};

template <int FMT>
__device__ __forceinline__ void gemv_kq_async_body(
    float* __restrict__ y, const signed char* __restrict__ xq, const float* __restrict__ xd,
    const float* __restrict__ xa, const u8* __restrict__ W, const u32* __restrict__ tiles,
    const u32* __restrict__ x_rows, const u32* __restrict__ y_rows, u32 n_rows, u32 M, u32 K,
    u64 row_bytes, u32 tile0) {
    typedef GkaShape<FMT> S;
    extern __shared__ __align__(16) u8 smem[];
    const u32 lane = threadIdx.x;
    const Tile tl = get_tile(tiles, tile0 + blockIdx.y, 1u, n_rows);
    if (tl.rows == 0u) return;  // a padding tile of a device-built table
    const u32 m0 = blockIdx.x * S::ROWS;
    const u32 nb = K / DOT_BLOCK, nchunks = nb / 8u;
    const u32 xr = map_row(x_rows, tl.row0);
    // Rows past M copy nothing (zero fill) and write nothing.
    const u32 rows_here = min(S::ROWS, M - m0);
    const u8* wbase = W + ((u64)tl.expert * M + m0) * row_bytes;

    const auto load = [&](u32 c, u32 stage) {
        u8* sw = smem + stage * S::STAGE;
        constexpr u32 per_row = S::CB / 16u;
        for (u32 i = lane; i < S::ROWS * per_row + 20u; i += 32u) {
            if (i < S::ROWS * per_row) {
                const u32 r = i / per_row, part = i % per_row;
                const bool ok = r < rows_here;
                const u8* src = ok ? wbase + r * row_bytes + (u64)c * S::CB + part * 16u : W;
                cp_async16(sw + r * S::CB + part * 16u, src, ok ? 16u : 0u);
            } else if (i < S::ROWS * per_row + 16u) {
                const u32 part = i - S::ROWS * per_row;
                cp_async16(sw + S::W_BYTES + part * 16u, xq + (u64)xr * K + c * 256u + part * 16u, 16u);
            } else {
                const u32 part = i - S::ROWS * per_row - 16u;  // 0, 1: scales; 2, 3: sums
                const bool sums = part >= 2u;
                if (!sums || FMT != FMT_Q8_0) {
                    const float* src = (sums ? xa : xd) + (u64)xr * nb + c * 8u + (part & 1u) * 4u;
                    cp_async16(sw + S::W_BYTES + 256u + part * 16u, src, 16u);
                }
            }
        }
    };

    const u32 r = lane >> 2, p = lane & 3u;
    float acc = 0.0f;
    // Chunk c's steps for lane 4r + p: blocks 8c + p and 8c + p + 4.
    const auto step = [&](const u8* sw) {
        const u8* row = sw + r * S::CB;
        const int4* sx = reinterpret_cast<const int4*>(sw + S::W_BYTES);
        const float* sd = reinterpret_cast<const float*>(sw + S::W_BYTES + 256u);
        const float* sa = sd + 8u;
#pragma unroll
        for (u32 h = 0; h < 2u; ++h) {
            const u32 j = p + 4u * h;
            const int4 x0 = sx[2u * j], x1 = sx[2u * j + 1u];
            const int xs[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
            int isum = 0;
            if (FMT == FMT_Q8_0) {
                const u32 off = j * 34u + 2u;  // 2 mod 4 for even j, 0 mod 4 for odd j
                const u32 sh = (off & 3u) * 8u;
                const u32* words = reinterpret_cast<const u32*>(row + (off & ~3u));
#pragma unroll
                for (int i = 0; i < 8; ++i)
                    isum = __dp4a((int)__funnelshift_r(words[i], words[i + 1], sh), xs[i], isum);
                const float d = f16_to_f32(ld_u16(row + j * 34u));
                acc = fmaf(d * sd[j], isum_to_float<FMT>(isum), acc);
            } else {
                constexpr u32 QS = FMT == FMT_Q5_K ? 48u : 16u;
                const u32* qs = reinterpret_cast<const u32*>(row + QS + 32u * (j >> 1));
                const u32* qh = reinterpret_cast<const u32*>(row + 16u);
                const u32 shift = 4u * (j & 1u);
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    u32 v = (qs[i] >> shift) & 0x0F0F0F0Fu;
                    if (FMT == FMT_Q5_K) v |= ((qh[i] >> j) & 0x01010101u) << 4;
                    isum = __dp4a((int)v, xs[i], isum);
                }
                int sc, mn;
                scale_min_k4((int)j, row + 4, sc, mn);
                const float ws = f16_to_f32(ld_u16(row)) * (float)sc;
                const float wm = -(f16_to_f32(ld_u16(row + 2)) * (float)mn);
                acc = fmaf(ws * sd[j], isum_to_float<FMT>(isum), acc);
                acc = fmaf(wm, sa[j], acc);
            }
        }
    };
    {
#pragma unroll
        for (u32 s = 0; s < S::RING - 1u; ++s) {
            if (s < nchunks) load(s, s);
            cp_async_commit();
        }
        for (u32 c = 0; c < nchunks; ++c) {
            cp_async_wait<S::RING - 2u>();
            __syncwarp();  // chunk c is in for every lane; all are done with chunk c - 1's stage
            if (c + S::RING - 1u < nchunks) load(c + S::RING - 1u, (c + S::RING - 1u) % S::RING);
            cp_async_commit();
            step(smem + (c % S::RING) * S::STAGE);
        }
    }
    cp_async_wait<0>();
    // Lanes 4r..4r+3 hold p0..p3 of row r.
    const u32 g = lane & ~3u;
    const float p0 = __shfl_sync(BX_FULL_MASK, acc, g), p1 = __shfl_sync(BX_FULL_MASK, acc, g | 1u);
    const float p2 = __shfl_sync(BX_FULL_MASK, acc, g | 2u), p3 = __shfl_sync(BX_FULL_MASK, acc, g | 3u);
    if (p == 0u && r < rows_here) y[(u64)map_row(y_rows, tl.row0) * M + m0 + r] = canon_tree(p0, p1, p2, p3);
}

#define GKA_ENTRY(fmt, FMT)                                                                    \
    extern "C" __global__ void __launch_bounds__(32)                                           \
        gemv_##fmt##_async(float* __restrict__ y, const float* __restrict__ x,                 \
                           const signed char* __restrict__ xq, const float* __restrict__ xd,   \
                           const float* __restrict__ xa, const u8* __restrict__ W,             \
                           const u32* __restrict__ tiles, const u32* __restrict__ x_rows,      \
                           const u32* __restrict__ y_rows, u32 n_rows, u32 M, u32 K,           \
                           u64 row_bytes, u32 tile0) {                                         \
        bx_grid_begin();                                                                       \
        gemv_kq_async_body<FMT>(y, xq, xd, xa, W, tiles, x_rows, y_rows, n_rows, M, K,         \
                                row_bytes, tile0);                                             \
    }

GKA_ENTRY(q8_0, FMT_Q8_0)
GKA_ENTRY(q4_k, FMT_Q4_K)
GKA_ENTRY(q5_k, FMT_Q5_K)

// ------------------------------------------------------------------------------------------
// Q8_0 GEMV for tiles of one row (decode) with K % 256 == 0 on the int8 tensor cores. The
// dp4a GEMVs spend ~40 instructions on a 34-byte block (loads, funnel shifts, 8 dp4a, the
// step): at 4 instructions a cycle an SM cannot keep up with its share of the copy rate (ncu:
// 1.3 TB/s). A block of 8 warps takes 16 weight rows; in each pass warp w copies chunk w (256
// wide: 16 x 272 contiguous bytes and the activation chunk) into shared memory by cp.async,
// and one mma.sync m16n8k32 per block forms the 16 rows' isums (every column of B holds the
// token's codes, so lane 4g + t finds row g's isum in c0 and row g + 8's in c2). Lane t keeps
// the steps' operands (d * dx, isum) of blocks t and t + 4; then 64 threads, row r partial p,
// run the chains over the pass's blocks in increasing order, as the canonical order takes
// them. The loads of a pass are one round trip spread over 8 warps; a warp alone walking its
// 16 rows' chunks one after the other took 12 us for a 512 x 2048 product.

#define GMQ_ROWS 16u
#define GMQ_WARPS 8u
#define GMQ_CHUNK_BYTES (GMQ_ROWS * 272u + 256u + 32u)  // W, X codes, X scales
#define GMQ_PASS_BLOCKS (GMQ_WARPS * 8u)                // 32-blocks per pass
#define GMQ_SMEM (GMQ_WARPS * GMQ_CHUNK_BYTES + GMQ_ROWS * GMQ_PASS_BLOCKS * 8u)

extern "C" __global__ void __launch_bounds__(256)
    gemv_q8_0_mma(float* __restrict__ y, const float* __restrict__ x,
                  const signed char* __restrict__ xq, const float* __restrict__ xd,
                  const float* __restrict__ xa, const u8* __restrict__ W,
                  const u32* __restrict__ tiles, const u32* __restrict__ x_rows,
                  const u32* __restrict__ y_rows, u32 n_rows, u32 M, u32 K, u64 row_bytes,
                  u32 tile0) {
    bx_grid_begin();
    extern __shared__ __align__(16) u8 gmq_smem[];
    // (d * dx, isum) of [row][block of the pass]
    float2* sstep = reinterpret_cast<float2*>(gmq_smem + GMQ_WARPS * GMQ_CHUNK_BYTES);
    const u32 tid = threadIdx.x, warp = tid >> 5, lane = tid & 31u;
    const Tile tl = get_tile(tiles, tile0 + blockIdx.y, 1u, n_rows);
    if (tl.rows == 0u) return;  // a padding tile of a device-built table (block-uniform)
    const u32 m0 = blockIdx.x * GMQ_ROWS;
    const u32 nb = K / DOT_BLOCK, nchunks = nb / 8u;
    const u32 xr = map_row(x_rows, tl.row0);
    const u32 rows_here = min(GMQ_ROWS, M - m0);  // rows past M copy nothing, write nothing
    const u8* wbase = W + ((u64)tl.expert * M + m0) * row_bytes;
    u8* sw = gmq_smem + warp * GMQ_CHUNK_BYTES;
    const u8* sx = sw + GMQ_ROWS * 272u;
    const float* sd = reinterpret_cast<const float*>(sx + 256u);
    const u32 g = lane >> 2, t = lane & 3u;
    const u32 cr = tid >> 2, cp = tid & 3u;  // chain threads (tid < 64): row cr, partial cp
    float acc = 0.0f;

    for (u32 c0 = 0; c0 < nchunks; c0 += GMQ_WARPS) {
        const u32 c = c0 + warp;  // this warp's chunk
        const u32 pass_blocks = min(GMQ_WARPS, nchunks - c0) * 8u;
        __syncthreads();  // the chains are done with the previous pass's steps
        if (c < nchunks) {
#pragma unroll
            for (u32 it = 0; it < (GMQ_ROWS * 17u + 18u + 31u) / 32u; ++it) {
                const u32 i = lane + 32u * it;
                if (i < GMQ_ROWS * 17u) {
                    const u32 r = i / 17u, part = i - r * 17u;
                    const bool ok = r < rows_here;
                    const u8* src = ok ? wbase + r * row_bytes + (u64)c * 272u + part * 16u : W;
                    cp_async16(sw + r * 272u + part * 16u, src, ok ? 16u : 0u);
                } else if (i < GMQ_ROWS * 17u + 16u) {
                    const u32 part = i - GMQ_ROWS * 17u;
                    cp_async16(sw + GMQ_ROWS * 272u + part * 16u, xq + (u64)xr * K + c * 256u + part * 16u, 16u);
                } else if (i < GMQ_ROWS * 17u + 18u) {
                    const u32 part = i - GMQ_ROWS * 17u - 16u;
                    cp_async16(sw + GMQ_ROWS * 272u + 256u + part * 16u, xd + (u64)xr * nb + c * 8u + part * 4u, 16u);
                }
            }
            cp_async_commit();
            cp_async_wait<0>();
            __syncwarp();
            const u8* r0 = sw + g * 272u;
            const u8* r1 = r0 + 8u * 272u;
            int is0[8], is1[8];
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const u32 off = (u32)j * 34u + 2u + t * 4u;
                int a[4];
                if (j & 1) {
                    a[0] = q8a_word<true>(r0, off);
                    a[1] = q8a_word<true>(r1, off);
                    a[2] = q8a_word<true>(r0, off + 16u);
                    a[3] = q8a_word<true>(r1, off + 16u);
                } else {
                    a[0] = q8a_word<false>(r0, off);
                    a[1] = q8a_word<false>(r1, off);
                    a[2] = q8a_word<false>(r0, off + 16u);
                    a[3] = q8a_word<false>(r1, off + 16u);
                }
                const int b0 = *reinterpret_cast<const int*>(sx + j * 32 + t * 4u);
                const int b1 = *reinterpret_cast<const int*>(sx + j * 32 + 16u + t * 4u);
                int cc[4] = {0, 0, 0, 0};
                mma_k32(cc, a, b0, b1);
                is0[j] = cc[0];
                is1[j] = cc[2];
            }
#pragma unroll
            for (u32 h = 0; h < 2u; ++h) {
                const u32 j = t + 4u * h;
                // Lane t's blocks t and t + 4: selects, not a run-time register index.
                const int i0 = t == 0u ? is0[4u * h] : t == 1u ? is0[4u * h + 1u] : t == 2u ? is0[4u * h + 2u] : is0[4u * h + 3u];
                const int i1 = t == 0u ? is1[4u * h] : t == 1u ? is1[4u * h + 1u] : t == 2u ? is1[4u * h + 2u] : is1[4u * h + 3u];
                const float dx = sd[j];
                const u32 bl = warp * 8u + j;  // block of the pass
                sstep[g * GMQ_PASS_BLOCKS + bl] =
                    make_float2(f16_to_f32(ld_u16(r0 + j * 34u)) * dx, isum_to_float<FMT_Q8_0>(i0));
                sstep[(g + 8u) * GMQ_PASS_BLOCKS + bl] =
                    make_float2(f16_to_f32(ld_u16(r1 + j * 34u)) * dx, isum_to_float<FMT_Q8_0>(i1));
            }
        }
        __syncthreads();
        if (tid < 4u * GMQ_ROWS) {
            const float2* st = sstep + cr * GMQ_PASS_BLOCKS;
#pragma unroll 4
            for (u32 bl = cp; bl < pass_blocks; bl += 4u) acc = fmaf(st[bl].x, st[bl].y, acc);
        }
    }
    if (tid < 4u * GMQ_ROWS) {
        const u32 q = lane & ~3u;
        const float p0 = __shfl_sync(BX_FULL_MASK, acc, q), p1 = __shfl_sync(BX_FULL_MASK, acc, q | 1u);
        const float p2 = __shfl_sync(BX_FULL_MASK, acc, q | 2u), p3 = __shfl_sync(BX_FULL_MASK, acc, q | 3u);
        if (cp == 0u && cr < rows_here) y[(u64)map_row(y_rows, tl.row0) * M + m0 + cr] = canon_tree(p0, p1, p2, p3);
    }
}


#define FFMA_ENTRY(fmt, FMT)                                                                   \
    extern "C" __global__ void __launch_bounds__(256)                                          \
        gemm_ffma_##fmt(float* __restrict__ y, const float* __restrict__ x,                    \
                        const signed char* __restrict__ xq, const float* __restrict__ xd,      \
                        const float* __restrict__ xa, const u8* __restrict__ W,                \
                        const u32* __restrict__ tiles, const u32* __restrict__ x_rows,         \
                        const u32* __restrict__ y_rows, u32 n_rows, u32 M, u32 K,              \
                        u64 row_bytes, u32 tile0) {                                            \
        bx_grid_begin();                                                                       \
        gemm_ffma_body<FMT>(y, x, W, tiles, x_rows, y_rows, n_rows, M, K, row_bytes, tile0);   \
    }

FFMA_ENTRY(f32, FMT_F32)
FFMA_ENTRY(f16, FMT_F16)
FFMA_ENTRY(bf16, FMT_BF16)

// MINB blocks per SM. Q8_0 takes 2 (128 registers, a small spill): 14% faster on the grouped
// MoE products than 1 (ncu: one block of 8 warps per SM, 20% issue slots busy); the K-quants
// spill more and stay at 1 (Q4_K dense 7% slower with 2). Measured A/B on the H200.
#define MMA_ENTRY(fmt, FMT, MINB)                                                              \
    extern "C" __global__ void __launch_bounds__(256, MINB)                                    \
        gemm_mma_##fmt(float* __restrict__ y, const float* __restrict__ x,                     \
                       const signed char* __restrict__ xq, const float* __restrict__ xd,       \
                       const float* __restrict__ xa, const u8* __restrict__ W,                 \
                       const u32* __restrict__ tiles, const u32* __restrict__ x_rows,          \
                       const u32* __restrict__ y_rows, u32 n_rows, u32 M, u32 K,               \
                       u64 row_bytes, u32 tile0) {                                             \
        bx_grid_begin();                                                                       \
        gemm_mma_body<FMT>(y, xq, xd, xa, W, tiles, x_rows, y_rows, n_rows, M, K, row_bytes,  \
                           tile0);                                                             \
    }

MMA_ENTRY(q8_0, FMT_Q8_0, 2)
MMA_ENTRY(q4_k, FMT_Q4_K, 1)
MMA_ENTRY(q5_k, FMT_Q5_K, 1)
MMA_ENTRY(q6_k, FMT_Q6_K, 1)
