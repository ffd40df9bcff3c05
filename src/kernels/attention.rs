//! Causal grouped-query attention over an f32 KV cache (kernels `cuda/attention.cu`,
//! reference [`crate::reference::attention`]).
//!
//! One order for every kernel: the keys of a query are cut into chunks of
//! [`CHUNK`] positions, each chunk's softmax partial is formed in a fixed order and the chunks
//! are folded left to right. Prefill (the tile kernel) and decode (the split kernels) differ in
//! how the work is spread over blocks, never in an operation.

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::LaunchConfig;

use super::rope::Positions;
use super::{as_u32, dims, row_chunks};
use crate::device::{Device, Family};
use crate::error::{check_shape, Error, Result};
use crate::reference::attention::CHUNK;
use crate::tensor::GpuTensor;

/// Most dynamic shared memory a block may take (sm_90's opt-in maximum, less the kernels'
/// static shared memory).
const MAX_SMEM_BYTES: usize = 220 * 1024;

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
        let mut launch = dev.launch_builder(&f);
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

/// Queries per launch up to which [`AttentionKernel::Auto`] runs the split decode kernels
/// (one block per query, kv head and chunk); larger launches run the prefill tile kernel.
pub const SPLIT_MAX_QUERIES: usize = 16;

/// Which attention kernel runs. Every choice gives the same bits: the order is
/// [`crate::reference::attention::attend`]'s whichever runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttentionKernel {
    /// The split decode kernels for at most [`SPLIT_MAX_QUERIES`] queries, the tile kernel
    /// otherwise (v1 where the head dim is not a multiple of 4 or exceeds 256).
    #[default]
    Auto,
    /// v1: one block per (query, head) walking the chunks in order; any head dim. The
    /// baseline and second witness.
    V1,
    /// Prefill: one block per 64 queries of a head, K and V chunks shared through shared
    /// memory. Head dims up to 256, multiples of 4.
    Tile,
    /// Decode: one block per (query, kv head, chunk) writing chunk partials, then one launch
    /// folding them in chunk order.
    Split,
}

/// Attention of queries `q: [nq, n_heads, hd]`, query `i` at position `pos[i]` seeing cache
/// rows `0..=pos[i]`, into `out: [nq, n_heads, hd]`. `n_heads` must be a multiple of the
/// cache's `n_kv`. The order is [`crate::reference::attention::attend`]'s.
pub fn attention(
    dev: &Device,
    q: &GpuTensor<f32>,
    cache: &LayerCache,
    pos: &Positions,
    out: &mut GpuTensor<f32>,
) -> Result<()> {
    attention_with(dev, AttentionKernel::Auto, q, cache, pos, out)
}

/// Shared memory of the tile kernel for padded head dim `h` (mirrors `TileSmem` in CUDA).
fn tile_smem_bytes(h: usize) -> usize {
    let q = h * 68;
    let kv = q.max(64 * (h + 4));
    (q + kv + 64 * 68 + 4 * 64) * 4
}

/// Shared memory of the split kernel: q `[G][hd]`, K `[64][hd + 1]` (rounded up to 4 floats),
/// V `[64][hd]`, e `[G][64]`.
/// The split kernel for `g` query heads per kv head of `hd` dims and its shared memory:
/// `attention_split_tiled` for hd % 4 == 0 (q [Gp][hd] with Gp = g rounded up to 4, K [64][hd +
/// 4], V [64][hd], e [Gp][64]), `attention_split` otherwise (q [g][hd], K [64][hd + 1] rounded
/// up to 4 floats, V [64][hd], e [g][64]).
fn split_kernel(g: usize, hd: usize) -> (&'static str, usize) {
    if hd % 4 == 0 {
        let gp = g.next_multiple_of(4);
        (
            "attention_split_tiled",
            (gp * hd + 64 * (hd + 4) + 64 * hd + gp * 64) * 4,
        )
    } else {
        (
            "attention_split",
            (g * hd + (64 * (hd + 1)).next_multiple_of(4) + 64 * hd + g * 64) * 4,
        )
    }
}

fn split_smem_bytes(g: usize, hd: usize) -> usize {
    split_kernel(g, hd).1
}

fn tile_name(hd: usize) -> Option<(&'static str, usize)> {
    if hd % 4 != 0 {
        return None;
    }
    match hd {
        0..=64 => Some(("attention_tile_64", 64)),
        65..=128 => Some(("attention_tile_128", 128)),
        129..=256 => Some(("attention_tile_256", 256)),
        _ => None,
    }
}

/// [`attention`] with the kernel chosen by the caller.
pub fn attention_with(
    dev: &Device,
    kernel: AttentionKernel,
    q: &GpuTensor<f32>,
    cache: &LayerCache,
    pos: &Positions,
    out: &mut GpuTensor<f32>,
) -> Result<()> {
    const OP: &str = "attention";
    let [n_kv, cap, hd] = dims(OP, "cache.k", "[n_kv, cap, hd]", cache.k.dims())?;
    check_shape(OP, "cache.v", &[n_kv, cap, hd], cache.v.dims())?;
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
    let n_chunks = pos.max() as usize / CHUNK + 1;
    let group = n_heads / n_kv;
    let split_fits = split_smem_bytes(group, hd) <= MAX_SMEM_BYTES;
    let kernel = match kernel {
        AttentionKernel::Auto if nq <= SPLIT_MAX_QUERIES && split_fits => AttentionKernel::Split,
        AttentionKernel::Auto if tile_name(hd).is_some() => AttentionKernel::Tile,
        AttentionKernel::Auto => AttentionKernel::V1,
        k => k,
    };
    match kernel {
        AttentionKernel::Tile if tile_name(hd).is_none() => {
            return Err(Error::invalid(
                OP,
                format!("the tile kernel takes head dims up to 256 in multiples of 4, not {hd}"),
            ))
        }
        AttentionKernel::Split if !split_fits => {
            return Err(Error::invalid(
                OP,
                format!(
                    "the split kernel's shared memory ({} bytes for {group} heads of {hd}) \
                     exceeds {MAX_SMEM_BYTES}",
                    split_smem_bytes(group, hd)
                ),
            ))
        }
        _ => {}
    }
    // The fold's coefficients of the longest query (combine) and v1's running output.
    if combine_smem_bytes(n_chunks) > MAX_SMEM_BYTES || hd * 4 > MAX_SMEM_BYTES {
        return Err(Error::invalid(
            OP,
            format!(
                "context {} or head dim {hd} too large",
                pos.max() as usize + 1
            ),
        ));
    }
    if nq == 0 || n_heads == 0 || hd == 0 {
        return Ok(());
    }
    let a = Args {
        n_heads: as_u32(OP, "n_heads", n_heads)?,
        n_kv: as_u32(OP, "n_kv", n_kv)?,
        hd: as_u32(OP, "hd", hd)?,
        cap: as_u32(OP, "cap", cap)?,
        scale: crate::reference::attention::scale(hd),
    };
    match kernel {
        AttentionKernel::V1 | AttentionKernel::Auto => launch_v1(dev, &a, q, cache, pos, out),
        AttentionKernel::Tile => launch_tile(dev, &a, q, cache, pos, out),
        AttentionKernel::Split => launch_split(dev, &a, n_chunks, q, cache, pos, out),
    }
}

/// Checked scalar arguments shared by the launches.
struct Args {
    n_heads: u32,
    n_kv: u32,
    hd: u32,
    cap: u32,
    scale: f32,
}

/// Dims of one `attention_combine` block (`CMB_DIMS`).
const COMBINE_DIMS: usize = 32;

/// Shared memory of `attention_combine`: a batch of 128 chunks' partials of 32 dims, m, l, M,
/// a and b per chunk, and 4 warp maxima.
fn combine_smem_bytes(n_chunks: usize) -> usize {
    (128 * COMBINE_DIMS + 5 * n_chunks + 4) * 4
}

/// The kernel, with dynamic shared memory up to [`MAX_SMEM_BYTES`] and, for the tile kernels,
/// the whole unified cache as shared memory (room for two blocks per SM), set once at load.
fn function_with_smem(dev: &Device, name: &'static str) -> Result<cudarc::driver::CudaFunction> {
    dev.function_with(Family::Attention, name, |f| {
        if name.starts_with("attention_tile") {
            f.set_attribute(
                CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
                100,
            )?;
        }
        f.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            MAX_SMEM_BYTES as i32,
        )?;
        Ok(())
    })
}

fn launch_v1(
    dev: &Device,
    a: &Args,
    q: &GpuTensor<f32>,
    cache: &LayerCache,
    pos: &Positions,
    out: &mut GpuTensor<f32>,
) -> Result<()> {
    let (nh, hd) = (a.n_heads as usize, a.hd as usize);
    let smem = hd * 4;
    let f = function_with_smem(dev, "attention_f32")?;
    for (row0, nrows) in row_chunks(pos.len()) {
        let cfg = LaunchConfig {
            grid_dim: (a.n_heads, nrows, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let qv = q.slice().slice(row0 as usize * nh * hd..);
        let pv = pos.tensor().slice().slice(row0 as usize..);
        let mut ov = out.slice_mut().slice_mut(row0 as usize * nh * hd..);
        let mut launch = dev.launch_builder(&f);
        launch
            .arg(&mut ov)
            .arg(&qv)
            .arg(cache.k.slice())
            .arg(cache.v.slice())
            .arg(&pv)
            .arg(&a.n_heads)
            .arg(&a.n_kv)
            .arg(&a.hd)
            .arg(&a.cap)
            .arg(&a.scale);
        // SAFETY: q and out are [nq, n_heads, hd] (the views start at this chunk's first
        // query), the caches [n_kv, cap, hd] with n_heads a multiple of n_kv, every position
        // < cap; the dynamic shared memory holds hd floats.
        unsafe { launch.launch(cfg) }?;
    }
    Ok(())
}

fn launch_tile(
    dev: &Device,
    a: &Args,
    q: &GpuTensor<f32>,
    cache: &LayerCache,
    pos: &Positions,
    out: &mut GpuTensor<f32>,
) -> Result<()> {
    const OP: &str = "attention";
    let (name, h) = tile_name(a.hd as usize).expect("checked by attention_with");
    let smem = tile_smem_bytes(h);
    let f = function_with_smem(dev, name)?;
    let nq = pos.len();
    let tiles = as_u32(OP, "query tiles", nq.div_ceil(64))?;
    let nq32 = as_u32(OP, "nq", nq)?;
    let cfg = LaunchConfig {
        grid_dim: (tiles, a.n_heads, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let mut launch = dev.launch_builder(&f);
    launch
        .arg(out.slice_mut())
        .arg(q.slice())
        .arg(cache.k.slice())
        .arg(cache.v.slice())
        .arg(pos.tensor().slice())
        .arg(&nq32)
        .arg(&a.n_heads)
        .arg(&a.n_kv)
        .arg(&a.hd)
        .arg(&a.cap)
        .arg(&a.scale);
    // SAFETY: q and out are [nq, n_heads, hd], the caches [n_kv, cap, hd] with n_heads a
    // multiple of n_kv and hd <= h a multiple of 4 (float4 rows), every position < cap (cache
    // rows past cap are not read); the dynamic shared memory is TileSmem<h>'s.
    unsafe { launch.launch(cfg) }?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn launch_split(
    dev: &Device,
    a: &Args,
    n_chunks: usize,
    q: &GpuTensor<f32>,
    cache: &LayerCache,
    pos: &Positions,
    out: &mut GpuTensor<f32>,
) -> Result<()> {
    const OP: &str = "attention";
    let (nh, hd) = (a.n_heads as usize, a.hd as usize);
    let nq = pos.len();
    let group = nh / a.n_kv as usize;
    // SAFETY: the split kernel writes (m, l, o) of every chunk c <= pos[i] / 64 of every
    // (query, head), and the combine kernel reads exactly those.
    let mut part = unsafe { GpuTensor::<f32>::uninit(dev, &[nq, nh, n_chunks, hd + 2]) }?;
    let (split_name, smem) = split_kernel(group, hd);
    let split = function_with_smem(dev, split_name)?;
    let csmem = combine_smem_bytes(n_chunks);
    let combine = function_with_smem(dev, "attention_combine")?;
    let nc32 = as_u32(OP, "chunks", n_chunks)?;
    // A combine block per (query, head, 32 dims).
    let combine_blocks = as_u32(OP, "combine blocks", hd.div_ceil(COMBINE_DIMS) * nh)?;
    for (row0, nrows) in row_chunks(nq) {
        let cfg = LaunchConfig {
            grid_dim: (nc32, a.n_kv, nrows),
            block_dim: (256, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let mut launch = dev.launch_builder(&split);
        launch
            .arg(part.slice_mut())
            .arg(q.slice())
            .arg(cache.k.slice())
            .arg(cache.v.slice())
            .arg(pos.tensor().slice())
            .arg(&a.n_heads)
            .arg(&a.n_kv)
            .arg(&a.hd)
            .arg(&a.cap)
            .arg(&a.scale)
            .arg(&nc32)
            .arg(&row0);
        // SAFETY: q is [nq, n_heads, hd], part [nq, n_heads, n_chunks, hd + 2] with n_chunks
        // covering the largest position, the caches [n_kv, cap, hd] with every position < cap;
        // grid z covers queries row0..row0 + nrows <= nq; shared memory as split_kernel says
        // (the tiled kernel reads q, K and V as float4: hd % 4 == 0, every row 16-byte aligned).
        unsafe { launch.launch(cfg) }?;
        let cfg = LaunchConfig {
            grid_dim: (combine_blocks, nrows, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: csmem as u32,
        };
        let mut launch = dev.launch_builder(&combine);
        launch
            .arg(out.slice_mut())
            .arg(part.slice())
            .arg(pos.tensor().slice())
            .arg(&a.n_heads)
            .arg(&a.hd)
            .arg(&nc32)
            .arg(&row0);
        // SAFETY: out is [nq, n_heads, hd]; part holds the chunks 0..=pos[i] / 64 of every
        // query of this row chunk (written by the launch above on the same stream); shared
        // memory as combine_smem_bytes says; a block per (head, 32 dims), lanes past hd idle.
        unsafe { launch.launch(cfg) }?;
    }
    Ok(())
}
