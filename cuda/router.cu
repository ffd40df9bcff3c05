// router.cu — MoE routing: softmax over the experts' logits, top-k, optional renormalisation.
//   softmax_topk_f32  logits: [N, E] -> ids: [N, k] (u32), weights: [N, k] (f32)
//   router_route_f32  x: [N, K], W: [E, K] (f32) -> logits [N, E], ids, weights and the
//                     unsorted routing tables of the N * k routed rows (decode, one launch)
// One warp per token; the warp's probabilities live in shared memory (E floats).
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
//   router_route_f32  v1: the router product, softmax_topk and route_rows in one launch (the
//                     last block of each token routes it; see below).

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

// Softmax and top-k of one token's logits x[0..E) by one warp (p: E floats of shared memory),
// writing ids[0..k) and weights[0..k); returns to lane j < k its slot's expert id. The logits
// are read through L2 (ld.cg): router_route_f32 reads what other blocks wrote.
__device__ __forceinline__ u32 router_topk_warp(const float* __restrict__ x, float* p,
                                                u32* __restrict__ ids,
                                                float* __restrict__ weights, u32 E, u32 k,
                                                u32 renormalize, u32 lane) {
    float m = __uint_as_float(0xff800000u);  // -inf
    for (u32 e = lane; e < E; e += 32u) m = fmaxf(m, __ldcg(x + e));
    for (u32 off = 16u; off; off >>= 1) m = fmaxf(m, __shfl_xor_sync(BX_FULL_MASK, m, off));

    float s = 0.0f;
    for (u32 e = lane; e < E; e += 32u) {
        const float v = bx_exp(__ldcg(x + e) - m);
        p[e] = v;
        s = s + v;
    }
    for (u32 off = 16u; off; off >>= 1) s = s + __shfl_xor_sync(BX_FULL_MASK, s, off);
    for (u32 e = lane; e < E; e += 32u) p[e] = bx_canon(p[e] / s);
    __syncwarp();

    u64 prev = ~0ull;
    float mine = 0.0f;   // lane j: the probability of slot j
    u32 mine_e = 0u;     // lane j: the expert of slot j
    float total = 0.0f;  // sum of the selected probabilities, in slot order
    for (u32 j = 0; j < k; ++j) {
        u64 best = 0;
        for (u32 e = lane; e < E; e += 32u) {
            const u64 c = router_candidate(p[e], e);
            // Round 0 takes every candidate: an expert whose candidate is the largest u64
            // (expert 0 with the canonical NaN) must stay selectable.
            if ((j == 0u || c < prev) && c > best) best = c;
        }
        // The warp's largest u64 candidate: the largest high word (redux.sync), then the
        // largest low word among the lanes that hold it (every low word of a real candidate
        // is nonzero or belongs to a lane whose candidate it is; idle lanes offer 0).
        const u32 hi = __reduce_max_sync(BX_FULL_MASK, (u32)(best >> 32));
        const u32 lo = __reduce_max_sync(BX_FULL_MASK, (u32)(best >> 32) == hi ? (u32)best : 0u);
        best = ((u64)hi << 32) | (u64)lo;
        prev = best;
#ifdef BITEXACT_MUTANT
        const u32 e = (u32)best;
#else
        const u32 e = ~(u32)best;
#endif
        const float pe = p[e];
        total = total + pe;
        if (lane == j) {
            mine = pe;
            mine_e = e;
        }
        if (lane == 0) ids[j] = e;
    }
    if (lane < k) weights[lane] = renormalize ? bx_canon(mine / total) : mine;
    return mine_e;
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
    router_topk_warp(logits + t * E, router_smem + warp * E, ids + t * k, weights + t * k, E, k,
                     renormalize, lane);
}

// ------------------------------------------------------------------------------------------
// router_route_f32: a decode step's whole routing in one launch. Block (m, t) forms logit m of
// token t, the canonical f32 dot (gemm.cu's gemv_f32_wide: W's row and x staged in shared
// memory by 128 threads, thread p < 4 runs partial p over the 32-blocks b % 4 == p, then
// (p0 + p1) + (p2 + p3)), and writes it to logits; the block that finishes token t's last
// logit (an integer counter per token: which block is last never changes a value) runs
// softmax_topk's warp on them, then writes the token's rows of the unsorted routing tables
// (bx_route_row) and sets the counter back to 0 for the next launch. Three launches were 15 us
// a layer in ncu (the router GEMV 7.7, softmax_topk 5.4, route_rows 1.9); this one is 10.5,
// most of it the partials' 512-long fmaf chains (K = 2048) and the last block's serial tail
// (achieved occupancy 6%: one busy warp a block).

extern "C" __global__ void __launch_bounds__(128)
    router_route_f32(float* __restrict__ logits, u32* __restrict__ ids,
                     float* __restrict__ weights, u32* __restrict__ up, u32* __restrict__ down,
                     u32* __restrict__ counters, const float* __restrict__ x,
                     const float* __restrict__ W, u32 E, u32 K, u32 k, u32 renormalize,
                     u32 len) {
    bx_grid_begin();
    __shared__ __align__(16) float sw[BX_F32ROW_SEG / 32u * BX_F32ROW_PAD];
    __shared__ __align__(16) float sx[BX_F32ROW_SEG / 32u * BX_F32ROW_PAD];
    __shared__ u32 s_last;
    const u32 tid = threadIdx.x, m = blockIdx.x, t = blockIdx.y;
    const float acc = bx_f32_row_partial<128u>(sw, sx, W + (u64)m * K, x + (u64)t * K, K, tid);
    if (tid < 32u) {
        const float p0 = __shfl_sync(BX_FULL_MASK, acc, 0), p1 = __shfl_sync(BX_FULL_MASK, acc, 1);
        const float p2 = __shfl_sync(BX_FULL_MASK, acc, 2), p3 = __shfl_sync(BX_FULL_MASK, acc, 3);
        if (tid == 0u) {
            logits[(u64)t * E + m] = (p0 + p1) + (p2 + p3);
            __threadfence();  // the logit is visible before the count that announces it
            s_last = atomicAdd(counters + t, 1u) == E - 1u;
        }
    }
    __syncthreads();
    if (!s_last || tid >= 32u) return;
    __threadfence();  // every other block's logit is read after its count
    const u32 e = router_topk_warp(logits + (u64)t * E, sw, ids + (u64)t * k, weights + (u64)t * k,
                                   E, k, renormalize, tid);
    if (tid < k) bx_route_row(up, down, t * k + tid, e, len, k);
    if (tid == 0u) counters[t] = 0u;  // ready for the next launch
}
