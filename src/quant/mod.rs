//! Weight formats, laid out exactly as GGUF stores them, and the activation quantization of the
//! quantized matrix products.
//!
//! A matrix `[rows, cols]` is stored row by row; each row is `cols / block_elems` blocks of
//! `block_bytes` bytes (for the float formats a "block" is one element). Every quantized format
//! decodes, block by block, into 32-element [`WBlock`]s: int8 codes and the scalars that scale
//! them. The canonical dot products of [`crate::reference::gemm`] are defined on those.
//!
//! | format | block elements | block bytes | layout (little-endian) |
//! |---|---:|---:|---|
//! | F32 | 1 | 4 | `f32` |
//! | F16 | 1 | 2 | IEEE binary16 |
//! | BF16 | 1 | 2 | bfloat16 |
//! | Q8_0 | 32 | 34 | `d: f16`, `qs: [i8; 32]`; `w = d * q` |
//! | Q4_K | 256 | 144 | `d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]`; 8 sub-blocks of 32 with 6-bit scale `sc` and min `m`; `w = d * sc * q - dmin * m`, `q` in 0..16 |
//! | Q5_K | 256 | 176 | `d, dmin: f16, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128]`; as Q4_K with a fifth bit from `qh`, `q` in 0..32 |
//! | Q6_K | 256 | 210 | `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`; 16 sub-blocks of 16; `w = d * sc * (q - 32)`, `q` in 0..64 |

pub mod act;
mod encode;
pub mod fastscan;
mod kquants;

pub use act::{quantize_act, quantize_act_exact, ActQ8};
pub use kquants::{decode_block, WBlock, WScale};
// The grids, for the test that ties the gemm kernels' trial words to them.
#[cfg(test)]
pub(crate) use kquants::{KVALUES_IQ4NL, KVALUES_MXFP4};

use half::{bf16, f16};

use crate::error::{Error, Result};

/// A weight format: how a matrix row is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// GGUF Q8_0: blocks of 32, one f16 scale.
    Q8_0,
    /// GGUF Q4_K: super-blocks of 256, 4-bit codes with 6-bit sub-block scales and mins.
    Q4K,
    /// GGUF Q5_K: as Q4_K with 5-bit codes.
    Q5K,
    /// GGUF Q6_K: super-blocks of 256, 6-bit codes, 8-bit scales per 16.
    Q6K,
    /// GGUF Q4_0: blocks of 32, 4-bit codes `q - 8`, one f16 scale.
    Q4_0,
    /// GGUF Q4_1: blocks of 32, 4-bit codes, an f16 scale and an f16 min: `d * q + m`.
    Q4_1,
    /// GGUF Q5_0: blocks of 32, 5-bit codes `q - 16`, one f16 scale.
    Q5_0,
    /// GGUF Q5_1: blocks of 32, 5-bit codes, an f16 scale and an f16 min.
    Q5_1,
    /// GGUF Q2_K: super-blocks of 256, 2-bit codes, 4-bit scales and mins per 16.
    Q2K,
    /// GGUF Q3_K: super-blocks of 256, 3-bit codes `q - 4`, 6-bit scales per 16.
    Q3K,
    /// GGUF IQ4_NL: blocks of 32, 4-bit indices into a fixed non-linear int8 grid, one f16
    /// scale.
    IQ4NL,
    /// GGUF IQ4_XS: super-blocks of 256, IQ4_NL's grid with a 6-bit scale per 32.
    IQ4XS,
    /// GGUF MXFP4: blocks of 32, e2m1 values (doubled: int8 -12..12) and a power-of-two
    /// (E8M0) scale.
    MXFP4,
}

impl WeightFormat {
    /// Every format: [`WeightFormat::CORE`], then [`WeightFormat::GENERIC_ONLY`]. Every one
    /// has CPU references and GPU kernels.
    pub const ALL: [WeightFormat; 16] = {
        let mut out = [WeightFormat::F32; 16];
        let mut i = 0;
        while i < out.len() {
            out[i] = if i < WeightFormat::CORE.len() {
                WeightFormat::CORE[i]
            } else {
                WeightFormat::GENERIC_ONLY[i - WeightFormat::CORE.len()]
            };
            i += 1;
        }
        out
    };

    /// The formats the runner had first, float formats first: each has specialised GPU
    /// kernels beside the generic GEMV and GEMM (F32, Q8_0 and the K-quants by shape), and the
    /// parity proptests and the gemm bench sweep them.
    pub const CORE: [WeightFormat; 7] = [
        WeightFormat::F32,
        WeightFormat::F16,
        WeightFormat::BF16,
        WeightFormat::Q8_0,
        WeightFormat::Q4K,
        WeightFormat::Q5K,
        WeightFormat::Q6K,
    ];

    /// The formats whose GPU products are the generic kernels alone (`gemv_<fmt>_t<h>`,
    /// `gemm_mma_<fmt>` in `cuda/gemm.cu`), no specialised variant yet.
    pub const GENERIC_ONLY: [WeightFormat; 9] = [
        WeightFormat::Q4_0,
        WeightFormat::Q4_1,
        WeightFormat::Q5_0,
        WeightFormat::Q5_1,
        WeightFormat::Q2K,
        WeightFormat::Q3K,
        WeightFormat::IQ4NL,
        WeightFormat::IQ4XS,
        WeightFormat::MXFP4,
    ];

    /// The name GGUF and llama.cpp use (`F32`, `Q4_K`, ...).
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::F32 => "F32",
            WeightFormat::F16 => "F16",
            WeightFormat::BF16 => "BF16",
            WeightFormat::Q8_0 => "Q8_0",
            WeightFormat::Q4K => "Q4_K",
            WeightFormat::Q5K => "Q5_K",
            WeightFormat::Q6K => "Q6_K",
            WeightFormat::Q4_0 => "Q4_0",
            WeightFormat::Q4_1 => "Q4_1",
            WeightFormat::Q5_0 => "Q5_0",
            WeightFormat::Q5_1 => "Q5_1",
            WeightFormat::Q2K => "Q2_K",
            WeightFormat::Q3K => "Q3_K",
            WeightFormat::IQ4NL => "IQ4_NL",
            WeightFormat::IQ4XS => "IQ4_XS",
            WeightFormat::MXFP4 => "MXFP4",
        }
    }

    /// Parses a name as [`WeightFormat::name`] prints it (case-insensitive, `_` optional).
    pub fn parse(s: &str) -> Option<Self> {
        let norm: String = s
            .chars()
            .filter(|c| *c != '_')
            .collect::<String>()
            .to_ascii_uppercase();
        WeightFormat::ALL
            .into_iter()
            .find(|f| f.name().replace('_', "") == norm)
    }

    /// Elements per storage block.
    pub fn block_elems(self) -> usize {
        match self {
            WeightFormat::F32 | WeightFormat::F16 | WeightFormat::BF16 => 1,
            WeightFormat::Q8_0
            | WeightFormat::Q4_0
            | WeightFormat::Q4_1
            | WeightFormat::Q5_0
            | WeightFormat::Q5_1
            | WeightFormat::IQ4NL
            | WeightFormat::MXFP4 => 32,
            WeightFormat::Q4K
            | WeightFormat::Q5K
            | WeightFormat::Q6K
            | WeightFormat::Q2K
            | WeightFormat::Q3K
            | WeightFormat::IQ4XS => 256,
        }
    }

    /// Bytes per storage block.
    pub fn block_bytes(self) -> usize {
        match self {
            WeightFormat::F32 => 4,
            WeightFormat::F16 | WeightFormat::BF16 => 2,
            WeightFormat::Q8_0 => 34,
            WeightFormat::Q4K => 144,
            WeightFormat::Q5K => 176,
            WeightFormat::Q6K => 210,
            WeightFormat::Q4_0 | WeightFormat::IQ4NL => 18,
            WeightFormat::Q4_1 => 20,
            WeightFormat::Q5_0 => 22,
            WeightFormat::Q5_1 => 24,
            WeightFormat::Q2K => 84,
            WeightFormat::Q3K => 110,
            WeightFormat::IQ4XS => 136,
            WeightFormat::MXFP4 => 17,
        }
    }

    /// True for the block-quantized formats (their products quantize the activations).
    pub fn is_quantized(self) -> bool {
        self.block_elems() > 1
    }

    /// Bytes of one row of `cols` elements, or an error when `cols` is not a multiple of the
    /// block.
    pub fn row_bytes(self, cols: usize) -> Result<usize> {
        if cols % self.block_elems() != 0 {
            return Err(Error::invalid(
                "WeightFormat::row_bytes",
                format!(
                    "{} rows need a multiple of {} elements, got {cols}",
                    self.name(),
                    self.block_elems()
                ),
            ));
        }
        Ok(cols / self.block_elems() * self.block_bytes())
    }

    /// Where a block keeps its f16 scales (and mins), in bytes from the block's start: the
    /// values a well-formed block holds finite ([`QuantMatrix::from_bytes`] checks them).
    pub fn scale_offsets(self) -> &'static [usize] {
        match self {
            WeightFormat::Q8_0 | WeightFormat::Q4_0 | WeightFormat::Q5_0 => &[0],
            WeightFormat::IQ4NL | WeightFormat::IQ4XS => &[0],
            WeightFormat::Q4K | WeightFormat::Q5K | WeightFormat::Q4_1 | WeightFormat::Q5_1 => {
                &[0, 2]
            }
            WeightFormat::Q6K => &[208],
            WeightFormat::Q2K => &[80, 82],
            WeightFormat::Q3K => &[108],
            WeightFormat::F32 | WeightFormat::F16 | WeightFormat::BF16 | WeightFormat::MXFP4 => &[],
        }
    }

    /// Position in [`WeightFormat::ALL`] (the kernel tables index by it).
    pub fn index(self) -> usize {
        WeightFormat::ALL
            .iter()
            .position(|&f| f == self)
            .expect("ALL lists every format")
    }
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The getters of a stored matrix's shape, for the host's [`QuantMatrix`] and the device's
/// [`crate::kernels::gemm::GpuMatrix`] (both hold `format`, `experts`, `rows` and `cols`).
macro_rules! matrix_shape_getters {
    () => {
        /// The weight format.
        pub fn format(&self) -> WeightFormat {
            self.format
        }

        /// Number of stacked matrices.
        pub fn experts(&self) -> usize {
            self.experts
        }

        /// Rows (output features) per matrix.
        pub fn rows(&self) -> usize {
            self.rows
        }

        /// Columns (the reduction length K).
        pub fn cols(&self) -> usize {
            self.cols
        }
    };
}
pub(crate) use matrix_shape_getters;

/// A host matrix (or a stack of `experts` matrices) in one weight format: `[experts, rows,
/// cols]`, rows stored one after the other, each [`WeightFormat::row_bytes`] long.
#[derive(Clone, Debug)]
pub struct QuantMatrix {
    format: WeightFormat,
    experts: usize,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

impl QuantMatrix {
    /// Wraps raw bytes (as read from a GGUF file), checking the length.
    pub fn from_bytes(
        format: WeightFormat,
        experts: usize,
        rows: usize,
        cols: usize,
        data: Vec<u8>,
    ) -> Result<Self> {
        let row = format.row_bytes(cols)?;
        let want = experts
            .checked_mul(rows)
            .and_then(|r| r.checked_mul(row))
            .ok_or_else(|| Error::invalid("QuantMatrix::from_bytes", "size overflows usize"))?;
        if data.len() != want {
            return Err(Error::invalid(
                "QuantMatrix::from_bytes",
                format!(
                    "{format} [{experts}, {rows}, {cols}] needs {want} bytes, got {}",
                    data.len()
                ),
            ));
        }
        let m = QuantMatrix {
            format,
            experts,
            rows,
            cols,
            data,
        };
        m.check_scales()?;
        Ok(m)
    }

    /// Fails with [`Error::InvalidArgument`] naming the first block whose f16 scale (`d`, or
    /// `dmin` for Q4_K/Q5_K) is NaN or infinite: such a block is malformed.
    fn check_scales(&self) -> Result<()> {
        let offsets = match self.format.scale_offsets() {
            [] => return Ok(()),
            o => o,
        };
        let bb = self.format.block_bytes();
        for (i, blk) in self.data.chunks_exact(bb).enumerate() {
            if offsets.iter().any(|&o| !f16_at(blk, o).is_finite()) {
                let per_row = self.cols / self.format.block_elems();
                return Err(Error::invalid(
                    "QuantMatrix",
                    format!(
                        "malformed {} block {} of row {}: its scale is not finite",
                        self.format,
                        i % per_row.max(1),
                        i / per_row.max(1)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Encodes f32 values `[experts, rows, cols]` into `format` with bitexact's encoder
    /// (round to nearest even for the float formats; see `encode.rs` for the quantized ones).
    pub fn quantize(
        format: WeightFormat,
        values: &[f32],
        experts: usize,
        rows: usize,
        cols: usize,
    ) -> Result<Self> {
        let row_bytes = format.row_bytes(cols)?;
        if values.len() != experts * rows * cols {
            return Err(Error::invalid(
                "QuantMatrix::quantize",
                format!(
                    "[{experts}, {rows}, {cols}] holds {} values, got {}",
                    experts * rows * cols,
                    values.len()
                ),
            ));
        }
        let mut data = vec![0u8; experts * rows * row_bytes];
        if cols > 0 {
            use rayon::prelude::*;
            data.par_chunks_mut(row_bytes.max(1))
                .zip(values.par_chunks(cols))
                .for_each(|(out, row)| encode::encode_row(format, row, out));
        }
        Ok(QuantMatrix {
            format,
            experts,
            rows,
            cols,
            data,
        })
    }

    matrix_shape_getters!();

    /// The raw bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    /// The raw bytes of row `r` of matrix `e`.
    pub fn row(&self, e: usize, r: usize) -> &[u8] {
        let rb = self
            .format
            .row_bytes(self.cols)
            .expect("checked at construction");
        &self.data[(e * self.rows + r) * rb..][..rb]
    }

    /// The matrices of `parts` stacked row-wise, expert by expert: expert `e` of the result is
    /// expert `e` of `parts[0]`, then of `parts[1]`, .. (`[experts, sum of rows, cols]`). Each
    /// output of a product with it is that of the part it came from, bit for bit (the rows are
    /// the same bytes): the runner multiplies Wq, Wk, Wv (or an expert's gate and up) in one
    /// launch. The parts must share format, expert count and columns.
    pub fn concat_rows(parts: &[&QuantMatrix]) -> Result<QuantMatrix> {
        const OP: &str = "QuantMatrix::concat_rows";
        let first = parts
            .first()
            .ok_or_else(|| Error::invalid(OP, "no matrices to stack"))?;
        if let Some(p) = parts
            .iter()
            .find(|p| (p.format, p.experts, p.cols) != (first.format, first.experts, first.cols))
        {
            return Err(Error::invalid(
                OP,
                format!(
                    "every part must be {} x {} experts x {} columns, got {} x {} x {}",
                    first.format, first.experts, first.cols, p.format, p.experts, p.cols
                ),
            ));
        }
        let rb = first.format.row_bytes(first.cols)?;
        let rows: usize = parts.iter().map(|p| p.rows).sum();
        let mut data = Vec::with_capacity(first.experts * rows * rb);
        for e in 0..first.experts {
            for p in parts {
                data.extend_from_slice(&p.data[e * p.rows * rb..(e + 1) * p.rows * rb]);
            }
        }
        QuantMatrix::from_bytes(first.format, first.experts, rows, first.cols, data)
    }

    /// The experts `ids` of this matrix, in that order, as a matrix of `ids.len()` experts
    /// (the same bytes: an expert-parallel rank holds only its own experts).
    pub fn select_experts(&self, ids: &[u32]) -> Result<QuantMatrix> {
        const OP: &str = "QuantMatrix::select_experts";
        if let Some(&e) = ids.iter().find(|&&e| e as usize >= self.experts) {
            return Err(Error::invalid(
                OP,
                format!("expert {e} of a matrix of {} experts", self.experts),
            ));
        }
        let per = self.rows * self.format.row_bytes(self.cols)?;
        let mut data = Vec::with_capacity(ids.len() * per);
        for &e in ids {
            data.extend_from_slice(&self.data[e as usize * per..][..per]);
        }
        QuantMatrix::from_bytes(self.format, ids.len(), self.rows, self.cols, data)
    }

    /// Decodes every value to f32 (`[experts, rows, cols]`), as llama.cpp's `dequantize_row_*`
    /// does: Q8_0 `d * q`; Q4_K/Q5_K `(d * sc) * q - dmin * m`; Q6_K `(d * sc) * (q - 32)`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.experts * self.rows * self.cols);
        for e in 0..self.experts {
            for r in 0..self.rows {
                dequantize_row(self.format, self.row(e, r), self.cols, &mut out);
            }
        }
        out
    }
}

/// Appends the `cols` values of one stored row to `out` (llama.cpp's dequantization).
pub fn dequantize_row(format: WeightFormat, row: &[u8], cols: usize, out: &mut Vec<f32>) {
    match format {
        WeightFormat::F32 => out.extend(
            row.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
        WeightFormat::F16 => out.extend(
            row.chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        WeightFormat::BF16 => out.extend(
            row.chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        _ => {
            for b in 0..cols / 32 {
                out.extend_from_slice(&kquants::dequantize_block32(format, row, b));
            }
        }
    }
}

/// Reads the f16 at `bytes[at..at + 2]` as f32 (exact).
#[inline]
pub(crate) fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concat_rows_stacks_each_expert() {
        let mk = |rows: usize, seed: u64| {
            let v: Vec<f32> = (0..2 * rows * 64)
                .map(|i| ((i as u64 * 2654435761 + seed) % 1000) as f32 / 100.0 - 5.0)
                .collect();
            QuantMatrix::quantize(WeightFormat::Q8_0, &v, 2, rows, 64).unwrap()
        };
        let (a, b, c) = (mk(3, 1), mk(1, 2), mk(2, 3));
        let s = QuantMatrix::concat_rows(&[&a, &b, &c]).unwrap();
        assert_eq!((s.experts(), s.rows(), s.cols()), (2, 6, 64));
        for e in 0..2 {
            let want: Vec<&[u8]> = (0..3)
                .map(|r| a.row(e, r))
                .chain([b.row(e, 0)])
                .chain((0..2).map(|r| c.row(e, r)))
                .collect();
            for (r, w) in want.iter().enumerate() {
                assert_eq!(s.row(e, r), *w, "expert {e} row {r}");
            }
        }
        let other = QuantMatrix::quantize(WeightFormat::F32, &[0.0; 128], 2, 1, 64).unwrap();
        assert!(QuantMatrix::concat_rows(&[&a, &other]).is_err());
        assert!(QuantMatrix::concat_rows(&[]).is_err());
    }

    /// Random bytes for `blocks` blocks of `format`, with finite f16 scales patched in.
    fn random_blocks(format: WeightFormat, blocks: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as u8
        };
        let bb = format.block_bytes();
        let mut data: Vec<u8> = (0..blocks * bb).map(|_| next()).collect();
        let scale_at = format.scale_offsets();
        for blk in data.chunks_mut(bb) {
            for &o in scale_at {
                let v = f16::from_f32((blk[o] as f32 - 128.0) / 64.0);
                blk[o..o + 2].copy_from_slice(&v.to_le_bytes());
            }
        }
        data
    }

    /// llama.cpp's `dequantize_row_*` loops, written out again on raw bytes: a second decoder,
    /// structured as the C code is, to check `decode_block` against.
    fn llama_dequantize(format: WeightFormat, x: &[u8]) -> Vec<f32> {
        let mut y = Vec::new();
        match format {
            WeightFormat::Q8_0 => {
                for b in x.chunks(34) {
                    let d = f16_at(b, 0);
                    y.extend(b[2..].iter().map(|&q| f32::from(q as i8) * d));
                }
            }
            WeightFormat::Q4K | WeightFormat::Q5K => {
                let five = format == WeightFormat::Q5K;
                for b in x.chunks(if five { 176 } else { 144 }) {
                    let (d, min) = (f16_at(b, 0), f16_at(b, 2));
                    let sc_bytes = &b[4..16];
                    let get = |j: usize| -> (u8, u8) {
                        if j < 4 {
                            (sc_bytes[j] & 63, sc_bytes[j + 4] & 63)
                        } else {
                            (
                                (sc_bytes[j + 4] & 0xF) | ((sc_bytes[j - 4] >> 6) << 4),
                                (sc_bytes[j + 4] >> 4) | ((sc_bytes[j] >> 6) << 4),
                            )
                        }
                    };
                    let qh = &b[16..48];
                    let mut ql = if five { 48 } else { 16 };
                    let (mut is, mut u1, mut u2) = (0, 1u8, 2u8);
                    for _ in 0..4 {
                        let (sc, m) = get(is);
                        let (d1, m1) = (d * f32::from(sc), min * f32::from(m));
                        let (sc, m) = get(is + 1);
                        let (d2, m2) = (d * f32::from(sc), min * f32::from(m));
                        for l in 0..32 {
                            let h = if five && qh[l] & u1 != 0 { 16 } else { 0 };
                            y.push(d1 * f32::from((b[ql + l] & 0xF) + h) - m1);
                        }
                        for l in 0..32 {
                            let h = if five && qh[l] & u2 != 0 { 16 } else { 0 };
                            y.push(d2 * f32::from((b[ql + l] >> 4) + h) - m2);
                        }
                        ql += 32;
                        is += 2;
                        u1 <<= 2;
                        u2 <<= 2;
                    }
                }
            }
            WeightFormat::Q6K => {
                for b in x.chunks(210) {
                    let d = f16_at(b, 208);
                    let mut out = [0.0f32; 256];
                    for n in 0..2 {
                        let (ql, qh, sc) = (&b[64 * n..], &b[128 + 32 * n..], &b[192 + 8 * n..]);
                        for l in 0..32 {
                            let is = l / 16;
                            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
                            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
                            let s = |i: usize| f32::from(sc[i] as i8);
                            out[128 * n + l] = d * s(is) * f32::from(q1);
                            out[128 * n + l + 32] = d * s(is + 2) * f32::from(q2);
                            out[128 * n + l + 64] = d * s(is + 4) * f32::from(q3);
                            out[128 * n + l + 96] = d * s(is + 6) * f32::from(q4);
                        }
                    }
                    y.extend_from_slice(&out);
                }
            }
            _ => unreachable!(),
        }
        y
    }

    #[test]
    fn decoding_matches_llama_cpp_loops_bit_for_bit() {
        for format in [
            WeightFormat::Q8_0,
            WeightFormat::Q4K,
            WeightFormat::Q5K,
            WeightFormat::Q6K,
        ] {
            let cols = 512;
            let blocks = 3 * cols / format.block_elems();
            let data = random_blocks(format, blocks, 7 + format.index() as u64);
            let m = QuantMatrix::from_bytes(format, 1, 3, cols, data.clone()).unwrap();
            let ours: Vec<u32> = m.dequantize().iter().map(|v| v.to_bits()).collect();
            let theirs: Vec<u32> = llama_dequantize(format, &data)
                .iter()
                .map(|v| v.to_bits())
                .collect();
            assert_eq!(ours, theirs, "{format}");
            // The canonical blocks carry the same values: ws * q + wm, d * sc * q.
            for b in 0..cols / 32 {
                let blk = decode_block(format, m.row(0, 1), b);
                for l in 0..32 {
                    let v = match blk.scale {
                        WScale::Q8 { d } => f32::from(blk.q[l]) * d,
                        WScale::KMin { ws, wm } => ws * f32::from(blk.q[l]) + wm,
                        WScale::Q6 { d, sc } => d * f32::from(sc[l / 16]) * f32::from(blk.q[l]),
                        WScale::Q2 { d, dmin, sc, m } => {
                            d * f32::from(sc[l / 16]) * f32::from(blk.q[l])
                                - dmin * f32::from(m[l / 16])
                        }
                    };
                    assert_eq!(v.to_bits(), theirs[cols + 32 * b + l], "{format} block {b}");
                }
            }
        }
    }

    #[test]
    fn hand_made_blocks() {
        // Q8_0: d = 0.25, codes 0, 1, -1, 127, -127, ...
        let mut b = f16::from_f32(0.25).to_le_bytes().to_vec();
        let codes: Vec<i8> = (0..32).map(|i| [0, 1, -1, 127, -127][i % 5]).collect();
        b.extend(codes.iter().map(|&c| c as u8));
        let m = QuantMatrix::from_bytes(WeightFormat::Q8_0, 1, 1, 32, b).unwrap();
        let want: Vec<f32> = codes.iter().map(|&c| f32::from(c) / 4.0).collect();
        assert_eq!(m.dequantize(), want);

        // Q4_K: d = 2, dmin = 0.5, sub-block 0 scale 3 min 1, sub-block 5 scale 17 min 40
        // (high bits in the third row of the scale bytes), every code of sub-block 0 = 7 and of
        // sub-block 5 = 9: values 2*3*7 - 0.5*1 = 41.5 and 2*17*9 - 0.5*40 = 286.
        let mut b = vec![0u8; 144];
        b[0..2].copy_from_slice(&f16::from_f32(2.0).to_le_bytes());
        b[2..4].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        let s = &mut b[4..16];
        s[0] = 3; // sc0
        s[4] = 1; // m0
        s[1] |= (17 >> 4) << 6; // sc5 high bits in s[1]
        s[5] |= (40 >> 4) << 6; // m5 high bits in s[5]
        s[9] = (17 & 0xF) | ((40 & 0xF) << 4); // sc5, m5 low bits
        for l in 0..32 {
            b[16 + l] = 7; // sub-block 0: low nibbles of chunk 0
            b[16 + 64 + l] = 9 << 4; // sub-block 5: high nibbles of chunk 2
        }
        let v = QuantMatrix::from_bytes(WeightFormat::Q4K, 1, 1, 256, b)
            .unwrap()
            .dequantize();
        assert!(v[..32].iter().all(|&x| x == 41.5), "{:?}", &v[..4]);
        assert!(
            v[160..192].iter().all(|&x| x == 286.0),
            "{:?}",
            &v[160..164]
        );
        assert!(v[32..64].iter().all(|&x| x == 0.0));

        // Q6_K: d = 0.5, scale of sub-block 3 (elements 48..64) = -2, codes there 63 -> 31:
        // 0.5 * -2 * 31 = -31. Elements 48..64 are t = 1 (ql[l + 32] low nibble, qh bits 2..4)
        // for l = 16..32.
        let mut b = vec![0u8; 210];
        b[208..210].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        b[192 + 3] = (-2i8) as u8;
        for l in 16..32 {
            b[l + 32] = 0xF;
            b[128 + l] = 3 << 2;
        }
        let v = QuantMatrix::from_bytes(WeightFormat::Q6K, 1, 1, 256, b)
            .unwrap()
            .dequantize();
        assert!(v[48..64].iter().all(|&x| x == -31.0), "{:?}", &v[48..52]);
        assert!(v[..48].iter().all(|&x| x == 0.0));
    }

    #[test]
    fn encoders_round_trip() {
        // Values on the Q8_0 grid come back exactly.
        let x: Vec<f32> = (0..64).map(|i| (i as f32 - 32.0) * 0.125).collect();
        let back = QuantMatrix::quantize(WeightFormat::Q8_0, &x, 1, 1, 64)
            .unwrap()
            .dequantize();
        let amax = 4.0f32;
        for (a, b) in x.iter().zip(&back) {
            assert!((a - b).abs() <= amax / 127.0 / 2.0 * 1.01, "{a} {b}");
        }
        // Every format: error within half a quantization step of the block's range.
        let x: Vec<f32> = (0..1024)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        for format in WeightFormat::ALL {
            let back = QuantMatrix::quantize(format, &x, 1, 2, 512)
                .unwrap()
                .dequantize();
            let step = match format {
                WeightFormat::F32 => 0.0,
                WeightFormat::F16 => 1e-3,
                WeightFormat::BF16 => 1e-2,
                WeightFormat::Q8_0 => 2.0 / 127.0,
                WeightFormat::Q6K => 4.0 / 31.0,
                WeightFormat::Q5K => 4.0 / 31.0 + 0.1,
                WeightFormat::Q4K => 4.0 / 15.0 + 0.1,
                WeightFormat::Q4_0 => 2.0 / 8.0,
                WeightFormat::Q4_1 => 4.0 / 15.0,
                WeightFormat::Q5_0 => 2.0 / 16.0,
                WeightFormat::Q5_1 => 4.0 / 31.0,
                WeightFormat::Q2K => 4.0 / 3.0,
                WeightFormat::Q3K => 2.0 / 4.0 + 0.1,
                WeightFormat::IQ4NL => 0.25,
                WeightFormat::IQ4XS => 0.3,
                WeightFormat::MXFP4 => 0.5,
            };
            let worst = x
                .iter()
                .zip(&back)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(worst <= step, "{format}: worst error {worst} > {step}");
        }
        // F16 and BF16 round to nearest even.
        let v = 1.0 + f32::EPSILON * 2048.0 * 1.5; // halfway-ish between two f16 values
        let h = QuantMatrix::quantize(WeightFormat::F16, &[v], 1, 1, 1).unwrap();
        assert_eq!(h.dequantize()[0], f16::from_f32(v).to_f32());
    }

    #[test]
    fn names_parse() {
        for f in WeightFormat::ALL {
            assert_eq!(WeightFormat::parse(f.name()), Some(f));
        }
        assert_eq!(WeightFormat::parse("q4k"), Some(WeightFormat::Q4K));
        assert_eq!(WeightFormat::parse("iq4xs"), Some(WeightFormat::IQ4XS));
        assert_eq!(WeightFormat::parse("IQ2_XXS"), None);
    }

    /// `cuda/gemm.cu` names each format with a `#define FMT_<name> <index>`; the kernels pick
    /// their decode by it and the wrappers by [`WeightFormat::index`]. Nothing else ties the
    /// two lists together, so this does: every format once, at its index.
    #[test]
    fn cuda_format_constants_match_the_enum() {
        let src = include_str!("../../cuda/gemm.cu");
        let mut seen = Vec::new();
        for line in src.lines() {
            let Some(rest) = line.strip_prefix("#define FMT_") else {
                continue;
            };
            let mut it = rest.split_whitespace();
            let (name, value) = (it.next().unwrap(), it.next().unwrap());
            let f = WeightFormat::parse(name)
                .unwrap_or_else(|| panic!("FMT_{name} names no WeightFormat"));
            assert_eq!(value.parse::<usize>().unwrap(), f.index(), "FMT_{name}");
            seen.push(f);
        }
        assert_eq!(
            seen.len(),
            WeightFormat::CORE.len() + WeightFormat::GENERIC_ONLY.len(),
            "one FMT_ constant per format with kernels"
        );
        for f in WeightFormat::CORE
            .into_iter()
            .chain(WeightFormat::GENERIC_ONLY)
        {
            assert!(seen.contains(&f), "no FMT_ constant for {f}");
        }
    }
}
