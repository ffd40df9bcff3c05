//! Elementwise activations: GPU == CPU reference, bit for bit, across the whole float range.

use bitexact::kernels::activation::{sigmoid, swiglu, swiglu_halves, swiglu_halves_q8};
use bitexact::kernels::quantize::GpuActPair;
use bitexact::{reference, Error, GpuTensor};
use proptest::prelude::*;

use crate::common::{assert_bits_eq, assert_pair_eq, gpu, gpu_cases, poison, values};

fn swiglu_case(len: usize, seed: u64, scale: f32) {
    let Some(dev) = gpu() else { return };
    let gh = values(seed, len, scale, 0.05);
    let uh = values(seed ^ 3, len, 4.0, 0.05);
    let want = reference::activation::swiglu(&gh, &uh);
    let g = GpuTensor::from_host(dev, &gh, &[len]).unwrap();
    let u = GpuTensor::from_host(dev, &uh, &[len]).unwrap();
    let mut out = GpuTensor::from_host(dev, &poison(len), &[len]).unwrap();
    swiglu(dev, &g, &u, &mut out).unwrap();
    assert_bits_eq(
        &format!("swiglu len={len} seed={seed}"),
        &out.to_host().unwrap(),
        &want,
    );
}

/// Every 4099th bit pattern of the 2^32 floats (about a million values, every sign, exponent
/// and class) through sigmoid, which is `1 / (1 + exp(-x))`: our exp over its whole domain.
#[test]
fn sigmoid_sweeps_every_exponent() {
    let Some(dev) = gpu() else { return };
    let xs: Vec<f32> = (0..=u32::MAX / 4099)
        .map(|i| f32::from_bits(i * 4099))
        .collect();
    let want = reference::activation::sigmoid(&xs);
    let x = GpuTensor::from_host(dev, &xs, &[xs.len()]).unwrap();
    let mut out = GpuTensor::from_host(dev, &poison(xs.len()), &[xs.len()]).unwrap();
    sigmoid(dev, &x, &mut out).unwrap();
    assert_bits_eq("sigmoid sweep", &out.to_host().unwrap(), &want);
}

proptest! {
    #![proptest_config(gpu_cases(48))]

    #[test]
    fn swiglu_matches_reference(len in 1usize..=5000, seed in any::<u64>(), big in any::<bool>()) {
        // Large gates reach exp's overflow and underflow branches.
        swiglu_case(len, seed, if big { 200.0 } else { 8.0 });
    }
}

#[test]
fn swiglu_shapes_must_match() {
    let Some(dev) = gpu() else { return };
    let g = GpuTensor::from_host(dev, &[1.0f32; 6], &[2, 3]).unwrap();
    let u = GpuTensor::from_host(dev, &[1.0f32; 6], &[3, 2]).unwrap();
    let mut out = GpuTensor::from_host(dev, &poison(6), &[2, 3]).unwrap();
    assert!(matches!(
        swiglu(dev, &g, &u, &mut out),
        Err(Error::ShapeMismatch { .. })
    ));
    assert_bits_eq("untouched", &out.to_host().unwrap(), &poison(6));
}

/// `swiglu_halves` == the reference SwiGLU of each row's two halves (NaN, Inf and denormals
/// among the values); one row and many, odd widths; a bad shape writes nothing.
#[test]
fn swiglu_halves_matches_reference() {
    let Some(dev) = gpu() else { return };
    for (rows, f) in [(1usize, 768usize), (8, 768), (130, 96), (37, 5), (3, 1)] {
        let guh = values(rows as u64 * 31 + f as u64, rows * 2 * f, 12.0, 0.05);
        let mut want = Vec::with_capacity(rows * f);
        for row in guh.chunks(2 * f) {
            want.extend(reference::activation::swiglu(&row[..f], &row[f..]));
        }
        let gu = GpuTensor::from_host(dev, &guh, &[rows, 2 * f]).unwrap();
        let mut out = GpuTensor::from_host(dev, &poison(rows * f), &[rows, f]).unwrap();
        swiglu_halves(dev, &gu, &mut out).unwrap();
        assert_bits_eq(
            &format!("swiglu_halves rows={rows} f={f}"),
            &out.to_host().unwrap(),
            &want,
        );
        let mut bad = GpuTensor::from_host(dev, &poison(rows * (f + 1)), &[rows, f + 1]).unwrap();
        assert!(matches!(
            swiglu_halves(dev, &gu, &mut bad),
            Err(Error::ShapeMismatch { .. })
        ));
        assert_bits_eq(
            "untouched",
            &bad.to_host().unwrap(),
            &poison(rows * (f + 1)),
        );
        if f % 32 != 0 {
            continue;
        }
        // The variant that quantizes its output too: the pair starts as poison's (every value
        // and code is overwritten), then holds want and want's reference quantization.
        let seed = GpuTensor::from_host(dev, &poison(rows * f), &[rows, f]).unwrap();
        let mut pair = GpuActPair::quantize(dev, seed).unwrap();
        swiglu_halves_q8(dev, &gu, &mut pair).unwrap();
        assert_pair_eq(
            &format!("swiglu_halves_q8 rows={rows} f={f}"),
            &pair,
            &want,
            rows,
            f,
        );
    }
    // f % 32 != 0 cannot make a pair; a gu of the wrong width is a typed error, nothing written.
    let gu = GpuTensor::from_host(dev, &values(3, 2 * 64, 2.0, 0.0), &[1, 128]).unwrap();
    let seed = GpuTensor::from_host(dev, &poison(2 * 32), &[2, 32]).unwrap();
    let mut pair = GpuActPair::quantize(dev, seed).unwrap();
    assert!(matches!(
        swiglu_halves_q8(dev, &gu, &mut pair),
        Err(Error::ShapeMismatch { .. })
    ));
    assert_bits_eq("untouched", &pair.x().to_host().unwrap(), &poison(64));
}
