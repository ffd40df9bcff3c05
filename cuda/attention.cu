// attention.cu — causal grouped-query attention over an f32 KV cache, and the cache write.
//   attention_*    q: [nq, n_heads, hd], caches k, v: [n_kv, cap, hd] (one layer),
//                  qpos: [nq] (query i sees cache rows 0..=qpos[i]) -> out: [nq, n_heads, hd]
//   kv_write_f32   k, v: [n, n_kv, hd] -> cache rows pos[i] of every kv head
// Query head h reads kv head h / (n_heads / n_kv).
//
// THE ORDER (src/reference/attention.rs spells it out). The keys 0..=t of a query at position t
// are cut into chunks of 64 (ATT_CHUNK) positions, the last one cut at t. Per chunk:
//   s_j = dot(q, k_j) * scale      the canonical f32 dot (common.cuh), scale = 1 / sqrtf(hd)
//   m   = fmaxf over the chunk's s_j from -inf;  e_j = bx_exp(s_j - m)
//   l   = (l0 + l1) + (l2 + l3),  l_p adding from +0, in increasing j, the e_j with
//         (j - chunk start) % 4 == p
//   o[d] = fmaf chain from +0 in increasing j: o = fmaf(e_j, v_j[d], o)
// The chunks are folded left to right: the state starts as chunk 0's (m, l, o); chunk c > 0
// folds in as  M' = fmaxf(M, m_c), a = bx_exp(M - M'), b = bx_exp(m_c - M'),
//              L = fmaf(L, a, l_c * b), O[d] = fmaf(O[d], a, o_c[d] * b).
// out[d] = canon(O[d] / L). It depends on t and the keys alone: a query gets the same bits in a
// prefill of any length, in any chunk, or decoded on its own, whichever kernel runs it.
//
// Versions (the wrapper's AttentionKernel):
//   attention_f32        v1, the baseline and second witness: one block of 128 threads per
//                        (query, head) walks the chunks in order; any head dim.
//   attention_tile_<H>   prefill: one block per (64 queries, head) streams K and V chunks
//                        through shared memory once for all 64 queries (register-tiled f32
//                        FMAs for both products), folding each chunk as it goes; head dims
//                        up to H = 64, 128, 256 (multiples of 4), zero-padded to H.
//   attention_split_tiled  decode, hd % 4 == 0: attention_split with its two products
//                        register-tiled (4 heads x 2 keys, 4 heads x 4 dims a thread).
//   attention_split      decode: one block per (query, kv head, chunk) writes the chunk's
//   attention_combine    partial (m, l, o) for every query head of the group, sharing the
//                        chunk's K and V across them; a second launch folds the partials of
//                        each (query, head) in chunk order.

#include "common.cuh"

#define ATT_CHUNK 64u
#define ATT_THREADS 128u

// The fold step (its one definition; every kernel calls it, the mutant site of this family).
__device__ __forceinline__ float att_fold(float acc, float a, float part, float b) {
#ifdef BITEXACT_MUTANT
    // Broken on purpose (see BITEXACT_MUTANT): the rescale applied after the add.
    return (acc + part * b) * a;
#else
    return fmaf(acc, a, part * b);
#endif
}

extern "C" __global__ void __launch_bounds__(128)
    attention_f32(float* __restrict__ out, const float* __restrict__ q,
                  const float* __restrict__ kc, const float* __restrict__ vc,
                  const u32* __restrict__ qpos, u32 n_heads, u32 n_kv, u32 hd, u32 cap,
                  float scale) {
    bx_grid_begin();
    extern __shared__ float att_o[];  // hd running outputs
    __shared__ float red[ATT_THREADS / 32u];
    __shared__ float se[ATT_CHUNK];
    __shared__ float s_a, s_b, s_l;
    const u32 h = blockIdx.x;
    const u64 qi = blockIdx.y;
    const u32 tid = threadIdx.x;
    const u32 t = qpos[qi];
    const u32 kvh = h / (n_heads / n_kv);
    const float* qv = q + (qi * n_heads + h) * hd;
    const float* K = kc + (u64)kvh * cap * hd;
    const float* V = vc + (u64)kvh * cap * hd;
    float M = 0.0f, L = 0.0f;  // thread 0's fold state

    for (u32 c = 0; c * ATT_CHUNK <= t; ++c) {
        const u32 j0 = c * ATT_CHUNK, n = min(ATT_CHUNK, t + 1u - j0);
        float sj = __uint_as_float(0xff800000u);
        if (tid < n) {
            float p0, p1, p2, p3;
            bx_dot_partials(qv, K + (u64)(j0 + tid) * hd, hd, p0, p1, p2, p3);
            sj = ((p0 + p1) + (p2 + p3)) * scale;
        }
        const float m = bx_block_max<ATT_THREADS>(sj, red);
        if (tid < n) se[tid] = bx_exp(sj - m);
        __syncthreads();
        if (tid == 0) {
            float lp[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            for (u32 j = 0; j < n; ++j) lp[j & 3u] = lp[j & 3u] + se[j];
            const float l = (lp[0] + lp[1]) + (lp[2] + lp[3]);
            if (c == 0) {
                M = m;
                L = l;
            } else {
                const float m2 = fmaxf(M, m);
                const float a = bx_exp(M - m2), b = bx_exp(m - m2);
                L = att_fold(L, a, l, b);
                M = m2;
                s_a = a;
                s_b = b;
            }
            s_l = L;
        }
        __syncthreads();
        for (u32 d = tid; d < hd; d += ATT_THREADS) {
            float o = 0.0f;
            for (u32 j = 0; j < n; ++j) o = fmaf(se[j], V[(u64)(j0 + j) * hd + d], o);
            att_o[d] = c == 0 ? o : att_fold(att_o[d], s_a, o, s_b);
        }
        __syncthreads();
    }
    for (u32 d = tid; d < hd; d += ATT_THREADS)
        out[(qi * n_heads + h) * hd + d] = bx_canon(att_o[d] / s_l);
}

extern "C" __global__ void kv_write_f32(float* __restrict__ kc, float* __restrict__ vc,
                                        const float* __restrict__ k, const float* __restrict__ v,
                                        const u32* __restrict__ pos, u32 n_kv, u32 hd, u32 cap,
                                        u32 row0) {
    bx_grid_begin();
    const u32 idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n_kv * hd) return;
    const u32 kvh = idx / hd, d = idx - kvh * hd;
    const u64 r = (u64)row0 + blockIdx.y;
    const u64 src = r * n_kv * hd + idx;
    const u64 dst = ((u64)kvh * cap + pos[r]) * hd + d;
    kc[dst] = k[src];
    vc[dst] = v[src];
}

// ------------------------------------------------------------------------------------------
// Prefill: 64 queries of one head per block, 256 threads as a 16 x 16 grid (tr, tc).
//   scores  S[64 rows][64 keys]: thread (tr, tc) owns rows 4tr..4tr+3 x keys 4tc..4tc+3; Q and
//           the chunk's K sit transposed in shared memory ([dim][row], [dim][key]).
//   rows    four threads per row (lane p takes keys p, p + 4, ..): the max, the e_j, l_p, and
//           the fold coefficients of the row.
//   values  O[64 rows][H dims]: thread (tr, tc) owns rows 4tr..4tr+3 x dims 64g + 4tc..+3.
// K and then V of a chunk share one buffer (the scores are done before V is loaded).

#define TQ 64u
#define TSTRIDE 68u  // floats per transposed row: 64 + 4 keeps float4 alignment, staggers banks
#define T_THREADS 256u

template <u32 H>
struct TileSmem {
    static constexpr u32 q = H * TSTRIDE;                                   // Qt[H][68]
    static constexpr u32 kv = H * TSTRIDE > ATT_CHUNK * (H + 4u) ? H * TSTRIDE
                                                                 : ATT_CHUNK * (H + 4u);
    static constexpr u32 e = ATT_CHUNK * TSTRIDE;                           // Et[64][68]
    static constexpr u32 floats = q + kv + e + 4u * TQ;                     // + a, b, L, mode
};

template <u32 H>
__device__ __forceinline__ void attention_tile_body(float* __restrict__ out,
                                                    const float* __restrict__ q,
                                                    const float* __restrict__ kc,
                                                    const float* __restrict__ vc,
                                                    const u32* __restrict__ qpos, u32 nq,
                                                    u32 n_heads, u32 n_kv, u32 hd, u32 cap,
                                                    float scale) {
    extern __shared__ __align__(16) float tsm[];
    float* sQ = tsm;
    float* sKV = sQ + TileSmem<H>::q;
    float* sE = sKV + TileSmem<H>::kv;
    float* sA = sE + TileSmem<H>::e;
    float* sB = sA + TQ;
    float* sL = sB + TQ;
    u32* sMode = reinterpret_cast<u32*>(sL + TQ);  // 0: skip the chunk, 1: first, 2: fold
    __shared__ u32 s_tmin, s_tmax;

    constexpr u32 DG = H / 64u;  // float4 groups of dims per thread in the value product
    const u32 tid = threadIdx.x, tr = tid >> 4, tc = tid & 15u;
    const u32 tile = gridDim.x - 1u - blockIdx.x;  // longest tiles first
    const u32 h = blockIdx.y;
    const u32 i0 = tile * TQ;
    const u32 kvh = h / (n_heads / n_kv);
    const float* K = kc + (u64)kvh * cap * hd;
    const float* V = vc + (u64)kvh * cap * hd;
    const u32 hd4 = hd >> 2;

    // Q transposed, zero past hd and past the last query.
    if (tid == 0) {
        s_tmin = 0xffffffffu;
        s_tmax = 0u;
    }
    for (u32 idx = tid; idx < TQ * (H / 4u); idx += T_THREADS) {
        const u32 r = idx % TQ, k4 = idx / TQ;
        float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (i0 + r < nq && k4 < hd4)
            v = *reinterpret_cast<const float4*>(q + ((u64)(i0 + r) * n_heads + h) * hd + 4u * k4);
        sQ[(4u * k4) * TSTRIDE + r] = v.x;
        sQ[(4u * k4 + 1u) * TSTRIDE + r] = v.y;
        sQ[(4u * k4 + 2u) * TSTRIDE + r] = v.z;
        sQ[(4u * k4 + 3u) * TSTRIDE + r] = v.w;
    }
    __syncthreads();
    if (tid < TQ && i0 + tid < nq) {
        atomicMin(&s_tmin, qpos[i0 + tid]);
        atomicMax(&s_tmax, qpos[i0 + tid]);
    }
    __syncthreads();
    const u32 tmin = s_tmin, tmax = s_tmax;
    // Rows past the last query take the tile's largest position: they never force the masked
    // path, and their outputs are not stored.
    u32 trow[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const u32 r = i0 + tr * 4u + i;
        trow[i] = r < nq ? qpos[r] : tmax;
    }
    const u32 rrow = tid >> 2, rp = tid & 3u;  // the row stage's row and lane
    const u32 t_r = i0 + rrow < nq ? qpos[i0 + rrow] : tmax;
    float M = 0.0f, L = 0.0f;  // the row stage's fold state (lane rp == 0)

    float O[4][4 * DG];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int x = 0; x < 4 * (int)DG; ++x) O[i][x] = 0.0f;

    for (u32 c = 0; c * ATT_CHUNK <= tmax; ++c) {
        const u32 j0 = c * ATT_CHUNK;
        // K of the chunk, transposed; zero past hd and past the cache.
        for (u32 idx = tid; idx < ATT_CHUNK * (H / 4u); idx += T_THREADS) {
            const u32 j = idx % ATT_CHUNK, k4 = idx / ATT_CHUNK;
            float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (j0 + j < cap && k4 < hd4)
                v = *reinterpret_cast<const float4*>(K + (u64)(j0 + j) * hd + 4u * k4);
            sKV[(4u * k4) * TSTRIDE + j] = v.x;
            sKV[(4u * k4 + 1u) * TSTRIDE + j] = v.y;
            sKV[(4u * k4 + 2u) * TSTRIDE + j] = v.z;
            sKV[(4u * k4 + 3u) * TSTRIDE + j] = v.w;
        }
        __syncthreads();

        // Scores: partial p runs over dim blocks p, p + 4, .. (zero padding adds +0 exactly).
        {
            float s01[4][4], s2[4][4];
#pragma unroll
            for (int p = 0; p < 4; ++p) {
                float acc[4][4];
#pragma unroll
                for (int i = 0; i < 4; ++i)
#pragma unroll
                    for (int jj = 0; jj < 4; ++jj) acc[i][jj] = 0.0f;
                for (u32 b = p; b * 32u < H; b += 4u) {
#pragma unroll 8
                    for (u32 kk = 0; kk < 32u; ++kk) {
                        const u32 k = b * 32u + kk;
                        const float4 qa = *reinterpret_cast<const float4*>(sQ + k * TSTRIDE + tr * 4u);
                        const float4 ka = *reinterpret_cast<const float4*>(sKV + k * TSTRIDE + tc * 4u);
                        const float qr[4] = {qa.x, qa.y, qa.z, qa.w};
                        const float kr[4] = {ka.x, ka.y, ka.z, ka.w};
#pragma unroll
                        for (int i = 0; i < 4; ++i)
#pragma unroll
                            for (int jj = 0; jj < 4; ++jj)
                                acc[i][jj] = fmaf(kr[jj], qr[i], acc[i][jj]);
                    }
                }
#pragma unroll
                for (int i = 0; i < 4; ++i)
#pragma unroll
                    for (int jj = 0; jj < 4; ++jj) {
                        if (p == 0) s01[i][jj] = acc[i][jj];
                        if (p == 1) s01[i][jj] = s01[i][jj] + acc[i][jj];
                        if (p == 2) s2[i][jj] = acc[i][jj];
                        if (p == 3) s01[i][jj] = (s01[i][jj] + (s2[i][jj] + acc[i][jj])) * scale;
                    }
            }
#pragma unroll
            for (int jj = 0; jj < 4; ++jj)
                *reinterpret_cast<float4*>(sE + (tc * 4u + jj) * TSTRIDE + tr * 4u) =
                    make_float4(s01[0][jj], s01[1][jj], s01[2][jj], s01[3][jj]);
        }
        __syncthreads();

        // V of the chunk (the scores no longer need K), then the row stage.
        for (u32 idx = tid; idx < ATT_CHUNK * (H / 4u); idx += T_THREADS) {
            const u32 j = idx / (H / 4u), k4 = idx % (H / 4u);
            float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (j0 + j < cap && k4 < hd4)
                v = *reinterpret_cast<const float4*>(V + (u64)(j0 + j) * hd + 4u * k4);
            *reinterpret_cast<float4*>(sKV + j * (H + 4u) + 4u * k4) = v;
        }
        {
            const u32 n = t_r >= j0 ? min(ATT_CHUNK, t_r + 1u - j0) : 0u;
            float m = __uint_as_float(0xff800000u);
            for (u32 j = rp; j < n; j += 4u) m = fmaxf(m, sE[j * TSTRIDE + rrow]);
            m = fmaxf(m, __shfl_xor_sync(BX_FULL_MASK, m, 1));
            m = fmaxf(m, __shfl_xor_sync(BX_FULL_MASK, m, 2));
            float lp = 0.0f;
            for (u32 j = rp; j < n; j += 4u) {
                const float e = bx_exp(sE[j * TSTRIDE + rrow] - m);
                sE[j * TSTRIDE + rrow] = e;
                lp = lp + e;
            }
            const float l01 = lp + __shfl_xor_sync(BX_FULL_MASK, lp, 1);
            const float l = l01 + __shfl_xor_sync(BX_FULL_MASK, l01, 2);
            if (rp == 0u) {
                u32 mode = 0u;
                float a = 1.0f, b = 0.0f;
                if (n > 0u && c == 0u) {
                    mode = 1u;
                    M = m;
                    L = l;
                } else if (n > 0u) {
                    mode = 2u;
                    const float m2 = fmaxf(M, m);
                    a = bx_exp(M - m2);
                    b = bx_exp(m - m2);
                    L = att_fold(L, a, l, b);
                    M = m2;
                }
                sA[rrow] = a;
                sB[rrow] = b;
                sL[rrow] = L;
                sMode[rrow] = mode;
            }
        }
        __syncthreads();

        // Values: o = the chunk's E x V for the thread's 4 rows x 4 DG dims, then the fold.
        {
            float o[4][4 * DG];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int x = 0; x < 4 * (int)DG; ++x) o[i][x] = 0.0f;
            const u32 jn = min(ATT_CHUNK, tmax + 1u - j0);
            const bool full = j0 + ATT_CHUNK <= tmin + 1u;  // every row sees the whole chunk
            if (full) {
#pragma unroll 4
                for (u32 j = 0; j < ATT_CHUNK; ++j) {
                    const float4 ev = *reinterpret_cast<const float4*>(sE + j * TSTRIDE + tr * 4u);
                    const float er[4] = {ev.x, ev.y, ev.z, ev.w};
#pragma unroll
                    for (u32 g = 0; g < DG; ++g) {
                        const float4 vv =
                            *reinterpret_cast<const float4*>(sKV + j * (H + 4u) + 64u * g + tc * 4u);
                        const float vr[4] = {vv.x, vv.y, vv.z, vv.w};
#pragma unroll
                        for (int i = 0; i < 4; ++i)
#pragma unroll
                            for (int x = 0; x < 4; ++x)
                                o[i][4 * g + x] = fmaf(er[i], vr[x], o[i][4 * g + x]);
                    }
                }
            } else {
                for (u32 j = 0; j < jn; ++j) {
                    const float4 ev = *reinterpret_cast<const float4*>(sE + j * TSTRIDE + tr * 4u);
                    const float er[4] = {ev.x, ev.y, ev.z, ev.w};
#pragma unroll
                    for (u32 g = 0; g < DG; ++g) {
                        const float4 vv =
                            *reinterpret_cast<const float4*>(sKV + j * (H + 4u) + 64u * g + tc * 4u);
                        const float vr[4] = {vv.x, vv.y, vv.z, vv.w};
#pragma unroll
                        for (int i = 0; i < 4; ++i) {
                            const bool live = j0 + j <= trow[i];
#pragma unroll
                            for (int x = 0; x < 4; ++x)
                                o[i][4 * g + x] =
                                    live ? fmaf(er[i], vr[x], o[i][4 * g + x]) : o[i][4 * g + x];
                        }
                    }
                }
            }
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const u32 r = tr * 4u + i;
                const u32 mode = sMode[r];
                const float a = sA[r], b = sB[r];
#pragma unroll
                for (int x = 0; x < 4 * (int)DG; ++x) {
                    if (mode == 1u) O[i][x] = o[i][x];
                    if (mode == 2u) O[i][x] = att_fold(O[i][x], a, o[i][x], b);
                }
            }
        }
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const u32 r = tr * 4u + i;
        if (i0 + r >= nq) continue;
        const float l = sL[r];
        float* orow = out + ((u64)(i0 + r) * n_heads + h) * hd;
#pragma unroll
        for (u32 g = 0; g < DG; ++g)
#pragma unroll
            for (int x = 0; x < 4; ++x) {
                const u32 d = 64u * g + tc * 4u + x;
                if (d < hd) orow[d] = bx_canon(O[i][4 * g + x] / l);
            }
    }
}

// Two blocks per SM where the registers allow it (head dims up to 128; 256 needs more).
#define TILE_ENTRY(H, MIN_BLOCKS)                                                              \
    extern "C" __global__ void __launch_bounds__(256, MIN_BLOCKS) attention_tile_##H(          \
        float* __restrict__ out, const float* __restrict__ q, const float* __restrict__ kc,    \
        const float* __restrict__ vc, const u32* __restrict__ qpos, u32 nq, u32 n_heads,       \
        u32 n_kv, u32 hd, u32 cap, float scale) {                                              \
        bx_grid_begin();                                                                       \
        attention_tile_body<H>(out, q, kc, vc, qpos, nq, n_heads, n_kv, hd, cap, scale);       \
    }

TILE_ENTRY(64, 2)
TILE_ENTRY(128, 2)
TILE_ENTRY(256, 1)

// ------------------------------------------------------------------------------------------
// Decode: block (chunk c, kv head, query) computes the chunk partial of each of the group's G
// query heads. partial[((i * n_heads + h) * n_chunks + c) * (hd + 2) + ..] = m, l, o[0..hd].
// Shared memory: q [G][hd], K [64][hd + 1] (padded: a warp's lanes read 32 keys at one dim),
// V [64][hd], e [G][64].

#define S_THREADS 256u

extern "C" __global__ void __launch_bounds__(256)
    attention_split(float* __restrict__ part, const float* __restrict__ q,
                    const float* __restrict__ kc, const float* __restrict__ vc,
                    const u32* __restrict__ qpos, u32 n_heads, u32 n_kv, u32 hd, u32 cap,
                    float scale, u32 n_chunks, u32 row0) {
    bx_grid_begin();
    extern __shared__ __align__(16) float ssm[];
    const u32 G = n_heads / n_kv;
    float* sQ = ssm;
    float* sK = sQ + G * hd;
    // V starts on a 16-byte boundary (float4 rows when hd % 4 == 0).
    float* sV = sK + ((ATT_CHUNK * (hd + 1u) + 3u) & ~3u);
    float* sE = sV + ATT_CHUNK * hd;
    const u32 c = blockIdx.x, kvh = blockIdx.y;
    const u64 qi = (u64)row0 + blockIdx.z;
    const u32 tid = threadIdx.x;
    const u32 t = qpos[qi];
    const u32 j0 = c * ATT_CHUNK;
    if (j0 > t) return;  // the whole block: this chunk holds none of the query's keys
    const u32 n = min(ATT_CHUNK, t + 1u - j0);
    const u32 h0 = kvh * G;
    const float* K = kc + ((u64)kvh * cap + j0) * hd;
    const float* V = vc + ((u64)kvh * cap + j0) * hd;

    // Every load of a batch is issued before the first store, so the chunk arrives in one or
    // two round trips: a plain loop waited out each iteration's load (ncu: 20 us at context
    // 512, 2 MB).
    {
        const float* Q = q + (qi * n_heads + h0) * hd;
        float qr[4];
        for (u32 base = 0; base < G * hd; base += 4u * S_THREADS) {
#pragma unroll
            for (u32 u = 0; u < 4u; ++u) {
                const u32 idx = base + u * S_THREADS + tid;
                qr[u] = idx < G * hd ? Q[idx] : 0.0f;
            }
#pragma unroll
            for (u32 u = 0; u < 4u; ++u) {
                const u32 idx = base + u * S_THREADS + tid;
                if (idx < G * hd) sQ[idx] = qr[u];
            }
        }
    }
    if ((hd & 3u) == 0u) {
        // float4 pieces (hd % 4 == 0: every row of the cache starts 16-byte aligned).
        const float4* K4 = reinterpret_cast<const float4*>(K);
        const float4* V4 = reinterpret_cast<const float4*>(V);
        const u32 n4 = n * hd / 4u;
        for (u32 base = 0; base < n4; base += 8u * S_THREADS) {
            float4 kr[8], vr[8];
#pragma unroll
            for (u32 u = 0; u < 8u; ++u) {
                const u32 idx = base + u * S_THREADS + tid;
                if (idx < n4) {
                    kr[u] = K4[idx];
                    vr[u] = V4[idx];
                }
            }
#pragma unroll
            for (u32 u = 0; u < 8u; ++u) {
                const u32 idx = base + u * S_THREADS + tid;
                if (idx < n4) {
                    const u32 e = 4u * idx, j = e / hd, d = e - j * hd;
                    float* dk = sK + j * (hd + 1u) + d;
                    dk[0] = kr[u].x;
                    dk[1] = kr[u].y;
                    dk[2] = kr[u].z;
                    dk[3] = kr[u].w;
                    reinterpret_cast<float4*>(sV)[idx] = vr[u];
                }
            }
        }
    } else {
        for (u32 idx = tid; idx < n * hd; idx += S_THREADS) {
            const u32 j = idx / hd, d = idx - j * hd;
            sK[j * (hd + 1u) + d] = K[idx];
            sV[idx] = V[idx];
        }
    }
    __syncthreads();

    for (u32 idx = tid; idx < G * ATT_CHUNK; idx += S_THREADS) {
        const u32 g = idx / ATT_CHUNK, j = idx % ATT_CHUNK;
        if (j < n) {
            float p0, p1, p2, p3;
            bx_dot_partials(sQ + g * hd, sK + j * (hd + 1u), hd, p0, p1, p2, p3);
            sE[idx] = ((p0 + p1) + (p2 + p3)) * scale;
        }
    }
    __syncthreads();

    // Rows: four lanes per query head (every thread takes part in the shuffles).
    for (u32 base = 0; base < G * 4u; base += S_THREADS) {
        const u32 g = (base + tid) >> 2, p = tid & 3u;
        const bool live = g < G;
        float* se = sE + (live ? g : 0u) * ATT_CHUNK;
        float m = __uint_as_float(0xff800000u);
        if (live)
            for (u32 j = p; j < n; j += 4u) m = fmaxf(m, se[j]);
        m = fmaxf(m, __shfl_xor_sync(BX_FULL_MASK, m, 1));
        m = fmaxf(m, __shfl_xor_sync(BX_FULL_MASK, m, 2));
        float lp = 0.0f;
        if (live)
            for (u32 j = p; j < n; j += 4u) {
                const float e = bx_exp(se[j] - m);
                se[j] = e;
                lp = lp + e;
            }
        const float l01 = lp + __shfl_xor_sync(BX_FULL_MASK, lp, 1);
        const float l = l01 + __shfl_xor_sync(BX_FULL_MASK, l01, 2);
        if (live && p == 0u) {
            float* dst = part + ((qi * n_heads + h0 + g) * n_chunks + c) * (u64)(hd + 2u);
            dst[0] = m;
            dst[1] = l;
        }
    }
    __syncthreads();

    for (u32 idx = tid; idx < G * hd; idx += S_THREADS) {
        const u32 g = idx / hd, d = idx - g * hd;
        const float* se = sE + g * ATT_CHUNK;
        float o = 0.0f;
        for (u32 j = 0; j < n; ++j) o = fmaf(se[j], sV[j * hd + d], o);
        part[((qi * n_heads + h0 + g) * n_chunks + c) * (u64)(hd + 2u) + 2u + d] = o;
    }
}

// ------------------------------------------------------------------------------------------
// attention_split_tiled: attention_split's grid, loads, softmax and output for hd % 4 == 0,
// its two products register-tiled. attention_split reads two shared words per FMA (a query
// head's q and a key's k in the scores, a head's e and a value's v in the output): at context
// 8192 its 512 blocks were bound by shared-memory traffic (39 us a layer in ncu). Here a
// thread takes 4 heads x 2 keys of the scores (float4 of q and k: 6 loads for 32 FMAs) and 4
// heads x 4 dims of the output (4 e and one float4 of v for 16 FMAs). Every dot and every
// chain keeps the canonical order: partial p of a score takes its blocks b % 4 == p in
// increasing k, each fmaf in increasing k; o[d] takes the keys in increasing j.
// Shared memory: q [Gp][hd] (Gp = G rounded up to 4, rows past G zero), K [64][hd + 4]
// (lanes read 32 consecutive keys' float4 without conflicts), V [64][hd], e [Gp][64].

extern "C" __global__ void __launch_bounds__(256)
    attention_split_tiled(float* __restrict__ part, const float* __restrict__ q,
                          const float* __restrict__ kc, const float* __restrict__ vc,
                          const u32* __restrict__ qpos, u32 n_heads, u32 n_kv, u32 hd, u32 cap,
                          float scale, u32 n_chunks, u32 row0) {
    bx_grid_begin();
    extern __shared__ __align__(16) float tsm[];
    const u32 G = n_heads / n_kv, Gp = (G + 3u) & ~3u;
    const u32 ks = hd + 4u;  // K row stride
    float* sQ = tsm;
    float* sK = sQ + Gp * hd;
    float* sV = sK + ATT_CHUNK * ks;
    float* sE = sV + ATT_CHUNK * hd;
    const u32 c = blockIdx.x, kvh = blockIdx.y;
    const u64 qi = (u64)row0 + blockIdx.z;
    const u32 tid = threadIdx.x;
    const u32 t = qpos[qi];
    const u32 j0 = c * ATT_CHUNK;
    if (j0 > t) return;  // the whole block: this chunk holds none of the query's keys
    const u32 n = min(ATT_CHUNK, t + 1u - j0);
    const u32 h0 = kvh * G;
    const float4* Q4 = reinterpret_cast<const float4*>(q + (qi * n_heads + h0) * hd);
    const float4* K4 = reinterpret_cast<const float4*>(kc + ((u64)kvh * cap + j0) * hd);
    const float4* V4 = reinterpret_cast<const float4*>(vc + ((u64)kvh * cap + j0) * hd);
    const u32 hd4 = hd / 4u;
    // Loads: every load of a batch before the first store (one or two round trips).
    for (u32 base = 0; base < Gp * hd4; base += 4u * S_THREADS) {
        float4 r[4];
#pragma unroll
        for (u32 u = 0; u < 4u; ++u) {
            const u32 idx = base + u * S_THREADS + tid;
            r[u] = idx < G * hd4 ? Q4[idx] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
#pragma unroll
        for (u32 u = 0; u < 4u; ++u) {
            const u32 idx = base + u * S_THREADS + tid;
            if (idx < Gp * hd4) reinterpret_cast<float4*>(sQ)[idx] = r[u];
        }
    }
    const u32 n4 = n * hd4;
    for (u32 base = 0; base < n4; base += 8u * S_THREADS) {
        float4 kr[8], vr[8];
#pragma unroll
        for (u32 u = 0; u < 8u; ++u) {
            const u32 idx = base + u * S_THREADS + tid;
            if (idx < n4) {
                kr[u] = K4[idx];
                vr[u] = V4[idx];
            }
        }
#pragma unroll
        for (u32 u = 0; u < 8u; ++u) {
            const u32 idx = base + u * S_THREADS + tid;
            if (idx < n4) {
                const u32 j = idx / hd4, d4 = idx - j * hd4;
                *reinterpret_cast<float4*>(sK + j * ks + 4u * d4) = kr[u];
                reinterpret_cast<float4*>(sV)[idx] = vr[u];
            }
        }
    }
    __syncthreads();

    // Scores: thread (head group gg of 4, lane jl) takes keys jl and jl + 32 of heads 4gg..+3.
    for (u32 w = tid; w < (Gp / 4u) * 32u; w += S_THREADS) {
        const u32 gg = w >> 5, jl = w & 31u;
        float acc[4][2][4];
#pragma unroll
        for (int g = 0; g < 4; ++g)
#pragma unroll
            for (int jj = 0; jj < 2; ++jj)
#pragma unroll
                for (int p = 0; p < 4; ++p) acc[g][jj][p] = 0.0f;
        const float* qb = sQ + 4u * gg * hd;
        const float* kb0 = sK + jl * ks;
        const float* kb1 = sK + (jl + 32u) * ks;
        for (u32 b0 = 0; b0 < hd; b0 += 128u) {
#pragma unroll
            for (int p = 0; p < 4; ++p) {
                const u32 k0 = min(b0 + 32u * (u32)p, hd), k1 = min(k0 + 32u, hd);
                for (u32 k = k0; k < k1; k += 4u) {
                    float4 qv[4];
#pragma unroll
                    for (int g = 0; g < 4; ++g) qv[g] = *reinterpret_cast<const float4*>(qb + g * hd + k);
                    const float4 kv0 = *reinterpret_cast<const float4*>(kb0 + k);
                    const float4 kv1 = *reinterpret_cast<const float4*>(kb1 + k);
#pragma unroll
                    for (int g = 0; g < 4; ++g) {
                        float a0 = acc[g][0][p], a1 = acc[g][1][p];
                        a0 = fmaf(kv0.x, qv[g].x, a0);
                        a1 = fmaf(kv1.x, qv[g].x, a1);
                        a0 = fmaf(kv0.y, qv[g].y, a0);
                        a1 = fmaf(kv1.y, qv[g].y, a1);
                        a0 = fmaf(kv0.z, qv[g].z, a0);
                        a1 = fmaf(kv1.z, qv[g].z, a1);
                        a0 = fmaf(kv0.w, qv[g].w, a0);
                        a1 = fmaf(kv1.w, qv[g].w, a1);
                        acc[g][0][p] = a0;
                        acc[g][1][p] = a1;
                    }
                }
            }
        }
#pragma unroll
        for (int g = 0; g < 4; ++g)
#pragma unroll
            for (int jj = 0; jj < 2; ++jj) {
                const u32 gh = 4u * gg + (u32)g, j = jl + 32u * (u32)jj;
                if (gh < G && j < n)
                    sE[gh * ATT_CHUNK + j] =
                        ((acc[g][jj][0] + acc[g][jj][1]) + (acc[g][jj][2] + acc[g][jj][3])) * scale;
            }
    }
    __syncthreads();

    // Rows: attention_split's softmax of each head's scores, unchanged.
    for (u32 base = 0; base < G * 4u; base += S_THREADS) {
        const u32 g = (base + tid) >> 2, p = tid & 3u;
        const bool live = g < G;
        float* se = sE + (live ? g : 0u) * ATT_CHUNK;
        float m = __uint_as_float(0xff800000u);
        if (live)
            for (u32 j = p; j < n; j += 4u) m = fmaxf(m, se[j]);
        m = fmaxf(m, __shfl_xor_sync(BX_FULL_MASK, m, 1));
        m = fmaxf(m, __shfl_xor_sync(BX_FULL_MASK, m, 2));
        float lp = 0.0f;
        if (live)
            for (u32 j = p; j < n; j += 4u) {
                const float e = bx_exp(se[j] - m);
                se[j] = e;
                lp = lp + e;
            }
        const float l01 = lp + __shfl_xor_sync(BX_FULL_MASK, lp, 1);
        const float l = l01 + __shfl_xor_sync(BX_FULL_MASK, l01, 2);
        if (live && p == 0u) {
            float* dst = part + ((qi * n_heads + h0 + g) * n_chunks + c) * (u64)(hd + 2u);
            dst[0] = m;
            dst[1] = l;
        }
    }
    __syncthreads();

    // Output: thread (head group gg, dims 4dq..4dq+3) over the chunk's keys in order.
    for (u32 w = tid; w < (Gp / 4u) * hd4; w += S_THREADS) {
        const u32 gg = w / hd4, dq = w - gg * hd4;
        float o[4][4];
#pragma unroll
        for (int g = 0; g < 4; ++g)
#pragma unroll
            for (int i = 0; i < 4; ++i) o[g][i] = 0.0f;
        const float* eb = sE + 4u * gg * ATT_CHUNK;
        for (u32 j = 0; j < n; ++j) {
            const float4 v4 = *reinterpret_cast<const float4*>(sV + j * hd + 4u * dq);
#pragma unroll
            for (int g = 0; g < 4; ++g) {
                const float e = eb[g * ATT_CHUNK + j];
                o[g][0] = fmaf(e, v4.x, o[g][0]);
                o[g][1] = fmaf(e, v4.y, o[g][1]);
                o[g][2] = fmaf(e, v4.z, o[g][2]);
                o[g][3] = fmaf(e, v4.w, o[g][3]);
            }
        }
#pragma unroll
        for (int g = 0; g < 4; ++g) {
            const u32 gh = 4u * gg + (u32)g;
            if (gh < G) {
                float* dst = part + ((qi * n_heads + h0 + gh) * n_chunks + c) * (u64)(hd + 2u) + 2u + 4u * dq;
#pragma unroll
                for (int i = 0; i < 4; ++i) dst[i] = o[g][i];
            }
        }
    }
}

// Fold of the chunk partials of one (query, head, slice of 32 dims), 128 threads: block
// (h * n_slices + s, query) for dims 32 s .. 32 s + 31. A block per (query, head) waited out one
// dependent load per chunk (54 us a layer at context 8192 in ncu, 32 blocks on 132 SMs): here
// the slice's partials of up to CMB_STAGE chunks are copied into shared memory by cp.async,
// every copy in flight at once and issued first, while the chunks' m and l are staged and the
// prefix maxima M_c formed (any order: fmaxf is exact and m_c is never NaN) by a block scan;
// a_c = bx_exp(M_(c-1) - M_c), b_c = bx_exp(m_c - M_c) in parallel; then lane d of warp 0 runs
// the folds of L and of O[d] in chunk order from shared memory. The bits are the reference's.

#define CMB_THREADS 128u
#define CMB_DIMS 32u
#define CMB_STAGE 128u

__device__ __forceinline__ void cp_async4(float* smem, const float* gmem) {
    const u32 dst = (u32)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(dst), "l"(gmem));
}

// Copies the slice's partials of chunks c0 .. c0 + count (count <= CMB_STAGE) into so[c][dd].
__device__ __forceinline__ void cmb_stage(float* so, const float* P, u64 stride, u32 d0,
                                          u32 width, u32 c0, u32 count, u32 tid) {
    for (u32 i = tid; i < count * CMB_DIMS; i += CMB_THREADS) {
        const u32 c = i / CMB_DIMS, dd = i - c * CMB_DIMS;
        if (dd < width) cp_async4(so + i, P + (u64)(c0 + c) * stride + 2u + d0 + dd);
    }
    asm volatile("cp.async.commit_group;");
}

extern "C" __global__ void __launch_bounds__(128)
    attention_combine(float* __restrict__ out, const float* __restrict__ part,
                      const u32* __restrict__ qpos, u32 n_heads, u32 hd, u32 n_chunks,
                      u32 row0) {
    bx_grid_begin();
    // so[CMB_STAGE][32], then m, l, M, a, b per chunk, then 4 warp maxima
    extern __shared__ __align__(16) float csm[];
    const u32 n_slices = (hd + CMB_DIMS - 1u) / CMB_DIMS;
    const u32 h = blockIdx.x / n_slices, d0 = (blockIdx.x - h * n_slices) * CMB_DIMS;
    const u32 width = min(CMB_DIMS, hd - d0);
    const u64 qi = (u64)row0 + blockIdx.y;
    const u32 tid = threadIdx.x, lane = tid & 31u, warp = tid >> 5;
    const u32 nc = qpos[qi] / ATT_CHUNK + 1u;
    const u64 stride = hd + 2u;
    const float* P = part + (qi * n_heads + h) * n_chunks * stride;
    float* so = csm;
    float* sm = so + CMB_STAGE * CMB_DIMS;
    float* sl = sm + nc;
    float* sM = sl + nc;
    float* sa = sM + nc;
    float* sb = sa + nc;
    float* swm = sb + nc;
    // The first batch (chunks 1 ..) goes out before anything else is read.
    cmb_stage(so, P, stride, d0, width, 1u, min(CMB_STAGE, nc - 1u), tid);
    for (u32 c = tid; c < nc; c += CMB_THREADS) {
        sm[c] = P[c * stride];
        sl[c] = P[c * stride + 1u];
    }
    __syncthreads();
    // Inclusive prefix maxima, 128 chunks a round: a warp scan, then the warps before it and
    // the rounds before.
    float carry = __uint_as_float(0xff800000u);
    for (u32 base = 0; base < nc; base += CMB_THREADS) {
        const u32 c = base + tid;
        float v = c < nc ? sm[c] : __uint_as_float(0xff800000u);
#pragma unroll
        for (u32 off = 1; off < 32u; off <<= 1) {
            const float u = __shfl_up_sync(BX_FULL_MASK, v, off);
            if (lane >= off) v = fmaxf(v, u);
        }
        if (lane == 31u) swm[warp] = v;
        __syncthreads();
        float before = carry;
        for (u32 w = 0; w < warp; ++w) before = fmaxf(before, swm[w]);
        if (c < nc) sM[c] = fmaxf(before, v);
        for (u32 w = 0; w < CMB_THREADS / 32u; ++w) carry = fmaxf(carry, swm[w]);
        __syncthreads();  // swm is rewritten by the next round
    }
    for (u32 c = tid + 1u; c < nc; c += CMB_THREADS) {
        sa[c] = bx_exp(sM[c - 1u] - sM[c]);
        sb[c] = bx_exp(sm[c] - sM[c]);
    }
    float L = 0.0f, O = 0.0f;
    if (warp == 0u) {
        L = sl[0];
        if (lane < width) O = P[2u + d0 + lane];
    }
    for (u32 c0 = 1; c0 < nc; c0 += CMB_STAGE) {
        const u32 count = min(CMB_STAGE, nc - c0);
        asm volatile("cp.async.wait_all;" ::: "memory");
        __syncthreads();  // every thread's copies, and (first batch) sa, sb
        if (warp == 0u) {
            // Lanes fold L redundantly (broadcast reads) so that none waits for another.
#pragma unroll 8
            for (u32 c = 0; c < count; ++c) {
                L = att_fold(L, sa[c0 + c], sl[c0 + c], sb[c0 + c]);
                O = att_fold(O, sa[c0 + c], so[c * CMB_DIMS + lane], sb[c0 + c]);
            }
        }
        if (c0 + CMB_STAGE < nc) {
            __syncthreads();  // the batch is folded before it is overwritten
            cmb_stage(so, P, stride, d0, width, c0 + CMB_STAGE, min(CMB_STAGE, nc - c0 - CMB_STAGE),
                      tid);
        }
    }
    if (warp == 0u && lane < width) out[(qi * n_heads + h) * hd + d0 + lane] = bx_canon(O / L);
}
