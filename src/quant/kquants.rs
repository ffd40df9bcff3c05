//! Decoding of the quantized formats into 32-element blocks.

use super::{f16_at, WeightFormat};

/// The scalars of one 32-element weight block, as the canonical dot product uses them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum WScale {
    /// Q8_0: `w = d * q`.
    Q8 {
        /// The block scale (f16 widened, exact).
        d: f32,
    },
    /// Q4_K and Q5_K: `w = d * sc * q - dmin * m`, carried as `ws = d * sc` (one rounding)
    /// and `wm = -(dmin * m)` (one rounding).
    KMin {
        /// `d * sc`, rounded to f32.
        ws: f32,
        /// `-(dmin * m)`, rounded to f32.
        wm: f32,
    },
    /// Q6_K: `w = d * sc * q` with one 8-bit scale per 16 elements: `sc[0]` for elements
    /// 0..16 of the block, `sc[1]` for 16..32.
    Q6 {
        /// The super-block scale (f16 widened, exact).
        d: f32,
        /// The two sub-block scales.
        sc: [i8; 2],
    },
}

/// One 32-element block of a quantized row: signed codes and their scales. (Q4_K/Q5_K codes
/// are 0..16 / 0..32, Q6_K codes are already `q - 32`.)
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WBlock {
    /// The 32 integer codes.
    pub q: [i8; 32],
    /// Their scales.
    pub scale: WScale,
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K/Q5_K super-block (llama.cpp's
/// `get_scale_min_k4`).
pub(crate) fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Decodes 32-element block `b` of a quantized `row`.
///
/// # Panics
/// For a float format, or when the row is too short for block `b`.
pub fn decode_block(format: WeightFormat, row: &[u8], b: usize) -> WBlock {
    let mut q = [0i8; 32];
    let scale = match format {
        WeightFormat::Q8_0 => {
            let base = 34 * b;
            for (l, v) in q.iter_mut().enumerate() {
                *v = row[base + 2 + l] as i8;
            }
            WScale::Q8 {
                d: f16_at(row, base),
            }
        }
        WeightFormat::Q4K | WeightFormat::Q5K => {
            let five = format == WeightFormat::Q5K;
            let base = if five { 176 } else { 144 } * (b / 8);
            let j = b % 8;
            let d = f16_at(row, base);
            let dmin = f16_at(row, base + 2);
            let (sc, m) = scale_min_k4(j, &row[base + 4..base + 16]);
            let qs = base + if five { 48 } else { 16 } + 32 * (j / 2);
            for (l, v) in q.iter_mut().enumerate() {
                let byte = row[qs + l];
                let mut code = if j % 2 == 0 { byte & 0xF } else { byte >> 4 };
                if five {
                    code |= ((row[base + 16 + l] >> j) & 1) << 4;
                }
                *v = code as i8;
            }
            WScale::KMin {
                ws: d * f32::from(sc),
                wm: -(dmin * f32::from(m)),
            }
        }
        WeightFormat::Q6K => {
            let base = 210 * (b / 8);
            let j = b % 8;
            let (half, t) = (j / 4, j % 4);
            let ql = base + 64 * half + if t % 2 == 1 { 32 } else { 0 };
            let qh = base + 128 + 32 * half;
            for (l, v) in q.iter_mut().enumerate() {
                let lo = if t < 2 {
                    row[ql + l] & 0xF
                } else {
                    row[ql + l] >> 4
                };
                let hi = (row[qh + l] >> (2 * t)) & 3;
                *v = ((lo | (hi << 4)) as i8) - 32;
            }
            WScale::Q6 {
                d: f16_at(row, base + 208),
                sc: [
                    row[base + 192 + 2 * j] as i8,
                    row[base + 192 + 2 * j + 1] as i8,
                ],
            }
        }
        _ => panic!("decode_block: {format} is not block-quantized"),
    };
    WBlock { q, scale }
}

/// The 32 values of block `b` as llama.cpp's `dequantize_row_*` computes them.
pub(crate) fn dequantize_block32(format: WeightFormat, row: &[u8], b: usize) -> [f32; 32] {
    let blk = decode_block(format, row, b);
    let mut out = [0.0f32; 32];
    match (format, blk.scale) {
        (_, WScale::Q8 { d }) => {
            for (o, &q) in out.iter_mut().zip(&blk.q) {
                *o = f32::from(q) * d;
            }
        }
        (WeightFormat::Q4K | WeightFormat::Q5K, WScale::KMin { .. }) => {
            let base = if format == WeightFormat::Q5K {
                176
            } else {
                144
            } * (b / 8);
            let (sc, m) = scale_min_k4(b % 8, &row[base + 4..base + 16]);
            let d1 = f16_at(row, base) * f32::from(sc);
            let m1 = f16_at(row, base + 2) * f32::from(m);
            for (o, &q) in out.iter_mut().zip(&blk.q) {
                *o = d1 * f32::from(q) - m1;
            }
        }
        (_, WScale::Q6 { d, sc }) => {
            for (l, (o, &q)) in out.iter_mut().zip(&blk.q).enumerate() {
                *o = d * f32::from(sc[l / 16]) * f32::from(q);
            }
        }
        _ => unreachable!("decode_block pairs formats and scales"),
    }
    out
}
