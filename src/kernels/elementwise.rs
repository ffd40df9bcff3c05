//! The residual add and the embedding gather (kernels `cuda/elementwise.cu`, references
//! [`crate::reference::elementwise`]).

use super::{dims, grid_stride};
use crate::device::{Device, Family};
use crate::error::{check_indices, check_shape, Result};
use crate::launch::args::elementwise::{AddArgs, GatherArgs};
use crate::launch::{In, Out};
use crate::tensor::GpuTensor;

/// `a += b` elementwise (one IEEE add each); `a` and `b` must have one shape.
pub fn add(dev: &Device, a: &mut GpuTensor<f32>, b: &GpuTensor<f32>) -> Result<()> {
    check_shape("add", "b", a.dims(), b.dims())?;
    let n = a.len() as u64;
    if n == 0 {
        return Ok(());
    }
    let f = dev.function(Family::Elementwise, "add_f32")?;
    let args = AddArgs {
        a: Out::of(dev, a.slice_mut()),
        b: In::of(dev, b.slice()),
        n,
    };
    // SAFETY: a and b hold n elements each (same shape, checked above).
    unsafe { dev.launch_kernel(&f, grid_stride(n as usize), &args) }?;
    Ok(())
}

/// `out[r, :] = table[ids[r], :]`: `table: [vocab, width]`, `ids` (host) each `< vocab`,
/// `out: [ids.len(), width]`. An id out of range is an error and nothing is written.
pub fn gather_rows(
    dev: &Device,
    table: &GpuTensor<f32>,
    ids: &[u32],
    out: &mut GpuTensor<f32>,
) -> Result<()> {
    const OP: &str = "gather_rows";
    let [vocab, width] = dims(OP, "table", "[vocab, width]", table.dims())?;
    check_shape(OP, "out", &[ids.len(), width], out.dims())?;
    check_indices(OP, "ids", ids, vocab)?;
    if ids.is_empty() || width == 0 {
        return Ok(());
    }
    let ids_dev = GpuTensor::from_host(dev, ids, &[ids.len()])?;
    gather_rows_device(dev, table, &ids_dev, out)
}

/// [`gather_rows`] with the ids already on the device (`ids: [rows]`), for a captured decode
/// step that reads its token from device memory. The caller guarantees every id `< vocab` (it
/// checks them on the host before writing them).
pub(crate) fn gather_rows_device(
    dev: &Device,
    table: &GpuTensor<f32>,
    ids_dev: &GpuTensor<u32>,
    out: &mut GpuTensor<f32>,
) -> Result<()> {
    const OP: &str = "gather_rows";
    let [_vocab, width] = dims(OP, "table", "[vocab, width]", table.dims())?;
    check_shape(OP, "out", &[ids_dev.len(), width], out.dims())?;
    if ids_dev.is_empty() || width == 0 {
        return Ok(());
    }
    let (rows, width32) = (ids_dev.len() as u64, width as u32);
    let f = dev.function(Family::Elementwise, "gather_rows_f32")?;
    let args = GatherArgs {
        out: Out::of(dev, out.slice_mut()),
        table: In::of(dev, table.slice()),
        ids: In::of(dev, ids_dev.slice()),
        rows,
        width: width32,
    };
    // SAFETY: every id is below vocab (checked by the callers), out is [rows, width].
    unsafe { dev.launch_kernel(&f, grid_stride(rows as usize * width), &args) }?;
    Ok(())
}
