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
    /// Q2_K: `w = d * sc * q - dmin * m` with a 4-bit scale and a 4-bit min per 16 elements
    /// (`[0]` for elements 0..16 of the block, `[1]` for 16..32).
    Q2 {
        /// The super-block scale (f16 widened, exact).
        d: f32,
        /// The super-block min scale (f16 widened, exact).
        dmin: f32,
        /// The two sub-block scales.
        sc: [u8; 2],
        /// The two sub-block mins.
        m: [u8; 2],
    },
}

/// IQ4_NL's (and IQ4_XS's) grid: code `i` stands for `KVALUES_IQ4NL[i]`.
pub const KVALUES_IQ4NL: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// MXFP4's e2m1 values, doubled to integers: code `i` stands for `KVALUES_MXFP4[i] / 2`.
pub const KVALUES_MXFP4: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// MXFP4's block scale: E8M0 `e` as `2^(e - 128)` (half of `2^(e - 127)`, which the doubled
/// values make up), exact in f32 for every `e` (subnormal for `e < 2`).
pub fn e8m0_half(e: u8) -> f32 {
    if e < 2 {
        f32::from_bits(0x0020_0000 << e)
    } else {
        f32::from_bits(u32::from(e - 1) << 23)
    }
}

/// The 16 six-bit scales of a Q3_K super-block from its 12 packed bytes (llama.cpp's
/// `kmask` unpacking), each minus 32.
pub(crate) fn q3k_scales(b: &[u8]) -> [i8; 16] {
    let mut out = [0i8; 16];
    for (j, o) in out.iter_mut().enumerate() {
        let low = if j < 8 { b[j] & 0xF } else { b[j - 8] >> 4 };
        let high = (b[8 + j % 4] >> (2 * (j / 4))) & 3;
        *o = (low | (high << 4)) as i8 - 32;
    }
    out
}

/// Nibble `l` (0..32) of a 16-byte half-split block: low nibbles are elements 0..16, high
/// nibbles 16..32.
fn nibble(qs: &[u8], l: usize) -> u8 {
    if l < 16 {
        qs[l] & 0xF
    } else {
        qs[l - 16] >> 4
    }
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
        WeightFormat::Q4_0 | WeightFormat::IQ4NL => {
            let base = 18 * b;
            for (l, v) in q.iter_mut().enumerate() {
                let c = nibble(&row[base + 2..], l);
                *v = match format {
                    WeightFormat::Q4_0 => c as i8 - 8,
                    _ => KVALUES_IQ4NL[c as usize],
                };
            }
            WScale::Q8 {
                d: f16_at(row, base),
            }
        }
        WeightFormat::Q4_1 => {
            let base = 20 * b;
            for (l, v) in q.iter_mut().enumerate() {
                *v = nibble(&row[base + 4..], l) as i8;
            }
            WScale::KMin {
                ws: f16_at(row, base),
                wm: f16_at(row, base + 2),
            }
        }
        WeightFormat::Q5_0 | WeightFormat::Q5_1 => {
            let one = format == WeightFormat::Q5_1;
            let base = if one { 24 } else { 22 } * b;
            let hb = base + if one { 4 } else { 2 };
            let qh = u32::from_le_bytes([row[hb], row[hb + 1], row[hb + 2], row[hb + 3]]);
            for (l, v) in q.iter_mut().enumerate() {
                let c = nibble(&row[hb + 4..], l) | ((((qh >> l) & 1) as u8) << 4);
                *v = if one { c as i8 } else { c as i8 - 16 };
            }
            match one {
                true => WScale::KMin {
                    ws: f16_at(row, base),
                    wm: f16_at(row, base + 2),
                },
                false => WScale::Q8 {
                    d: f16_at(row, base),
                },
            }
        }
        WeightFormat::MXFP4 => {
            let base = 17 * b;
            for (l, v) in q.iter_mut().enumerate() {
                *v = KVALUES_MXFP4[nibble(&row[base + 1..], l) as usize];
            }
            WScale::Q8 {
                d: e8m0_half(row[base]),
            }
        }
        WeightFormat::IQ4XS => {
            let base = 136 * (b / 8);
            let j = b % 8;
            let d = f16_at(row, base);
            let sh = u16::from_le_bytes([row[base + 2], row[base + 3]]);
            let ls = ((row[base + 4 + j / 2] >> (4 * (j % 2))) & 0xF)
                | ((((sh >> (2 * j)) & 3) as u8) << 4);
            for (l, v) in q.iter_mut().enumerate() {
                *v = KVALUES_IQ4NL[nibble(&row[base + 8 + 16 * j..], l) as usize];
            }
            WScale::Q8 {
                d: d * f32::from(i16::from(ls) - 32),
            }
        }
        WeightFormat::Q2K => {
            // Block j of the super-block: half n = j / 4 (32 bytes of codes), shift 2 (j % 4).
            let base = 84 * (b / 8);
            let j = b % 8;
            let qs = base + 16 + 32 * (j / 4);
            let shift = 2 * (j % 4);
            for (l, v) in q.iter_mut().enumerate() {
                *v = ((row[qs + l] >> shift) & 3) as i8;
            }
            let (s0, s1) = (row[base + 2 * j], row[base + 2 * j + 1]);
            WScale::Q2 {
                d: f16_at(row, base + 80),
                dmin: f16_at(row, base + 82),
                sc: [s0 & 0xF, s1 & 0xF],
                m: [s0 >> 4, s1 >> 4],
            }
        }
        WeightFormat::Q3K => {
            let base = 110 * (b / 8);
            let j = b % 8;
            let qs = base + 32 + 32 * (j / 4);
            let shift = 2 * (j % 4);
            for (l, v) in q.iter_mut().enumerate() {
                let low = ((row[qs + l] >> shift) & 3) as i8;
                // A clear bit of the high mask subtracts 4 (llama.cpp's `hm & m ? 0 : 4`).
                let high = (row[base + l] >> j) & 1;
                *v = low - if high == 0 { 4 } else { 0 };
            }
            let sc = q3k_scales(&row[base + 96..base + 108]);
            WScale::Q6 {
                d: f16_at(row, base + 108),
                sc: [sc[2 * j], sc[2 * j + 1]],
            }
        }
        WeightFormat::F32 | WeightFormat::F16 | WeightFormat::BF16 => {
            panic!("decode_block: {format} is not block-quantized")
        }
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
        (_, WScale::KMin { ws, wm }) => {
            // Q4_1 and Q5_1: `d * q + m`.
            for (o, &q) in out.iter_mut().zip(&blk.q) {
                *o = ws * f32::from(q) + wm;
            }
        }
        (_, WScale::Q6 { d, sc }) => {
            for (l, (o, &q)) in out.iter_mut().zip(&blk.q).enumerate() {
                *o = d * f32::from(sc[l / 16]) * f32::from(q);
            }
        }
        (_, WScale::Q2 { d, dmin, sc, m }) => {
            for (l, (o, &q)) in out.iter_mut().zip(&blk.q).enumerate() {
                let (dl, ml) = (d * f32::from(sc[l / 16]), dmin * f32::from(m[l / 16]));
                *o = dl * f32::from(q) - ml;
            }
        }
    }
    out
}
