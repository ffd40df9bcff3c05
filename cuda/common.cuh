// common.cuh — helpers shared by every kernel family; pasted in front of each .cu by the device
// layer (NVRTC gets one self-contained program per family).
//
// Everything here has a line-for-line Rust twin in src/math.rs. Only correctly rounded IEEE
// operations are used (add, mul, explicit fmaf, div, rintf); the programs are compiled with
// --fmad=false, so no `a * b + c` below is ever fused behind our back.

typedef unsigned int u32;
typedef unsigned long long u64;
typedef int i32;

#define BX_FULL_MASK 0xffffffffu
#define BX_MAX_GRID_Y 65535u

// The first statement of every kernel (a unit test checks each one; src/launch.rs says why).
// Kernels are launched with programmatic dependent launch allowed, so a kernel's blocks may start
// while the kernel before it on the stream is still running: griddepcontrol.wait returns once
// that kernel has completed and its writes are visible, before this one reads or writes any
// memory. Then launch_dependents lets the next kernel's blocks be scheduled as soon as every block
// of this one has started. Launched without the attribute (or before sm_90) both are no-ops.
__device__ __forceinline__ void bx_grid_begin() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// The elementwise kernels' loop: u64 index `i` over 0..n, from the thread's place in the grid,
// stepping by the grid's thread count (the launch's kernels::grid_stride sizes the grid).
#define BX_GRID_STRIDE(i, n)                                                                  \
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < (n);                          \
         i += (u64)gridDim.x * blockDim.x)

// The one NaN every bitexact kernel returns: what CUDA's float arithmetic produces.
#define BX_CANON_NAN_BITS 0x7fffffffu

__device__ __forceinline__ float bx_canon(float x) {
    return x != x ? __uint_as_float(BX_CANON_NAN_BITS) : x;
}

// Integer key with the IEEE totalOrder of floats: -NaN < -inf < .. < -0 < +0 < .. < +inf < +NaN.
// Mirror: math::order_key (the same map f32::total_cmp uses).
__device__ __forceinline__ i32 bx_order_key(float x) {
    i32 b = __float_as_int(x);
    return b ^ (i32)(((u32)(b >> 31)) >> 1);
}

// exp(x), our own: range reduction x = n ln2 + r (|r| <= ln2 / 2, ln2 split hi + lo), the
// degree-7 Taylor polynomial of e^r by Horner with fmaf, then two exact-or-once-rounded scalings
// by 2^n1 * 2^n2 (n1 = n >> 1, n2 = n - n1), so subnormal results are rounded exactly once.
// Below -104 the result is +0, above 88.72283935546875 it is +inf, NaN gives the canonical NaN.
// Mirror: math::exp. Accuracy: within 2 ulp of e^x on normal results (tests/parity/math.rs).
__device__ __forceinline__ float bx_exp(float x) {
    if (x != x) return __uint_as_float(BX_CANON_NAN_BITS);
    if (x > 88.72283935546875f) return __uint_as_float(0x7f800000u);
    if (x < -104.0f) return 0.0f;
    const float n = rintf(x * 1.44269502162933349609375f);
    float r = fmaf(n, -0.693145751953125f, x);
    r = fmaf(n, -1.428606765330187045037746429443359375e-06f, r);
    float p = 1.98412701138295233249664306640625e-04f;  // 1/5040
    p = fmaf(p, r, 1.38888892251998186111450195312500e-03f);  // 1/720
    p = fmaf(p, r, 8.33333376795053482055664062500000e-03f);  // 1/120
    p = fmaf(p, r, 4.16666679084300994873046875000000e-02f);  // 1/24
    p = fmaf(p, r, 1.66666671633720397949218750000000e-01f);  // 1/6
    p = fmaf(p, r, 0.5f);
    p = fmaf(p, r, 1.0f);
    p = fmaf(p, r, 1.0f);
    const i32 ni = (i32)n;
    const i32 n1 = ni >> 1;
    const i32 n2 = ni - n1;
    p = p * __int_as_float((n1 + 127) << 23);
    return p * __int_as_float((n2 + 127) << 23);
}

// ln(x), our own: x = m 2^e with m in [sqrt(1/2), sqrt(2)) (subnormals scaled by 2^23 first),
// f = m - 1 (exact), s = f / (2 + f), z = s * s, R = z (1/3 + z (1/5 + z (1/7 + z (1/9 +
// z / 11)))) by Horner with fmaf, ln m = fmaf(2s, R, 2s), the result fmaf(e, LN2_HI, fmaf(e,
// LN2_LO, ln m)). ln 0 = -inf, ln inf = inf, negative or NaN gives the canonical NaN.
// Mirror: math::ln.
__device__ __forceinline__ float bx_ln(float x) {
    if (x != x || x < 0.0f) return __uint_as_float(BX_CANON_NAN_BITS);
    if (x == 0.0f) return __uint_as_float(0xff800000u);
    if (x == __uint_as_float(0x7f800000u)) return x;
    u32 bits = __float_as_uint(x);
    i32 e = 0;
    if (bits < 0x00800000u) {
        bits = __float_as_uint(x * __uint_as_float(0x4b000000u));  // exact scaling by 2^23
        e = -23;
    }
    e += (i32)((bits >> 23) & 0xffu) - 127;
    float m = __uint_as_float((bits & 0x007fffffu) | 0x3f800000u);
    if (m > __uint_as_float(0x3fb504f3u)) {  // sqrt(2)
        m = m * 0.5f;
        e += 1;
    }
    const float f = m - 1.0f;
    const float s = f / (2.0f + f);
    const float z = s * s;
    float r = __uint_as_float(0x3dba2e8cu);         // 1/11
    r = fmaf(r, z, __uint_as_float(0x3de38e39u));   // 1/9
    r = fmaf(r, z, __uint_as_float(0x3e124925u));   // 1/7
    r = fmaf(r, z, __uint_as_float(0x3e4ccccdu));   // 1/5
    r = fmaf(r, z, __uint_as_float(0x3eaaaaabu));   // 1/3
    r = r * z;
    const float s2 = 2.0f * s;
    const float lnm = fmaf(s2, r, s2);
    const float ef = (float)e;
    return fmaf(ef, __uint_as_float(0x3f317200u), fmaf(ef, __uint_as_float(0x35bfbe8eu), lnm));
}

// softplus(x) = ln(1 + exp(x)), and x itself above 20. Mirror: math::softplus.
__device__ __forceinline__ float bx_softplus(float x) {
    return x > 20.0f ? x : bx_ln(1.0f + bx_exp(x));
}

// sigmoid(x) = 1 / (1 + exp(-x)). Mirror: math::sigmoid.
__device__ __forceinline__ float bx_sigmoid(float x) {
    return 1.0f / (1.0f + bx_exp(-x));
}

// silu(x) = x / (1 + exp(-x)) (one division, not x * sigmoid(x)). Mirror: math::silu.
__device__ __forceinline__ float bx_silu(float x) {
    return x / (1.0f + bx_exp(-x));
}

// The canonical combination of four partials: (p0 + p1) + (p2 + p3). Mirror: the `(p0 + p1) +
// (p2 + p3)` of src/reference/gemm.rs. A family's mutant (BITEXACT_MUTANT) that calls it gets
// the left-to-right sum instead.
__device__ __forceinline__ float bx_tree4(float p0, float p1, float p2, float p3) {
#ifdef BITEXACT_MUTANT
    // Broken on purpose (see BITEXACT_MUTANT): the partials left to right.
    return ((p0 + p1) + p2) + p3;
#else
    return (p0 + p1) + (p2 + p3);
#endif
}

// The canonical f32 dot product (src/reference/gemm.rs): blocks of 32, block b feeds partial
// b % 4, each partial an fmaf chain from +0 in increasing k; returns the four partials, which
// the caller combines as (p0 + p1) + (p2 + p3).
__device__ __forceinline__ void bx_dot_partials(const float* __restrict__ x,
                                                const float* __restrict__ w, u32 K, float& p0,
                                                float& p1, float& p2, float& p3) {
    p0 = p1 = p2 = p3 = 0.0f;
    for (u32 base = 0; base < K; base += 128u) {
        const u32 b1 = min(base + 32u, K), b2 = min(base + 64u, K);
        const u32 b3 = min(base + 96u, K), b4 = min(base + 128u, K);
        for (u32 k = base; k < b1; ++k) p0 = fmaf(w[k], x[k], p0);
        for (u32 k = b1; k < b2; ++k) p1 = fmaf(w[k], x[k], p1);
        for (u32 k = b2; k < b3; ++k) p2 = fmaf(w[k], x[k], p2);
        for (u32 k = b3; k < b4; ++k) p3 = fmaf(w[k], x[k], p3);
    }
}

// Sum of 32 lane values by the fixed butterfly s += shfl_xor(s, off), off = 16, 8, 4, 2, 1;
// every lane ends with the same bits (IEEE addition commutes). Mirror: math::butterfly_sum.
__device__ __forceinline__ float bx_butterfly_sum(float s) {
    for (u32 off = 16u; off; off >>= 1) s = s + __shfl_xor_sync(BX_FULL_MASK, s, off);
    return s;
}

// fmax of v over a block of THREADS threads; every thread gets the result. red holds
// THREADS / 32 floats; the call synchronizes before writing it, so consecutive calls may share
// it. fmax is exact, so the order of the reduction does not show in the result.
template <u32 THREADS>
__device__ __forceinline__ float bx_block_max(float v, float* red) {
    const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    for (u32 off = 16u; off; off >>= 1) v = fmaxf(v, __shfl_xor_sync(BX_FULL_MASK, v, off));
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = red[0];
    for (u32 w = 1; w < THREADS / 32u; ++w) v = fmaxf(v, red[w]);
    return v;
}

// Quantizes one block of 32 activations held one per lane of a warp (lane i holds x_i; every
// lane of the warp calls it): the rule of quantize.cu (src/quant/act.rs), writing the 32 codes
// at q and the block's d and a. MUTANT_SITE: quantize.cu's mutant (codes by truncation), for
// that family's kernel only.
template <bool MUTANT_SITE>
__device__ __forceinline__ void bx_quantize_block32(float v, u32 lane, signed char* __restrict__ q,
                                                    float* __restrict__ d, float* __restrict__ a) {
    const bool bad = ((__float_as_uint(v) >> 23) & 0xffu) == 0xffu;  // NaN or inf
    const bool any_bad = __any_sync(BX_FULL_MASK, bad);
    float amax = fabsf(v);
    for (u32 off = 16u; off; off >>= 1)
        amax = fmaxf(amax, __shfl_xor_sync(BX_FULL_MASK, amax, off));
    const float dd = amax / 127.0f;
    const float r = rintf(v / dd);
    int c = (r != r) ? 0 : (int)fminf(fmaxf(r, -127.0f), 127.0f);
    if (any_bad) c = 0;
    if (MUTANT_SITE && !any_bad && r == r) c = (int)fminf(fmaxf(truncf(v / dd), -127.0f), 127.0f);
    int s = c;
    for (u32 off = 16u; off; off >>= 1) s += __shfl_xor_sync(BX_FULL_MASK, s, off);
    q[lane] = (signed char)c;
    if (lane == 0) {
        const float nan = __uint_as_float(BX_CANON_NAN_BITS);
        *d = any_bad ? nan : dd;
        *a = any_bad ? nan : dd * (float)s;
    }
}

// Routed row r = token * k + slot of expert e in the two unsorted routing tables of `len` rows
// (RoutedRows' layout: x_rows | experts | y_rows | gemm tiles | gemv tiles, one row per tile):
// `up` reads token r / k, `down` routed row r; both write row r. Written by gemm.cu's
// route_rows and by router.cu's router_route_f32, which must agree.
__device__ __forceinline__ void bx_route_row(u32* __restrict__ up, u32* __restrict__ down, u32 r,
                                             u32 e, u32 len, u32 k) {
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

// The canonical f32 dot of one weight row wr and one activation row xr of K elements, by a
// block of T threads staging them in shared memory (sw, sx: BX_F32ROW_SEG / 32 blocks of
// BX_F32ROW_PAD floats each) in 2048-wide segments with 16-byte loads when K % 4 == 0; thread
// p < 4 runs partial p over the 32-blocks b % 4 == p in increasing order (a segment holds 64
// whole blocks, so a block keeps its partial) and returns it; the caller combines the four.
// Every thread of the block must call it (it synchronizes). gemm.cu's gemv_f32_wide and
// router.cu's router_route_f32 (the decode router) share it.
#define BX_F32ROW_SEG 2048u
#define BX_F32ROW_PAD 36u  // floats per staged 32-block

template <u32 T>
__device__ __forceinline__ float bx_f32_row_partial(float* __restrict__ sw, float* __restrict__ sx,
                                                    const float* __restrict__ wr,
                                                    const float* __restrict__ xr, u32 K,
                                                    u32 tid) {
    static_assert(T * 16u == BX_F32ROW_SEG, "four float4 a thread cover a segment");
    // Rows and x start 16-byte aligned when K % 4 == 0 (allocations are).
    const bool vec = (K & 3u) == 0u;
    float acc = 0.0f;
    for (u32 k0 = 0; k0 < K; k0 += BX_F32ROW_SEG) {
        const u32 len = min(BX_F32ROW_SEG, K - k0);
        __syncthreads();  // the chains are done with the previous segment
        if (vec) {
            float4 wv[4], xv[4];
#pragma unroll
            for (u32 s = 0; s < 4u; ++s) {
                const u32 e = 4u * (tid + T * s);
                const bool ok = e < len;
                wv[s] = ok ? __ldg(reinterpret_cast<const float4*>(wr + k0 + e)) : make_float4(0, 0, 0, 0);
                xv[s] = ok ? __ldg(reinterpret_cast<const float4*>(xr + k0 + e)) : make_float4(0, 0, 0, 0);
            }
#pragma unroll
            for (u32 s = 0; s < 4u; ++s) {
                const u32 e = 4u * (tid + T * s);
                const u32 at = (e >> 5) * BX_F32ROW_PAD + (e & 31u);
                *reinterpret_cast<float4*>(sw + at) = wv[s];
                *reinterpret_cast<float4*>(sx + at) = xv[s];
            }
        } else {
            for (u32 e = tid; e < BX_F32ROW_SEG; e += T) {
                const u32 at = (e >> 5) * BX_F32ROW_PAD + (e & 31u);
                sw[at] = e < len ? __ldg(wr + k0 + e) : 0.0f;
                sx[at] = e < len ? __ldg(xr + k0 + e) : 0.0f;
            }
        }
        __syncthreads();
        if (tid < 4u) {
            const u32 nblk = (len + 31u) / 32u;
            for (u32 b = tid; b < nblk; b += 4u) {
                const float* wb = sw + b * BX_F32ROW_PAD;
                const float* xb = sx + b * BX_F32ROW_PAD;
                if (b * 32u + 32u <= len) {
#pragma unroll
                    for (u32 i = 0; i < 32u; i += 4u) {
                        const float4 w4 = *reinterpret_cast<const float4*>(wb + i);
                        const float4 x4 = *reinterpret_cast<const float4*>(xb + i);
                        acc = fmaf(w4.x, x4.x, acc);
                        acc = fmaf(w4.y, x4.y, acc);
                        acc = fmaf(w4.z, x4.z, acc);
                        acc = fmaf(w4.w, x4.w, acc);
                    }
                } else {
                    for (u32 i = 0; i < len - b * 32u; ++i) acc = fmaf(wb[i], xb[i], acc);
                }
            }
        }
    }
    return acc;
}
