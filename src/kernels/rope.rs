//! `rope_neox` (kernel `cuda/rope.cu`, reference [`crate::reference::rope`]).

use super::{as_u32, dims, geometry, row_chunks};
use crate::device::{Device, Family};
use crate::error::{check_shape, Error, Result};
use crate::launch::args::rope::RopeArgs;
use crate::launch::{In, Out};
use crate::tensor::GpuTensor;

/// A rotary table on the device: `cos, sin: [max_pos, rd / 2]` from
/// [`crate::reference::rope::rope_table`].
#[derive(Debug)]
pub struct RopeTable {
    cos: GpuTensor<f32>,
    sin: GpuTensor<f32>,
    max_pos: usize,
    half: usize,
}

impl RopeTable {
    /// Computes the table on the CPU (f64, rounded to f32) and uploads it.
    pub fn new(dev: &Device, max_pos: usize, rd: usize, base: f64) -> Result<Self> {
        if rd == 0 || rd % 2 != 0 {
            return Err(Error::invalid(
                "RopeTable::new",
                format!("rotary dims {rd} must be even and positive"),
            ));
        }
        let (cos, sin) = crate::reference::rope::rope_table(max_pos, rd, base);
        Ok(RopeTable {
            cos: GpuTensor::from_host(dev, &cos, &[max_pos, rd / 2])?,
            sin: GpuTensor::from_host(dev, &sin, &[max_pos, rd / 2])?,
            max_pos,
            half: rd / 2,
        })
    }

    /// Positions covered.
    pub fn max_pos(&self) -> usize {
        self.max_pos
    }

    /// Half the rotary dims (pairs per head).
    pub fn half(&self) -> usize {
        self.half
    }

    /// `cos, sin: [max_pos, half]` (for the kernels that rotate on the way: `qkv_norm_rope`).
    pub(crate) fn tables(&self) -> (&GpuTensor<f32>, &GpuTensor<f32>) {
        (&self.cos, &self.sin)
    }
}

/// Token positions on the device (`[rows]`), with their largest value kept on the host so that
/// every kernel that indexes by them can check its bounds before launching.
#[derive(Debug)]
pub struct Positions {
    pos: GpuTensor<u32>,
    max: u32,
}

impl Positions {
    /// Uploads `pos`.
    pub fn new(dev: &Device, pos: &[u32]) -> Result<Self> {
        Ok(Positions {
            pos: GpuTensor::from_host(dev, pos, &[pos.len()])?,
            max: pos.iter().copied().max().unwrap_or(0),
        })
    }

    /// `len` positions on the device promised never to exceed `bound`, written later by
    /// [`Positions::set`]: the positions of a captured decode step, which the graph reads
    /// from device memory at every replay. Kernels check their bounds against `bound`.
    pub fn bounded(dev: &Device, len: usize, bound: u32) -> Result<Self> {
        Ok(Positions {
            pos: GpuTensor::zeros(dev, &[len])?,
            max: bound,
        })
    }

    /// Overwrites the positions (queued on the stream); each must be at most the bound (or
    /// largest position) this set was made with, and the count must match, else an error and
    /// nothing is written.
    pub fn set(&mut self, pos: &[u32]) -> Result<()> {
        const OP: &str = "Positions::set";
        check_shape(OP, "pos", &[self.pos.len()], &[pos.len()])?;
        if let Some((i, &p)) = pos.iter().enumerate().find(|(_, &p)| p > self.max) {
            return Err(Error::IndexOutOfRange {
                op: OP,
                what: "positions",
                position: i,
                index: u64::from(p),
                bound: u64::from(self.max) + 1,
            });
        }
        self.pos.copy_from_host(pos)
    }

    /// Number of positions.
    pub fn len(&self) -> usize {
        self.pos.len()
    }

    /// The largest position (for [`Positions::bounded`]: the bound).
    pub fn max(&self) -> u32 {
        self.max
    }

    /// True when there is none.
    pub fn is_empty(&self) -> bool {
        self.pos.is_empty()
    }

    /// Fails with [`Error::IndexOutOfRange`] unless every position is below `bound`.
    pub(crate) fn check(&self, op: &'static str, bound: usize) -> Result<()> {
        if !self.is_empty() && self.max as usize >= bound {
            return Err(Error::IndexOutOfRange {
                op,
                what: "positions",
                position: 0,
                index: u64::from(self.max),
                bound: bound as u64,
            });
        }
        Ok(())
    }

    pub(crate) fn tensor(&self) -> &GpuTensor<u32> {
        &self.pos
    }
}

/// NEOX rotary embedding in place on `x: [rows, heads, hd]`, row `r` at position `pos[r]`
/// (each below `table.max_pos()`).
pub fn rope_neox(
    dev: &Device,
    x: &mut GpuTensor<f32>,
    pos: &Positions,
    table: &RopeTable,
) -> Result<()> {
    const OP: &str = "rope_neox";
    let [rows, heads, hd] = dims(OP, "x", "[rows, heads, hd]", x.dims())?;
    check_shape(OP, "pos", &[rows], &[pos.len()])?;
    pos.check(OP, table.max_pos)?;
    if 2 * table.half > hd {
        return Err(Error::invalid(
            OP,
            format!("rotary dims {} exceed head dims {hd}", 2 * table.half),
        ));
    }
    let width = as_u32(OP, "heads * rd / 2", heads * table.half)?;
    let (heads32, hd32, half32) = (heads as u32, hd as u32, table.half as u32);
    if rows == 0 || width == 0 {
        return Ok(());
    }
    let f = dev.function(Family::Rope, "rope_neox_f32")?;
    for (row0, nrows) in row_chunks(rows) {
        let cfg = geometry((width.div_ceil(128), nrows, 1), (128, 1, 1), 0);
        let args = RopeArgs {
            x: Out::of(dev, x.slice_mut()),
            pos: In::of(dev, pos.tensor().slice()),
            cos_t: In::of(dev, table.cos.slice()),
            sin_t: In::of(dev, table.sin.slice()),
            heads: heads32,
            hd: hd32,
            half: half32,
            row0,
        };
        // SAFETY: x is [rows, heads, hd] with 2 * half <= hd, every position is below the
        // table's max_pos (checked above), and the grid covers rows row0..row0 + nrows <= rows.
        unsafe { dev.launch_kernel(&f, cfg, &args) }?;
    }
    Ok(())
}
