//! `quantize_q8_32`: activation quantization for the quantized matrix products (kernel
//! `cuda/quantize.cu`, reference [`crate::reference::quantize`]).

use cudarc::driver::{CudaSlice, LaunchConfig};

use super::dims;
use crate::device::{Device, Family};
use crate::error::{Error, Result};
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
    /// `[n, k]`.
    pub fn dims(&self) -> [usize; 2] {
        [self.codes.dims()[0], self.codes.dims()[1]]
    }
}

/// Quantizes `x: [n, k]` per block of 32 (`k % 32 == 0`), each row on its own; the rule is
/// [`crate::reference::quantize::quantize_block`]'s.
pub fn quantize_act(dev: &Device, x: &GpuTensor<f32>) -> Result<GpuActQ8> {
    let [n, k] = check(x)?;
    // SAFETY: quantize_into writes every code, scale and sum (one warp per block).
    let mut out = unsafe {
        GpuActQ8 {
            codes: GpuTensor::uninit(dev, &[n, k])?,
            d: GpuTensor::uninit(dev, &[n, k / 32])?,
            a: GpuTensor::uninit(dev, &[n, k / 32])?,
        }
    };
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
    if k % 32 != 0 {
        return Err(Error::invalid(
            OP,
            format!("k = {k} is not a multiple of 32"),
        ));
    }
    Ok([n, k])
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
    let cfg = LaunchConfig {
        grid_dim: (blocks.div_ceil(8).min(16_384) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut launch = dev.launch_builder(&f);
    launch.arg(x.slice()).arg(codes).arg(d).arg(a).arg(&blocks);
    // SAFETY: x holds n * k = 32 * blocks floats; codes, d and a hold at least as many codes
    // and `blocks` scalars (checked above); the grid-stride loop stays below `blocks`.
    unsafe { launch.launch(cfg) }?;
    Ok(())
}
