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
//   Q6_K, Q3_K    p = fmaf(d * dx, (float)(sc_lo * isum_lo + sc_hi * isum_hi), p)
//   Q2_K          as Q6_K, then p = fmaf(-(dmin * dx), (float)(m_lo * sx_lo + m_hi * sx_hi), p),
//                 sx the sums of the activation codes over each 16-element half
//   Q4_0, Q5_0, IQ4_NL, IQ4_XS, MXFP4   as Q8_0 (IQ4_XS: d = d_super * (ls - 32), MXFP4:
//                 d = 2^(e - 128) with doubled e2m1 codes)
//   Q4_1, Q5_1    as Q4_K with ws = d, wm = m
//                 (these nine: the generic GEMV and GEMM only)
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
//   gemv_f32_wide                      v3, F32, tiles of one row: a block of
//                                      128 threads per row stages it in shared memory with
//                                      16-byte loads, 4 chain threads.
//   gemv_q8_0_mma                      v3, Q8_0, tiles of one row, K % 256 == 0, 16384 rows or
//                                      more (the LM head): the int8 tensor cores form 16
//                                      rows' isums a block at once, 8 warps per 16 rows, a
//                                      256-wide chunk each per pass (3.0 TB/s on 151936 x 2048
//                                      in ncu, gemv_body 2.6).
//   gemv_q6_k_mma                      the same for Q6_K (each row's super-block copied in its
//                                      aligned 224-byte window, an m16n8k16 per 16-element
//                                      sub-block): opt-in (MatmulKernel::GemvMma), not yet
//                                      measured against gemv_body (0.59 TB/s on the LM head).
//   gemv_q8_0_rows                     v4, Q8_0, tiles of one row, K % 256 == 0, more than 1024
//                                      columns and fewer than 16384 rows (attention, expert
//                                      gate/up): 2 rows a warp, segments of 64 blocks copied
//                                      by cp.async, lane per block, chains by shuffles.
//   gemv_<q8_0|q4_k|q5_k>_async        v3, tiles of one row (decode), K % 256 == 0: a block
//                                      of one warp takes 8 weight rows, lane 4r + p runs
//                                      partial p of row r; the rows' 256-wide chunks are
//                                      copied raw into shared memory by cp.async, several
//                                      chunks in flight (gemv_body's warp per row waited on
//                                      each row's loads: 1.3 TB/s). Q8_0 takes it for K <=
//                                      1024 only (the expert down product: 7.8 us against
//                                      gemv_body's 12.4); wider rows of fewer than 16384 take
//                                      gemv_q8_0_rows.
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
//   gemm_mma_q{4,5,6}_k_async          v3, the same for the K-quants (a chunk is one
//                                      super-block, copied raw by cp.async; scale products,
//                                      and Q6_K's codes, staged once per chunk), 16 warps as
//                                      two groups of two partials each (no spills).
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
// The formats of the generic kernels alone (gemv_<fmt>_t<NT>, gemm_mma_<fmt>), numbered as
// WeightFormat::ALL.
#define FMT_Q4_0 7
#define FMT_Q4_1 8
#define FMT_Q5_0 9
#define FMT_Q5_1 10
#define FMT_Q2_K 11
#define FMT_Q3_K 12
#define FMT_IQ4_NL 13
#define FMT_IQ4_XS 14
#define FMT_MXFP4 15

// A block's step (src/reference/gemm.rs): with a min term p = fma(wm, ax, p) after the scaled
// isum (Q4_K, Q5_K, Q4_1, Q5_1), or with two 16-element sub-block scales (Q6_K, Q3_K, Q2_K).
#define STEP_HAS_MIN(f) ((f) == FMT_Q4_K || (f) == FMT_Q5_K || (f) == FMT_Q4_1 || (f) == FMT_Q5_1)
#define STEP_TWO_SCALES(f) ((f) == FMT_Q6_K || (f) == FMT_Q3_K || (f) == FMT_Q2_K)
// Q2_K's second term: p = fma(-(dmin * dx), m_lo * sx_lo + m_hi * sx_hi, p), sx the sums of
// the activation codes over each half of the block.
#define STEP_Q2_MINS(f) ((f) == FMT_Q2_K)

#define DOT_BLOCK 32u

typedef unsigned char u8;
typedef unsigned short u16;

// The parameters of every product kernel (all but v1 and the routing kernels), declared once
// (build.rs makes the launch's ProductArgs of this list, field by field). x is read by the float
// formats, xq, xd and xa (the activations' codes, block scales and scaled sums) by the
// quantized ones; tiles, x_rows and y_rows are null for a dense product.
#define PRODUCT_PARAMS                                                                         \
    float* __restrict__ y, const float* __restrict__ x, const signed char* __restrict__ xq,    \
        const float* __restrict__ xd, const float* __restrict__ xa, const u8* __restrict__ W,  \
        const u32* __restrict__ tiles, const u32* __restrict__ x_rows,                         \
        const u32* __restrict__ y_rows, u32 n_rows, u32 M, u32 K, u64 row_bytes, u32 tile0

// ------------------------------------------------------------------------------------------
// The combination of the four partials is common.cuh's bx_tree4. The family's mutant
// (BITEXACT_MUTANT) changes its association there and in the two kernels that combine through
// shuffles or shared memory instead of calling it: gemv_body (left to right) and gemm_ffma_body
// ((p0 + p3) + (p2 + p1)): three sites, each a wrong tree.

// ------------------------------------------------------------------------------------------
// v1: one thread per output, f32 weights.

__device__ __forceinline__ float dot_f32_canonical(const float* __restrict__ x,
                                                   const float* __restrict__ w, u32 K) {
    float p0, p1, p2, p3;
    bx_dot_partials(x, w, K, p0, p1, p2, p3);
    return bx_tree4(p0, p1, p2, p3);
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
    float s2;  // Q4_K/Q5_K: wm = -(dmin * m);  Q2_K: dmin
    int sc0, sc1;  // Q6_K: the two 16-element sub-block scales
    int m0, m1;    // Q2_K: the two sub-block mins
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

// Little-endian u32 from any address (MXFP4's 17-byte blocks).
__device__ __forceinline__ u32 ld_u32_a1(const u8* p) {
    return (u32)p[0] | ((u32)p[1] << 8) | ((u32)p[2] << 16) | ((u32)p[3] << 24);
}

// Four int8 codes in one word, k increasing with the byte.
__device__ __forceinline__ int pack4(int a, int b, int c, int d) {
    return (int)((u32)(a & 0xff) | ((u32)(b & 0xff) << 8) | ((u32)(c & 0xff) << 16) |
                 ((u32)(d & 0xff) << 24));
}

// IQ4_NL's (and IQ4_XS's) non-linear grid, and MXFP4's e2m1 values doubled (src/quant).
#ifdef BITEXACT_TRIAL_KVALUE_PERM
// Trial (BITEXACT_CUDA_TRIAL=kvalue_perm, src/device.rs): each grid as four little-endian words
// of four int8 values, a code's value picked by two byte permutes and a select, in registers
// (ptxas puts the 16-byte arrays of the default below in local memory, a stack frame in every
// IQ4 and MXFP4 kernel). The same values: src/device.rs's test decodes these words.
#define BX_KV_IQ4NL_WORDS 0xbfad9881u, 0xf6eaddcfu, 0x26190d01u, 0x71594535u
#define BX_KV_MXFP4_WORDS 0x03020100u, 0x0c080604u, 0xfdfeff00u, 0xf4f8fafcu
__device__ __forceinline__ int kvalue_perm(u32 w0, u32 w1, u32 w2, u32 w3, u32 c) {
    const u32 lo = __byte_perm(w0, w1, c & 7u), hi = __byte_perm(w2, w3, c & 7u);
    return (int)(signed char)(((c & 8u) ? hi : lo) & 0xffu);
}
__device__ __forceinline__ int kvalue_iq4nl(u32 c) { return kvalue_perm(BX_KV_IQ4NL_WORDS, c); }
__device__ __forceinline__ int kvalue_mxfp4(u32 c) { return kvalue_perm(BX_KV_MXFP4_WORDS, c); }
#else
__device__ __forceinline__ int kvalue_iq4nl(u32 c) {
    const signed char v[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                               1,    13,   25,  38,  53,  69,  89,  113};
    return v[c & 15u];
}
__device__ __forceinline__ int kvalue_mxfp4(u32 c) {
    const signed char v[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
    return v[c & 15u];
}
#endif

// MXFP4's block scale: E8M0 e as 2^(e - 128), exact (subnormal below e = 2).
__device__ __forceinline__ float e8m0_half(u32 e) {
    return e < 2u ? __uint_as_float(0x00200000u << e) : __uint_as_float((e - 1u) << 23);
}

// The blocks of 32 whose 16 code bytes hold element l in the low nibble of byte l and element
// l + 16 in the high one (Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL, MXFP4; IQ4_XS's 32-blocks inside a
// 136-byte super-block), decoded as src/quant/kquants.rs decode_block does.
template <int FMT>
__device__ __forceinline__ void decode_block32(const u8* __restrict__ row, u32 b, WBlk& o) {
    const u8* blk;
    const u8* qs;
    u32 qh = 0;
    if (FMT == FMT_Q4_0 || FMT == FMT_IQ4_NL) {
        blk = row + 18u * b;
        qs = blk + 2;
        o.s1 = f16_to_f32(ld_u16(blk));
    } else if (FMT == FMT_Q4_1) {
        blk = row + 20u * b;
        qs = blk + 4;
        o.s1 = f16_to_f32(ld_u16(blk));
        o.s2 = f16_to_f32(ld_u16(blk + 2));
    } else if (FMT == FMT_Q5_0) {
        blk = row + 22u * b;
        qh = ld_u32_a2(blk + 2);
        qs = blk + 6;
        o.s1 = f16_to_f32(ld_u16(blk));
    } else if (FMT == FMT_Q5_1) {
        blk = row + 24u * b;
        qh = ld_u32(blk + 4);
        qs = blk + 8;
        o.s1 = f16_to_f32(ld_u16(blk));
        o.s2 = f16_to_f32(ld_u16(blk + 2));
    } else if (FMT == FMT_MXFP4) {
        blk = row + 17u * b;
        qs = blk + 1;
        o.s1 = e8m0_half(blk[0]);
    } else {  // FMT_IQ4_XS
        const u8* sb = row + 136u * (b >> 3);
        const u32 j = b & 7u;
        const u32 sh = ld_u16(sb + 2);
        const int ls = (int)(((sb[4 + j / 2u] >> (4u * (j & 1u))) & 0xFu) | (((sh >> (2u * j)) & 3u) << 4));
        o.s1 = f16_to_f32(ld_u16(sb)) * (float)(ls - 32);
        qs = sb + 8 + 16u * j;
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        // Elements 4i .. 4i + 3: low nibbles of bytes 4i.. (i < 4), high nibbles of 4(i - 4)..
        const u8* w = qs + 4 * (i & 3);
        const u32 word = FMT == FMT_MXFP4 ? ld_u32_a1(w)
                         : (FMT == FMT_Q4_1 || FMT == FMT_Q5_1 || FMT == FMT_IQ4_XS) ? ld_u32(w)
                                                                                     : ld_u32_a2(w);
        const u32 nib = (i < 4 ? word : word >> 4) & 0x0F0F0F0Fu;
        if (FMT == FMT_IQ4_NL || FMT == FMT_IQ4_XS || FMT == FMT_MXFP4) {
            int c[4];
#pragma unroll
            for (int t = 0; t < 4; ++t) {
                const u32 n = (nib >> (8 * t)) & 15u;
                c[t] = FMT == FMT_MXFP4 ? kvalue_mxfp4(n) : kvalue_iq4nl(n);
            }
            o.q[i] = pack4(c[0], c[1], c[2], c[3]);
        } else {
            u32 v = nib;
            if (FMT == FMT_Q5_0 || FMT == FMT_Q5_1) {
                const u32 h = (qh >> (4 * i)) & 15u;
                v |= ((h & 1u) | ((h & 2u) << 7) | ((h & 4u) << 14) | ((h & 8u) << 21)) << 4;
            }
            if (FMT == FMT_Q4_0) v = __vsub4(v, 0x08080808u);
            if (FMT == FMT_Q5_0) v = __vsub4(v, 0x10101010u);
            o.q[i] = (int)v;
        }
    }
}

// Block b of a Q3_K row (110-byte super-blocks of 256): codes (qs >> 2 (j % 4)) & 3, less 4
// where bit j of the element's hmask byte is clear; the sub-block scales of llama.cpp's kmask
// unpacking less 32 (src/quant/kquants.rs q3k_scales).
__device__ __forceinline__ void decode_q3_k(const u8* __restrict__ row, u32 b, WBlk& o) {
    const u8* sb = row + 110u * (b >> 3);
    const u32 j = b & 7u;
    const u8* qs = sb + 32 + 32u * (j / 4u);
    const u32 shift = 2u * (j & 3u);
    const u8* sc = sb + 96;
    int s[2];
#pragma unroll
    for (int t = 0; t < 2; ++t) {
        const u32 idx = 2u * j + (u32)t;
        const u32 low = idx < 8u ? sc[idx] & 0xFu : sc[idx - 8u] >> 4;
        const u32 high = (sc[8u + idx % 4u] >> (2u * (idx / 4u))) & 3u;
        s[t] = (int)(low | (high << 4)) - 32;
    }
    o.sc0 = s[0];
    o.sc1 = s[1];
    o.s1 = f16_to_f32(ld_u16(sb + 108));
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const u32 low = (ld_u32_a2(qs + 4 * i) >> shift) & 0x03030303u;
        const u32 hbit = (ld_u32_a2(sb + 4 * i) >> j) & 0x01010101u;
        o.q[i] = (int)__vsub4(low | (hbit << 2), 0x04040404u);
    }
}

// Block b of a Q2_K row (84-byte super-blocks of 256: 16 scale bytes, 64 code bytes, d, dmin):
// codes (qs[32 (j / 4) + l] >> 2 (j % 4)) & 3, the sub-block scales and mins the low and high
// nibbles of scale bytes 2j and 2j + 1 (src/quant/kquants.rs).
__device__ __forceinline__ void decode_q2_k(const u8* __restrict__ row, u32 b, WBlk& o) {
    const u8* sb = row + 84u * (b >> 3);
    const u32 j = b & 7u;
    const u8* qs = sb + 16 + 32u * (j / 4u);
    const u32 shift = 2u * (j & 3u);
    o.sc0 = sb[2u * j] & 0xF;
    o.m0 = sb[2u * j] >> 4;
    o.sc1 = sb[2u * j + 1u] & 0xF;
    o.m1 = sb[2u * j + 1u] >> 4;
    o.s1 = f16_to_f32(ld_u16(sb + 80));
    o.s2 = f16_to_f32(ld_u16(sb + 82));
#pragma unroll
    for (int i = 0; i < 8; ++i) o.q[i] = (int)((ld_u32(qs + 4 * i) >> shift) & 0x03030303u);
}

template <int FMT>
__device__ __forceinline__ WBlk decode_wblock(const u8* __restrict__ row, u32 b) {
    WBlk o;
    o.s2 = 0.0f;
    o.sc0 = o.sc1 = 0;
    o.m0 = o.m1 = 0;
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
    } else if (FMT == FMT_Q4_0 || FMT == FMT_Q4_1 || FMT == FMT_Q5_0 || FMT == FMT_Q5_1 ||
               FMT == FMT_IQ4_NL || FMT == FMT_MXFP4 || FMT == FMT_IQ4_XS) {
        decode_block32<FMT>(row, b, o);
    } else if (FMT == FMT_Q3_K) {
        decode_q3_k(row, b, o);
    } else if (FMT == FMT_Q2_K) {
        decode_q2_k(row, b, o);
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
// The int8 MMA GEMMs' epilogue (gemm_mma_body, gemm_mma_q8_0_async, gemm_mma_kq_async_body):
// accumulator (mt, nt, e) of a thread, in mma.sync m16n8's C fragment (groupID gq,
// threadID_in_group tq) of warp (wm, wn) of the 64 x 64 tile at feature m0, is output feature
// m of tile row r; the output is the tree of its four partials.

struct MmaOut {
    u32 m, r;
};

__device__ __forceinline__ MmaOut mma_out(u32 m0, u32 wm, u32 wn, u32 gq, u32 tq, int mt, int nt,
                                          int e) {
    MmaOut o;
    o.m = m0 + wm * 32u + mt * 16u + gq + ((e & 2) ? 8u : 0u);
    o.r = wn * 16u + nt * 8u + tq * 2u + (e & 1);
    return o;
}

__device__ __forceinline__ void mma_store(float* __restrict__ y, const u32* __restrict__ y_rows,
                                          const Tile& tl, u32 M, MmaOut o, float p0, float p1,
                                          float p2, float p3) {
    if (o.m < M && o.r < tl.rows)
        y[(u64)map_row(y_rows, tl.row0 + o.r) * M + o.m] = bx_tree4(p0, p1, p2, p3);
}

// Every output of a thread whose four partials it holds.
__device__ __forceinline__ void mma_epilogue(float* __restrict__ y, const u32* __restrict__ y_rows,
                                             const Tile& tl, u32 M, u32 m0, u32 wm, u32 wn,
                                             u32 gq, u32 tq, const float (&acc)[4][2][2][4]) {
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e)
                mma_store(y, y_rows, tl, M, mma_out(m0, wm, wn, gq, tq, mt, nt, e),
                          acc[0][mt][nt][e], acc[1][mt][nt][e], acc[2][mt][nt][e],
                          acc[3][mt][nt][e]);
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
#define GEMV_SMEM (GEMV_SEG_F * 33u)  // floats per warp; also >= GEMV_SEG_Q * 8 * 4
// Floats a (block, token) leaves for the chains: the scale product, the isum and the scaled
// activation sum; Q2_K: the scale product, the isum, -(dmin * dx) and the mins' sum.
#define GEMV_SLOTS(f) (STEP_Q2_MINS(f) ? 4u : 3u)

// The exact float value of an int below 2^22 in magnitude: its bits added to those of 1.5 * 2^23
// form that float plus the int, and the subtraction is exact. Two full-rate operations instead
// of a conversion.
__device__ __forceinline__ float small_int_to_float(int i) {
    return __int_as_float(0x4B400000 + i) - 12582912.0f;
}

// The tensor cores add the bias of small_int_to_float themselves: an mma accumulating from
// ISUM_BIAS (the bits of 1.5 * 2^23) leaves the bits of 1.5 * 2^23 + isum, exactly (an int32 sum
// far from overflow), and one subtraction gives the float of isum: the bits of
// small_int_to_float with one integer add a block fewer. gemm_mma_q8_0_async takes it (ptxas:
// 2437 -> 2309 instructions, no spills); in the v2 and K-quant kernels, already at their
// register limit, the four biased accumulators cost more spills than the adds they save.
#define ISUM_BIAS 0x4B400000
__device__ __forceinline__ float biased_isum_to_float(int b) {
    return __int_as_float(b) - 12582912.0f;
}

template <int FMT>
__device__ __forceinline__ float isum_to_float(int i) {
    // |isum| < 2^22 for Q8_0 (32 * 127 * 127), Q4_K and Q5_K (32 * 31 * 127), Q4_0 .. Q5_1,
    // IQ4 (32 * 127 * 127) and MXFP4; Q6_K's scaled sum reaches 2^24 and takes the conversion
    // instruction, as Q3_K's (below 2^20) does.
    return STEP_TWO_SCALES(FMT) ? __int2float_rn(i) : small_int_to_float(i);
}

template <int FMT, int NT>
__device__ __forceinline__ void gemv_body(PRODUCT_PARAMS) {
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
                    if (STEP_HAS_MIN(FMT)) s_wm[warp][bl] = w.s2;
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
                            const int isum = STEP_TWO_SCALES(FMT) ? w.sc0 * lo + w.sc1 * hi : lo + hi;
                            const float dx = __ldg(xd + (u64)xr * nb + b);
                            float* o = sa + (bl * NT + n) * GEMV_SLOTS(FMT);
                            o[0] = w.s1 * dx;
                            o[1] = isum_to_float<FMT>(isum);
                            if (STEP_HAS_MIN(FMT)) o[2] = __ldg(xa + (u64)xr * nb + b);
                            if (STEP_Q2_MINS(FMT)) {
                                int sl = 0, sh = 0;
                                sl = __dp4a(x0.x, 0x01010101, sl);
                                sl = __dp4a(x0.y, 0x01010101, sl);
                                sl = __dp4a(x0.z, 0x01010101, sl);
                                sl = __dp4a(x0.w, 0x01010101, sl);
                                sh = __dp4a(x1.x, 0x01010101, sh);
                                sh = __dp4a(x1.y, 0x01010101, sh);
                                sh = __dp4a(x1.z, 0x01010101, sh);
                                sh = __dp4a(x1.w, 0x01010101, sh);
                                o[2] = -(w.s2 * dx);
                                o[3] = small_int_to_float(w.m0 * sl + w.m1 * sh);
                            }
                        }
                    }
                }
            }
            __syncwarp();
            // Phase 2: the chains, block by block in order.
            if (chain) {
                for (u32 bl = p; bl < seg_blocks; bl += 4u) {
                    const float* o = sa + (bl * NT + cn) * GEMV_SLOTS(FMT);
                    acc = fmaf(o[0], o[1], acc);
                    if (STEP_HAS_MIN(FMT)) acc = fmaf(s_wm[warp][bl], o[2], acc);
                    if (STEP_Q2_MINS(FMT)) acc = fmaf(o[2], o[3], acc);
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
// F32 GEMV for tiles of one row (a router's product when router.cu's router_route_f32 does
// not take it, any F32 one-row product): one weight row per block of 128
// threads. The threads stage a 2048-wide segment of the row and of x in shared memory with
// 16-byte loads, all in flight at once; then threads 0..3 run partials 0..3 from there. The
// chains are 512 fmaf long at K = 2048 (the canonical order), so a block per row spreads the
// router's 128 rows over the SMs: 4 rows a block left 32 SMs waiting on loads (12.7 us for the
// 128 x 2048 router in ncu). Block b of a segment sits at 36b floats (the 4 chain threads read
// 4 different bank groups).

extern "C" __global__ void __launch_bounds__(128)
    gemv_f32_wide(PRODUCT_PARAMS) {
    bx_grid_begin();
    __shared__ __align__(16) float sw[BX_F32ROW_SEG / 32u * BX_F32ROW_PAD];
    __shared__ __align__(16) float sx[BX_F32ROW_SEG / 32u * BX_F32ROW_PAD];
    const u32 tid = threadIdx.x, m = blockIdx.x;
    const Tile tl = get_tile(tiles, tile0 + blockIdx.y, 1u, n_rows);
    if (tl.rows == 0u) return;  // a padding tile of a device-built table
    const float* xr = x + (u64)map_row(x_rows, tl.row0) * K;
    const float* wr = reinterpret_cast<const float*>(W + ((u64)tl.expert * M + m) * row_bytes);
    const float acc = bx_f32_row_partial<128u>(sw, sx, wr, xr, K, tid);
    if (tid < 32u) {
        const float p0 = __shfl_sync(BX_FULL_MASK, acc, 0), p1 = __shfl_sync(BX_FULL_MASK, acc, 1);
        const float p2 = __shfl_sync(BX_FULL_MASK, acc, 2), p3 = __shfl_sync(BX_FULL_MASK, acc, 3);
        if (tid == 0u) y[(u64)map_row(y_rows, tl.row0) * M + m] = bx_tree4(p0, p1, p2, p3);
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
    // Q2_K: the sub-block mins m0 | m1 << 16, and each activation half-block's code sum.
    __shared__ int sWmn[STEP_Q2_MINS(FMT) ? TILE : 1][8];
    __shared__ int sXs[STEP_Q2_MINS(FMT) ? TILE : 1][16];

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
    int st_sc[2], st_mn[2];
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
                st_mn[s] = w.m0 | (w.m1 << 16);
            } else {
#pragma unroll
                for (int i = 0; i < 8; ++i) st_wq[s][i] = 0;
                st_ws[s] = 0.0f;
                st_wm[s] = 0.0f;
                st_sc[s] = 0;
                st_mn[s] = 0;
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
            if (STEP_Q2_MINS(FMT)) sWmn[r][j] = st_mn[s];
            sXd[r][j] = st_xd[s];
            sXa[r][j] = st_xa[s];
        }
#pragma unroll
        for (u32 s = 0; s < 4u; ++s) {
            const u32 idx = tid + s * 256u;
            *reinterpret_cast<int4*>(sX + (idx >> 4) * MMA_STRIDE + (idx & 15u) * 16u) = st_x[s];
            if (STEP_Q2_MINS(FMT)) {
                int sum = 0;
                sum = __dp4a(st_x[s].x, 0x01010101, sum);
                sum = __dp4a(st_x[s].y, 0x01010101, sum);
                sum = __dp4a(st_x[s].z, 0x01010101, sum);
                sum = __dp4a(st_x[s].w, 0x01010101, sum);
                sXs[idx >> 4][idx & 15u] = sum;
            }
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
                int sc0[4], sc1[4], mn0[4], mn1[4], sxl[4], sxh[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const u32 mr = wm * 32u + (i >> 1) * 16u + gq + ((i & 1) ? 8u : 0u);
                    const u32 nr = wn * 16u + (i >> 1) * 8u + tq * 2u + (i & 1);
                    ws[i] = sWs[mr][j];
                    if (STEP_HAS_MIN(FMT)) {
                        wmn[i] = sWm[mr][j];
                        ax[i] = sXa[nr][j];
                    }
                    if (STEP_TWO_SCALES(FMT)) {
                        const int scp = sWsc[mr][j];
                        sc0[i] = (int)(short)(scp & 0xffff);
                        sc1[i] = scp >> 16;
                    }
                    if (STEP_Q2_MINS(FMT)) {
                        const int mp = sWmn[mr][j];
                        mn0[i] = mp & 0xffff;
                        mn1[i] = mp >> 16;
                        wmn[i] = sWm[mr][j];
                        sxl[i] = sXs[nr][2 * j];
                        sxh[i] = sXs[nr][2 * j + 1];
                    }
                    dx[i] = sXd[nr][j];
                }
#pragma unroll
                for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
                    for (int nt = 0; nt < 2; ++nt) {
                        if (nt == 1 && !busy1) continue;
                        int lo[4] = {0, 0, 0, 0}, hi[4] = {0, 0, 0, 0};
                        if (STEP_TWO_SCALES(FMT)) {
                            mma_k16(lo, af[mt][0], af[mt][1], bf[nt][0]);
                            mma_k16(hi, af[mt][2], af[mt][3], bf[nt][1]);
                        } else {
                            mma_k32(lo, af[mt], bf[nt][0], bf[nt][1]);
                        }
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            const int mi = mt * 2 + (e >> 1), ni = nt * 2 + (e & 1);
                            const int isum =
                                STEP_TWO_SCALES(FMT) ? sc0[mi] * lo[e] + sc1[mi] * hi[e] : lo[e];
                            float a = fmaf(ws[mi] * dx[ni], isum_to_float<FMT>(isum),
                                           acc[j & 3][mt][nt][e]);
                            if (STEP_HAS_MIN(FMT)) a = fmaf(wmn[mi], ax[ni], a);
                            if (STEP_Q2_MINS(FMT))
                                a = fmaf(-(wmn[mi] * dx[ni]),
                                         small_int_to_float(mn0[mi] * sxl[ni] + mn1[mi] * sxh[ni]),
                                         a);
                            acc[j & 3][mt][nt][e] = a;
                        }
                    }
                }
            }
        }
        __syncthreads();
    }

    mma_epilogue(y, y_rows, tl, M, m0, wm, wn, gq, tq, acc);
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
    gemm_mma_q8_0_async(PRODUCT_PARAMS) {
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
                    int lo[4] = {ISUM_BIAS, ISUM_BIAS, ISUM_BIAS, ISUM_BIAS};
                    mma_k32(lo, af[mt], bf[nt][0], bf[nt][1]);
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int mi = mt * 2 + (e >> 1), ni = nt * 2 + (e & 1);
                        acc[j & 3][mt][nt][e] = fmaf(ws[mi] * dx[ni],
                                                     biased_isum_to_float(lo[e]),
                                                     acc[j & 3][mt][nt][e]);
                    }
                }
            }
        }
    }
    cp_async_wait<0>();

    mma_epilogue(y, y_rows, tl, M, m0, wm, wn, gq, tq, acc);
}

// ------------------------------------------------------------------------------------------
// The K-quants through cp.async: a 256-wide chunk of a row is one super-block, copied raw.
//   Q4_K, Q5_K  144 / 176 contiguous, 16-byte aligned bytes (K % 256 == 0). After each chunk
//               lands, its 64 x 8 scale products (ws = d * sc, wm = -(dmin * m), each rounded
//               once, as decode_wblock forms them) go to shared memory once; fragment words are
//               the nibbles of one aligned word (and, for Q5_K, the fifth bits of another).
//   Q6_K        210 bytes at any even offset (210 = 2 mod 16, rows of 210 K / 256 bytes): the
//               16-byte aligned window of 224 bytes around it is copied (up to 14 bytes past
//               the matrix for its last super-block: the upload pads it), and a decode pass
//               writes the chunk's int8 codes (aligned, as gemm_mma_body stages them) and
//               sub-block scales to shared memory once.
// 512 threads: warps 8ks + w, ks in {0, 1}, w as gemm_mma_body's 8 warps (2 x 4, warp tile 32
// outputs x 16 rows). Warp group ks runs partials 2ks and 2ks + 1 of its tile (blocks j of a
// chunk with (j >> 1) & 1 == ks), 32 accumulators a thread instead of 64: the v3 kernel of
// 256 threads held all four and spilled 612 bytes at two blocks an SM. The groups meet once,
// at the end, through shared memory for the tree.

#define KQA_STAGES 3u
#define KQA_THREADS 512u
#define KQA_X_BYTES (TILE * Q8A_ROW + 2u * TILE * 8u * 4u)  // codes, then d and a per block
#define Q6A_WINDOW 224u                                     // 14 pieces of 16 bytes

// Where a Q6_K super-block at global address `at` sits in its 16-byte aligned window (even,
// 0..14): the window starts at at - q6_window_off(at).
__device__ __forceinline__ u32 q6_window_off(const u8* at) {
    return (u32)(reinterpret_cast<size_t>(at) & 15u);
}

template <int FMT>
struct KqaShape {
    static constexpr u32 SB = FMT == FMT_Q6_K ? 210u : FMT == FMT_Q5_K ? 176u : 144u;
    static constexpr u32 ROW = FMT == FMT_Q6_K ? Q6A_WINDOW : SB;  // staged bytes a row
    static constexpr u32 QS = FMT == FMT_Q5_K ? 48u : 16u;  // Q4_K/Q5_K: offset of the nibbles
    static constexpr u32 STAGE = TILE * ROW + KQA_X_BYTES;
    // Q6_K: the decoded codes after the stages (64 rows x 272 bytes).
    static constexpr u32 DEC = FMT == FMT_Q6_K ? TILE * Q8A_ROW : 0u;
    static constexpr u32 SMEM = KQA_STAGES * STAGE + DEC;
};

template <int FMT>
__device__ __forceinline__ void gemm_mma_kq_async_body(
    float* __restrict__ y, const signed char* __restrict__ xq, const float* __restrict__ xd,
    const float* __restrict__ xa, const u8* __restrict__ W, const u32* __restrict__ tiles,
    const u32* __restrict__ x_rows, const u32* __restrict__ y_rows, u32 n_rows, u32 M, u32 K,
    u64 row_bytes, u32 tile0) {
    typedef KqaShape<FMT> S;
    constexpr bool Q6 = FMT == FMT_Q6_K;
    extern __shared__ __align__(16) u8 kqa_smem[];
    __shared__ float sWs[TILE][8], sWm[TILE][8];
    __shared__ int sWsc[TILE][8];  // Q6_K: sc0 | sc1 << 16
    const u32 tid = threadIdx.x;
    const u32 warp = tid >> 5, lane = tid & 31u;
    const u32 gq = lane >> 2, tq = lane & 3u;
    const u32 ks = warp >> 3, wm = warp & 1u, wn = (warp & 7u) >> 1;
    const Tile tl = get_tile(tiles, tile0 + blockIdx.y, TILE, n_rows);
    if (tl.rows == 0u) return;  // a padding tile of a device-built table (block-uniform)
    const u32 m0 = blockIdx.x * TILE;
    const u32 nb = K / DOT_BLOCK, nchunks = nb / 8u;
    u8* dec = kqa_smem + KQA_STAGES * S::STAGE;  // Q6_K only

    const auto load = [&](u32 c, u32 stage) {
        u8* sw = kqa_smem + stage * S::STAGE;
        u8* sx = sw + TILE * S::ROW;
        u8* sd = sx + TILE * Q8A_ROW;
        const u32 per_row = S::ROW / 16u;
        for (u32 i = tid; i < TILE * per_row; i += KQA_THREADS) {
            const u32 r = i / per_row, part = i % per_row;
            const bool ok = m0 + r < M;
            const u8* at = W + ((u64)tl.expert * M + m0 + r) * row_bytes + (u64)c * S::SB;
            // Q6_K: the aligned window's piece (the last may reach 14 bytes past the super-
            // block: GpuMatrix::upload pads every matrix with 16 zero bytes).
            const u8* src = !ok ? W : Q6 ? at - q6_window_off(at) + part * 16u : at + part * 16u;
            cp_async16(sw + r * S::ROW + part * 16u, src, ok ? 16u : 0u);
        }
        for (u32 i = tid; i < TILE * 16u; i += KQA_THREADS) {
            const u32 r = i >> 4, part = i & 15u;
            const bool ok = r < tl.rows;
            const signed char* src =
                ok ? xq + (u64)map_row(x_rows, tl.row0 + r) * K + c * 256u + part * 16u : xq;
            cp_async16(sx + r * Q8A_ROW + part * 16u, src, ok ? 16u : 0u);
        }
        if (tid < 256u) {
            // tid < 128: d of row tid >> 1, half tid & 1; tid >= 128: a, the same way.
            const u32 t = tid & 127u, r = t >> 1, part = t & 1u;
            const bool ok = r < tl.rows;
            const float* base = tid < 128u ? xd : xa;
            const float* src = ok ? base + (u64)map_row(x_rows, tl.row0 + r) * nb + c * 8u + part * 4u : base;
            cp_async16(sd + (tid < 128u ? 0u : TILE * 8u * 4u) + t * 16u, src, ok ? 16u : 0u);
        }
    };

    // acc[q] is partial 2ks + q.
    float acc[2][2][2][4];
#pragma unroll
    for (int p = 0; p < 2; ++p)
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
        const u8* sx = sw + TILE * S::ROW;
        const float* sd = reinterpret_cast<const float*>(sx + TILE * Q8A_ROW);
        const float* sa = sd + TILE * 8u;
        {
            // One (row, block) pair a thread: its scale product(s), and for Q6_K its codes.
            const u32 r = tid >> 3, j = tid & 7u;
            if (Q6) {
                // decode_wblock itself, on the super-block where the window holds it.
                const u8* at = W + ((u64)tl.expert * M + m0 + r) * row_bytes + (u64)c * S::SB;
                const WBlk w = decode_wblock<FMT_Q6_K>(sw + r * S::ROW + q6_window_off(at), j);
                int* dst = reinterpret_cast<int*>(dec + r * Q8A_ROW + j * 32u);
#pragma unroll
                for (int i = 0; i < 8; ++i) dst[i] = w.q[i];
                sWs[r][j] = w.s1;
                sWsc[r][j] = (w.sc0 & 0xffff) | (w.sc1 << 16);
            } else {
                const u8* sb = sw + r * S::ROW;
                int sc, mn;
                scale_min_k4((int)j, sb + 4, sc, mn);
                sWs[r][j] = f16_to_f32(ld_u16(sb)) * (float)sc;
                sWm[r][j] = -(f16_to_f32(ld_u16(sb + 2)) * (float)mn);
            }
        }
        __syncthreads();
        if (!busy0) continue;
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) {
            const u32 j = (u32)(jj & 1) + 2u * ks + 4u * (u32)(jj >> 1);
            int af[2][4], bf[2][2];
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
                const u32 r = wm * 32u + mt * 16u + gq;
#pragma unroll
                for (int h = 0; h < 4; ++h) {
                    const u32 rr = r + ((h & 1) ? 8u : 0u);
                    const u32 e = tq * 4u + ((h & 2) ? 16u : 0u);  // element of the block
                    if (Q6) {
                        af[mt][h] = *reinterpret_cast<const int*>(dec + rr * Q8A_ROW + j * 32u + e);
                    } else {
                        const u8* sb = sw + rr * S::ROW;
                        u32 v = (*reinterpret_cast<const u32*>(sb + S::QS + 32u * (j >> 1) + e) >>
                                 (4u * (j & 1u))) &
                                0x0F0F0F0Fu;
                        if (FMT == FMT_Q5_K)
                            v |= ((*reinterpret_cast<const u32*>(sb + 16u + e) >> j) & 0x01010101u) << 4;
                        af[mt][h] = (int)v;
                    }
                }
            }
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) {
                const u8* base = sx + (wn * 16u + nt * 8u + gq) * Q8A_ROW + j * 32u + tq * 4u;
                bf[nt][0] = *reinterpret_cast<const int*>(base);
                bf[nt][1] = *reinterpret_cast<const int*>(base + 16);
            }
            float ws[4], wmn[4], dx[4], ax[4];
            int sc0[4], sc1[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const u32 mr = wm * 32u + (i >> 1) * 16u + gq + ((i & 1) ? 8u : 0u);
                const u32 nr = wn * 16u + (i >> 1) * 8u + tq * 2u + (i & 1);
                ws[i] = sWs[mr][j];
                dx[i] = sd[nr * 8u + j];
                if (Q6) {
                    const int scp = sWsc[mr][j];
                    sc0[i] = (int)(short)(scp & 0xffff);
                    sc1[i] = scp >> 16;
                } else {
                    wmn[i] = sWm[mr][j];
                    ax[i] = sa[nr * 8u + j];
                }
            }
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
                for (int nt = 0; nt < 2; ++nt) {
                    if (nt == 1 && !busy1) continue;
                    int lo[4] = {0, 0, 0, 0}, hi[4] = {0, 0, 0, 0};
                    if (Q6) {
                        mma_k16(lo, af[mt][0], af[mt][1], bf[nt][0]);
                        mma_k16(hi, af[mt][2], af[mt][3], bf[nt][1]);
                    } else {
                        mma_k32(lo, af[mt], bf[nt][0], bf[nt][1]);
                    }
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int mi = mt * 2 + (e >> 1), ni = nt * 2 + (e & 1);
                        const int isum = Q6 ? sc0[mi] * lo[e] + sc1[mi] * hi[e] : lo[e];
                        float a = fmaf(ws[mi] * dx[ni], isum_to_float<FMT>(isum), acc[jj & 1][mt][nt][e]);
                        if (!Q6) a = fmaf(wmn[mi], ax[ni], a);
                        acc[jj & 1][mt][nt][e] = a;
                    }
                }
            }
        }
    }
    cp_async_wait<0>();
    __syncthreads();  // every warp is done with the stages: they hold the exchange now

    // Group 1 leaves partials 2 and 3 for group 0's thread of the same tile place; group 0
    // forms the tree. Row of 33 floats a thread: the 32 lanes of a warp hit distinct banks.
    float* xch = reinterpret_cast<float*>(kqa_smem);
    const u32 place = tid & 255u;
    if (ks == 1u) {
#pragma unroll
        for (int q = 0; q < 2; ++q)
#pragma unroll
            for (int mt = 0; mt < 2; ++mt)
#pragma unroll
                for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        xch[place * 33u + q * 16 + mt * 8 + nt * 4 + e] = acc[q][mt][nt][e];
    }
    __syncthreads();
    if (ks == 1u) return;
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float p2 = xch[place * 33u + mt * 8 + nt * 4 + e];
                const float p3 = xch[place * 33u + 16 + mt * 8 + nt * 4 + e];
                mma_store(y, y_rows, tl, M, mma_out(m0, wm, wn, gq, tq, mt, nt, e),
                          acc[0][mt][nt][e], acc[1][mt][nt][e], p2, p3);
            }
}

#define KQA_ENTRY(fmt, FMT)                                                                    \
    extern "C" __global__ void __launch_bounds__(KQA_THREADS, 1)                               \
        gemm_mma_##fmt##_async(PRODUCT_PARAMS) {                                               \
        bx_grid_begin();                                                                       \
        gemm_mma_kq_async_body<FMT>(y, xq, xd, xa, W, tiles, x_rows, y_rows, n_rows, M, K,     \
                                    row_bytes, tile0);                                         \
    }

KQA_ENTRY(q4_k, FMT_Q4_K)
KQA_ENTRY(q5_k, FMT_Q5_K)
KQA_ENTRY(q6_k, FMT_Q6_K)

// ------------------------------------------------------------------------------------------
// Entry points. Float formats read x (f32); quantized ones read xq/xd/xa (quantize.cu).

#define GEMV_ENTRY(name, FMT, NT)                                                              \
    extern "C" __global__ void __launch_bounds__(256)                                          \
        name(PRODUCT_PARAMS) {                                                                 \
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
GEMV_ALL_NT(q4_0, FMT_Q4_0)
GEMV_ALL_NT(q4_1, FMT_Q4_1)
GEMV_ALL_NT(q5_0, FMT_Q5_0)
GEMV_ALL_NT(q5_1, FMT_Q5_1)
GEMV_ALL_NT(q3_k, FMT_Q3_K)
GEMV_ALL_NT(q2_k, FMT_Q2_K)
GEMV_ALL_NT(iq4_nl, FMT_IQ4_NL)
GEMV_ALL_NT(iq4_xs, FMT_IQ4_XS)
GEMV_ALL_NT(mxfp4, FMT_MXFP4)

// ------------------------------------------------------------------------------------------
// GEMV for tiles of one row (decode) with K % 256 == 0, Q8_0, Q4_K, Q5_K: a block is one warp
// and 8 consecutive weight rows of one expert; lane 4r + p runs the chain of partial p of row
// r. The 8 rows' 256-wide chunks (272, 144 or 176 bytes a row: 8 rows are contiguous bytes)
// and the activation chunk (256 codes, 8 scales, 8 sums) are copied raw into shared memory by
// cp.async, RING chunks in flight; in chunk c lane 4r + p applies the steps of blocks
// 8c + p and 8c + p + 4 of its row (partial p's blocks in increasing order, as the canonical
// order takes them). Nothing is decoded into an intermediate buffer and no lane idles.

// The canonical tree of a row whose four partials sit in lanes 4r .. 4r + 3 (lane 4r + p holds
// p): every lane gets its row's (p0 + p1) + (p2 + p3). All 32 lanes of the warp call it.
__device__ __forceinline__ float gemv_quad_tree(float acc, u32 lane) {
    const u32 g = lane & ~3u;
    const float p0 = __shfl_sync(BX_FULL_MASK, acc, g), p1 = __shfl_sync(BX_FULL_MASK, acc, g | 1u);
    const float p2 = __shfl_sync(BX_FULL_MASK, acc, g | 2u), p3 = __shfl_sync(BX_FULL_MASK, acc, g | 3u);
    return bx_tree4(p0, p1, p2, p3);
}

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
    const float v = gemv_quad_tree(acc, lane);
    if (p == 0u && r < rows_here) y[(u64)map_row(y_rows, tl.row0) * M + m0 + r] = v;
}

#define GKA_ENTRY(fmt, FMT)                                                                    \
    extern "C" __global__ void __launch_bounds__(32)                                           \
        gemv_##fmt##_async(PRODUCT_PARAMS) {                                                   \
        bx_grid_begin();                                                                       \
        gemv_kq_async_body<FMT>(y, xq, xd, xa, W, tiles, x_rows, y_rows, n_rows, M, K,         \
                                row_bytes, tile0);                                             \
    }

GKA_ENTRY(q8_0, FMT_Q8_0)
GKA_ENTRY(q4_k, FMT_Q4_K)
GKA_ENTRY(q5_k, FMT_Q5_K)

// ------------------------------------------------------------------------------------------
// Q8_0 GEMV for tiles of one row (decode), K % 256 == 0, the rows between the expert down
// product and the LM head (attention q/k/v and output, expert gate/up). gemv_body's lane per
// block read its 34-byte blocks with 17 two-byte loads each (ncu: 1.7 TB/s on 26.7 MB, the
// L1 busy with them, 1.9 waves). Here a block of 8 warps takes 16 weight rows of one tile, 2 a
// warp; per segment of 64 blocks (2176 bytes, 16-byte aligned since K % 256 == 0) the warp's
// two row segments and the block's activation codes and scales are copied into shared memory
// by cp.async, 16 bytes a lane, all at once; then lane l forms the integer dots of blocks l
// and l + 32 (dp4a on words funnel-shifted out of the 2-byte aligned blocks) and their scale
// products d * dx. Lane l's blocks all belong to partial l % 4 (64 | the segment start), and
// the lanes of partial p run its chain over blocks p, p + 4, .. (lanes p, p + 4, .. by
// shuffles), in block order; bx_tree4 combines. The bits are the reference's.

#define GQR_WARPS 8u
#define GQR_ROWS 2u                  // weight rows per warp
#define GQR_SEG 64u                  // blocks per segment
#define GQR_SEG_BYTES (GQR_SEG * 34u)  // 2176, a multiple of 16

// A warp's two row segments of segment `seg` into s_w (16-byte pieces, lane-strided).
__device__ __forceinline__ void gqr_stage_rows(u8 (*s_w)[GQR_SEG_BYTES], const u8* __restrict__ W,
                                               u32 expert, u32 M, u32 m0, u64 row_bytes, u32 seg,
                                               u32 n16, u32 warp, u32 lane) {
#pragma unroll
    for (u32 r = 0; r < GQR_ROWS; ++r) {
        const u32 m = m0 + r;
        if (m < M) {
            const u8* src = W + ((u64)expert * M + m) * row_bytes + (u64)seg * 34u;
            for (u32 i = lane; i < n16; i += 32u)
                cp_async16(s_w[warp * GQR_ROWS + r] + 16u * i, src + 16u * i, 16u);
        }
    }
}

extern "C" __global__ void __launch_bounds__(256)
    gemv_q8_0_rows(PRODUCT_PARAMS) {
    __shared__ __align__(16) u8 s_w[GQR_WARPS * GQR_ROWS][GQR_SEG_BYTES];
    __shared__ __align__(16) signed char s_xq[GQR_SEG * 32u];
    __shared__ __align__(16) float s_xd[GQR_SEG];
    const u32 tid = threadIdx.x, warp = tid >> 5, lane = tid & 31u, p = lane & 3u;
    const u32 nb = K / 32u;
    const u32 m0 = (blockIdx.x * GQR_WARPS + warp) * GQR_ROWS;
    // A dense product's weights are known before the kernel before it ends (they are never
    // written): with programmatic dependent launch on, the first segment's rows are copied
    // before the grid wait, under the previous kernel's tail. The only memory touched before
    // the wait: these copies of W into this block's shared memory (src/device.rs checks it).
    const bool early = tiles == nullptr;
    if (early) gqr_stage_rows(s_w, W, 0u, M, m0, row_bytes, 0u, min(GQR_SEG, nb) * 34u / 16u, warp, lane);
    bx_grid_begin();
    const Tile tl = get_tile(tiles, tile0 + blockIdx.y, 1u, n_rows);
    if (tl.rows == 0u) return;  // a padding tile of a device-built table (the whole block)
    const u32 xr = map_row(x_rows, tl.row0);
    float acc[GQR_ROWS];
#pragma unroll
    for (u32 r = 0; r < GQR_ROWS; ++r) acc[r] = 0.0f;

    for (u32 seg = 0; seg < nb; seg += GQR_SEG) {
        const u32 sb = min(GQR_SEG, nb - seg);  // a multiple of 8 blocks
        const u32 n16 = sb * 34u / 16u;         // 16-byte pieces of a row's segment
        if (seg > 0u) __syncthreads();          // the previous segment is consumed
        const signed char* xs = xq + (u64)xr * K + (u64)seg * 32u;
        for (u32 i = tid; i < sb * 2u; i += 256u) cp_async16(s_xq + 16u * i, xs + 16u * i, 16u);
        const float* ds = xd + (u64)xr * nb + seg;
        for (u32 i = tid; i < sb / 4u; i += 256u) cp_async16(s_xd + 4u * i, ds + 4u * i, 16u);
        if (!(early && seg == 0u))
            gqr_stage_rows(s_w, W, tl.expert, M, m0, row_bytes, seg, n16, warp, lane);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();

        float t[GQR_ROWS][2], sv[GQR_ROWS][2];
#pragma unroll
        for (u32 j = 0; j < 2u; ++j) {
            const u32 bl = lane + 32u * j;
            const bool live = bl < sb;
            const u32 bs = live ? bl : 0u;  // idle lanes read block 0 and drop it
            const int4 x0 = *reinterpret_cast<const int4*>(s_xq + 32u * bs);
            const int4 x1 = *reinterpret_cast<const int4*>(s_xq + 32u * bs + 16u);
            const float dx = s_xd[bs];
            const u32 B = 34u * bs, off = B & 2u;  // the block's byte offset is 0 or 2 mod 4
#pragma unroll
            for (u32 r = 0; r < GQR_ROWS; ++r) {
                const u32* wp = reinterpret_cast<const u32*>(s_w[warp * GQR_ROWS + r] + (B - off));
                u32 w[9];
#pragma unroll
                for (int i = 0; i < 9; ++i) w[i] = wp[i];
                const u32 sh = 16u + 8u * off;  // codes start at byte off + 2: 16 or 32 (w[i + 1])
                int isum = 0;
                isum = __dp4a((int)__funnelshift_rc(w[0], w[1], sh), x0.x, isum);
                isum = __dp4a((int)__funnelshift_rc(w[1], w[2], sh), x0.y, isum);
                isum = __dp4a((int)__funnelshift_rc(w[2], w[3], sh), x0.z, isum);
                isum = __dp4a((int)__funnelshift_rc(w[3], w[4], sh), x0.w, isum);
                isum = __dp4a((int)__funnelshift_rc(w[4], w[5], sh), x1.x, isum);
                isum = __dp4a((int)__funnelshift_rc(w[5], w[6], sh), x1.y, isum);
                isum = __dp4a((int)__funnelshift_rc(w[6], w[7], sh), x1.z, isum);
                isum = __dp4a((int)__funnelshift_rc(w[7], w[8], sh), x1.w, isum);
                const float d = f16_to_f32((u16)((w[0] >> (8u * off)) & 0xffffu));
                t[r][j] = d * dx;
                sv[r][j] = small_int_to_float(isum);
            }
        }
        // Partial p's chain over the segment: blocks p, p + 4, .., p + 60 in order.
#pragma unroll
        for (u32 j = 0; j < 2u; ++j)
#pragma unroll
            for (u32 i = 0; i < 8u; ++i) {
                const u32 src = 4u * i + p;
                const bool live = 32u * j + src < sb;
#pragma unroll
                for (u32 r = 0; r < GQR_ROWS; ++r) {
                    const float tv = __shfl_sync(BX_FULL_MASK, t[r][j], src);
                    const float svv = __shfl_sync(BX_FULL_MASK, sv[r][j], src);
                    if (live) acc[r] = fmaf(tv, svv, acc[r]);
                }
            }
    }
    const u32 yr = map_row(y_rows, tl.row0);
#pragma unroll
    for (u32 r = 0; r < GQR_ROWS; ++r) {
        const float p0 = __shfl_sync(BX_FULL_MASK, acc[r], 0);
        const float p1 = __shfl_sync(BX_FULL_MASK, acc[r], 1);
        const float p2 = __shfl_sync(BX_FULL_MASK, acc[r], 2);
        const float p3 = __shfl_sync(BX_FULL_MASK, acc[r], 3);
        const u32 m = m0 + r;
        if (lane == 0u && m < M) y[(u64)yr * M + m] = bx_tree4(p0, p1, p2, p3);
    }
}

// ------------------------------------------------------------------------------------------
// Q8_0 (and Q6_K) GEMV for tiles of one row (decode) with K % 256 == 0 on the int8 tensor
// cores. The dp4a GEMVs spend ~40 instructions on a 34-byte block (loads, funnel shifts, 8
// dp4a, the step): at 4 instructions a cycle an SM cannot keep up with its share of the copy
// rate (ncu: 1.3 TB/s). A block of 8 warps takes 16 weight rows; in each pass warp w copies
// chunk w (256 wide: 16 x 272 contiguous bytes, or Q6_K's 16 windows of 224, and the
// activation chunk) into shared memory by cp.async, and one mma.sync m16n8k32 per block (Q6_K:
// one m16n8k16 per sub-block, their isums combined with the sub-block scales) forms the 16
// rows' isums (every column of B holds the token's codes, so lane 4g + t finds row g's isum
// in c0 and row g + 8's in c2). Lane t keeps
// the steps' operands (d * dx, isum) of blocks t and t + 4; then 64 threads, row r partial p,
// run the chains over the pass's blocks in increasing order, as the canonical order takes
// them. The loads of a pass are one round trip spread over 8 warps; a warp alone walking its
// 16 rows' chunks one after the other took 12 us for a 512 x 2048 product.

#define GMQ_ROWS 16u
#define GMQ_WARPS 8u
#define GMQ_PASS_BLOCKS (GMQ_WARPS * 8u)  // 32-blocks per pass

// Per warp: 16 rows of a chunk (Q8_0: 272 contiguous bytes a row; Q6_K: the 16-byte aligned
// window of 224 around the 210-byte super-block, as the Q6_K GEMM copies it, at a stride of
// 240), the activation chunk (256 codes) and its 8 scales; after the 8 warps, the 16 x 64 step
// operands of a pass.
template <int FMT>
struct GmqShape {
    // Row stride: Q6_K's window of 224 padded to 240 (60 words: rows g = 0..7 of a fragment
    // load start 4 banks apart, as Q8_0's 272 do; 224 gave 2-way conflicts).
    static constexpr u32 ROW = FMT == FMT_Q6_K ? Q6A_WINDOW + 16u : 272u;
    static constexpr u32 PIECES = FMT == FMT_Q6_K ? Q6A_WINDOW / 16u : 17u;  // copied a row
    static constexpr u32 SB = FMT == FMT_Q6_K ? 210u : 272u;  // bytes of a chunk of a row
    static constexpr u32 CHUNK = GMQ_ROWS * ROW + 256u + 32u;  // W, X codes, X scales
    static constexpr u32 SMEM = GMQ_WARPS * CHUNK + GMQ_ROWS * GMQ_PASS_BLOCKS * 8u;
};
#define GMQ_SMEM (GmqShape<FMT_Q8_0>::SMEM)

// Q6_K: the 4 codes of `row` (its super-block at byte `off` of its window) for block j,
// elements 16s + 4t .. + 3: decode_wblock's bits, two aligned words funnel-shifted when the
// super-block sits 2 mod 4.
__device__ __forceinline__ int gmq_q6_word(const u8* row, u32 off, u32 j, u32 s, u32 t) {
    const u32 half = j >> 2, g4 = j & 3u, l0 = 16u * s + 4u * t;
    const u32 sh = (off & 3u) * 8u;
    const u32* ql = reinterpret_cast<const u32*>(row + (off & ~3u) + 64u * half + ((g4 & 1u) ? 32u : 0u) + l0);
    const u32* qh = reinterpret_cast<const u32*>(row + (off & ~3u) + 128u + 32u * half + l0);
    const u32 lo = (__funnelshift_r(ql[0], ql[1], sh) >> (4u * (g4 >> 1))) & 0x0F0F0F0Fu;
    const u32 hi = ((__funnelshift_r(qh[0], qh[1], sh) >> (2u * g4)) & 0x03030303u) << 4;
    return (int)__vsub4(lo | hi, 0x20202020u);
}

template <int FMT>
__device__ __forceinline__ void gemv_mma_body(float* __restrict__ y,
                                              const signed char* __restrict__ xq,
                                              const float* __restrict__ xd,
                                              const u8* __restrict__ W,
                                              const u32* __restrict__ tiles,
                                              const u32* __restrict__ x_rows,
                                              const u32* __restrict__ y_rows, u32 n_rows,
                                              u32 M, u32 K, u64 row_bytes, u32 tile0) {
    typedef GmqShape<FMT> S;
    constexpr bool Q6 = FMT == FMT_Q6_K;
    extern __shared__ __align__(16) u8 gmq_smem[];
    // (d * dx, isum) of [row][block of the pass]
    float2* sstep = reinterpret_cast<float2*>(gmq_smem + GMQ_WARPS * S::CHUNK);
    const u32 tid = threadIdx.x, warp = tid >> 5, lane = tid & 31u;
    const Tile tl = get_tile(tiles, tile0 + blockIdx.y, 1u, n_rows);
    if (tl.rows == 0u) return;  // a padding tile of a device-built table (block-uniform)
    const u32 m0 = blockIdx.x * GMQ_ROWS;
    const u32 nb = K / DOT_BLOCK, nchunks = nb / 8u;
    const u32 xr = map_row(x_rows, tl.row0);
    const u32 rows_here = min(GMQ_ROWS, M - m0);  // rows past M copy nothing, write nothing
    const u8* wbase = W + ((u64)tl.expert * M + m0) * row_bytes;
    u8* sw = gmq_smem + warp * S::CHUNK;
    const u8* sx = sw + GMQ_ROWS * S::ROW;
    const float* sd = reinterpret_cast<const float*>(sx + 256u);
    const u32 g = lane >> 2, t = lane & 3u;
    const u32 cr = tid >> 2, cp = tid & 3u;  // chain threads (tid < 64): row cr, partial cp
    float acc = 0.0f;
    constexpr u32 per_row = S::PIECES;

    for (u32 c0 = 0; c0 < nchunks; c0 += GMQ_WARPS) {
        const u32 c = c0 + warp;  // this warp's chunk
        const u32 pass_blocks = min(GMQ_WARPS, nchunks - c0) * 8u;
        __syncthreads();  // the chains are done with the previous pass's steps
        if (c < nchunks) {
#pragma unroll
            for (u32 it = 0; it < (GMQ_ROWS * per_row + 18u + 31u) / 32u; ++it) {
                const u32 i = lane + 32u * it;
                if (i < GMQ_ROWS * per_row) {
                    const u32 r = i / per_row, part = i - r * per_row;
                    const bool ok = r < rows_here;
                    const u8* src = ok ? wbase + r * row_bytes + (u64)c * S::SB + part * 16u : W;
                    if (Q6 && ok) {
                        // The aligned window's piece (the last may pass the matrix's end by up
                        // to 14 bytes: GpuMatrix::upload pads every matrix with 16).
                        const u8* at = wbase + r * row_bytes + (u64)c * S::SB;
                        src = at - q6_window_off(at) + part * 16u;
                    }
                    cp_async16(sw + r * S::ROW + part * 16u, src, ok ? 16u : 0u);
                } else if (i < GMQ_ROWS * per_row + 16u) {
                    const u32 part = i - GMQ_ROWS * per_row;
                    cp_async16(sw + GMQ_ROWS * S::ROW + part * 16u, xq + (u64)xr * K + c * 256u + part * 16u, 16u);
                } else if (i < GMQ_ROWS * per_row + 18u) {
                    const u32 part = i - GMQ_ROWS * per_row - 16u;
                    cp_async16(sw + GMQ_ROWS * S::ROW + 256u + part * 16u, xd + (u64)xr * nb + c * 8u + part * 4u, 16u);
                }
            }
            cp_async_commit();
            cp_async_wait<0>();
            __syncwarp();
            const u8* r0 = sw + g * S::ROW;
            const u8* r1 = r0 + 8u * S::ROW;
            // Q6_K: where rows g and g + 8 hold their super-block in their windows.
            const u32 off0 = Q6 ? q6_window_off(wbase + g * row_bytes + (u64)c * 210u) : 0u;
            const u32 off1 = Q6 ? q6_window_off(wbase + (g + 8u) * row_bytes + (u64)c * 210u) : 0u;
            int is0[8], is1[8];
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                if (Q6) {
                    // Two 16-element sub-blocks, each an m16n8k16, combined with their scales.
                    int lo[4] = {0, 0, 0, 0}, hi[4] = {0, 0, 0, 0};
                    const int b0 = *reinterpret_cast<const int*>(sx + j * 32 + t * 4u);
                    const int b1 = *reinterpret_cast<const int*>(sx + j * 32 + 16u + t * 4u);
                    mma_k16(lo, gmq_q6_word(r0, off0, j, 0u, t), gmq_q6_word(r1, off1, j, 0u, t), b0);
                    mma_k16(hi, gmq_q6_word(r0, off0, j, 1u, t), gmq_q6_word(r1, off1, j, 1u, t), b1);
                    const u8* s0 = r0 + off0 + 192u + 2u * j;
                    const u8* s1 = r1 + off1 + 192u + 2u * j;
                    is0[j] = (int)(signed char)s0[0] * lo[0] + (int)(signed char)s0[1] * hi[0];
                    is1[j] = (int)(signed char)s1[0] * lo[2] + (int)(signed char)s1[1] * hi[2];
                } else {
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
            }
#pragma unroll
            for (u32 h = 0; h < 2u; ++h) {
                const u32 j = t + 4u * h;
                // Lane t's blocks t and t + 4: selects, not a run-time register index.
                const int i0 = t == 0u ? is0[4u * h] : t == 1u ? is0[4u * h + 1u] : t == 2u ? is0[4u * h + 2u] : is0[4u * h + 3u];
                const int i1 = t == 0u ? is1[4u * h] : t == 1u ? is1[4u * h + 1u] : t == 2u ? is1[4u * h + 2u] : is1[4u * h + 3u];
                const float dx = sd[j];
                const u32 bl = warp * 8u + j;  // block of the pass
                // The block's d: Q8_0 at its start, Q6_K once at the super-block's end.
                const u8* d0 = Q6 ? r0 + off0 + 208u : r0 + j * 34u;
                const u8* d1 = Q6 ? r1 + off1 + 208u : r1 + j * 34u;
                sstep[g * GMQ_PASS_BLOCKS + bl] =
                    make_float2(f16_to_f32(ld_u16(d0)) * dx, isum_to_float<FMT>(i0));
                sstep[(g + 8u) * GMQ_PASS_BLOCKS + bl] =
                    make_float2(f16_to_f32(ld_u16(d1)) * dx, isum_to_float<FMT>(i1));
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
        const float v = gemv_quad_tree(acc, lane);
        if (cp == 0u && cr < rows_here) y[(u64)map_row(y_rows, tl.row0) * M + m0 + cr] = v;
    }
}

#define GMQ_ENTRY(fmt, FMT)                                                                    \
    extern "C" __global__ void __launch_bounds__(256)                                          \
        gemv_##fmt##_mma(PRODUCT_PARAMS) {                                                     \
        bx_grid_begin();                                                                       \
        gemv_mma_body<FMT>(y, xq, xd, W, tiles, x_rows, y_rows, n_rows, M, K, row_bytes,       \
                           tile0);                                                             \
    }

GMQ_ENTRY(q8_0, FMT_Q8_0)
GMQ_ENTRY(q6_k, FMT_Q6_K)


#define FFMA_ENTRY(fmt, FMT)                                                                   \
    extern "C" __global__ void __launch_bounds__(256)                                          \
        gemm_ffma_##fmt(PRODUCT_PARAMS) {                                                      \
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
        gemm_mma_##fmt(PRODUCT_PARAMS) {                                                       \
        bx_grid_begin();                                                                       \
        gemm_mma_body<FMT>(y, xq, xd, xa, W, tiles, x_rows, y_rows, n_rows, M, K, row_bytes,  \
                           tile0);                                                             \
    }

MMA_ENTRY(q8_0, FMT_Q8_0, 2)
MMA_ENTRY(q4_k, FMT_Q4_K, 1)
MMA_ENTRY(q5_k, FMT_Q5_K, 1)
MMA_ENTRY(q6_k, FMT_Q6_K, 1)
MMA_ENTRY(q4_0, FMT_Q4_0, 1)
MMA_ENTRY(q4_1, FMT_Q4_1, 1)
MMA_ENTRY(q5_0, FMT_Q5_0, 1)
MMA_ENTRY(q5_1, FMT_Q5_1, 1)
MMA_ENTRY(q3_k, FMT_Q3_K, 1)
MMA_ENTRY(q2_k, FMT_Q2_K, 1)
MMA_ENTRY(iq4_nl, FMT_IQ4_NL, 1)
MMA_ENTRY(iq4_xs, FMT_IQ4_XS, 1)
MMA_ENTRY(mxfp4, FMT_MXFP4, 1)
