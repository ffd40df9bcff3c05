//! `rmsnorm` (kernel `cuda/norm.cu`, reference [`crate::reference::norm`]).

use super::{as_u32, dims, geometry, row_chunks};
use crate::device::{Device, Family};
use crate::error::{check_shape, Error, Result};
use crate::kernels::attention::LayerCache;
use crate::kernels::quantize::{GpuActPair, GpuActQ8};
use crate::kernels::rope::{Positions, RopeTable};
use crate::launch::args::norm::{AddNormArgs, QkvNormRopeArgs, RmsnormArgs};
use crate::launch::{In, Out};
use crate::tensor::GpuTensor;

const WARPS: u32 = 8;
/// Rows at least this wide take the block-per-row kernel.
pub const ROW_KERNEL_MIN_WIDTH: usize = 512;

/// Checks `x: [rows, width]` (named `xname`), each of `more` and `y` the same shape, `w:
/// [width]`: `(rows, width)` as u32, `None` when there is nothing to do.
fn row_shape(
    op: &'static str,
    xname: &'static str,
    x: &GpuTensor<f32>,
    more: &[(&'static str, &GpuTensor<f32>)],
    w: &GpuTensor<f32>,
    y: &GpuTensor<f32>,
) -> Result<Option<(u32, u32)>> {
    let [width] = dims(op, "w", "[width]", w.dims())?;
    let [rows, xw] = dims(op, xname, "[rows, width]", x.dims())?;
    check_shape(op, xname, &[rows, width], &[rows, xw])?;
    for (name, t) in more {
        check_shape(op, name, &[rows, width], t.dims())?;
    }
    check_shape(op, "y", &[rows, width], y.dims())?;
    let (rows32, width32) = (as_u32(op, "rows", rows)?, as_u32(op, "width", width)?);
    Ok((rows > 0 && width > 0).then_some((rows32, width32)))
}

/// RMSNorm of each row of `x: [rows, width]` with weights `w: [width]` into `y` (same shape as
/// `x`); the order is [`crate::reference::norm::rmsnorm`]'s. A per-head norm is the same call
/// on `x` viewed as `[tokens * heads, hd]`.
pub fn rmsnorm(
    dev: &Device,
    x: &GpuTensor<f32>,
    w: &GpuTensor<f32>,
    eps: f32,
    y: &mut GpuTensor<f32>,
) -> Result<()> {
    let Some((rows32, width32)) = row_shape("rmsnorm", "x", x, &[], w, y)? else {
        return Ok(());
    };
    let width = width32 as usize;
    // Wide rows: a block per row (one load round trip instead of eight for a lone warp);
    // narrow ones (the per-head QK norms): a warp per row. The same order either way.
    let (name, grid) = if width >= ROW_KERNEL_MIN_WIDTH {
        ("rmsnorm_f32_row", rows32)
    } else {
        ("rmsnorm_f32", rows32.div_ceil(WARPS))
    };
    let f = dev.function(Family::Norm, name)?;
    let cfg = geometry((grid, 1, 1), (32 * WARPS, 1, 1), 0);
    let args = RmsnormArgs {
        y: Out::of(dev, y.slice_mut()),
        x: In::of(dev, x.slice()),
        w: In::of(dev, w.slice()),
        rows: rows32,
        width: width32,
        eps,
    };
    // SAFETY: x and y are [rows, width], w is [width] (checked above); warps (or blocks) past
    // the last row return before touching memory.
    unsafe { dev.launch_kernel(&f, cfg, &args) }?;
    Ok(())
}

/// The residual add and the norm after it in one launch: `h += o`, then `y = rmsnorm(h, w)`
/// (`h`, `o`, `y`: `[rows, width]`, `w: [width]`), the bits of [`crate::kernels::elementwise::add`]
/// followed by [`rmsnorm`] (references [`crate::reference::elementwise::add`] and
/// [`crate::reference::norm::rmsnorm`]). A bad shape is an error and nothing is written.
pub fn add_rmsnorm(
    dev: &Device,
    h: &mut GpuTensor<f32>,
    o: &GpuTensor<f32>,
    w: &GpuTensor<f32>,
    eps: f32,
    y: &mut GpuTensor<f32>,
) -> Result<()> {
    add_norm(dev, "add_rmsnorm", h, o, w, eps, y, None)
}

/// The launch of [`add_rmsnorm`] (`q: None`) or [`add_rmsnorm_q8`] (`q`: y's quantization,
/// `[rows, width]` codes and `[rows, width / 32]` scales, `width % 32 == 0`).
#[allow(clippy::too_many_arguments)]
fn add_norm(
    dev: &Device,
    op: &'static str,
    h: &mut GpuTensor<f32>,
    o: &GpuTensor<f32>,
    w: &GpuTensor<f32>,
    eps: f32,
    y: &mut GpuTensor<f32>,
    q: Option<&mut GpuActQ8>,
) -> Result<()> {
    let Some((rows32, width32)) = row_shape(op, "h", h, &[("o", o)], w, y)? else {
        return Ok(());
    };
    // The quantizing kernel takes 1024 threads (its warps each quantize blocks of the row).
    let (name, threads) = match q {
        None => ("add_rmsnorm_f32_row", 32 * WARPS),
        Some(_) => ("add_rmsnorm_q8_f32_row", 1024),
    };
    let f = dev.function(Family::Norm, name)?;
    let cfg = geometry((rows32, 1, 1), (threads, 1, 1), 0);
    let (qc, qd, qa) = match q {
        Some(q) => (
            Out::of(dev, q.codes.slice_mut()),
            Out::of(dev, q.d.slice_mut()),
            Out::of(dev, q.a.slice_mut()),
        ),
        None => (Out::null(), Out::null(), Out::null()),
    };
    let args = AddNormArgs {
        y: Out::of(dev, y.slice_mut()),
        h: Out::of(dev, h.slice_mut()),
        o: In::of(dev, o.slice()),
        w: In::of(dev, w.slice()),
        rows: rows32,
        width: width32,
        eps,
        qc,
        qd,
        qa,
    };
    // SAFETY: h, o and y are [rows, width] and w is [width] (checked above; y and h are two
    // tensors, so they do not overlap); q, when given, is y's pair: codes [rows, width] and
    // scales [rows, width / 32], width % 32 == 0 (set when the pair was made). A block per row;
    // each element of h is read and written by one thread, each quantization block by one warp.
    unsafe { dev.launch_kernel(&f, cfg, &args) }?;
    Ok(())
}

/// Where [`qkv_norm_rope`] reads each token's q, k and v heads.
#[derive(Clone, Copy)]
pub enum QkvInput<'a> {
    /// One product of Wq, Wk and Wv stacked ([`crate::quant::QuantMatrix::concat_rows`]):
    /// `[n, (nh + 2 nkv) * hd]`, each row its q heads, then k heads, then v heads.
    Stacked(&'a GpuTensor<f32>),
    /// Three products (a file whose Wq, Wk, Wv formats differ): `q: [n, nh * hd]`,
    /// `k, v: [n, nkv * hd]`.
    Separate {
        /// `[n, nh * hd]`
        q: &'a GpuTensor<f32>,
        /// `[n, nkv * hd]`
        k: &'a GpuTensor<f32>,
        /// `[n, nkv * hd]`
        v: &'a GpuTensor<f32>,
    },
}

/// [`add_rmsnorm`] writing `y` together with its quantization (the bits of `add_rmsnorm` then
/// [`crate::kernels::quantize::quantize_act`], one launch): `h += o`, `y.x = rmsnorm(h, w)`,
/// `y.q = quantize_act(y.x)`. `h`, `o`, `y: [rows, width]` with `width % 32 == 0` (the pair's
/// own rule), `w: [width]`. A bad shape is an error and nothing is written.
pub fn add_rmsnorm_q8(
    dev: &Device,
    h: &mut GpuTensor<f32>,
    o: &GpuTensor<f32>,
    w: &GpuTensor<f32>,
    eps: f32,
    y: &mut GpuActPair,
) -> Result<()> {
    let (yx, yq) = y.parts_mut();
    add_norm(dev, "add_rmsnorm_q8", h, o, w, eps, yx, Some(yq))
}

/// The attention's inputs in one launch. Per token at `pos[r]`: each q head of `input` normed
/// by `q_norm` and rotated into `q: [n, nh, hd]`; each k head normed by `k_norm`, rotated and
/// written to its cache row; each v head copied to its cache row. The bits of [`rmsnorm`] per
/// head, [`crate::kernels::rope::rope_neox`] and [`crate::kernels::attention::kv_write`] in
/// turn (`nh` is `q`'s head count, `nkv` the cache's). With `gated`, each q head of the input
/// is followed by its output gate (`[q_h | gate_h]`, a hybrid model's attention; the gates are
/// read later by [`crate::kernels::activation::gate_heads_sigmoid`]). A bad shape or position
/// is an error and nothing is written.
#[allow(clippy::too_many_arguments)]
pub fn qkv_norm_rope(
    dev: &Device,
    input: QkvInput<'_>,
    gated: bool,
    q_norm: &GpuTensor<f32>,
    k_norm: &GpuTensor<f32>,
    eps: f32,
    pos: &Positions,
    table: &RopeTable,
    cache: &mut LayerCache,
    q: &mut GpuTensor<f32>,
) -> Result<()> {
    qkv_norm_rope_into(
        dev, input, gated, q_norm, k_norm, eps, pos, None, table, cache, q,
    )
}

/// [`qkv_norm_rope`] into a paged cache: token `i` rotates by `pos[i]` and lands in cache row
/// `slots[i]` (its page slot, [`crate::spec::paged`]), every slot below the cache's capacity.
#[allow(clippy::too_many_arguments)]
pub fn qkv_norm_rope_paged(
    dev: &Device,
    input: QkvInput<'_>,
    gated: bool,
    q_norm: &GpuTensor<f32>,
    k_norm: &GpuTensor<f32>,
    eps: f32,
    pos: &Positions,
    slots: &Positions,
    table: &RopeTable,
    cache: &mut LayerCache,
    q: &mut GpuTensor<f32>,
) -> Result<()> {
    qkv_norm_rope_into(
        dev,
        input,
        gated,
        q_norm,
        k_norm,
        eps,
        pos,
        Some(slots),
        table,
        cache,
        q,
    )
}

#[allow(clippy::too_many_arguments)]
fn qkv_norm_rope_into(
    dev: &Device,
    input: QkvInput<'_>,
    gated: bool,
    q_norm: &GpuTensor<f32>,
    k_norm: &GpuTensor<f32>,
    eps: f32,
    pos: &Positions,
    slots: Option<&Positions>,
    table: &RopeTable,
    cache: &mut LayerCache,
    q: &mut GpuTensor<f32>,
) -> Result<()> {
    const OP: &str = "qkv_norm_rope";
    let [n, nh, hd] = dims(OP, "q", "[n, nh, hd]", q.dims())?;
    let [nkv, cap, chd] = dims(OP, "cache.k", "[nkv, cap, hd]", cache.k.dims())?;
    check_shape(OP, "cache.k", &[nkv, cap, hd], &[nkv, cap, chd])?;
    check_shape(OP, "cache.v", &[nkv, cap, hd], cache.v.dims())?;
    // (tensor, column offset, row stride) of the q, k and v heads.
    let q_head = if gated { 2 * hd } else { hd };
    let (qh, kh, vh) = (nh * q_head, nkv * hd, nkv * hd);
    let (qs, ks, vs) = match input {
        QkvInput::Stacked(x) => {
            let w = qh + kh + vh;
            check_shape(OP, "qkv", &[n, w], x.dims())?;
            ((x, 0, w), (x, qh, w), (x, qh + kh, w))
        }
        QkvInput::Separate {
            q: xq,
            k: xk,
            v: xv,
        } => {
            check_shape(OP, "q input", &[n, qh], xq.dims())?;
            check_shape(OP, "k input", &[n, kh], xk.dims())?;
            check_shape(OP, "v input", &[n, vh], xv.dims())?;
            ((xq, 0, qh), (xk, 0, kh), (xv, 0, vh))
        }
    };
    check_shape(OP, "q_norm", &[hd], q_norm.dims())?;
    check_shape(OP, "k_norm", &[hd], k_norm.dims())?;
    check_shape(OP, "pos", &[n], &[pos.len()])?;
    match slots {
        // Rotations by position (the table's range), cache rows by slot (the cache's).
        Some(sl) => {
            check_shape(OP, "slots", &[n], &[sl.len()])?;
            pos.check(OP, table.max_pos())?;
            sl.check(OP, cap)?;
        }
        None => pos.check(OP, cap.min(table.max_pos()))?,
    }
    if 2 * table.half() > hd {
        return Err(Error::invalid(
            OP,
            format!("rotary dims {} exceed head dims {hd}", 2 * table.half()),
        ));
    }
    let heads = as_u32(OP, "heads", nh + 2 * nkv)?;
    let (nh32, nkv32, hd32) = (nh as u32, nkv as u32, as_u32(OP, "hd", hd)?);
    let (half32, cap32) = (table.half() as u32, as_u32(OP, "cap", cap)?);
    let q_head32 = as_u32(OP, "q head stride", q_head)?;
    let smem = 4 * hd * 4;
    if smem > 48 * 1024 {
        return Err(Error::invalid(OP, format!("head dim {hd} above 3072")));
    }
    if n == 0 || hd == 0 || heads == 0 {
        return Ok(());
    }
    let (cos, sin) = table.tables();
    let (q_stride, k_stride, v_stride) = (qs.2 as u64, ks.2 as u64, vs.2 as u64);
    let name = match slots {
        Some(_) => "qkv_norm_rope_rows_f32",
        None => "qkv_norm_rope_f32",
    };
    let f = dev.function(Family::Norm, name)?;
    for (row0, nrows) in row_chunks(n) {
        let cfg = geometry((heads.div_ceil(4), nrows, 1), (128, 1, 1), smem as u32);
        let (q_in, k_in, v_in) = (
            qs.0.slice().slice(qs.1..),
            ks.0.slice().slice(ks.1..),
            vs.0.slice().slice(vs.1..),
        );
        let args = QkvNormRopeArgs {
            q_out: Out::of(dev, q.slice_mut()),
            kc: Out::of(dev, cache.k.slice_mut()),
            vc: Out::of(dev, cache.v.slice_mut()),
            qs: In::of(dev, &q_in),
            ks: In::of(dev, &k_in),
            vs: In::of(dev, &v_in),
            q_stride,
            k_stride,
            v_stride,
            q_norm: In::of(dev, q_norm.slice()),
            k_norm: In::of(dev, k_norm.slice()),
            pos: In::of(dev, pos.tensor().slice()),
            crow: slots.map_or(In::null(), |sl| In::of(dev, sl.tensor().slice())),
            cos_t: In::of(dev, cos.slice()),
            sin_t: In::of(dev, sin.slice()),
            nh: nh32,
            nkv: nkv32,
            hd: hd32,
            half: half32,
            cap: cap32,
            eps,
            row0,
            q_head_stride: q_head32,
        };
        // SAFETY: the q, k and v heads of row r sit at (column offset + r * stride) of their
        // [n, stride] inputs, q head h at h * q_head, offset + heads * head width <= stride
        // (checked above); q is [n, nh, hd],
        // the caches [nkv, cap, hd], the norms [hd]; every position is below cap and the
        // table's max_pos (with slots: every position below max_pos, every slot [n] below
        // cap), 2 * half <= hd; the grid covers rows row0..row0 + nrows <= n and
        // warps past the last slot return; shared memory is 4 warps x hd floats. Each (token,
        // slot) writes its own row of q or of a cache (tokens at one position write one cache
        // row, as kv_write).
        unsafe { dev.launch_kernel(&f, cfg, &args) }?;
    }
    Ok(())
}
