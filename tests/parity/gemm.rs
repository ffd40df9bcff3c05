//! f32 matrix products: GPU == the canonical dot of the reference, bit for bit; a GEMV row ==
//! the same row of a GEMM over N tokens == the grouped expert GEMM.

use bitexact::kernels::gemm::{gemm_f32, gemm_grouped_f32, RoutedRows};
use bitexact::{reference, Error, GpuTensor};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::common::{assert_bits_eq, gpu, gpu_cases, poison, values};

fn dense(n: usize, m: usize, k: usize, seed: u64) {
    let Some(dev) = gpu() else { return };
    let xh = values(seed, n * k, 2.0, 0.01);
    let wh = values(seed ^ 7, m * k, 1.0, 0.01);
    let want = reference::gemm::gemm_f32(&xh, &wh, n, m, k);
    let x = GpuTensor::from_host(dev, &xh, &[n, k]).unwrap();
    let w = GpuTensor::from_host(dev, &wh, &[m, k]).unwrap();
    let mut y = GpuTensor::from_host(dev, &poison(n * m), &[n, m]).unwrap();
    gemm_f32(dev, &x, &w, &mut y).unwrap();
    let got = y.to_host().unwrap();
    assert_bits_eq(
        &format!("gemm_f32 n={n} m={m} k={k} seed={seed}"),
        &got,
        &want,
    );

    // Each token alone (a GEMV) gives its row of the batched product.
    for t in [0, n / 2, n - 1] {
        let xt = GpuTensor::from_host(dev, &xh[t * k..(t + 1) * k], &[1, k]).unwrap();
        let mut yt = GpuTensor::from_host(dev, &poison(m), &[1, m]).unwrap();
        gemm_f32(dev, &xt, &w, &mut yt).unwrap();
        assert_bits_eq(
            &format!("gemv row {t} of n={n}"),
            &yt.to_host().unwrap(),
            &got[t * m..(t + 1) * m],
        );
    }
}

fn grouped(n: usize, ne: usize, m: usize, k: usize, seed: u64) {
    let Some(dev) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(seed);
    let xh = values(seed, n * k, 2.0, 0.01);
    let wh = values(seed ^ 9, ne * m * k, 1.0, 0.01);
    // A random routing: each token to 1..=3 distinct slots of a [n * 3, m] output.
    let (mut xr, mut ex, mut yr) = (Vec::new(), Vec::new(), Vec::new());
    for t in 0..n {
        for slot in 0..rng.gen_range(1..=3usize) {
            xr.push(t as u32);
            ex.push(rng.gen_range(0..ne) as u32);
            yr.push((t * 3 + slot) as u32);
        }
    }
    let ny = n * 3;
    let mut want = poison(ny * m);
    reference::gemm::gemm_grouped_f32(&xh, &wh, &mut want, &xr, &ex, &yr, m, k);
    let x = GpuTensor::from_host(dev, &xh, &[n, k]).unwrap();
    let w = GpuTensor::from_host(dev, &wh, &[ne, m, k]).unwrap();
    let rows = RoutedRows::new(dev, &xr, &ex, &yr, n, ne, ny).unwrap();
    let mut y = GpuTensor::from_host(dev, &poison(ny * m), &[ny, m]).unwrap();
    gemm_grouped_f32(dev, &x, &w, &rows, &mut y).unwrap();
    let got = y.to_host().unwrap();
    assert_bits_eq(
        &format!("gemm_grouped_f32 n={n} ne={ne} m={m} k={k} seed={seed}"),
        &got,
        &want,
    );

    // The grouped row equals the dense product with that expert's matrix.
    let r = xr.len() - 1;
    let e = ex[r] as usize;
    let dense = reference::gemm::gemm_f32(
        &xh[xr[r] as usize * k..][..k],
        &wh[e * m * k..][..m * k],
        1,
        m,
        k,
    );
    assert_bits_eq(
        "grouped row == dense row",
        &got[yr[r] as usize * m..][..m],
        &dense,
    );
}

proptest! {
    #![proptest_config(gpu_cases(48))]

    #[test]
    fn dense_matches_reference(n in 1usize..=40, m in 1usize..=70, k in 1usize..=300, seed in any::<u64>()) {
        dense(n, m, k, seed);
    }

    #[test]
    fn grouped_matches_reference(n in 1usize..=30, ne in 1usize..=9, m in 1usize..=40, k in 1usize..=200, seed in any::<u64>()) {
        grouped(n, ne, m, k, seed);
    }
}

#[test]
fn block_boundaries() {
    // K around the 32-element block and the 4-block round of the canonical order.
    for k in [1, 31, 32, 33, 127, 128, 129, 255, 256, 257, 2048] {
        dense(3, 5, k, k as u64);
    }
}

#[test]
fn more_rows_than_one_grid() {
    dense(65_535 + 70, 3, 37, 5);
}

#[test]
fn routing_errors_are_typed_and_write_nothing() {
    let Some(dev) = gpu() else { return };
    let e = RoutedRows::new(dev, &[0, 1], &[0, 4], &[0, 1], 2, 4, 2).unwrap_err();
    assert!(
        matches!(
            e,
            Error::IndexOutOfRange {
                what: "experts",
                position: 1,
                index: 4,
                bound: 4,
                ..
            }
        ),
        "{e}"
    );
    let e = RoutedRows::new(dev, &[0, 2], &[0, 1], &[0, 1], 2, 4, 2).unwrap_err();
    assert!(
        matches!(e, Error::IndexOutOfRange { what: "x_rows", .. }),
        "{e}"
    );
    let e = RoutedRows::new(dev, &[0, 1], &[0, 1], &[1, 1], 2, 4, 2).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");

    let rows = RoutedRows::new(dev, &[0, 1], &[0, 3], &[1, 0], 2, 4, 2).unwrap();
    let x = GpuTensor::from_host(dev, &values(1, 2 * 8, 1.0, 0.0), &[2, 8]).unwrap();
    let w_bad = GpuTensor::from_host(dev, &values(2, 3 * 5 * 8, 1.0, 0.0), &[3, 5, 8]).unwrap();
    let mut y = GpuTensor::from_host(dev, &poison(2 * 5), &[2, 5]).unwrap();
    let e = gemm_grouped_f32(dev, &x, &w_bad, &rows, &mut y).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { what: "w", .. }), "{e}");
    let w = GpuTensor::from_host(dev, &values(2, 4 * 5 * 7, 1.0, 0.0), &[4, 5, 7]).unwrap();
    assert!(gemm_grouped_f32(dev, &x, &w, &rows, &mut y).is_err());
    let mut y_dense = GpuTensor::from_host(dev, &poison(2 * 4), &[2, 4]).unwrap();
    assert!(gemm_f32(
        dev,
        &x,
        &GpuTensor::from_host(dev, &[0.0f32; 4 * 7], &[4, 7]).unwrap(),
        &mut y_dense
    )
    .is_err());
    assert_bits_eq("untouched", &y.to_host().unwrap(), &poison(10));
    assert_bits_eq("untouched", &y_dense.to_host().unwrap(), &poison(8));
}
