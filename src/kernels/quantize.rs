//! `quantize_q8_32`: activation quantization for the quantized matrix products (kernel
//! `cuda/quantize.cu`, reference [`crate::reference::quantize`]).

use cudarc::driver::CudaSlice;

use super::{dims, geometry};
use crate::device::{Device, Family};
use crate::error::{Error, Result};
use crate::launch::args::quantize::QuantizeArgs;
use crate::launch::{In, Out};
use crate::tensor::GpuTensor;

/// Quantized activations on the device: `codes: [n, k]`, `d: [n, k / 32]` block scales,
/// `a: [n, k / 32]` = `d * Σ codes`.
#[derive(Debug)]
pub struct GpuActQ8 {
    /// `[n, k]` int8 codes.
    pub codes: GpuTensor<i8>,
    /// `[n, k / 32]` block scales.
    pub d: GpuTensor<f32>,
    /// `[n, k / 32]` `d * Σ codes`.
    pub a: GpuTensor<f32>,
}

impl GpuActQ8 {
    /// `[n, k]` buffers (`k % 32 == 0`, the caller's check) left unwritten.
    ///
    /// # Safety
    /// Nothing may read them before they are written.
    unsafe fn uninit(dev: &Device, n: usize, k: usize) -> Result<Self> {
        // SAFETY: the caller's contract (above).
        unsafe {
            Ok(GpuActQ8 {
                codes: GpuTensor::uninit(dev, &[n, k])?,
                d: GpuTensor::uninit(dev, &[n, k / 32])?,
                a: GpuTensor::uninit(dev, &[n, k / 32])?,
            })
        }
    }

    /// `[n, k]`.
    pub fn dims(&self) -> [usize; 2] {
        [self.codes.dims()[0], self.codes.dims()[1]]
    }
}

/// Activations `x: [n, k]` together with their quantization `q = quantize_act(x)`, the input
/// of the quantized matrix products ([`crate::kernels::gemm::matmul_shared_pair`]), so that a
/// product need not quantize `x` itself. The two are only ever written together (by
/// [`GpuActPair::quantize`] or by a kernel that writes both, such as
/// [`crate::kernels::norm::add_rmsnorm_q8`]), so they always agree.
#[derive(Debug)]
pub struct GpuActPair {
    x: GpuTensor<f32>,
    q: GpuActQ8,
}

impl GpuActPair {
    /// `[n, k]` buffers (`k % 32 == 0`), zeroed: the pair of an all-zero `x`.
    pub fn zeros(dev: &Device, n: usize, k: usize) -> Result<Self> {
        check_k("GpuActPair", k)?;
        Ok(GpuActPair {
            x: GpuTensor::zeros(dev, &[n, k])?,
            q: GpuActQ8 {
                codes: GpuTensor::zeros(dev, &[n, k])?,
                d: GpuTensor::zeros(dev, &[n, k / 32])?,
                a: GpuTensor::zeros(dev, &[n, k / 32])?,
            },
        })
    }

    /// `x` and its quantization (one launch of `quantize_q8_32`).
    pub fn quantize(dev: &Device, x: GpuTensor<f32>) -> Result<Self> {
        let q = quantize_act(dev, &x)?;
        Ok(GpuActPair { x, q })
    }

    /// `[n, k]`.
    pub fn dims(&self) -> [usize; 2] {
        self.q.dims()
    }

    /// The activations.
    pub fn x(&self) -> &GpuTensor<f32> {
        &self.x
    }

    /// Their quantization.
    pub fn q(&self) -> &GpuActQ8 {
        &self.q
    }

    /// `[n, k]` buffers left unwritten (`k % 32 == 0`, checked): the first use must write
    /// both, through [`GpuActPair::write_with`] or a kernel that writes both.
    ///
    /// # Safety
    /// Nothing may read the pair before it is written.
    pub(crate) unsafe fn uninit(dev: &Device, n: usize, k: usize) -> Result<Self> {
        check_k("GpuActPair", k)?;
        // SAFETY: the caller writes every element before reading any (above).
        unsafe {
            Ok(GpuActPair {
                x: GpuTensor::uninit(dev, &[n, k])?,
                q: GpuActQ8::uninit(dev, n, k)?,
            })
        }
    }

    /// Writes `x` with `f` (which must write all of it), then its quantization.
    pub(crate) fn write_with(
        &mut self,
        dev: &Device,
        f: impl FnOnce(&mut GpuTensor<f32>) -> Result<()>,
    ) -> Result<()> {
        f(&mut self.x)?;
        let q = &mut self.q;
        quantize_into(
            dev,
            &self.x,
            q.codes.slice_mut(),
            q.d.slice_mut(),
            q.a.slice_mut(),
        )
    }

    /// Both, for a kernel that writes both (the caller writes `q = quantize_act(x)`).
    pub(crate) fn parts_mut(&mut self) -> (&mut GpuTensor<f32>, &mut GpuActQ8) {
        (&mut self.x, &mut self.q)
    }
}

/// Quantizes `x: [n, k]` per block of 32 (`k % 32 == 0`), each row on its own; the rule is
/// [`crate::reference::quantize::quantize_block`]'s.
pub fn quantize_act(dev: &Device, x: &GpuTensor<f32>) -> Result<GpuActQ8> {
    let [n, k] = check(x)?;
    // SAFETY: quantize_into writes every code, scale and sum (one warp per block).
    let mut out = unsafe { GpuActQ8::uninit(dev, n, k) }?;
    quantize_into(
        dev,
        x,
        out.codes.slice_mut(),
        out.d.slice_mut(),
        out.a.slice_mut(),
    )?;
    Ok(out)
}

fn check(x: &GpuTensor<f32>) -> Result<[usize; 2]> {
    const OP: &str = "quantize_act";
    let [n, k] = dims(OP, "x", "[n, k]", x.dims())?;
    check_k(OP, k)?;
    Ok([n, k])
}

/// Activations are quantized in blocks of 32 along k.
fn check_k(op: &'static str, k: usize) -> Result<()> {
    if k % 32 != 0 {
        return Err(Error::invalid(
            op,
            format!("k = {k} is not a multiple of 32"),
        ));
    }
    Ok(())
}

/// Quantizes `x: [n, k]` into buffers of at least `n * k` codes and `n * k / 32` scalars.
pub(crate) fn quantize_into(
    dev: &Device,
    x: &GpuTensor<f32>,
    codes: &mut CudaSlice<i8>,
    d: &mut CudaSlice<f32>,
    a: &mut CudaSlice<f32>,
) -> Result<()> {
    let [n, k] = check(x)?;
    let blocks = n * k / 32;
    if codes.len() < n * k || d.len() < blocks || a.len() < blocks {
        return Err(Error::invalid("quantize_act", "output buffers too small"));
    }
    if blocks == 0 {
        return Ok(());
    }
    let blocks = blocks as u64;
    let f = dev.function(Family::Quantize, "quantize_q8_32")?;
    let cfg = geometry(
        (blocks.div_ceil(8).min(16_384) as u32, 1, 1),
        (256, 1, 1),
        0,
    );
    let args = QuantizeArgs {
        x: In::of(dev, x.slice()),
        codes: Out::of(dev, codes),
        d: Out::of(dev, d),
        a: Out::of(dev, a),
        n_blocks: blocks,
    };
    // SAFETY: x holds n * k = 32 * blocks floats; codes, d and a hold at least as many codes
    // and `blocks` scalars (checked above); the grid-stride loop stays below `blocks`.
    unsafe { dev.launch_kernel(&f, cfg, &args) }?;
    Ok(())
}
