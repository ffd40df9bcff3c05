//! References for `cuda/elementwise.cu`.

use crate::math::canon;

/// The residual add `a[j] = a[j] + b[j]`.
pub fn add(a: &mut [f32], b: &[f32]) {
    for (x, &y) in a.iter_mut().zip(b) {
        *x = canon(*x + y);
    }
}

/// `out[r, :] = table[ids[r], :]` for a table of rows of `width`.
pub fn gather_rows(table: &[f32], ids: &[u32], width: usize) -> Vec<f32> {
    ids.iter()
        .flat_map(|&i| table[i as usize * width..][..width].iter().copied())
        .collect()
}
