//! bitexact's encoders: f32 rows into each weight format.
//!
//! They make valid GGUF blocks from synthetic weights; they are simple (one pass, no search for
//! the best scales as llama.cpp's `make_qkx2_quants` does), deterministic, and round half to
//! even throughout. Q8_0 follows llama.cpp's `quantize_row_q8_0_ref` (`d = amax / 127`,
//! codes from the unrounded `d`).

use half::{bf16, f16};

use super::WeightFormat;

fn rne(x: f32) -> f32 {
    x.round_ties_even()
}

/// `v / s` rounded half to even and clamped to `lo..=hi`; `0` when `s` is zero or the quotient
/// is NaN.
fn code(v: f32, s: f32, lo: f32, hi: f32) -> i32 {
    if s == 0.0 {
        return 0;
    }
    let q = rne(v / s);
    if q.is_nan() {
        0
    } else {
        q.clamp(lo, hi) as i32
    }
}

/// Encodes one row (`values.len()` a multiple of the format's block) into `out`.
pub(super) fn encode_row(format: WeightFormat, values: &[f32], out: &mut [u8]) {
    match format {
        WeightFormat::F32 => {
            for (o, v) in out.chunks_exact_mut(4).zip(values) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        WeightFormat::F16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(values) {
                o.copy_from_slice(&f16::from_f32(*v).to_le_bytes());
            }
        }
        WeightFormat::BF16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(values) {
                o.copy_from_slice(&bf16::from_f32(*v).to_le_bytes());
            }
        }
        WeightFormat::Q8_0 => {
            for (o, x) in out.chunks_exact_mut(34).zip(values.chunks_exact(32)) {
                encode_q8_0(x, o);
            }
        }
        WeightFormat::Q4K | WeightFormat::Q5K => {
            let five = format == WeightFormat::Q5K;
            let bytes = if five { 176 } else { 144 };
            for (o, x) in out.chunks_exact_mut(bytes).zip(values.chunks_exact(256)) {
                encode_k_min(x, o, five);
            }
        }
        WeightFormat::Q6K => {
            for (o, x) in out.chunks_exact_mut(210).zip(values.chunks_exact(256)) {
                encode_q6_k(x, o);
            }
        }
        WeightFormat::Q4_0
        | WeightFormat::Q4_1
        | WeightFormat::Q5_0
        | WeightFormat::Q5_1
        | WeightFormat::IQ4NL
        | WeightFormat::MXFP4 => {
            let bb = format.block_bytes();
            for (o, x) in out.chunks_exact_mut(bb).zip(values.chunks_exact(32)) {
                encode_block32(format, x, o);
            }
        }
        WeightFormat::Q2K => {
            for (o, x) in out.chunks_exact_mut(84).zip(values.chunks_exact(256)) {
                encode_q2_k(x, o);
            }
        }
        WeightFormat::Q3K => {
            for (o, x) in out.chunks_exact_mut(110).zip(values.chunks_exact(256)) {
                encode_q3_k(x, o);
            }
        }
        WeightFormat::IQ4XS => {
            for (o, x) in out.chunks_exact_mut(136).zip(values.chunks_exact(256)) {
                encode_iq4_xs(x, o);
            }
        }
    }
}

/// The value of largest magnitude, with its sign (0 for an empty or all-zero slice).
fn signed_max(x: &[f32]) -> f32 {
    x.iter()
        .fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m })
}

/// Writes 32 codes (each below 16) as a half-split nibble block: element `l < 16` in the low
/// nibble of byte `l`, element `l + 16` in its high nibble.
fn put_nibbles(codes: &[u8], o: &mut [u8]) {
    for l in 0..16 {
        o[l] = (codes[l] & 0xF) | ((codes[l + 16] & 0xF) << 4);
    }
}

/// The index of the grid value nearest `v` (the first of two equally near).
fn nearest(grid: &[i8; 16], v: f32) -> u8 {
    let mut best = 0;
    for (i, &g) in grid.iter().enumerate() {
        if (f32::from(g) - v).abs() < (f32::from(grid[best]) - v).abs() {
            best = i;
        }
    }
    best as u8
}

/// A 32-block's codes after its scales: the low nibbles (16 bytes), preceded for the 5-bit
/// formats (`fifth`) by the fifth bits of the 32 codes as a little-endian u32 (`qh`).
fn put_codes(c: &[u8; 32], fifth: bool, o: &mut [u8]) {
    let at = if fifth {
        let qh: u32 = (0..32).map(|l| u32::from(c[l] >> 4) << l).sum();
        o[..4].copy_from_slice(&qh.to_le_bytes());
        4
    } else {
        0
    };
    put_nibbles(c, &mut o[at..at + 16]);
}

/// The 32-element formats: Q4_0 and Q5_0 (`d = signed max / -8` or `/ -16`, so the largest
/// magnitude takes the most negative code, as llama.cpp's reference quantizer does), Q4_1 and
/// Q5_1 (`d = (max - min) / levels`, `m = min`), IQ4_NL (`d = amax / 127`, each value the
/// nearest grid point) and MXFP4 (the smallest power-of-two scale under which the largest
/// magnitude fits the e2m1 grid, each value the nearest grid point).
fn encode_block32(format: WeightFormat, x: &[f32], o: &mut [u8]) {
    use super::kquants::{e8m0_half, KVALUES_IQ4NL, KVALUES_MXFP4};
    let mut c = [0u8; 32];
    match format {
        WeightFormat::Q4_0 | WeightFormat::Q5_0 => {
            let half = if format == WeightFormat::Q4_0 {
                8.0
            } else {
                16.0
            };
            let d = f16::from_f32(signed_max(x) / -half);
            let dq = d.to_f32();
            for (ci, &v) in c.iter_mut().zip(x) {
                *ci = (code(v, dq, -half, half - 1.0) + half as i32) as u8;
            }
            o[..2].copy_from_slice(&d.to_le_bytes());
            put_codes(&c, format == WeightFormat::Q5_0, &mut o[2..]);
        }
        WeightFormat::Q4_1 | WeightFormat::Q5_1 => {
            let levels = if format == WeightFormat::Q4_1 {
                15.0
            } else {
                31.0
            };
            let mn = x.iter().fold(f32::INFINITY, |m, &v| m.min(v));
            let mx = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let (d, m) = (f16::from_f32((mx - mn) / levels), f16::from_f32(mn));
            let (dq, mq) = (d.to_f32(), m.to_f32());
            for (ci, &v) in c.iter_mut().zip(x) {
                *ci = code(v - mq, dq, 0.0, levels) as u8;
            }
            o[..2].copy_from_slice(&d.to_le_bytes());
            o[2..4].copy_from_slice(&m.to_le_bytes());
            put_codes(&c, format == WeightFormat::Q5_1, &mut o[4..]);
        }
        WeightFormat::IQ4NL => {
            let amax = x.iter().fold(0.0f32, |m, &v| m.max(v.abs()));
            let d = f16::from_f32(amax / 127.0);
            let dq = d.to_f32();
            for (ci, &v) in c.iter_mut().zip(x) {
                *ci = nearest(&KVALUES_IQ4NL, if dq == 0.0 { 0.0 } else { v / dq });
            }
            o[..2].copy_from_slice(&d.to_le_bytes());
            put_nibbles(&c, &mut o[2..18]);
        }
        WeightFormat::MXFP4 => {
            let amax = x.iter().fold(0.0f32, |m, &v| m.max(v.abs()));
            // The smallest e whose 12 * 2^(e - 128) reaches amax (e = 0 for all zeros).
            let e = (0u8..=255)
                .find(|&e| 12.0 * e8m0_half(e) >= amax)
                .unwrap_or(255);
            let d = e8m0_half(e);
            for (ci, &v) in c.iter_mut().zip(x) {
                *ci = nearest(&KVALUES_MXFP4, v / d);
            }
            o[0] = e;
            put_nibbles(&c, &mut o[1..17]);
        }
        _ => unreachable!("encode_block32 takes the 32-element formats"),
    }
}

/// Q2_K: per sub-block of 16, `min = min(0, values)` and `scale = (max - min) / 3`; scales and
/// mins become 4-bit multiples of the f16 `d = max scale / 15` and `dmin = max min / 15`.
fn encode_q2_k(x: &[f32], o: &mut [u8]) {
    let (mut scale, mut min) = ([0.0f32; 16], [0.0f32; 16]);
    for k in 0..16 {
        let sb = &x[16 * k..16 * k + 16];
        let mn = sb.iter().fold(0.0f32, |m, &v| m.min(v));
        let mx = sb.iter().fold(mn, |m, &v| m.max(v));
        scale[k] = (mx - mn) / 3.0;
        min[k] = -mn;
    }
    let d = f16::from_f32(scale.iter().fold(0.0f32, |m, &v| m.max(v)) / 15.0);
    let dmin = f16::from_f32(min.iter().fold(0.0f32, |m, &v| m.max(v)) / 15.0);
    let (dq, dminq) = (d.to_f32(), dmin.to_f32());
    o[..84].fill(0);
    for k in 0..16 {
        let sc = code(scale[k], dq, 0.0, 15.0) as u8;
        let m = code(min[k], dminq, 0.0, 15.0) as u8;
        o[k] = sc | (m << 4);
        let (eff, off) = (dq * f32::from(sc), dminq * f32::from(m));
        // Sub-block k: 32-block j = k / 2 (half n = j / 4, shift 2 (j % 4)), elements
        // 16 (k % 2) .. of its 32 code bytes.
        let j = k / 2;
        for l in 0..16 {
            let q = code(x[16 * k + l] + off, eff, 0.0, 3.0) as u8;
            o[16 + 32 * (j / 4) + 16 * (k % 2) + l] |= q << (2 * (j % 4));
        }
    }
    o[80..82].copy_from_slice(&d.to_le_bytes());
    o[82..84].copy_from_slice(&dmin.to_le_bytes());
}

/// Q3_K: per sub-block of 16, `scale = (value of largest magnitude) / -4`; the scales become
/// signed 6-bit multiples of the f16 `d = max |scale| / 31`; codes in -4..=3.
fn encode_q3_k(x: &[f32], o: &mut [u8]) {
    let mut s = [0.0f32; 16];
    for (k, sk) in s.iter_mut().enumerate() {
        *sk = signed_max(&x[16 * k..16 * k + 16]) / -4.0;
    }
    let d = f16::from_f32(s.iter().fold(0.0f32, |m, &v| m.max(v.abs())) / 31.0);
    let dq = d.to_f32();
    o[..110].fill(0);
    let mut packed = [0u8; 16];
    for k in 0..16 {
        let sc = code(s[k], dq, -32.0, 31.0);
        packed[k] = (sc + 32) as u8;
        let eff = dq * sc as f32;
        let j = k / 2;
        for l in 0..16 {
            let q = (code(x[16 * k + l], eff, -4.0, 3.0) + 4) as u8;
            let at = 16 * (k % 2) + l;
            o[32 + 32 * (j / 4) + at] |= (q & 3) << (2 * (j % 4));
            o[at] |= (q >> 2) << j;
        }
    }
    for (k, &v) in packed.iter().enumerate() {
        if k < 8 {
            o[96 + k] |= v & 0xF;
        } else {
            o[96 + k - 8] |= (v & 0xF) << 4;
        }
        o[96 + 8 + k % 4] |= (v >> 4) << (2 * (k / 4));
    }
    o[108..110].copy_from_slice(&d.to_le_bytes());
}

/// IQ4_XS: per sub-block of 32, `scale = amax / 127`; the scales become signed 6-bit
/// multiples of the f16 `d = max scale / 31`; each value the nearest IQ4 grid point.
fn encode_iq4_xs(x: &[f32], o: &mut [u8]) {
    use super::kquants::KVALUES_IQ4NL;
    let mut s = [0.0f32; 8];
    for (j, sj) in s.iter_mut().enumerate() {
        *sj = x[32 * j..32 * j + 32]
            .iter()
            .fold(0.0f32, |m, &v| m.max(v.abs()))
            / 127.0;
    }
    let d = f16::from_f32(s.iter().fold(0.0f32, |m, &v| m.max(v)) / 31.0);
    let dq = d.to_f32();
    o[..136].fill(0);
    let mut sh = 0u16;
    for j in 0..8 {
        let ls = (code(s[j], dq, -32.0, 31.0) + 32) as u8;
        o[4 + j / 2] |= (ls & 0xF) << (4 * (j % 2));
        sh |= u16::from(ls >> 4) << (2 * j);
        let dl = dq * f32::from(i16::from(ls) - 32);
        let mut c = [0u8; 32];
        for (l, cl) in c.iter_mut().enumerate() {
            let v = x[32 * j + l];
            *cl = nearest(&KVALUES_IQ4NL, if dl == 0.0 { 0.0 } else { v / dl });
        }
        put_nibbles(&c, &mut o[8 + 16 * j..8 + 16 * j + 16]);
    }
    o[..2].copy_from_slice(&d.to_le_bytes());
    o[2..4].copy_from_slice(&sh.to_le_bytes());
}

fn encode_q8_0(x: &[f32], o: &mut [u8]) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    o[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    for (b, &v) in o[2..].iter_mut().zip(x) {
        *b = code(v * id, 1.0, -127.0, 127.0) as i8 as u8;
    }
}

/// Q4_K (`five == false`) or Q5_K: per sub-block of 32, `scale = (max - min) / levels` with
/// `min = min(0, values)`; the sub-block scales and mins become 6-bit multiples of the f16
/// super-block `d = max scale / 63` and `dmin = max min / 63`.
fn encode_k_min(x: &[f32], o: &mut [u8], five: bool) {
    let levels = if five { 31.0 } else { 15.0 };
    let mut scale = [0.0f32; 8];
    let mut min = [0.0f32; 8];
    for j in 0..8 {
        let sb = &x[32 * j..32 * j + 32];
        let mn = sb.iter().fold(0.0f32, |m, &v| m.min(v));
        let mx = sb.iter().fold(mn, |m, &v| m.max(v));
        scale[j] = (mx - mn) / levels;
        min[j] = -mn;
    }
    let d = f16::from_f32(scale.iter().fold(0.0f32, |m, &v| m.max(v)) / 63.0);
    let dmin = f16::from_f32(min.iter().fold(0.0f32, |m, &v| m.max(v)) / 63.0);
    let (dq, dminq) = (d.to_f32(), dmin.to_f32());
    let mut sc = [0u8; 8];
    let mut m = [0u8; 8];
    let mut q = [0u8; 256];
    for j in 0..8 {
        sc[j] = code(scale[j], dq, 0.0, 63.0) as u8;
        m[j] = code(min[j], dminq, 0.0, 63.0) as u8;
        let eff = dq * f32::from(sc[j]);
        let off = dminq * f32::from(m[j]);
        for l in 0..32 {
            q[32 * j + l] = code(x[32 * j + l] + off, eff, 0.0, levels) as u8;
        }
    }
    o[0..2].copy_from_slice(&d.to_le_bytes());
    o[2..4].copy_from_slice(&dmin.to_le_bytes());
    let s = &mut o[4..16];
    for j in 0..4 {
        s[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        s[j + 4] = m[j] | ((m[j + 4] >> 4) << 6);
        s[j + 8] = (sc[j + 4] & 0xF) | ((m[j + 4] & 0xF) << 4);
    }
    let qs_at = if five { 48 } else { 16 };
    if five {
        o[16..48].fill(0);
    }
    for i in 0..4 {
        for l in 0..32 {
            let (lo, hi) = (q[64 * i + l], q[64 * i + 32 + l]);
            o[qs_at + 32 * i + l] = (lo & 0xF) | ((hi & 0xF) << 4);
            if five {
                o[16 + l] |= ((lo >> 4) << (2 * i)) | ((hi >> 4) << (2 * i + 1));
            }
        }
    }
}

/// Q6_K: per sub-block of 16, `scale = (value of largest magnitude) / 31`; the scales become
/// signed 8-bit multiples of the f16 `d = max |scale| / 127`; codes `q - 32` in -32..=31.
fn encode_q6_k(x: &[f32], o: &mut [u8]) {
    let mut s = [0.0f32; 16];
    for (k, sk) in s.iter_mut().enumerate() {
        let big = x[16 * k..16 * k + 16]
            .iter()
            .fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        *sk = big / 31.0;
    }
    let d = f16::from_f32(s.iter().fold(0.0f32, |m, &v| m.max(v.abs())) / 127.0);
    let dq = d.to_f32();
    let mut sc = [0i8; 16];
    let mut q = [0u8; 256];
    for k in 0..16 {
        sc[k] = code(s[k], dq, -128.0, 127.0) as i8;
        let eff = dq * f32::from(sc[k]);
        for l in 0..16 {
            q[16 * k + l] = (code(x[16 * k + l], eff, -32.0, 31.0) + 32) as u8;
        }
    }
    for n in 0..2 {
        for l in 0..32 {
            let q1 = q[128 * n + l];
            let q2 = q[128 * n + l + 32];
            let q3 = q[128 * n + l + 64];
            let q4 = q[128 * n + l + 96];
            o[64 * n + l] = (q1 & 0xF) | ((q3 & 0xF) << 4);
            o[64 * n + l + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4);
            o[128 + 32 * n + l] =
                (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
        }
    }
    for (k, &v) in sc.iter().enumerate() {
        o[192 + k] = v as u8;
    }
    o[208..210].copy_from_slice(&d.to_le_bytes());
}
