//! Reference for `softmax_topk` (`cuda/router.cu`): MoE routing from router logits.

use crate::math::{butterfly_sum, canon, exp, order_key};

/// Width of the fixed summation tree of the softmax denominator (a warp on the GPU).
pub const SOFTMAX_LANES: usize = crate::math::LANES;

/// Softmax over `n_experts` logits, then top-`k` with a deterministic tie rule, then
/// (optionally) renormalisation of the selected weights. Shapes: `logits: [n, n_experts]`;
/// returns `(ids: [n, k], weights: [n, k])`, slot `j` holding the `j`-th selected expert.
///
/// Order, per token:
/// 1. `m` = `fmax` over the logits, starting at `-inf` (NaN logits are ignored by `fmax`; a
///    max of `±0` gives the same result below either way).
/// 2. `ex[e] = exp(x[e] - m)` ([`crate::math::exp`]).
/// 3. The denominator is a fixed tree: 32 partials, partial `l` the sequential sum
///    `((+0 + ex[l]) + ex[l + 32]) + ..` over `e ≡ l (mod 32)`; then five butterfly levels,
///    for `off` in `16, 8, 4, 2, 1`: `s[l] = s[l] + s[l ^ off]` (all `l` at once); `sum = s[0]`.
/// 4. `p[e] = canon(ex[e] / sum)`.
/// 5. Selection: the `k` largest `p` by IEEE totalOrder ([`crate::math::order_key`]), ties
///    broken by the lower expert id; slot `j` gets the `j`-th in that order. Every id is below
///    `n_experts`, NaN logits included (the MoE block's device routing relies on it).
/// 6. With `renormalize`: `s = ((+0 + p[id0]) + p[id1]) + ..` in slot order, then
///    `w[j] = canon(p[idj] / s)`; without: `w[j] = p[idj]`.
///
/// # Panics
/// If `logits.len() != n * n_experts` or `k > n_experts`.
pub fn softmax_topk(
    logits: &[f32],
    n: usize,
    n_experts: usize,
    k: usize,
    renormalize: bool,
) -> (Vec<u32>, Vec<f32>) {
    assert_eq!(logits.len(), n * n_experts, "softmax_topk: logits");
    assert!(k <= n_experts, "softmax_topk: k > n_experts");
    let mut ids = Vec::with_capacity(n * k);
    let mut weights = Vec::with_capacity(n * k);
    for x in logits.chunks(n_experts.max(1)).take(n) {
        let m = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let ex: Vec<f32> = x.iter().map(|&v| exp(v - m)).collect();
        let mut s = [0.0f32; SOFTMAX_LANES];
        for (e, &v) in ex.iter().enumerate() {
            s[e % SOFTMAX_LANES] += v;
        }
        let sum = butterfly_sum(s);
        let p: Vec<f32> = ex.iter().map(|&v| canon(v / sum)).collect();

        // Candidates as one integer: higher p first, then lower id.
        let cand = |e: usize| -> u64 {
            (u64::from(order_key(p[e]) as u32 ^ 0x8000_0000) << 32) | u64::from(!(e as u32))
        };
        let mut prev = u64::MAX;
        let mut sel_p = Vec::with_capacity(k);
        for j in 0..k {
            // Round 0 takes every candidate (`u64::MAX` is expert 0 with the canonical NaN).
            let best = (0..n_experts)
                .map(cand)
                .filter(|&c| j == 0 || c < prev)
                .max()
                .expect("k <= n_experts");
            prev = best;
            let e = !(best as u32);
            ids.push(e);
            sel_p.push(p[e as usize]);
        }
        if renormalize {
            let total = sel_p.iter().fold(0.0f32, |acc, &v| acc + v);
            weights.extend(sel_p.iter().map(|&v| canon(v / total)));
        } else {
            weights.extend(sel_p);
        }
    }
    (ids, weights)
}
