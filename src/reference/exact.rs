//! An exact accumulator: sums of products of f32 values and integers, held without rounding
//! and rounded once at the end. Whatever order the terms arrive in, the result is the one f32
//! nearest the exact sum, so any split or tiling of a reduction over it gives the same bits.
//!
//! The sum is a two's-complement integer of [`LIMBS`] 64-bit limbs counting units of
//! `2^`[`LSB_EXP`]: every product of two finite f32 values (down to `2^-149 * 2^-149`) times an
//! integer below `2^27` is a whole number of those units, and a sum of up to `2^64` such terms
//! of magnitude below `2^(128 + 128 + 27)` cannot reach the top limb's sign bit.
//!
//! Non-finite terms are kept apart, as IEEE addition would treat them in any order: a NaN
//! term, or infinite terms of both signs, make the sum NaN ([`CANON_NAN`]); otherwise an
//! infinite term makes it that infinity.

use crate::math::CANON_NAN;
use crate::reference::attention::round_scaled;

/// The weight of the accumulator's lowest bit, `2^LSB_EXP`.
pub const LSB_EXP: i32 = -320;
/// 64-bit limbs of the accumulator (`2^-320` up to `2^447`, two's complement).
pub const LIMBS: usize = 12;

/// The exact value of a finite f32 as `(m, e)` with `x = m * 2^e`, `|m| < 2^24`, `e >= -149`.
pub fn f32_parts(x: f32) -> (i64, i32) {
    debug_assert!(x.is_finite());
    let bits = x.to_bits();
    let exp = ((bits >> 23) & 0xff) as i32;
    let frac = i64::from(bits & 0x7f_ffff);
    let (m, e) = if exp == 0 {
        (frac, -149)
    } else {
        (frac | 1 << 23, exp - 150)
    };
    (if bits >> 31 == 1 { -m } else { m }, e)
}

/// A sum of terms held exactly (see the module docs).
#[derive(Clone, Debug)]
pub struct ExactSum {
    limbs: [u64; LIMBS],
    nan: bool,
    pos_inf: bool,
    neg_inf: bool,
}

impl Default for ExactSum {
    fn default() -> Self {
        Self::new()
    }
}

impl ExactSum {
    /// The empty sum (it rounds to `+0`).
    pub fn new() -> Self {
        ExactSum {
            limbs: [0; LIMBS],
            nan: false,
            pos_inf: false,
            neg_inf: false,
        }
    }

    /// Adds `m * 2^e`.
    ///
    /// # Panics
    /// If `e < LSB_EXP` or the term is `2^380` or more (the top 64 bits stay for carries and
    /// the sign).
    pub fn add_scaled(&mut self, m: i128, e: i32) {
        if m == 0 {
            return;
        }
        assert!(e >= LSB_EXP, "ExactSum: a term below 2^{LSB_EXP}");
        let shift = (e - LSB_EXP) as u32;
        let bits = 128 - m.unsigned_abs().leading_zeros();
        assert!(
            shift + bits <= (LIMBS as u32 - 1) * 64,
            "ExactSum: a term of 2^{} or more",
            shift as i32 + bits as i32 + LSB_EXP - 1
        );
        let (limb, off) = ((shift / 64) as usize, shift % 64);
        // The magnitude shifted into three limbs, then added or subtracted with carries.
        let mag = m.unsigned_abs();
        let lo = (mag << off) as u64;
        let mid = ((mag << off) >> 64) as u64;
        let hi = if off == 0 {
            0
        } else {
            (mag >> (128 - off)) as u64
        };
        // The term over the limbs from `limb` up: its magnitude's three limbs, negated in two's
        // complement for a negative term (then sign-extended with all-ones limbs), added with
        // carries; a carry out of the top limb is the two's complement wrap.
        let neg = m < 0;
        let mut carry = neg;
        for (i, limb_v) in self.limbs.iter_mut().enumerate().skip(limb) {
            let p = [lo, mid, hi].get(i - limb).copied().unwrap_or(0);
            let p = if neg { !p } else { p };
            let (s1, c1) = limb_v.overflowing_add(p);
            let (s2, c2) = s1.overflowing_add(u64::from(carry));
            *limb_v = s2;
            carry = c1 || c2;
            if i - limb >= 2 && carry == neg {
                // What remains to add is 0 (positive, no carry) or all ones plus a carry: 0.
                break;
            }
        }
    }

    /// Adds `a * b * i` exactly (`|i| < 2^27`); a non-finite `a` or `b` is kept apart as
    /// the module docs say (`inf * 0` is NaN).
    pub fn add_product(&mut self, a: f32, b: f32, i: i64) {
        if !a.is_finite() || !b.is_finite() {
            let p = a * b * i as f32;
            if p.is_nan() {
                self.nan = true;
            } else if p > 0.0 {
                self.pos_inf = true;
            } else if p < 0.0 {
                self.neg_inf = true;
            } else {
                // `inf * 0` and `inf * b * 0` are NaN above; nothing else reaches here.
                self.nan = true;
            }
            return;
        }
        debug_assert!(i.unsigned_abs() < 1 << 27);
        let (ma, ea) = f32_parts(a);
        let (mb, eb) = f32_parts(b);
        self.add_scaled(i128::from(ma) * i128::from(mb) * i128::from(i), ea + eb);
    }

    /// The exact sum rounded once to the nearest f32, ties to even (overflow to `±inf`,
    /// gradual underflow, an exact zero as `+0`).
    pub fn round(&self) -> f32 {
        if self.nan || (self.pos_inf && self.neg_inf) {
            return CANON_NAN;
        }
        if self.pos_inf {
            return f32::INFINITY;
        }
        if self.neg_inf {
            return f32::NEG_INFINITY;
        }
        let negative = self.limbs[LIMBS - 1] >> 63 == 1;
        let mut mag = self.limbs;
        if negative {
            // Two's complement negation: invert, add one.
            let mut carry = true;
            for l in mag.iter_mut() {
                let (v, c) = (!*l).overflowing_add(u64::from(carry));
                *l = v;
                carry = c;
            }
        }
        let Some(top) = (0..LIMBS).rev().find(|&i| mag[i] != 0) else {
            return 0.0;
        };
        // Bit index of the highest one, then a 100-bit window below it with a sticky bit for
        // anything under the window: 100 bits hold the 24 of the result and more than two
        // guard bits, so rounding the window rounds the exact value.
        let high = top as u32 * 64 + 63 - mag[top].leading_zeros();
        let low = high.saturating_sub(99);
        // Bits low..low + 128 of the magnitude (three limbs from low's), then the window.
        let (l0, off) = ((low / 64) as usize, low % 64);
        let limb = |i: usize| mag.get(i).copied().map_or(0, u128::from);
        let wide = limb(l0) | limb(l0 + 1) << 64;
        let mut d = (wide >> off)
            | if off == 0 {
                0
            } else {
                limb(l0 + 2) << (128 - off)
            };
        d &= (1u128 << (high - low + 1)) - 1;
        let below = mag[..l0].iter().any(|&v| v != 0) || mag[l0] & ((1u64 << off) - 1) != 0;
        if below {
            d |= 1;
        }
        let d = d as i128;
        round_scaled(if negative { -d } else { d }, low as i32 + LSB_EXP)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parts_rebuild_every_kind_of_f32() {
        for x in [
            0.0f32,
            -0.0,
            1.0,
            -1.5,
            f32::MIN_POSITIVE,
            f32::from_bits(1),
            -f32::from_bits(0x7f_ffff),
            f32::MAX,
            -f32::MAX,
            0.1,
        ] {
            let (m, e) = f32_parts(x);
            assert!(m.unsigned_abs() < 1 << 24);
            assert_eq!((m as f64) * 2f64.powi(e), f64::from(x), "{x:e}");
        }
    }

    #[test]
    fn exact_where_an_f32_chain_loses_everything() {
        // 1e30 + 1e-30 - 1e30: the chain gives 0, the exact sum the small term.
        let mut s = ExactSum::new();
        s.add_product(1e30, 1.0, 1);
        s.add_product(1e-30, 1.0, 1);
        s.add_product(-1e30, 1.0, 1);
        assert_eq!(s.round().to_bits(), 1e-30f32.to_bits());
        // Products of subnormals are kept: 2^-149 * 2^-149 * 2^27 - the same = 0, and one
        // more such product alone rounds to +0 (far below the least subnormal).
        let tiny = f32::from_bits(1);
        let mut s = ExactSum::new();
        s.add_product(tiny, tiny, 1);
        assert_eq!(s.round().to_bits(), 0);
        s.add_product(tiny, tiny, -1);
        assert_eq!(s.round().to_bits(), 0);
        // A negative value that rounds to zero is -0.
        let mut s = ExactSum::new();
        s.add_product(-tiny, tiny, 1);
        assert_eq!(s.round().to_bits(), (-0.0f32).to_bits());
        // Overflow of the exact sum rounds to infinity; a sum past f32::MAX in between does
        // not (the chain would keep the infinity).
        let mut s = ExactSum::new();
        s.add_product(f32::MAX, 1.0, 2);
        assert_eq!(s.round(), f32::INFINITY);
        s.add_product(f32::MAX, -1.0, 1);
        assert_eq!(s.round(), f32::MAX);
    }

    #[test]
    fn specials() {
        let mut s = ExactSum::new();
        s.add_product(f32::INFINITY, 2.0, 3);
        s.add_product(1.0, 1.0, 5);
        assert_eq!(s.round(), f32::INFINITY);
        s.add_product(f32::NEG_INFINITY, 1.0, 1);
        assert_eq!(s.round().to_bits(), CANON_NAN.to_bits());
        let mut s = ExactSum::new();
        s.add_product(f32::INFINITY, 0.0, 1);
        assert_eq!(s.round().to_bits(), CANON_NAN.to_bits());
        let mut s = ExactSum::new();
        s.add_product(f32::NAN, 1.0, 1);
        assert_eq!(s.round().to_bits(), CANON_NAN.to_bits());
        let mut s = ExactSum::new();
        s.add_product(f32::NEG_INFINITY, 1.0, -1);
        assert_eq!(s.round(), f32::INFINITY);
    }

    /// Terms whose exact sum an f64 holds (integers times powers of two within 50 bits): the
    /// accumulator gives that f64 rounded to f32 (one rounding), in every order.
    fn terms() -> impl Strategy<Value = Vec<(i32, i32, i64)>> {
        prop::collection::vec(
            (-(1 << 12)..(1 << 12), -8i32..8, -(1i64 << 12)..(1 << 12)),
            1..40,
        )
    }

    proptest! {
        #[test]
        fn equals_f64_where_f64_is_exact(t in terms(), base in -140i32..100, big in any::<u32>()) {
            let mut s = ExactSum::new();
            let mut r = ExactSum::new();
            // Any finite f32 in and out again around the terms: carries and borrows through
            // every limb between them cancel.
            let big = f32::from_bits(big);
            let big = if big.is_finite() { big } else { -3.0e38 };
            s.add_product(big, 1.0, 1);
            r.add_product(big, -1.0, -1);
            let mut want = 0f64;
            for &(a, e, i) in &t {
                // a * 2^(e + base) as an f32 (exact: |a| < 2^12), times 1, times i.
                let x = (a as f64 * 2f64.powi(e + base)) as f32;
                s.add_product(x, 1.0, i);
                want += f64::from(x) * i as f64;
            }
            for &(a, e, i) in t.iter().rev() {
                let x = (a as f64 * 2f64.powi(e + base)) as f32;
                r.add_product(1.0, x, i);
            }
            s.add_product(-big, 1.0, 1);
            r.add_product(big, 1.0, -1);
            // Terms below 2^24 units of 2^(base - 8), spread over 16 binades, 40 of them: the
            // sum needs under 47 bits, exact in f64.
            prop_assert_eq!(s.round().to_bits(), r.round().to_bits());
            let w = want as f32;
            prop_assert_eq!(s.round().to_bits(), if w == 0.0 { 0 } else { w.to_bits() });
        }

        #[test]
        fn any_order_gives_the_same_bits(v in prop::collection::vec((any::<u32>(), any::<u32>(), -(1i64 << 26)..(1 << 26)), 1..30)) {
            let f = |b: u32| {
                let x = f32::from_bits(b);
                if x.is_finite() { x } else { 1.0 }
            };
            let mut a = ExactSum::new();
            let mut b = ExactSum::new();
            for &(x, y, i) in &v {
                a.add_product(f(x), f(y), i);
            }
            for &(x, y, i) in v.iter().rev() {
                b.add_product(f(y), f(x), i);
            }
            prop_assert_eq!(a.round().to_bits(), b.round().to_bits());
        }
    }
}
