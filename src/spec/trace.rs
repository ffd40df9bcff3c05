//! What a forward leaves behind for the oracle to compare: every layer's hidden states and the
//! logits ([`Trace`]), filled alike by the CPU reference and the GPU session, and an MoE block's
//! host result ([`MoeOutput`]).

/// Hidden states after every layer: `layers[l]` is `[tokens, dim]` (tokens in prompt order).
#[derive(Clone, Debug, Default)]
pub struct Trace {
    /// One `[tokens, dim]` buffer per layer.
    pub layers: Vec<Vec<f32>>,
    /// Logits of every token, `[tokens, vocab]` (when the path computed them).
    pub logits: Vec<f32>,
}

impl Trace {
    pub(crate) fn push_layer(&mut self, l: usize, rows: &[f32]) {
        if self.layers.len() <= l {
            self.layers.resize(l + 1, Vec::new());
        }
        self.layers[l].extend_from_slice(rows);
    }
}

/// Where two traces first differ: `(layer, token, element)` of the hidden states (layers and
/// tokens both traces hold), or `None` when they agree bit for bit there.
pub fn first_divergence(a: &Trace, b: &Trace, dim: usize) -> Option<(usize, usize, usize)> {
    for (l, (x, y)) in a.layers.iter().zip(&b.layers).enumerate() {
        let n = x.len().min(y.len());
        if let Some(i) = (0..n).find(|&i| x[i].to_bits() != y[i].to_bits()) {
            return Some((l, i / dim, i % dim));
        }
    }
    None
}

/// Result of an MoE block forward over `n` tokens.
#[derive(Clone, Debug)]
pub struct MoeOutput {
    /// `[n, dim]`
    pub out: Vec<f32>,
    /// Selected experts `[n, top_k]`, slot order.
    pub ids: Vec<u32>,
    /// Routing weights `[n, top_k]`.
    pub weights: Vec<f32>,
}
