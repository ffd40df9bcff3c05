//! The MoE block's CPU references: one token at a time ([`forward_cpu`], the sequential loop
//! of [`crate::model::moe_block`]'s module docs) and the batched schedule on the CPU
//! ([`forward_cpu_batched`], experts grouped as the GPU groups them). Both give the same bits.

use crate::error::{Error, Result};
use crate::reference;
use crate::reference::gemm::GemmOrder;
use crate::spec::config::check_input;
use crate::spec::trace::MoeOutput;
use crate::spec::weights::MoeWeights;

/// CPU reference for one token: the sequential loop of the module docs.
fn forward_cpu_token(order: GemmOrder, w: &MoeWeights, x: &[f32]) -> Result<MoeOutput> {
    use reference::{activation::swiglu, moe_reduce};
    let gemm = |x: &[f32], m, n| reference::gemm::gemm_with(order, x, m, n);
    let gemm_grouped = |x: &[f32], m, y: &mut [f32], xr: &[u32], e: &[u32], yr: &[u32]| {
        reference::gemm::gemm_grouped_with(order, x, m, y, xr, e, yr)
    };
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
    forward_cpu_with(GemmOrder::Chain, w, x, n)
}

/// [`forward_cpu`] with every product in the order `order`.
pub fn forward_cpu_with(
    order: GemmOrder,
    w: &MoeWeights,
    x: &[f32],
    n: usize,
) -> Result<MoeOutput> {
    use rayon::prelude::*;
    check_input(&w.cfg, x.len(), n)?;
    let d = w.cfg.dim;
    let per_token: Vec<MoeOutput> = x
        .par_chunks(d)
        .map(|xt| forward_cpu_token(order, w, xt))
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
/// [`crate::model::GpuMoeBlock::forward_batched`], each product the reference dot. It must equal
/// [`forward_cpu`] bit for bit; it is the oracle's second path when no GPU is present.
pub fn forward_cpu_batched(w: &MoeWeights, x: &[f32], n: usize) -> Result<MoeOutput> {
    forward_cpu_batched_with(GemmOrder::Chain, w, x, n)
}

/// [`forward_cpu_batched`] with every product in the order `order`.
pub fn forward_cpu_batched_with(
    order: GemmOrder,
    w: &MoeWeights,
    x: &[f32],
    n: usize,
) -> Result<MoeOutput> {
    use reference::{activation, moe_reduce, router as rr};
    mod rg {
        pub use crate::reference::gemm::{gemm_grouped_with, gemm_with};
    }
    check_input(&w.cfg, x.len(), n)?;
    let c = &w.cfg;
    let (d, f, k, ne) = (c.dim, c.ffn, c.top_k, c.n_experts);
    let logits = rg::gemm_with(order, x, &w.router, n)?;
    let (ids, weights) = rr::softmax_topk(&logits, n, ne, k, c.renormalize);
    let plan = ExpertPlan::new(&ids, k, ne)?;
    let r = plan.len();
    let mut g = vec![0.0; r * f];
    let mut u = vec![0.0; r * f];
    rg::gemm_grouped_with(
        order,
        x,
        &w.gate,
        &mut g,
        &plan.tokens,
        &plan.experts,
        &plan.rows,
    )?;
    rg::gemm_grouped_with(
        order,
        x,
        &w.up,
        &mut u,
        &plan.tokens,
        &plan.experts,
        &plan.rows,
    )?;
    let h = activation::swiglu(&g, &u);
    let mut partial = vec![0.0; n * k * d];
    rg::gemm_grouped_with(
        order,
        &h,
        &w.down,
        &mut partial,
        &plan.rows,
        &plan.experts,
        &plan.pairs,
    )?;
    let shared = shared_expert(order, w, x, n)?;
    let out = moe_reduce::moe_weighted_reduce(&partial, &weights, shared.as_deref(), n, k, d);
    Ok(MoeOutput { out, ids, weights })
}

/// The shared expert over `x: [n, dim]`, gated (`[n, dim]`), or `None` without one: the batched
/// schedule's, row by row the token loop's bits.
pub(crate) fn shared_expert(
    order: GemmOrder,
    w: &MoeWeights,
    x: &[f32],
    n: usize,
) -> Result<Option<Vec<f32>>> {
    use crate::reference::gemm::gemm_with;
    use reference::{activation, row_scale as rs};
    let Some(s) = &w.shared else { return Ok(None) };
    let sg = gemm_with(order, x, &s.gate, n)?;
    let su = gemm_with(order, x, &s.up, n)?;
    let mut sy = gemm_with(order, &activation::swiglu(&sg, &su), &s.down, n)?;
    let gate = activation::sigmoid(&gemm_with(order, x, &s.gate_inp, n)?);
    rs::row_scale(&mut sy, &gate, w.cfg.dim);
    Ok(Some(sy))
}
