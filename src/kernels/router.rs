//! `softmax_topk`: MoE routing (kernel `cuda/router.cu`, reference
//! [`crate::reference::router`]).

use cudarc::driver::LaunchConfig;

use super::{as_u32, dims};
use crate::device::{Device, Family};
use crate::error::{check_shape, Error, Result};
use crate::tensor::GpuTensor;

/// Most experts per token the kernel handles (the probabilities live in shared memory).
pub const MAX_EXPERTS: usize = 2048;
/// Most experts one token may select (one warp lane per selected slot).
pub const MAX_TOP_K: usize = 32;
const WARPS: u32 = 4;

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
    if e == 0 || e > MAX_EXPERTS {
        return Err(Error::invalid(
            OP,
            format!("n_experts = {e}, supported 1..={MAX_EXPERTS}"),
        ));
    }
    if k == 0 || k > e.min(MAX_TOP_K) {
        return Err(Error::invalid(
            OP,
            format!("k = {k}, supported 1..={}", e.min(MAX_TOP_K)),
        ));
    }
    check_shape(OP, "ids", &[n, k], ids.dims())?;
    check_shape(OP, "weights", &[n, k], weights.dims())?;
    if n == 0 {
        return Ok(());
    }
    let (n32, e32, k32) = (as_u32(OP, "n", n)?, e as u32, k as u32);
    let renorm = u32::from(renormalize);
    let f = dev.function(Family::Router, "softmax_topk_f32")?;
    let cfg = LaunchConfig {
        grid_dim: (n32.div_ceil(WARPS), 1, 1),
        block_dim: (32 * WARPS, 1, 1),
        shared_mem_bytes: WARPS * e32 * 4,
    };
    let mut launch = dev.launch_builder(&f);
    launch
        .arg(logits.slice())
        .arg(ids.slice_mut())
        .arg(weights.slice_mut())
        .arg(&n32)
        .arg(&e32)
        .arg(&k32)
        .arg(&renorm);
    // SAFETY: logits is [n, e], ids and weights are [n, k] with 1 <= k <= min(e, 32) and
    // e <= 2048 (checked above), so the 4 warps' e floats of shared memory fit in 32 KiB;
    // warps past the last token return before touching memory.
    unsafe { launch.launch(cfg) }?;
    Ok(())
}
