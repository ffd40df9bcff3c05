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
use crate::kernels::{activation, gemm, moe_reduce, router, row_scale};
use crate::model::init;
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

    /// Bytes of f32 weights.
    pub fn weight_bytes(&self) -> usize {
        let routed = self.n_experts * (self.dim + 3 * self.ffn * self.dim);
        let shared = self.shared_ffn.map_or(0, |s| self.dim + 3 * s * self.dim);
        4 * (routed + shared)
    }
}

/// Weights of the shared expert (row-major, output features first).
#[derive(Clone, Debug)]
pub struct SharedWeights {
    /// Gate logit weights `[dim]` (`ffn_gate_inp_shexp`).
    pub gate_inp: Vec<f32>,
    /// `[shared_ffn, dim]`
    pub gate: Vec<f32>,
    /// `[shared_ffn, dim]`
    pub up: Vec<f32>,
    /// `[dim, shared_ffn]`
    pub down: Vec<f32>,
}

/// Weights of an MoE block (row-major, each output feature's weights contiguous).
#[derive(Clone, Debug)]
pub struct MoeWeights {
    /// The shape.
    pub cfg: MoeConfig,
    /// `[n_experts, dim]`
    pub router: Vec<f32>,
    /// `[n_experts, ffn, dim]`
    pub gate: Vec<f32>,
    /// `[n_experts, ffn, dim]`
    pub up: Vec<f32>,
    /// `[n_experts, dim, ffn]`
    pub down: Vec<f32>,
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
    /// Weights from `seed`: each tensor `uniform(seed, tensor, i) / sqrt(fan_in)`.
    pub fn generate(cfg: &MoeConfig, seed: u64) -> Result<Self> {
        use tensor_id::*;
        cfg.validate()?;
        let (d, f, e) = (cfg.dim, cfg.ffn, cfg.n_experts);
        let shared = cfg.shared_ffn.map(|s| SharedWeights {
            gate_inp: init::fill(seed, SHARED_GATE_INP, d, init::fan_in_scale(d)),
            gate: init::fill(seed, SHARED_GATE, s * d, init::fan_in_scale(d)),
            up: init::fill(seed, SHARED_UP, s * d, init::fan_in_scale(d)),
            down: init::fill(seed, SHARED_DOWN, d * s, init::fan_in_scale(s)),
        });
        Ok(MoeWeights {
            cfg: cfg.clone(),
            router: init::fill(seed, ROUTER, e * d, init::fan_in_scale(d)),
            gate: init::fill(seed, GATE, e * f * d, init::fan_in_scale(d)),
            up: init::fill(seed, UP, e * f * d, init::fan_in_scale(d)),
            down: init::fill(seed, DOWN, e * d * f, init::fan_in_scale(f)),
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
fn forward_cpu_token(w: &MoeWeights, x: &[f32]) -> MoeOutput {
    use reference::{activation::swiglu, gemm::gemm_f32, moe_reduce, router::softmax_topk};
    let c = &w.cfg;
    let (d, f, k) = (c.dim, c.ffn, c.top_k);
    let logits = gemm_f32(x, &w.router, 1, c.n_experts, d);
    let (ids, weights) = softmax_topk(&logits, 1, c.n_experts, k, c.renormalize);
    let mut partial = Vec::with_capacity(k * d);
    for &e in &ids {
        let e = e as usize;
        let g = gemm_f32(x, &w.gate[e * f * d..][..f * d], 1, f, d);
        let u = gemm_f32(x, &w.up[e * f * d..][..f * d], 1, f, d);
        let h = swiglu(&g, &u);
        partial.extend(gemm_f32(&h, &w.down[e * d * f..][..d * f], 1, d, f));
    }
    let shared = w.shared.as_ref().map(|s| {
        let sf = c.shared_ffn.expect("shared weights imply shared_ffn");
        let g = gemm_f32(x, &s.gate, 1, sf, d);
        let u = gemm_f32(x, &s.up, 1, sf, d);
        let mut y = gemm_f32(&swiglu(&g, &u), &s.down, 1, d, sf);
        let gate = reference::activation::sigmoid(&gemm_f32(x, &s.gate_inp, 1, 1, d));
        reference::row_scale::row_scale(&mut y, &gate, d);
        y
    });
    let out = moe_reduce::moe_weighted_reduce(&partial, &weights, shared.as_deref(), 1, k, d);
    MoeOutput { out, ids, weights }
}

/// The CPU sequential reference over `n` tokens (`x: [n, dim]`). Each token is computed by the
/// plain sequential loop; tokens are independent, so they run on all cores without changing a
/// bit.
pub fn forward_cpu(w: &MoeWeights, x: &[f32], n: usize) -> Result<MoeOutput> {
    use rayon::prelude::*;
    check_input(&w.cfg, x.len(), n)?;
    let d = w.cfg.dim;
    let per_token: Vec<MoeOutput> = x.par_chunks(d).map(|xt| forward_cpu_token(w, xt)).collect();
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
    let logits = rg::gemm_f32(x, &w.router, n, ne, d);
    let (ids, weights) = rr::softmax_topk(&logits, n, ne, k, c.renormalize);
    let plan = ExpertPlan::new(&ids, k, ne)?;
    let r = plan.len();
    let mut g = vec![0.0; r * f];
    let mut u = vec![0.0; r * f];
    rg::gemm_grouped_f32(
        x,
        &w.gate,
        &mut g,
        &plan.tokens,
        &plan.experts,
        &plan.rows,
        f,
        d,
    );
    rg::gemm_grouped_f32(
        x,
        &w.up,
        &mut u,
        &plan.tokens,
        &plan.experts,
        &plan.rows,
        f,
        d,
    );
    let h = activation::swiglu(&g, &u);
    let mut partial = vec![0.0; n * k * d];
    rg::gemm_grouped_f32(
        &h,
        &w.down,
        &mut partial,
        &plan.rows,
        &plan.experts,
        &plan.pairs,
        d,
        f,
    );
    let shared = w.shared.as_ref().map(|s| {
        let sf = c.shared_ffn.expect("shared weights imply shared_ffn");
        let sg = rg::gemm_f32(x, &s.gate, n, sf, d);
        let su = rg::gemm_f32(x, &s.up, n, sf, d);
        let mut sy = rg::gemm_f32(&activation::swiglu(&sg, &su), &s.down, n, d, sf);
        let gate = activation::sigmoid(&rg::gemm_f32(x, &s.gate_inp, n, 1, d));
        rs::row_scale(&mut sy, &gate, d);
        sy
    });
    let out = moe_reduce::moe_weighted_reduce(&partial, &weights, shared.as_deref(), n, k, d);
    Ok(MoeOutput { out, ids, weights })
}

struct GpuShared {
    gate_inp: GpuTensor<f32>,
    gate: GpuTensor<f32>,
    up: GpuTensor<f32>,
    down: GpuTensor<f32>,
}

/// An MoE block's weights on the device, with the two GPU forward paths.
pub struct GpuMoeBlock {
    cfg: MoeConfig,
    router: GpuTensor<f32>,
    gate: GpuTensor<f32>,
    up: GpuTensor<f32>,
    down: GpuTensor<f32>,
    shared: Option<GpuShared>,
}

/// GPU forward result: the output stays on the device, the routing comes back to the host
/// (the grouped expert GEMM is planned from it there).
pub struct GpuMoeOutput {
    /// `[n, dim]`
    pub out: GpuTensor<f32>,
    /// Selected experts `[n, top_k]`.
    pub ids: Vec<u32>,
    /// Routing weights `[n, top_k]`.
    pub weights: Vec<f32>,
}

impl GpuMoeOutput {
    /// Downloads the output into an [`MoeOutput`].
    pub fn to_host(&self) -> Result<MoeOutput> {
        Ok(MoeOutput {
            out: self.out.to_host()?,
            ids: self.ids.clone(),
            weights: self.weights.clone(),
        })
    }
}

impl GpuMoeBlock {
    /// Uploads `w`. Fails with [`Error::OutOfMemory`] if the device cannot hold it.
    pub fn upload(dev: &Device, w: &MoeWeights) -> Result<Self> {
        let c = &w.cfg;
        c.validate()?;
        let (d, f, e) = (c.dim, c.ffn, c.n_experts);
        let shared = match (&w.shared, c.shared_ffn) {
            (Some(s), Some(sf)) => Some(GpuShared {
                gate_inp: GpuTensor::from_host(dev, &s.gate_inp, &[1, d])?,
                gate: GpuTensor::from_host(dev, &s.gate, &[sf, d])?,
                up: GpuTensor::from_host(dev, &s.up, &[sf, d])?,
                down: GpuTensor::from_host(dev, &s.down, &[d, sf])?,
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
            router: GpuTensor::from_host(dev, &w.router, &[e, d])?,
            gate: GpuTensor::from_host(dev, &w.gate, &[e, f, d])?,
            up: GpuTensor::from_host(dev, &w.up, &[e, f, d])?,
            down: GpuTensor::from_host(dev, &w.down, &[e, d, f])?,
            shared,
        })
    }

    /// The block's shape.
    pub fn config(&self) -> &MoeConfig {
        &self.cfg
    }

    /// All tokens at once: one router GEMM, one routing launch, each expert matrix as one
    /// grouped GEMM over the tokens routed to it, the shared expert as dense GEMMs, one
    /// weighted reduce. `x: [n, dim]`.
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

        let mut logits = GpuTensor::zeros(dev, &[n, ne])?;
        gemm::gemm_f32(dev, x, &self.router, &mut logits)?;
        let mut ids = GpuTensor::<u32>::zeros(dev, &[n, k])?;
        let mut weights = GpuTensor::zeros(dev, &[n, k])?;
        router::softmax_topk(dev, &logits, k, c.renormalize, &mut ids, &mut weights)?;
        let ids_host = ids.to_host()?;

        let plan = ExpertPlan::new(&ids_host, k, ne)?;
        let r = plan.len();
        let up_rows =
            gemm::RoutedRows::new(dev, &plan.tokens, &plan.experts, &plan.rows, n, ne, r)?;
        let down_rows =
            gemm::RoutedRows::new(dev, &plan.rows, &plan.experts, &plan.pairs, r, ne, n * k)?;

        let mut g = GpuTensor::zeros(dev, &[r, f])?;
        let mut u = GpuTensor::zeros(dev, &[r, f])?;
        gemm::gemm_grouped_f32(dev, x, &self.gate, &up_rows, &mut g)?;
        gemm::gemm_grouped_f32(dev, x, &self.up, &up_rows, &mut u)?;
        let mut h = GpuTensor::zeros(dev, &[r, f])?;
        activation::swiglu(dev, &g, &u, &mut h)?;
        let mut partial = GpuTensor::zeros(dev, &[n * k, d])?;
        gemm::gemm_grouped_f32(dev, &h, &self.down, &down_rows, &mut partial)?;
        partial.reshape(&[n, k, d])?;

        let shared = match (&self.shared, c.shared_ffn) {
            (Some(s), Some(sf)) => {
                let mut sg = GpuTensor::zeros(dev, &[n, sf])?;
                let mut su = GpuTensor::zeros(dev, &[n, sf])?;
                gemm::gemm_f32(dev, x, &s.gate, &mut sg)?;
                gemm::gemm_f32(dev, x, &s.up, &mut su)?;
                let mut sh = GpuTensor::zeros(dev, &[n, sf])?;
                activation::swiglu(dev, &sg, &su, &mut sh)?;
                let mut sy = GpuTensor::zeros(dev, &[n, d])?;
                gemm::gemm_f32(dev, &sh, &s.down, &mut sy)?;
                let mut gl = GpuTensor::zeros(dev, &[n, 1])?;
                gemm::gemm_f32(dev, x, &s.gate_inp, &mut gl)?;
                let mut gate = GpuTensor::zeros(dev, &[n])?;
                gl.reshape(&[n])?;
                activation::sigmoid(dev, &gl, &mut gate)?;
                row_scale::row_scale(dev, &mut sy, &gate)?;
                Some(sy)
            }
            _ => None,
        };

        let mut out = GpuTensor::zeros(dev, &[n, d])?;
        moe_reduce::moe_weighted_reduce(dev, &partial, &weights, shared.as_ref(), &mut out)?;
        Ok(GpuMoeOutput {
            out,
            ids: ids_host,
            weights: weights.to_host()?,
        })
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
        let mut out = GpuTensor::zeros(dev, &[n, d])?;
        let mut xt = GpuTensor::zeros(dev, &[1, d])?;
        let mut ids = Vec::with_capacity(n * self.cfg.top_k);
        let mut weights = Vec::with_capacity(n * self.cfg.top_k);
        let stream = dev.stream().clone();
        for t in 0..n {
            stream.memcpy_dtod(&x.slice().slice(t * d..(t + 1) * d), xt.slice_mut())?;
            let o = self.forward_batched(dev, &xt)?;
            stream.memcpy_dtod(
                o.out.slice(),
                &mut out.slice_mut().slice_mut(t * d..(t + 1) * d),
            )?;
            ids.extend(o.ids);
            weights.extend(o.weights);
        }
        Ok(GpuMoeOutput { out, ids, weights })
    }
}

/// Checks a host input for [`GpuMoeBlock`] and uploads it as `[n, dim]`.
pub fn upload_input(dev: &Device, cfg: &MoeConfig, x: &[f32], n: usize) -> Result<GpuTensor<f32>> {
    check_input(cfg, x.len(), n)?;
    GpuTensor::from_host(dev, x, &[n, cfg.dim])
}
