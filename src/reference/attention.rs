//! Reference for `attention_f32` (`cuda/attention.cu`): causal grouped-query attention over a
//! KV cache.

use crate::math::{butterfly_sum, canon, exp, LANES};
use crate::reference::gemm::dot_f32;

/// The attention scale `1 / sqrt(hd)`, in f32.
pub fn scale(hd: usize) -> f32 {
    1.0 / (hd as f32).sqrt()
}

/// One query head `q: [hd]` at position `t` against cache rows `0..=t` of one kv head
/// (`k, v: [cap, hd]`). The order:
///
/// 1. `s_j = dot(q, k_j) * scale` ([`dot_f32`], then one rounded multiply).
/// 2. `m = fmax` over `s_j` from `-inf`; `e_j = exp(s_j - m)`.
/// 3. `sum`: 32 lane partials over `j = l, l + 32, ..` (adds from `+0`), then
///    [`butterfly_sum`]; `p_j = canon(e_j / sum)`.
/// 4. `out[d] = dot_f32(p, v[.., d])` over `j = 0..=t` (keys in blocks of 32, block `b` feeds
///    partial `b % 4`).
pub fn attend(q: &[f32], k: &[f32], v: &[f32], t: usize, hd: usize) -> Vec<f32> {
    let n = t + 1;
    let sc = scale(hd);
    let s: Vec<f32> = (0..n)
        .map(|j| dot_f32(q, &k[j * hd..(j + 1) * hd]) * sc)
        .collect();
    let m = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let e: Vec<f32> = s.iter().map(|&x| exp(x - m)).collect();
    let mut lanes = [0.0f32; LANES];
    for (j, &x) in e.iter().enumerate() {
        lanes[j % LANES] += x;
    }
    let sum = butterfly_sum(lanes);
    let p: Vec<f32> = e.iter().map(|&x| canon(x / sum)).collect();
    (0..hd)
        .map(|d| {
            let col: Vec<f32> = (0..n).map(|j| v[j * hd + d]).collect();
            canon(dot_f32(&p, &col))
        })
        .collect()
}

/// Attention for queries `q: [nq, n_heads, hd]` at positions `qpos` over one layer's caches
/// `k, v: [n_kv, cap, hd]`; returns `[nq, n_heads, hd]`. Head `h` reads kv head
/// `h / (n_heads / n_kv)`.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    qpos: &[u32],
    n_heads: usize,
    n_kv: usize,
    hd: usize,
    cap: usize,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(q.len());
    for (i, &t) in qpos.iter().enumerate() {
        for h in 0..n_heads {
            let kvh = h / (n_heads / n_kv);
            let qh = &q[(i * n_heads + h) * hd..][..hd];
            let kc = &k[kvh * cap * hd..][..cap * hd];
            let vc = &v[kvh * cap * hd..][..cap * hd];
            out.extend(attend(qh, kc, vc, t as usize, hd));
        }
    }
    out
}
