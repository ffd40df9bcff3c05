//! Elementwise activations (kernels `cuda/activation.cu`, references
//! [`crate::reference::activation`]).

use super::grid_stride;
use crate::device::{Device, Family};
use crate::error::{check_shape, Error, Result};
use crate::kernels::quantize::GpuActPair;
use crate::launch::args::activation::{
    GateHeadsArgs, HalvesArgs, HalvesQ8Args, SigmoidArgs, SwigluArgs,
};
use crate::launch::{In, Out};
use crate::tensor::GpuTensor;

/// SwiGLU, `out = silu(gate) * up` elementwise ([`crate::reference::activation::swiglu`]).
/// `gate`, `up` and `out` must have one shape.
pub fn swiglu(
    dev: &Device,
    gate: &GpuTensor<f32>,
    up: &GpuTensor<f32>,
    out: &mut GpuTensor<f32>,
) -> Result<()> {
    const OP: &str = "swiglu";
    check_shape(OP, "up", gate.dims(), up.dims())?;
    check_shape(OP, "out", gate.dims(), out.dims())?;
    let n = gate.len() as u64;
    if n == 0 {
        return Ok(());
    }
    let f = dev.function(Family::Activation, "swiglu_f32")?;
    let args = SwigluArgs {
        out: Out::of(dev, out.slice_mut()),
        gate: In::of(dev, gate.slice()),
        up: In::of(dev, up.slice()),
        n,
    };
    // SAFETY: gate, up and out hold n elements each (same shape, checked above); the kernel's
    // grid-stride loop stays below n.
    unsafe { dev.launch_kernel(&f, grid_stride(n as usize), &args) }?;
    Ok(())
}

/// SwiGLU of the two halves of each row: `gu: [rows, 2f]` holds a row's gate outputs then its
/// up outputs (one product of the stacked `[gate; up]` rows), `out: [rows, f]`,
/// `out[r, i] = silu(gu[r, i]) * gu[r, f + i]`: the bits of [`swiglu`] on the halves.
pub fn swiglu_halves(dev: &Device, gu: &GpuTensor<f32>, out: &mut GpuTensor<f32>) -> Result<()> {
    const OP: &str = "swiglu_halves";
    let [rows, f] = crate::kernels::dims(OP, "out", "[rows, f]", out.dims())?;
    check_shape(OP, "gu", &[rows, 2 * f], gu.dims())?;
    let f32_ = crate::kernels::as_u32(OP, "f", f)?;
    let rows64 = rows as u64;
    if rows == 0 || f == 0 {
        return Ok(());
    }
    let func = dev.function(Family::Activation, "swiglu_halves_f32")?;
    let args = HalvesArgs {
        out: Out::of(dev, out.slice_mut()),
        gu: In::of(dev, gu.slice()),
        rows: rows64,
        f: f32_,
    };
    // SAFETY: gu is [rows, 2f] and out [rows, f] (checked above); the grid-stride loop stays
    // below rows * f.
    unsafe { dev.launch_kernel(&func, grid_stride(rows * f), &args) }?;
    Ok(())
}

/// [`swiglu_halves`] into `out.x(): [rows, f]` with its quantization written beside it in
/// the same launch (`f % 32 == 0`): the pair the down product reads through
/// [`crate::kernels::gemm::matmul_shared_pair`], the bits of `swiglu_halves` then
/// [`crate::kernels::quantize::quantize_act`], a launch fewer.
pub fn swiglu_halves_q8(dev: &Device, gu: &GpuTensor<f32>, out: &mut GpuActPair) -> Result<()> {
    const OP: &str = "swiglu_halves_q8";
    let [rows, f] = out.dims();
    check_shape(OP, "gu", &[rows, 2 * f], gu.dims())?;
    if f % 32 != 0 {
        // GpuActPair's constructors hold k % 32 == 0; kept as a check, not an assumption.
        return Err(Error::invalid(
            OP,
            format!("f = {f} is not a multiple of 32"),
        ));
    }
    let f32_ = crate::kernels::as_u32(OP, "f", f)?;
    let rows64 = rows as u64;
    if rows == 0 || f == 0 {
        return Ok(());
    }
    let func = dev.function(Family::Activation, "swiglu_halves_q8_f32")?;
    let (x, q) = out.parts_mut();
    let args = HalvesQ8Args {
        out: Out::of(dev, x.slice_mut()),
        codes: Out::of(dev, q.codes.slice_mut()),
        d: Out::of(dev, q.d.slice_mut()),
        a: Out::of(dev, q.a.slice_mut()),
        gu: In::of(dev, gu.slice()),
        rows: rows64,
        f: f32_,
    };
    // SAFETY: gu is [rows, 2f] (checked above), the pair [rows, f] with codes [rows, f] and
    // d, a [rows, f / 32]; a warp per 32-block, the grid-stride loop stays below rows * f / 32
    // blocks.
    unsafe { dev.launch_kernel(&func, grid_stride(rows * f), &args) }?;
    Ok(())
}

/// `out = 1 / (1 + exp(-x))` elementwise ([`crate::reference::activation::sigmoid`]).
/// `x` and `out` must have one shape.
pub fn sigmoid(dev: &Device, x: &GpuTensor<f32>, out: &mut GpuTensor<f32>) -> Result<()> {
    const OP: &str = "sigmoid";
    check_shape(OP, "out", x.dims(), out.dims())?;
    let n = x.len() as u64;
    if n == 0 {
        return Ok(());
    }
    let f = dev.function(Family::Activation, "sigmoid_f32")?;
    let args = SigmoidArgs {
        out: Out::of(dev, out.slice_mut()),
        x: In::of(dev, x.slice()),
        n,
    };
    // SAFETY: x and out hold n elements each (checked above); the grid-stride loop stays
    // below n.
    unsafe { dev.launch_kernel(&f, grid_stride(n as usize), &args) }?;
    Ok(())
}

/// The output gate of a gated attention layer, in place: `a: [n, nh, hd]`,
/// `a[r, h, i] *= sigmoid(qg[r, offset + h * head_stride + i])` with `qg: [n, width]` (the query
/// product, whose heads hold `[q | gate]`: `offset = hd`, `head_stride = 2 hd`)
/// ([`crate::reference::activation::gate_heads_sigmoid`]). A gate past a row of `qg` is an
/// error and nothing is written.
pub fn gate_heads_sigmoid(
    dev: &Device,
    a: &mut GpuTensor<f32>,
    qg: &GpuTensor<f32>,
    offset: usize,
    head_stride: usize,
) -> Result<()> {
    const OP: &str = "gate_heads_sigmoid";
    let [n, nh, hd] = crate::kernels::dims(OP, "a", "[n, nh, hd]", a.dims())?;
    let [qn, width] = crate::kernels::dims(OP, "qg", "[n, width]", qg.dims())?;
    check_shape(OP, "qg", &[n, width], &[qn, width])?;
    if nh > 0 && hd > 0 && offset + (nh - 1) * head_stride + hd > width {
        return Err(crate::error::Error::invalid(
            OP,
            format!(
                "the gate of head {} ends at {} past the row width {width}",
                nh - 1,
                offset + (nh - 1) * head_stride + hd
            ),
        ));
    }
    let (nh32, hd32) = (
        crate::kernels::as_u32(OP, "nh", nh)?,
        crate::kernels::as_u32(OP, "hd", hd)?,
    );
    let (n64, w64, off64, hs64) = (n as u64, width as u64, offset as u64, head_stride as u64);
    let total = a.len();
    if total == 0 {
        return Ok(());
    }
    let f = dev.function(Family::Activation, "gate_heads_sigmoid_f32")?;
    let args = GateHeadsArgs {
        a: Out::of(dev, a.slice_mut()),
        qg: In::of(dev, qg.slice()),
        n: n64,
        nh: nh32,
        hd: hd32,
        width: w64,
        offset: off64,
        head_stride: hs64,
    };
    // SAFETY: a is [n, nh, hd] and qg [n, width] with every gate index below width (checked
    // above); the grid-stride loop stays below n * nh * hd; a and qg are two tensors.
    unsafe { dev.launch_kernel(&f, grid_stride(total), &args) }?;
    Ok(())
}
