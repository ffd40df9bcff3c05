//! MoE routing (kernels `cuda/router.cu`, reference [`crate::reference::router`]):
//! `softmax_topk` over router logits, and `route`, a decode step's whole routing (router
//! product, softmax, top-k, routing tables) in one launch.

use super::gemm::GpuMatrix;
use super::route::RoutedRows;
use super::{as_u32, dims, geometry};
use crate::device::{Device, Family};
use crate::error::{check_shape, Error, Result};
use crate::launch::args::router::{RouterRouteArgs, SoftmaxTopkArgs};
use crate::launch::{In, Out};
use crate::quant::WeightFormat;
use crate::tensor::GpuTensor;

pub use crate::spec::config::{MAX_EXPERTS, MAX_TOP_K};
const WARPS: u32 = 4;
/// Most tokens one [`route`] launch takes (its grid's second dimension).
pub const MAX_ROUTE_TOKENS: usize = 65_535;

/// Softmax over each token's `n_experts` logits, the `k` largest probabilities (ties to the
/// lower expert id), and with `renormalize` their weights divided by their sum; the order of
/// every operation is [`crate::reference::router::softmax_topk`]'s.
///
/// Shapes: `logits: [n, n_experts]`, `ids: [n, k]` (expert ids, slot order),
/// `weights: [n, k]`. Needs `1 <= k <= min(n_experts, 32)` and `n_experts <= 2048`.
pub fn softmax_topk(
    dev: &Device,
    logits: &GpuTensor<f32>,
    k: usize,
    renormalize: bool,
    ids: &mut GpuTensor<u32>,
    weights: &mut GpuTensor<f32>,
) -> Result<()> {
    const OP: &str = "softmax_topk";
    let [n, e] = dims(OP, "logits", "[n, n_experts]", logits.dims())?;
    check_outputs(OP, n, e, k, ids, weights)?;
    if n == 0 {
        return Ok(());
    }
    let (n32, e32, k32) = (as_u32(OP, "n", n)?, e as u32, k as u32);
    let renorm = u32::from(renormalize);
    let f = dev.function(Family::Router, "softmax_topk_f32")?;
    let cfg = geometry(
        (n32.div_ceil(WARPS), 1, 1),
        (32 * WARPS, 1, 1),
        WARPS * e32 * 4,
    );
    let args = SoftmaxTopkArgs {
        logits: In::of(dev, logits.slice()),
        ids: Out::of(dev, ids.slice_mut()),
        weights: Out::of(dev, weights.slice_mut()),
        n_tokens: n32,
        E: e32,
        k: k32,
        renormalize: renorm,
    };
    // SAFETY: logits is [n, e], ids and weights are [n, k] with 1 <= k <= min(e, 32) and
    // e <= 2048 (checked above), so the 4 warps' e floats of shared memory fit in 32 KiB;
    // warps past the last token return before touching memory.
    unsafe { dev.launch_kernel(&f, cfg, &args) }?;
    Ok(())
}

/// Checks `n_experts` and `k` against the kernels' limits and the shapes of `ids` and
/// `weights` (`[n, k]` each).
fn check_outputs(
    op: &'static str,
    n: usize,
    e: usize,
    k: usize,
    ids: &GpuTensor<u32>,
    weights: &GpuTensor<f32>,
) -> Result<()> {
    if e == 0 || e > MAX_EXPERTS {
        return Err(Error::invalid(
            op,
            format!("n_experts = {e}, supported 1..={MAX_EXPERTS}"),
        ));
    }
    if k == 0 || k > e.min(MAX_TOP_K) {
        return Err(Error::invalid(
            op,
            format!("k = {k}, supported 1..={}", e.min(MAX_TOP_K)),
        ));
    }
    check_shape(op, "ids", &[n, k], ids.dims())?;
    check_shape(op, "weights", &[n, k], weights.dims())
}

/// Per-token arrival counters for [`route`]: the block that finishes a token's last logit
/// routes that token. Every launch leaves them at zero, so one set serves every call (and
/// every replay of a captured graph) on the device's stream.
#[derive(Debug)]
pub struct RouteCounters {
    counts: GpuTensor<u32>,
}

impl RouteCounters {
    /// Counters for batches of up to `max_tokens` tokens (at most 65,535: a token is a row of
    /// the launch's grid), zeroed.
    pub fn new(dev: &Device, max_tokens: usize) -> Result<Self> {
        if max_tokens > MAX_ROUTE_TOKENS {
            return Err(Error::invalid(
                "RouteCounters::new",
                format!("{max_tokens} tokens, at most {MAX_ROUTE_TOKENS}"),
            ));
        }
        Ok(RouteCounters {
            counts: GpuTensor::zeros(dev, &[max_tokens])?,
        })
    }

    /// The largest batch [`route`] takes with these counters.
    pub fn max_tokens(&self) -> usize {
        self.counts.len()
    }
}

/// A decode batch's routing in one launch (`router_route_f32`): `logits = x · w^T` (the
/// canonical f32 dot of [`crate::reference::gemm`], as [`crate::kernels::gemm::matmul`]
/// forms it), then [`softmax_topk`]'s ids and weights, then the unsorted routing tables
/// `(up, down)` of [`RoutedRows::from_router`]: the same bits as those three calls.
///
/// Shapes: `x: [n, K]`, `w` one F32 matrix `[n_experts, K]`, `logits: [n, n_experts]`,
/// `ids, weights: [n, k]`; `K >= 1`, `n <= counters.max_tokens()`, and `k` and `n_experts` as
/// [`softmax_topk`] takes them. A bad input is a typed error and nothing is written.
#[allow(clippy::too_many_arguments)]
pub fn route(
    dev: &Device,
    x: &GpuTensor<f32>,
    w: &GpuMatrix,
    k: usize,
    renormalize: bool,
    counters: &mut RouteCounters,
    logits: &mut GpuTensor<f32>,
    ids: &mut GpuTensor<u32>,
    weights: &mut GpuTensor<f32>,
) -> Result<(RoutedRows, RoutedRows)> {
    const OP: &str = "route";
    let [n, kd] = dims(OP, "x", "[n, K]", x.dims())?;
    if w.format() != WeightFormat::F32 || w.experts() != 1 {
        return Err(Error::invalid(
            OP,
            format!(
                "the router must be one F32 matrix, got {} x {:?}",
                w.experts(),
                w.format()
            ),
        ));
    }
    let e = w.rows();
    check_shape(OP, "x", &[n, w.cols()], &[n, kd])?;
    check_outputs(OP, n, e, k, ids, weights)?;
    check_shape(OP, "logits", &[n, e], logits.dims())?;
    if n > counters.max_tokens() {
        return Err(Error::invalid(
            OP,
            format!("{n} tokens, the counters take {}", counters.max_tokens()),
        ));
    }
    if kd == 0 {
        return Err(Error::invalid(OP, "the router's rows are empty (K = 0)"));
    }
    let k32 = as_u32(OP, "K", kd)?;
    // SAFETY: router_route_f32 writes every entry of both tables (every token's k slots).
    let (mut up, mut down) = unsafe { RoutedRows::unsorted_uninit(dev, OP, n, k, e) }?;
    if n == 0 {
        return Ok((up, down));
    }
    let (e32, kk32, renorm, len32) = (e as u32, k as u32, u32::from(renormalize), (n * k) as u32);
    let f = dev.function(Family::Router, "router_route_f32")?;
    let cfg = geometry((e32, n as u32, 1), (128, 1, 1), 0);
    let args = RouterRouteArgs {
        logits: Out::of(dev, logits.slice_mut()),
        ids: Out::of(dev, ids.slice_mut()),
        weights: Out::of(dev, weights.slice_mut()),
        up: Out::of(dev, up.buf_mut()),
        down: Out::of(dev, down.buf_mut()),
        counters: Out::of(dev, counters.counts.slice_mut()),
        x: In::of(dev, x.slice()),
        // The F32 matrix's rows of 4 K bytes.
        W: In::of_cast(dev, w.data()),
        E: e32,
        K: k32,
        k: kk32,
        renormalize: renorm,
        len: len32,
    };
    // SAFETY: x is [n, K] and w one F32 [e, K] matrix (rows of 4 K bytes, 16-byte aligned
    // when K % 4 == 0, which the kernel checks before its float4 loads); logits [n, e], ids
    // and weights [n, k] with 1 <= k <= min(e, 32) and e <= 2048 (the top-k warp's e floats
    // fit in the 9 KiB staging buffer it reuses); the tables hold 9 n k + 1 entries; n <= the
    // counters, which are zero between launches (each token's last block resets its own).
    unsafe { dev.launch_kernel(&f, cfg, &args) }?;
    Ok((up, down))
}
