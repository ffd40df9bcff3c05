//! Matrix products with f32 weights (kernels `cuda/gemm.cu`, reference
//! [`crate::reference::gemm`]): every output is the canonical dot product of its row, so a
//! GEMV, a GEMM over any number of tokens and the expert-grouped GEMM agree bit for bit.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::{as_u32, dims, row_chunks};
use crate::device::{Device, Family};
use crate::error::{check_indices, check_shape, Error, Result};
use crate::tensor::GpuTensor;

const THREADS: u32 = 128;

/// Dense product `y[n, m] = dot(x[n, :], w[m, :])` with the canonical order of
/// [`crate::reference::gemm`]. Shapes (row-major): `x: [n, k]`, `w: [m, k]`, `y: [n, m]`.
pub fn gemm_f32(
    dev: &Device,
    x: &GpuTensor<f32>,
    w: &GpuTensor<f32>,
    y: &mut GpuTensor<f32>,
) -> Result<()> {
    const OP: &str = "gemm_f32";
    let [n, k] = dims(OP, "x", "[n, k]", x.dims())?;
    let [m, kw] = dims(OP, "w", "[m, k]", w.dims())?;
    check_shape(OP, "w", &[m, k], &[m, kw])?;
    check_shape(OP, "y", &[n, m], y.dims())?;
    let (m32, k32) = (as_u32(OP, "m", m)?, as_u32(OP, "k", k)?);
    if k32 > i32::MAX as u32 {
        return Err(Error::invalid(OP, format!("k = {k} exceeds 2^31 - 1")));
    }
    if n == 0 || m == 0 {
        return Ok(());
    }
    let f = dev.function(Family::Gemm, "gemm_f32_v1")?;
    for (row0, nrows) in row_chunks(n) {
        let cfg = LaunchConfig {
            grid_dim: (m32.div_ceil(THREADS), nrows, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = dev.stream().launch_builder(&f);
        launch
            .arg(y.slice_mut())
            .arg(x.slice())
            .arg(w.slice())
            .arg(&m32)
            .arg(&k32)
            .arg(&row0);
        // SAFETY: x is [n, k], w [m, k], y [n, m] (checked above); the grid covers rows
        // row0..row0 + nrows <= n and the kernel guards output features against m.
        unsafe { launch.launch(cfg) }?;
    }
    Ok(())
}

/// A validated routing table for [`gemm_grouped_f32`], resident on the device: routed row `r`
/// reads input row `x_rows[r]`, multiplies by expert `experts[r]` and writes output row
/// `y_rows[r]`.
#[derive(Debug)]
pub struct RoutedRows {
    x_rows: CudaSlice<u32>,
    experts: CudaSlice<u32>,
    y_rows: CudaSlice<u32>,
    len: usize,
    nx: usize,
    n_experts: usize,
    ny: usize,
}

impl RoutedRows {
    /// Checks and uploads a routing table for inputs of `nx` rows, `n_experts` experts and
    /// outputs of `ny` rows. Every index must be in range and no output row may appear twice
    /// (two routed rows writing one output would race); otherwise a typed error, and nothing
    /// is uploaded.
    pub fn new(
        dev: &Device,
        x_rows: &[u32],
        experts: &[u32],
        y_rows: &[u32],
        nx: usize,
        n_experts: usize,
        ny: usize,
    ) -> Result<Self> {
        const OP: &str = "RoutedRows::new";
        let len = experts.len();
        check_shape(OP, "x_rows", &[len], &[x_rows.len()])?;
        check_shape(OP, "y_rows", &[len], &[y_rows.len()])?;
        check_indices(OP, "x_rows", x_rows, nx)?;
        check_indices(OP, "experts", experts, n_experts)?;
        check_indices(OP, "y_rows", y_rows, ny)?;
        let mut seen = vec![false; ny];
        for (position, &r) in y_rows.iter().enumerate() {
            if std::mem::replace(&mut seen[r as usize], true) {
                return Err(Error::invalid(
                    OP,
                    format!("y_rows[{position}] = {r} names an output row a second time"),
                ));
            }
        }
        let up = |v: &[u32], what| {
            dev.stream()
                .clone_htod(v)
                .map_err(|e| Error::from_alloc(e, std::mem::size_of_val(v), what))
        };
        Ok(RoutedRows {
            x_rows: up(x_rows, "RoutedRows x_rows")?,
            experts: up(experts, "RoutedRows experts")?,
            y_rows: up(y_rows, "RoutedRows y_rows")?,
            len,
            nx,
            n_experts,
            ny,
        })
    }

    /// Number of routed rows.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no row is routed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Expert-grouped product: `y[y_rows[r], m] = dot(x[x_rows[r], :], w[experts[r], m, :])` for
/// every routed row of `rows`, each output the canonical dot product. Shapes (row-major):
/// `x: [nx, k]`, `w: [n_experts, m, k]`, `y: [ny, m]`, matching the bounds `rows` was built
/// with. Output rows no routed row names are left as they are.
pub fn gemm_grouped_f32(
    dev: &Device,
    x: &GpuTensor<f32>,
    w: &GpuTensor<f32>,
    rows: &RoutedRows,
    y: &mut GpuTensor<f32>,
) -> Result<()> {
    const OP: &str = "gemm_grouped_f32";
    let [nx, k] = dims(OP, "x", "[nx, k]", x.dims())?;
    let [ne, m, kw] = dims(OP, "w", "[n_experts, m, k]", w.dims())?;
    check_shape(OP, "x", &[rows.nx, k], &[nx, k])?;
    check_shape(OP, "w", &[rows.n_experts, m, k], &[ne, m, kw])?;
    check_shape(OP, "y", &[rows.ny, m], y.dims())?;
    let (m32, k32) = (as_u32(OP, "m", m)?, as_u32(OP, "k", k)?);
    if k32 > i32::MAX as u32 {
        return Err(Error::invalid(OP, format!("k = {k} exceeds 2^31 - 1")));
    }
    if rows.is_empty() || m == 0 {
        return Ok(());
    }
    let f = dev.function(Family::Gemm, "gemm_grouped_f32_v1")?;
    for (row0, nrows) in row_chunks(rows.len) {
        let cfg = LaunchConfig {
            grid_dim: (m32.div_ceil(THREADS), nrows, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = dev.stream().launch_builder(&f);
        launch
            .arg(y.slice_mut())
            .arg(x.slice())
            .arg(w.slice())
            .arg(&rows.x_rows)
            .arg(&rows.experts)
            .arg(&rows.y_rows)
            .arg(&m32)
            .arg(&k32)
            .arg(&row0);
        // SAFETY: every index in `rows` was checked against (nx, n_experts, ny) when it was
        // built, and x, w, y have exactly those extents (checked above); y_rows are distinct,
        // so no two threads write one element.
        unsafe { launch.launch(cfg) }?;
    }
    Ok(())
}
