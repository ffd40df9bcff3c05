//! FastScan attention over a 3- or 4-bit KV cache, and the f16-KV baseline (kernels
//! `cuda/fastscan.cu`, reference [`crate::reference::fastscan`], layout
//! [`crate::quant::fastscan`]).
//!
//! A query's result is a function of its position and the cache alone: [`fastscan_attention`]
//! with every query of a sequence (prefill) gives the bits of one call per query (decode).

use super::rope::Positions;
use super::{as_u32, dims, geometry, MAX_GRID_Y};
use crate::device::{Device, Family};
use crate::error::{check_shape, Error, Result};
use crate::launch::args::fastscan::{
    EncodeArgs, F16ScoresArgs, F16ValuesArgs, F16WriteArgs, FinishArgs, ScoresArgs, ValuesArgs,
};
use crate::launch::{In, Out};
use crate::quant::fastscan::{codebook, Codebook, FastScanSpec, TILE};
use crate::reference::fastscan::{f16_bits, ScoreMode, ValueMode, CHUNK};
use crate::tensor::GpuTensor;

const THREADS: u32 = 256;
/// Warps (position pairs) per block of the encoder.
const ENC_WARPS: usize = 8;
/// The most scratch one attention launch may use; longer batches of queries are split.
const MAX_SCRATCH_BYTES: usize = 256 << 20;

/// One layer's FastScan K and V caches on the device: `k, v: [n_kv, cache_bytes(cap)]` bytes
/// in the tile layout of [`crate::quant::fastscan`], positions `0..len` written by
/// [`FastScanCache::append`] (a session's caches are written by position instead and keep `len`
/// at 0).
#[derive(Debug)]
pub struct FastScanCache {
    spec: FastScanSpec,
    codebook: Codebook,
    n_kv: usize,
    cap: usize,
    len: usize,
    k: GpuTensor<u8>,
    v: GpuTensor<u8>,
    signs: GpuTensor<f32>,
    bounds: GpuTensor<f32>,
    centroids: GpuTensor<f32>,
}

impl FastScanCache {
    /// An empty cache of at least `cap` positions (rounded up to whole tiles of 32).
    pub fn new(dev: &Device, spec: FastScanSpec, n_kv: usize, cap: usize) -> Result<Self> {
        const OP: &str = "FastScanCache::new";
        if n_kv == 0 {
            return Err(Error::invalid(OP, "no kv heads"));
        }
        let cap = cap
            .checked_next_multiple_of(TILE)
            .ok_or_else(|| Error::invalid(OP, format!("capacity {cap}")))?;
        as_u32(OP, "capacity", cap)?;
        let bytes = spec.cache_bytes(cap);
        let cb = codebook(spec.d, spec.bits);
        Ok(FastScanCache {
            spec,
            n_kv,
            cap,
            len: 0,
            k: GpuTensor::zeros(dev, &[n_kv, bytes])?,
            v: GpuTensor::zeros(dev, &[n_kv, bytes])?,
            signs: GpuTensor::from_host(dev, &spec.signs(), &[spec.d])?,
            bounds: GpuTensor::from_host(dev, &cb.bounds, &[cb.bounds.len()])?,
            centroids: GpuTensor::from_host(dev, &cb.centroids, &[cb.centroids.len()])?,
            codebook: cb,
        })
    }

    /// The code.
    pub fn spec(&self) -> FastScanSpec {
        self.spec
    }

    /// The codebook.
    pub fn codebook(&self) -> &Codebook {
        &self.codebook
    }

    /// KV heads.
    pub fn n_kv(&self) -> usize {
        self.n_kv
    }

    /// Positions the cache holds.
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Positions written by [`FastScanCache::append`].
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of one kv head's K (or V) codes for positions `0..len`, whole tiles: what one
    /// query's attention reads of each.
    pub fn bytes_read(&self, len: usize) -> usize {
        self.spec.cache_bytes(len)
    }

    /// The K and V bytes, `[n_kv, cache_bytes(cap)]` each.
    pub fn to_host(&self) -> Result<(Vec<u8>, Vec<u8>)> {
        Ok((self.k.to_host()?, self.v.to_host()?))
    }

    /// Encodes `k, v: [n, n_kv, D]` into positions `len..len + n`.
    pub fn append(&mut self, dev: &Device, k: &GpuTensor<f32>, v: &GpuTensor<f32>) -> Result<()> {
        const OP: &str = "fastscan_encode";
        let d = self.spec.d;
        let [n, n_kv, kd] = dims(OP, "k", "[n, n_kv, D]", k.dims())?;
        check_shape(OP, "k", &[n, self.n_kv, d], &[n, n_kv, kd])?;
        check_shape(OP, "v", &[n, self.n_kv, d], v.dims())?;
        if self.len + n > self.cap {
            return Err(Error::invalid(
                OP,
                format!(
                    "{n} positions after {} exceed the capacity {}",
                    self.len, self.cap
                ),
            ));
        }
        if n == 0 {
            return Ok(());
        }
        let pos0 = Positions::new(dev, &[self.len as u32])?;
        let rows = Rows {
            absolute: false,
            row_stride: (n_kv * d) as u64,
            head_stride: d as u64,
        };
        self.encode(dev, k, v, &pos0, n, rows)?;
        self.len += n;
        Ok(())
    }

    /// The runner's write: codes the rows of positions `pos` from the step's staging rows
    /// `rows: [n_kv, cap', D]` (row `p` of each kv head holding position `p`,
    /// [`crate::kernels::norm::qkv_norm_rope`]'s cache layout). The positions must be
    /// contiguous, `pos[0] .. pos[0] + n` (a session's are): the kernel reads `pos[0]` on the
    /// device, so a captured step writes where it replays, and only the largest position is
    /// known here to check. It leaves `len` alone: a cache written this way is read by
    /// position ([`coded_attention`]).
    pub(crate) fn write_rows(
        &mut self,
        dev: &Device,
        rows: &super::attention::LayerCache,
        pos: &Positions,
    ) -> Result<()> {
        const OP: &str = "fastscan_encode";
        let d = self.spec.d;
        let [n_kv, cap, kd] = dims(OP, "rows.k", "[n_kv, cap, D]", rows.k.dims())?;
        check_shape(OP, "rows.k", &[self.n_kv, cap, d], &[n_kv, cap, kd])?;
        check_shape(OP, "rows.v", &[self.n_kv, cap, d], rows.v.dims())?;
        pos.check(OP, cap.min(self.cap))?;
        if pos.is_empty() {
            return Ok(());
        }
        let layout = Rows {
            absolute: true,
            row_stride: d as u64,
            head_stride: (cap * d) as u64,
        };
        self.encode(dev, &rows.k, &rows.v, pos, pos.len(), layout)
    }

    /// Launches the encoder for positions `pos[0]..pos[0] + n`, read from `k, v` as `rows`
    /// says; the caller checked that they fit.
    fn encode(
        &mut self,
        dev: &Device,
        k: &GpuTensor<f32>,
        v: &GpuTensor<f32>,
        pos: &Positions,
        n: usize,
        rows: Rows,
    ) -> Result<()> {
        const OP: &str = "fastscan_encode";
        if self.n_kv > MAX_GRID_Y {
            return Err(Error::invalid(OP, format!("{} kv heads", self.n_kv)));
        }
        let n32 = as_u32(OP, "n", n)?;
        let slots = encode_slots(n);
        let f = dev.function(Family::FastScan, "fastscan_encode")?;
        let cfg = geometry(
            (slots.div_ceil(ENC_WARPS) as u32, self.n_kv as u32, 1),
            (32 * ENC_WARPS as u32, 1, 1),
            0,
        );
        let nb = self.codebook.bounds.len() as u32;
        let (d32, tb32, hb) = (
            self.spec.d as u32,
            self.spec.tile_bytes() as u32,
            self.spec.cache_bytes(self.cap) as u64,
        );
        let kk = self.spec.inv_sqrt_d();
        for (cache, x) in [(&mut self.k, k), (&mut self.v, v)] {
            let args = EncodeArgs {
                cache: Out::of(dev, cache.slice_mut()),
                x: In::of(dev, x.slice()),
                pos: In::of(dev, pos.tensor().slice()),
                n: n32,
                absolute: u32::from(rows.absolute),
                row_stride: rows.row_stride,
                head_stride: rows.head_stride,
                signs: In::of(dev, self.signs.slice()),
                bounds: In::of(dev, self.bounds.slice()),
                nbounds: nb,
                D: d32,
                tile_bytes: tb32,
                head_bytes: hb,
                k: kk,
            };
            // SAFETY: x holds the rows of positions pos[0]..pos[0] + n <= cap of every kv head
            // where `rows` says (append: its own positions; write_rows: contiguous positions,
            // its callers' promise, whose largest is checked), D <= 256 (the shared rows);
            // the cache is [n_kv, cache_bytes(cap)] and the grid's slots cover every tile
            // those positions touch; signs [D], bounds [nb].
            unsafe { dev.launch_kernel(&f, cfg, &args) }?;
        }
        Ok(())
    }
}

/// The encoder's warps for `n >= 1` positions wherever they start: one per pair of positions
/// `(i, i + 16)` of every tile that `n` positions can touch (the kernel works out which from
/// the first position, read on the device, and the warps past them exit).
fn encode_slots(n: usize) -> usize {
    ((n + TILE - 2) / TILE + 1) * (TILE / 2)
}

/// Where [`FastScanCache::encode`] reads position `p`'s rows: at `p - pos[0]` (the new rows
/// alone) or at `p` (the runner's staging rows), each row of kv head `h` at `h * head_stride`
/// floats further.
#[derive(Clone, Copy)]
struct Rows {
    absolute: bool,
    row_stride: u64,
    head_stride: u64,
}

/// The f16-KV baseline's cache: `k, v: [n_kv, len, D]`, f16 bits.
#[derive(Debug)]
pub struct F16KvCache {
    n_kv: usize,
    len: usize,
    d: usize,
    k: GpuTensor<u16>,
    v: GpuTensor<u16>,
}

impl F16KvCache {
    /// Uploads `k, v: [n_kv, len, D]` rounded to f16 ([`f16_bits`]: nearest even, NaN as
    /// `0x7e00`).
    pub fn from_host(dev: &Device, k: &[f32], v: &[f32], n_kv: usize, d: usize) -> Result<Self> {
        const OP: &str = "F16KvCache::from_host";
        if n_kv == 0 || !crate::quant::fastscan::DIMS.contains(&d) {
            return Err(Error::invalid(OP, format!("{n_kv} kv heads of dim {d}")));
        }
        let len = k.len() / (n_kv * d);
        if k.len() % (n_kv * d) != 0 {
            return Err(Error::invalid(
                OP,
                format!("{} keys are not [n_kv, len, {d}]", k.len()),
            ));
        }
        check_shape(OP, "v", &[k.len()], &[v.len()])?;
        as_u32(OP, "len", len)?;
        let bits = |x: &[f32]| -> Vec<u16> { x.iter().map(|&f| f16_bits(f)).collect() };
        Ok(F16KvCache {
            n_kv,
            len,
            d,
            k: GpuTensor::from_host(dev, &bits(k), &[n_kv, len, d])?,
            v: GpuTensor::from_host(dev, &bits(v), &[n_kv, len, d])?,
        })
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The runner's cache: `cap` zeroed positions, each written by position
    /// ([`F16KvCache::write_rows`]) and read up to a query's position.
    pub(crate) fn zeros(dev: &Device, n_kv: usize, cap: usize, d: usize) -> Result<Self> {
        const OP: &str = "F16KvCache::zeros";
        if n_kv == 0 || !crate::quant::fastscan::DIMS.contains(&d) {
            return Err(Error::invalid(OP, format!("{n_kv} kv heads of dim {d}")));
        }
        as_u32(OP, "cap", cap)?;
        Ok(F16KvCache {
            n_kv,
            len: cap,
            d,
            k: GpuTensor::zeros(dev, &[n_kv, cap, d])?,
            v: GpuTensor::zeros(dev, &[n_kv, cap, d])?,
        })
    }

    /// Rounds the rows of positions `pos` (any order) from the step's staging rows `rows:
    /// [n_kv, cap, D]` (row `p` holding position `p`) into the same rows of the cache.
    pub(crate) fn write_rows(
        &mut self,
        dev: &Device,
        rows: &super::attention::LayerCache,
        pos: &Positions,
    ) -> Result<()> {
        const OP: &str = "f16kv_write";
        let (n_kv, cap, d) = (self.n_kv, self.len, self.d);
        check_shape(OP, "rows.k", &[n_kv, cap, d], rows.k.dims())?;
        check_shape(OP, "rows.v", &[n_kv, cap, d], rows.v.dims())?;
        pos.check(OP, cap)?;
        if pos.is_empty() {
            return Ok(());
        }
        let f = dev.function(Family::FastScan, "f16kv_write")?;
        let width = (n_kv * d) as u32;
        let ny = pos.len().min(MAX_GRID_Y) as u32;
        let cfg = geometry((width.div_ceil(THREADS), ny, 1), (THREADS, 1, 1), 0);
        let args = F16WriteArgs {
            kc: Out::of(dev, self.k.slice_mut()),
            vc: Out::of(dev, self.v.slice_mut()),
            k: In::of(dev, rows.k.slice()),
            v: In::of(dev, rows.v.slice()),
            pos: In::of(dev, pos.tensor().slice()),
            n: pos.len() as u32,
            n_kv: n_kv as u32,
            D: d as u32,
            cap: cap as u32,
        };
        // SAFETY: the staging rows and the cache are both [n_kv, cap, D] and every position is
        // below cap (checked above); the kernel strides over rows and columns.
        unsafe { dev.launch_kernel(&f, cfg, &args) }?;
        Ok(())
    }
}

/// Scratch for the attention kernels, grown on demand and reused across calls (decode calls
/// then allocate nothing).
#[derive(Debug, Default)]
pub struct AttentionWorkspace {
    buf: Option<GpuTensor<f32>>,
}

impl AttentionWorkspace {
    /// A view of at least `n` floats.
    fn get(&mut self, dev: &Device, n: usize) -> Result<&mut GpuTensor<f32>> {
        if self.buf.as_ref().is_none_or(|b| b.len() < n) {
            self.buf = None;
            self.buf = Some(GpuTensor::zeros(dev, &[n])?);
        }
        Ok(self.buf.as_mut().expect("allocated above"))
    }
}

/// Which cache an attention call reads.
enum Kv<'a> {
    Codes(&'a FastScanCache, ScoreMode, ValueMode),
    F16(&'a F16KvCache),
}

/// Attention of queries `q: [nq, n_heads, D]` (unrotated), query `i` at position `pos[i] <
/// cache.len()` seeing positions `0..=pos[i]`, into `out: [nq, n_heads, D]`; `n_heads` a
/// multiple of the cache's `n_kv`. Bits: [`crate::reference::fastscan::attend`].
#[allow(clippy::too_many_arguments)]
pub fn fastscan_attention(
    dev: &Device,
    q: &GpuTensor<f32>,
    cache: &FastScanCache,
    pos: &Positions,
    smode: ScoreMode,
    vmode: ValueMode,
    ws: &mut AttentionWorkspace,
    out: &mut GpuTensor<f32>,
) -> Result<()> {
    let kv = Kv::Codes(cache, smode, vmode);
    attention(dev, q, kv, cache.len, pos, ws, out)
}

/// The f16-KV baseline: the same attention over uncompressed keys and values. Bits:
/// [`crate::reference::fastscan::attend_f16`].
pub fn f16kv_attention(
    dev: &Device,
    q: &GpuTensor<f32>,
    cache: &F16KvCache,
    pos: &Positions,
    ws: &mut AttentionWorkspace,
    out: &mut GpuTensor<f32>,
) -> Result<()> {
    attention(dev, q, Kv::F16(cache), cache.len, pos, ws, out)
}

/// The runner's attention over a cache written by position ([`FastScanCache::write_rows`],
/// [`F16KvCache::write_rows`]): positions are bounded by the capacity, not by `len` (the
/// runner has written every position up to each query's). FastScan reads f32 tables and
/// values, the model reference's modes ([`crate::reference::model::KvMode`]).
pub(crate) fn coded_attention(
    dev: &Device,
    q: &GpuTensor<f32>,
    cache: CodedKvRef<'_>,
    pos: &Positions,
    ws: &mut AttentionWorkspace,
    out: &mut GpuTensor<f32>,
) -> Result<()> {
    let (kv, bound) = match cache {
        CodedKvRef::FastScan(c) => (Kv::Codes(c, ScoreMode::F32, ValueMode::F32), c.cap),
        CodedKvRef::F16(c) => (Kv::F16(c), c.len),
    };
    attention(dev, q, kv, bound, pos, ws, out)
}

/// A cache [`coded_attention`] reads.
#[derive(Clone, Copy)]
pub(crate) enum CodedKvRef<'a> {
    FastScan(&'a FastScanCache),
    F16(&'a F16KvCache),
}

/// Queries per launch and floats of scratch [`attention`] takes for `nq` queries of `n_heads`
/// heads of dim `d`, the furthest at position `span - 1` (more queries than one launch takes
/// run in batches that reuse the scratch).
fn scratch_floats(nq: usize, n_heads: usize, d: usize, span: usize) -> (usize, usize) {
    let nchunk = span.div_ceil(CHUNK);
    // Per query row: scores [span], chunk maxima and sums [nchunk] each, value partials
    // [nchunk, D].
    let per_query = n_heads * (span + nchunk * (2 + d));
    let batch = (MAX_SCRATCH_BYTES / 4 / per_query).clamp(1, MAX_GRID_Y);
    (batch, batch.min(nq) * per_query)
}

impl AttentionWorkspace {
    /// Grows the scratch to what `nq` queries of `n_heads` heads of dim `d` up to position
    /// `span - 1` take, so that such a call allocates nothing (a captured step must not).
    pub(crate) fn reserve(
        &mut self,
        dev: &Device,
        nq: usize,
        n_heads: usize,
        d: usize,
        span: usize,
    ) -> Result<()> {
        self.get(dev, scratch_floats(nq, n_heads, d, span).1)
            .map(|_| ())
    }
}

/// `bound`: the positions a query may read (the cache's `len`, or its capacity for the
/// runner's caches).
fn attention(
    dev: &Device,
    q: &GpuTensor<f32>,
    kv: Kv<'_>,
    bound: usize,
    pos: &Positions,
    ws: &mut AttentionWorkspace,
    out: &mut GpuTensor<f32>,
) -> Result<()> {
    let (op, d, n_kv) = match &kv {
        Kv::Codes(c, ..) => ("fastscan_attention", c.spec.d, c.n_kv),
        Kv::F16(c) => ("f16kv_attention", c.d, c.n_kv),
    };
    let [nq, n_heads, qd] = dims(op, "q", "[nq, n_heads, D]", q.dims())?;
    check_shape(op, "q", &[nq, n_heads, d], &[nq, n_heads, qd])?;
    check_shape(op, "out", &[nq, n_heads, d], out.dims())?;
    check_shape(op, "pos", &[nq], &[pos.len()])?;
    if n_heads == 0 || n_heads % n_kv != 0 || n_heads > MAX_GRID_Y {
        return Err(Error::invalid(
            op,
            format!("{n_heads} query heads over {n_kv} kv heads"),
        ));
    }
    // A cache shorter than a query's position.
    pos.check(op, bound)?;
    if nq == 0 {
        return Ok(());
    }
    let span = pos.max() as usize + 1;
    let nchunk = span.div_ceil(CHUNK);
    let (batch, floats) = scratch_floats(nq, n_heads, d, span);
    let scratch = ws.get(dev, floats)?;
    let fns = match &kv {
        Kv::Codes(..) => ["fastscan_scores", "fastscan_values"],
        Kv::F16(_) => ["f16kv_scores", "f16kv_values"],
    };
    let scores_fn = dev.function(Family::FastScan, fns[0])?;
    let values_fn = dev.function(Family::FastScan, fns[1])?;
    let finish_fn = dev.function(Family::FastScan, "fastscan_finish")?;
    let (h32, d32, span32, nch32) = (n_heads as u32, d as u32, span as u32, nchunk as u32);
    let nkv32 = n_kv as u32;
    let kscale = 1.0 / (d as f32).sqrt();
    for q0 in (0..nq).step_by(batch) {
        let nb = batch.min(nq - q0);
        let rows = nb * n_heads;
        let (mut s_v, mut rest) = scratch.slice_mut().split_at_mut(rows * span);
        let (mut cmax_v, mut rest) = rest.split_at_mut(rows * nchunk);
        let (mut esum_v, mut rest) = rest.split_at_mut(rows * nchunk);
        let mut vpart_v = rest.slice_mut(..rows * nchunk * d);
        let qv = q.slice().slice(q0 * n_heads * d..);
        let pv = pos.tensor().slice().slice(q0..);
        let mut ov = out.slice_mut().slice_mut(q0 * n_heads * d..);
        let cfg = geometry((nch32, h32, nb as u32), (THREADS, 1, 1), 0);
        match &kv {
            Kv::Codes(c, smode, vmode) => {
                let levels = c.spec.levels() as u32;
                let tb = c.spec.tile_bytes() as u32;
                let hb = c.spec.cache_bytes(c.cap) as u64;
                let sm = u32::from(*smode == ScoreMode::F32);
                let vm = u32::from(*vmode == ValueMode::Int8);
                let args = ScoresArgs {
                    s: Out::of(dev, &mut s_v),
                    cmax: Out::of(dev, &mut cmax_v),
                    q: In::of(dev, &qv),
                    kc: In::of(dev, c.k.slice()),
                    qpos: In::of(dev, &pv),
                    span: span32,
                    nchunk: nch32,
                    signs: In::of(dev, c.signs.slice()),
                    centroids: In::of(dev, c.centroids.slice()),
                    H: h32,
                    n_kv: nkv32,
                    D: d32,
                    levels,
                    tile_bytes: tb,
                    head_bytes: hb,
                    smode: sm,
                    k: kscale,
                };
                // SAFETY: q is [nq, H, D] (the view starts at this batch), every position <
                // len <= cap, the scratch views hold [nb * H] rows of span, nchunk and
                // nchunk * D floats; the cache [n_kv, cache_bytes(cap)], H a multiple of n_kv.
                unsafe { dev.launch_kernel(&scores_fn, cfg, &args) }?;
                let args = ValuesArgs {
                    vpart: Out::of(dev, &mut vpart_v),
                    esum: Out::of(dev, &mut esum_v),
                    s: In::of(dev, &s_v),
                    cmax: In::of(dev, &cmax_v),
                    vc: In::of(dev, c.v.slice()),
                    qpos: In::of(dev, &pv),
                    span: span32,
                    nchunk: nch32,
                    centroids: In::of(dev, c.centroids.slice()),
                    H: h32,
                    n_kv: nkv32,
                    D: d32,
                    levels,
                    tile_bytes: tb,
                    head_bytes: hb,
                    vmode: vm,
                };
                // SAFETY: as for the scores; the scores and maxima were written above for
                // every chunk at or before each query's position.
                unsafe { dev.launch_kernel(&values_fn, cfg, &args) }?;
            }
            Kv::F16(c) => {
                let cap32 = c.len as u32;
                let args = F16ScoresArgs {
                    s: Out::of(dev, &mut s_v),
                    cmax: Out::of(dev, &mut cmax_v),
                    q: In::of(dev, &qv),
                    kc: In::of(dev, c.k.slice()),
                    qpos: In::of(dev, &pv),
                    span: span32,
                    nchunk: nch32,
                    H: h32,
                    n_kv: nkv32,
                    D: d32,
                    cap: cap32,
                    k: kscale,
                };
                // SAFETY: q is [nq, H, D] from this batch, every position < len, the caches
                // [n_kv, len, D], the scratch views as sized above.
                unsafe { dev.launch_kernel(&scores_fn, cfg, &args) }?;
                let args = F16ValuesArgs {
                    vpart: Out::of(dev, &mut vpart_v),
                    esum: Out::of(dev, &mut esum_v),
                    s: In::of(dev, &s_v),
                    cmax: In::of(dev, &cmax_v),
                    vc: In::of(dev, c.v.slice()),
                    qpos: In::of(dev, &pv),
                    span: span32,
                    nchunk: nch32,
                    H: h32,
                    n_kv: nkv32,
                    D: d32,
                    cap: cap32,
                };
                // SAFETY: as for the scores.
                unsafe { dev.launch_kernel(&values_fn, cfg, &args) }?;
            }
        }
        let (signs, rotate) = match &kv {
            Kv::Codes(c, ..) => (c.signs.slice(), 1u32),
            // Unused without the rotation; any f32 buffer of D will do.
            Kv::F16(_) => (q.slice(), 0u32),
        };
        let cfg = geometry((h32, nb as u32, 1), (THREADS, 1, 1), 0);
        let args = FinishArgs {
            out: Out::of(dev, &mut ov),
            vpart: In::of(dev, &vpart_v),
            esum: In::of(dev, &esum_v),
            qpos: In::of(dev, &pv),
            nchunk: nch32,
            signs: In::of(dev, signs),
            H: h32,
            D: d32,
            rotate,
            k: kscale,
        };
        // SAFETY: out is [nq, H, D] from this batch; the partials and sums were written by
        // the values kernel for every chunk at or before each query's position.
        unsafe { dev.launch_kernel(&finish_fn, cfg, &args) }?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The encoder's grid covers every tile of positions `pos0 .. pos0 + n`, for every start
    /// within a tile and `n` up to 300, and is tight (some start needs it all).
    #[test]
    fn encode_slots_cover_every_start() {
        for n in 1..=300usize {
            let mut most = 0;
            for pos0 in 0..3 * TILE {
                let tiles = (pos0 + n - 1) / TILE - pos0 / TILE + 1;
                assert!(tiles * (TILE / 2) <= encode_slots(n), "n {n} from {pos0}");
                most = most.max(tiles * (TILE / 2));
            }
            assert_eq!(
                most,
                encode_slots(n),
                "n {n}: the grid is larger than any start needs"
            );
        }
    }
}
