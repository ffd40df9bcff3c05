//! Reference for `row_scale` (`cuda/row_scale.cu`).

use crate::math::canon;

/// `buf[i, e] = buf[i, e] * scales[i]` over `buf: [rows, cols]` row-major, `scales: [rows]`:
/// one IEEE multiply per element.
///
/// # Panics
/// If `buf.len() != scales.len() * cols`.
pub fn row_scale(buf: &mut [f32], scales: &[f32], cols: usize) {
    assert_eq!(buf.len(), scales.len() * cols, "row_scale: shape");
    for (row, &s) in buf.chunks_mut(cols.max(1)).zip(scales) {
        for v in row {
            *v = canon(*v * s);
        }
    }
}
