//! Scalar functions shared by the CPU references, each the line-for-line twin of a helper in
//! `cuda/common.cuh`. Only correctly rounded IEEE operations are used (`+`, `*`, `/`,
//! [`f32::mul_add`], [`f32::round_ties_even`]), so the CPU and the GPU produce the same bits.

/// The NaN every bitexact kernel returns (what CUDA's float arithmetic produces).
pub const CANON_NAN: f32 = f32::from_bits(0x7fff_ffff);

/// Replaces any NaN by [`CANON_NAN`]. The CPU's NaN payloads differ from the GPU's (x86 keeps
/// the payload and sign of an input NaN, CUDA returns one canonical NaN); references apply this
/// wherever a value's bits are observed, so NaN results compare bit for bit. Twin: `bx_canon`.
#[inline]
pub fn canon(x: f32) -> f32 {
    if x.is_nan() {
        CANON_NAN
    } else {
        x
    }
}

/// Integer key with IEEE totalOrder: `-NaN < -inf < .. < -0 < +0 < .. < +inf < +NaN`.
/// Twin: `bx_order_key`.
#[inline]
pub fn order_key(x: f32) -> i32 {
    let b = x.to_bits() as i32;
    b ^ (((b >> 31) as u32) >> 1) as i32
}

const LOG2E: f32 = f32::from_bits(0x3fb8_aa3b); // 1.44269502162933349609375
const LN2_HI: f32 = f32::from_bits(0x3f31_7200); // 0.693145751953125
const LN2_LO: f32 = f32::from_bits(0x35bf_be8e); // 1.428606765330187045037746429443359375e-06
const EXP_HI: f32 = f32::from_bits(0x42b1_7218); // 88.72283935546875
const C7: f32 = f32::from_bits(0x3950_0d01); // 1/5040
const C6: f32 = f32::from_bits(0x3ab6_0b61); // 1/720
const C5: f32 = f32::from_bits(0x3c08_8889); // 1/120
const C4: f32 = f32::from_bits(0x3d2a_aaab); // 1/24
const C3: f32 = f32::from_bits(0x3e2a_aaab); // 1/6

#[inline]
fn pow2(n: i32) -> f32 {
    f32::from_bits(((n + 127) as u32) << 23)
}

/// `e^x`, bitexact's own: `x = n ln2 + r` with `n = round_ties_even(x * log2e)` and ln2 split
/// into hi + lo (two fmas), the degree-7 Taylor polynomial of `e^r` by Horner with fmas, then
/// `p * 2^n1 * 2^n2` with `n1 = n >> 1`, `n2 = n - n1` (the first product exact, the second
/// rounded once, so subnormal results round once). `x < -104` gives `+0`,
/// `x > 88.72283935546875` gives `+inf`, NaN gives [`CANON_NAN`]. Twin: `bx_exp`.
#[inline]
pub fn exp(x: f32) -> f32 {
    if x.is_nan() {
        return CANON_NAN;
    }
    if x > EXP_HI {
        return f32::INFINITY;
    }
    if x < -104.0 {
        return 0.0;
    }
    let n = (x * LOG2E).round_ties_even();
    let mut r = n.mul_add(-LN2_HI, x);
    r = n.mul_add(-LN2_LO, r);
    let mut p = C7;
    p = p.mul_add(r, C6);
    p = p.mul_add(r, C5);
    p = p.mul_add(r, C4);
    p = p.mul_add(r, C3);
    p = p.mul_add(r, 0.5);
    p = p.mul_add(r, 1.0);
    p = p.mul_add(r, 1.0);
    let ni = n as i32;
    let n1 = ni >> 1;
    let n2 = ni - n1;
    p *= pow2(n1);
    p * pow2(n2)
}

/// `1 / (1 + exp(-x))`. Twin: `bx_sigmoid`.
#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `x / (1 + exp(-x))`: one division, not `x * sigmoid(x)`. Twin: `bx_silu`.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

// ln: coefficients 2 / (2k + 1) of the series ln(m) = 2 atanh(s), s = (m - 1) / (m + 1).
const L3: f32 = f32::from_bits(0x3eaa_aaab); // 1/3
const L5: f32 = f32::from_bits(0x3e4c_cccd); // 1/5
const L7: f32 = f32::from_bits(0x3e12_4925); // 1/7
const L9: f32 = f32::from_bits(0x3de3_8e39); // 1/9
const L11: f32 = f32::from_bits(0x3dba_2e8c); // 1/11
const SQRT2: f32 = std::f32::consts::SQRT_2;

/// `ln x`, bitexact's own: `x = m 2^e` with `m` in `[sqrt(1/2), sqrt(2))` (subnormals scaled
/// by `2^23` first), `f = m - 1` (exact), `s = f / (2 + f)`, `z = s * s`,
/// `R = z (1/3 + z (1/5 + z (1/7 + z (1/9 + z/11))))` by Horner with fmas,
/// `ln m = fma(2s, R, 2s)`, and the result `fma(e, LN2_HI, fma(e, LN2_LO, ln m))` (`e LN2_HI` is
/// exact). `ln 0 = -inf`, `ln inf = inf`, a negative `x` or NaN gives [`CANON_NAN`]. Within 2 ulp
/// of the true logarithm (tested against f64). For the softplus of the Gated DeltaNet gate.
#[inline]
pub fn ln(x: f32) -> f32 {
    if x.is_nan() || x < 0.0 {
        return CANON_NAN;
    }
    if x == 0.0 {
        return f32::NEG_INFINITY;
    }
    if x == f32::INFINITY {
        return x;
    }
    let (mut bits, mut e) = (x.to_bits(), 0i32);
    if bits < 0x0080_0000 {
        // subnormal: exact scaling by 2^23
        bits = (x * f32::from_bits(0x4b00_0000)).to_bits();
        e = -23;
    }
    e += ((bits >> 23) & 0xff) as i32 - 127;
    let mut m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000);
    if m > SQRT2 {
        m *= 0.5;
        e += 1;
    }
    let f = m - 1.0;
    let s = f / (2.0 + f);
    let z = s * s;
    let mut r = L11;
    r = r.mul_add(z, L9);
    r = r.mul_add(z, L7);
    r = r.mul_add(z, L5);
    r = r.mul_add(z, L3);
    r *= z;
    let s2 = 2.0 * s;
    let lnm = s2.mul_add(r, s2);
    let ef = e as f32;
    ef.mul_add(LN2_HI, ef.mul_add(LN2_LO, lnm))
}

/// `ln(1 + exp(x))`, and `x` itself above 20 (where the two agree in f32). For the Gated
/// DeltaNet gate `g = softplus(alpha + dt_bias) * a`.
#[inline]
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        ln(1.0 + exp(x))
    }
}

/// Lanes of the fixed summation tree ([`butterfly_sum`]).
pub const LANES: usize = 32;

/// The fixed tree that sums 32 lane partials: for `off` in 16, 8, 4, 2, 1, every `l` at once
/// takes `s[l] + s[l ^ off]`; the result is `s[0]` (every lane holds the same bits).
/// Twin: `bx_butterfly_sum`.
pub fn butterfly_sum(mut s: [f32; LANES]) -> f32 {
    let mut off = LANES / 2;
    while off > 0 {
        let prev = s;
        for (l, sl) in s.iter_mut().enumerate() {
            *sl = prev[l] + prev[l ^ off];
        }
        off /= 2;
    }
    s[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ln` within 2 ulp of the f64 logarithm over normal, subnormal and extreme inputs, and
    /// exact at its special values.
    #[test]
    fn ln_is_within_two_ulp() {
        let mut worst = 0.0f64;
        let mut x = f32::from_bits(1);
        while x < f32::MAX / 1.001 {
            let got = f64::from(ln(x));
            let want = f64::from(x).ln();
            let ulp =
                f64::from(f32::from_bits((want as f32).abs().to_bits() + 1) - (want as f32).abs());
            let err = if want == 0.0 {
                got.abs() / f64::from(f32::MIN_POSITIVE)
            } else {
                (got - want).abs() / ulp
            };
            worst = worst.max(err);
            x = f32::from_bits(x.to_bits() + 997);
        }
        for v in [0.5f32, 1.0, 2.0, 0.999_999, 1.000_001, std::f32::consts::E] {
            let e = (f64::from(ln(v)) - f64::from(v).ln()).abs();
            assert!(e <= 2.0 * f64::from(f32::EPSILON), "ln({v}): {}", ln(v));
        }
        assert!(worst <= 2.0, "worst {worst} ulp");
        assert_eq!(ln(1.0), 0.0);
        assert_eq!(ln(0.0), f32::NEG_INFINITY);
        assert_eq!(ln(f32::INFINITY), f32::INFINITY);
        assert_eq!(ln(-1.0).to_bits(), CANON_NAN.to_bits());
        assert_eq!(ln(f32::NAN).to_bits(), CANON_NAN.to_bits());
        assert!((softplus(0.0) - std::f32::consts::LN_2).abs() < 1e-7);
        assert_eq!(softplus(30.0), 30.0);
        assert!(softplus(-30.0) >= 0.0);
    }

    #[test]
    fn exp_special_values() {
        assert_eq!(exp(0.0).to_bits(), 1.0f32.to_bits());
        assert_eq!(exp(-0.0).to_bits(), 1.0f32.to_bits());
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(f32::NEG_INFINITY).to_bits(), 0.0f32.to_bits());
        assert_eq!(exp(f32::NAN).to_bits(), CANON_NAN.to_bits());
        assert_eq!(exp(89.0), f32::INFINITY);
        assert_eq!(exp(-200.0).to_bits(), 0);
    }

    #[test]
    fn order_key_is_total_order() {
        let xs = [
            -f32::NAN,
            f32::NEG_INFINITY,
            -1.0,
            -f32::from_bits(1),
            -0.0,
            0.0,
            f32::from_bits(1),
            1.0,
            f32::INFINITY,
            f32::NAN,
        ];
        for w in xs.windows(2) {
            assert!(order_key(w[0]) < order_key(w[1]), "{:?}", w);
        }
    }
}
