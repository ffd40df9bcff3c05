// fastscan.cu — FastScan KV-cache codes on the GPU: encoding, and causal attention of queries
// over an encoded K and V cache, plus the f16-KV baseline doing the same attention on
// uncompressed keys and values (layout: src/quant/fastscan.rs; every operation's order:
// src/reference/fastscan.rs).
//   fastscan_encode  the rows of positions pos[0] .. pos[0] + n of every kv head -> their codes
//   f16kv_write      the rows of positions pos[i] of every kv head -> their f16 bits (the
//                    runner's f16 cache)
//   fastscan_scores  q: [nq, H, D] -> scores [nq, H, span], per chunk of 256 positions the max
//   fastscan_values  -> per chunk the exp sum and the D value partials
//   fastscan_finish  -> the chunk sums in order, the division, the inverse rotation: out
//   f16kv_scores, f16kv_values: the baseline's two first steps (fastscan_finish without the
//                    rotation ends it)
// A query's result depends on its position alone (grid: chunks x heads x queries; a block
// past the query's position exits): the prefill launch (every query of a sequence) and a
// decode launch (one query) give the same bits.
//
// Versions:
//   fastscan_encode  v1: one warp per pair of positions (i, i + 16) of a tile, so each code
//                    byte (two nibbles) has one writer; rotation in shared memory. The first
//                    position is read on the device (a captured decode step), the rows by
//                    stride (new rows, or a session's staging rows by position).
//   fastscan_scores  v2: one block of 256 threads per (chunk, head, query), warp w on tile w
//                    of the chunk, lane j on its position j; the tile's code rows staged in
//                    shared memory (v1 read each position's code bytes one at a time from
//                    global memory); the query's rotation and f32 / int8 tables rebuilt per
//                    block in shared memory. With values v2, int8-mode decode on the H100 at
//                    16K positions went from 57.7 us to 40.9 us, at 64K from 178 to 127 us.
//   fastscan_values  v2: one block per (chunk, head, query); one thread per (tile, dim) reads
//                    the dim's 16 code bytes of the tile at once; the int8 weights quantized
//                    once per position (v1: once per position and dim).
//   fastscan_finish  v2: one block per (head, query), one thread per dim; the chunk loops
//                    unrolled so that their loads overlap (v1: one load in flight).
//   f16kv_scores     v1: one warp per 32 positions, K staged through shared memory 32 dims at
//                    a time (coalesced rows, conflict-free columns).
//   f16kv_values     v1: as fastscan_values, one thread per (tile, dim) reading f16 rows.

#include "common.cuh"

typedef unsigned char u8;
typedef unsigned short u16;

#define FS_TILE 32u
#define FS_MAX_D 256u
#define FS_MAX_LEVELS 16u

__device__ __forceinline__ u16 f32_to_f16_bits(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float f16_bits_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// The f16 bits of a float as the FastScan family stores it: nearest even, NaN as 0x7e00
// (src/reference/fastscan.rs f16_bits; the payload a conversion keeps differs between the CPU
// and the GPU).
__device__ __forceinline__ u16 fs_f16_bits(float f) {
    return (f != f) ? (u16)0x7e00u : f32_to_f16_bits(f);
}

// The butterfly transform of v[0..D) in shared memory by one warp (src/reference/fastscan.rs).
__device__ __forceinline__ void fs_fwht(float* v, u32 D, u32 lane) {
    for (u32 h = 1; h < D; h <<= 1) {
        for (u32 q = lane; q < D / 2u; q += 32u) {
            const u32 j = (q / h) * 2u * h + (q % h);
            const float a = v[j], b = v[j + h];
            v[j] = a + b;
            v[j + h] = a - b;
        }
        __syncwarp();
    }
}

// R v = (1/sqrt D) H S v, in place, one warp.
__device__ __forceinline__ void fs_rotate(float* v, const float* __restrict__ signs, u32 D,
                                          float k, u32 lane) {
    for (u32 i = lane; i < D; i += 32u) v[i] = v[i] * signs[i];
    __syncwarp();
    fs_fwht(v, D, lane);
    for (u32 i = lane; i < D; i += 32u) v[i] = v[i] * k;
    __syncwarp();
}

// R^T v = S (1/sqrt D) H v, in place, one warp.
__device__ __forceinline__ void fs_unrotate(float* v, const float* __restrict__ signs, u32 D,
                                            float k, u32 lane) {
    fs_fwht(v, D, lane);
    for (u32 i = lane; i < D; i += 32u) v[i] = (v[i] * k) * signs[i];
    __syncwarp();
}

// round_ties_even(v / s) clamped to +-127; 0 when s == 0 or the quotient is NaN.
__device__ __forceinline__ int fs_q8(float v, float s) {
    if (s == 0.0f) return 0;
    const float r = rintf(v / s);
    return (r != r) ? 0 : (int)fminf(fmaxf(r, -127.0f), 127.0f);
}

#define FS_ENC_WARPS 8u

// Positions pos[0] .. pos[0] + n (read on the device, so a captured decode step encodes the
// position it replays at). Position p of kv head h is read at x + r * row_stride + h *
// head_stride, r = p (absolute: the runner's staging rows [n_kv, cap, D]) or p - pos[0] (the n
// new rows [n, n_kv, D]). The grid covers the most tiles n positions can touch; a warp past
// the tiles of this call's positions exits.
extern "C" __global__ void fastscan_encode(u8* __restrict__ cache, const float* __restrict__ x,
                                           const u32* __restrict__ pos, u32 n, u32 absolute,
                                           u64 row_stride, u64 head_stride,
                                           const float* __restrict__ signs,
                                           const float* __restrict__ bounds, u32 nbounds,
                                           u32 D, u32 tile_bytes, u64 head_bytes, float k) {
    bx_grid_begin();
    __shared__ float v[FS_ENC_WARPS][FS_MAX_D];
    __shared__ u8 codes[FS_ENC_WARPS][2][FS_MAX_D];
    const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31u;
    const u32 slot = blockIdx.x * FS_ENC_WARPS + warp;
    const u32 pos0 = pos[0], first_tile = pos0 / FS_TILE;
    const u32 slots = ((pos0 + n - 1u) / FS_TILE - first_tile + 1u) * (FS_TILE / 2u);
    if (slot >= slots) return;  // the whole warp
    const u32 kvh = blockIdx.y;
    const u32 tile = first_tile + slot / 16u, i = slot % 16u;
    u8* base = cache + (u64)kvh * head_bytes + (u64)tile * tile_bytes;
    bool present[2];
    for (u32 half = 0; half < 2u; ++half) {
        const u32 p = tile * FS_TILE + i + 16u * half;
        present[half] = p >= pos0 && p < pos0 + n;
        if (!present[half]) continue;
        const float* row =
            x + (u64)(absolute ? p : p - pos0) * row_stride + (u64)kvh * head_stride;
        float* vw = v[warp];
        for (u32 d = lane; d < D; d += 32u) vw[d] = row[d];
        __syncwarp();
        // norm: the canonical dot(x, x), lane p < 4 running partial p.
        float acc = 0.0f;
        if (lane < 4u) {
            for (u32 b = lane; b * 32u < D; b += 4u)
                for (u32 d = b * 32u; d < b * 32u + 32u; ++d) acc = fmaf(vw[d], vw[d], acc);
        }
        const float other = __shfl_xor_sync(BX_FULL_MASK, acc, 1);
        const float pair = (lane & 1u) ? other + acc : acc + other;
        const float pair2 = __shfl_xor_sync(BX_FULL_MASK, pair, 2);
        const float ss = (lane & 2u) ? pair2 + pair : pair + pair2;
        const float norm = sqrtf(__shfl_sync(BX_FULL_MASK, ss, 0));
        const float inv = (norm > 0.0f && norm <= 3.402823466e38f) ? 1.0f / norm : 0.0f;
        fs_rotate(vw, signs, D, k, lane);
        for (u32 d = lane; d < D; d += 32u) {
            const float y = vw[d] * inv;
            u32 c = 0;
            for (u32 b = 0; b < nbounds; ++b) c += bounds[b] < y ? 1u : 0u;
            codes[warp][half][d] = (u8)c;
        }
        if (lane == 0) {
            reinterpret_cast<u16*>(base)[i + 16u * half] = fs_f16_bits(norm);
        }
        __syncwarp();
    }
    for (u32 d = lane; d < D; d += 32u) {
        u8* byte = base + 2u * FS_TILE + 16u * d + i;
        const u8 old = *byte;
        const u8 lo = present[0] ? codes[warp][0][d] : (u8)(old & 0xFu);
        const u8 hi = present[1] ? codes[warp][1][d] : (u8)(old >> 4);
        *byte = (u8)(lo | (hi << 4));
    }
}

// Rows of positions pos[i], i < n, of every kv head: k, v: [n_kv, cap, D] f32 (the runner's
// staging rows) -> kc, vc: [n_kv, cap, D] f16 bits at the same rows.
extern "C" __global__ void f16kv_write(u16* __restrict__ kc, u16* __restrict__ vc,
                                       const float* __restrict__ k, const float* __restrict__ v,
                                       const u32* __restrict__ pos, u32 n, u32 n_kv, u32 D,
                                       u32 cap) {
    bx_grid_begin();
    for (u32 i = blockIdx.y; i < n; i += gridDim.y) {
        const u64 p = pos[i];
        BX_GRID_STRIDE(j, (u64)n_kv * D) {
            const u64 at = ((j / D) * cap + p) * D + j % D;
            kc[at] = fs_f16_bits(k[at]);
            vc[at] = fs_f16_bits(v[at]);
        }
    }
}

#define FS_THREADS 256u
#define FS_CHUNK 256u
#define FS_CHUNK_TILES 8u
#define FS_STAGE_DIMS 128u
#define FS_NEG_INF __uint_as_float(0xff800000u)

// Code of position offset i (0..32) of a tile from the dim's 16 code bytes r.
__device__ __forceinline__ u32 fs_nibble(uint4 r, u32 i) {
    const u32 b = i & 15u;
    const u32 w = b < 8u ? (b < 4u ? r.x : r.y) : (b < 12u ? r.z : r.w);
    return (w >> (8u * (b & 3u) + 4u * (i >> 4))) & 0xFu;
}

extern "C" __global__ void __launch_bounds__(256)
    fastscan_scores(float* __restrict__ s, float* __restrict__ cmax, const float* __restrict__ q,
                    const u8* __restrict__ kc, const u32* __restrict__ qpos, u32 span,
                    u32 nchunk, const float* __restrict__ signs,
                    const float* __restrict__ centroids, u32 H, u32 n_kv, u32 D, u32 levels,
                    u32 tile_bytes, u64 head_bytes, u32 smode, float k) {
    bx_grid_begin();
    __shared__ float qr[FS_MAX_D];
    __shared__ float table[FS_MAX_D * FS_MAX_LEVELS];
    __shared__ signed char lut[FS_MAX_D * FS_MAX_LEVELS];
    // Each warp's tile: the code bytes of up to FS_STAGE_DIMS dims at a time.
    __shared__ uint4 codes[FS_THREADS / 32u][FS_STAGE_DIMS];
    __shared__ float red[FS_THREADS / 32u];
    const u32 c = blockIdx.x, h = blockIdx.y;
    const u64 qi = blockIdx.z;
    const u32 tid = threadIdx.x, lane = tid & 31u, warp = tid >> 5;
    const u32 t = qpos[qi];
    if (c * FS_CHUNK > t) return;  // the whole block: past the query's position
    const u64 row = qi * H + h;
    const u8* K = kc + (u64)(h / (H / n_kv)) * head_bytes;

    if (warp == 0) {
        for (u32 d = lane; d < D; d += 32u) qr[d] = q[row * D + d];
        __syncwarp();
        fs_rotate(qr, signs, D, k, lane);
    }
    __syncthreads();
    float tmax = 0.0f;
    for (u32 i = tid; i < D * levels; i += FS_THREADS) {
        const float v = qr[i / levels] * centroids[i % levels];
        table[i] = v;
        tmax = fmaxf(tmax, fabsf(v));
    }
    const float ts = bx_block_max<FS_THREADS>(tmax, red) / 127.0f;
    if (smode == 0u)
        for (u32 i = tid; i < D * levels; i += FS_THREADS) lut[i] = (signed char)fs_q8(table[i], ts);
    __syncthreads();

    // Warp w scores tile c * 8 + w, lane j its position j: the tile's code bytes go through
    // shared memory in 16-byte rows (one per dim), so the global reads are whole rows.
    const u32 tile = c * FS_CHUNK_TILES + warp;
    const u32 p = tile * FS_TILE + lane;
    float sc = FS_NEG_INF;
    if (tile * FS_TILE <= t) {  // the whole warp
        const u8* tb = K + (u64)tile * tile_bytes;
        const uint4* rows = reinterpret_cast<const uint4*>(tb + 2u * FS_TILE);
        const u8* mine = reinterpret_cast<const u8*>(codes[warp]) + (lane & 15u);
        const u32 shift = 4u * (lane >> 4);
        float a[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        int isum = 0;
        for (u32 d0 = 0; d0 < D; d0 += FS_STAGE_DIMS) {
            const u32 nd = min(D - d0, FS_STAGE_DIMS);
#pragma unroll 4
            for (u32 u = lane; u < nd; u += 32u) codes[warp][u] = rows[d0 + u];
            __syncwarp();
            if (smode == 1u) {
                for (u32 b = 0; b < nd; b += 32u) {
                    const u32 blk = (d0 + b) / 32u;
                    float acc = a[blk & 3u];
                    for (u32 i = b; i < b + 32u; ++i) {
                        const u32 code = (mine[16u * i] >> shift) & 0xFu;
                        acc = acc + table[(d0 + i) * levels + code];
                    }
                    a[blk & 3u] = acc;
                }
            } else {
                for (u32 i = 0; i < nd; ++i) {
                    const u32 code = (mine[16u * i] >> shift) & 0xFu;
                    isum += lut[(d0 + i) * levels + code];
                }
            }
            __syncwarp();
        }
        if (p <= t) {
            const float raw = smode == 1u ? (a[0] + a[1]) + (a[2] + a[3]) : (float)isum * ts;
            const float nk = f16_bits_to_f32(reinterpret_cast<const u16*>(tb)[lane]);
            sc = (raw * nk) * k;
            s[row * span + p] = sc;
        }
    }
    const float m = bx_block_max<FS_THREADS>(sc, red);
    if (tid == 0) cmax[row * nchunk + c] = m;
}

// The softmax and value steps shared by fastscan_values and f16kv_values, for chunk c of
// query row `row` at position t: e and w = e * vnorm into shared memory, the chunk's exp sum,
// then tile partials from `tile(j, d, w_tile, n_in_tile)` summed over the chunk's tiles.
struct FsChunk {
    float e[FS_CHUNK];
    float w[FS_CHUNK];
    float part[FS_CHUNK_TILES][FS_MAX_D];
    int wq[FS_CHUNK];  // q8(w, the tile's scale), for the int8 value mode
    float wscale[FS_CHUNK_TILES];
    float red[FS_THREADS / 32u];
};

template <class VNorm, class Tile>
__device__ __forceinline__ void fs_chunk_values(FsChunk& sh, float* __restrict__ vpart,
                                                float* __restrict__ esum,
                                                const float* __restrict__ s,
                                                const float* __restrict__ cmax, u64 row, u32 c,
                                                u32 t, u32 span, u32 nchunk, u32 D,
                                                VNorm vnorm, Tile tile) {
    const u32 tid = threadIdx.x, lane = tid & 31u, warp = tid >> 5;
    const u32 n = t + 1u, nch = (n + FS_CHUNK - 1u) / FS_CHUNK;
    float m = FS_NEG_INF;
    for (u32 i = tid; i < nch; i += FS_THREADS) m = fmaxf(m, cmax[row * nchunk + i]);
    m = bx_block_max<FS_THREADS>(m, sh.red);
    const u32 p0 = c * FS_CHUNK, p = p0 + tid;
    float e = 0.0f, w = 0.0f;
    if (p < n) {
        e = bx_exp(s[row * span + p] - m);
        w = e * vnorm(p);
    }
    sh.e[tid] = e;
    sh.w[tid] = w;
    // The int8 value mode's per-tile scale: warp j holds tile j (past n, w = 0 changes nothing).
    float wm = fabsf(w);
    for (u32 off = 16u; off; off >>= 1) wm = fmaxf(wm, __shfl_xor_sync(BX_FULL_MASK, wm, off));
    sh.wq[tid] = fs_q8(w, wm / 127.0f);
    if (lane == 0) sh.wscale[warp] = wm / 127.0f;
    __syncthreads();
    const u32 in_chunk = min(n - p0, FS_CHUNK);
    if (warp == 0) {
        float acc = 0.0f;
        for (u32 i = lane; i < in_chunk; i += 32u) acc = acc + sh.e[i];
        acc = bx_butterfly_sum(acc);
        if (lane == 0) esum[row * nchunk + c] = acc;
    }
    const u32 ntiles = (in_chunk + FS_TILE - 1u) / FS_TILE;
    for (u32 idx = tid; idx < ntiles * D; idx += FS_THREADS) {
        const u32 j = idx / D, d = idx - j * D;
        const u32 cnt = min(in_chunk - j * FS_TILE, FS_TILE);
        sh.part[j][d] = tile(c * FS_CHUNK_TILES + j, d, sh.w + j * FS_TILE, sh.wq + j * FS_TILE,
                             sh.wscale[j], cnt);
    }
    __syncthreads();
    for (u32 d = tid; d < D; d += FS_THREADS) {
        float v = 0.0f;
        for (u32 j = 0; j < ntiles; ++j) v = v + sh.part[j][d];
        vpart[(row * nchunk + c) * D + d] = v;
    }
}

struct FsNorm {
    const u8* V;
    u32 tile_bytes;
    __device__ float operator()(u32 p) const {
        return f16_bits_to_f32(reinterpret_cast<const u16*>(V + (u64)(p / FS_TILE) * tile_bytes)[p % FS_TILE]);
    }
};

struct FsTile {
    const u8* V;
    const float* cent;
    const int* cq;
    float cs;
    u32 tile_bytes;
    u32 vmode;
    __device__ float operator()(u32 tau, u32 d, const float* w, const int* wq, float ws,
                                u32 cnt) const {
        // 16-byte aligned: tiles are 64 + 16 D bytes.
        const uint4 bytes =
            *reinterpret_cast<const uint4*>(V + (u64)tau * tile_bytes + 2u * FS_TILE + 16u * d);
        if (vmode == 0u) {
            float a = 0.0f;
            for (u32 i = 0; i < cnt; ++i) {
#ifdef BITEXACT_MUTANT
                // Broken on purpose (see BITEXACT_MUTANT): the fma split into two roundings.
                a = w[i] * cent[fs_nibble(bytes, i)] + a;
#else
                a = fmaf(w[i], cent[fs_nibble(bytes, i)], a);
#endif
            }
            return a;
        }
        int isum = 0;
        for (u32 i = 0; i < cnt; ++i) isum += wq[i] * cq[fs_nibble(bytes, i)];
        return (ws * cs) * (float)isum;
    }
};

extern "C" __global__ void __launch_bounds__(256)
    fastscan_values(float* __restrict__ vpart, float* __restrict__ esum,
                    const float* __restrict__ s, const float* __restrict__ cmax,
                    const u8* __restrict__ vc, const u32* __restrict__ qpos, u32 span,
                    u32 nchunk, const float* __restrict__ centroids, u32 H, u32 n_kv, u32 D,
                    u32 levels, u32 tile_bytes, u64 head_bytes, u32 vmode) {
    bx_grid_begin();
    __shared__ FsChunk sh;
    __shared__ float cent[FS_MAX_LEVELS];
    __shared__ int cq[FS_MAX_LEVELS];
    const u32 c = blockIdx.x, h = blockIdx.y;
    const u64 qi = blockIdx.z;
    const u32 t = qpos[qi];
    if (c * FS_CHUNK > t) return;
    const u8* V = vc + (u64)(h / (H / n_kv)) * head_bytes;
    float cmx = 0.0f;
    for (u32 i = 0; i < levels; ++i) cmx = fmaxf(cmx, fabsf(centroids[i]));
    const float cs = cmx / 127.0f;
    if (threadIdx.x < levels) {
        cent[threadIdx.x] = centroids[threadIdx.x];
        cq[threadIdx.x] = fs_q8(centroids[threadIdx.x], cs);
    }
    // (fs_chunk_values synchronizes before any thread reads cent or cq.)
    fs_chunk_values(sh, vpart, esum, s, cmax, qi * H + h, c, t, span, nchunk, D,
                    FsNorm{V, tile_bytes}, FsTile{V, cent, cq, cs, tile_bytes, vmode});
}

extern "C" __global__ void __launch_bounds__(256)
    fastscan_finish(float* __restrict__ out, const float* __restrict__ vpart,
                    const float* __restrict__ esum, const u32* __restrict__ qpos, u32 nchunk,
                    const float* __restrict__ signs, u32 H, u32 D, u32 rotate, float k) {
    bx_grid_begin();
    __shared__ float o[FS_MAX_D];
    const u32 h = blockIdx.x;
    const u64 qi = blockIdx.y;
    const u64 row = qi * H + h;
    const u32 tid = threadIdx.x, lane = tid & 31u, warp = tid >> 5;
    const u32 nch = (qpos[qi] + FS_CHUNK) / FS_CHUNK;
    // Unrolled so that the loads of several chunks are in flight before the first add.
    float S = 0.0f;
#pragma unroll 8
    for (u32 i = 0; i < nch; ++i) S = S + esum[row * nchunk + i];
    for (u32 d = tid; d < D; d += FS_THREADS) {
        float v = 0.0f;
#pragma unroll 8
        for (u32 i = 0; i < nch; ++i) v = v + vpart[(row * nchunk + i) * D + d];
        o[d] = v / S;
    }
    __syncthreads();
    if (rotate && warp == 0) fs_unrotate(o, signs, D, k, lane);
    __syncthreads();
    for (u32 d = tid; d < D; d += FS_THREADS) out[row * D + d] = bx_canon(o[d]);
}

// The f16-KV baseline. K and V: [n_kv, cap, D] f16 bits.
extern "C" __global__ void __launch_bounds__(256)
    f16kv_scores(float* __restrict__ s, float* __restrict__ cmax, const float* __restrict__ q,
                 const u16* __restrict__ kc, const u32* __restrict__ qpos, u32 span, u32 nchunk,
                 u32 H, u32 n_kv, u32 D, u32 cap, float k) {
    bx_grid_begin();
    __shared__ float qs[FS_MAX_D];
    __shared__ float ks[FS_THREADS / 32u][32][33];
    __shared__ float red[FS_THREADS / 32u];
    const u32 c = blockIdx.x, h = blockIdx.y;
    const u64 qi = blockIdx.z;
    const u32 tid = threadIdx.x, lane = tid & 31u, warp = tid >> 5;
    const u32 t = qpos[qi];
    if (c * FS_CHUNK > t) return;
    const u64 row = qi * H + h;
    const u16* K = kc + (u64)(h / (H / n_kv)) * cap * D;
    for (u32 d = tid; d < D; d += FS_THREADS) qs[d] = q[row * D + d];
    __syncthreads();
    const u32 pw = c * FS_CHUNK + warp * 32u;  // the warp's first position
    const u32 p = pw + lane;
    float a[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (u32 blk = 0; blk * 32u < D; ++blk) {
        for (u32 r = 0; r < 32u; ++r) {
            const u32 pr = pw + r;
            ks[warp][r][lane] = pr <= t ? f16_bits_to_f32(K[(u64)pr * D + blk * 32u + lane]) : 0.0f;
        }
        __syncwarp();
        float acc = a[blk & 3u];
        for (u32 d = 0; d < 32u; ++d) acc = fmaf(ks[warp][lane][d], qs[blk * 32u + d], acc);
        a[blk & 3u] = acc;
        __syncwarp();
    }
    float sc = FS_NEG_INF;
    if (p <= t) {
        sc = ((a[0] + a[1]) + (a[2] + a[3])) * k;
        s[row * span + p] = sc;
    }
    const float m = bx_block_max<FS_THREADS>(sc, red);
    if (tid == 0) cmax[row * nchunk + c] = m;
}

struct F16Tile {
    const u16* V;
    u32 D;
    __device__ float operator()(u32 tau, u32 d, const float* w, const int*, float,
                                u32 cnt) const {
        float a = 0.0f;
        const u16* col = V + (u64)tau * FS_TILE * D + d;
#pragma unroll 8
        for (u32 i = 0; i < cnt; ++i) a = fmaf(w[i], f16_bits_to_f32(col[(u64)i * D]), a);
        return a;
    }
};

struct F16Norm {
    __device__ float operator()(u32) const { return 1.0f; }
};

extern "C" __global__ void __launch_bounds__(256)
    f16kv_values(float* __restrict__ vpart, float* __restrict__ esum,
                 const float* __restrict__ s, const float* __restrict__ cmax,
                 const u16* __restrict__ vc, const u32* __restrict__ qpos, u32 span, u32 nchunk,
                 u32 H, u32 n_kv, u32 D, u32 cap) {
    bx_grid_begin();
    __shared__ FsChunk sh;
    const u32 c = blockIdx.x, h = blockIdx.y;
    const u64 qi = blockIdx.z;
    const u32 t = qpos[qi];
    if (c * FS_CHUNK > t) return;
    const u16* V = vc + (u64)(h / (H / n_kv)) * cap * D;
    fs_chunk_values(sh, vpart, esum, s, cmax, qi * H + h, c, t, span, nchunk, D, F16Norm{},
                    F16Tile{V, D});
}
