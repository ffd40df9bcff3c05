//! `quantize_q8_32`: activation quantization for the quantized matrix products (kernel
//! `cuda/quantize.cu`, reference [`crate::reference::quantize`]).

use cudarc::driver::{LaunchConfig, PushKernelArg};

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
    const OP: &str = "quantize_act";
    let [n, k] = dims(OP, "x", "[n, k]", x.dims())?;
    if k % 32 != 0 {
        return Err(Error::invalid(
            OP,
            format!("k = {k} is not a multiple of 32"),
        ));
    }
    // SAFETY: the kernel below writes every code, scale and sum (one warp per block).
    let mut out = unsafe {
        GpuActQ8 {
            codes: GpuTensor::uninit(dev, &[n, k])?,
            d: GpuTensor::uninit(dev, &[n, k / 32])?,
            a: GpuTensor::uninit(dev, &[n, k / 32])?,
        }
    };
    let blocks = (n * k / 32) as u64;
    if blocks == 0 {
        return Ok(out);
    }
    let f = dev.function(Family::Quantize, "quantize_q8_32")?;
    let cfg = LaunchConfig {
        grid_dim: (blocks.div_ceil(8).min(16_384) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut launch = dev.stream().launch_builder(&f);
    launch
        .arg(x.slice())
        .arg(out.codes.slice_mut())
        .arg(out.d.slice_mut())
        .arg(out.a.slice_mut())
        .arg(&blocks);
    // SAFETY: x holds n * k = 32 * blocks floats, codes as many bytes, d and a `blocks` floats
    // each (allocated above); the grid-stride loop stays below `blocks`.
    unsafe { launch.launch(cfg) }?;
    Ok(out)
}
