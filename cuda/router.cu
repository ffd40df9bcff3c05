// router.cu — MoE routing: softmax over the experts' logits, top-k, optional renormalisation.
//   softmax_topk_f32  logits: [N, E] -> ids: [N, k] (u32), weights: [N, k] (f32)
// One warp per token; the warp's probabilities live in dynamic shared memory (E floats).
//
// Order (src/reference/router.rs states it step by step):
//   m = fmaxf over the logits (order-free: fmaxf is exact and ignores NaN);
//   ex[e] = bx_exp(x[e] - m); lane l sums ex[l], ex[l + 32], .. in order from +0, then a
//   butterfly s += shfl_xor(s, off) for off = 16, 8, 4, 2, 1 (every lane ends with the same
//   sum, since IEEE addition commutes); p[e] = canon(ex[e] / sum).
//   Top-k: k rounds of a warp arg-max over the candidates (order_key(p), then lower id) that
//   rank strictly below the previous winner; one integer order, so no float ever decides a tie.
//   Renormalised weight of slot j: p_j / ((+0 + p_0) + p_1 + ..) in slot order.
//
// Versions:
//   softmax_topk_f32  v1: as above. k <= 32 (lane j keeps slot j's probability), E <= 2048.

#include "common.cuh"

#define ROUTER_WARPS 4u

__device__ __forceinline__ u64 router_candidate(float p, u32 e) {
    const u32 key = ((u32)bx_order_key(p)) ^ 0x80000000u;
#ifdef BITEXACT_MUTANT
    // Broken on purpose (see BITEXACT_MUTANT): ties go to the higher expert id.
    return ((u64)key << 32) | (u64)e;
#else
    return ((u64)key << 32) | (u64)(~e);
#endif
}

extern "C" __global__ void softmax_topk_f32(const float* __restrict__ logits,
                                            u32* __restrict__ ids, float* __restrict__ weights,
                                            u32 n_tokens, u32 E, u32 k, u32 renormalize) {
    bx_grid_begin();
    extern __shared__ float router_smem[];
    const u32 warp = threadIdx.x >> 5;
    const u32 lane = threadIdx.x & 31u;
    const u64 t = (u64)blockIdx.x * ROUTER_WARPS + warp;
    if (t >= n_tokens) return;  // the whole warp leaves together
    float* p = router_smem + warp * E;
    const float* x = logits + t * E;

    float m = __uint_as_float(0xff800000u);  // -inf
    for (u32 e = lane; e < E; e += 32u) m = fmaxf(m, x[e]);
    for (u32 off = 16u; off; off >>= 1) m = fmaxf(m, __shfl_xor_sync(BX_FULL_MASK, m, off));

    float s = 0.0f;
    for (u32 e = lane; e < E; e += 32u) {
        const float v = bx_exp(x[e] - m);
        p[e] = v;
        s = s + v;
    }
    for (u32 off = 16u; off; off >>= 1) s = s + __shfl_xor_sync(BX_FULL_MASK, s, off);
    for (u32 e = lane; e < E; e += 32u) p[e] = bx_canon(p[e] / s);
    __syncwarp();

    u64 prev = ~0ull;
    float mine = 0.0f;   // lane j: the probability of slot j
    float total = 0.0f;  // sum of the selected probabilities, in slot order
    for (u32 j = 0; j < k; ++j) {
        u64 best = 0;
        for (u32 e = lane; e < E; e += 32u) {
            const u64 c = router_candidate(p[e], e);
            // Round 0 takes every candidate: an expert whose candidate is the largest u64
            // (expert 0 with the canonical NaN) must stay selectable.
            if ((j == 0u || c < prev) && c > best) best = c;
        }
        for (u32 off = 16u; off; off >>= 1) {
            const u64 o = __shfl_xor_sync(BX_FULL_MASK, best, off);
            best = o > best ? o : best;
        }
        prev = best;
#ifdef BITEXACT_MUTANT
        const u32 e = (u32)best;
#else
        const u32 e = ~(u32)best;
#endif
        const float pe = p[e];
        total = total + pe;
        if (lane == j) mine = pe;
        if (lane == 0) ids[t * k + j] = e;
    }
    if (lane < k) weights[t * k + lane] = renormalize ? bx_canon(mine / total) : mine;
}
