//! Host weights of the runner's models and their synthetic generation: every value a pure
//! function of `(seed, tensor, index)` ([`crate::init`]), so a layer can be made on its own
//! (the 30B presets never sit in memory whole) and any path holds the same bits.

use crate::error::Result;
use crate::init;
use crate::quant::{QuantMatrix, WeightFormat};
use crate::spec::config::{ModelConfig, MoeConfig};
use crate::spec::delta_net::DeltaNetWeights;

/// An attention mixer's weights (host).
#[derive(Clone, Debug)]
pub struct AttentionWeights {
    /// `[q_rows, dim]` ([`ModelConfig::q_rows`]): the queries, and in a hybrid model each
    /// head's output gate after its query (`[q_h | gate_h]` per head).
    pub wq: QuantMatrix,
    /// `[n_kv * hd, dim]`
    pub wk: QuantMatrix,
    /// `[n_kv * hd, dim]`
    pub wv: QuantMatrix,
    /// `[dim, n_heads * hd]`
    pub wo: QuantMatrix,
    /// `[hd]`
    pub q_norm: Vec<f32>,
    /// `[hd]`
    pub k_norm: Vec<f32>,
}

/// What mixes the tokens in a layer: attention, or (in a hybrid model) a Gated DeltaNet.
#[derive(Clone, Debug)]
pub enum Mixer {
    /// Grouped-query attention over the KV cache (gated in a hybrid model).
    Attention(AttentionWeights),
    /// The Gated DeltaNet of [`crate::reference::delta_net`].
    DeltaNet(DeltaNetWeights),
}

/// One layer's weights (host).
#[derive(Clone, Debug)]
pub struct LayerWeights {
    /// `[dim]`
    pub attn_norm: Vec<f32>,
    /// The mixer.
    pub mixer: Mixer,
    /// `[dim]`
    pub ffn_norm: Vec<f32>,
    /// The MoE block.
    pub moe: MoeWeights,
}

impl LayerWeights {
    /// The attention mixer, when this layer has one.
    pub fn attention(&self) -> Option<&AttentionWeights> {
        match &self.mixer {
            Mixer::Attention(a) => Some(a),
            Mixer::DeltaNet(_) => None,
        }
    }

    /// The attention mixer, mutable.
    pub fn attention_mut(&mut self) -> Option<&mut AttentionWeights> {
        match &mut self.mixer {
            Mixer::Attention(a) => Some(a),
            Mixer::DeltaNet(_) => None,
        }
    }
}

/// A model's weights (host): the embedding, the first `layers.len()` layers (a CPU reference
/// may hold fewer than the config has), the final norm and the LM head.
#[derive(Clone, Debug)]
pub struct ModelWeights {
    /// The shape.
    pub cfg: ModelConfig,
    /// `[vocab, dim]`
    pub embed: Vec<f32>,
    /// Layers `0..layers.len()`.
    pub layers: Vec<LayerWeights>,
    /// `[dim]`
    pub out_norm: Vec<f32>,
    /// `[vocab, dim]`
    pub lm_head: QuantMatrix,
}

const EMBED: u64 = 1;
const OUT_NORM: u64 = 2;
const LM_HEAD: u64 = 3;
/// Tensor ids of layer `l` start at `(l + 1) * LAYER_STRIDE`.
const LAYER_STRIDE: u64 = 1 << 10;

fn norm_weights(seed: u64, tensor: u64, n: usize) -> Vec<f32> {
    // 1 + noise: near the trained scale, never all ones.
    (0..n as u64)
        .map(|i| 1.0 + init::uniform(seed, tensor, i) * 0.125)
        .collect()
}

impl LayerWeights {
    /// Layer `l` of `cfg` from `seed`.
    pub fn generate(cfg: &ModelConfig, seed: u64, l: usize) -> Result<Self> {
        let base = (l as u64 + 1) * LAYER_STRIDE;
        let (d, hd) = (cfg.dim, cfg.head_dim);
        let (qd, kvd) = (cfg.n_heads * hd, cfg.n_kv_heads * hd);
        let mat = |id: u64, rows: usize, cols: usize| {
            let v = init::fill(seed, base + id, rows * cols, init::fan_in_scale(cols));
            QuantMatrix::quantize(cfg.attn_format, &v, 1, rows, cols)
        };
        let mixer = if cfg.is_attention_layer(l) {
            Mixer::Attention(AttentionWeights {
                // A gated query projection has its own tensor id: the plain one keeps its bits.
                wq: if cfg.hybrid.is_some() {
                    mat(9, cfg.q_rows(), d)?
                } else {
                    mat(2, qd, d)?
                },
                wk: mat(3, kvd, d)?,
                wv: mat(4, kvd, d)?,
                wo: mat(5, d, qd)?,
                q_norm: norm_weights(seed, base + 6, hd),
                k_norm: norm_weights(seed, base + 7, hd),
            })
        } else {
            let dn = cfg
                .delta_net()
                .expect("a DeltaNet layer is in a hybrid model");
            Mixer::DeltaNet(DeltaNetWeights::generate(&dn, seed, base + 512)?)
        };
        Ok(LayerWeights {
            attn_norm: norm_weights(seed, base + 1, d),
            mixer,
            ffn_norm: norm_weights(seed, base + 8, d),
            moe: MoeWeights::generate_at(&cfg.moe, seed, base + 64)?,
        })
    }
}

impl ModelWeights {
    /// Weights from `seed` for the first `layers` layers (all when `None`).
    pub fn generate(cfg: &ModelConfig, seed: u64, layers: Option<usize>) -> Result<Self> {
        cfg.validate()?;
        let n = layers.unwrap_or(cfg.n_layers).min(cfg.n_layers);
        let lm = init::fill(
            seed,
            LM_HEAD,
            cfg.vocab * cfg.dim,
            init::fan_in_scale(cfg.dim),
        );
        Ok(ModelWeights {
            cfg: cfg.clone(),
            embed: init::fill(seed, EMBED, cfg.vocab * cfg.dim, 1.0),
            layers: (0..n)
                .map(|l| LayerWeights::generate(cfg, seed, l))
                .collect::<Result<_>>()?,
            out_norm: norm_weights(seed, OUT_NORM, cfg.dim),
            lm_head: QuantMatrix::quantize(cfg.lm_head_format, &lm, 1, cfg.vocab, cfg.dim)?,
        })
    }

    /// The embedding, final norm and LM head of `cfg` from `seed` and no layer: the bits
    /// [`ModelWeights::generate`] gives them, for callers that make the layers one at a time
    /// (a 30B preset never sits in memory whole).
    pub fn generate_head(cfg: &ModelConfig, seed: u64) -> Result<Self> {
        let one = ModelConfig {
            n_layers: 1,
            ..cfg.clone()
        };
        Ok(ModelWeights {
            cfg: cfg.clone(),
            ..ModelWeights::generate(&one, seed, Some(0))?
        })
    }

    /// True when every layer of the config is present.
    pub fn is_complete(&self) -> bool {
        self.layers.len() == self.cfg.n_layers
    }
}

/// Weights of the shared expert (each output feature's weights contiguous).
#[derive(Clone, Debug)]
pub struct SharedWeights {
    /// Gate logit weights `[1, 1, dim]`, F32 (`ffn_gate_inp_shexp`).
    pub gate_inp: QuantMatrix,
    /// `[1, shared_ffn, dim]`
    pub gate: QuantMatrix,
    /// `[1, shared_ffn, dim]`
    pub up: QuantMatrix,
    /// `[1, dim, shared_ffn]`
    pub down: QuantMatrix,
}

/// Weights of an MoE block (each output feature's weights contiguous, as GGUF stores them).
#[derive(Clone, Debug)]
pub struct MoeWeights {
    /// The shape.
    pub cfg: MoeConfig,
    /// `[1, n_experts, dim]`, F32.
    pub router: QuantMatrix,
    /// `[n_experts, ffn, dim]`
    pub gate: QuantMatrix,
    /// `[n_experts, ffn, dim]`
    pub up: QuantMatrix,
    /// `[n_experts, dim, ffn]`
    pub down: QuantMatrix,
    /// The shared expert, if the config has one.
    pub shared: Option<SharedWeights>,
}

/// Tensor ids of [`init::hash`] for the block's weights and for synthetic inputs.
mod tensor_id {
    pub const ROUTER: u64 = 1;
    pub const GATE: u64 = 2;
    pub const UP: u64 = 3;
    pub const DOWN: u64 = 4;
    pub const SHARED_GATE_INP: u64 = 5;
    pub const SHARED_GATE: u64 = 6;
    pub const SHARED_UP: u64 = 7;
    pub const SHARED_DOWN: u64 = 8;
    pub const INPUT: u64 = 100;
}

impl MoeWeights {
    /// Weights from `seed`: each tensor `uniform(seed, tensor, i) / sqrt(fan_in)`, encoded into
    /// `cfg.format` by [`QuantMatrix::quantize`] (router and shared gate stay F32).
    pub fn generate(cfg: &MoeConfig, seed: u64) -> Result<Self> {
        Self::generate_at(cfg, seed, 0)
    }

    /// [`MoeWeights::generate`] with every tensor id offset by `base` (a model's layers use
    /// distinct bases, so no two tensors share values).
    pub fn generate_at(cfg: &MoeConfig, seed: u64, base: u64) -> Result<Self> {
        use tensor_id::*;
        cfg.validate()?;
        let (d, f, e, fmt) = (cfg.dim, cfg.ffn, cfg.n_experts, cfg.format);
        let make = |id, fmt, experts, rows, cols| {
            let v = init::fill(
                seed,
                base + id,
                experts * rows * cols,
                init::fan_in_scale(cols),
            );
            QuantMatrix::quantize(fmt, &v, experts, rows, cols)
        };
        let shared = match cfg.shared_ffn {
            Some(s) => Some(SharedWeights {
                gate_inp: make(SHARED_GATE_INP, WeightFormat::F32, 1, 1, d)?,
                gate: make(SHARED_GATE, fmt, 1, s, d)?,
                up: make(SHARED_UP, fmt, 1, s, d)?,
                down: make(SHARED_DOWN, fmt, 1, d, s)?,
            }),
            None => None,
        };
        Ok(MoeWeights {
            cfg: cfg.clone(),
            router: make(ROUTER, WeightFormat::F32, 1, e, d)?,
            gate: make(GATE, fmt, e, f, d)?,
            up: make(UP, fmt, e, f, d)?,
            down: make(DOWN, fmt, e, d, f)?,
            shared,
        })
    }

    /// Synthetic hidden states `[n, dim]` from `seed`, uniform on `[-1, 1)`.
    pub fn inputs(cfg: &MoeConfig, seed: u64, n: usize) -> Vec<f32> {
        init::fill(seed, tensor_id::INPUT, n * cfg.dim, 1.0)
    }
}

/// Synthetic token ids `[n]` from `seed`, each below `vocab`.
pub fn prompt(seed: u64, n: usize, vocab: usize) -> Vec<u32> {
    (0..n as u64)
        .map(|i| (init::hash(seed, 0xbeef, i) % vocab as u64) as u32)
        .collect()
}

#[cfg(test)]
mod byte_count_tests {
    use super::*;

    /// The bytes the weights really hold: every matrix as stored, every vector in f32.
    fn stored(w: &ModelWeights) -> usize {
        let m = |q: &QuantMatrix| q.bytes().len();
        let v = |x: &[f32]| 4 * x.len();
        let layers: usize = w
            .layers
            .iter()
            .map(|l| {
                let mixer = match &l.mixer {
                    Mixer::Attention(a) => {
                        m(&a.wq) + m(&a.wk) + m(&a.wv) + m(&a.wo) + v(&a.q_norm) + v(&a.k_norm)
                    }
                    Mixer::DeltaNet(d) => {
                        m(&d.qkv)
                            + m(&d.z)
                            + m(&d.beta)
                            + m(&d.alpha)
                            + m(&d.out)
                            + v(&d.dt_bias)
                            + v(&d.ssm_a)
                            + v(&d.conv)
                            + v(&d.norm)
                    }
                };
                let e = &l.moe;
                let shared = e
                    .shared
                    .as_ref()
                    .map_or(0, |s| m(&s.gate_inp) + m(&s.gate) + m(&s.up) + m(&s.down));
                mixer
                    + v(&l.attn_norm)
                    + v(&l.ffn_norm)
                    + m(&e.router)
                    + m(&e.gate)
                    + m(&e.up)
                    + m(&e.down)
                    + shared
            })
            .sum();
        layers + v(&w.embed) + v(&w.out_norm) + m(&w.lm_head)
    }

    /// `ModelConfig::weight_bytes` (the memory check before a GPU model is built) is what the
    /// weights hold, for the all-attention and the hybrid layouts, in several formats.
    #[test]
    fn weight_bytes_match_the_weights() {
        for (preset, fmt) in [
            ("tiny", WeightFormat::F32),
            ("tiny", WeightFormat::Q8_0),
            ("small", WeightFormat::Q4K),
            ("tiny-hybrid", WeightFormat::F32),
            ("tiny-hybrid", WeightFormat::Q8_0),
        ] {
            let mut cfg = ModelConfig::preset(preset, fmt).unwrap();
            for attn in [cfg.attn_format, WeightFormat::Q8_0] {
                cfg.attn_format = attn;
                let w = ModelWeights::generate(&cfg, 1, None).unwrap();
                assert_eq!(
                    cfg.weight_bytes(),
                    stored(&w),
                    "{preset} {fmt} attention {attn}"
                );
            }
        }
    }
}
