//! Causal grouped-query attention over an f32 KV cache (kernels `cuda/attention.cu`,
//! reference [`crate::reference::attention`]).

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::rope::Positions;
use super::{as_u32, dims, row_chunks};
use crate::device::{Device, Family};
use crate::error::{check_shape, Error, Result};
use crate::tensor::GpuTensor;

const THREADS: u32 = 128;
/// Most shared memory the scores may take (the H100's per-block maximum, less the reductions).
const MAX_SCORE_BYTES: usize = 220 * 1024;

/// One layer's KV cache: `k, v: [n_kv, cap, hd]`.
#[derive(Debug)]
pub struct LayerCache {
    /// Keys.
    pub k: GpuTensor<f32>,
    /// Values.
    pub v: GpuTensor<f32>,
}

impl LayerCache {
    /// A zeroed cache of `cap` positions.
    pub fn new(dev: &Device, n_kv: usize, cap: usize, hd: usize) -> Result<Self> {
        Ok(LayerCache {
            k: GpuTensor::zeros(dev, &[n_kv, cap, hd])?,
            v: GpuTensor::zeros(dev, &[n_kv, cap, hd])?,
        })
    }
}

/// Writes `k, v: [n, n_kv, hd]` into cache rows `pos[i]` of every kv head.
pub fn kv_write(
    dev: &Device,
    cache: &mut LayerCache,
    k: &GpuTensor<f32>,
    v: &GpuTensor<f32>,
    pos: &Positions,
) -> Result<()> {
    const OP: &str = "kv_write";
    let [n_kv, cap, hd] = dims(OP, "cache.k", "[n_kv, cap, hd]", cache.k.dims())?;
    check_shape(OP, "cache.v", &[n_kv, cap, hd], cache.v.dims())?;
    let n = pos.len();
    check_shape(OP, "k", &[n, n_kv, hd], k.dims())?;
    check_shape(OP, "v", &[n, n_kv, hd], v.dims())?;
    pos.check(OP, cap)?;
    let width = as_u32(OP, "n_kv * hd", n_kv * hd)?;
    let (n_kv32, hd32, cap32) = (n_kv as u32, hd as u32, as_u32(OP, "cap", cap)?);
    if n == 0 || width == 0 {
        return Ok(());
    }
    let f = dev.function(Family::Attention, "kv_write_f32")?;
    for (row0, nrows) in row_chunks(n) {
        let cfg = LaunchConfig {
            grid_dim: (width.div_ceil(128), nrows, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = dev.stream().launch_builder(&f);
        launch
            .arg(cache.k.slice_mut())
            .arg(cache.v.slice_mut())
            .arg(k.slice())
            .arg(v.slice())
            .arg(pos.tensor().slice())
            .arg(&n_kv32)
            .arg(&hd32)
            .arg(&cap32)
            .arg(&row0);
        // SAFETY: k, v are [n, n_kv, hd], the caches [n_kv, cap, hd], every position < cap
        // (checked above); the grid covers rows row0..row0 + nrows <= n.
        unsafe { launch.launch(cfg) }?;
    }
    Ok(())
}

/// Attention of queries `q: [nq, n_heads, hd]`, query `i` at position `pos[i]` seeing cache
/// rows `0..=pos[i]`, into `out: [nq, n_heads, hd]`. `n_heads` must be a multiple of the
/// cache's `n_kv`. The order is [`crate::reference::attention::attend`]'s. Runs v2.
pub fn attention(
    dev: &Device,
    q: &GpuTensor<f32>,
    cache: &LayerCache,
    pos: &Positions,
    out: &mut GpuTensor<f32>,
) -> Result<()> {
    attention_version(dev, 2, q, cache, pos, out)
}

/// [`attention`] with the kernel version chosen by the caller: 1 (128 threads per query and
/// head) or 2 (512 threads). Every version gives the same bits.
pub fn attention_version(
    dev: &Device,
    version: u32,
    q: &GpuTensor<f32>,
    cache: &LayerCache,
    pos: &Positions,
    out: &mut GpuTensor<f32>,
) -> Result<()> {
    const OP: &str = "attention";
    let (name, threads) = match version {
        1 => ("attention_f32", THREADS),
        2 => ("attention_f32_v2", 512),
        v => return Err(Error::invalid(OP, format!("no version {v} (1 or 2)"))),
    };
    let [n_kv, cap, hd] = dims(OP, "cache.k", "[n_kv, cap, hd]", cache.k.dims())?;
    let [nq, n_heads, qhd] = dims(OP, "q", "[nq, n_heads, hd]", q.dims())?;
    check_shape(OP, "q", &[nq, n_heads, hd], &[nq, n_heads, qhd])?;
    check_shape(OP, "out", &[nq, n_heads, hd], out.dims())?;
    check_shape(OP, "pos", &[nq], &[pos.len()])?;
    if n_kv == 0 || n_heads % n_kv != 0 {
        return Err(Error::invalid(
            OP,
            format!("{n_heads} query heads over {n_kv} kv heads"),
        ));
    }
    pos.check(OP, cap)?;
    let span = pos.max() as usize + 1;
    // Scores rounded up and padded by 4 floats (the compiler may read them 4 at a time past
    // the last key; the values are unused, the read must stay inside the allocation), then
    // v2's 4 * hd partial outputs.
    let smem = (span.next_multiple_of(4) + 4 + 4 * hd) * 4;
    if smem > MAX_SCORE_BYTES {
        return Err(Error::invalid(
            OP,
            format!(
                "context {span} exceeds what attention v1 holds ({})",
                MAX_SCORE_BYTES / 4
            ),
        ));
    }
    if nq == 0 || n_heads == 0 {
        return Ok(());
    }
    let f = dev.function(Family::Attention, name)?;
    if smem > 48 * 1024 {
        f.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )?;
    }
    let (nh32, nkv32, hd32, cap32) = (n_heads as u32, n_kv as u32, hd as u32, cap as u32);
    let scale = crate::reference::attention::scale(hd);
    for (row0, nrows) in row_chunks(nq) {
        let cfg = LaunchConfig {
            grid_dim: (nh32, nrows, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let qv = q.slice().slice(row0 as usize * n_heads * hd..);
        let pv = pos.tensor().slice().slice(row0 as usize..);
        let mut ov = out.slice_mut().slice_mut(row0 as usize * n_heads * hd..);
        let mut launch = dev.stream().launch_builder(&f);
        launch
            .arg(&mut ov)
            .arg(&qv)
            .arg(cache.k.slice())
            .arg(cache.v.slice())
            .arg(&pv)
            .arg(&nh32)
            .arg(&nkv32)
            .arg(&hd32)
            .arg(&cap32)
            .arg(&scale);
        // SAFETY: q and out are [nq, n_heads, hd] (the views start at this chunk's first
        // query), the caches [n_kv, cap, hd] with n_heads a multiple of n_kv, every position
        // < cap, and the scores of the longest query fit the dynamic shared memory.
        unsafe { launch.launch(cfg) }?;
    }
    Ok(())
}
