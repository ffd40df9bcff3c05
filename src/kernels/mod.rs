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
