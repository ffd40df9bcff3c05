//! Matrix products in every weight format (kernels `cuda/gemm.cu`, reference
//! [`crate::reference::gemm`]).
//!
//! Every output is the canonical dot product of its row (the order is stated in
//! [`crate::reference::gemm`]), so a GEMV, a GEMM over any number of tokens, the expert-grouped
//! GEMM and every kernel the dispatcher may pick agree bit for bit.
//!
//! - [`matmul`]: `y = x · Wᵀ` for one matrix ([`GpuMatrix`] with one expert).
//! - [`matmul_grouped`]: the MoE product, each routed row through its own expert's matrix
//!   ([`RoutedRows`]).
//! - [`gemm_f32`] / [`gemm_grouped_f32`]: the v1 kernels on plain f32 tensors (the baseline).
//!
//! Dispatch ([`MatmulKernel::Auto`]): tiles of at most [`GEMV_MAX_ROWS`] rows run the GEMV
//! (weights read once per tile, memory-bound); larger ones the tiled GEMM (FFMA for the float
//! formats, int8 `mma.sync` for the quantized ones), in tiles of [`GEMM_TILE_ROWS`] rows.

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::CudaSlice;

use super::quantize::{quantize_into, GpuActPair, GpuActQ8};
use super::{as_u32, dims, geometry, row_chunks, MAX_GRID_Y};
use crate::device::{Device, Family};
use crate::error::{check_shape, Error, Result};
use crate::launch::args::gemm::{ProductArgs, V1DenseArgs, V1GroupedArgs};
use crate::launch::{In, Out};
use crate::quant::{QuantMatrix, WeightFormat};
use crate::tensor::GpuTensor;

const V1_THREADS: u32 = 128;
/// Weight rows per block of the GEMV (one warp each).
const GEMV_ROWS_PER_BLOCK: u32 = 8;

/// Most rows per tile that [`MatmulKernel::Auto`] sends to the GEMV.
pub const GEMV_MAX_ROWS: usize = 8;
/// Rows per tile of the tiled GEMM (and output features per block of every v2 kernel).
pub const GEMM_TILE_ROWS: usize = 64;

/// Which kernel a product runs. Every choice returns the same bits; the choice is speed only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MatmulKernel {
    /// GEMV for tiles of at most [`GEMV_MAX_ROWS`] rows, the tiled GEMM otherwise.
    #[default]
    Auto,
    /// The v1 one-thread-per-output kernels (F32 weights only).
    V1,
    /// The GEMV, in tiles of at most 8 rows.
    Gemv,
    /// The tiled GEMM (FFMA for float formats, int8 tensor cores for quantized ones).
    Gemm,
    /// For tiles of one row with K % 256 == 0, Q8_0 and Q6_K weights: the int8 tensor-core
    /// GEMV (`gemv_<fmt>_mma`, which `Auto` runs for Q8_0 weights of at least
    /// [`GEMV_MMA_MIN_ROWS`] rows) at any number of rows; everything else as [`Self::Gemv`].
    GemvMma,
    /// The generic kernels alone: [`GemmKernel::Gemv`] for tiles of at most
    /// [`GEMV_MAX_ROWS`] rows, [`GemmKernel::Gemm`] otherwise, where `Auto` would take a
    /// specialised one (cp.async, tensor-core GEMV, the wide F32 GEMV). Their witnesses: the
    /// tests hold each specialised kernel to the generic one's bits and the CPU's.
    Plain,
}

/// Zero bytes after every uploaded matrix: the Q6_K GEMM copies the 16-byte aligned window
/// around each 210-byte super-block, which for the matrix's last one reaches up to 14 bytes
/// past it.
const MATRIX_TAIL: usize = 16;

/// A weight matrix, or a stack of expert matrices `[experts, rows, cols]`, on the device in its
/// stored (GGUF) format.
#[derive(Debug)]
pub struct GpuMatrix {
    format: WeightFormat,
    experts: usize,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    data: CudaSlice<u8>,
}

impl GpuMatrix {
    /// Uploads a host matrix (already checked by [`QuantMatrix`]), with [`MATRIX_TAIL`] zero
    /// bytes after it.
    pub fn upload(dev: &Device, m: &QuantMatrix) -> Result<Self> {
        let len = m.bytes().len() + MATRIX_TAIL;
        dev.alloc_gate(len, "GpuMatrix::upload")?;
        let stream = dev.stream();
        let mut data = stream
            .alloc_zeros::<u8>(len)
            .map_err(|e| Error::from_alloc(e, len, "GpuMatrix::upload"))?;
        stream
            .memcpy_htod(m.bytes(), &mut data.slice_mut(..m.bytes().len()))
            .map_err(|e| Error::from_alloc(e, len, "GpuMatrix::upload"))?;
        Ok(GpuMatrix {
            format: m.format(),
            experts: m.experts(),
            rows: m.rows(),
            cols: m.cols(),
            row_bytes: m.format().row_bytes(m.cols())?,
            data,
        })
    }

    crate::quant::matrix_shape_getters!();

    /// Bytes of the stored matrix on the device (without the [`MATRIX_TAIL`] padding).
    pub fn num_bytes(&self) -> usize {
        self.data.len() - MATRIX_TAIL
    }

    /// The stored bytes, for a kernel family that reads the matrix itself (the router).
    pub(crate) fn data(&self) -> &CudaSlice<u8> {
        &self.data
    }
}

pub use super::route::RoutedRows;

/// The kernel one product runs, chosen once by [`select`]: the launch reads its name, its
/// geometry and its tile height from here and decides nothing. Every variant is reachable
/// through some [`MatmulKernel`] (a unit test walks them against the compiled entry points).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmKernel {
    /// `gemm_f32_v1` / `gemm_grouped_f32_v1`: one thread per output (F32 weights).
    V1,
    /// `gemv_<fmt>_t<height>`: tiles of `height` rows (1, 2, 4 or 8), a warp per weight row,
    /// 8 rows a block.
    Gemv {
        /// Rows per tile.
        height: usize,
    },
    /// `gemv_f32_wide`: F32 weights one row at a time, 4 rows a block staged in shared memory.
    GemvF32Wide,
    /// `gemv_q8_0_mma`: Q8_0 weights (K % 256 == 0) one row at a time on the int8 tensor cores,
    /// 16 weight rows a block.
    GemvQ8Mma,
    /// `gemv_q6_k_mma`: Q6_K weights one row at a time on the int8 tensor cores.
    GemvQ6Mma,
    /// `gemv_q8_0_rows`: Q8_0 weights (K % 256 == 0, K > [`GEMV_ASYNC_MAX_Q8_COLS`]) one row at
    /// a time, 16 weight rows a block.
    GemvQ8Rows,
    /// `gemv_{q8_0,q4_k,q5_k}_async`: one row at a time, 8 weight rows a warp, their chunks
    /// copied by cp.async (Q8_0 with K % 256 == 0 and K <= [`GEMV_ASYNC_MAX_Q8_COLS`]).
    GemvAsync,
    /// `gemm_ffma_<fmt>` (float formats) / `gemm_mma_<fmt>` (quantized): tiles of
    /// [`GEMM_TILE_ROWS`] rows.
    Gemm,
    /// `gemm_mma_q8_0_async`: Q8_0 weights with K % 256 == 0, 3 cp.async stages.
    GemmQ8Async,
    /// `gemm_mma_q{4,5,6}_k_async`: the K-quants' GEMM, 3 cp.async stages, 512 threads.
    GemmKqAsync,
}

impl GemmKernel {
    /// Rows of one tile: the height of a GEMV tile (1 for the one-row kernels), the tiled
    /// GEMM's [`GEMM_TILE_ROWS`]; the v1 kernels take rows one by one.
    pub fn tile_rows(self) -> usize {
        match self {
            GemmKernel::Gemv { height } => height,
            GemmKernel::Gemm | GemmKernel::GemmQ8Async | GemmKernel::GemmKqAsync => GEMM_TILE_ROWS,
            _ => 1,
        }
    }

    /// Whether the kernel walks a routing table's GEMM tiles (else its GEMV tiles).
    fn is_gemm(self) -> bool {
        self.tile_rows() == GEMM_TILE_ROWS
    }

    /// The CUDA entry point for weights of `format`; `None` where the kernel has no entry for
    /// that format.
    pub fn entry(self, format: WeightFormat) -> Option<&'static str> {
        use WeightFormat as F;
        let generic = generic_entries(format);
        Some(match (self, format) {
            (GemmKernel::V1, F::F32) => "gemm_f32_v1",
            (GemmKernel::Gemv { height }, _) if matches!(height, 1 | 2 | 4 | 8) => {
                generic?.0[height.trailing_zeros() as usize]
            }
            (GemmKernel::GemvF32Wide, F::F32) => "gemv_f32_wide",
            (GemmKernel::GemvQ8Mma, F::Q8_0) => "gemv_q8_0_mma",
            (GemmKernel::GemvQ6Mma, F::Q6K) => "gemv_q6_k_mma",
            (GemmKernel::GemvQ8Rows, F::Q8_0) => "gemv_q8_0_rows",
            (GemmKernel::GemvAsync, F::Q8_0) => "gemv_q8_0_async",
            (GemmKernel::GemvAsync, F::Q4K) => "gemv_q4_k_async",
            (GemmKernel::GemvAsync, F::Q5K) => "gemv_q5_k_async",
            (GemmKernel::Gemm, _) => generic?.1,
            (GemmKernel::GemmQ8Async, F::Q8_0) => "gemm_mma_q8_0_async",
            (GemmKernel::GemmKqAsync, F::Q4K) => "gemm_mma_q4_k_async",
            (GemmKernel::GemmKqAsync, F::Q5K) => "gemm_mma_q5_k_async",
            (GemmKernel::GemmKqAsync, F::Q6K) => "gemm_mma_q6_k_async",
            _ => return None,
        })
    }

    /// Blocks along the output features for `m` of them, threads a block and dynamic shared
    /// memory, for weights of `format`.
    fn geometry(self, format: WeightFormat, m: u32) -> (u32, u32, u32) {
        let tile = GEMM_TILE_ROWS as u32;
        match self {
            GemmKernel::V1 => (m.div_ceil(V1_THREADS), V1_THREADS, 0),
            GemmKernel::Gemv { .. } => (m.div_ceil(GEMV_ROWS_PER_BLOCK), 256, 0),
            GemmKernel::GemvF32Wide => (m, 128, 0),
            GemmKernel::GemvQ8Mma => (m.div_ceil(16), 256, GMQ_SMEM_BYTES),
            GemmKernel::GemvQ6Mma => (m.div_ceil(16), 256, GMQ_Q6_SMEM_BYTES),
            GemmKernel::GemvQ8Rows => (m.div_ceil(16), 256, 0),
            GemmKernel::GemvAsync => (m.div_ceil(8), 32, gka_smem(format)),
            GemmKernel::Gemm => (m.div_ceil(tile), 256, 0),
            GemmKernel::GemmQ8Async => (m.div_ceil(tile), 256, Q8_ASYNC_SMEM_BYTES),
            GemmKernel::GemmKqAsync => (
                m.div_ceil(tile),
                KQ_ASYNC_THREADS,
                match format {
                    WeightFormat::Q4K => kq_async_smem(144, false),
                    WeightFormat::Q5K => kq_async_smem(176, false),
                    _ => kq_async_smem(224, true),
                },
            ),
        }
    }
}

fn gemv_height(rows: usize) -> usize {
    rows.clamp(1, GEMV_MAX_ROWS).next_power_of_two()
}

/// The one choice of kernel: what `kernel` runs for weights of `format` with `rows` output
/// features and `cols` inputs, over tiles of at most `largest_tile` rows (a dense product's
/// `n`; a grouped one's largest group, capped at [`GEMM_TILE_ROWS`], or the bound the host
/// has when the table is built on the device). Every choice gives the same bits; a format
/// without GPU kernels is an error.
///
/// Why the specialised kernels (ncu on the H200, the 30B shapes): Q8_0 rows of whole
/// 256-wide chunks one token at a time go on the tensor cores from [`GEMV_MMA_MIN_ROWS`] rows
/// (the LM head), through the cp.async dp4a kernel up to [`GEMV_ASYNC_MAX_Q8_COLS`] columns
/// (the expert down product: 8.5 us, where the same staging as `gemv_q8_0_rows` took 11.4) and
/// through `gemv_q8_0_rows` otherwise (gate/up 15.6 -> 12.8 us against the generic GEMV); Q4_K
/// and Q5_K one token at a time through the cp.async GEMV; F32 (the router of a decode step)
/// through the wide GEMV; the quantized GEMMs through their cp.async versions wherever the
/// rows are 16-byte aligned. Q6_K one token at a time on the tensor cores stays opt-in
/// ([`MatmulKernel::GemvMma`]) until measured against the generic GEMV.
pub fn select(
    kernel: MatmulKernel,
    format: WeightFormat,
    rows: usize,
    cols: usize,
    largest_tile: usize,
) -> Result<GemmKernel> {
    use WeightFormat as F;
    let height = gemv_height(largest_tile);
    let q8_chunks = format == F::Q8_0 && cols % 256 == 0;
    let gemv = |mma: bool| match format {
        _ if height != 1 => GemmKernel::Gemv { height },
        F::F32 => GemmKernel::GemvF32Wide,
        _ if q8_chunks && (mma || rows >= GEMV_MMA_MIN_ROWS) => GemmKernel::GemvQ8Mma,
        F::Q6K if mma => GemmKernel::GemvQ6Mma,
        _ if q8_chunks && cols > GEMV_ASYNC_MAX_Q8_COLS => GemmKernel::GemvQ8Rows,
        F::Q4K | F::Q5K => GemmKernel::GemvAsync,
        _ if q8_chunks => GemmKernel::GemvAsync,
        _ => GemmKernel::Gemv { height },
    };
    let gemm = || match format {
        _ if q8_chunks => GemmKernel::GemmQ8Async,
        F::Q4K | F::Q5K | F::Q6K => GemmKernel::GemmKqAsync,
        _ => GemmKernel::Gemm,
    };
    let small = largest_tile <= GEMV_MAX_ROWS;
    let chosen = match kernel {
        MatmulKernel::V1 if format == F::F32 => GemmKernel::V1,
        MatmulKernel::V1 => {
            return Err(Error::invalid(
                "matmul",
                format!("the v1 kernels take F32 weights, not {format}"),
            ))
        }
        MatmulKernel::Gemv => gemv(false),
        MatmulKernel::GemvMma => gemv(true),
        MatmulKernel::Gemm => gemm(),
        MatmulKernel::Auto if small => gemv(false),
        MatmulKernel::Auto => gemm(),
        MatmulKernel::Plain if small => GemmKernel::Gemv { height },
        MatmulKernel::Plain => GemmKernel::Gemm,
    };
    if chosen.entry(format).is_none() {
        return Err(Error::invalid(
            "matmul",
            format!("no GPU kernel takes {format} weights"),
        ));
    }
    Ok(chosen)
}

/// The generic kernels of a format: the GEMV at heights 1, 2, 4, 8 and the tiled GEMM
/// (`gemm_ffma_<fmt>` for float formats, `gemm_mma_<fmt>` for quantized ones); `None` for a
/// format without GPU kernels (none today: every [`WeightFormat`] has them).
fn generic_entries(format: WeightFormat) -> Option<([&'static str; 4], &'static str)> {
    macro_rules! names {
        ($fmt:literal, $gemm:literal) => {
            (
                [
                    concat!("gemv_", $fmt, "_t1"),
                    concat!("gemv_", $fmt, "_t2"),
                    concat!("gemv_", $fmt, "_t4"),
                    concat!("gemv_", $fmt, "_t8"),
                ],
                concat!($gemm, $fmt),
            )
        };
    }
    use WeightFormat as F;
    Some(match format {
        F::F32 => names!("f32", "gemm_ffma_"),
        F::F16 => names!("f16", "gemm_ffma_"),
        F::BF16 => names!("bf16", "gemm_ffma_"),
        F::Q8_0 => names!("q8_0", "gemm_mma_"),
        F::Q4K => names!("q4_k", "gemm_mma_"),
        F::Q5K => names!("q5_k", "gemm_mma_"),
        F::Q6K => names!("q6_k", "gemm_mma_"),
        F::Q4_0 => names!("q4_0", "gemm_mma_"),
        F::Q4_1 => names!("q4_1", "gemm_mma_"),
        F::Q5_0 => names!("q5_0", "gemm_mma_"),
        F::Q5_1 => names!("q5_1", "gemm_mma_"),
        F::Q3K => names!("q3_k", "gemm_mma_"),
        F::IQ4NL => names!("iq4_nl", "gemm_mma_"),
        F::IQ4XS => names!("iq4_xs", "gemm_mma_"),
        F::MXFP4 => names!("mxfp4", "gemm_mma_"),
        F::Q2K => names!("q2_k", "gemm_mma_"),
    })
}

/// Checks `x: [n, k]`, `w` and `y: [ny, m]` against each other.
fn check_operands(
    op: &'static str,
    x: &GpuTensor<f32>,
    w: &GpuMatrix,
    y: &GpuTensor<f32>,
    ny: Option<usize>,
) -> Result<(usize, usize, usize)> {
    let [n, k] = dims(op, "x", "[n, k]", x.dims())?;
    check_shape(op, "x", &[n, w.cols], &[n, k])?;
    let ny = ny.unwrap_or(n);
    check_shape(op, "y", &[ny, w.rows], y.dims())?;
    check_extents(op, w.rows, k)?;
    Ok((n, w.rows, k))
}

/// `m` and `k` fit the kernels' 32-bit arguments (`k` below 2^31).
fn check_extents(op: &'static str, m: usize, k: usize) -> Result<()> {
    as_u32(op, "m", m)?;
    if k > i32::MAX as usize {
        return Err(Error::invalid(op, format!("k = {k} exceeds 2^31 - 1")));
    }
    Ok(())
}

/// The v1 dense kernel over rows `0..n` (shapes checked by the caller).
fn launch_v1_dense<W>(
    dev: &Device,
    x: &GpuTensor<f32>,
    w: &CudaSlice<W>,
    y: &mut GpuTensor<f32>,
    n: usize,
    m: usize,
    k: usize,
) -> Result<()> {
    let f = dev.function(Family::Gemm, "gemm_f32_v1")?;
    let (m32, k32) = (m as u32, k as u32);
    for (row0, nrows) in row_chunks(n) {
        let cfg = geometry((m32.div_ceil(V1_THREADS), nrows, 1), (V1_THREADS, 1, 1), 0);
        let args = V1DenseArgs {
            y: Out::of(dev, y.slice_mut()),
            x: In::of(dev, x.slice()),
            // An F32 matrix: its f32 values, or the bytes that hold them.
            w: In::of_cast(dev, w),
            M: m32,
            K: k32,
            row0,
        };
        // SAFETY: the caller checked x: [n, k], w: m rows of k f32 values, y: [n, m]; the grid
        // covers rows row0..row0 + nrows <= n and the kernel guards output features against m.
        unsafe { dev.launch_kernel(&f, cfg, &args) }?;
    }
    Ok(())
}

/// The v1 grouped kernel over every routed row (shapes checked by the caller).
fn launch_v1_grouped<W>(
    dev: &Device,
    x: &GpuTensor<f32>,
    w: &CudaSlice<W>,
    rows: &RoutedRows,
    y: &mut GpuTensor<f32>,
    m: usize,
    k: usize,
) -> Result<()> {
    let f = dev.function(Family::Gemm, "gemm_grouped_f32_v1")?;
    let (m32, k32) = (m as u32, k as u32);
    for (row0, nrows) in row_chunks(rows.len) {
        let cfg = geometry((m32.div_ceil(V1_THREADS), nrows, 1), (V1_THREADS, 1, 1), 0);
        let (xr, ex, yr) = (rows.part(0), rows.part(1), rows.part(2));
        let args = V1GroupedArgs {
            y: Out::of(dev, y.slice_mut()),
            x: In::of(dev, x.slice()),
            w: In::of_cast(dev, w),
            x_rows: In::of(dev, &xr),
            experts: In::of(dev, &ex),
            y_rows: In::of(dev, &yr),
            M: m32,
            K: k32,
            row0,
        };
        // SAFETY: every index in `rows` was checked against (nx, n_experts, ny) when it was
        // built and the caller checked x, w, y have exactly those extents; y_rows are
        // distinct, so no two threads write one element.
        unsafe { dev.launch_kernel(&f, cfg, &args) }?;
    }
    Ok(())
}

/// Dense product `y[n, m] = dot(x[n, :], w[m, :])` (`w` holds one matrix), with the kernel the
/// dispatcher picks. Shapes: `x: [n, k]`, `y: [n, m]`, `w: [1, m, k]`. Quantized formats first
/// quantize `x` per block of 32 ([`super::quantize::quantize_act`]).
pub fn matmul(
    dev: &Device,
    x: &GpuTensor<f32>,
    w: &GpuMatrix,
    y: &mut GpuTensor<f32>,
) -> Result<()> {
    matmul_with(dev, MatmulKernel::Auto, x, w, y)
}

/// [`matmul`] with the kernel chosen by the caller (tests and benches pin each one).
pub fn matmul_with(
    dev: &Device,
    kernel: MatmulKernel,
    x: &GpuTensor<f32>,
    w: &GpuMatrix,
    y: &mut GpuTensor<f32>,
) -> Result<()> {
    let plan = plan_dense(kernel, x, w, y)?;
    run_planned(dev, x, None, &mut [(plan, w, None, y)])
}

/// One product of [`matmul_shared`]: a dense product into `y`, or an expert-grouped one over
/// a routing table.
pub enum Product<'a> {
    /// `y = x · w` ([`matmul`]).
    Dense(&'a GpuMatrix, &'a mut GpuTensor<f32>),
    /// `y[y_rows[r]] = x[x_rows[r]] · w[experts[r]]` ([`matmul_grouped`]).
    Grouped(&'a GpuMatrix, &'a RoutedRows, &'a mut GpuTensor<f32>),
}

/// Several products of one input `x` (the q, k and v projections; an MoE block's router,
/// experts and shared expert): the same bits as one [`matmul`] / [`matmul_grouped`] call each,
/// with `x` quantized once for all of them instead of once per product. Every product is
/// checked before anything is queued.
pub fn matmul_shared(dev: &Device, x: &GpuTensor<f32>, products: &mut [Product<'_>]) -> Result<()> {
    shared_products(dev, x, None, products)
}

/// [`matmul_shared`] of `x = xp.x()` with its quantization already made ([`GpuActPair`]):
/// the same bits, without the launch that would quantize `x`.
pub fn matmul_shared_pair(
    dev: &Device,
    xp: &GpuActPair,
    products: &mut [Product<'_>],
) -> Result<()> {
    shared_products(dev, xp.x(), Some(xp.q()), products)
}

/// Checks every product of `x`, then queues them ([`run_planned`]).
fn shared_products(
    dev: &Device,
    x: &GpuTensor<f32>,
    pre: Option<&GpuActQ8>,
    products: &mut [Product<'_>],
) -> Result<()> {
    let mut planned = Vec::with_capacity(products.len());
    for p in products.iter_mut() {
        planned.push(match p {
            Product::Dense(w, y) => (
                plan_dense(MatmulKernel::Auto, x, w, y)?,
                &**w,
                None,
                &mut **y,
            ),
            Product::Grouped(w, rows, y) => (
                plan_grouped(MatmulKernel::Auto, x, w, rows, y)?,
                &**w,
                Some(&**rows),
                &mut **y,
            ),
        });
    }
    run_planned(dev, x, pre, &mut planned)
}

/// What a checked product launches: `(kernel, tiles, rows)`, `None` when there is no work.
type Planned = Option<(GemmKernel, usize, usize)>;

fn plan_dense(
    kernel: MatmulKernel,
    x: &GpuTensor<f32>,
    w: &GpuMatrix,
    y: &GpuTensor<f32>,
) -> Result<Planned> {
    const OP: &str = "matmul";
    let (n, m, _k) = check_operands(OP, x, w, y, None)?;
    if w.experts != 1 {
        return Err(Error::invalid(
            OP,
            format!(
                "a dense product takes one matrix, got {} experts",
                w.experts
            ),
        ));
    }
    let chosen = select(kernel, w.format, m, w.cols, n)?;
    if n == 0 || m == 0 {
        return Ok(None);
    }
    Ok(Some((chosen, n.div_ceil(chosen.tile_rows()), n)))
}

/// Queues checked products of `x`, quantizing `x` once if any weight is quantized (unless its
/// quantization `pre` is given).
fn run_planned(
    dev: &Device,
    x: &GpuTensor<f32>,
    pre: Option<&GpuActQ8>,
    products: &mut [(
        Planned,
        &GpuMatrix,
        Option<&RoutedRows>,
        &mut GpuTensor<f32>,
    )],
) -> Result<()> {
    let k = x.dims().get(1).copied().unwrap_or(0);
    for (planned, w, rows, y) in products.iter_mut() {
        if let Some((GemmKernel::V1, _, n)) = planned {
            match rows {
                None => launch_v1_dense(dev, x, &w.data, y, *n, w.rows, k)?,
                Some(r) => launch_v1_grouped(dev, x, &w.data, r, y, w.rows, k)?,
            }
        }
    }
    let quantized = products.iter().any(|(p, w, _, _)| {
        w.format.is_quantized() && matches!(p, Some((c, _, _)) if *c != GemmKernel::V1)
    });
    let launch_all = |act: Option<ActRef<'_>>,
                      products: &mut [(
        Planned,
        &GpuMatrix,
        Option<&RoutedRows>,
        &mut GpuTensor<f32>,
    )]|
     -> Result<()> {
        for (planned, w, rows, y) in products.iter_mut() {
            if let Some((kernel, n_tiles, n_rows)) = *planned {
                if kernel != GemmKernel::V1 {
                    let act = if w.format.is_quantized() { act } else { None };
                    launch_selected(dev, kernel, x, act, w, *rows, n_tiles, n_rows, y)?;
                }
            }
        }
        Ok(())
    };
    if !quantized {
        return launch_all(None, products);
    }
    if let Some(q) = pre {
        let act = ActRef {
            codes: q.codes.slice(),
            d: q.d.slice(),
            a: q.a.slice(),
        };
        return launch_all(Some(act), products);
    }
    let mut guard = dev.act_scratch(x.len())?;
    let s = guard.as_mut().expect("act_scratch allocates");
    quantize_into(dev, x, &mut s.codes, &mut s.d, &mut s.a)?;
    let act = ActRef {
        codes: &s.codes,
        d: &s.d,
        a: &s.a,
    };
    launch_all(Some(act), products)
}

/// Expert-grouped product: `y[y_rows[r], m] = dot(x[x_rows[r], :], w[experts[r], m, :])` for
/// every routed row of `rows`. Shapes: `x: [nx, k]`, `w: [n_experts, m, k]`, `y: [ny, m]`,
/// matching the bounds `rows` was built with. Output rows no routed row names are left as
/// they are.
pub fn matmul_grouped(
    dev: &Device,
    x: &GpuTensor<f32>,
    w: &GpuMatrix,
    rows: &RoutedRows,
    y: &mut GpuTensor<f32>,
) -> Result<()> {
    matmul_grouped_with(dev, MatmulKernel::Auto, x, w, rows, y)
}

/// [`matmul_grouped`] with the kernel chosen by the caller.
pub fn matmul_grouped_with(
    dev: &Device,
    kernel: MatmulKernel,
    x: &GpuTensor<f32>,
    w: &GpuMatrix,
    rows: &RoutedRows,
    y: &mut GpuTensor<f32>,
) -> Result<()> {
    let plan = plan_grouped(kernel, x, w, rows, y)?;
    run_planned(dev, x, None, &mut [(plan, w, Some(rows), y)])
}

fn plan_grouped(
    kernel: MatmulKernel,
    x: &GpuTensor<f32>,
    w: &GpuMatrix,
    rows: &RoutedRows,
    y: &GpuTensor<f32>,
) -> Result<Planned> {
    const OP: &str = "matmul_grouped";
    let (nx, m, k) = check_operands(OP, x, w, y, Some(rows.ny))?;
    check_shape(OP, "x", &[rows.nx, k], &[nx, k])?;
    if w.experts != rows.n_experts {
        return Err(Error::shape(
            OP,
            "w",
            &[rows.n_experts, m, k],
            &[w.experts, m, k],
        ));
    }
    let chosen = select(
        kernel,
        w.format,
        m,
        k,
        rows.largest_group.min(GEMM_TILE_ROWS),
    )?;
    if rows.is_empty() || m == 0 {
        return Ok(None);
    }
    let n_tiles = match chosen.is_gemm() {
        true => rows.n_gemm_tiles,
        false => rows.n_gemv_tiles,
    };
    Ok(Some((chosen, n_tiles, rows.len)))
}

/// The quantized activations a product in `w`'s format reads: `x` quantized into the device's
/// scratch for quantized formats, nothing for float formats.
#[derive(Clone, Copy)]
struct ActRef<'a> {
    codes: &'a CudaSlice<i8>,
    d: &'a CudaSlice<f32>,
    a: &'a CudaSlice<f32>,
}

/// Dynamic shared memory of `gemm_mma_q8_0_async`: 3 stages of a 64-row chunk of raw weight
/// blocks (64 x 272 bytes), activation codes (64 x 272) and activation scales (64 x 8 floats).
const Q8_ASYNC_SMEM_BYTES: u32 = 3 * (2 * 64 * 272 + 64 * 8 * 4);

/// Dynamic shared memory of `gemm_mma_q{4,5,6}_k_async` (`KqaShape` in `cuda/gemm.cu`): 3
/// stages of a 64-row chunk of raw super-blocks (`row` bytes a row: 144 and 176, Q6_K's
/// 16-byte aligned window of 224), activation codes (64 x 272) and activation scales and sums
/// (2 x 64 x 8 floats); Q6_K adds its decoded codes (64 x 272).
const fn kq_async_smem(row: u32, decoded: bool) -> u32 {
    3 * (64 * row + 64 * 272 + 2 * 64 * 8 * 4) + if decoded { 64 * 272 } else { 0 }
}

/// Threads of a `gemm_mma_q{4,5,6}_k_async` block: two groups of 8 warps, each running two of
/// the four partials of the same 64 x 64 tile.
const KQ_ASYNC_THREADS: u32 = 512;

/// Dynamic shared memory of `gemv_{q8_0,q4_k,q5_k}_async` (`GkaShape` in `cuda/gemm.cu`): a
/// ring of 4 (Q8_0) or 6 stages, each 8 rows of a 256-wide chunk (272, 144 or 176 bytes each)
/// and the activation chunk (256 codes, 8 scales, 8 sums).
fn gka_smem(format: WeightFormat) -> u32 {
    let (cb, ring) = match format {
        WeightFormat::Q8_0 => (272, 4),
        WeightFormat::Q5K => (176, 6),
        _ => (144, 6),
    };
    ring * (8 * cb + 256 + 64)
}

/// Q8_0 weights of at least this many rows take `gemv_q8_0_mma` one token at a time.
pub const GEMV_MMA_MIN_ROWS: usize = 16384;
/// Q8_0 weights of at most this many columns (and fewer rows than [`GEMV_MMA_MIN_ROWS`]) take
/// `gemv_q8_0_async` one token at a time.
pub const GEMV_ASYNC_MAX_Q8_COLS: usize = 1024;

/// Dynamic shared memory of `gemv_q8_0_mma` (`GMQ_SMEM`): a chunk per warp (16 rows of 272
/// bytes, 256 codes, 8 scales) and the 16 x 64 step operands of a pass.
const GMQ_SMEM_BYTES: u32 = 8 * (16 * 272 + 256 + 32) + 16 * 64 * 8;
/// Dynamic shared memory of `gemv_q6_k_mma` (`GmqShape<FMT_Q6_K>`): the same with each row's
/// 16-byte aligned window of 224 bytes around its 210-byte super-block, at a stride of 240.
const GMQ_Q6_SMEM_BYTES: u32 = 8 * (16 * 240 + 256 + 32) + 16 * 64 * 8;

/// Launches `kernel` (a GEMV or tiled GEMM, as [`select`] chose) over `n_tiles` row tiles
/// (dense when `rows` is `None`).
#[allow(clippy::too_many_arguments)]
fn launch_selected(
    dev: &Device,
    kernel: GemmKernel,
    x: &GpuTensor<f32>,
    act: Option<ActRef<'_>>,
    w: &GpuMatrix,
    rows: Option<&RoutedRows>,
    n_tiles: usize,
    n_rows: usize,
    y: &mut GpuTensor<f32>,
) -> Result<()> {
    let name = kernel
        .entry(w.format)
        .expect("select() returns kernels with an entry for the format");
    let gemm = kernel.is_gemm();
    let tiles = rows.map(|r| r.part(if gemm { 3 } else { 4 }));
    let maps = rows.map(|r| (r.part(0), r.part(2)));
    if let (GemmKernel::Gemv { height }, Some(r)) = (kernel, rows) {
        debug_assert!(r.largest_group.min(GEMV_MAX_ROWS) <= height);
    }
    let (m_blocks, threads, smem) = kernel.geometry(w.format, w.rows as u32);
    let f = dev.function_with(Family::Gemm, name, |f| {
        if smem > 48 * 1024 {
            f.set_attribute(
                CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )?;
        }
        if gemm {
            // The whole unified cache as shared memory, so that two blocks fit on an SM (the
            // driver's default split left room for one).
            f.set_attribute(
                CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
                100,
            )?;
        }
        Ok(())
    })?;
    let (xq, xd, xa) = match act {
        Some(a) => (In::of(dev, a.codes), In::of(dev, a.d), In::of(dev, a.a)),
        None => (In::null(), In::null(), In::null()),
    };
    let (tiles, x_rows, y_rows) = match (&tiles, &maps) {
        (Some(t), Some((xr, yr))) => (In::of(dev, t), In::of(dev, xr), In::of(dev, yr)),
        _ => (In::null(), In::null(), In::null()),
    };
    let mut args = ProductArgs {
        y: Out::of(dev, y.slice_mut()),
        x: In::of(dev, x.slice()),
        xq,
        xd,
        xa,
        W: In::of(dev, &w.data),
        tiles,
        x_rows,
        y_rows,
        n_rows: n_rows as u32,
        M: w.rows as u32,
        K: w.cols as u32,
        row_bytes: w.row_bytes as u64,
        tile0: 0,
    };
    for tile0 in (0..n_tiles).step_by(MAX_GRID_Y) {
        let count = (n_tiles - tile0).min(MAX_GRID_Y) as u32;
        args.tile0 = tile0 as u32;
        let cfg = geometry((m_blocks, count, 1), (threads, 1, 1), smem);
        // SAFETY: x (or its quantization) is [nx, k] and y is [ny, m] with k, m and the routed
        // rows' indices checked against w, x and y by the callers; tiles cover routed rows
        // 0..n_rows of one expert each (< w.experts), at most the kernel's height per tile;
        // output rows are distinct, so no two threads write one element. The cp.async kernel
        // copies 16-byte pieces: its weight rows (34 * K / 32 bytes, K % 256 == 0) and
        // activation rows start 16-byte aligned in allocations that are, and its shared
        // memory is the size set on the function above; the cp.async GEMV's rows (K % 256 ==
        // 0) and activation rows start 16-byte aligned the same way. The Q6_K GEMM copies the
        // aligned 16-byte window around each 210-byte super-block: its first piece starts at
        // or after the allocation's (256-byte aligned) start, its last ends at most 14 bytes
        // past the matrix, inside the MATRIX_TAIL bytes upload adds.
        unsafe { dev.launch_kernel(&f, cfg, &args) }?;
    }
    Ok(())
}

/// Dense product with plain f32 tensors through the v1 kernel: `y[n, m] = dot(x[n, :],
/// w[m, :])`, `x: [n, k]`, `w: [m, k]`, `y: [n, m]`.
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
    check_extents(OP, m, k)?;
    if n == 0 || m == 0 {
        return Ok(());
    }
    launch_v1_dense(dev, x, w.slice(), y, n, m, k)
}

/// Expert-grouped product with plain f32 tensors through the v1 kernel: `x: [nx, k]`,
/// `w: [n_experts, m, k]`, `y: [ny, m]`.
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
    check_extents(OP, m, k)?;
    if rows.is_empty() || m == 0 {
        return Ok(());
    }
    launch_v1_grouped(dev, x, w.slice(), rows, y, m, k)
}

#[cfg(test)]
mod tests {
    /// The trial `kvalue_perm`'s words (cuda/gemm.cu) decode to the grids of src/quant, code by
    /// code, through the byte permute its kernels use (`__byte_perm(lo, hi, c & 7)`: byte
    /// `c & 7` of `hi:lo`, then the words `c & 8` picks, the low byte read as an int8).
    #[test]
    fn kvalue_perm_words_are_the_grids() {
        use crate::quant::{KVALUES_IQ4NL, KVALUES_MXFP4};
        let src = crate::device::Family::Gemm.program();
        let words = |name: &str| -> [u32; 4] {
            let line = src
                .lines()
                .find(|l| l.starts_with(&format!("#define {name} ")))
                .unwrap_or_else(|| panic!("{name} in cuda/gemm.cu"));
            let w: Vec<u32> = line[name.len() + 9..]
                .split(',')
                .map(|t| {
                    let t = t.trim().trim_end_matches('u');
                    u32::from_str_radix(t.trim_start_matches("0x"), 16).expect("a hex word")
                })
                .collect();
            w.try_into().expect("four words")
        };
        let perm = |lo: u32, hi: u32, sel: u32| {
            ((u64::from(hi) << 32 | u64::from(lo)) >> (8 * sel)) as u32
        };
        for (name, grid) in [
            ("BX_KV_IQ4NL_WORDS", KVALUES_IQ4NL),
            ("BX_KV_MXFP4_WORDS", KVALUES_MXFP4),
        ] {
            let [w0, w1, w2, w3] = words(name);
            for (c, &want) in grid.iter().enumerate() {
                let c = c as u32;
                let (lo, hi) = (perm(w0, w1, c & 7), perm(w2, w3, c & 7));
                let got = (if c & 8 != 0 { hi } else { lo } & 0xff) as u8 as i8;
                assert_eq!(got, want, "{name}, code {c}");
            }
        }
    }

    use super::*;

    /// Every product kernel the gemm family compiles is one [`crate::kernels::gemm::select`]
    /// can return (issue 29: no kernel that nothing reaches): the `.entry` names of its PTX,
    /// less the routing kernels and the grouped v1 (launched beside its dense twin), against
    /// the entries of every choice over the formats, the row counts on each side of the
    /// tensor-core GEMV's threshold, K of whole 256-wide chunks or not, narrow or wide, and
    /// tile heights 1 to 64. Needs libnvrtc, as `every_family_compiles_under_nvrtc`.
    #[test]
    fn every_gemm_entry_is_selectable() {
        if !crate::device::tests::nvrtc_present("the gemm entries were not listed") {
            return;
        }
        let ptx = crate::device::tests::family_ptx(crate::device::Family::Gemm, false)
            .expect("the gemm family compiles");
        let compiled: std::collections::BTreeSet<String> = ptx
            .split(".entry ")
            .skip(1)
            .map(|e| e.chars().take_while(|c| *c != '(').collect::<String>())
            .filter(|n| !n.starts_with("route_") && n != "gemm_grouped_f32_v1")
            .collect();
        let mut reached = std::collections::BTreeSet::new();
        for kernel in [
            MatmulKernel::Auto,
            MatmulKernel::V1,
            MatmulKernel::Gemv,
            MatmulKernel::Gemm,
            MatmulKernel::GemvMma,
            MatmulKernel::Plain,
        ] {
            for format in WeightFormat::ALL {
                for rows in [64, GEMV_MMA_MIN_ROWS] {
                    for cols in [96, 512, 2048] {
                        for tile in [1, 2, 3, 5, 8, 9, 64] {
                            if let Ok(k) = select(kernel, format, rows, cols, tile) {
                                reached.insert(k.entry(format).expect("select checks").to_string());
                            }
                        }
                    }
                }
            }
        }
        let unreached: Vec<_> = compiled.difference(&reached).collect();
        let missing: Vec<_> = reached.difference(&compiled).collect();
        assert!(
            unreached.is_empty() && missing.is_empty(),
            "compiled but never selected: {unreached:?}; selected but not compiled: {missing:?}"
        );
    }
}
