// attention.cu — causal grouped-query attention over an f32 KV cache, and the cache write.
//   attention_f32  q: [nq, n_heads, hd], caches k, v: [n_kv, cap, hd] (one layer),
//                  qpos: [nq] (query i sees cache rows 0..=qpos[i]) -> out: [nq, n_heads, hd]
//   kv_write_f32   k, v: [n, n_kv, hd] -> cache rows pos[i] of every kv head
// Query head h reads kv head h / (n_heads / n_kv).
//
// The order for one query at position t (src/reference/attention.rs spells it out):
//   s_j = dot(q, k_j) * scale, j = 0..=t, dot the canonical f32 dot (common.cuh), scale =
//         1 / sqrtf(hd);
//   m = fmaxf over s_j;  e_j = bx_exp(s_j - m);
//   sum: 32 lane partials over j = l, l + 32, .. (adds from +0), then the butterfly;
//   p_j = canon(e_j / sum);
//   out[d] = the canonical dot over j of p_j and v_j[d] (keys in blocks of 32, block b feeds
//            partial b % 4), (p0 + p1) + (p2 + p3).
// It depends on t alone: a query gets the same bits in a prefill of any length, in any chunk,
// or decoded on its own.
//
// Versions:
//   attention_f32     v1: one block of 128 threads per (query, head); scores in dynamic shared
//                     memory (t + 1 floats); threads stride over keys for the scores and over
//                     dims for the output, each thread running all four partials in turn.
//   attention_f32_v2  v2: 512 threads per (query, head). Scores: lanes 4g..4g+3 form the four
//                     partials of one key's dot and combine them by two shuffles. Output: one
//                     thread per (partial, dim) runs that partial's chain over its key blocks;
//                     the four partials meet in shared memory. 4x the threads of v1 and no
//                     thread runs more than one chain.

#include "common.cuh"

#define ATT_THREADS 128u

extern "C" __global__ void attention_f32(float* __restrict__ out, const float* __restrict__ q,
                                         const float* __restrict__ kc,
                                         const float* __restrict__ vc,
                                         const u32* __restrict__ qpos, u32 n_heads, u32 n_kv,
                                         u32 hd, u32 cap, float scale) {
    extern __shared__ float att_s[];
    __shared__ float red[ATT_THREADS / 32u];
    __shared__ float total;
    const u32 h = blockIdx.x;
    const u64 qi = blockIdx.y;
    const u32 tid = threadIdx.x, lane = tid & 31u, warp = tid >> 5;
    const u32 t = qpos[qi];
    const u32 kvh = h / (n_heads / n_kv);
    const float* qv = q + (qi * n_heads + h) * hd;
    const float* K = kc + (u64)kvh * cap * hd;
    const float* V = vc + (u64)kvh * cap * hd;

    float m = __uint_as_float(0xff800000u);
    for (u32 j = tid; j <= t; j += ATT_THREADS) {
        float p0, p1, p2, p3;
        bx_dot_partials(qv, K + (u64)j * hd, hd, p0, p1, p2, p3);
        const float sj = ((p0 + p1) + (p2 + p3)) * scale;
        att_s[j] = sj;
        m = fmaxf(m, sj);
    }
    m = bx_block_max<ATT_THREADS>(m, red);
    for (u32 j = tid; j <= t; j += ATT_THREADS) att_s[j] = bx_exp(att_s[j] - m);
    __syncthreads();
    if (warp == 0) {
        float s = 0.0f;
        for (u32 j = lane; j <= t; j += 32u) s = s + att_s[j];
        s = bx_butterfly_sum(s);
        if (lane == 0) total = s;
    }
    __syncthreads();
    const float sum = total;
    for (u32 j = tid; j <= t; j += ATT_THREADS) att_s[j] = bx_canon(att_s[j] / sum);
    __syncthreads();

    const u32 n = t + 1u;
    for (u32 d = tid; d < hd; d += ATT_THREADS) {
        float p0 = 0.0f, p1 = 0.0f, p2 = 0.0f, p3 = 0.0f;
        for (u32 base = 0; base < n; base += 128u) {
            const u32 b1 = min(base + 32u, n), b2 = min(base + 64u, n);
            const u32 b3 = min(base + 96u, n), b4 = min(base + 128u, n);
            for (u32 j = base; j < b1; ++j) p0 = fmaf(V[(u64)j * hd + d], att_s[j], p0);
            for (u32 j = b1; j < b2; ++j) p1 = fmaf(V[(u64)j * hd + d], att_s[j], p1);
            for (u32 j = b2; j < b3; ++j) p2 = fmaf(V[(u64)j * hd + d], att_s[j], p2);
            for (u32 j = b3; j < b4; ++j) p3 = fmaf(V[(u64)j * hd + d], att_s[j], p3);
        }
#ifdef BITEXACT_MUTANT
        // Broken on purpose (see BITEXACT_MUTANT): left to right instead of the tree.
        out[(qi * n_heads + h) * hd + d] = ((p0 + p1) + p2) + p3;
#else
        out[(qi * n_heads + h) * hd + d] = (p0 + p1) + (p2 + p3);
#endif
    }
}

extern "C" __global__ void kv_write_f32(float* __restrict__ kc, float* __restrict__ vc,
                                        const float* __restrict__ k, const float* __restrict__ v,
                                        const u32* __restrict__ pos, u32 n_kv, u32 hd, u32 cap,
                                        u32 row0) {
    const u32 idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n_kv * hd) return;
    const u32 kvh = idx / hd, d = idx - kvh * hd;
    const u64 r = (u64)row0 + blockIdx.y;
    const u64 src = r * n_kv * hd + idx;
    const u64 dst = ((u64)kvh * cap + pos[r]) * hd + d;
    kc[dst] = k[src];
    vc[dst] = v[src];
}

#define ATT2_THREADS 512u

extern "C" __global__ void __launch_bounds__(512)
    attention_f32_v2(float* __restrict__ out, const float* __restrict__ q,
                     const float* __restrict__ kc, const float* __restrict__ vc,
                     const u32* __restrict__ qpos, u32 n_heads, u32 n_kv, u32 hd, u32 cap,
                     float scale) {
    extern __shared__ float att2_s[];  // scores (t + 1, padded), then 4 * hd partial outputs
    __shared__ float red2[ATT2_THREADS / 32u];
    __shared__ float total2;
    const u32 h = blockIdx.x;
    const u64 qi = blockIdx.y;
    const u32 tid = threadIdx.x, lane = tid & 31u, warp = tid >> 5;
    const u32 t = qpos[qi];
    const u32 n = t + 1u;
    const u32 kvh = h / (n_heads / n_kv);
    const float* qv = q + (qi * n_heads + h) * hd;
    const float* K = kc + (u64)kvh * cap * hd;
    const float* V = vc + (u64)kvh * cap * hd;
    float* part = att2_s + ((n + 3u) & ~3u) + 4u;

    // Scores: lane 4g + p forms partial p of key j's dot (hd's 32-blocks p, p + 4, ..).
    const u32 p = tid & 3u, g = tid >> 2;
    float m = __uint_as_float(0xff800000u);
    for (u32 j0 = 0; j0 < n; j0 += ATT2_THREADS / 4u) {
        const u32 j = j0 + g;
        float acc = 0.0f;
        if (j < n) {
            const float* kr = K + (u64)j * hd;
            for (u32 b = p; b * 32u < hd; b += 4u) {
                if (b * 32u + 32u <= hd) {
                    // A whole block: all 32 loads in flight before the fma chain.
                    float kk[32];
#pragma unroll
                    for (int i = 0; i < 32; ++i) kk[i] = kr[b * 32u + i];
#pragma unroll
                    for (int i = 0; i < 32; ++i) acc = fmaf(kk[i], qv[b * 32u + i], acc);
                } else {
                    for (u32 k = b * 32u; k < hd; ++k) acc = fmaf(kr[k], qv[k], acc);
                }
            }
        }
        const float other = __shfl_xor_sync(BX_FULL_MASK, acc, 1);
        const float pair = (p & 1u) ? other + acc : acc + other;
        const float pair2 = __shfl_xor_sync(BX_FULL_MASK, pair, 2);
        const float dot = (p & 2u) ? pair2 + pair : pair + pair2;
        if (j < n) {
            const float sj = dot * scale;
            if (p == 0u) att2_s[j] = sj;
            m = fmaxf(m, sj);
        }
    }
    m = bx_block_max<ATT2_THREADS>(m, red2);
    for (u32 j = tid; j < n; j += ATT2_THREADS) att2_s[j] = bx_exp(att2_s[j] - m);
    __syncthreads();
    if (warp == 0) {
        float sum = 0.0f;
        for (u32 j = lane; j < n; j += 32u) sum = sum + att2_s[j];
        sum = bx_butterfly_sum(sum);
        if (lane == 0) total2 = sum;
    }
    __syncthreads();
    const float sum = total2;
    for (u32 j = tid; j < n; j += ATT2_THREADS) att2_s[j] = bx_canon(att2_s[j] / sum);
    __syncthreads();

    // Output: thread (partial pp, dim d) runs partial pp's chain over key blocks pp, pp + 4, ..;
    // the next block's 32 values are loaded while the current block's fmas run.
    for (u32 idx = tid; idx < 4u * hd; idx += ATT2_THREADS) {
        const u32 pp = idx / hd, d = idx - pp * hd;
        const u32 full = n / 32u;  // blocks of 32 keys with no tail
        float acc = 0.0f;
        float cur[32], nxt[32];
        u32 b = pp;
        if (b < full) {
#pragma unroll
            for (int i = 0; i < 32; ++i) cur[i] = V[(u64)(b * 32u + i) * hd + d];
        }
        for (; b < full; b += 4u) {
            const u32 bn = b + 4u;
            if (bn < full) {
#pragma unroll
                for (int i = 0; i < 32; ++i) nxt[i] = V[(u64)(bn * 32u + i) * hd + d];
            }
#pragma unroll
            for (int i = 0; i < 32; ++i) acc = fmaf(cur[i], att2_s[b * 32u + i], acc);
#pragma unroll
            for (int i = 0; i < 32; ++i) cur[i] = nxt[i];
        }
        if (b == full && full * 32u < n) {  // this partial owns the tail block
            for (u32 j = full * 32u; j < n; ++j) acc = fmaf(V[(u64)j * hd + d], att2_s[j], acc);
        }
        part[idx] = acc;
    }
    __syncthreads();
    for (u32 d = tid; d < hd; d += ATT2_THREADS) {
        const float p0 = part[d], p1 = part[hd + d], p2 = part[2u * hd + d], p3 = part[3u * hd + d];
#ifdef BITEXACT_MUTANT
        out[(qi * n_heads + h) * hd + d] = ((p0 + p1) + p2) + p3;
#else
        out[(qi * n_heads + h) * hd + d] = (p0 + p1) + (p2 + p3);
#endif
    }
}
