//! Causal grouped-query attention over an f32 KV cache (kernels `cuda/attention.cu`,
//! reference [`crate::reference::attention`]).
//!
//! One order for every kernel: the keys of a query are cut into chunks of
//! [`CHUNK`] positions, each chunk's softmax partial is formed in a fixed order and the chunks
//! are folded left to right. Prefill (the tile kernel) and decode (the split kernels) differ in
//! how the work is spread over blocks, never in an operation.

use cudarc::driver::sys::CUfunction_attribute_enum;

use super::rope::Positions;
use super::{as_u32, dims, geometry, row_chunks};
use crate::device::{Device, Family};
use crate::error::{check_shape, Error, Result};
use crate::kernels::quantize::{GpuActPair, GpuActQ8};
use crate::launch::args::attention::{CombineArgs, KvWriteArgs, SplitArgs, TileArgs, V1Args};
use crate::launch::{In, Out};
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
        let cfg = geometry((width.div_ceil(128), nrows, 1), (128, 1, 1), 0);
        let args = KvWriteArgs {
            kc: Out::of(dev, cache.k.slice_mut()),
            vc: Out::of(dev, cache.v.slice_mut()),
            k: In::of(dev, k.slice()),
            v: In::of(dev, v.slice()),
            pos: In::of(dev, pos.tensor().slice()),
            n_kv: n_kv32,
            hd: hd32,
            cap: cap32,
            row0,
        };
        // SAFETY: k, v are [n, n_kv, hd], the caches [n_kv, cap, hd], every position < cap
        // (checked above); the grid covers rows row0..row0 + nrows <= n.
        unsafe { dev.launch_kernel(&f, cfg, &args) }?;
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
    /// The split decode kernels for at most [`SPLIT_MAX_QUERIES`] queries ([`AttentionKernel::Split2`],
    /// measured the faster), the tile kernel otherwise (v1 where the head dim is not a multiple
    /// of 4 or exceeds 256).
    #[default]
    Auto,
    /// [`AttentionKernel::Auto`]'s choice with the v2 kernels: [`AttentionKernel::Split2`]
    /// for decode batches, [`AttentionKernel::Tile2`] above (`Session::set_attention_v2`).
    Auto2,
    /// v1: one block per (query, head) walking the chunks in order; any head dim. The
    /// baseline and second witness.
    V1,
    /// Prefill: one block per 64 queries of a head, K and V chunks shared through shared
    /// memory. Head dims up to 256, multiples of 4.
    Tile,
    /// Prefill v2: [`AttentionKernel::Tile`] with K and V copied asynchronously while the
    /// other product runs, and two heads of a kv group a block (even groups, head dims up to
    /// 128) sharing each chunk. Measured no faster (H200: 0.163 / 1.595 / 19.3 ms against
    /// 0.164 / 1.551 / 20.1 at 512 / 2048 / 8192 queries: the kernel is bound by its shared-memory
    /// reads and FMA issue, not by the loads it overlaps), so `Auto` keeps v1; the paged cache
    /// reads through it.
    Tile2,
    /// Decode: one block per (query, kv head, chunk) writing chunk partials, then one launch
    /// folding them in chunk order.
    Split,
    /// Decode v2: [`AttentionKernel::Split`] with K and V copied asynchronously (V lands while
    /// the scores run; half the registers, so more blocks an SM) where the head dim is a
    /// multiple of 4 (v1's kernel otherwise). `Auto` picks it: on the H200 11.7 / 27.1 / 78.0 us
    /// against Split's 12.0 / 27.6 / 92.7 at contexts 512 / 8192 / 32768 (32 heads over 4 of 128).
    Split2,
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

/// Shared memory of a tile kernel for padded head dim `h` (mirrors `TileSmem` and
/// `Tile2Smem` in CUDA). v1: Q and K transposed `[h][68]`, V `[64][h + 4]` in K's place, E
/// `[64][68]` and four row vectors of 64. v2 with `hpb` heads a block: K and V `[64][h]`, and
/// per head Q `[64][h]`, E `[64][68]` and the four row vectors.
fn tile_smem_bytes(h: usize, hpb: usize, v2: bool) -> usize {
    if v2 {
        return (2 * 64 * h + hpb * (64 * h + 64 * 68 + 4 * 64)) * 4;
    }
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
fn split_kernel(g: usize, hd: usize, v2: bool) -> (&'static str, usize) {
    if hd % 4 == 0 {
        let gp = g.next_multiple_of(4);
        (
            if v2 {
                "attention_split_async"
            } else {
                "attention_split_tiled"
            },
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
    split_kernel(g, hd, false).1
}

/// A tile kernel for head dim `hd` and `group` query heads per kv head: its name, padded head
/// dim and heads per block. v1 takes one head a block; v2 two heads of one kv group (sharing
/// the block's K and V chunks) where the group is even and the head dim at most 128.
fn tile_name(hd: usize, group: usize, v2: bool) -> Option<(&'static str, usize, usize)> {
    if hd % 4 != 0 {
        return None;
    }
    let pair = group % 2 == 0;
    match (hd, v2) {
        (0..=64, false) => Some(("attention_tile_64", 64, 1)),
        (65..=128, false) => Some(("attention_tile_128", 128, 1)),
        (129..=256, false) => Some(("attention_tile_256", 256, 1)),
        (0..=64, true) if pair => Some(("attention_tile2_64x2", 64, 2)),
        (0..=64, true) => Some(("attention_tile2_64", 64, 1)),
        (65..=128, true) if pair => Some(("attention_tile2_128x2", 128, 2)),
        (65..=128, true) => Some(("attention_tile2_128", 128, 1)),
        (129..=256, true) => Some(("attention_tile2_256", 256, 1)),
        _ => None,
    }
}

/// [`tile_name`]'s v2 kernel reading a paged cache (`attention_tile2_*_paged`).
fn tile_name_paged(hd: usize, group: usize) -> Option<(&'static str, usize, usize)> {
    let (name, h, hpb) = tile_name(hd, group, true)?;
    let paged = match name {
        "attention_tile2_64x2" => "attention_tile2_64x2_paged",
        "attention_tile2_64" => "attention_tile2_64_paged",
        "attention_tile2_128x2" => "attention_tile2_128x2_paged",
        "attention_tile2_128" => "attention_tile2_128_paged",
        _ => "attention_tile2_256_paged",
    };
    Some((paged, h, hpb))
}

/// [`attention`] into `out.x(): [nq, n_heads * hd]` with its Q8 quantization beside it (the
/// output product's input, read through [`crate::kernels::gemm::matmul_shared_pair`]): the
/// bits of [`attention`] then [`crate::kernels::quantize::quantize_act`]. Decode batches (the
/// split kernels) with `hd % 32 == 0` quantize in the combine launch (`attention_combine_q8`);
/// anything else runs the two in turn.
pub fn attention_pair(
    dev: &Device,
    q: &GpuTensor<f32>,
    cache: &LayerCache,
    pos: &Positions,
    out: &mut GpuActPair,
) -> Result<()> {
    attention_pair_with(dev, AttentionKernel::Auto, q, cache, pos, out)
}

/// [`attention_pair`] with `kernel` [`AttentionKernel::Auto`] or [`AttentionKernel::Auto2`]
/// choosing (the same bits either way).
pub fn attention_pair_with(
    dev: &Device,
    kernel: AttentionKernel,
    q: &GpuTensor<f32>,
    cache: &LayerCache,
    pos: &Positions,
    out: &mut GpuActPair,
) -> Result<()> {
    const OP: &str = "attention_pair";
    let v2 = match kernel {
        AttentionKernel::Auto => false,
        AttentionKernel::Auto2 => true,
        k => {
            return Err(Error::invalid(
                OP,
                format!("the kernel is chosen by Auto or Auto2, not {k:?}"),
            ))
        }
    };
    let [nq, n_heads, hd] = dims(OP, "q", "[nq, n_heads, hd]", q.dims())?;
    check_shape(OP, "out", &[nq, n_heads * hd], &out.dims())?;
    let n_kv = cache.k.dims().first().copied().unwrap_or(0);
    let split = n_kv > 0 && n_heads % n_kv == 0 && hd % 32 == 0;
    let split = split.then(|| auto_kernel(nq, n_heads / n_kv, hd, v2));
    let flat = [nq, n_heads * hd];
    if let Some(k @ (AttentionKernel::Split | AttentionKernel::Split2)) = split {
        let (x, q8) = out.parts_mut();
        x.reshape(&[nq, n_heads, hd])?;
        let r = attention_into(dev, k, q, cache, pos, x, Some(q8));
        x.reshape(&flat)?;
        return r;
    }
    out.write_with(dev, |x| {
        x.reshape(&[nq, n_heads, hd])?;
        let r = attention_with(dev, kernel, q, cache, pos, x);
        x.reshape(&flat)?;
        r
    })
}

/// The kernel [`AttentionKernel::Auto`] picks for `nq` queries, `group` query heads per kv
/// head of `hd` dims.
fn auto_kernel(nq: usize, group: usize, hd: usize, v2: bool) -> AttentionKernel {
    if nq <= SPLIT_MAX_QUERIES && split_smem_bytes(group, hd) <= MAX_SMEM_BYTES {
        // Split2 for both: as fast as Split at contexts 512 and 8192 and 16% faster at 32768
        // (H200, benches/attention.rs, 2026-12-01), the same bits.
        let _ = v2;
        AttentionKernel::Split2
    } else if tile_name(hd, group, false).is_some() {
        [AttentionKernel::Tile, AttentionKernel::Tile2][usize::from(v2)]
    } else {
        AttentionKernel::V1
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
    attention_into(dev, kernel, q, cache, pos, out, None)
}

/// The sizes of an attention call, checked: `cache.k`, `cache.v: [n_kv, cap, hd]`, `q` and
/// `out: [nq, n_heads, hd]`, `pos: [nq]`, `n_heads` a multiple of `n_kv > 0`.
struct Shapes {
    n_kv: usize,
    cap: usize,
    hd: usize,
    nq: usize,
    n_heads: usize,
}

fn check_shapes(
    op: &'static str,
    q: &GpuTensor<f32>,
    cache: &LayerCache,
    pos: &Positions,
    out: &[usize],
) -> Result<Shapes> {
    let [n_kv, cap, hd] = dims(op, "cache.k", "[n_kv, cap, hd]", cache.k.dims())?;
    check_shape(op, "cache.v", &[n_kv, cap, hd], cache.v.dims())?;
    let [nq, n_heads, qhd] = dims(op, "q", "[nq, n_heads, hd]", q.dims())?;
    check_shape(op, "q", &[nq, n_heads, hd], &[nq, n_heads, qhd])?;
    check_shape(op, "out", &[nq, n_heads, hd], out)?;
    check_shape(op, "pos", &[nq], &[pos.len()])?;
    if n_kv == 0 || n_heads % n_kv != 0 {
        return Err(Error::invalid(
            op,
            format!("{n_heads} query heads over {n_kv} kv heads"),
        ));
    }
    Ok(Shapes {
        n_kv,
        cap,
        hd,
        nq,
        n_heads,
    })
}

/// [`attention_with`]; with `q8` (the split kernels only: [`attention_pair`] asks for it then
/// alone) the combine writes `out`'s quantization too.
fn attention_into(
    dev: &Device,
    kernel: AttentionKernel,
    q: &GpuTensor<f32>,
    cache: &LayerCache,
    pos: &Positions,
    out: &mut GpuTensor<f32>,
    q8: Option<&mut GpuActQ8>,
) -> Result<()> {
    const OP: &str = "attention";
    let Shapes {
        n_kv,
        cap,
        hd,
        nq,
        n_heads,
    } = check_shapes(OP, q, cache, pos, out.dims())?;
    pos.check(OP, cap)?;
    let n_chunks = pos.max() as usize / CHUNK + 1;
    let group = n_heads / n_kv;
    let split_fits = split_smem_bytes(group, hd) <= MAX_SMEM_BYTES;
    let kernel = match kernel {
        AttentionKernel::Auto => auto_kernel(nq, group, hd, false),
        AttentionKernel::Auto2 => auto_kernel(nq, group, hd, true),
        k => k,
    };
    let split = matches!(kernel, AttentionKernel::Split | AttentionKernel::Split2);
    if q8.is_some() && (!split || hd % 32 != 0) {
        return Err(Error::invalid(
            OP,
            "only the split kernels quantize their output, for head dims in multiples of 32",
        ));
    }
    match kernel {
        AttentionKernel::Tile | AttentionKernel::Tile2 if tile_name(hd, group, false).is_none() => {
            return Err(Error::invalid(
                OP,
                format!("the tile kernel takes head dims up to 256 in multiples of 4, not {hd}"),
            ))
        }
        AttentionKernel::Split | AttentionKernel::Split2 if !split_fits => {
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
    let a = Args::new(OP, n_heads, n_kv, hd, cap)?;
    match kernel {
        AttentionKernel::V1 | AttentionKernel::Auto | AttentionKernel::Auto2 => {
            launch_v1(dev, &a, q, cache, pos, out)
        }
        AttentionKernel::Tile => launch_tile(dev, &a, false, q, cache, pos, out, None),
        AttentionKernel::Tile2 => launch_tile(dev, &a, true, q, cache, pos, out, None),
        AttentionKernel::Split => {
            launch_split(dev, &a, false, n_chunks, q, cache, pos, out, q8, None)
        }
        AttentionKernel::Split2 => {
            launch_split(dev, &a, true, n_chunks, q, cache, pos, out, q8, None)
        }
    }
}

/// Where the queries of an [`attention_paged`] call find their keys in a paged cache
/// ([`crate::spec::paged`]: page `p` holds cache rows `64 p .. 64 p + 64`; chunk `c` of a
/// sequence, its positions `64 c ..`, is the page its block table names at `c`).
#[derive(Clone, Copy, Debug)]
pub enum PagedQueries<'a> {
    /// Each query its own block table: query `i`'s at `tables[i * stride .. (i + 1) * stride]`
    /// (decode rows of many sequences).
    Rows {
        /// `[nq, stride]` page indices.
        tables: &'a [u32],
        /// Entries per query.
        stride: usize,
    },
    /// Every query of one sequence: its block table (a prefill chunk).
    Sequence {
        /// Page indices, in position order.
        table: &'a [u32],
    },
}

/// [`attention`] over a paged cache: query `i` at position `pos[i]` of its sequence reads keys
/// `0..=pos[i]` of that sequence through its block table (`pages`), in the canonical order:
/// the bits of the same sequence in a cache of its own. `cache` is `[n_kv, n_pages * 64, hd]`;
/// every table entry is below `n_pages` and a table covers chunk `pos[i] / 64`. Decode rows
/// (any table layout) run the split kernels; more than [`SPLIT_MAX_QUERIES`] queries of one
/// sequence run the v2 tile kernel. Head dims in multiples of 4 (to 256). A bad table is an
/// error and nothing is written.
pub fn attention_paged(
    dev: &Device,
    q: &GpuTensor<f32>,
    cache: &LayerCache,
    pos: &Positions,
    pages: PagedQueries<'_>,
    out: &mut GpuTensor<f32>,
) -> Result<()> {
    const OP: &str = "attention_paged";
    let Shapes {
        n_kv,
        cap,
        hd,
        nq,
        n_heads,
    } = check_shapes(OP, q, cache, pos, out.dims())?;
    if cap % CHUNK != 0 || hd % 4 != 0 || hd > 256 {
        return Err(Error::invalid(
            OP,
            format!(
                "a paged cache holds whole pages of {CHUNK} rows and head dims in multiples \
                 of 4 up to 256 (cap {cap}, hd {hd})"
            ),
        ));
    }
    let n_pages = cap / CHUNK;
    let n_chunks = if nq == 0 {
        0
    } else {
        pos.max() as usize / CHUNK + 1
    };
    // Positions are a sequence's, not cache rows: the table maps them into the cache.
    let (host, stride, one_seq) = match pages {
        PagedQueries::Rows { tables, stride } => (tables, stride, false),
        PagedQueries::Sequence { table } => (table, 0, true),
    };
    let per_query = if one_seq { host.len() } else { stride };
    if (!one_seq && host.len() != nq * stride) || per_query < n_chunks {
        return Err(Error::invalid(
            OP,
            format!(
                "block tables of {per_query} pages for {nq} queries reaching chunk {} ({} \
                 entries given)",
                n_chunks.saturating_sub(1),
                host.len()
            ),
        ));
    }
    if let Some((i, &p)) = host
        .iter()
        .enumerate()
        .find(|(_, &p)| p as usize >= n_pages)
    {
        return Err(Error::IndexOutOfRange {
            op: OP,
            what: "pages",
            position: i,
            index: u64::from(p),
            bound: n_pages as u64,
        });
    }
    check_paged_kernels(
        OP,
        n_heads,
        n_kv,
        hd,
        n_chunks,
        one_seq && nq > SPLIT_MAX_QUERIES,
    )?;
    if nq == 0 || n_heads == 0 {
        return Ok(());
    }
    let table = GpuTensor::from_host(dev, host, &[host.len()])?;
    launch_paged(
        dev,
        OP,
        q,
        cache,
        pos,
        &table,
        (!one_seq).then_some(stride),
        out,
    )
}

/// [`attention_paged`]'s decode rows with their block tables already on the device
/// (`tables: [nq * stride]`, query `i`'s at `i * stride`), as a captured batched step reads
/// them: the same kernels and bits. The tables are not read on the host: every entry the
/// kernels read (chunks `0..=pos[i] / 64` of query `i`) must be below the cache's page count,
/// which the caller checked when it wrote them (a batched session's tables come from its
/// page bookkeeping).
pub(crate) fn attention_paged_rows(
    dev: &Device,
    q: &GpuTensor<f32>,
    cache: &LayerCache,
    pos: &Positions,
    tables: &GpuTensor<u32>,
    stride: usize,
    out: &mut GpuTensor<f32>,
) -> Result<()> {
    const OP: &str = "attention_paged_rows";
    let Shapes { cap, hd, nq, .. } = check_shapes(OP, q, cache, pos, out.dims())?;
    let n_chunks = if nq == 0 {
        0
    } else {
        pos.max() as usize / CHUNK + 1
    };
    if cap % CHUNK != 0
        || hd % 4 != 0
        || hd > 256
        || stride < n_chunks
        || tables.len() != nq * stride
    {
        return Err(Error::invalid(
            OP,
            format!(
                "device block tables of {} entries for {nq} queries, {stride} each, reaching \
                 chunk {} (cap {cap}, hd {hd})",
                tables.len(),
                n_chunks.saturating_sub(1)
            ),
        ));
    }
    launch_paged(dev, OP, q, cache, pos, tables, Some(stride), out)
}

/// Fails unless the paged kernels take this shape: the split kernel's (or, `tile`, the v2
/// tile kernel's) shared memory for `n_heads / n_kv` query heads of `hd` dims, and the
/// combine's for `n_chunks` chunks.
fn check_paged_kernels(
    op: &'static str,
    n_heads: usize,
    n_kv: usize,
    hd: usize,
    n_chunks: usize,
    tile: bool,
) -> Result<()> {
    let group = n_heads / n_kv.max(1);
    if !tile && split_smem_bytes(group, hd) > MAX_SMEM_BYTES
        || tile && tile_name_paged(hd, group).is_none()
        || combine_smem_bytes(n_chunks) > MAX_SMEM_BYTES
    {
        return Err(Error::invalid(
            op,
            format!("{group} query heads per kv head of {hd} dims over {n_chunks} chunks"),
        ));
    }
    Ok(())
}

/// The paged launches over a device block table: `stride` entries per query (decode rows,
/// the split kernels), or, `None`, one table for every query of one sequence (the v2 tile
/// kernel past [`SPLIT_MAX_QUERIES`] queries, the split kernels up to it).
#[allow(clippy::too_many_arguments)]
fn launch_paged(
    dev: &Device,
    op: &'static str,
    q: &GpuTensor<f32>,
    cache: &LayerCache,
    pos: &Positions,
    table: &GpuTensor<u32>,
    stride: Option<usize>,
    out: &mut GpuTensor<f32>,
) -> Result<()> {
    let Shapes {
        n_kv,
        cap,
        hd,
        nq,
        n_heads,
    } = check_shapes(op, q, cache, pos, out.dims())?;
    let n_chunks = if nq == 0 {
        0
    } else {
        pos.max() as usize / CHUNK + 1
    };
    let tile = stride.is_none() && nq > SPLIT_MAX_QUERIES;
    check_paged_kernels(op, n_heads, n_kv, hd, n_chunks, tile)?;
    if nq == 0 || n_heads == 0 {
        return Ok(());
    }
    let a = Args::new(op, n_heads, n_kv, hd, cap)?;
    if tile {
        launch_tile(dev, &a, true, q, cache, pos, out, Some(table))
    } else {
        let stride32 = as_u32(op, "stride", stride.unwrap_or(0))?;
        launch_split(
            dev,
            &a,
            true,
            n_chunks,
            q,
            cache,
            pos,
            out,
            None,
            Some((table, stride32)),
        )
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

impl Args {
    /// The launches' scalars, each checked to fit a `u32`; the scale `1 / sqrt(hd)`.
    fn new(op: &'static str, n_heads: usize, n_kv: usize, hd: usize, cap: usize) -> Result<Self> {
        Ok(Args {
            n_heads: as_u32(op, "n_heads", n_heads)?,
            n_kv: as_u32(op, "n_kv", n_kv)?,
            hd: as_u32(op, "hd", hd)?,
            cap: as_u32(op, "cap", cap)?,
            scale: crate::reference::attention::scale(hd),
        })
    }
}

/// Dims of one `attention_combine` block (`CMB_DIMS`).
const COMBINE_DIMS: usize = 32;

/// Shared memory of `attention_combine`: a batch of 128 chunks' partials of 32 dims, m, l, M,
/// a and b per chunk, and 4 warp maxima.
fn combine_smem_bytes(n_chunks: usize) -> usize {
    (128 * COMBINE_DIMS + 5 * n_chunks + 4) * 4
}

/// The kernel, with dynamic shared memory up to [`MAX_SMEM_BYTES`] and, for the tile kernels,
/// the whole unified cache as shared memory (room for two blocks per SM; three of
/// `attention_split_async` and `attention_split_paged`), set once at load.
fn function_with_smem(dev: &Device, name: &'static str) -> Result<cudarc::driver::CudaFunction> {
    dev.function_with(Family::Attention, name, |f| {
        if name.starts_with("attention_tile")
            || name == "attention_split_async"
            || name == "attention_split_paged"
        {
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
        let cfg = geometry((a.n_heads, nrows, 1), (128, 1, 1), smem as u32);
        let qv = q.slice().slice(row0 as usize * nh * hd..);
        let pv = pos.tensor().slice().slice(row0 as usize..);
        let mut ov = out.slice_mut().slice_mut(row0 as usize * nh * hd..);
        let args = V1Args {
            out: Out::of(dev, &mut ov),
            q: In::of(dev, &qv),
            kc: In::of(dev, cache.k.slice()),
            vc: In::of(dev, cache.v.slice()),
            qpos: In::of(dev, &pv),
            n_heads: a.n_heads,
            n_kv: a.n_kv,
            hd: a.hd,
            cap: a.cap,
            scale: a.scale,
        };
        // SAFETY: q and out are [nq, n_heads, hd] (the views start at this chunk's first
        // query), the caches [n_kv, cap, hd] with n_heads a multiple of n_kv, every position
        // < cap; the dynamic shared memory holds hd floats.
        unsafe { dev.launch_kernel(&f, cfg, &args) }?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn launch_tile(
    dev: &Device,
    a: &Args,
    v2: bool,
    q: &GpuTensor<f32>,
    cache: &LayerCache,
    pos: &Positions,
    out: &mut GpuTensor<f32>,
    pages: Option<&GpuTensor<u32>>,
) -> Result<()> {
    const OP: &str = "attention";
    let group = (a.n_heads / a.n_kv) as usize;
    let (name, h, hpb) = match pages {
        Some(_) => tile_name_paged(a.hd as usize, group),
        None => tile_name(a.hd as usize, group, v2),
    }
    .expect("checked by the caller");
    let smem = tile_smem_bytes(h, hpb, v2);
    let f = function_with_smem(dev, name)?;
    let nq = pos.len();
    let tiles = as_u32(OP, "query tiles", nq.div_ceil(64))?;
    let nq32 = as_u32(OP, "nq", nq)?;
    // hpb divides the group, so a block's heads share one kv head.
    let cfg = geometry(
        (tiles, a.n_heads / hpb as u32, 1),
        (256 * hpb as u32, 1, 1),
        smem as u32,
    );
    let args = TileArgs {
        out: Out::of(dev, out.slice_mut()),
        q: In::of(dev, q.slice()),
        kc: In::of(dev, cache.k.slice()),
        vc: In::of(dev, cache.v.slice()),
        qpos: In::of(dev, pos.tensor().slice()),
        nq: nq32,
        n_heads: a.n_heads,
        n_kv: a.n_kv,
        hd: a.hd,
        cap: a.cap,
        scale: a.scale,
        pages: pages.map_or(In::null(), |p| In::of(dev, p.slice())),
    };
    // SAFETY: q and out are [nq, n_heads, hd], the caches [n_kv, cap, hd] with n_heads a
    // multiple of n_kv and hd <= h a multiple of 4 (float4 rows); paged, the pages hold an
    // entry below cap / 64 for every chunk up to the largest position; every position < cap (cache
    // rows past cap are not read; v2's copies of rows past cap or dims past hd are zero fills
    // that read nothing); the grid's y covers the heads hpb at a time, hpb dividing the group;
    // the dynamic shared memory is TileSmem<h>'s (v1) or Tile2Smem<h, hpb>'s (v2).
    unsafe { dev.launch_kernel(&f, cfg, &args) }?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn launch_split(
    dev: &Device,
    a: &Args,
    v2: bool,
    n_chunks: usize,
    q: &GpuTensor<f32>,
    cache: &LayerCache,
    pos: &Positions,
    out: &mut GpuTensor<f32>,
    mut q8: Option<&mut GpuActQ8>,
    pages: Option<(&GpuTensor<u32>, u32)>,
) -> Result<()> {
    const OP: &str = "attention";
    let (nh, hd) = (a.n_heads as usize, a.hd as usize);
    let nq = pos.len();
    let group = nh / a.n_kv as usize;
    // SAFETY: the split kernel writes (m, l, o) of every chunk c <= pos[i] / 64 of every
    // (query, head), and the combine kernel reads exactly those.
    let mut part = unsafe { GpuTensor::<f32>::uninit(dev, &[nq, nh, n_chunks, hd + 2]) }?;
    let (split_name, smem) = split_kernel(group, hd, v2);
    let split_name = if pages.is_some() {
        "attention_split_paged"
    } else {
        split_name
    };
    let split = function_with_smem(dev, split_name)?;
    let csmem = combine_smem_bytes(n_chunks);
    let combine = function_with_smem(
        dev,
        match q8 {
            Some(_) => "attention_combine_q8",
            None => "attention_combine",
        },
    )?;
    let nc32 = as_u32(OP, "chunks", n_chunks)?;
    // A combine block per (query, head, 32 dims).
    let combine_blocks = as_u32(OP, "combine blocks", hd.div_ceil(COMBINE_DIMS) * nh)?;
    for (row0, nrows) in row_chunks(nq) {
        let cfg = geometry((nc32, a.n_kv, nrows), (256, 1, 1), smem as u32);
        let args = SplitArgs {
            part: Out::of(dev, part.slice_mut()),
            q: In::of(dev, q.slice()),
            kc: In::of(dev, cache.k.slice()),
            vc: In::of(dev, cache.v.slice()),
            qpos: In::of(dev, pos.tensor().slice()),
            n_heads: a.n_heads,
            n_kv: a.n_kv,
            hd: a.hd,
            cap: a.cap,
            scale: a.scale,
            n_chunks: nc32,
            row0,
            pages: pages.map_or(In::null(), |(p, _)| In::of(dev, p.slice())),
            page_stride: pages.map_or(0, |(_, stride)| stride),
        };
        // SAFETY: q is [nq, n_heads, hd], part [nq, n_heads, n_chunks, hd + 2] with n_chunks
        // covering the largest position, the caches [n_kv, cap, hd] with every position < cap;
        // grid z covers queries row0..row0 + nrows <= nq; shared memory as split_kernel says
        // (the tiled kernel reads q, K and V as float4: hd % 4 == 0, every row 16-byte aligned).
        unsafe { dev.launch_kernel(&split, cfg, &args) }?;
        let cfg = geometry((combine_blocks, nrows, 1), (128, 1, 1), csmem as u32);
        let (codes, d, qa) = match q8.as_deref_mut() {
            Some(q) => (
                Out::of(dev, q.codes.slice_mut()),
                Out::of(dev, q.d.slice_mut()),
                Out::of(dev, q.a.slice_mut()),
            ),
            None => (Out::null(), Out::null(), Out::null()),
        };
        let args = CombineArgs {
            out: Out::of(dev, out.slice_mut()),
            codes,
            d,
            a: qa,
            part: In::of(dev, part.slice()),
            qpos: In::of(dev, pos.tensor().slice()),
            n_heads: a.n_heads,
            hd: a.hd,
            n_chunks: nc32,
            row0,
        };
        // SAFETY: out is [nq, n_heads, hd]; part holds the chunks 0..=pos[i] / 64 of every
        // query of this row chunk (written by the launch above on the same stream); shared
        // memory as combine_smem_bytes says; a block per (head, 32 dims), lanes past hd idle;
        // with q8 (hd % 32 == 0, the caller's check), its codes [nq, n_heads * hd] and d, a
        // [nq, n_heads * hd / 32], one 32-block per combine block.
        unsafe { dev.launch_kernel(&combine, cfg, &args) }?;
    }
    Ok(())
}
