//! The MoE feed-forward block of a Qwen3-MoE / Qwen3.5-MoE layer (everything after attention):
//! router, softmax + top-k, routed SwiGLU experts, optional shared SwiGLU expert with a sigmoid
//! gate, weighted reduce.
//!
//! Per token `x: [dim]`:
//! 1. `logits = router · x` (`[n_experts]`), then `softmax_topk` → `ids: [k]`, `w: [k]`.
//! 2. Routed slot `j`, expert `e = ids[j]`: `y_j = down_e · swiglu(gate_e · x, up_e · x)`.
//! 3. Shared expert: `s = down_s · swiglu(gate_s · x, up_s · x)`, then
//!    `s *= sigmoid(gate_inp · x)` (its own rounded pass, `row_scale`).
//! 4. `out = moe_weighted_reduce(y, w, s)`: an fma chain over the slots, then `+ s`.
//!
//! Every product is the canonical dot of [`crate::reference::gemm`], so the three paths
//! ([`forward_cpu`], [`GpuMoeBlock::forward_sequential`], [`GpuMoeBlock::forward_batched`])
//! return the same bits.

use crate::device::Device;
use crate::error::{Error, Result};
use crate::kernels::gemm::GpuMatrix;
use crate::kernels::{activation, gemm, moe_reduce, router, row_scale};
use crate::model::init;
use crate::quant::{QuantMatrix, WeightFormat};
use crate::reference;
use crate::tensor::GpuTensor;

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
        if self.n_experts == 0 || self.n_experts > router::MAX_EXPERTS {
            return Err(Error::invalid(
                OP,
                format!(
                    "n_experts = {}, supported 1..={}",
                    self.n_experts,
                    router::MAX_EXPERTS
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
        if self.top_k == 0 || self.top_k > self.n_experts.min(router::MAX_TOP_K) {
            return Err(Error::invalid(
                OP,
                format!(
                    "top_k = {}, supported 1..={}",
                    self.top_k,
                    self.n_experts.min(router::MAX_TOP_K)
                ),
            ));
        }
        Ok(())
    }

    /// Bytes of weights in their stored formats.
    pub fn weight_bytes(&self) -> usize {
        let per = |elems: usize| elems / self.format.block_elems() * self.format.block_bytes();
        let routed = 4 * self.n_experts * self.dim + self.n_experts * 3 * per(self.ffn * self.dim);
        let shared = self
            .shared_ffn
            .map_or(0, |s| 4 * self.dim + 3 * per(s * self.dim));
        routed + shared
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

fn check_input(cfg: &MoeConfig, len: usize, n: usize) -> Result<()> {
    cfg.validate()?;
    if len != n * cfg.dim {
        return Err(Error::shape("moe_block", "x", &[n, cfg.dim], &[len]));
    }
    Ok(())
}

/// CPU reference for one token: the sequential loop of the module docs.
fn forward_cpu_token(w: &MoeWeights, x: &[f32]) -> Result<MoeOutput> {
    use reference::{activation::swiglu, gemm::gemm, gemm::gemm_grouped, moe_reduce};
    let c = &w.cfg;
    let (d, f, k) = (c.dim, c.ffn, c.top_k);
    let logits = gemm(x, &w.router, 1)?;
    let (ids, weights) = reference::router::softmax_topk(&logits, 1, c.n_experts, k, c.renormalize);
    // The token's k experts, one row each: gate and up read the token, down reads row j of h.
    let slots: Vec<u32> = (0..k as u32).collect();
    let mut g = vec![0.0; k * f];
    let mut u = vec![0.0; k * f];
    gemm_grouped(x, &w.gate, &mut g, &vec![0; k], &ids, &slots)?;
    gemm_grouped(x, &w.up, &mut u, &vec![0; k], &ids, &slots)?;
    let h = swiglu(&g, &u);
    let mut partial = vec![0.0; k * d];
    gemm_grouped(&h, &w.down, &mut partial, &slots, &ids, &slots)?;
    let shared = match &w.shared {
        Some(s) => {
            let g = gemm(x, &s.gate, 1)?;
            let u = gemm(x, &s.up, 1)?;
            let mut y = gemm(&swiglu(&g, &u), &s.down, 1)?;
            let gate = reference::activation::sigmoid(&gemm(x, &s.gate_inp, 1)?);
            reference::row_scale::row_scale(&mut y, &gate, d);
            Some(y)
        }
        None => None,
    };
    let out = moe_reduce::moe_weighted_reduce(&partial, &weights, shared.as_deref(), 1, k, d);
    Ok(MoeOutput { out, ids, weights })
}

/// The CPU sequential reference over `n` tokens (`x: [n, dim]`). Each token is computed by the
/// plain sequential loop; tokens are independent, so they run on all cores without changing a
/// bit.
pub fn forward_cpu(w: &MoeWeights, x: &[f32], n: usize) -> Result<MoeOutput> {
    use rayon::prelude::*;
    check_input(&w.cfg, x.len(), n)?;
    let d = w.cfg.dim;
    let per_token: Vec<MoeOutput> = x
        .par_chunks(d)
        .map(|xt| forward_cpu_token(w, xt))
        .collect::<Result<_>>()?;
    let mut all = MoeOutput {
        out: Vec::with_capacity(n * d),
        ids: Vec::with_capacity(n * w.cfg.top_k),
        weights: Vec::with_capacity(n * w.cfg.top_k),
    };
    for t in per_token {
        all.out.extend(t.out);
        all.ids.extend(t.ids);
        all.weights.extend(t.weights);
    }
    Ok(all)
}

/// The expert-grouped schedule of a batch: the `(token, slot)` pairs sorted by expert, tokens
/// in increasing order within an expert. Routed row `r` reads token `tokens[r]` through expert
/// `experts[r]`, and its down projection lands in row `pairs[r] = token * k + slot` of the
/// `[n * k, dim]` partial outputs.
#[derive(Clone, Debug)]
pub struct ExpertPlan {
    /// `token * k + slot` of each routed row.
    pub pairs: Vec<u32>,
    /// Expert of each routed row (non-decreasing).
    pub experts: Vec<u32>,
    /// Token of each routed row.
    pub tokens: Vec<u32>,
    /// `0..len`: the routed rows themselves (the compact intermediate rows).
    pub rows: Vec<u32>,
}

impl ExpertPlan {
    /// Plans the grouped GEMMs from router ids `[n, k]`; an id `>= n_experts` is an
    /// [`Error::IndexOutOfRange`].
    pub fn new(ids: &[u32], k: usize, n_experts: usize) -> Result<Self> {
        let mut by_expert: Vec<Vec<u32>> = vec![Vec::new(); n_experts];
        for (pair, &e) in ids.iter().enumerate() {
            let list = by_expert
                .get_mut(e as usize)
                .ok_or(Error::IndexOutOfRange {
                    op: "ExpertPlan::new",
                    what: "router ids",
                    position: pair,
                    index: u64::from(e),
                    bound: n_experts as u64,
                })?;
            list.push(pair as u32);
        }
        let pairs: Vec<u32> = by_expert.iter().flatten().copied().collect();
        let experts = by_expert
            .iter()
            .enumerate()
            .flat_map(|(e, l)| std::iter::repeat_n(e as u32, l.len()))
            .collect();
        let tokens = pairs.iter().map(|&p| p / k.max(1) as u32).collect();
        let rows = (0..pairs.len() as u32).collect();
        Ok(ExpertPlan {
            pairs,
            experts,
            tokens,
            rows,
        })
    }

    /// Number of routed rows (`n * k`).
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    /// True when nothing is routed.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }
}

/// The batched schedule on the CPU: every stage over all tokens at once, experts grouped as in
/// [`GpuMoeBlock::forward_batched`], each product the reference dot. It must equal
/// [`forward_cpu`] bit for bit; it is the oracle's second path when no GPU is present.
pub fn forward_cpu_batched(w: &MoeWeights, x: &[f32], n: usize) -> Result<MoeOutput> {
    use reference::{activation, gemm as rg, moe_reduce, router as rr, row_scale as rs};
    check_input(&w.cfg, x.len(), n)?;
    let c = &w.cfg;
    let (d, f, k, ne) = (c.dim, c.ffn, c.top_k, c.n_experts);
    let logits = rg::gemm(x, &w.router, n)?;
    let (ids, weights) = rr::softmax_topk(&logits, n, ne, k, c.renormalize);
    let plan = ExpertPlan::new(&ids, k, ne)?;
    let r = plan.len();
    let mut g = vec![0.0; r * f];
    let mut u = vec![0.0; r * f];
    rg::gemm_grouped(x, &w.gate, &mut g, &plan.tokens, &plan.experts, &plan.rows)?;
    rg::gemm_grouped(x, &w.up, &mut u, &plan.tokens, &plan.experts, &plan.rows)?;
    let h = activation::swiglu(&g, &u);
    let mut partial = vec![0.0; n * k * d];
    rg::gemm_grouped(
        &h,
        &w.down,
        &mut partial,
        &plan.rows,
        &plan.experts,
        &plan.pairs,
    )?;
    let shared = match &w.shared {
        Some(s) => {
            let sg = rg::gemm(x, &s.gate, n)?;
            let su = rg::gemm(x, &s.up, n)?;
            let mut sy = rg::gemm(&activation::swiglu(&sg, &su), &s.down, n)?;
            let gate = activation::sigmoid(&rg::gemm(x, &s.gate_inp, n)?);
            rs::row_scale(&mut sy, &gate, d);
            Some(sy)
        }
        None => None,
    };
    let out = moe_reduce::moe_weighted_reduce(&partial, &weights, shared.as_deref(), n, k, d);
    Ok(MoeOutput { out, ids, weights })
}

/// Tokens up to which [`GpuMoeBlock::forward_batched`] routes each row in a tile of its own
/// (decode steps: one launch); larger batches sort their rows by expert on the device.
pub const DEVICE_ROUTE_MAX_TOKENS: usize = 8;

struct GpuShared {
    gate_inp: GpuMatrix,
    gate: GpuMatrix,
    up: GpuMatrix,
    down: GpuMatrix,
}

/// An MoE block's weights on the device, with the two GPU forward paths.
pub struct GpuMoeBlock {
    cfg: MoeConfig,
    router: GpuMatrix,
    gate: GpuMatrix,
    up: GpuMatrix,
    down: GpuMatrix,
    shared: Option<GpuShared>,
}

/// GPU forward result, on the device.
pub struct GpuMoeOutput {
    /// `[n, dim]`
    pub out: GpuTensor<f32>,
    /// Selected experts `[n, top_k]`.
    pub ids: GpuTensor<u32>,
    /// Routing weights `[n, top_k]`.
    pub weights: GpuTensor<f32>,
}

impl GpuMoeOutput {
    /// Downloads the output into an [`MoeOutput`].
    pub fn to_host(&self) -> Result<MoeOutput> {
        Ok(MoeOutput {
            out: self.out.to_host()?,
            ids: self.ids.to_host()?,
            weights: self.weights.to_host()?,
        })
    }
}

impl GpuMoeBlock {
    /// Uploads `w`. Fails with [`Error::OutOfMemory`] if the device cannot hold it.
    pub fn upload(dev: &Device, w: &MoeWeights) -> Result<Self> {
        let c = &w.cfg;
        c.validate()?;
        let shared = match (&w.shared, c.shared_ffn) {
            (Some(s), Some(_)) => Some(GpuShared {
                gate_inp: GpuMatrix::upload(dev, &s.gate_inp)?,
                gate: GpuMatrix::upload(dev, &s.gate)?,
                up: GpuMatrix::upload(dev, &s.up)?,
                down: GpuMatrix::upload(dev, &s.down)?,
            }),
            (None, None) => None,
            _ => {
                return Err(Error::invalid(
                    "GpuMoeBlock::upload",
                    "shared weights and cfg.shared_ffn disagree",
                ))
            }
        };
        Ok(GpuMoeBlock {
            cfg: c.clone(),
            router: GpuMatrix::upload(dev, &w.router)?,
            gate: GpuMatrix::upload(dev, &w.gate)?,
            up: GpuMatrix::upload(dev, &w.up)?,
            down: GpuMatrix::upload(dev, &w.down)?,
            shared,
        })
    }

    /// The block's shape.
    pub fn config(&self) -> &MoeConfig {
        &self.cfg
    }

    /// All tokens at once: one router GEMM, one routing launch, each expert matrix as one
    /// grouped GEMM over the tokens routed to it, the shared expert as dense GEMMs, one
    /// weighted reduce. `x: [n, dim]`. The routing tables are built on the device and nothing
    /// waits for the host: up to [`DEVICE_ROUTE_MAX_TOKENS`] tokens one row per tile
    /// ([`gemm::RoutedRows::from_router`]), larger batches sorted by expert
    /// ([`gemm::RoutedRows::sorted_from_router`]), so that each expert's weights are read once
    /// per tile of tokens. Both give the same bits.
    pub fn forward_batched(&self, dev: &Device, x: &GpuTensor<f32>) -> Result<GpuMoeOutput> {
        let c = &self.cfg;
        let (d, f, k, ne) = (c.dim, c.ffn, c.top_k, c.n_experts);
        if x.dims().len() != 2 || x.dims()[1] != d {
            return Err(Error::shape(
                "GpuMoeBlock::forward",
                "x",
                &[x.dims().first().copied().unwrap_or(0), d],
                x.dims(),
            ));
        }
        let n = x.dims()[0];

        let mut logits = GpuTensor::output(dev, &[n, ne])?;
        gemm::matmul(dev, x, &self.router, &mut logits)?;
        let mut ids = GpuTensor::<u32>::output(dev, &[n, k])?;
        let mut weights = GpuTensor::output(dev, &[n, k])?;
        router::softmax_topk(dev, &logits, k, c.renormalize, &mut ids, &mut weights)?;
        let r = n * k;
        let (up_rows, down_rows) = if n <= DEVICE_ROUTE_MAX_TOKENS {
            gemm::RoutedRows::from_router(dev, &ids, ne)?
        } else {
            gemm::RoutedRows::sorted_from_router(dev, &ids, ne)?
        };

        // Every product of x at once (x quantized once): routed gate and up, then the shared
        // expert's gate, up and gate logit.
        let mut g = GpuTensor::output(dev, &[r, f])?;
        let mut u = GpuTensor::output(dev, &[r, f])?;
        let mut shared_in = match c.shared_ffn {
            Some(sf) if self.shared.is_some() => Some((
                GpuTensor::output(dev, &[n, sf])?,
                GpuTensor::output(dev, &[n, sf])?,
                GpuTensor::output(dev, &[n, 1])?,
            )),
            _ => None,
        };
        {
            let mut products = vec![
                gemm::Product::Grouped(&self.gate, &up_rows, &mut g),
                gemm::Product::Grouped(&self.up, &up_rows, &mut u),
            ];
            if let (Some(s), Some((sg, su, gl))) = (&self.shared, shared_in.as_mut()) {
                products.push(gemm::Product::Dense(&s.gate, sg));
                products.push(gemm::Product::Dense(&s.up, su));
                products.push(gemm::Product::Dense(&s.gate_inp, gl));
            }
            gemm::matmul_shared(dev, x, &mut products)?;
        }
        let mut h = GpuTensor::output(dev, &[r, f])?;
        activation::swiglu(dev, &g, &u, &mut h)?;
        let mut partial = GpuTensor::output(dev, &[n * k, d])?;
        gemm::matmul_grouped(dev, &h, &self.down, &down_rows, &mut partial)?;
        partial.reshape(&[n, k, d])?;

        let shared = match (&self.shared, shared_in) {
            (Some(s), Some((sg, su, mut gl))) => {
                let mut sh = GpuTensor::output(dev, sg.dims())?;
                activation::swiglu(dev, &sg, &su, &mut sh)?;
                let mut sy = GpuTensor::output(dev, &[n, d])?;
                gemm::matmul(dev, &sh, &s.down, &mut sy)?;
                let mut gate = GpuTensor::output(dev, &[n])?;
                gl.reshape(&[n])?;
                activation::sigmoid(dev, &gl, &mut gate)?;
                row_scale::row_scale(dev, &mut sy, &gate)?;
                Some(sy)
            }
            _ => None,
        };

        let mut out = GpuTensor::output(dev, &[n, d])?;
        moe_reduce::moe_weighted_reduce(dev, &partial, &weights, shared.as_ref(), &mut out)?;
        Ok(GpuMoeOutput { out, ids, weights })
    }

    /// One token at a time, as a decoder runs: each token's row is copied into a `[1, dim]`
    /// buffer and goes through the whole block (router GEMV, routing, the token's experts,
    /// shared expert, reduce) before the next starts. `x: [n, dim]`.
    pub fn forward_sequential(&self, dev: &Device, x: &GpuTensor<f32>) -> Result<GpuMoeOutput> {
        let d = self.cfg.dim;
        if x.dims().len() != 2 || x.dims()[1] != d {
            return Err(Error::shape(
                "GpuMoeBlock::forward",
                "x",
                &[x.dims().first().copied().unwrap_or(0), d],
                x.dims(),
            ));
        }
        let n = x.dims()[0];
        let mut out = GpuTensor::output(dev, &[n, d])?;
        let mut xt = GpuTensor::output(dev, &[1, d])?;
        let k = self.cfg.top_k;
        let mut ids = Vec::with_capacity(n * k);
        let mut weights = GpuTensor::output(dev, &[n, k])?;
        let stream = dev.stream().clone();
        for t in 0..n {
            stream.memcpy_dtod(&x.slice().slice(t * d..(t + 1) * d), xt.slice_mut())?;
            let o = self.forward_batched(dev, &xt)?;
            stream.memcpy_dtod(
                o.out.slice(),
                &mut out.slice_mut().slice_mut(t * d..(t + 1) * d),
            )?;
            stream.memcpy_dtod(
                o.weights.slice(),
                &mut weights.slice_mut().slice_mut(t * k..(t + 1) * k),
            )?;
            ids.extend(o.ids.to_host()?);
        }
        let ids = GpuTensor::from_host(dev, &ids, &[n, k])?;
        Ok(GpuMoeOutput { out, ids, weights })
    }
}

/// Checks a host input for [`GpuMoeBlock`] and uploads it as `[n, dim]`.
pub fn upload_input(dev: &Device, cfg: &MoeConfig, x: &[f32], n: usize) -> Result<GpuTensor<f32>> {
    check_input(cfg, x.len(), n)?;
    GpuTensor::from_host(dev, x, &[n, cfg.dim])
}
