//! Model shapes: the presets of the runner.

use crate::error::{Error, Result};
use crate::quant::WeightFormat;

/// Most experts per token a model may have: the routing kernel keeps a token's probabilities
/// in shared memory (`cuda/router.cu`).
pub const MAX_EXPERTS: usize = 2048;
/// Most experts one token may select: one warp lane per selected slot in the routing kernel.
pub const MAX_TOP_K: usize = 32;

/// How the attention layers keep their keys and values (and so which attention reads them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum KvMode {
    /// f32 rows, [`crate::reference::attention`]'s canonical order.
    #[default]
    F32,
    /// f16 rows ([`crate::reference::fastscan::f16_bits`]: nearest even, NaN as `0x7e00`),
    /// [`crate::reference::fastscan::attend_f16`]: the f16-KV baseline of the FastScan family.
    /// Any head dim on the CPU; 64, 128 or 256 on the GPU.
    F16,
    /// FastScan codes of `bits` (3 or 4) bits per coordinate, f32 tables and values
    /// ([`crate::reference::fastscan::CpuCache`]); layer `l`'s rotation seeded by `l`. Head
    /// dims 64, 128 and 256.
    FastScan {
        /// 3 or 4.
        bits: u32,
    },
}

/// The shape of a Qwen3-MoE-style decoder.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// Preset name.
    pub name: String,
    /// Decoder layers.
    pub n_layers: usize,
    /// Hidden size.
    pub dim: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention).
    pub n_kv_heads: usize,
    /// Dims per head.
    pub head_dim: usize,
    /// Rotary dims per head (NEOX pairing over the first `rope_dim`; the rest is left alone).
    pub rope_dim: usize,
    /// Rotary base.
    pub rope_base: f64,
    /// Vocabulary size.
    pub vocab: usize,
    /// RMSNorm epsilon.
    pub norm_eps: f32,
    /// The MoE block of every layer (`moe.dim == dim`).
    pub moe: MoeConfig,
    /// Format of the attention projections.
    pub attn_format: WeightFormat,
    /// Format of the LM head.
    pub lm_head_format: WeightFormat,
    /// Positions a session's KV cache holds.
    pub max_context: usize,
    /// The hybrid layout (Qwen3.5/3.6-MoE): Gated DeltaNet mixers in most layers, gated
    /// attention in the rest. `None`: every layer is plain attention (Qwen3-MoE).
    pub hybrid: Option<HybridConfig>,
}

/// The hybrid layout of a Qwen3.5/3.6-MoE decoder (llama.cpp's `qwen35moe`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HybridConfig {
    /// Layer `l` is full attention when `(l + 1) % full_attention_interval == 0`, a Gated
    /// DeltaNet mixer otherwise (llama.cpp's rule).
    pub full_attention_interval: usize,
    /// DeltaNet key heads.
    pub k_heads: usize,
    /// DeltaNet value heads (a multiple of `k_heads`).
    pub v_heads: usize,
    /// DeltaNet head dim (the state is `head_dim x head_dim` per value head).
    pub head_dim: usize,
    /// Taps of the DeltaNet's causal convolution.
    pub conv_kernel: usize,
}

/// Names of the presets.
pub const PRESETS: [&str; 5] = [
    "tiny",
    "small",
    "qwen3-30b-a3b",
    "tiny-hybrid",
    "qwen3.6-35b-a3b",
];

impl ModelConfig {
    /// A preset with its routed and shared experts (and, for the large presets, the attention
    /// projections and LM head) in `format`.
    ///
    /// - `tiny`: 2 layers, hidden 64, 4 heads / 2 kv of 16, 8 experts top-2 (ffn 64) plus a
    ///   shared expert, vocab 256: seconds on a laptop CPU.
    /// - `small`: 4 layers, hidden 256, 8 heads / 2 kv of 32, 16 experts top-4 (ffn 256) plus a
    ///   shared expert, vocab 2048.
    /// - `qwen3-30b-a3b`: 48 layers, hidden 2048, 32 / 4 heads of 128, 128 experts top-8
    ///   (ffn 768), no shared expert, vocab 151,936, rope base 1e6.
    /// - `tiny-hybrid`: `tiny`'s shapes as a hybrid model: layers 0 and 2 Gated DeltaNet (2 key
    ///   / 4 value heads of 16, conv of 4), 1 and 3 gated attention with rope over 8 dims.
    /// - `qwen3.6-35b-a3b`: the hybrid Qwen3.6-35B-A3B: 40 layers, every 4th gated attention
    ///   (16 / 2 heads of 256, rope over 64, base 1e7), the rest Gated DeltaNet (16 key / 32
    ///   value heads of 128, conv of 4), 256 experts top-8 (ffn 512) plus a shared expert of
    ///   512, vocab 248,320.
    pub fn preset(name: &str, format: WeightFormat) -> Result<Self> {
        let moe = |dim, n_experts, top_k, ffn, shared_ffn| MoeConfig {
            dim,
            n_experts,
            top_k,
            ffn,
            shared_ffn,
            renormalize: true,
            format,
        };
        let big = |f: WeightFormat| {
            if f.is_quantized() {
                f
            } else {
                WeightFormat::F32
            }
        };
        let tiny = || ModelConfig {
            name: name.into(),
            n_layers: 2,
            dim: 64,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 16,
            rope_dim: 16,
            rope_base: 1e6,
            vocab: 256,
            norm_eps: 1e-6,
            moe: moe(64, 8, 2, 64, Some(64)),
            attn_format: WeightFormat::F32,
            lm_head_format: WeightFormat::F32,
            max_context: 512,
            hybrid: None,
        };
        let cfg = match name {
            "tiny" => tiny(),
            "small" => ModelConfig {
                name: name.into(),
                n_layers: 4,
                dim: 256,
                n_heads: 8,
                n_kv_heads: 2,
                head_dim: 32,
                rope_dim: 32,
                rope_base: 1e6,
                vocab: 2048,
                norm_eps: 1e-6,
                moe: moe(256, 16, 4, 256, Some(256)),
                attn_format: WeightFormat::F32,
                lm_head_format: WeightFormat::F32,
                max_context: 1024,
                hybrid: None,
            },
            "qwen3-30b-a3b" => ModelConfig {
                name: name.into(),
                n_layers: 48,
                dim: 2048,
                n_heads: 32,
                n_kv_heads: 4,
                head_dim: 128,
                rope_dim: 128,
                rope_base: 1e6,
                vocab: 151_936,
                norm_eps: 1e-6,
                moe: moe(2048, 128, 8, 768, None),
                attn_format: big(format),
                lm_head_format: big(format),
                max_context: 8448,
                hybrid: None,
            },
            "tiny-hybrid" => ModelConfig {
                n_layers: 4,
                rope_dim: 8,
                rope_base: 1e7,
                hybrid: Some(HybridConfig {
                    full_attention_interval: 2,
                    k_heads: 2,
                    v_heads: 4,
                    head_dim: 16,
                    conv_kernel: 4,
                }),
                ..tiny()
            },
            "qwen3.6-35b-a3b" => ModelConfig {
                name: name.into(),
                n_layers: 40,
                dim: 2048,
                n_heads: 16,
                n_kv_heads: 2,
                head_dim: 256,
                rope_dim: 64,
                rope_base: 1e7,
                vocab: 248_320,
                norm_eps: 1e-6,
                moe: moe(2048, 256, 8, 512, Some(512)),
                attn_format: big(format),
                lm_head_format: big(format),
                max_context: 8448,
                hybrid: Some(HybridConfig {
                    full_attention_interval: 4,
                    k_heads: 16,
                    v_heads: 32,
                    head_dim: 128,
                    conv_kernel: 4,
                }),
            },
            other => {
                return Err(Error::invalid(
                    "ModelConfig::preset",
                    format!("unknown preset `{other}` (one of {})", PRESETS.join(", ")),
                ))
            }
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Whether layer `l` is attention (every layer when the model is not hybrid).
    pub fn is_attention_layer(&self, l: usize) -> bool {
        self.hybrid
            .as_ref()
            .is_none_or(|h| (l + 1) % h.full_attention_interval == 0)
    }

    /// The DeltaNet mixer's shape in a hybrid model.
    pub fn delta_net(&self) -> Option<crate::spec::delta_net::DeltaNetConfig> {
        self.hybrid
            .as_ref()
            .map(|h| crate::spec::delta_net::DeltaNetConfig {
                dim: self.dim,
                k_heads: h.k_heads,
                v_heads: h.v_heads,
                head_dim: h.head_dim,
                conv_kernel: h.conv_kernel,
                format: self.attn_format,
            })
    }

    /// Rows of the query projection: `n_heads * head_dim`, twice that in a hybrid model, whose
    /// attention layers also project an output gate (per head `[q_h | gate_h]`).
    pub fn q_rows(&self) -> usize {
        self.n_heads * self.head_dim * if self.hybrid.is_some() { 2 } else { 1 }
    }

    /// Checks the shape; every constructor and forward path calls it.
    pub fn validate(&self) -> Result<()> {
        const OP: &str = "ModelConfig";
        self.moe.validate()?;
        if let Some(h) = &self.hybrid {
            if h.full_attention_interval == 0 {
                return Err(Error::invalid(
                    OP,
                    "full_attention_interval must be positive",
                ));
            }
            self.delta_net().expect("hybrid").validate()?;
        }
        if self.moe.dim != self.dim {
            return Err(Error::invalid(OP, "moe.dim must equal dim"));
        }
        if self.n_layers == 0 || self.dim == 0 || self.vocab == 0 || self.max_context == 0 {
            return Err(Error::invalid(
                OP,
                "layers, dim, vocab and max_context must be positive",
            ));
        }
        if self.n_kv_heads == 0 || self.n_heads % self.n_kv_heads != 0 {
            return Err(Error::invalid(
                OP,
                format!(
                    "{} query heads over {} kv heads",
                    self.n_heads, self.n_kv_heads
                ),
            ));
        }
        if self.rope_dim == 0 || self.rope_dim % 2 != 0 || self.rope_dim > self.head_dim {
            return Err(Error::invalid(
                OP,
                format!("rope_dim {} (head_dim {})", self.rope_dim, self.head_dim),
            ));
        }
        for (what, f, k) in [
            ("attention (dim)", self.attn_format, self.dim),
            (
                "attention (heads * head_dim)",
                self.attn_format,
                self.n_heads * self.head_dim,
            ),
            ("LM head", self.lm_head_format, self.dim),
        ] {
            if k % f.block_elems() != 0 {
                return Err(Error::invalid(
                    OP,
                    format!("{what}: {k} is not a multiple of the {f} block"),
                ));
            }
        }
        Ok(())
    }

    /// Bytes of weights on the device (stored formats; embedding, norms and the DeltaNet's small
    /// vectors in f32): attention layers (Wq of [`ModelConfig::q_rows`] rows), DeltaNet layers
    /// (qkv, z, beta, alpha, out; conv taps, dt_bias, ssm_a, norm) and every layer's MoE block.
    pub fn weight_bytes(&self) -> usize {
        let bytes = |f: WeightFormat, rows: usize, cols: usize| {
            rows * cols / f.block_elems() * f.block_bytes()
        };
        let qd = self.n_heads * self.head_dim;
        let kvd = self.n_kv_heads * self.head_dim;
        let attn = bytes(self.attn_format, self.q_rows(), self.dim)
            + 2 * bytes(self.attn_format, kvd, self.dim)
            + bytes(self.attn_format, self.dim, qd)
            + 4 * 2 * self.head_dim;
        let delta = self.delta_net().map_or(0, |d| {
            let (hv, s) = (d.v_heads, d.head_dim);
            bytes(d.format, d.conv_dim(), d.dim)
                + bytes(d.format, hv * s, d.dim)
                + 2 * bytes(d.format, hv, d.dim)
                + bytes(d.format, d.dim, hv * s)
                + 4 * (d.conv_dim() * d.conv_kernel + 2 * hv + s)
        });
        let mixers: usize = (0..self.n_layers)
            .map(|l| {
                if self.is_attention_layer(l) {
                    attn
                } else {
                    delta
                }
            })
            .sum();
        mixers
            + self.n_layers * (4 * 2 * self.dim + self.moe.weight_bytes())
            + 4 * self.vocab * self.dim
            + 4 * self.dim
            + bytes(self.lm_head_format, self.vocab, self.dim)
    }

    /// Bytes of one session's recurrent memory: the f32 KV cache of each attention layer
    /// (`max_context` positions) and the state of each DeltaNet layer (two convolution windows
    /// and the `[Hv, S, S]` matrices).
    pub fn cache_bytes(&self) -> usize {
        let kv = 2 * 4 * self.n_kv_heads * self.max_context * self.head_dim;
        let delta = self.delta_net().map_or(0, |d| {
            4 * (2 * (d.conv_kernel - 1).max(1) * d.conv_dim()
                + d.v_heads * d.head_dim * d.head_dim)
        });
        (0..self.n_layers)
            .map(|l| {
                if self.is_attention_layer(l) {
                    kv
                } else {
                    delta
                }
            })
            .sum()
    }

    /// Rough bytes of the activations of a forward over `rows` tokens (the MoE block's
    /// routed intermediates dominate), with a fixed margin for scratch and the CUDA context.
    pub fn activation_bytes(&self, rows: usize) -> usize {
        let k = self.moe.top_k;
        let per_row = 4
            * (8 * self.dim
                + 3 * self.n_heads * self.head_dim
                + k * (3 * self.moe.ffn + self.dim)
                + self.vocab);
        rows * per_row + (512 << 20)
    }
}

/// Shape of an MoE block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MoeConfig {
    /// Hidden size (model width).
    pub dim: usize,
    /// Number of routed experts.
    pub n_experts: usize,
    /// Experts each token is routed to.
    pub top_k: usize,
    /// Inner size of each routed expert.
    pub ffn: usize,
    /// Inner size of the shared expert, `None` for no shared expert.
    pub shared_ffn: Option<usize>,
    /// Divide the selected routing weights by their sum (Qwen3's `norm_topk_prob`).
    pub renormalize: bool,
    /// Format of the routed and shared experts' matrices (the router and the shared expert's
    /// gate stay F32, as GGUF files keep them).
    pub format: WeightFormat,
}

impl MoeConfig {
    /// Checks the configuration; every forward path calls this first.
    pub fn validate(&self) -> Result<()> {
        const OP: &str = "MoeConfig";
        if self.dim == 0 || self.ffn == 0 || self.shared_ffn == Some(0) {
            return Err(Error::invalid(
                OP,
                "dim, ffn and shared_ffn must be positive",
            ));
        }
        if self.n_experts == 0 || self.n_experts > MAX_EXPERTS {
            return Err(Error::invalid(
                OP,
                format!(
                    "n_experts = {}, supported 1..={}",
                    self.n_experts, MAX_EXPERTS
                ),
            ));
        }
        let blk = self.format.block_elems();
        for (what, v) in [
            ("dim", self.dim),
            ("ffn", self.ffn),
            ("shared_ffn", self.shared_ffn.unwrap_or(blk)),
        ] {
            if v % blk != 0 {
                return Err(Error::invalid(
                    OP,
                    format!(
                        "{what} = {v} is not a multiple of the {} block ({blk})",
                        self.format
                    ),
                ));
            }
        }
        if self.top_k == 0 || self.top_k > self.n_experts.min(MAX_TOP_K) {
            return Err(Error::invalid(
                OP,
                format!(
                    "top_k = {}, supported 1..={}",
                    self.top_k,
                    self.n_experts.min(MAX_TOP_K)
                ),
            ));
        }
        Ok(())
    }

    /// Bytes of one routed expert (gate, up and down) in the stored format.
    pub fn expert_bytes(&self) -> usize {
        3 * (self.ffn * self.dim / self.format.block_elems() * self.format.block_bytes())
    }

    /// Bytes of weights in their stored formats.
    pub fn weight_bytes(&self) -> usize {
        let per = |elems: usize| elems / self.format.block_elems() * self.format.block_bytes();
        let routed = 4 * self.n_experts * self.dim + self.n_experts * self.expert_bytes();
        let shared = self
            .shared_ffn
            .map_or(0, |s| 4 * self.dim + 3 * per(s * self.dim));
        routed + shared
    }
}

pub(crate) fn check_tokens(
    op: &'static str,
    cfg: &ModelConfig,
    tokens: &[u32],
    pos: usize,
) -> Result<()> {
    crate::error::check_indices(op, "tokens", tokens, cfg.vocab)?;
    if pos + tokens.len() > cfg.max_context {
        return Err(Error::invalid(
            op,
            format!(
                "context full: {} tokens at position {pos} exceed max_context {}",
                tokens.len(),
                cfg.max_context
            ),
        ));
    }
    Ok(())
}

/// Checks an MoE block's host input: `len` values for `n` tokens of `cfg.dim`.
pub(crate) fn check_input(cfg: &MoeConfig, len: usize, n: usize) -> Result<()> {
    cfg.validate()?;
    if len != n * cfg.dim {
        return Err(Error::shape("moe_block", "x", &[n, cfg.dim], &[len]));
    }
    Ok(())
}
