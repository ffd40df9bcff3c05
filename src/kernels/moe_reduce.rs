//! `moe_weighted_reduce` (kernel `cuda/moe_reduce.cu`, reference
//! [`crate::reference::moe_reduce`]).

use super::{as_u32, dims, geometry, row_chunks, ROW_THREADS};
use crate::device::{Device, Family};
use crate::error::{check_shape, Error, Result};
use crate::launch::args::moe_reduce::ReduceArgs;
use crate::launch::{In, Out};
use crate::tensor::GpuTensor;

const OP: &str = "moe_weighted_reduce";

/// Weighted MoE reduce: `out[i, e] = (fma chain over k of partial[i, k, e] * weight[i, k]) +
/// shared[i, e]`, routed experts in slot order first, the shared term last with a plain add
/// (order: [`crate::reference::moe_reduce::moe_weighted_reduce`]).
///
/// Shapes (row-major): `partial: [n, na, dim]`, `weight: [n, na]`, `shared: [n, dim]` (or
/// `None`), `out: [n, dim]`. Any `n`, including more than 65,535 rows. Launches the fastest
/// version for the shape (v2 when `dim % 4 == 0`).
pub fn moe_weighted_reduce(
    dev: &Device,
    partial: &GpuTensor<f32>,
    weight: &GpuTensor<f32>,
    shared: Option<&GpuTensor<f32>>,
    out: &mut GpuTensor<f32>,
) -> Result<()> {
    let version = if out.dims().len() == 2 && out.dims()[1] % 4 == 0 {
        2
    } else {
        1
    };
    moe_weighted_reduce_version(dev, version, partial, weight, shared, out)
}

/// [`moe_weighted_reduce`] with the kernel version chosen by the caller: 1 (one element per
/// thread, any shape) or 2 (one float4 per thread, `dim % 4 == 0`). Same bits for every version.
pub fn moe_weighted_reduce_version(
    dev: &Device,
    version: u32,
    partial: &GpuTensor<f32>,
    weight: &GpuTensor<f32>,
    shared: Option<&GpuTensor<f32>>,
    out: &mut GpuTensor<f32>,
) -> Result<()> {
    let [n, na, dim] = dims(OP, "partial", "[n, na, dim]", partial.dims())?;
    check_shape(OP, "weight", &[n, na], weight.dims())?;
    check_shape(OP, "out", &[n, dim], out.dims())?;
    if let Some(s) = shared {
        check_shape(OP, "shared", &[n, dim], s.dims())?;
    }
    let (name, width) = match version {
        1 => ("moe_weighted_reduce_f32_v1", dim),
        2 if dim % 4 == 0 => ("moe_weighted_reduce_f32_v2", dim / 4),
        2 => {
            return Err(Error::invalid(
                OP,
                format!("v2 needs dim % 4 == 0, dim = {dim}"),
            ))
        }
        v => return Err(Error::invalid(OP, format!("no version {v} (1 or 2)"))),
    };
    let width = as_u32(OP, "dim", width)?;
    let na32 = as_u32(OP, "na", na)?;
    if n == 0 || dim == 0 {
        return Ok(());
    }
    let f = dev.function(Family::MoeReduce, name)?;
    let has_shared = u32::from(shared.is_some());
    for (row0, nrows) in row_chunks(n) {
        let cfg = geometry(
            (width.div_ceil(ROW_THREADS), nrows, 1),
            (ROW_THREADS, 1, 1),
            0,
        );
        let args = ReduceArgs {
            out: Out::of(dev, out.slice_mut()),
            partial: In::of(dev, partial.slice()),
            weight: In::of(dev, weight.slice()),
            // Read only when has_shared is 1.
            shared: shared.map_or(In::null(), |s| In::of(dev, s.slice())),
            na: na32,
            width,
            row0,
            has_shared,
        };
        // SAFETY: partial is [n, na, dim], weight [n, na], shared (if read) and out [n, dim]
        // (checked above); the grid covers rows row0..row0 + nrows <= n and the kernel guards
        // columns against `width`.
        unsafe { dev.launch_kernel(&f, cfg, &args) }?;
    }
    Ok(())
}
