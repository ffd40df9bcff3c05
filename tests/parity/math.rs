//! CPU-only properties of the shared scalar functions: our exp is accurate, and the scalar
//! helpers behave at the edges. (GPU == CPU for them is in `activation.rs`.)

use bitexact::math::{exp, sigmoid, silu, CANON_NAN};

fn ulp_distance(a: f32, b: f32) -> u32 {
    let key = |x: f32| {
        let b = x.to_bits() as i32;
        if b < 0 {
            i32::MIN.wrapping_sub(b) as i64
        } else {
            b as i64
        }
    };
    (key(a) - key(b)).unsigned_abs() as u32
}

#[test]
fn exp_is_within_two_ulp_on_normal_results() {
    let mut worst = 0;
    let mut x = -87.0f32;
    while x < 88.7 {
        let want = (f64::from(x)).exp() as f32;
        let d = ulp_distance(exp(x), want);
        worst = worst.max(d);
        assert!(d <= 2, "exp({x}) = {} vs {want}: {d} ulp", exp(x));
        x += 0.000_731;
    }
    println!("exp worst error on [-87, 88.7]: {worst} ulp");
}

#[test]
fn exp_edges() {
    assert_eq!(exp(f32::from_bits(0x42b1_7218).next_up()), f32::INFINITY);
    assert!(exp(88.7).is_finite());
    assert_eq!(exp(-104.5), 0.0);
    // Subnormal results are rounded once and stay close to the true value.
    let x = -90.0f32;
    let want = (f64::from(x)).exp();
    assert!(((f64::from(exp(x)) - want) / want).abs() < 1e-4);
    assert_eq!(exp(f32::NAN).to_bits(), CANON_NAN.to_bits());
}

#[test]
fn sigmoid_and_silu_edges() {
    assert_eq!(sigmoid(0.0), 0.5);
    assert_eq!(sigmoid(f32::INFINITY), 1.0);
    assert_eq!(sigmoid(f32::NEG_INFINITY), 0.0);
    assert_eq!(silu(0.0), 0.0);
    assert!(silu(-200.0) == 0.0 && silu(-200.0).is_sign_negative());
    assert_eq!(silu(200.0), 200.0);
}
