// route.cu — routing tables built on the device from a router's expert ids, for the grouped
// products of gemm.cu (RoutedRows in src/kernels/route.rs; the layout of a table:
// x_rows | experts | y_rows | gemm tiles | gemv tiles, tiles as (expert, first row, rows)).
//   route_rows    one row per tile, in (token, slot) order (a decode step)
//   route_count   the rows of each expert
//   route_sort    rows sorted by expert (stably), cut into tiles of 64 and 8 rows (a prefill)
// Reference: src/reference/route.rs (unsorted, sorted): the tables are integers, equal entry for
// entry. The family's mutant: route_rows wraps an id past the last expert instead of clamping
// it (the tests route such ids on purpose).

#include "common.cuh"

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
#ifdef BITEXACT_MUTANT
    // Broken on purpose (see BITEXACT_MUTANT): an out-of-range id wraps instead of clamping.
    bx_route_row(up, down, r, ids[r] % n_experts, len, k);
#else
    bx_route_row(up, down, r, min(ids[r], n_experts - 1u), len, k);
#endif
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
