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
//! ([`crate::reference::moe_block::forward_cpu`], [`GpuMoeBlock::forward_sequential`],
//! [`GpuMoeBlock::forward_batched`]) return the same bits. The config is
//! [`crate::spec::config::MoeConfig`], the weights [`crate::spec::weights::MoeWeights`].

use std::sync::Mutex;

use crate::device::Device;
use crate::error::{Error, Result};
use crate::kernels::gemm::GpuMatrix;
use crate::kernels::quantize::GpuActPair;
use crate::kernels::router::RouteCounters;
use crate::kernels::{activation, gemm, moe_reduce, route, router, row_scale};
use crate::quant::{QuantMatrix, WeightFormat};
use crate::spec::config::{check_input, MoeConfig};
use crate::spec::trace::MoeOutput;
use crate::spec::weights::MoeWeights;
use crate::tensor::GpuTensor;

/// Tokens up to which [`GpuMoeBlock::forward_batched`] routes each row in a tile of its own
/// (decode steps: one launch, [`router::route`], for an F32 router); larger batches sort
/// their rows by expert on the device.
pub const DEVICE_ROUTE_MAX_TOKENS: usize = 8;

struct GpuShared {
    gate_inp: GpuMatrix,
    gate: GpuMatrix,
    up: GpuMatrix,
    down: GpuMatrix,
}

/// The routed experts' gate and up matrices: each expert's gate rows then its up rows in one
/// matrix ([`QuantMatrix::concat_rows`]: one grouped product for both, SwiGLU over the two
/// halves of each output row) when they share a format, two matrices otherwise. The same
/// bits either way.
enum GateUp {
    Stacked(GpuMatrix),
    Separate(GpuMatrix, GpuMatrix),
}

/// An MoE block's weights on the device, with the two GPU forward paths.
pub struct GpuMoeBlock {
    cfg: MoeConfig,
    router: GpuMatrix,
    gate_up: GateUp,
    down: GpuMatrix,
    shared: Option<GpuShared>,
    /// The fused decode routing's arrival counters (zero between launches; the lock only
    /// gives the launch its `&mut`: the work is queued on the device's one stream).
    counters: Mutex<RouteCounters>,
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
            gate_up: if w.gate.format() == w.up.format() {
                GateUp::Stacked(GpuMatrix::upload(
                    dev,
                    &QuantMatrix::concat_rows(&[&w.gate, &w.up])?,
                )?)
            } else {
                GateUp::Separate(
                    GpuMatrix::upload(dev, &w.gate)?,
                    GpuMatrix::upload(dev, &w.up)?,
                )
            },
            down: GpuMatrix::upload(dev, &w.down)?,
            shared,
            counters: Mutex::new(RouteCounters::new(dev, DEVICE_ROUTE_MAX_TOKENS)?),
        })
    }

    /// The block's shape.
    pub fn config(&self) -> &MoeConfig {
        &self.cfg
    }

    /// All tokens at once: the router product and routing (one launch, [`router::route`], for
    /// up to [`DEVICE_ROUTE_MAX_TOKENS`] tokens and an F32 router; otherwise a router GEMM and
    /// a routing launch), each expert matrix as one grouped GEMM over the tokens routed to it,
    /// the shared expert as dense GEMMs, one weighted reduce. `x: [n, dim]`. The routing
    /// tables are built on the device and nothing waits for the host: up to
    /// [`DEVICE_ROUTE_MAX_TOKENS`] tokens one row per tile
    /// ([`route::RoutedRows::from_router`]), larger batches sorted by expert
    /// ([`route::RoutedRows::sorted_from_router`]), so that each expert's weights are read once
    /// per tile of tokens. Both give the same bits.
    pub fn forward_batched(&self, dev: &Device, x: &GpuTensor<f32>) -> Result<GpuMoeOutput> {
        self.batched(dev, x, None)
    }

    /// [`GpuMoeBlock::forward_batched`] of `xp.x()` with its quantization already made: the
    /// same bits, a launch fewer.
    pub fn forward_batched_pair(&self, dev: &Device, xp: &GpuActPair) -> Result<GpuMoeOutput> {
        self.batched(dev, xp.x(), Some(xp))
    }

    /// The tokens of `x: [n, dim]`, or the shape error.
    fn tokens(&self, x: &GpuTensor<f32>) -> Result<usize> {
        let d = self.cfg.dim;
        if x.dims().len() != 2 || x.dims()[1] != d {
            return Err(Error::shape(
                "GpuMoeBlock::forward",
                "x",
                &[x.dims().first().copied().unwrap_or(0), d],
                x.dims(),
            ));
        }
        Ok(x.dims()[0])
    }

    /// The batched forward of `x` (`xp`: `x` with its quantization, when the caller has it).
    fn batched(
        &self,
        dev: &Device,
        x: &GpuTensor<f32>,
        xp: Option<&GpuActPair>,
    ) -> Result<GpuMoeOutput> {
        let c = &self.cfg;
        let (d, f, k, ne) = (c.dim, c.ffn, c.top_k, c.n_experts);
        let n = self.tokens(x)?;

        let mut logits = GpuTensor::output(dev, &[n, ne])?;
        let mut ids = GpuTensor::<u32>::output(dev, &[n, k])?;
        let mut weights = GpuTensor::output(dev, &[n, k])?;
        let r = n * k;
        let decode = n <= DEVICE_ROUTE_MAX_TOKENS;
        let (up_rows, down_rows) = if decode && self.router.format() == WeightFormat::F32 {
            // The router product, softmax, top-k and tables in one launch.
            let mut counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
            router::route(
                dev,
                x,
                &self.router,
                k,
                c.renormalize,
                &mut counters,
                &mut logits,
                &mut ids,
                &mut weights,
            )?
        } else {
            gemm::matmul(dev, x, &self.router, &mut logits)?;
            router::softmax_topk(dev, &logits, k, c.renormalize, &mut ids, &mut weights)?;
            match decode {
                true => route::RoutedRows::from_router(dev, &ids, ne)?,
                false => route::RoutedRows::sorted_from_router(dev, &ids, ne)?,
            }
        };

        // Every product of x at once (x quantized once): routed gate and up (one stacked
        // matrix), then the shared expert's gate, up and gate logit.
        let stacked = matches!(self.gate_up, GateUp::Stacked(_));
        // Stacked: [r, 2f], gate then up in each row; separate: gate and up [r, f] each.
        let mut gu = GpuTensor::output(dev, &[r, if stacked { 2 * f } else { f }])?;
        let mut u = match stacked {
            true => None,
            false => Some(GpuTensor::output(dev, &[r, f])?),
        };
        let mut shared_in = match c.shared_ffn {
            Some(sf) if self.shared.is_some() => Some((
                GpuTensor::output(dev, &[n, sf])?,
                GpuTensor::output(dev, &[n, sf])?,
                GpuTensor::output(dev, &[n, 1])?,
            )),
            _ => None,
        };
        {
            let mut products = vec![gemm::Product::Grouped(
                match &self.gate_up {
                    GateUp::Stacked(w) | GateUp::Separate(w, _) => w,
                },
                &up_rows,
                &mut gu,
            )];
            if let (GateUp::Separate(_, wu), Some(u)) = (&self.gate_up, u.as_mut()) {
                products.push(gemm::Product::Grouped(wu, &up_rows, u));
            }
            if let (Some(s), Some((sg, su, gl))) = (&self.shared, shared_in.as_mut()) {
                products.push(gemm::Product::Dense(&s.gate, sg));
                products.push(gemm::Product::Dense(&s.up, su));
                products.push(gemm::Product::Dense(&s.gate_inp, gl));
            }
            match xp {
                Some(xp) => gemm::matmul_shared_pair(dev, xp, &mut products)?,
                None => gemm::matmul_shared(dev, x, &mut products)?,
            }
        }
        let mut partial = GpuTensor::output(dev, &[n * k, d])?;
        if u.is_none() && f % 32 == 0 && self.down.format().is_quantized() {
            // SwiGLU writes the down product's quantized input itself (a launch fewer).
            // SAFETY: swiglu_halves_q8 writes the whole pair before the product reads it.
            let mut hp = unsafe { GpuActPair::uninit(dev, r, f) }?;
            activation::swiglu_halves_q8(dev, &gu, &mut hp)?;
            gemm::matmul_shared_pair(
                dev,
                &hp,
                &mut [gemm::Product::Grouped(&self.down, &down_rows, &mut partial)],
            )?;
        } else {
            let mut h = GpuTensor::output(dev, &[r, f])?;
            match &u {
                None => activation::swiglu_halves(dev, &gu, &mut h)?,
                Some(u) => activation::swiglu(dev, &gu, u, &mut h)?,
            }
            gemm::matmul_grouped(dev, &h, &self.down, &down_rows, &mut partial)?;
        }
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
        let (d, n) = (self.cfg.dim, self.tokens(x)?);
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
