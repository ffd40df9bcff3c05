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
