// delta_net.cu — the Gated DeltaNet mixer's recurrent steps (hybrid Qwen3.5/3.6-MoE layers).
//   delta_net_scan_f32   steps 2-5 of src/reference/delta_net.rs over n tokens in order: the
//                        causal convolution + SiLU of mixed [n, conv_dim], unit q and k per key
//                        head, the gates from b, a [n, Hv], the delta rule on each value head's
//                        S x S state (updated in place) -> o [n, Hv, S]; the convolution's new
//                        window is written to conv_out (the old one, conv_in, is read only).
//   delta_net_gate_f32   out[i] = normed[i] * silu(z[i]) (step 6, after the per-head rmsnorm).
// Reference: src/reference/delta_net.rs (scan_cpu, forward_cpu); the order of every step is
// stated there. The family's mutant breaks both kernels: the scan's kv tree (it differs only
// when partial 3 is not empty, head dims above 96: 128 in the tests) and the gate's silu.
//
// Versions:
//   delta_net_scan_f32   v1: one block per value head, 4 S threads (S <= 128): thread (p, j)
//                        keeps 32-block p of column j of the state in registers (the
//                        canonical dot's partial p), so both dots of a column are 4 register
//                        chains and one combination through shared memory; tokens in order.
//   delta_net_gate_f32   v1: grid-stride loop.

#include "common.cuh"

#define DN_MAX_S 128u

// Partial p of the canonical dot of two s-vectors: its 32-blocks p, p + 4, .. in increasing
// order, fmaf(w, x, acc) from +0.
__device__ __forceinline__ float dn_partial(const float* __restrict__ w, const float* __restrict__ x,
                                            u32 p, u32 s) {
    float acc = 0.0f;
    for (u32 b = p; b * 32u < s; b += 4u)
        for (u32 i = b * 32u; i < min(b * 32u + 32u, s); ++i) acc = fmaf(w[i], x[i], acc);
    return acc;
}

extern "C" __global__ void __launch_bounds__(512)
    delta_net_scan_f32(float* __restrict__ o, float* __restrict__ m, float* __restrict__ conv_out,
                       const float* __restrict__ mixed, const float* __restrict__ bg,
                       const float* __restrict__ ag, const float* __restrict__ conv_w,
                       const float* __restrict__ conv_in, const float* __restrict__ dt_bias,
                       const float* __restrict__ ssm_a, u32 n, u32 hk, u32 hv, u32 s, u32 kc,
                       float eps) {
    bx_grid_begin();
    __shared__ float sq[DN_MAX_S], sk[DN_MAX_S], sv[DN_MAX_S];
    __shared__ float part[4][DN_MAX_S];
    __shared__ float npart[8];
    __shared__ float gates[2];  // beta, decay
    const u32 h = blockIdx.x, tid = threadIdx.x;
    const u32 j = tid % s, p = tid / s;  // column j, partial p (blocks p, p + 4)
    const u32 kh = h % hk;
    const u32 cd = (2u * hk + hv) * s;
    const float scale = 1.0f / sqrtf((float)s);
    // This thread's channel of the convolution (tid < 3 s): q, k of key head kh, v of head h.
    const u32 ch = tid < s ? kh * s + tid
                 : tid < 2u * s ? hk * s + kh * s + (tid - s)
                                : 2u * hk * s + h * s + (tid - 2u * s);
    // Column j's state, block p (zeros past s).
    float* mh = m + (u64)h * s * s + (u64)j * s;
    float reg[32];
#pragma unroll
    for (u32 i = 0; i < 32u; ++i) {
        const u32 d = p * 32u + i;
        reg[i] = d < s ? mh[d] : 0.0f;
    }

    for (u32 t = 0; t < n; ++t) {
        // 2. Convolution + SiLU: y = fmaf(w[ch, tap], in_tap, y) from +0, taps oldest first;
        //    tap tp of token t reads token t + tp - (kc - 1), or the old window before token 0.
        if (tid < 3u * s) {
            float y = 0.0f;
            for (u32 tp = 0; tp < kc; ++tp) {
                const i32 src = (i32)(t + tp) - (i32)(kc - 1u);
                const float in = src >= 0 ? mixed[(u64)src * cd + ch] : conv_in[(u64)(t + tp) * cd + ch];
                y = fmaf(conv_w[(u64)ch * kc + tp], in, y);
            }
            const float v = bx_silu(y);
            if (tid < s) sq[tid] = v;
            else if (tid < 2u * s) sk[tid - s] = v;
            else sv[tid - 2u * s] = v;
        }
        __syncthreads();
        // 3. The squared norms of q (threads 0..3) and k (4..7), 4 partials each.
        if (tid < 8u) {
            const float* u = tid < 4u ? sq : sk;
            npart[tid] = dn_partial(u, u, tid & 3u, s);
        }
        if (tid == 8u) {
            // 4. The gates.
            gates[0] = bx_sigmoid(bg[(u64)t * hv + h]);
            gates[1] = bx_exp(bx_softplus(ag[(u64)t * hv + h] + dt_bias[h]) * ssm_a[h]);
        }
        __syncthreads();
        if (tid < 2u * s) {
            const u32 w4 = tid < s ? 0u : 4u;
            const float dd = (npart[w4] + npart[w4 + 1u]) + (npart[w4 + 2u] + npart[w4 + 3u]);
            const float inv = 1.0f / sqrtf(dd + eps);
            if (tid < s) sq[tid] = sq[tid] * inv;
            else sk[tid - s] = sk[tid - s] * inv;
        }
        __syncthreads();
        // 5. The delta rule on column j: decay, kv = dot(M_j, k), delta, the update, o_j.
        const float beta = gates[0], decay = gates[1];
        float acc = 0.0f;
#pragma unroll
        for (u32 i = 0; i < 32u; ++i) {
            const u32 d = p * 32u + i;
            if (d < s) {
                reg[i] = reg[i] * decay;
                acc = fmaf(sk[d], reg[i], acc);
            }
        }
        part[p][j] = acc;
        __syncthreads();
#ifdef BITEXACT_MUTANT
        // Broken on purpose (see BITEXACT_MUTANT): the partials left to right.
        const float kv = ((part[0][j] + part[1][j]) + part[2][j]) + part[3][j];
#else
        const float kv = (part[0][j] + part[1][j]) + (part[2][j] + part[3][j]);
#endif
        const float delta = (sv[j] - kv) * beta;
        acc = 0.0f;
#pragma unroll
        for (u32 i = 0; i < 32u; ++i) {
            const u32 d = p * 32u + i;
            if (d < s) {
                reg[i] = fmaf(sk[d], delta, reg[i]);
                acc = fmaf(sq[d], reg[i], acc);
            }
        }
        __syncthreads();  // every thread has read part[][] for kv
        part[p][j] = acc;
        __syncthreads();
        if (p == 0u)
            o[((u64)t * hv + h) * s + j] =
                ((part[0][j] + part[1][j]) + (part[2][j] + part[3][j])) * scale;
        __syncthreads();  // part[][], sq, sk, sv are rewritten by the next token
    }
#pragma unroll
    for (u32 i = 0; i < 32u; ++i) {
        const u32 d = p * 32u + i;
        if (d < s) mh[d] = reg[i];
    }
    // The new window of this block's channels: q and k channels by the first value head of
    // their key head (h < hk), v channels by their own head. Tap tp holds token n - (kc - 1) + tp.
    const bool owner = tid < 2u * s ? h < hk : tid < 3u * s;
    if (owner && kc > 1u) {
        for (u32 tp = 0; tp + 1u < kc; ++tp) {
            const i32 src = (i32)(n + tp) - (i32)(kc - 1u);
            conv_out[(u64)tp * cd + ch] =
                src >= 0 ? mixed[(u64)src * cd + ch] : conv_in[(u64)(n + tp) * cd + ch];
        }
    }
}

extern "C" __global__ void delta_net_gate_f32(float* __restrict__ out,
                                              const float* __restrict__ normed,
                                              const float* __restrict__ z, u64 len) {
    bx_grid_begin();
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < len;
         i += (u64)gridDim.x * blockDim.x) {
#ifdef BITEXACT_MUTANT
        // Broken on purpose (see BITEXACT_MUTANT): silu as z * sigmoid(z), one rounding more.
        out[i] = normed[i] * (z[i] * bx_sigmoid(z[i]));
#else
        out[i] = normed[i] * bx_silu(z[i]);
#endif
    }
}
