//! `rmsnorm`: GPU == CPU reference, bit for bit.

use bitexact::kernels::norm::rmsnorm;
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
