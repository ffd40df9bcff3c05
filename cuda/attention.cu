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
//   attention_tile2_<H>[x2]  prefill v2 (the wrapper's Tile2): the tile kernel with K and V
//                        copied by cp.async while the other product runs, swizzled row-major
//                        Q and K, warps of 4 x 8 threads, and two heads of a kv group a block
//                        (x2, even groups, H <= 128) sharing each chunk.
//   attention_split_tiled  decode, hd % 4 == 0: attention_split with its two products
//                        register-tiled (a partial of 4 heads x 2 keys, then 1 head x 4
//                        dims a thread).
//   attention_split_async  decode v2 (the wrapper's Split2): attention_split_tiled with K and V
//                        copied by cp.async (no staging registers; V lands during the scores).
//   attention_split      decode: one block per (query, kv head, chunk) writes the chunk's
//   attention_combine    partial (m, l, o) for every query head of the group, sharing the
//                        chunk's K and V across them; a second launch folds the partials of
//                        each (query, head) in chunk order.
//   attention_combine_q8 the combine writing beside out its Q8 quantization (hd % 32 == 0):
//                        the output product's input, so it launches no quantization.

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

// The two stages every tile kernel runs per chunk after its scores sit in sE ([64 keys][68],
// column = row of the tile): one definition each, so v1 and v2 cannot drift apart.

// The row stage: four threads per row (rrow, lane rp takes keys rp, rp + 4, ..) form the
// chunk's max, its e_j (in place in sE), l_p and l, fold (M, L) (lane 0's registers) and leave
// the row's fold coefficients a, b, its L and its mode (0: skip, 1: first, 2: fold) in
// sA, sB, sL, sMode. t_r: the row's position; c, j0: the chunk and its first key.
__device__ __forceinline__ void tile_row_stage(float* __restrict__ sE, float* __restrict__ sA,
                                               float* __restrict__ sB, float* __restrict__ sL,
                                               u32* __restrict__ sMode, u32 rrow, u32 rp,
                                               u32 t_r, u32 c, u32 j0, float& M, float& L) {
    constexpr u32 ES = 68u;
    const u32 n = t_r >= j0 ? min(ATT_CHUNK, t_r + 1u - j0) : 0u;
    float m = __uint_as_float(0xff800000u);
    for (u32 j = rp; j < n; j += 4u) m = fmaxf(m, sE[j * ES + rrow]);
    m = fmaxf(m, __shfl_xor_sync(BX_FULL_MASK, m, 1));
    m = fmaxf(m, __shfl_xor_sync(BX_FULL_MASK, m, 2));
    float lp = 0.0f;
    for (u32 j = rp; j < n; j += 4u) {
        const float e = bx_exp(sE[j * ES + rrow] - m);
        sE[j * ES + rrow] = e;
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

// The values: o = the chunk's E x V for rows 4tr..4tr+3 x dims 64g + 4tc..+3 (V row j at
// sV + j * VS), each an fmaf chain from +0 in increasing j (the causal mask by trow where the
// chunk is cut), then the fold into O by the rows' modes and coefficients.
template <u32 DG, u32 VS>
__device__ __forceinline__ void tile_values_fold(float (&O)[4][4 * DG], const float* __restrict__ sE,
                                                 const float* __restrict__ sV,
                                                 const float* __restrict__ sA,
                                                 const float* __restrict__ sB,
                                                 const u32* __restrict__ sMode, u32 tr, u32 tc,
                                                 u32 j0, u32 tmin, u32 tmax,
                                                 const u32 (&trow)[4]) {
    constexpr u32 ES = 68u;
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
            const float4 ev = *reinterpret_cast<const float4*>(sE + j * ES + tr * 4u);
            const float er[4] = {ev.x, ev.y, ev.z, ev.w};
#pragma unroll
            for (u32 g = 0; g < DG; ++g) {
                const float4 vv = *reinterpret_cast<const float4*>(sV + j * VS + 64u * g + tc * 4u);
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
            const float4 ev = *reinterpret_cast<const float4*>(sE + j * ES + tr * 4u);
            const float er[4] = {ev.x, ev.y, ev.z, ev.w};
#pragma unroll
            for (u32 g = 0; g < DG; ++g) {
                const float4 vv = *reinterpret_cast<const float4*>(sV + j * VS + 64u * g + tc * 4u);
                const float vr[4] = {vv.x, vv.y, vv.z, vv.w};
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const bool live = j0 + j <= trow[i];
#pragma unroll
                    for (int x = 0; x < 4; ++x)
                        o[i][4 * g + x] = live ? fmaf(er[i], vr[x], o[i][4 * g + x]) : o[i][4 * g + x];
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
        tile_row_stage(sE, sA, sB, sL, sMode, rrow, rp, t_r, c, j0, M, L);
        __syncthreads();

        // Values: o = the chunk's E x V for the thread's 4 rows x 4 DG dims, then the fold.
        tile_values_fold<DG, H + 4u>(O, sE, sKV, sA, sB, sMode, tr, tc, j0, tmin, tmax, trow);
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

// The parameters of every prefill kernel, v1 and v2, declared once (build.rs makes the
// launch's TileArgs of this list): pages is read by the _paged kernels alone (null for the
// others).
#define TILE_PARAMS                                                                            \
    float* __restrict__ out, const float* __restrict__ q, const float* __restrict__ kc,        \
        const float* __restrict__ vc, const u32* __restrict__ qpos, u32 nq, u32 n_heads,       \
        u32 n_kv, u32 hd, u32 cap, float scale, const u32* __restrict__ pages

// Two blocks per SM where the registers allow it (head dims up to 128; 256 needs more).
#define TILE_ENTRY(H, MIN_BLOCKS)                                                              \
    extern "C" __global__ void __launch_bounds__(256, MIN_BLOCKS) attention_tile_##H(          \
        TILE_PARAMS) {                                                                         \
        bx_grid_begin();                                                                       \
        attention_tile_body<H>(out, q, kc, vc, qpos, nq, n_heads, n_kv, hd, cap, scale);       \
    }

TILE_ENTRY(64, 2)
TILE_ENTRY(128, 2)
TILE_ENTRY(256, 1)

// ------------------------------------------------------------------------------------------
// Prefill v2: one block per (64 queries, HPB heads of one kv group), 256 threads a head. The
// chunk's K and V arrive by cp.async, each while the other product runs (V of chunk c during
// its scores, K of chunk c + 1 during its values), and the HPB heads share them. Q and K sit
// row-major with their float4 columns XOR-swizzled by row (column c of row r at c ^ (r & 7)),
// so the strided rows a warp reads fall in distinct banks; V row-major as it is.
//   scores  S[64 rows][64 keys]: thread (tr, tc) owns rows tr + 16i x keys tc + 16jj.
//   rows    four threads per row (lane p takes keys p, p + 4, ..): the max, the e_j, l_p, and
//           the fold coefficients of the row.
//   values  O[64 rows][H dims]: thread (tr, tc) owns rows 4tr..4tr+3 x dims 64g + 4tc..+3.
// A warp spans 4 tr x 8 tc in both products: its float4 reads touch 4 and 8 distinct
// addresses, one wavefront each, per 64 (scores, 4 dims) or 16 DG (values, 1 key) FMAs.

#define ESTRIDE 68u  // floats per row of E: 64 + 4 keeps the score stores conflict-free
#define T2_HEAD_THREADS 256u

template <u32 H, u32 HPB>
struct Tile2Smem {
    static constexpr u32 k = ATT_CHUNK * H;        // K [64][H], swizzled
    static constexpr u32 v = ATT_CHUNK * H;        // V [64][H]
    static constexpr u32 q = TQ * H;               // per head: Q [64][H], swizzled
    static constexpr u32 e = ATT_CHUNK * ESTRIDE;  // per head: E [64 keys][68]
    static constexpr u32 head = q + e + 4u * TQ;   // per head: Q, E, a, b, L, mode
    static constexpr u32 floats = k + v + HPB * head;
};

// Row r's float4 column c in a swizzled [rows][H] array (float4 units).
template <u32 H>
__device__ __forceinline__ u32 tile_swz(u32 r, u32 c) {
    return r * (H / 4u) + (c ^ (r & 7u));
}

__device__ __forceinline__ void tile_cp16(float* smem, const float* gmem, bool ok) {
    // Zero-filled (src-size 0) where the row or the dims lie past the data; the address is
    // then never read.
    const u32 dst = (u32)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(gmem),
                 "r"(ok ? 16u : 0u));
}
__device__ __forceinline__ void tile_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void tile_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// Cache rows r0..r0 + 63 of a [cap, hd] cache into [64][H] (swizzled or not), zero past cap
// and hd. r0: the chunk's first position (one sequence a cache), or its page's first row.
template <u32 H, bool SWZ>
__device__ __forceinline__ void tile_copy_chunk(float* dst, const float* src, u32 r0, u32 cap,
                                                u32 hd4, u32 hd, u32 tid, u32 nthreads) {
    for (u32 idx = tid; idx < ATT_CHUNK * (H / 4u); idx += nthreads) {
        const u32 j = idx / (H / 4u), c = idx % (H / 4u);
        const bool ok = r0 + j < cap && c < hd4;
        const u32 at = SWZ ? tile_swz<H>(j, c) : j * (H / 4u) + c;
        tile_cp16(dst + 4u * at, ok ? src + (u64)(r0 + j) * hd + 4u * c : src, ok);
    }
}

// PAGED (attention_tile2_*_paged): the launch's queries are one sequence's, whose chunk c sits
// in cache page pages[c] (rows 64 * pages[c] ..); positions, and so every bit, as before.
template <u32 H, u32 HPB, bool PAGED>
__device__ __forceinline__ void attention_tile2_body(float* __restrict__ out,
                                                    const float* __restrict__ q,
                                                    const float* __restrict__ kc,
                                                    const float* __restrict__ vc,
                                                    const u32* __restrict__ qpos, u32 nq,
                                                    u32 n_heads, u32 n_kv, u32 hd, u32 cap,
                                                    float scale, const u32* __restrict__ pages) {
    using S = Tile2Smem<H, HPB>;
    extern __shared__ __align__(16) float tsm[];
    constexpr u32 NT = HPB * T2_HEAD_THREADS;
    constexpr u32 DG = H / 64u;  // float4 groups of dims per thread in the value product
    constexpr u32 C4 = H / 4u;   // float4 columns of a row
    float* sK = tsm;
    float* sV = sK + S::k;
    __shared__ u32 s_tmin, s_tmax;

    const u32 tid = threadIdx.x, hs = tid / T2_HEAD_THREADS, tl = tid % T2_HEAD_THREADS;
    const u32 w = tl >> 5, ln = tl & 31u;
    const u32 tr = (w >> 1) * 4u + (ln >> 3), tc = (w & 1u) * 8u + (ln & 7u);
    float* sQ = sV + S::v + hs * S::head;
    float* sE = sQ + S::q;
    float* sA = sE + S::e;
    float* sB = sA + TQ;
    float* sL = sB + TQ;
    u32* sMode = reinterpret_cast<u32*>(sL + TQ);  // 0: skip the chunk, 1: first, 2: fold

    const u32 tile = gridDim.x - 1u - blockIdx.x;  // longest tiles first
    const u32 h = blockIdx.y * HPB + hs;
    const u32 i0 = tile * TQ;
    const u32 kvh = (blockIdx.y * HPB) / (n_heads / n_kv);
    const float* K = kc + (u64)kvh * cap * hd;
    const float* V = vc + (u64)kvh * cap * hd;
    const u32 hd4 = hd >> 2;

    // Q of every head of the block and K of chunk 0: the first copy group.
    for (u32 idx = tid; idx < HPB * TQ * C4; idx += NT) {
        const u32 hh = idx / (TQ * C4), r = (idx / C4) % TQ, c = idx % C4;
        const bool ok = i0 + r < nq && c < hd4;
        const float* src = q + ((u64)(i0 + r) * n_heads + blockIdx.y * HPB + hh) * hd + 4u * c;
        tile_cp16(sV + S::v + hh * S::head + 4u * tile_swz<H>(r, c), ok ? src : q, ok);
    }
    // Chunk c's first cache row.
    auto chunk_row = [&](u32 c) { return PAGED ? pages[c] * ATT_CHUNK : c * ATT_CHUNK; };
    tile_copy_chunk<H, true>(sK, K, chunk_row(0u), cap, hd4, hd, tid, NT);
    tile_commit();

    if (tid == 0) {
        s_tmin = 0xffffffffu;
        s_tmax = 0u;
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
    u32 trow[4];  // the value product's rows 4tr + i
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const u32 r = i0 + tr * 4u + i;
        trow[i] = r < nq ? qpos[r] : tmax;
    }
    const u32 rrow = tl >> 2, rp = tl & 3u;  // the row stage's row and lane
    const u32 t_r = i0 + rrow < nq ? qpos[i0 + rrow] : tmax;
    float M = 0.0f, L = 0.0f;  // the row stage's fold state (lane rp == 0)

    float O[4][4 * DG];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int x = 0; x < 4 * (int)DG; ++x) O[i][x] = 0.0f;

    const float4* sQ4 = reinterpret_cast<const float4*>(sQ);
    const float4* sK4 = reinterpret_cast<const float4*>(sK);
    for (u32 c = 0; c * ATT_CHUNK <= tmax; ++c) {
        const u32 j0 = c * ATT_CHUNK;
        // V of this chunk streams in during its scores (the values of chunk c - 1 are done).
        tile_copy_chunk<H, false>(sV, V, chunk_row(c), cap, hd4, hd, tid, NT);
        tile_commit();
        tile_wait<1>();  // Q and K of this chunk
        __syncthreads();

        // Scores: partial p runs over dim blocks p, p + 4, .. (zero padding adds +0 exactly),
        // each an fma chain over its 32 dims in increasing order.
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
                    // Rows tc + 16jj share tc's swizzle (and tr + 16i tr's): one base each.
                    const float4* kb = sK4 + tc * C4 + 8u * b;
                    const float4* qb = sQ4 + tr * C4 + 8u * b;
#pragma unroll 2
                    for (u32 cc = 0; cc < 8u; ++cc) {
                        const u32 kcol = cc ^ (tc & 7u), qcol = cc ^ (tr & 7u);
                        float4 kv4[4];
#pragma unroll
                        for (int jj = 0; jj < 4; ++jj) kv4[jj] = kb[16u * jj * C4 + kcol];
#pragma unroll
                        for (int i = 0; i < 4; ++i) {
                            const float4 qa = qb[16u * i * C4 + qcol];
                            const float qr[4] = {qa.x, qa.y, qa.z, qa.w};
#pragma unroll
                            for (int x = 0; x < 4; ++x) {
#pragma unroll
                                for (int jj = 0; jj < 4; ++jj) {
                                    const float kx = x == 0   ? kv4[jj].x
                                                     : x == 1 ? kv4[jj].y
                                                     : x == 2 ? kv4[jj].z
                                                              : kv4[jj].w;
                                    acc[i][jj] = fmaf(kx, qr[x], acc[i][jj]);
                                }
                            }
                        }
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
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int jj = 0; jj < 4; ++jj)
                    sE[(tc + 16u * jj) * ESTRIDE + tr + 16u * i] = s01[i][jj];
        }
        __syncthreads();

        // K of the next chunk streams in during this chunk's row stage and values.
        if ((c + 1u) * ATT_CHUNK <= tmax)
            tile_copy_chunk<H, true>(sK, K, chunk_row(c + 1u), cap, hd4, hd, tid, NT);
        tile_commit();
        tile_row_stage(sE, sA, sB, sL, sMode, rrow, rp, t_r, c, j0, M, L);
        tile_wait<1>();  // V of this chunk
        __syncthreads();

        // Values: o = the chunk's E x V for the thread's 4 rows x 4 DG dims, then the fold.
        tile_values_fold<DG, H>(O, sE, sV, sA, sB, sMode, tr, tc, j0, tmin, tmax, trow);
        __syncthreads();
    }
    tile_wait<0>();  // nothing is left in flight (the last groups are empty)

#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const u32 r = tr * 4u + i;
        if (i0 + r >= nq) continue;
        const float l = sL[r];
        float* orow = out + ((u64)(i0 + r) * n_heads + h) * hd;
#pragma unroll
        for (u32 g = 0; g < DG; ++g) {
            const u32 d = 64u * g + tc * 4u;
            if (d < hd)
                *reinterpret_cast<float4*>(orow + d) =
                    make_float4(bx_canon(O[i][4 * g] / l), bx_canon(O[i][4 * g + 1] / l),
                                bx_canon(O[i][4 * g + 2] / l), bx_canon(O[i][4 * g + 3] / l));
        }
    }
}

// attention_tile2_<H> takes one head a block (any group size), attention_tile2_<H>x2 two heads
// of one kv group (an even group): K and V once for both. Shared memory allows two blocks an SM
// for attention_tile2_64 only (128 needs 117.8 KB a block with the reserve, 256 more): the
// others run one block an SM, whose register budget then reaches 128 (x2, 512 threads) or
// 255 (one head).
#define TILE2_ENTRY(NAME, H, HPB, MIN_BLOCKS)                                                   \
    extern "C" __global__ void __launch_bounds__(HPB * 256, MIN_BLOCKS) NAME(TILE_PARAMS) {    \
        bx_grid_begin();                                                                       \
        attention_tile2_body<H, HPB, false>(out, q, kc, vc, qpos, nq, n_heads, n_kv, hd, cap,  \
                                            scale, nullptr);                                   \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(HPB * 256, MIN_BLOCKS) NAME##_paged(          \
        TILE_PARAMS) {                                                                         \
        bx_grid_begin();                                                                       \
        attention_tile2_body<H, HPB, true>(out, q, kc, vc, qpos, nq, n_heads, n_kv, hd, cap,   \
                                           scale, pages);                                      \
    }

TILE2_ENTRY(attention_tile2_64, 64, 1, 2)
TILE2_ENTRY(attention_tile2_128, 128, 1, 1)
TILE2_ENTRY(attention_tile2_256, 256, 1, 1)
TILE2_ENTRY(attention_tile2_64x2, 64, 2, 1)
TILE2_ENTRY(attention_tile2_128x2, 128, 2, 1)

// ------------------------------------------------------------------------------------------
// Decode: block (chunk c, kv head, query) computes the chunk partial of each of the group's G
// query heads. partial[((i * n_heads + h) * n_chunks + c) * (hd + 2) + ..] = m, l, o[0..hd].
// Shared memory: q [G][hd], K [64][hd + 1] (padded: a warp's lanes read 32 keys at one dim),
// V [64][hd], e [G][64].

#define S_THREADS 256u

// The parameters of every decode split kernel, declared once (build.rs makes the launch's
// SplitArgs of this list): pages and page_stride are read by attention_split_paged alone
// (null and 0 for the others).
#define SPLIT_PARAMS                                                                           \
    float* __restrict__ part, const float* __restrict__ q, const float* __restrict__ kc,       \
        const float* __restrict__ vc, const u32* __restrict__ qpos, u32 n_heads, u32 n_kv,     \
        u32 hd, u32 cap, float scale, u32 n_chunks, u32 row0, const u32* __restrict__ pages,   \
        u32 page_stride

extern "C" __global__ void __launch_bounds__(256) attention_split(SPLIT_PARAMS) {
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
// attention_split_tiled: attention_split's grid, loads and values for hd % 4 == 0, its two
// products register-tiled and its softmax a warp per head. attention_split reads two shared
// words per FMA (a query head's q and a key's k in the scores, a head's e and a value's v in
// the output): at context 8192 its 512 blocks were bound by shared-memory traffic (39 us a
// layer in ncu). Here a thread takes one partial of 4 heads x 2 keys of the scores (float4 of
// q and k: 6 loads for 32 FMAs) and one head x 4 dims of the output (one e and one float4 of
// v for 4 FMAs), so that a chunk's work fills the block's 8 warps (ncu, context 512: 13.5 ->
// 10.7 us; 8192: 28.6 -> 23.5). Every dot and every chain keeps the canonical order: partial
// p of a score takes its blocks b % 4 == p in increasing k, each fmaf in increasing k; o[d]
// takes the keys in increasing j.
// Shared memory: q [Gp][hd] (Gp = G rounded up to 4, rows past G zero), K [64][hd + 4]
// (lanes read 32 consecutive keys' float4 without conflicts), V [64][hd], e [Gp][64].

// ASYNC (attention_split_async, the wrapper's Split2): K and V copied by cp.async, V still in
// flight while the scores run, and no staging registers (the register copy holds 16 float4 a
// thread, which kept the kernel at 100 registers and two blocks an SM). The shared memory,
// and so every bit, is the same.
// PAGED (attention_split_paged, a paged cache of many sequences): chunk c of query qi's keys
// is cache page pages[qi * page_stride + c] (64 rows from row 64 * page), not rows 64 c ..;
// positions, and so every bit, are as before.
template <bool ASYNC, bool PAGED = false>
__device__ __forceinline__ void attention_split_tiled_body(
    float* __restrict__ part, const float* __restrict__ q, const float* __restrict__ kc,
    const float* __restrict__ vc, const u32* __restrict__ qpos, u32 n_heads, u32 n_kv, u32 hd,
    u32 cap, float scale, u32 n_chunks, u32 row0, const u32* __restrict__ pages = nullptr,
    u32 page_stride = 0u) {
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
    const u32 warp_id = tid >> 5, lane_id = tid & 31u;
    const u32 t = qpos[qi];
    const u32 j0 = c * ATT_CHUNK;
    if (j0 > t) return;  // the whole block: this chunk holds none of the query's keys
    const u32 n = min(ATT_CHUNK, t + 1u - j0);
    const u32 h0 = kvh * G;
    const float4* Q4 = reinterpret_cast<const float4*>(q + (qi * n_heads + h0) * hd);
    const u32 r0 = PAGED ? pages[qi * page_stride + c] * ATT_CHUNK : j0;  // the chunk's cache row
    const float4* K4 = reinterpret_cast<const float4*>(kc + ((u64)kvh * cap + r0) * hd);
    const float4* V4 = reinterpret_cast<const float4*>(vc + ((u64)kvh * cap + r0) * hd);
    const u32 hd4 = hd / 4u;
    const u32 n4 = n * hd4;
    if (ASYNC) {
        // K then V, two copy groups issued before anything waits (q goes through registers
        // below, covered by the barrier before the scores).
        for (u32 idx = tid; idx < n4; idx += S_THREADS) {
            const u32 j = idx / hd4, d4 = idx - j * hd4;
            tile_cp16(sK + j * ks + 4u * d4, reinterpret_cast<const float*>(K4 + idx), true);
        }
        tile_commit();
        for (u32 idx = tid; idx < n4; idx += S_THREADS)
            tile_cp16(sV + 4u * idx, reinterpret_cast<const float*>(V4 + idx), true);
        tile_commit();
    }
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
    for (u32 base = 0; !ASYNC && base < n4; base += 8u * S_THREADS) {
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
    if (ASYNC) tile_wait<1>();  // K (V may still be in flight)
    __syncthreads();

    // Scores: warp (head group gg of 4, keys 8kq..8kq+7) and lane 8p + jq: partial p of keys
    // jl = 8kq + jq and jl + 32 of heads 4gg..+3 (its blocks b % 4 == p, each in increasing k);
    // the partials meet through shuffles as (p0 + p1) + (p2 + p3) (IEEE addition commutes,
    // so every lane forms the same bits). Eight lanes of one p read eight keys' float4 at one
    // k (K rows 4 banks apart: no conflicts); q is a broadcast. All four partials in flight
    // keep 256 threads busy (one thread per (4 heads, 2 keys) left 3 of 4 warps idle: 13.5 us
    // a layer at context 512).
    for (u32 w = tid; w < (Gp / 4u) * 128u; w += S_THREADS) {
        const u32 wi = w >> 5, lane = w & 31u;
        const u32 gg = wi >> 2, p = lane >> 3, jl = (wi & 3u) * 8u + (lane & 7u);
        float acc[4][2];
#pragma unroll
        for (int g = 0; g < 4; ++g) acc[g][0] = acc[g][1] = 0.0f;
        const float* qb = sQ + 4u * gg * hd;
        const float* kb0 = sK + jl * ks;
        const float* kb1 = sK + (jl + 32u) * ks;
        for (u32 k0 = 32u * p; k0 < hd; k0 += 128u) {
            const u32 k1 = min(k0 + 32u, hd);
#pragma unroll 4
            for (u32 k = k0; k < k1; k += 4u) {
                float4 qv[4];
#pragma unroll
                for (int g = 0; g < 4; ++g) qv[g] = *reinterpret_cast<const float4*>(qb + g * hd + k);
                const float4 kv0 = *reinterpret_cast<const float4*>(kb0 + k);
                const float4 kv1 = *reinterpret_cast<const float4*>(kb1 + k);
#pragma unroll
                for (int g = 0; g < 4; ++g) {
                    float a0 = acc[g][0], a1 = acc[g][1];
                    a0 = fmaf(kv0.x, qv[g].x, a0);
                    a1 = fmaf(kv1.x, qv[g].x, a1);
                    a0 = fmaf(kv0.y, qv[g].y, a0);
                    a1 = fmaf(kv1.y, qv[g].y, a1);
                    a0 = fmaf(kv0.z, qv[g].z, a0);
                    a1 = fmaf(kv1.z, qv[g].z, a1);
                    a0 = fmaf(kv0.w, qv[g].w, a0);
                    a1 = fmaf(kv1.w, qv[g].w, a1);
                    acc[g][0] = a0;
                    acc[g][1] = a1;
                }
            }
        }
#pragma unroll
        for (int g = 0; g < 4; ++g)
#pragma unroll
            for (int jj = 0; jj < 2; ++jj) {
                const float pair = acc[g][jj] + __shfl_xor_sync(BX_FULL_MASK, acc[g][jj], 8);
                const float s = pair + __shfl_xor_sync(BX_FULL_MASK, pair, 16);
                const u32 gh = 4u * gg + (u32)g, j = jl + 32u * (u32)jj;
                if (p == 0u && gh < G && j < n) sE[gh * ATT_CHUNK + j] = s * scale;
            }
    }
    __syncthreads();

    // Rows: a warp per head (lane_id l holds keys l and l + 32): the max by a butterfly (fmaxf
    // is exact and ignores NaN: any order), e_j in parallel, then lanes 0..3 add their l_p
    // chains (keys p, p + 4, .. in order) from shared memory and meet as (l0 + l1) + (l2 +
    // l3): attention_split's values, where four lanes per head (one warp for 8 heads) ran the
    // exps one after another while the other warps waited.
    for (u32 g = warp_id; g < G; g += S_THREADS / 32u) {
        float* se = sE + g * ATT_CHUNK;
        const float s0 = lane_id < n ? se[lane_id] : __uint_as_float(0xff800000u);
        const float s1 = lane_id + 32u < n ? se[lane_id + 32u] : __uint_as_float(0xff800000u);
        // From -inf, as the reference: a chunk of NaN scores alone gives m = -inf, not NaN.
        float m = fmaxf(fmaxf(__uint_as_float(0xff800000u), s0), s1);
        for (u32 off = 16u; off; off >>= 1) m = fmaxf(m, __shfl_xor_sync(BX_FULL_MASK, m, off));
        if (lane_id < n) se[lane_id] = bx_exp(s0 - m);
        if (lane_id + 32u < n) se[lane_id + 32u] = bx_exp(s1 - m);
        __syncwarp();
        float lp = 0.0f;
        if (lane_id < 4u)
            for (u32 jj = lane_id; jj < n; jj += 4u) lp = lp + se[jj];
        const float l01 = lp + __shfl_xor_sync(BX_FULL_MASK, lp, 1);
        const float l = l01 + __shfl_xor_sync(BX_FULL_MASK, l01, 2);
        if (lane_id == 0u) {
            float* dst = part + ((qi * n_heads + h0 + g) * n_chunks + c) * (u64)(hd + 2u);
            dst[0] = m;
            dst[1] = l;
        }
    }
    if (ASYNC) tile_wait<0>();  // V
    __syncthreads();

    // Output: thread (head g, dims 4dq..4dq+3) over the chunk's keys in order: G * hd / 4
    // threads busy (256 for 8 heads of 128), where 4 heads a thread left 64.
    for (u32 w = tid; w < G * hd4; w += S_THREADS) {
        const u32 g = w / hd4, dq = w - g * hd4;
        float o0 = 0.0f, o1 = 0.0f, o2 = 0.0f, o3 = 0.0f;
        const float* eb = sE + g * ATT_CHUNK;
#pragma unroll 4
        for (u32 j = 0; j < n; ++j) {
            const float4 v4 = *reinterpret_cast<const float4*>(sV + j * hd + 4u * dq);
            const float e = eb[j];
            o0 = fmaf(e, v4.x, o0);
            o1 = fmaf(e, v4.y, o1);
            o2 = fmaf(e, v4.z, o2);
            o3 = fmaf(e, v4.w, o3);
        }
        float* dst = part + ((qi * n_heads + h0 + g) * n_chunks + c) * (u64)(hd + 2u) + 2u + 4u * dq;
        dst[0] = o0;
        dst[1] = o1;
        dst[2] = o2;
        dst[3] = o3;
    }
}

extern "C" __global__ void __launch_bounds__(256) attention_split_tiled(SPLIT_PARAMS) {
    bx_grid_begin();
    attention_split_tiled_body<false>(part, q, kc, vc, qpos, n_heads, n_kv, hd, cap, scale,
                                      n_chunks, row0);
}

extern "C" __global__ void __launch_bounds__(256) attention_split_async(SPLIT_PARAMS) {
    bx_grid_begin();
    attention_split_tiled_body<true>(part, q, kc, vc, qpos, n_heads, n_kv, hd, cap, scale,
                                     n_chunks, row0);
}

extern "C" __global__ void __launch_bounds__(256) attention_split_paged(SPLIT_PARAMS) {
    bx_grid_begin();
    attention_split_tiled_body<true, true>(part, q, kc, vc, qpos, n_heads, n_kv, hd, cap, scale,
                                           n_chunks, row0, pages, page_stride);
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

// Q8: also writes the slice's quantization (hd % 32 == 0, so the slice is one 32-block of the
// [nq, n_heads * hd] row the output product reads: codes, d and a at the block's index).
template <bool Q8>
__device__ __forceinline__ void combine_body(float* __restrict__ out,
                                             signed char* __restrict__ codes,
                                             float* __restrict__ dq, float* __restrict__ aq,
                                             const float* __restrict__ part,
                                             const u32* __restrict__ qpos, u32 n_heads, u32 hd,
                                             u32 n_chunks, u32 row0) {
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
    const u64 at = (qi * n_heads + h) * hd + d0;
    if (Q8) {
        if (warp == 0u) {
            const float v = bx_canon(O / L);  // width == 32: every lane holds a dim
            out[at + lane] = v;
            bx_quantize_block32<false>(v, lane, codes + at, dq + at / 32u, aq + at / 32u);
        }
    } else if (warp == 0u && lane < width) {
        out[at + lane] = bx_canon(O / L);
    }
}

// The parameters of both combines, declared once (build.rs makes the launch's CombineArgs of
// this list): codes, d and a are written by attention_combine_q8 alone (null for the other).
#define COMBINE_PARAMS                                                                         \
    float* __restrict__ out, signed char* __restrict__ codes, float* __restrict__ d,           \
        float* __restrict__ a, const float* __restrict__ part, const u32* __restrict__ qpos,   \
        u32 n_heads, u32 hd, u32 n_chunks, u32 row0

extern "C" __global__ void __launch_bounds__(128) attention_combine(COMBINE_PARAMS) {
    bx_grid_begin();
    combine_body<false>(out, nullptr, nullptr, nullptr, part, qpos, n_heads, hd, n_chunks, row0);
}

extern "C" __global__ void __launch_bounds__(128) attention_combine_q8(COMBINE_PARAMS) {
    bx_grid_begin();
    combine_body<true>(out, codes, d, a, part, qpos, n_heads, hd, n_chunks, row0);
}
