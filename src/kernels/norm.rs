//! `rmsnorm` (kernel `cuda/norm.cu`, reference [`crate::reference::norm`]).

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{as_u32, dims};
use crate::device::{Device, Family};
use crate::error::{check_shape, Result};
use crate::tensor::GpuTensor;

const WARPS: u32 = 8;
/// Rows at least this wide take the block-per-row kernel.
pub const ROW_KERNEL_MIN_WIDTH: usize = 512;

/// Checks `x: [rows, width]` (named `xname`), each of `more` and `y` the same shape, `w:
/// [width]`: `(rows, width)` as u32, `None` when there is nothing to do.
fn row_shape(
    op: &'static str,
    xname: &'static str,
    x: &GpuTensor<f32>,
    more: &[(&'static str, &GpuTensor<f32>)],
    w: &GpuTensor<f32>,
    y: &GpuTensor<f32>,
) -> Result<Option<(u32, u32)>> {
    let [width] = dims(op, "w", "[width]", w.dims())?;
    let [rows, xw] = dims(op, xname, "[rows, width]", x.dims())?;
    check_shape(op, xname, &[rows, width], &[rows, xw])?;
    for (name, t) in more {
        check_shape(op, name, &[rows, width], t.dims())?;
    }
    check_shape(op, "y", &[rows, width], y.dims())?;
    let (rows32, width32) = (as_u32(op, "rows", rows)?, as_u32(op, "width", width)?);
    Ok((rows > 0 && width > 0).then_some((rows32, width32)))
}

/// RMSNorm of each row of `x: [rows, width]` with weights `w: [width]` into `y` (same shape as
/// `x`); the order is [`crate::reference::norm::rmsnorm`]'s. A per-head norm is the same call
/// on `x` viewed as `[tokens * heads, hd]`.
pub fn rmsnorm(
    dev: &Device,
    x: &GpuTensor<f32>,
    w: &GpuTensor<f32>,
    eps: f32,
    y: &mut GpuTensor<f32>,
) -> Result<()> {
    let Some((rows32, width32)) = row_shape("rmsnorm", "x", x, &[], w, y)? else {
        return Ok(());
    };
    let width = width32 as usize;
    // Wide rows: a block per row (one load round trip instead of eight for a lone warp);
    // narrow ones (the per-head QK norms): a warp per row. The same order either way.
    let (name, grid) = if width >= ROW_KERNEL_MIN_WIDTH {
        ("rmsnorm_f32_row", rows32)
    } else {
        ("rmsnorm_f32", rows32.div_ceil(WARPS))
    };
    let f = dev.function(Family::Norm, name)?;
    let cfg = LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (32 * WARPS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut launch = dev.stream().launch_builder(&f);
    launch
        .arg(y.slice_mut())
        .arg(x.slice())
        .arg(w.slice())
        .arg(&rows32)
        .arg(&width32)
        .arg(&eps);
    // SAFETY: x and y are [rows, width], w is [width] (checked above); warps (or blocks) past
    // the last row return before touching memory.
    unsafe { launch.launch(cfg) }?;
    Ok(())
}

/// The residual add and the norm after it in one launch: `h += o`, then `y = rmsnorm(h, w)`
/// (`h`, `o`, `y`: `[rows, width]`, `w: [width]`), the bits of [`crate::kernels::elementwise::add`]
/// followed by [`rmsnorm`] (references [`crate::reference::elementwise::add`] and
/// [`crate::reference::norm::rmsnorm`]). A bad shape is an error and nothing is written.
pub fn add_rmsnorm(
    dev: &Device,
    h: &mut GpuTensor<f32>,
    o: &GpuTensor<f32>,
    w: &GpuTensor<f32>,
    eps: f32,
    y: &mut GpuTensor<f32>,
) -> Result<()> {
    let Some((rows32, width32)) = row_shape("add_rmsnorm", "h", h, &[("o", o)], w, y)? else {
        return Ok(());
    };
    let f = dev.function(Family::Norm, "add_rmsnorm_f32_row")?;
    let cfg = LaunchConfig {
        grid_dim: (rows32, 1, 1),
        block_dim: (32 * WARPS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut launch = dev.stream().launch_builder(&f);
    launch
        .arg(y.slice_mut())
        .arg(h.slice_mut())
        .arg(o.slice())
        .arg(w.slice())
        .arg(&rows32)
        .arg(&width32)
        .arg(&eps);
    // SAFETY: h, o and y are [rows, width] and w is [width] (checked above; y and h are two
    // tensors, so they do not overlap); a block per row, and each element of h is read and
    // written by one thread.
    unsafe { launch.launch(cfg) }?;
    Ok(())
}
