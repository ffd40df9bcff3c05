//! `delta_net_scan`, `delta_net_gate` (kernels `cuda/delta_net.cu`, reference
//! [`crate::reference::delta_net`]): the recurrent steps of the Gated DeltaNet mixer on the
//! device, and the state a sequence carries between calls.

use cudarc::driver::LaunchConfig;

use super::{as_u32, dims};
use crate::device::{Device, Family};
use crate::error::{check_shape, Error, Result};
use crate::reference::delta_net::{DeltaNetConfig, DeltaNetState, DeltaNetWeights};
use crate::tensor::GpuTensor;

/// Head dims the scan kernel takes (a column of the state in the registers of 4 threads, one
/// 32-block each; 4 S threads a block).
pub const MAX_HEAD_DIM: usize = 128;

/// The per-mixer constants the scan reads: the convolution's taps `[conv_dim, Kc]`, `dt_bias`
/// and `ssm_a` (`[Hv]`).
pub struct GpuDeltaNetConsts {
    cfg: DeltaNetConfig,
    conv: GpuTensor<f32>,
    dt_bias: GpuTensor<f32>,
    ssm_a: GpuTensor<f32>,
}

impl GpuDeltaNetConsts {
    /// Uploads `w`'s constants (the projections go through the GEMM wrappers).
    pub fn upload(dev: &Device, w: &DeltaNetWeights) -> Result<Self> {
        let c = &w.cfg;
        c.validate()?;
        if c.head_dim > MAX_HEAD_DIM || 4 * c.head_dim < 9 {
            return Err(Error::invalid(
                "GpuDeltaNetConsts::upload",
                format!(
                    "head dim {} (the scan takes 3 to {MAX_HEAD_DIM})",
                    c.head_dim
                ),
            ));
        }
        Ok(GpuDeltaNetConsts {
            cfg: c.clone(),
            conv: GpuTensor::from_host(dev, &w.conv, &[c.conv_dim(), c.conv_kernel])?,
            dt_bias: GpuTensor::from_host(dev, &w.dt_bias, &[c.v_heads])?,
            ssm_a: GpuTensor::from_host(dev, &w.ssm_a, &[c.v_heads])?,
        })
    }
}

/// A sequence's recurrent state on the device: the convolution window, the scan's second
/// window (it reads one and writes the other: several blocks read a key head's channels; the
/// new window is then copied back, so that a captured decode step reads and writes the same
/// buffers on every replay) and the `[Hv, S, S]` matrices.
pub struct GpuDeltaNetState {
    cfg: DeltaNetConfig,
    conv: GpuTensor<f32>,
    conv_next: GpuTensor<f32>,
    m: GpuTensor<f32>,
}

impl GpuDeltaNetState {
    /// The state before the first token (zeros).
    pub fn new(dev: &Device, cfg: &DeltaNetConfig) -> Result<Self> {
        cfg.validate()?;
        let (kc1, cd, s) = (cfg.conv_kernel - 1, cfg.conv_dim(), cfg.head_dim);
        let rows = kc1.max(1);
        Ok(GpuDeltaNetState {
            cfg: cfg.clone(),
            conv: GpuTensor::zeros(dev, &[rows, cd])?,
            conv_next: GpuTensor::zeros(dev, &[rows, cd])?,
            m: GpuTensor::zeros(dev, &[cfg.v_heads, s, s])?,
        })
    }

    /// Back to the state before the first token (zeros), on the device's stream.
    pub fn clear(&mut self, dev: &Device) -> Result<()> {
        dev.stream().memset_zeros(self.conv.slice_mut())?;
        dev.stream().memset_zeros(self.m.slice_mut())?;
        Ok(())
    }

    /// The state on the host, as the CPU reference holds it.
    pub fn to_host(&self) -> Result<DeltaNetState> {
        let cfg = &self.cfg;
        let mut conv = self.conv.to_host()?;
        conv.truncate((cfg.conv_kernel - 1) * cfg.conv_dim());
        Ok(DeltaNetState {
            conv,
            m: self.m.to_host()?,
        })
    }
}

/// Steps 2 to 5 of the mixer over `n` tokens in order ([`crate::reference::delta_net::scan_cpu`]'s
/// bits): `mixed: [n, conv_dim]`, `b, a: [n, Hv]` (the projections) into `o: [n, Hv, S]`, the
/// state updated. A bad shape is an error and nothing is written.
#[allow(clippy::too_many_arguments)]
pub fn delta_net_scan(
    dev: &Device,
    consts: &GpuDeltaNetConsts,
    state: &mut GpuDeltaNetState,
    mixed: &GpuTensor<f32>,
    b: &GpuTensor<f32>,
    a: &GpuTensor<f32>,
    eps: f32,
    o: &mut GpuTensor<f32>,
) -> Result<()> {
    const OP: &str = "delta_net_scan";
    let c = &consts.cfg;
    let (s, hk, hv, kc, cd) = (
        c.head_dim,
        c.k_heads,
        c.v_heads,
        c.conv_kernel,
        c.conv_dim(),
    );
    let [n, mcd] = dims(OP, "mixed", "[n, conv_dim]", mixed.dims())?;
    check_shape(OP, "mixed", &[n, cd], &[n, mcd])?;
    check_shape(OP, "b", &[n, hv], b.dims())?;
    check_shape(OP, "a", &[n, hv], a.dims())?;
    check_shape(OP, "o", &[n, hv, s], o.dims())?;
    if state.cfg != *c {
        return Err(Error::invalid(
            OP,
            "the state was made for another mixer shape",
        ));
    }
    let n32 = as_u32(OP, "tokens", n)?;
    let (hk32, hv32) = (as_u32(OP, "k_heads", hk)?, as_u32(OP, "v_heads", hv)?);
    let (s32, kc32) = (as_u32(OP, "head_dim", s)?, as_u32(OP, "conv_kernel", kc)?);
    as_u32(OP, "conv_dim", cd)?;
    if n == 0 {
        return Ok(());
    }
    let f = dev.function(Family::DeltaNet, "delta_net_scan_f32")?;
    let cfg = LaunchConfig {
        grid_dim: (hv32, 1, 1),
        block_dim: (4 * s32, 1, 1),
        shared_mem_bytes: 0,
    };
    let (conv_in, conv_out) = (&state.conv, &mut state.conv_next);
    let mut launch = dev.launch_builder(&f);
    launch
        .arg(o.slice_mut())
        .arg(state.m.slice_mut())
        .arg(conv_out.slice_mut())
        .arg(mixed.slice())
        .arg(b.slice())
        .arg(a.slice())
        .arg(consts.conv.slice())
        .arg(conv_in.slice())
        .arg(consts.dt_bias.slice())
        .arg(consts.ssm_a.slice())
        .arg(&n32)
        .arg(&hk32)
        .arg(&hv32)
        .arg(&s32)
        .arg(&kc32)
        .arg(&eps);
    // SAFETY: shapes checked above: mixed [n, conv_dim], b and a [n, Hv], o [n, Hv, S], the
    // state [Hv, S, S] and two [max(Kc - 1, 1), conv_dim] windows (distinct tensors: the scan
    // reads one and writes the other), the constants uploaded for this config; one block per
    // value head of 4 S <= 512 threads, each head's matrix written by its block alone, each
    // window channel by one block.
    unsafe { launch.launch(cfg) }?;
    dev.stream()
        .memcpy_dtod(state.conv_next.slice(), state.conv.slice_mut())?;
    Ok(())
}

/// Step 6's gate: `out = normed * silu(z)` elementwise (the three of one shape).
pub fn delta_net_gate(
    dev: &Device,
    normed: &GpuTensor<f32>,
    z: &GpuTensor<f32>,
    out: &mut GpuTensor<f32>,
) -> Result<()> {
    const OP: &str = "delta_net_gate";
    check_shape(OP, "z", normed.dims(), z.dims())?;
    check_shape(OP, "out", normed.dims(), out.dims())?;
    let len = normed.len() as u64;
    if len == 0 {
        return Ok(());
    }
    let f = dev.function(Family::DeltaNet, "delta_net_gate_f32")?;
    let blocks = (normed.len().div_ceil(256)).clamp(1, 8192) as u32;
    let cfg = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut launch = dev.launch_builder(&f);
    launch
        .arg(out.slice_mut())
        .arg(normed.slice())
        .arg(z.slice())
        .arg(&len);
    // SAFETY: the three tensors hold len elements (one shape, checked above); the grid-stride
    // loop stays below len.
    unsafe { launch.launch(cfg) }?;
    Ok(())
}
