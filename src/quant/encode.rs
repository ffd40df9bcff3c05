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
    }
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
