//! Reference for `moe_weighted_reduce` (`cuda/moe_reduce.cu`): the host loop it replaces.

use crate::math::canon;

/// `acc[e] = fma(x[e], w, acc[e])` for every `e`: one routed expert's contribution.
pub fn add_scaled_inplace(acc: &mut [f32], x: &[f32], w: f32) {
    for (a, &xi) in acc.iter_mut().zip(x) {
        *a = xi.mul_add(w, *a);
    }
}

/// `acc[e] = acc[e] + x[e]` for every `e`: the shared expert's (already gated) output.
pub fn add_inplace(acc: &mut [f32], x: &[f32]) {
    for (a, &xi) in acc.iter_mut().zip(x) {
        *a += xi;
    }
}

/// Weighted MoE reduce over `n` tokens, `na` routed experts per token, `dim` columns.
///
/// Shapes (row-major): `partial: [n, na, dim]`, `weight: [n, na]`, `shared: [n, dim]` or
/// absent; returns `out: [n, dim]`.
///
/// Order, per token `i`: `out = +0.0`; for `k` in `0..na` in increasing order,
/// [`add_scaled_inplace`]`(out, partial[i, k, :], weight[i, k])` (an fma chain: routed
/// experts first, in slot order); then, if there is a shared term,
/// [`add_inplace`]`(out, shared[i, :])` (a plain add, last). The shared expert's gate is a
/// separate, already rounded multiply (`row_scale`).
///
/// # Panics
/// If the slice lengths do not match the shape.
pub fn moe_weighted_reduce(
    partial: &[f32],
    weight: &[f32],
    shared: Option<&[f32]>,
    n: usize,
    na: usize,
    dim: usize,
) -> Vec<f32> {
    assert_eq!(partial.len(), n * na * dim, "moe_weighted_reduce: partial");
    assert_eq!(weight.len(), n * na, "moe_weighted_reduce: weight");
    if let Some(s) = shared {
        assert_eq!(s.len(), n * dim, "moe_weighted_reduce: shared");
    }
    let mut out = vec![0.0f32; n * dim];
    for i in 0..n {
        let acc = &mut out[i * dim..(i + 1) * dim];
        for k in 0..na {
            let row = &partial[(i * na + k) * dim..(i * na + k + 1) * dim];
            add_scaled_inplace(acc, row, weight[i * na + k]);
        }
        if let Some(s) = shared {
            add_inplace(acc, &s[i * dim..(i + 1) * dim]);
        }
    }
    out.iter_mut().for_each(|v| *v = canon(*v));
    out
}
