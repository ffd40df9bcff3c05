//! `row_scale`: `buf[i, e] *= scales[i]` (kernel `cuda/row_scale.cu`, reference
//! [`crate::reference::row_scale`]).

use super::{as_u32, dims, geometry, row_chunks, ROW_THREADS};
use crate::device::{Device, Family};
use crate::error::{check_shape, Error, Result};
use crate::launch::args::row_scale::RowScaleArgs;
use crate::launch::{In, Out};
use crate::tensor::GpuTensor;

const OP: &str = "row_scale";

/// Scales row `i` of `buf: [rows, cols]` by `scales[i]` (`scales: [rows]`), in place: one IEEE
/// multiply per element. Launches the fastest version for the shape (v2 when `cols % 4 == 0`).
pub fn row_scale(dev: &Device, buf: &mut GpuTensor<f32>, scales: &GpuTensor<f32>) -> Result<()> {
    let version = if buf.dims().len() == 2 && buf.dims()[1] % 4 == 0 {
        2
    } else {
        1
    };
    row_scale_version(dev, version, buf, scales)
}

/// [`row_scale`] with the kernel version chosen by the caller: 1 (one element per thread, any
/// shape) or 2 (one float4 per thread, `cols % 4 == 0`). Every version gives the same bits.
pub fn row_scale_version(
    dev: &Device,
    version: u32,
    buf: &mut GpuTensor<f32>,
    scales: &GpuTensor<f32>,
) -> Result<()> {
    let [rows, cols] = dims(OP, "buf", "[rows, cols]", buf.dims())?;
    check_shape(OP, "scales", &[rows], scales.dims())?;
    let (name, width) = match version {
        1 => ("row_scale_f32_v1", cols),
        2 if cols % 4 == 0 => ("row_scale_f32_v2", cols / 4),
        2 => {
            return Err(Error::invalid(
                OP,
                format!("v2 needs cols % 4 == 0, cols = {cols}"),
            ))
        }
        v => return Err(Error::invalid(OP, format!("no version {v} (1 or 2)"))),
    };
    let width = as_u32(OP, "cols", width)?;
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let f = dev.function(Family::RowScale, name)?;
    for (row0, nrows) in row_chunks(rows) {
        let cfg = geometry(
            (width.div_ceil(ROW_THREADS), nrows, 1),
            (ROW_THREADS, 1, 1),
            0,
        );
        let args = RowScaleArgs {
            buf: Out::of(dev, buf.slice_mut()),
            scales: In::of(dev, scales.slice()),
            width,
            row0,
        };
        // SAFETY: buf is [rows, cols] and scales is [rows] (checked above); the grid covers
        // rows row0..row0 + nrows <= rows and the kernel guards columns against `width`.
        unsafe { dev.launch_kernel(&f, cfg, &args) }?;
    }
    Ok(())
}
