//! `row_scale`: GPU == CPU reference, bit for bit, every version.

use bitexact::kernels::row_scale::{row_scale, row_scale_version};
use bitexact::{reference, Error, GpuTensor};
use proptest::prelude::*;

use crate::common::{assert_bits_eq, gpu, gpu_cases, values};

fn case(rows: usize, cols: usize, seed: u64, version: Option<u32>) {
    let Some(dev) = gpu() else { return };
    let buf_h = values(seed, rows * cols, 4.0, 0.05);
    let scales_h = values(seed ^ 0x5ca1e, rows, 2.0, 0.1);
    let mut want = buf_h.clone();
    reference::row_scale::row_scale(&mut want, &scales_h, cols);
    let mut buf = GpuTensor::from_host(dev, &buf_h, &[rows, cols]).unwrap();
    let scales = GpuTensor::from_host(dev, &scales_h, &[rows]).unwrap();
    match version {
        Some(v) => row_scale_version(dev, v, &mut buf, &scales).unwrap(),
        None => row_scale(dev, &mut buf, &scales).unwrap(),
    }
    let got = buf.to_host().unwrap();
    assert_bits_eq(
        &format!("row_scale rows={rows} cols={cols} seed={seed} version={version:?}"),
        &got,
        &want,
    );
}

proptest! {
    #![proptest_config(gpu_cases(64))]

    #[test]
    fn matches_reference(rows in 1usize..=600, cols in 1usize..=300, seed in any::<u64>()) {
        case(rows, cols, seed, Some(1));
        case(rows, cols, seed, None);
    }

    #[test]
    fn v2_matches_reference(rows in 1usize..=600, cols4 in 1usize..=80, seed in any::<u64>()) {
        case(rows, 4 * cols4, seed, Some(2));
    }
}

#[test]
fn more_rows_than_one_grid() {
    // 65,535 rows is the grid's y limit: the wrapper must chunk, not fail.
    case(65_535 + 1_002, 3, 11, Some(1));
    case(65_535 + 1_002, 8, 12, Some(2));
}

#[test]
fn bad_shapes_are_typed_errors_and_write_nothing() {
    let Some(dev) = gpu() else { return };
    let host = values(1, 12, 1.0, 0.0);
    let mut buf = GpuTensor::from_host(dev, &host, &[3, 4]).unwrap();
    let wrong = GpuTensor::from_host(dev, &[2.0f32; 2], &[2]).unwrap();
    let e = row_scale(dev, &mut buf, &wrong).unwrap_err();
    assert!(
        matches!(e, Error::ShapeMismatch { what: "scales", .. }),
        "{e}"
    );
    let mut flat = GpuTensor::from_host(dev, &host, &[12]).unwrap();
    let scales = GpuTensor::from_host(dev, &[2.0f32; 3], &[3]).unwrap();
    assert!(matches!(
        row_scale(dev, &mut flat, &scales),
        Err(Error::InvalidArgument { .. })
    ));
    let mut odd = GpuTensor::from_host(dev, &host, &[2, 6]).unwrap();
    let s2 = GpuTensor::from_host(dev, &[2.0f32; 2], &[2]).unwrap();
    assert!(matches!(
        row_scale_version(dev, 2, &mut odd, &s2),
        Err(Error::InvalidArgument { .. })
    ));
    assert_bits_eq("untouched", &buf.to_host().unwrap(), &host);
    assert_bits_eq("untouched", &odd.to_host().unwrap(), &host);
}
