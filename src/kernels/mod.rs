//! Typed launch wrappers: each validates every shape and index, then queues its kernel on the
//! device's stream. A call that returns an error has queued nothing.
//!
//! For kernel `foo`: `cuda/foo.cu` (the kernel), this module's `foo.rs` (the wrapper),
//! `src/reference/foo.rs` (the CPU reference that defines its bits), `tests/parity/foo.rs`
//! (the bit-parity properties) and `benches/foo.rs` (the criterion bench).

pub mod activation;
pub mod attention;
pub mod delta_net;
pub mod elementwise;
pub mod fastscan;
pub mod gemm;
pub mod moe_reduce;
pub mod norm;
pub mod quantize;
pub mod rope;
pub mod route;
pub mod router;
pub mod row_scale;

use cudarc::driver::LaunchConfig;

use crate::device::{Device, Family};
use crate::error::{Error, Result};

/// Largest grid y dimension CUDA allows; row-parallel kernels launch once per chunk of rows.
pub(crate) const MAX_GRID_Y: usize = 65_535;

/// `(first row, rows)` of each chunk of at most [`MAX_GRID_Y`] rows covering `0..rows`.
pub(crate) fn row_chunks(rows: usize) -> impl Iterator<Item = (u32, u32)> {
    (0..rows)
        .step_by(MAX_GRID_Y)
        .map(move |r0| (r0 as u32, (rows - r0).min(MAX_GRID_Y) as u32))
}

/// `v` as a `u32` kernel argument, or [`Error::InvalidArgument`] when it does not fit.
pub(crate) fn as_u32(op: &'static str, what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::invalid(op, format!("{what} = {v} exceeds u32::MAX")))
}

/// The dimensions of a tensor of rank `R`, or [`Error::InvalidArgument`] naming the layout.
pub(crate) fn dims<const R: usize>(
    op: &'static str,
    what: &'static str,
    layout: &str,
    d: &[usize],
) -> Result<[usize; R]> {
    d.try_into().map_err(|_| {
        Error::invalid(
            op,
            format!("`{what}` must be {R}-D {layout}, got shape {d:?}"),
        )
    })
}

/// Threads per block of the row-parallel elementwise kernels.
pub(crate) const ROW_THREADS: u32 = 256;

/// `family`'s kernel `name`, allowed `bytes` of dynamic shared memory (beyond the default 48
/// KB), the attribute set once, when the kernel is first loaded.
pub(crate) fn function_with_dynamic_smem(
    dev: &Device,
    family: Family,
    name: &'static str,
    bytes: usize,
) -> Result<cudarc::driver::CudaFunction> {
    dev.function_with(family, name, |f| {
        f.set_attribute(
            cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            bytes as i32,
        )?;
        Ok(())
    })
}

/// A launch's geometry: `grid` blocks of `block` threads and `smem` bytes of dynamic shared
/// memory.
pub(crate) fn geometry(grid: (u32, u32, u32), block: (u32, u32, u32), smem: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: block,
        shared_mem_bytes: smem,
    }
}

/// The geometry of a grid-stride loop over `n` elements: blocks of 256 threads, at most 8,192
/// of them (the elementwise and activation kernels).
pub(crate) fn grid_stride(n: usize) -> LaunchConfig {
    geometry(
        (n.div_ceil(256).clamp(1, 8192) as u32, 1, 1),
        (256, 1, 1),
        0,
    )
}
