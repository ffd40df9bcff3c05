//! The shape, weights and per-sequence state of a Gated DeltaNet mixer (the computation is
//! [`crate::reference::delta_net`]'s).

use crate::error::{Error, Result};
use crate::init;
use crate::math::exp;
use crate::quant::{QuantMatrix, WeightFormat};

/// Shape of a Gated DeltaNet mixer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeltaNetConfig {
    /// Model width.
    pub dim: usize,
    /// Key (and query) heads, `Hk`.
    pub k_heads: usize,
    /// Value heads, `Hv`, a multiple of `Hk`.
    pub v_heads: usize,
    /// Dims per head, `S` (keys, queries and values alike).
    pub head_dim: usize,
    /// Taps of the causal convolution, `Kc`.
    pub conv_kernel: usize,
    /// Format of the four projections and the output matrix.
    pub format: WeightFormat,
}

impl DeltaNetConfig {
    /// Channels of the convolution: `2 Hk S + Hv S`.
    pub fn conv_dim(&self) -> usize {
        (2 * self.k_heads + self.v_heads) * self.head_dim
    }

    /// `(S, Hk, Hv, Kc, conv_dim)`: head dim, key heads, value heads, convolution window and
    /// channels, the names the scan's reference and kernels use.
    pub fn scan_dims(&self) -> (usize, usize, usize, usize, usize) {
        let c = self;
        (
            c.head_dim,
            c.k_heads,
            c.v_heads,
            c.conv_kernel,
            c.conv_dim(),
        )
    }

    /// Checks the shape: nothing empty, `Hv % Hk == 0`.
    pub fn validate(&self) -> Result<()> {
        const OP: &str = "DeltaNetConfig";
        if self.dim == 0 || self.k_heads == 0 || self.head_dim == 0 || self.conv_kernel == 0 {
            return Err(Error::invalid(OP, format!("empty shape: {self:?}")));
        }
        if self.v_heads == 0 || self.v_heads % self.k_heads != 0 {
            return Err(Error::invalid(
                OP,
                format!(
                    "v_heads = {} must be a positive multiple of k_heads = {}",
                    self.v_heads, self.k_heads
                ),
            ));
        }
        Ok(())
    }
}

/// A mixer's weights (host), llama.cpp's `blk.N.` tensors named beside each.
#[derive(Clone, Debug)]
pub struct DeltaNetWeights {
    /// The shape.
    pub cfg: DeltaNetConfig,
    /// `attn_qkv`: `[conv_dim, dim]`.
    pub qkv: QuantMatrix,
    /// `attn_gate` (z): `[Hv S, dim]`.
    pub z: QuantMatrix,
    /// `ssm_beta`: `[Hv, dim]`.
    pub beta: QuantMatrix,
    /// `ssm_alpha`: `[Hv, dim]`.
    pub alpha: QuantMatrix,
    /// `ssm_dt.bias`: `[Hv]`.
    pub dt_bias: Vec<f32>,
    /// `ssm_a`: `[Hv]`, negative (`-exp(A_log)`).
    pub ssm_a: Vec<f32>,
    /// `ssm_conv1d`: `[conv_dim, Kc]`, taps oldest first.
    pub conv: Vec<f32>,
    /// `ssm_norm`: `[S]`, shared by the heads.
    pub norm: Vec<f32>,
    /// `ssm_out`: `[dim, Hv S]`.
    pub out: QuantMatrix,
}

impl DeltaNetWeights {
    /// Weights of `cfg` from `seed`, tensor ids from `base` on ([`init`]).
    pub fn generate(cfg: &DeltaNetConfig, seed: u64, base: u64) -> Result<Self> {
        cfg.validate()?;
        let (d, s, hv) = (cfg.dim, cfg.head_dim, cfg.v_heads);
        let mat = |id: u64, rows: usize, cols: usize| {
            let v = init::fill(seed, base + id, rows * cols, init::fan_in_scale(cols));
            QuantMatrix::quantize(cfg.format, &v, 1, rows, cols)
        };
        let small = |id: u64, n: usize, scale: f32| init::fill(seed, base + id, n, scale);
        Ok(DeltaNetWeights {
            cfg: cfg.clone(),
            qkv: mat(1, cfg.conv_dim(), d)?,
            z: mat(2, hv * s, d)?,
            beta: mat(3, hv, d)?,
            alpha: mat(4, hv, d)?,
            dt_bias: small(5, hv, 0.5),
            // -exp(A_log) with A_log near 0: decays between about e^-0.2 and e^-2 a token.
            ssm_a: small(6, hv, 0.5).iter().map(|&u| -exp(u)).collect(),
            conv: small(
                7,
                cfg.conv_dim() * cfg.conv_kernel,
                init::fan_in_scale(cfg.conv_kernel),
            ),
            norm: small(8, s, 0.125).iter().map(|&u| 1.0 + u).collect(),
            out: mat(9, d, hv * s)?,
        })
    }
}

/// What a sequence carries from token to token: the last `Kc - 1` inputs of the convolution
/// (`[Kc - 1, conv_dim]`, oldest first) and every value head's `S x S` matrix (`[Hv, S, S]`,
/// `M[h][j][i]`). Both start at zero.
#[derive(Clone, Debug, PartialEq)]
pub struct DeltaNetState {
    /// The convolution's window.
    pub conv: Vec<f32>,
    /// The delta-rule matrices.
    pub m: Vec<f32>,
}

impl DeltaNetState {
    /// The state before the first token.
    pub fn new(cfg: &DeltaNetConfig) -> Self {
        DeltaNetState {
            conv: vec![0.0; (cfg.conv_kernel - 1) * cfg.conv_dim()],
            m: vec![0.0; cfg.v_heads * cfg.head_dim * cfg.head_dim],
        }
    }
}

/// The order of steps 2 to 5 in a model's DeltaNet layers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ScanOrder {
    /// Token by token ([`crate::reference::delta_net::scan_cpu`]): the default, every GPU
    /// scan version's.
    #[default]
    Recurrence,
    /// Chunks of [`SCAN_CHUNK`] tokens ([`crate::reference::delta_net::scan_chunked_cpu`]):
    /// not the default; the GPU's `delta_net_chunk_*` kernels compute it.
    Chunked,
}

/// Tokens per chunk of the chunked order ([`crate::reference::delta_net::scan_chunked_cpu`]).
pub const SCAN_CHUNK: usize = 64;

/// What the chunked order carries from token to token: the convolution window and, per value
/// head, the delta-rule matrix at the last chunk boundary (`base`, [`DeltaNetState`]'s layout),
/// and the tokens of the chunk under way: their unit keys per key head `k: [Hk, C, S]`, and per
/// value head their corrected values `u: [Hv, C, S]`, their decay factors to the latest token
/// `f: [Hv, C]` and the decay since the boundary `e: [Hv]` (`C` = [`SCAN_CHUNK`]; entries past
/// `len`, and everything at a boundary, are zero).
#[derive(Clone, Debug, PartialEq)]
pub struct ChunkedState {
    /// The window and the matrices at the last boundary.
    pub base: DeltaNetState,
    /// Tokens of the chunk under way (below `C`).
    pub len: usize,
    /// `[Hk, C, S]`.
    pub k: Vec<f32>,
    /// `[Hv, C, S]`.
    pub u: Vec<f32>,
    /// `[Hv, C]`.
    pub f: Vec<f32>,
    /// `[Hv]`.
    pub e: Vec<f32>,
}

impl ChunkedState {
    /// The state before the first token.
    pub fn new(cfg: &DeltaNetConfig) -> Self {
        let (s, hk, hv) = (cfg.head_dim, cfg.k_heads, cfg.v_heads);
        ChunkedState {
            base: DeltaNetState::new(cfg),
            len: 0,
            k: vec![0.0; hk * SCAN_CHUNK * s],
            u: vec![0.0; hv * SCAN_CHUNK * s],
            f: vec![0.0; hv * SCAN_CHUNK],
            e: vec![0.0; hv],
        }
    }
}
