//! Reference for `rmsnorm_f32` (`cuda/norm.cu`).

use crate::math::{butterfly_sum, canon, LANES};

/// RMSNorm of each row of `x: [rows, width]` with weights `w: [width]`:
///
/// 1. `ss`: 32 lane partials, partial `l` the fma chain `p = fma(x_i, x_i, p)` from `+0` over
///    `i = l, l + 32, ..`; then [`butterfly_sum`].
/// 2. `ms = ss / width`, `rs = 1 / sqrt(ms + eps)` (each step one IEEE operation).
/// 3. `y_i = (x_i * rs) * w_i`.
///
/// # Panics
/// If `x.len()` is not a multiple of `w.len()`.
pub fn rmsnorm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let width = w.len();
    assert!(width > 0 && x.len() % width == 0, "rmsnorm: shape");
    let mut y = Vec::with_capacity(x.len());
    for row in x.chunks(width) {
        let mut p = [0.0f32; LANES];
        for (i, &v) in row.iter().enumerate() {
            p[i % LANES] = v.mul_add(v, p[i % LANES]);
        }
        let ms = butterfly_sum(p) / width as f32;
        let rs = 1.0 / (ms + eps).sqrt();
        y.extend(row.iter().zip(w).map(|(&v, &wi)| canon((v * rs) * wi)));
    }
    y
}
