//! Test plumbing: the shared device, seeded value generators and the bit comparison.

#![allow(dead_code)]

use std::sync::OnceLock;

use bitexact::kernels::quantize::GpuActPair;
use bitexact::Device;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The process-wide device, or `None` after printing `SKIP: no CUDA device`. Panics instead
/// when `BITEXACT_REQUIRE_GPU=1`.
pub fn gpu() -> Option<&'static Device> {
    static DEV: OnceLock<Result<Device, String>> = OnceLock::new();
    let dev = DEV.get_or_init(|| Device::new(0).map_err(|e| e.to_string()));
    match dev {
        Ok(d) => Some(d),
        Err(e) => {
            if std::env::var("BITEXACT_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("BITEXACT_REQUIRE_GPU=1 but no CUDA device: {e}");
            }
            println!("SKIP: no CUDA device ({e})");
            None
        }
    }
}

/// Values that stress IEEE corner cases.
pub const SPECIALS: [f32; 14] = [
    0.0,
    -0.0,
    f32::INFINITY,
    f32::NEG_INFINITY,
    f32::NAN,
    f32::MIN_POSITIVE,
    -f32::MIN_POSITIVE,
    1.0e-40,  // subnormal
    -3.5e-42, // subnormal
    f32::from_bits(1),
    f32::MAX,
    f32::MIN,
    1.0,
    -1.0,
];

/// `len` values from `seed`: mostly uniform on `[-scale, scale)` with a wide exponent spread,
/// and with probability `special` one of [`SPECIALS`].
pub fn values(seed: u64, len: usize, scale: f32, special: f64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len)
        .map(|_| {
            if rng.gen_bool(special) {
                SPECIALS[rng.gen_range(0..SPECIALS.len())]
            } else {
                let m: f32 = rng.gen_range(-1.0..1.0);
                let e: i32 = rng.gen_range(-6..=2);
                m * scale * 2f32.powi(e)
            }
        })
        .collect()
}

/// Plain finite values uniform on `[-scale, scale)`.
pub fn finite(seed: u64, len: usize, scale: f32) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.gen_range(-scale..scale)).collect()
}

/// A buffer of NaN with a payload no kernel produces, so an element left unwritten shows.
pub fn poison(len: usize) -> Vec<f32> {
    vec![f32::from_bits(0x7fa5_a5a5); len]
}

/// Panics unless `got` and `want` are equal bit for bit, printing the first 10 mismatches
/// (index, both values in hex and decimal), their count and the worst relative error.
pub fn assert_bits_eq(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let mut count = 0usize;
    let mut worst = 0.0f64;
    let mut lines = Vec::new();
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if g.to_bits() != w.to_bits() {
            count += 1;
            let rel = ((f64::from(g) - f64::from(w)) / f64::from(w).abs().max(1e-300)).abs();
            if rel.is_finite() {
                worst = worst.max(rel);
            }
            if lines.len() < 10 {
                lines.push(format!(
                    "  [{i}] got 0x{:08x} ({g:e}) want 0x{:08x} ({w:e})",
                    g.to_bits(),
                    w.to_bits()
                ));
            }
        }
    }
    if count > 0 {
        panic!(
            "{what}: {count} of {} elements differ (worst relative error {worst:e}):\n{}",
            got.len(),
            lines.join("\n")
        );
    }
}

/// Panics unless the pair holds `want_x` (`[rows, width]`) bit for bit and, beside it, the
/// reference quantization of `want_x`: the check of every kernel that writes a [`GpuActPair`].
pub fn assert_pair_eq(what: &str, got: &GpuActPair, want_x: &[f32], rows: usize, width: usize) {
    assert_bits_eq(&format!("{what} x"), &got.x().to_host().unwrap(), want_x);
    let want_q = bitexact::reference::quantize::quantize_act(want_x, rows, width);
    assert_eq!(
        got.q().codes.to_host().unwrap(),
        want_q.codes,
        "{what} codes"
    );
    assert_bits_eq(
        &format!("{what} d"),
        &got.q().d.to_host().unwrap(),
        &want_q.d,
    );
    assert_bits_eq(
        &format!("{what} a"),
        &got.q().a.to_host().unwrap(),
        &want_q.a,
    );
}

/// Proptest settings for GPU properties: fewer cases, each one a full launch. `PROPTEST_CASES`
/// overrides the count (the sanitizer run asks for a few).
pub fn gpu_cases(cases: u32) -> proptest::test_runner::Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    proptest::test_runner::Config {
        cases,
        failure_persistence: None,
        ..Default::default()
    }
}
