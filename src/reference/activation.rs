//! References for the elementwise kernels of `cuda/activation.cu`.

use crate::math::{canon, sigmoid as sigmoid1, silu};

/// SwiGLU: `out[j] = silu(gate[j]) * up[j]` with `silu(g) = g / (1 + exp(-g))`
/// ([`crate::math::silu`]), then one IEEE multiply.
///
/// # Panics
/// If `gate` and `up` differ in length.
pub fn swiglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    assert_eq!(gate.len(), up.len(), "swiglu: lengths");
    gate.iter()
        .zip(up)
        .map(|(&g, &u)| canon(silu(g) * u))
        .collect()
}

/// `out[j] = 1 / (1 + exp(-x[j]))` ([`crate::math::sigmoid`]).
pub fn sigmoid(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| canon(sigmoid1(v))).collect()
}

/// The output gate of a gated attention layer: `a: [n, nh, hd]` (the attention's output) times
/// the sigmoid of its gate, in place, one rounded multiply each: `a[r, h, i] *= sigmoid(qg[r,
/// offset + h * head_stride + i])` (`qg: [n, width]`, the query product whose heads hold
/// `[q | gate]`).
#[allow(clippy::too_many_arguments)]
pub fn gate_heads_sigmoid(
    a: &mut [f32],
    qg: &[f32],
    n: usize,
    nh: usize,
    hd: usize,
    width: usize,
    offset: usize,
    head_stride: usize,
) {
    for r in 0..n {
        for h in 0..nh {
            for i in 0..hd {
                let g = qg[r * width + offset + h * head_stride + i];
                let e = &mut a[(r * nh + h) * hd + i];
                *e = canon(*e * sigmoid1(g));
            }
        }
    }
}
