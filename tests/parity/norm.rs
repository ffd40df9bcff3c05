//! `rmsnorm` and `add_rmsnorm`: GPU == CPU reference, bit for bit.

use bitexact::kernels::norm::{add_rmsnorm, rmsnorm};
use bitexact::{reference, Error, GpuTensor};
use proptest::prelude::*;

use crate::common::{assert_bits_eq, gpu, gpu_cases, poison, values};

proptest! {
    #![proptest_config(gpu_cases(48))]

    #[test]
    fn matches_reference(rows in 1usize..=300, width in 1usize..=700, seed in any::<u64>()) {
        case(rows, width, seed);
    }
}

/// `rows x width` values from `seed` through the GPU norm == the reference, bit for bit.
fn case(rows: usize, width: usize, seed: u64) {
    let Some(dev) = gpu() else { return };
    let xh = values(seed, rows * width, 8.0, 0.01);
    let wh = values(seed ^ 1, width, 2.0, 0.0);
    let want = reference::norm::rmsnorm(&xh, &wh, 1e-6);
    let x = GpuTensor::from_host(dev, &xh, &[rows, width]).unwrap();
    let w = GpuTensor::from_host(dev, &wh, &[width]).unwrap();
    let mut y = GpuTensor::from_host(dev, &poison(rows * width), &[rows, width]).unwrap();
    rmsnorm(dev, &x, &w, 1e-6, &mut y).unwrap();
    assert_bits_eq(
        &format!("rmsnorm rows={rows} width={width} seed={seed}"),
        &y.to_host().unwrap(),
        &want,
    );
}

/// Both kernels (warp per row below `ROW_KERNEL_MIN_WIDTH`, block per row from it) and the
/// block kernel's 2048-wide segments: widths on each side of both boundaries, one row (decode)
/// and many.
#[test]
fn wide_rows_and_segments() {
    let t = bitexact::kernels::norm::ROW_KERNEL_MIN_WIDTH;
    for width in [t - 1, t, t + 1, 2047, 2048, 2049, 4096, 4100, 6200] {
        for rows in [1usize, 3, 40] {
            case(rows, width, (width * 31 + rows) as u64);
        }
    }
}

#[test]
fn shapes_must_match() {
    let Some(dev) = gpu() else { return };
    let x = GpuTensor::from_host(dev, &[1.0f32; 12], &[3, 4]).unwrap();
    let w = GpuTensor::from_host(dev, &[1.0f32; 3], &[3]).unwrap();
    let mut y = GpuTensor::from_host(dev, &poison(12), &[3, 4]).unwrap();
    assert!(matches!(
        rmsnorm(dev, &x, &w, 1e-6, &mut y),
        Err(Error::ShapeMismatch { .. })
    ));
    assert_bits_eq("untouched", &y.to_host().unwrap(), &poison(12));
}

/// `add_rmsnorm` == the reference add then the reference norm, for the sum written back to
/// `h` and the normed rows: widths on each side of a warp, of the segments and of the row
/// kernel's threshold (the fused kernel takes every width), one row and many; NaN and Inf in
/// the residual pass through as the two kernels would carry them.
#[test]
fn add_then_norm() {
    for width in [1usize, 31, 33, 511, 512, 2047, 2048, 2049, 4100] {
        for rows in [1usize, 3, 40] {
            add_case(rows, width, (width * 17 + rows) as u64, false);
        }
    }
    add_case(2, 2048, 5, true);
}

fn add_case(rows: usize, width: usize, seed: u64, specials: bool) {
    let Some(dev) = gpu() else { return };
    let mut hh = values(seed, rows * width, 8.0, 0.01);
    let oh = values(seed ^ 2, rows * width, 8.0, 0.01);
    if specials {
        hh[3] = f32::NAN;
        hh[width + 7] = f32::INFINITY;
        hh[width + 9] = f32::MIN_POSITIVE / 4.0;
    }
    let wh = values(seed ^ 1, width, 2.0, 0.0);
    let mut want_h = hh.clone();
    reference::elementwise::add(&mut want_h, &oh);
    let want_y = reference::norm::rmsnorm(&want_h, &wh, 1e-6);
    let mut h = GpuTensor::from_host(dev, &hh, &[rows, width]).unwrap();
    let o = GpuTensor::from_host(dev, &oh, &[rows, width]).unwrap();
    let w = GpuTensor::from_host(dev, &wh, &[width]).unwrap();
    let mut y = GpuTensor::from_host(dev, &poison(rows * width), &[rows, width]).unwrap();
    add_rmsnorm(dev, &mut h, &o, &w, 1e-6, &mut y).unwrap();
    let what = format!("add_rmsnorm rows={rows} width={width} seed={seed}");
    assert_bits_eq(&format!("{what} h"), &h.to_host().unwrap(), &want_h);
    assert_bits_eq(&format!("{what} y"), &y.to_host().unwrap(), &want_y);
}

#[test]
fn add_rmsnorm_shapes_must_match() {
    let Some(dev) = gpu() else { return };
    let mut h = GpuTensor::from_host(dev, &[1.0f32; 12], &[3, 4]).unwrap();
    let o = GpuTensor::from_host(dev, &[1.0f32; 8], &[2, 4]).unwrap();
    let w = GpuTensor::from_host(dev, &[1.0f32; 4], &[4]).unwrap();
    let mut y = GpuTensor::from_host(dev, &poison(12), &[3, 4]).unwrap();
    assert!(matches!(
        add_rmsnorm(dev, &mut h, &o, &w, 1e-6, &mut y),
        Err(Error::ShapeMismatch { .. })
    ));
    assert_bits_eq("untouched y", &y.to_host().unwrap(), &poison(12));
    assert_bits_eq("untouched h", &h.to_host().unwrap(), &[1.0f32; 12]);
}
