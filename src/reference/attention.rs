//! Reference for the attention kernels (`cuda/attention.cu`): causal grouped-query attention
//! over a KV cache, in chunks of [`CHUNK`] positions folded left to right.
//!
//! The order is a function of the query's position `t` and the keys alone. Prefill walks the
//! chunks of a tile of queries in one block, decode spreads a query's chunks over many blocks
//! and folds their partials in a second launch; both perform exactly the operations below, so
//! a query gets the same bits in a prefill of any length, in any chunk, or decoded on its own.
//!
//! # The exact integer order (issue 31; CPU reference only, not the default)
//!
//! [`AttnOrder`] names how scores ([`QkMode`]) and chunk outputs ([`PvMode`]) are formed; the
//! default is the f32 chain above. [`QkMode::Exact`] and [`PvMode::Exact`] form them from
//! int8 digits whose products are summed exactly in integers, so a tensor-core kernel may sum
//! them in any order and still give these bits: each result is the one f32 rounding of an
//! exact integer times a power of two. With `S` slices ([`IntSlices`], 1 to 4) and
//! `B = 8 S - 2`:
//!
//! 1. **Exponent.** A finite vector `x` (a query row, a key row, a value row) gets
//!    `e = floor(log2(max_i |x_i|)) + 1`, the least integer with every `|x_i| < 2^e`, read from
//!    the bits of its max-abs element; subnormals count by their leading one (`2^-149` has
//!    `e = -148`), so `e` is in `[-148, 128]` ([`vec_exponent`]). A vector of zeros has no
//!    exponent. A vector holding a NaN or an infinity makes every result that reads it
//!    [`CANON_NAN`] (an f32 dot would give `±inf` for some of these; this order does not).
//! 2. **Fixed point.** `X_i = round_ties_even(x_i * 2^(B - e))`, the product formed exactly
//!    (an f64 holds it), rounded once; `|X_i| <= 2^B` ([`fixed_point`]). Subnormal elements
//!    are scaled like any other; elements of at most `2^(e - B - 1)` in magnitude become 0.
//! 3. **Digits.** `X_i = sum_s d_{s,i} 256^s` in balanced base 256, least significant first:
//!    `d_s` is the low byte of the remainder read as a signed byte, the remainder then
//!    `(r - d_s) / 256` ([`int8_digits`]). Digits are in `[-128, 127]`, the top one in
//!    `[-64, 64]` (which is why `B` is `8 S - 2`, not `8 S - 1`). A key's (a value row's)
//!    digits depend on that row alone, a query's on that query alone.
//! 4. **Slice pairs.** `P_{s,t} = sum_i dq_{s,i} dk_{t,i}` is exact in i32: `|d d'| <= 2^14`
//!    and `hd <= 256` terms give `|P| <= 2^22` (for outputs, 64 rows: `2^20`). The counted
//!    pairs are all `S * S` ([`SlicePairs::All`]: the exact product of the fixed-point
//!    vectors) or the Ozaki triangle `s + t >= S - 1` ([`SlicePairs::Triangle`]).
//! 5. **Combine and round once.** `D = sum over counted (s, t) of P_{s,t} 256^(s+t)`, exact in
//!    i128 (`|D| < 2^69`; i64 suffices for `S <= 3`), and the result is `D * 2^p` rounded once
//!    to the nearest f32, ties to even ([`round_scaled`]): gradual underflow (a subnormal
//!    result is rounded once at its own precision), overflow to `±inf`, `D = 0` gives `+0` (a
//!    negative `D` that rounds to zero gives `-0`). Where the result is normal this equals
//!    `(D as f32) * 2^p`.
//!
//! **Scores** ([`QkMode::Exact`], [`sliced_dot`]): `p = eq + ek - 2B`; a zero query or key
//! gives `+0` (unless the other holds a NaN or an infinity: NaN). Then `* scale` as in the f32
//! chain. Measured accuracy against f64: BENCHMARKS.md, issue 31.
//!
//! **Chunk outputs** ([`PvMode::Exact`], [`exact_pv`]): the chunk's `m`, `e_j = exp(s_j - m)`
//! (in `[0, 1]`) and `l` are those of the f32 chain. Over the rows the query reads (`j0..j1`,
//! `j1 <= t + 1`, so prefill, decode and any chunking agree), each nonzero value row `v_j` has
//! its exponent `ev_j` and `emax` is their maximum. The weight takes the row's exponent:
//! `U_j = round_ties_even(e_j * 2^(B + ev_j - emax))` (exact product, one rounding; 0 for a
//! zero row), the row `V_{j,d} = round_ties_even(v_j[d] * 2^(B - ev_j))`; both go to digits as
//! above, `P_{s,t}[d] = sum_j u_{s,j} v_{t,j,d}` (a `[queries, 64] x [64, hd]` integer GEMM per
//! pair), and `o[d] = round(D_d * 2^(emax - 2B))`. A NaN weight or a non-finite row makes the
//! whole `o` NaN; a chunk of zero rows gives `+0`. The fold ([`FoldState`]) is unchanged.

use crate::math::{canon, exp, CANON_NAN};
use crate::quant::act::{quantize_block, ACT_BLOCK};
use crate::reference::gemm::dot_f32;

/// Positions per chunk: chunk `c` holds cache rows `c * CHUNK .. (c + 1) * CHUNK`.
pub const CHUNK: usize = 64;

/// Lane partials of a chunk's softmax denominator (row `j` of the chunk feeds partial `j % 4`).
pub const SUM_PARTIALS: usize = 4;

/// The attention scale `1 / sqrt(hd)`, in f32.
pub fn scale(hd: usize) -> f32 {
    1.0 / (hd as f32).sqrt()
}

/// How a score is formed from a query and a key, before the scale. [`QkMode::F32`] is the
/// canonical order every kernel implements today; the int8 modes are candidate orders for
/// tensor-core attention (their integer dots may be formed in any order), kept here so that
/// their cost in accuracy can be measured before a kernel implements them; [`QkMode::Exact`] is
/// the exact integer order of the module docs. Only the score changes: max, exp, sums, the
/// output ([`PvMode`] chooses that) and the fold are the same in every mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum QkMode {
    /// `dot_f32(q, k_j)`, the canonical dot of [`dot_f32`].
    #[default]
    F32,
    /// The query and each key quantized to int8 with one scale per vector
    /// ([`quantize_vec`]): `(dq * dk_j) * isum_j`, where `isum_j` is the exact integer dot of
    /// the codes (below 2^24 in magnitude for `hd <= 1040`, so its conversion is exact). A
    /// key's codes depend on that key alone.
    Int8Vector,
    /// The query and each key quantized per block of 32 as the matrix products quantize their
    /// activations ([`quantize_block`]): block `b` feeds partial `b % 4`,
    /// `p = fma(dq_b * dk_b, isum_b, p)` from `+0`, then `(p0 + p1) + (p2 + p3)` (the Q8_0 dot
    /// of `src/reference/gemm.rs`). Needs `hd % 32 == 0`.
    Int8Block,
    /// The exact integer order of the module docs ([`sliced_dot`]): the exact dot of the
    /// fixed-point query and key (or its Ozaki triangle), rounded once. Needs `hd <= 256`.
    Exact(IntSlices),
}

/// Which slice pairs `(s, t)` of an [`IntSlices`] product count (slice 0 is the least
/// significant, `S - 1` the most).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SlicePairs {
    /// All `S * S` pairs: the integer sum is the exact product of the two fixed-point vectors.
    #[default]
    All,
    /// The Ozaki triangle: the pairs with `s + t >= S - 1` (`S (S + 1) / 2` of them). The
    /// dropped pairs weigh at most `2^(8 (S - 2))` against the `2^(16 S - 4)` of the top one,
    /// the same order as the rounding of the fixed-point vectors themselves.
    Triangle,
}

/// The parameters of the exact integer order ([`QkMode::Exact`], [`PvMode::Exact`]): `slices`
/// int8 digits per fixed-point value (`S`, 1 to 4) and the slice pairs counted. See the
/// module docs, "The exact integer order".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IntSlices {
    /// `S`: int8 digits per value, 1 to 4; the fixed point keeps `B = 8 S - 2` bits.
    pub slices: u32,
    /// Which digit pairs count.
    pub pairs: SlicePairs,
}

impl IntSlices {
    /// The slices the exact order takes when nothing else is asked: `S = 4` with the Ozaki
    /// triangle, the cheapest at least as accurate as the f32 chain on every measure of
    /// BENCHMARKS.md (issue 31).
    pub const CHOSEN: IntSlices = IntSlices::new(4, SlicePairs::Triangle);

    /// `S = slices` (1 to 4) with `pairs`.
    ///
    /// # Panics
    /// If `slices` is not 1 to 4.
    pub const fn new(slices: u32, pairs: SlicePairs) -> Self {
        assert!(slices >= 1 && slices <= 4, "IntSlices: slices is 1 to 4");
        IntSlices { slices, pairs }
    }

    /// `B = 8 S - 2`: the fixed-point bits below the vector's exponent.
    pub const fn bits(self) -> i32 {
        8 * self.slices as i32 - 2
    }

    /// Whether the digit pair `(s, t)` counts.
    pub const fn counts(self, s: usize, t: usize) -> bool {
        match self.pairs {
            SlicePairs::All => true,
            SlicePairs::Triangle => s + t + 1 >= self.slices as usize,
        }
    }
}

/// How a chunk's unnormalised output `o[d] = sum_j e_j * v_j[d]` is formed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PvMode {
    /// The canonical fma chain of [`chunk_partial`], step 4.
    #[default]
    F32,
    /// The exact integer order ([`exact_pv`]).
    Exact(IntSlices),
}

/// The order of one attention: how scores are formed ([`QkMode`]) and how chunk outputs are
/// ([`PvMode`]). The default is the canonical order every kernel implements.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AttnOrder {
    /// The scores.
    pub qk: QkMode,
    /// The chunk outputs.
    pub pv: PvMode,
}

impl From<QkMode> for AttnOrder {
    /// `qk` scores, canonical chunk outputs.
    fn from(qk: QkMode) -> Self {
        AttnOrder {
            qk,
            pv: PvMode::F32,
        }
    }
}

impl AttnOrder {
    /// Scores and chunk outputs both in the exact integer order of `sl`.
    pub const fn exact(sl: IntSlices) -> Self {
        AttnOrder {
            qk: QkMode::Exact(sl),
            pv: PvMode::Exact(sl),
        }
    }
}

/// `2^n` in f64, exact (`-1022 <= n <= 1023`).
fn pow2_f64(n: i32) -> f64 {
    assert!((-1022..=1023).contains(&n), "pow2_f64: {n}");
    f64::from_bits(((n + 1023) as u64) << 52)
}

/// The exponent `e` of a finite f32 vector: the least integer with every `|x_i| < 2^e`, i.e.
/// `floor(log2(max |x_i|)) + 1`, read from the bits of the max-abs element (a subnormal's from
/// its leading one: `2^-149` gives `-148`, [`f32::MAX`] gives 128). `None` for a vector of
/// zeros (either sign).
///
/// # Panics
/// If an element is NaN or infinite (the callers test that first).
pub fn vec_exponent(x: &[f32]) -> Option<i32> {
    let amax = x.iter().fold(0u32, |m, v| {
        assert!(v.is_finite(), "vec_exponent: non-finite element");
        m.max(v.to_bits() & 0x7fff_ffff)
    });
    if amax == 0 {
        return None;
    }
    let biased = (amax >> 23) as i32;
    Some(if biased == 0 {
        // Subnormal `m 2^-149`: floor(log2) is the leading one's index minus 149.
        (31 - amax.leading_zeros() as i32) - 149 + 1
    } else {
        biased - 127 + 1
    })
}

/// `round_ties_even(x * 2^shift)`, exact: `x * 2^shift` is formed without rounding (in f64,
/// whose range holds every such product here) and rounded once to an integer. The caller
/// guarantees `|x * 2^shift| <= 2^30`.
pub fn fixed_point(x: f32, shift: i32) -> i32 {
    let y = (f64::from(x) * pow2_f64(shift)).round_ties_even();
    debug_assert!(y.abs() <= (1u32 << 30) as f64, "fixed_point: {y}");
    y as i32
}

/// The `S` balanced base-256 digits of `x` (`|x| <= 2^(8 S - 2)`), least significant first:
/// `d_s` is the low byte of the remainder read as a signed byte (`((r + 128) mod 256) - 128`),
/// then `r = (r - d_s) / 256` (exact). Every digit is in `[-128, 127]`, the top one in
/// `[-64, 64]`, and `x = sum_s d_s 256^s` exactly.
pub fn int8_digits(x: i32, slices: u32) -> [i8; 4] {
    let mut d = [0i8; 4];
    let mut r = x;
    for ds in d.iter_mut().take(slices as usize) {
        *ds = r as i8;
        r = (r - i32::from(*ds)) >> 8;
    }
    debug_assert_eq!(r, 0, "int8_digits: {x} needs more than {slices} digits");
    d
}

/// `d * 2^p` rounded once to the nearest f32, ties to even, with gradual underflow (a
/// subnormal result is rounded once, at its own precision) and overflow to `±inf` (an exact
/// value of at least `2^128 (1 - 2^-25)` in magnitude). `0` gives `+0`, a negative value that
/// rounds to zero `-0`. Where the result is normal this is `(d as f32) * 2^p`. Needs
/// `|d| < 2^100` (the exact order's `D` stays below `2^69`).
pub fn round_scaled(d: i128, p: i32) -> f32 {
    if d == 0 {
        return 0.0;
    }
    assert!(d.unsigned_abs() < 1 << 100, "round_scaled: |d| < 2^100");
    let mag = d.unsigned_abs();
    let n = 128 - mag.leading_zeros() as i32; // bit length: 2^(n-1) <= mag < 2^n
    let top = n - 1 + p; // the exponent of the exact value
                         // The weight of the result's last bit: 24 bits for a normal result, 2^-149 below.
    let lsb = (top - 23).max(-149);
    let sh = lsb - p;
    let m: u128 = if sh <= 0 {
        mag << (-sh) as u32
    } else if sh > n {
        // Below half the last bit's weight (`mag < 2^n <= 2^(sh-1)`): rounds to zero.
        0
    } else {
        let q = mag >> sh as u32;
        let rem = mag - (q << sh as u32);
        let half = 1u128 << (sh - 1) as u32;
        if rem > half || (rem == half && q & 1 == 1) {
            q + 1
        } else {
            q
        }
    };
    // `m <= 2^24`: exact in f64, and so is the product; its conversion to f32 is exact, or
    // infinite past f32::MAX.
    if lsb > 127 {
        return if d < 0 {
            f32::NEG_INFINITY
        } else {
            f32::INFINITY
        };
    }
    let v = (m as f64 * pow2_f64(lsb)) as f32;
    if d < 0 {
        -v
    } else {
        v
    }
}

/// A vector in the fixed point of the exact integer order: its exponent `e` and its digits
/// `[S, n]` (digit `s` of element `i` at `s * n + i`), or the mark that it holds a NaN or an
/// infinity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicedVec {
    /// `Some(e)` for a nonzero finite vector; `None` for zeros (its digits are all 0).
    pub exp: Option<i32>,
    /// `d_{s,i}` at `s * n + i`.
    pub digits: Vec<i8>,
    /// An element is NaN or infinite: every result that reads the vector is NaN.
    pub non_finite: bool,
}

/// `x: [n]` in the fixed point of `sl`: `e` = [`vec_exponent`], `X_i = round_ties_even(x_i *
/// 2^(B - e))` ([`fixed_point`], so `|X_i| <= 2^B`), then its [`int8_digits`]. Depends on `x`
/// alone.
pub fn slice_vec(sl: IntSlices, x: &[f32]) -> SlicedVec {
    let n = x.len();
    let mut digits = vec![0i8; sl.slices as usize * n];
    if x.iter().any(|v| !v.is_finite()) {
        return SlicedVec {
            exp: None,
            digits,
            non_finite: true,
        };
    }
    let exp = vec_exponent(x);
    if let Some(e) = exp {
        for (i, &xi) in x.iter().enumerate() {
            let ds = int8_digits(fixed_point(xi, sl.bits() - e), sl.slices);
            for (s, &d) in ds.iter().take(sl.slices as usize).enumerate() {
                digits[s * n + i] = d;
            }
        }
    }
    SlicedVec {
        exp,
        digits,
        non_finite: false,
    }
}

/// The exact-order score of two sliced vectors of one length `n <= 256` (see the module
/// docs): `P_{s,t} = sum_i a_{s,i} b_{t,i}` in i32 (`|P| <= 256 * 2^14 = 2^22`), `D = sum` of
/// the counted `P_{s,t} 256^(s+t)` in i128 (`|D| < 2^69`), then [`round_scaled`]`(D, ea + eb -
/// 2B)`. NaN ([`CANON_NAN`]) when either holds a NaN or an infinity, `+0` when either is zero.
pub fn sliced_dot(sl: IntSlices, a: &SlicedVec, b: &SlicedVec) -> f32 {
    let s_n = sl.slices as usize;
    let n = a.digits.len() / s_n;
    assert_eq!(a.digits.len(), b.digits.len(), "sliced_dot: lengths");
    assert!(n <= 256, "sliced_dot: n <= 256 keeps P_st within 2^22");
    if a.non_finite || b.non_finite {
        return CANON_NAN;
    }
    let (Some(ea), Some(eb)) = (a.exp, b.exp) else {
        return 0.0;
    };
    let mut d = 0i128;
    for s in 0..s_n {
        for t in 0..s_n {
            if !sl.counts(s, t) {
                continue;
            }
            let p: i32 = a.digits[s * n..(s + 1) * n]
                .iter()
                .zip(&b.digits[t * n..(t + 1) * n])
                .map(|(&x, &y)| i32::from(x) * i32::from(y))
                .sum();
            d += i128::from(p) << (8 * (s + t));
        }
    }
    round_scaled(d, ea + eb - 2 * sl.bits())
}

/// The exact-order chunk output `o: [hd]`, `o[d] = sum_j e_j v_j[d]` over the rows `v: [n,
/// hd]` with weights `e: [n]` (see the module docs): each nonzero row's exponent `ev_j`
/// ([`vec_exponent`]), `emax` their maximum, the weights `U_j = round_ties_even(e_j * 2^(B +
/// ev_j - emax))` (0 for a zero row) and the rows `V_{j,d} = round_ties_even(v_j[d] * 2^(B -
/// ev_j))` in [`int8_digits`], `P_{s,t}[d] = sum_j u_{s,j} v_{t,j,d}` in i32 (`n <= 64`: `|P|
/// <= 2^20`), `D_d` = the counted `P_{s,t}[d] 256^(s+t)` in i128, and `o[d] =`
/// [`round_scaled`]`(D_d, emax - 2B)`. Every `o[d]` is NaN ([`CANON_NAN`]) when a weight is
/// not in `[0, 1]` (NaN) or a row holds a NaN or an infinity; all `+0` when every row is zero.
pub fn exact_pv(sl: IntSlices, e: &[f32], v: &[f32], hd: usize) -> Vec<f32> {
    let n = e.len();
    assert_eq!(v.len(), n * hd, "exact_pv: v");
    assert!(
        n <= CHUNK,
        "exact_pv: at most CHUNK rows keep P_st within 2^20"
    );
    let s_n = sl.slices as usize;
    let bad_weight = e.iter().any(|x| !(0.0..=1.0).contains(x));
    let rows: Vec<SlicedVec> = v.chunks(hd).map(|r| slice_vec(sl, r)).collect();
    if bad_weight || rows.iter().any(|r| r.non_finite) {
        return vec![CANON_NAN; hd];
    }
    let Some(emax) = rows.iter().filter_map(|r| r.exp).max() else {
        return vec![0.0; hd];
    };
    let b = sl.bits();
    // u[s * n + j]: digit s of U_j.
    let mut u = vec![0i8; s_n * n];
    for (j, (r, &ej)) in rows.iter().zip(e).enumerate() {
        if let Some(ev) = r.exp {
            let ds = int8_digits(fixed_point(ej, b + ev - emax), sl.slices);
            for s in 0..s_n {
                u[s * n + j] = ds[s];
            }
        }
    }
    (0..hd)
        .map(|d| {
            let mut acc = 0i128;
            for s in 0..s_n {
                for t in 0..s_n {
                    if !sl.counts(s, t) {
                        continue;
                    }
                    let p: i32 = rows
                        .iter()
                        .enumerate()
                        .map(|(j, r)| i32::from(u[s * n + j]) * i32::from(r.digits[t * hd + d]))
                        .sum();
                    acc += i128::from(p) << (8 * (s + t));
                }
            }
            round_scaled(acc, emax - 2 * b)
        })
        .collect()
}

/// A vector's int8 codes and its one scale, by the rule of [`quantize_block`] over the whole
/// vector: `d = amax / 127`, `q_i = clamp(round_ties_even(x_i / d), -127, 127)` (0 where the
/// quotient is NaN); a vector with a NaN or an infinity gets `d = NaN` and codes 0.
pub fn quantize_vec(x: &[f32]) -> (Vec<i8>, f32) {
    let mut q = vec![0i8; x.len()];
    if x.iter().any(|v| !v.is_finite()) {
        return (q, CANON_NAN);
    }
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    for (c, &v) in q.iter_mut().zip(x) {
        let r = (v / d).round_ties_even();
        *c = if r.is_nan() {
            0
        } else {
            r.clamp(-127.0, 127.0) as i8
        };
    }
    (q, d)
}

/// The score of query `q` and key `k` (both `[hd]`) in `mode`, before the scale.
pub fn qk_score(mode: QkMode, q: &[f32], k: &[f32]) -> f32 {
    let idot = |a: &[i8], b: &[i8]| -> i32 {
        a.iter()
            .zip(b)
            .map(|(&x, &y)| i32::from(x) * i32::from(y))
            .sum()
    };
    match mode {
        QkMode::F32 => dot_f32(q, k),
        QkMode::Int8Vector => {
            let ((cq, dq), (ck, dk)) = (quantize_vec(q), quantize_vec(k));
            (dq * dk) * idot(&cq, &ck) as f32
        }
        QkMode::Int8Block => {
            assert_eq!(
                q.len() % ACT_BLOCK,
                0,
                "qk_score: Int8Block needs hd % 32 == 0"
            );
            let mut p = [0.0f32; 4];
            for (b, (qb, kb)) in q.chunks(ACT_BLOCK).zip(k.chunks(ACT_BLOCK)).enumerate() {
                let ((cq, dq, _), (ck, dk, _)) = (quantize_block(qb), quantize_block(kb));
                p[b % 4] = (dq * dk).mul_add(idot(&cq, &ck) as f32, p[b % 4]);
            }
            (p[0] + p[1]) + (p[2] + p[3])
        }
        QkMode::Exact(sl) => sliced_dot(sl, &slice_vec(sl, q), &slice_vec(sl, k)),
    }
}

/// What one chunk contributes to one query head: its score maximum `m`, its denominator `l`
/// and its unnormalised output `o: [hd]`.
#[derive(Clone, Debug, PartialEq)]
pub struct ChunkPartial {
    /// `fmax` of the chunk's scores.
    pub m: f32,
    /// Sum of `exp(s_j - m)` over the chunk.
    pub l: f32,
    /// `sum_j exp(s_j - m) * v_j`.
    pub o: Vec<f32>,
}

/// Chunk partial of query `q: [hd]` over cache rows `j0..j1` of one kv head (`k, v: [cap, hd]`,
/// `j0 < j1`, all rows in one chunk). The order:
///
/// 1. `s_j = dot_f32(q, k_j) * scale` (the canonical dot of [`dot_f32`], then one rounded
///    multiply).
/// 2. `m = fmax` over the chunk's `s_j`, from `-inf`; `e_j = exp(s_j - m)`.
/// 3. `l = (l0 + l1) + (l2 + l3)`, where `l_p` adds, from `+0` in increasing `j`, the `e_j`
///    with `(j - j0) % 4 == p`.
/// 4. `o[d]`: an fma chain from `+0` in increasing `j`: `o = fma(e_j, v_j[d], o)`.
pub fn chunk_partial(q: &[f32], k: &[f32], v: &[f32], j0: usize, j1: usize) -> ChunkPartial {
    chunk_partial_with(AttnOrder::default(), q, k, v, j0, j1)
}

/// [`chunk_partial`] in `order`: step 1 becomes `s_j = qk_score(order.qk, q, k_j) * scale`, and
/// with [`PvMode::Exact`] step 4 becomes [`exact_pv`] over the chunk's `e_j` and rows; the rest
/// is unchanged.
pub fn chunk_partial_with(
    order: AttnOrder,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    j0: usize,
    j1: usize,
) -> ChunkPartial {
    let hd = q.len();
    let sc = scale(hd);
    // The query's digits depend on the query alone: sliced once, the same bits as per key.
    let qs = match order.qk {
        QkMode::Exact(sl) => Some((sl, slice_vec(sl, q))),
        _ => None,
    };
    let s: Vec<f32> = (j0..j1)
        .map(|j| {
            let kj = &k[j * hd..(j + 1) * hd];
            let dot = match &qs {
                Some((sl, qv)) => sliced_dot(*sl, qv, &slice_vec(*sl, kj)),
                None => qk_score(order.qk, q, kj),
            };
            dot * sc
        })
        .collect();
    let m = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let e: Vec<f32> = s.iter().map(|&x| exp(x - m)).collect();
    let mut lanes = [0.0f32; SUM_PARTIALS];
    for (i, &x) in e.iter().enumerate() {
        lanes[i % SUM_PARTIALS] += x;
    }
    let l = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
    let o = match order.pv {
        PvMode::F32 => (0..hd)
            .map(|d| {
                e.iter()
                    .enumerate()
                    .fold(0.0f32, |o, (i, &ej)| ej.mul_add(v[(j0 + i) * hd + d], o))
            })
            .collect(),
        PvMode::Exact(sl) => exact_pv(sl, &e, &v[j0 * hd..j1 * hd], hd),
    };
    ChunkPartial { m, l, o }
}

/// The running state of the left-to-right fold over chunks: the prefix maximum `m`, the
/// denominator `l` and the output `o: [hd]` (all relative to `m`).
#[derive(Clone, Debug, PartialEq)]
pub struct FoldState(pub ChunkPartial);

impl FoldState {
    /// The state after chunk 0: its partial, unchanged.
    pub fn start(first: ChunkPartial) -> Self {
        FoldState(first)
    }

    /// Folds the next chunk's partial `p` in:
    /// `m' = fmax(m, p.m)`, `a = exp(m - m')`, `b = exp(p.m - m')`,
    /// `l = fma(l, a, p.l * b)`, `o[d] = fma(o[d], a, p.o[d] * b)`.
    pub fn fold(&mut self, p: &ChunkPartial) {
        let s = &mut self.0;
        let m2 = s.m.max(p.m);
        let a = exp(s.m - m2);
        let b = exp(p.m - m2);
        s.l = s.l.mul_add(a, p.l * b);
        for (o, &po) in s.o.iter_mut().zip(&p.o) {
            *o = o.mul_add(a, po * b);
        }
        s.m = m2;
    }

    /// The output `canon(o[d] / l)`.
    pub fn finish(&self) -> Vec<f32> {
        self.0.o.iter().map(|&o| canon(o / self.0.l)).collect()
    }
}

/// One query head `q: [hd]` at position `t` against cache rows `0..=t` of one kv head
/// (`k, v: [cap, hd]`): the [`chunk_partial`] of every chunk `c = 0..=t / CHUNK` (the last one
/// cut at row `t`), folded left to right by [`FoldState`], then [`FoldState::finish`].
pub fn attend(q: &[f32], k: &[f32], v: &[f32], t: usize, hd: usize) -> Vec<f32> {
    attend_with(AttnOrder::default(), q, k, v, t, hd)
}

/// [`attend`] in `order` ([`chunk_partial_with`]).
pub fn attend_with(
    order: AttnOrder,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    t: usize,
    hd: usize,
) -> Vec<f32> {
    assert_eq!(q.len(), hd, "attend: q");
    let chunk =
        |c: usize| chunk_partial_with(order, q, k, v, c * CHUNK, ((c + 1) * CHUNK).min(t + 1));
    let mut state = FoldState::start(chunk(0));
    for c in 1..=t / CHUNK {
        state.fold(&chunk(c));
    }
    state.finish()
}

/// Attention in `order` ([`attend_with`]; `AttnOrder::default()` is the f32 chain every kernel
/// runs) for queries `q: [nq, n_heads, hd]` at positions `qpos` over one layer's caches
/// `k, v: [n_kv, cap, hd]`; returns `[nq, n_heads, hd]`. Head `h` reads kv head
/// `h / (n_heads / n_kv)`.
#[allow(clippy::too_many_arguments)]
pub fn attention_with(
    order: AttnOrder,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    qpos: &[u32],
    n_heads: usize,
    n_kv: usize,
    hd: usize,
    cap: usize,
) -> Vec<f32> {
    use rayon::prelude::*;
    // Every (query, head) is independent: computed on all cores, the bits do not change.
    (0..qpos.len() * n_heads)
        .into_par_iter()
        .flat_map_iter(|qh| {
            let (i, h) = (qh / n_heads, qh % n_heads);
            let kvh = h / (n_heads / n_kv);
            let q1 = &q[(i * n_heads + h) * hd..][..hd];
            let kc = &k[kvh * cap * hd..][..cap * hd];
            let vc = &v[kvh * cap * hd..][..cap * hd];
            attend_with(order, q1, kc, vc, qpos[i] as usize, hd)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Int8 scores: exact on vectors the codes represent exactly (`amax = 127`, so `d = 1`),
    /// NaN from a non-finite input, 0 from a zero vector; the per-block mode is the Q8 dot of
    /// the matrix products, block by block.
    #[test]
    fn int8_scores() {
        let q: Vec<f32> = (0..64)
            .map(|i| if i == 0 { 127.0 } else { (i % 7) as f32 - 3.0 })
            .collect();
        let k: Vec<f32> = (0..64)
            .map(|i| if i == 5 { -127.0 } else { (i % 5) as f32 - 2.0 })
            .collect();
        let exact: f32 = q.iter().zip(&k).map(|(a, b)| a * b).sum();
        assert_eq!(qk_score(QkMode::Int8Vector, &q, &k), exact);
        assert_eq!(qk_score(QkMode::F32, &q, &k), exact);
        let mut bad = q.clone();
        bad[3] = f32::INFINITY;
        assert!(qk_score(QkMode::Int8Vector, &bad, &k).is_nan());
        assert!(qk_score(QkMode::Int8Block, &bad, &k).is_nan());
        assert_eq!(qk_score(QkMode::Int8Vector, &[0.0; 64], &k), 0.0);
        // Per block: p_b = fma(dq_b * dk_b, isum_b, +0) for the two blocks, then (p0 + p1).
        let qs: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 19) as f32 - 9.0) * 0.13)
            .collect();
        let ks: Vec<f32> = (0..64)
            .map(|i| ((i * 11 % 23) as f32 - 11.0) * 0.07)
            .collect();
        let p: Vec<f32> = (0..2)
            .map(|b| {
                let (cq, dq, _) = quantize_block(&qs[32 * b..32 * b + 32]);
                let (ck, dk, _) = quantize_block(&ks[32 * b..32 * b + 32]);
                let isum: i32 = cq
                    .iter()
                    .zip(&ck)
                    .map(|(&x, &y)| i32::from(x) * i32::from(y))
                    .sum();
                (dq * dk).mul_add(isum as f32, 0.0)
            })
            .collect();
        assert_eq!(
            qk_score(QkMode::Int8Block, &qs, &ks).to_bits(),
            ((p[0] + p[1]) + (0.0 + 0.0)).to_bits()
        );
        let f = qk_score(QkMode::F32, &qs, &ks);
        let i8v = qk_score(QkMode::Int8Vector, &qs, &ks);
        assert!((i8v - f).abs() < 0.05 * f.abs().max(1.0), "{i8v} vs {f}");
    }

    /// The chunked order against plain f64 softmax attention: same function, f32 rounding.
    #[test]
    fn chunked_fold_is_attention() {
        let hd = 48;
        let t = 200;
        let val = |i: usize, s: u64| ((i as u64 * 2654435761 + s) % 1000) as f32 / 500.0 - 1.0;
        let q: Vec<f32> = (0..hd).map(|i| val(i, 1)).collect();
        let k: Vec<f32> = (0..(t + 1) * hd).map(|i| val(i, 7)).collect();
        let v: Vec<f32> = (0..(t + 1) * hd).map(|i| val(i, 13)).collect();
        let got = attend(&q, &k, &v, t, hd);
        let sc = 1.0 / (hd as f64).sqrt();
        let s: Vec<f64> = (0..=t)
            .map(|j| {
                (0..hd)
                    .map(|d| q[d] as f64 * k[j * hd + d] as f64)
                    .sum::<f64>()
                    * sc
            })
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = e.iter().sum();
        for d in 0..hd {
            let want: f64 = (0..=t).map(|j| e[j] * v[j * hd + d] as f64).sum::<f64>() / z;
            assert!(
                (got[d] as f64 - want).abs() < 1e-5,
                "d {d}: {} vs {want}",
                got[d]
            );
        }
    }

    const ALL_SLICINGS: [IntSlices; 8] = [
        IntSlices::new(1, SlicePairs::All),
        IntSlices::new(2, SlicePairs::All),
        IntSlices::new(3, SlicePairs::All),
        IntSlices::new(4, SlicePairs::All),
        IntSlices::new(1, SlicePairs::Triangle),
        IntSlices::new(2, SlicePairs::Triangle),
        IntSlices::new(3, SlicePairs::Triangle),
        IntSlices::new(4, SlicePairs::Triangle),
    ];

    /// `ints[i] * 2^p`, with `ints` in `[-31, 31]` and element 0 at 31 (so `e = p + 5`).
    fn ints_times(seed: u64, n: usize, p: i32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let c = if i == 0 {
                    31
                } else {
                    ((i as u64 * 2654435761 + seed * 97) % 63) as i64 - 31
                };
                (c as f64 * 2f64.powi(p)) as f32
            })
            .collect()
    }

    fn dot64(a: &[f32], b: &[f32]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(&x, &y)| f64::from(x) * f64::from(y))
            .sum()
    }

    /// Whether `f` is `d * 2^p` rounded to the nearest f32, ties to even (checked in exact
    /// integer arithmetic, independently of [`round_scaled`]).
    fn is_nearest(f: f32, d: i128, p: i32) -> bool {
        if d == 0 {
            return f.to_bits() == 0;
        }
        if f.is_infinite() {
            // Overflow: the exact value is at least MAX + half its ulp = 2^128 (1 - 2^-25).
            let (mag, n) = (
                d.unsigned_abs(),
                128 - d.unsigned_abs().leading_zeros() as i32,
            );
            let big = n - 1 + p >= 128
                || (n - 1 + p == 127 && {
                    // Compare mag * 2^p with (2^25 - 1) 2^103, exactly.
                    let sh = 103 - p;
                    if sh >= 0 {
                        mag >= ((1u128 << 25) - 1) << sh as u32
                    } else {
                        mag >= ((1u128 << 25) - 1) >> (-sh) as u32
                    }
                });
            return big && (f > 0.0) == (d > 0);
        }
        if (f < 0.0) != (d < 0) || f == 0.0 {
            // A nonzero value rounds to zero only below 2^-150; check that.
            if f == 0.0 {
                let n = 128 - d.unsigned_abs().leading_zeros() as i32;
                // mag * 2^p <= 2^-150 (a tie at 2^-150 goes to even, zero).
                return n - 1 + p < -150
                    || (n - 1 + p == -150 && d.unsigned_abs().is_power_of_two());
            }
            return false;
        }
        let bits = f.abs().to_bits();
        let (be, frac) = ((bits >> 23) as i32, u128::from(bits & 0x7f_ffff));
        let (mant, lsb) = if be == 0 {
            (frac, -149)
        } else {
            (frac | 1 << 23, be - 127 - 23)
        };
        // In units of 2^g, g below both the half ulp and 2^p.
        let g = (lsb - 1).min(p);
        let fi = mant << (lsb - g) as u32;
        let di = d.unsigned_abs() << (p - g) as u32;
        let half = 1u128 << (lsb - 1 - g) as u32;
        let diff = fi.abs_diff(di);
        diff < half || (diff == half && mant & 1 == 0)
    }

    /// Independent `e`: the least integer with `max |x_i| < 2^e`, by f64 comparisons.
    fn exponent64(x: &[f32]) -> Option<i32> {
        let amax = x.iter().fold(0.0f64, |m, &v| m.max(f64::from(v).abs()));
        if amax == 0.0 {
            return None;
        }
        let mut e = -160;
        while amax >= 2f64.powi(e) {
            e += 1;
        }
        Some(e)
    }

    /// Independent digits: balanced base 256 by Euclidean remainders.
    fn digits64(x: i128, s_n: u32) -> Vec<i128> {
        let mut r = x;
        let mut d = Vec::new();
        for _ in 0..s_n {
            let ds = (r + 128).rem_euclid(256) - 128;
            d.push(ds);
            r = (r - ds) / 256;
        }
        assert_eq!(r, 0);
        d
    }

    /// The integer `D` of two vectors, recomputed in i128 from f64 fixed points and
    /// independent digits, and its power-of-two exponent.
    fn dot_i128(sl: IntSlices, a: &[f32], b: &[f32]) -> Option<(i128, i32)> {
        let (ea, eb) = (exponent64(a)?, exponent64(b)?);
        let bb = sl.bits();
        let fx = |x: f32, e: i32| (f64::from(x) * 2f64.powi(bb - e)).round_ties_even() as i128;
        let mut d = 0i128;
        for (&x, &y) in a.iter().zip(b) {
            let (dx, dy) = (
                digits64(fx(x, ea), sl.slices),
                digits64(fx(y, eb), sl.slices),
            );
            for (s, &ds) in dx.iter().enumerate() {
                for (t, &dt) in dy.iter().enumerate() {
                    if sl.counts(s, t) {
                        d += ds * dt * (1i128 << (8 * (s + t)));
                    }
                }
            }
        }
        Some((d, ea + eb - 2 * bb))
    }

    /// On vectors the fixed point holds exactly (small integers times powers of two, normal,
    /// subnormal, huge), every slice count with all pairs gives the exact dot rounded once;
    /// that includes a subnormal and an infinite result.
    #[test]
    fn exact_scores_are_exact_on_representable_inputs() {
        for hd in [1, 64, 128, 256] {
            for (pq, pk) in [
                (0, 0),
                (-3, 5),
                (-145, 100),
                (-80, -80),
                (100, 100),
                (60, 60),
            ] {
                let q = ints_times(1, hd, pq);
                let k = ints_times(2, hd, pk);
                let want = dot64(&q, &k) as f32; // the f64 dot is exact: one rounding
                for sl in ALL_SLICINGS.iter().filter(|s| s.pairs == SlicePairs::All) {
                    let got = qk_score(QkMode::Exact(*sl), &q, &k);
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "hd {hd}, 2^{pq} 2^{pk}, {sl:?}: {got:e} vs {want:e}"
                    );
                }
            }
        }
        // The f32 chain rounds every fma: on these it agrees only where no step rounds.
        let (q, k) = (ints_times(1, 128, 0), ints_times(2, 128, 0));
        assert_eq!(qk_score(QkMode::F32, &q, &k), dot64(&q, &k) as f32);
    }

    /// NaN and infinity give the canonical NaN, zero vectors (either sign) `+0`, subnormal
    /// vectors their exponent, and the digits reassemble their value.
    #[test]
    fn exact_scores_special_values() {
        let sl = IntSlices::new(3, SlicePairs::All);
        let k = ints_times(3, 128, -2);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut q = ints_times(4, 128, 0);
            q[7] = bad;
            assert_eq!(
                qk_score(QkMode::Exact(sl), &q, &k).to_bits(),
                CANON_NAN.to_bits()
            );
            assert_eq!(
                qk_score(QkMode::Exact(sl), &k, &q).to_bits(),
                CANON_NAN.to_bits()
            );
        }
        for z in [0.0f32, -0.0] {
            let zero = vec![z; 128];
            assert_eq!(qk_score(QkMode::Exact(sl), &zero, &k).to_bits(), 0);
            assert_eq!(qk_score(QkMode::Exact(sl), &k, &zero).to_bits(), 0);
        }
        assert_eq!(vec_exponent(&[f32::from_bits(1)]), Some(-148));
        assert_eq!(vec_exponent(&[f32::from_bits(0x7f_ffff)]), Some(-126));
        assert_eq!(vec_exponent(&[f32::MIN_POSITIVE]), Some(-125));
        assert_eq!(vec_exponent(&[1.0, -0.5]), Some(1));
        assert_eq!(vec_exponent(&[-1.5]), Some(1));
        assert_eq!(vec_exponent(&[f32::MAX]), Some(128));
        assert_eq!(vec_exponent(&[0.0, -0.0]), None);
        // The smallest subnormal against 3 * 2^100: exactly 3 * 2^-49.
        let mut q = vec![0.0f32; 64];
        q[9] = f32::from_bits(1);
        let mut kk = vec![0.0f32; 64];
        kk[9] = 3.0 * 2f32.powi(100);
        assert_eq!(qk_score(QkMode::Exact(sl), &q, &kk), 3.0 * 2f32.powi(-49));
        for x in [
            0i32,
            1,
            -1,
            127,
            128,
            -128,
            255,
            1 << 22,
            -(1 << 22),
            1 << 30,
            -(1 << 30),
        ] {
            for s_n in 1..=4u32 {
                if x.unsigned_abs() > 1 << (8 * s_n - 2) {
                    continue;
                }
                let d = int8_digits(x, s_n);
                let back: i64 = (0..s_n as usize).map(|s| i64::from(d[s]) << (8 * s)).sum();
                assert_eq!(back, i64::from(x), "{x} in {s_n} digits");
                assert!((-64..=64).contains(&d[s_n as usize - 1]), "{x}: top {d:?}");
            }
        }
    }

    /// The once-rounded conversion: nearest even at every precision, subnormal and infinite
    /// results included, against f64 where the f64 conversion is exact.
    #[test]
    fn round_scaled_rounds_once() {
        for &(d, p) in &[
            (1i128, -149),
            (1, -150),
            (3, -151),
            (1, -151),
            (-(1 << 24) - 1, 0),
            ((1 << 24) + 3, 0),
            ((1 << 25) - 1, 103),
            ((1 << 25) - 2, 103),
            ((1i128 << 99) - 1, 0),
            ((1i128 << 99) + (1 << 75), -300),
            (-(1i128 << 69) + 12345, -200),
        ] {
            let f = round_scaled(d, p);
            assert!(is_nearest(f, d, p), "{d} 2^{p}: {f:e}");
            if d.unsigned_abs() < 1 << 53 {
                let want = (d as f64 * 2f64.powi(p)) as f32;
                assert_eq!(f.to_bits(), want.to_bits(), "{d} 2^{p}");
            }
        }
        assert_eq!(round_scaled(0, 5).to_bits(), 0);
        assert_eq!(round_scaled((1 << 25) - 1, 103), f32::INFINITY);
        assert_eq!(round_scaled((1 << 25) - 2, 103), f32::MAX);
    }

    /// A query's exact-order output at position `t` is the same whether its whole prefill is
    /// computed, or it alone over a cache whose rows past `t` are NaN (so it reads nothing
    /// beyond `t`); and close to f64 attention.
    #[test]
    fn exact_order_is_independent_of_chunking() {
        let (hd, n, nh) = (64, 150, 2);
        let val = |i: usize, s: u64| ((i as u64 * 2654435761 + s) % 1000) as f32 / 500.0 - 1.0;
        let q: Vec<f32> = (0..n * nh * hd).map(|i| val(i, 1) * 2.0).collect();
        let k: Vec<f32> = (0..n * hd).map(|i| val(i, 7)).collect();
        let mut v: Vec<f32> = (0..n * hd).map(|i| val(i, 13)).collect();
        // Value rows of different exponents, one of zeros: emax varies along the chunk.
        for (j, row) in v.chunks_mut(hd).enumerate() {
            let f = match j % 5 {
                0 => 8.0,
                1 => 0.01,
                2 if j == 67 => 0.0,
                _ => 1.0,
            };
            row.iter_mut().for_each(|x| *x *= f);
        }
        let pos: Vec<u32> = (0..n as u32).collect();
        for order in [
            AttnOrder::exact(IntSlices::new(3, SlicePairs::All)),
            AttnOrder::exact(IntSlices::new(2, SlicePairs::Triangle)),
            AttnOrder::from(QkMode::Exact(IntSlices::new(4, SlicePairs::All))),
        ] {
            let all = attention_with(order, &q, &k, &v, &pos, nh, 1, hd, n);
            for t in [0, 1, 63, 64, 65, 100, 127, 128, 149] {
                let (mut kt, mut vt) = (k.clone(), v.clone());
                kt[(t + 1) * hd..].fill(f32::NAN);
                vt[(t + 1) * hd..].fill(f32::NAN);
                let one = attention_with(
                    order,
                    &q[t * nh * hd..],
                    &kt,
                    &vt,
                    &[t as u32],
                    nh,
                    1,
                    hd,
                    n,
                );
                let want = &all[t * nh * hd..(t + 1) * nh * hd];
                assert!(
                    one.iter()
                        .zip(want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{order:?}, t {t}"
                );
            }
            // The same order really is used: it differs from the f32 chain somewhere.
            let f32s = attention_with(AttnOrder::default(), &q, &k, &v, &pos, nh, 1, hd, n);
            assert_ne!(
                all.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                f32s.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "{order:?}"
            );
            let worst = all
                .iter()
                .zip(&f32s)
                .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(worst < 1e-2, "{order:?}: {worst}");
        }
    }

    /// Exact chunk outputs: exact on representable weights and rows, NaN from a NaN weight or
    /// a non-finite row, `+0` from zero rows.
    #[test]
    fn exact_outputs_special_values() {
        let sl = IntSlices::new(2, SlicePairs::All);
        let hd = 8;
        // Weights 1, 1/2, 1/4 and rows of small integers: every U and V exact.
        let e = [1.0f32, 0.5, 0.25];
        let v: Vec<f32> = (0..3 * hd).map(|i| (i % 7) as f32 - 3.0).collect();
        let got = exact_pv(sl, &e, &v, hd);
        for d in 0..hd {
            let want: f32 = (0..3).map(|j| e[j] * v[j * hd + d]).sum();
            assert_eq!(got[d], want, "d {d}");
        }
        let mut bad = v.clone();
        bad[3] = f32::INFINITY;
        assert!(exact_pv(sl, &e, &bad, hd)
            .iter()
            .all(|x| x.to_bits() == CANON_NAN.to_bits()));
        assert!(exact_pv(sl, &[1.0, f32::NAN, 0.0], &v, hd)
            .iter()
            .all(|x| x.to_bits() == CANON_NAN.to_bits()));
        assert!(exact_pv(sl, &e, &vec![-0.0; 3 * hd], hd)
            .iter()
            .all(|x| x.to_bits() == 0));
    }

    fn vec_strategy(n: usize) -> impl Strategy<Value = Vec<f32>> {
        // Mantissa times 2^p, p from subnormal to large, some exact zeros.
        proptest::collection::vec((-(1i32 << 24)..(1 << 24), -40i32..40, 0u8..10), n).prop_map(
            |v| {
                v.into_iter()
                    .map(|(m, p, z)| {
                        if z == 0 {
                            0.0
                        } else {
                            (m as f64 * 2f64.powi(p - 24)) as f32
                        }
                    })
                    .collect()
            },
        )
    }

    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Scores against an i128 recomputation (f64 fixed points, Euclidean digits) and an
        /// exact nearest-f32 check, for every slicing.
        #[test]
        fn exact_scores_match_i128(
            (q, k) in (1usize..=256).prop_flat_map(|n| (vec_strategy(n), vec_strategy(n))),
            shift in -120i32..80,
        ) {
            // A common power of two moves some cases to subnormal or huge results.
            let k: Vec<f32> = k.iter().map(|&x| (f64::from(x) * 2f64.powi(shift)) as f32).collect();
            for sl in ALL_SLICINGS {
                let got = qk_score(QkMode::Exact(sl), &q, &k);
                match dot_i128(sl, &q, &k) {
                    None => prop_assert_eq!(got.to_bits(), 0),
                    Some((d, p)) => prop_assert!(is_nearest(got, d, p), "{:?}: {:e} vs {} 2^{}", sl, got, d, p),
                }
            }
        }

        /// Chunk outputs against the same recomputation, column by column.
        #[test]
        fn exact_outputs_match_i128(
            rows in 1usize..=64,
            hd in 1usize..=8,
            seed in any::<u64>(),
        ) {
            use rand::{Rng, SeedableRng};
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let e: Vec<f32> = (0..rows)
                .map(|_| if rng.gen_bool(0.1) { 0.0 } else { rng.gen_range(0.0f32..=1.0) })
                .collect();
            let v: Vec<f32> = (0..rows * hd)
                .map(|i| {
                    let row_scale = 2f32.powi(((i / hd) % 13) as i32 - 6);
                    if rng.gen_bool(0.05) { 0.0 } else { rng.gen_range(-1.0f32..1.0) * row_scale }
                })
                .collect();
            for sl in ALL_SLICINGS {
                let got = exact_pv(sl, &e, &v, hd);
                let emax = v.chunks(hd).filter_map(exponent64).max();
                for d in 0..hd {
                    let Some(emax) = emax else {
                        prop_assert_eq!(got[d].to_bits(), 0);
                        continue;
                    };
                    // Each row's weight with the row's exponent folded in, then that row's
                    // one-element dot with the weight, summed exactly.
                    let mut acc = 0i128;
                    for (j, row) in v.chunks(hd).enumerate() {
                        let Some(ev) = exponent64(row) else { continue };
                        let u = (f64::from(e[j]) * 2f64.powi(sl.bits() + ev - emax)).round_ties_even() as i128;
                        let x = (f64::from(row[d]) * 2f64.powi(sl.bits() - ev)).round_ties_even() as i128;
                        let (du, dx) = (digits64(u, sl.slices), digits64(x, sl.slices));
                        for (s, &a) in du.iter().enumerate() {
                            for (t, &b) in dx.iter().enumerate() {
                                if sl.counts(s, t) {
                                    acc += a * b * (1i128 << (8 * (s + t)));
                                }
                            }
                        }
                    }
                    prop_assert!(is_nearest(got[d], acc, emax - 2 * sl.bits()), "{:?} d {}: {:e}", sl, d, got[d]);
                }
            }
        }
    }
}
