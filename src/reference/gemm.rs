//! Reference for the matrix products of `cuda/gemm.cu`: the canonical f32 dot product and the
//! dense and expert-grouped products built from it.
//!
//! # The canonical order (f32 weights)
//!
//! `dot(x, w)` over `K` elements, whatever the caller (GEMV, GEMM-N for any N, the grouped
//! expert GEMM, any launch configuration):
//!
//! 1. `K` is cut into blocks of [`DOT_BLOCK`] = 32 consecutive elements (the last block may be
//!    shorter); block `b` covers `k` in `32 b .. min(32 b + 32, K)`.
//! 2. There are [`DOT_PARTIALS`] = 4 partial sums `p0..p3`, each starting at `+0.0`.
//!    Block `b` belongs to partial `b % 4`.
//! 3. Each partial is one sequential fma chain over its blocks in increasing `b`, and within a
//!    block over increasing `k`: `p = fma(w[k], x[k], p)`.
//! 4. The result is the fixed pairwise tree `(p0 + p1) + (p2 + p3)`.
//!
//! The order depends on `K` alone. Four independent chains give a GEMV four-way parallelism
//! per row, and let a tiled GEMM split K across four groups of threads that each own one
//! partial, while the chains stay long enough that the combination costs nothing.

use rayon::prelude::*;

use crate::math::canon;

/// Elements per block of the canonical dot product.
pub const DOT_BLOCK: usize = 32;
/// Number of strided partial sums of the canonical dot product.
pub const DOT_PARTIALS: usize = 4;

/// The canonical f32 dot product of `x` and `w` (same length `K`); see the module docs.
///
/// # Panics
/// If the lengths differ.
pub fn dot_f32(x: &[f32], w: &[f32]) -> f32 {
    assert_eq!(x.len(), w.len(), "dot_f32: lengths");
    let mut p = [0.0f32; DOT_PARTIALS];
    for (b, (xb, wb)) in x.chunks(DOT_BLOCK).zip(w.chunks(DOT_BLOCK)).enumerate() {
        let acc = &mut p[b % DOT_PARTIALS];
        for (&xk, &wk) in xb.iter().zip(wb) {
            *acc = wk.mul_add(xk, *acc);
        }
    }
    (p[0] + p[1]) + (p[2] + p[3])
}

/// Dense product `y[n, m] = dot(x[n, :], w[m, :])`.
///
/// Shapes (row-major): `x: [n, k]`, `w: [m, k]` (each output feature's weights contiguous, as
/// GGUF and PyTorch store them); returns `y: [n, m]`. Output rows are computed on all cores;
/// each element is the sequential [`dot_f32`], so the bits do not depend on the threads.
///
/// # Panics
/// If the slice lengths do not match the shape.
pub fn gemm_f32(x: &[f32], w: &[f32], n: usize, m: usize, k: usize) -> Vec<f32> {
    assert_eq!(x.len(), n * k, "gemm_f32: x");
    assert_eq!(w.len(), m * k, "gemm_f32: w");
    let mut y = vec![0.0f32; n * m];
    y.par_chunks_mut(m.max(1)).enumerate().for_each(|(i, yr)| {
        let xr = &x[i * k..(i + 1) * k];
        for (j, out) in yr.iter_mut().enumerate() {
            *out = canon(dot_f32(xr, &w[j * k..(j + 1) * k]));
        }
    });
    y
}

/// Expert-grouped product: for each routed row `r`,
/// `y[y_rows[r], m] = dot(x[x_rows[r], :], w[experts[r], m, :])`.
///
/// Shapes (row-major): `x: [nx, k]`, `w: [n_experts, m, k]`, `y: [ny, m]`; `x_rows`,
/// `experts` and `y_rows` have one entry per routed row. Rows of `y` that no `y_rows` entry
/// names are left as they are.
///
/// # Panics
/// If the lengths do not match or an index is out of range.
#[allow(clippy::too_many_arguments)]
pub fn gemm_grouped_f32(
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    x_rows: &[u32],
    experts: &[u32],
    y_rows: &[u32],
    m: usize,
    k: usize,
) {
    assert_eq!(x_rows.len(), experts.len(), "gemm_grouped_f32: table");
    assert_eq!(y_rows.len(), experts.len(), "gemm_grouped_f32: table");
    let rows: Vec<Vec<f32>> = (0..experts.len())
        .into_par_iter()
        .map(|r| {
            let xr = &x[x_rows[r] as usize * k..][..k];
            let e = experts[r] as usize;
            (0..m)
                .map(|j| canon(dot_f32(xr, &w[(e * m + j) * k..][..k])))
                .collect()
        })
        .collect();
    for (r, row) in rows.into_iter().enumerate() {
        y[y_rows[r] as usize * m..][..m].copy_from_slice(&row);
    }
}
