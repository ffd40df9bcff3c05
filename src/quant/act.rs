//! Activation quantization for the quantized matrix products (reference of
//! `cuda/quantize.cu`): each token's row on its own, in blocks of 32, so it cannot depend on
//! the batch.
//!
//! Per block `x[0..32]`:
//! 1. If any element is NaN or ±inf: `d = NaN`, codes 0, `a = NaN` (every product that reads
//!    the block becomes NaN, as float arithmetic would).
//! 2. `amax = max |x_i|` (exact), `d = amax / 127` (IEEE division).
//! 3. `q_i = clamp(round_ties_even(x_i / d), -127, 127)`, and `q_i = 0` when the quotient is NaN
//!    (`d = 0`: all-zero blocks, or an `amax` so small that `amax / 127` underflows).
//! 4. `s = Σ q_i` (exact integer) and `a = d * s` (one rounding): the block term that Q4_K and
//!    Q5_K need for their sub-block minimums.
//!
//! The exact integer order of the products ([`crate::reference::gemm::GemmOrder::Exact`])
//! quantizes with [`quantize_act_exact`]: the same steps, with `d` in step 2 rounded up to 11
//! significant bits (the f32 `amax / 127` with its low 13 fraction bits cleared and, when any
//! was set, one unit of the 13th added), so every block term is a product of at most
//! 11 + 19 + 27 bits and a kernel can form it in one 64-bit integer. `a` stays `d * s`
//! rounded (the exact order does not read it).

use crate::math::CANON_NAN;

/// Elements per activation block.
pub const ACT_BLOCK: usize = 32;

/// Quantized activations `[n, k]`: int8 codes, and per block of 32 the scale `d` and `a = d * s`.
#[derive(Clone, Debug, PartialEq)]
pub struct ActQ8 {
    /// Rows.
    pub n: usize,
    /// Columns (a multiple of 32).
    pub k: usize,
    /// `[n, k]` codes.
    pub codes: Vec<i8>,
    /// `[n, k / 32]` block scales.
    pub d: Vec<f32>,
    /// `[n, k / 32]` `d * Σ codes`.
    pub a: Vec<f32>,
}

/// Quantizes one block of 32 (see the module docs): `(codes, d, a)`.
pub fn quantize_block(x: &[f32]) -> ([i8; 32], f32, f32) {
    quantize_block_with(x, false)
}

/// [`quantize_block`] with the scale rounded up to 11 significant bits (the exact order's).
pub fn quantize_block_exact(x: &[f32]) -> ([i8; 32], f32, f32) {
    quantize_block_with(x, true)
}

/// `d` rounded up to 11 significant bits (a positive finite f32; subnormals by the same mask).
pub fn round_up_11_bits(d: f32) -> f32 {
    const LOW: u32 = (1 << 13) - 1;
    let b = d.to_bits();
    f32::from_bits(if b & LOW == 0 { b } else { (b | LOW) + 1 })
}

fn quantize_block_with(x: &[f32], eleven_bits: bool) -> ([i8; 32], f32, f32) {
    debug_assert_eq!(x.len(), ACT_BLOCK);
    let mut q = [0i8; 32];
    if x.iter().any(|v| !v.is_finite()) {
        return (q, CANON_NAN, CANON_NAN);
    }
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let d = if eleven_bits { round_up_11_bits(d) } else { d };
    let mut s = 0i32;
    for (c, &v) in q.iter_mut().zip(x) {
        let r = (v / d).round_ties_even();
        let code = if r.is_nan() {
            0
        } else {
            r.clamp(-127.0, 127.0) as i32
        };
        *c = code as i8;
        s += code;
    }
    (q, d, d * s as f32)
}

/// Quantizes `x: [n, k]` row by row (`k % 32 == 0`).
///
/// # Panics
/// If `k % 32 != 0` or `x.len() != n * k`.
pub fn quantize_act(x: &[f32], n: usize, k: usize) -> ActQ8 {
    quantize_act_with(x, n, k, quantize_block)
}

/// [`quantize_act`] with the exact order's 11-bit scales ([`quantize_block_exact`]).
///
/// # Panics
/// As [`quantize_act`].
pub fn quantize_act_exact(x: &[f32], n: usize, k: usize) -> ActQ8 {
    quantize_act_with(x, n, k, quantize_block_exact)
}

/// One block's quantizer: `(codes, d, a)` of 32 values.
type BlockQuantizer = fn(&[f32]) -> ([i8; 32], f32, f32);

fn quantize_act_with(x: &[f32], n: usize, k: usize, block: BlockQuantizer) -> ActQ8 {
    assert_eq!(k % ACT_BLOCK, 0, "quantize_act: k % 32");
    assert_eq!(x.len(), n * k, "quantize_act: x");
    let nb = k / ACT_BLOCK;
    let mut out = ActQ8 {
        n,
        k,
        codes: vec![0; n * k],
        d: vec![0.0; n * nb],
        a: vec![0.0; n * nb],
    };
    for (blk, chunk) in x.chunks_exact(ACT_BLOCK).enumerate() {
        let (q, d, a) = block(chunk);
        out.codes[blk * ACT_BLOCK..][..ACT_BLOCK].copy_from_slice(&q);
        out.d[blk] = d;
        out.a[blk] = a;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eleven_bit_scales_round_up_and_keep_codes_in_range() {
        assert_eq!(round_up_11_bits(1.0), 1.0);
        assert_eq!(
            round_up_11_bits(f32::from_bits(0x3f80_0001)),
            1.0 + 1.0 / 1024.0
        );
        assert_eq!(round_up_11_bits(f32::from_bits(0x3fff_ffff)), 2.0);
        assert_eq!(round_up_11_bits(f32::from_bits(1)), f32::from_bits(1 << 13));
        let mut s = 0x1234_5678u32;
        for _ in 0..2000 {
            let x: Vec<f32> = (0..32)
                .map(|_| {
                    s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    f32::from_bits(s >> 2 | (s & 1) << 31).clamp(-1e30, 1e30)
                })
                .collect();
            let (q, d, _) = quantize_block_exact(&x);
            let (_, d0, _) = quantize_block(&x);
            assert!(d >= d0 && d.to_bits() & 0x1fff == 0 && d <= d0 * (1.0 + 1.0 / 1024.0));
            assert!(q.iter().all(|&c| c >= -127));
        }
    }
}
