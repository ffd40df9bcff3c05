//! Reference for `rope_neox_f32` (`cuda/rope.cu`) and the cos/sin table both sides share.

use crate::math::canon;

/// The rotary table for positions `0..max_pos` and `rd / 2` frequencies: `theta_i =
/// base^(-2 i / rd)`, angle `pos * theta_i`, cos and sin computed in f64 and rounded to f32.
/// Returns `(cos, sin)`, each `[max_pos, rd / 2]`.
pub fn rope_table(max_pos: usize, rd: usize, base: f64) -> (Vec<f32>, Vec<f32>) {
    let half = rd / 2;
    let mut cos = Vec::with_capacity(max_pos * half);
    let mut sin = Vec::with_capacity(max_pos * half);
    for pos in 0..max_pos {
        for i in 0..half {
            let theta = base.powf(-2.0 * i as f64 / rd as f64);
            let a = pos as f64 * theta;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    (cos, sin)
}

/// NEOX rotary embedding in place on `x: [rows, heads, hd]`, row `r` at position `pos[r]`:
/// for `i < half` (`half = rd / 2`), `a = x[i]`, `b = x[i + half]`,
/// `x[i] = a * c - b * s`, `x[i + half] = a * s + b * c` with `c, s` the table's entries
/// (each product rounded, then one add or subtract). Dims `rd..hd` are left alone.
#[allow(clippy::too_many_arguments)]
pub fn rope_neox(
    x: &mut [f32],
    pos: &[u32],
    cos: &[f32],
    sin: &[f32],
    heads: usize,
    hd: usize,
    half: usize,
) {
    for (r, row) in x.chunks_mut(heads * hd).enumerate() {
        let t = pos[r] as usize * half;
        for v in row.chunks_mut(hd) {
            for i in 0..half {
                let (c, s) = (cos[t + i], sin[t + i]);
                let (a, b) = (v[i], v[i + half]);
                v[i] = canon(a * c - b * s);
                v[i + half] = canon(a * s + b * c);
            }
        }
    }
}
