//! `moe_weighted_reduce`: GPU == the host loop it replaces, bit for bit, every version.

use bitexact::kernels::moe_reduce::{moe_weighted_reduce, moe_weighted_reduce_version};
use bitexact::{reference, Error, GpuTensor};
use proptest::prelude::*;

use crate::common::{assert_bits_eq, gpu, gpu_cases, poison, values};

fn case(n: usize, na: usize, dim: usize, shared: bool, seed: u64, version: Option<u32>) {
    let Some(dev) = gpu() else { return };
    let ph = values(seed, n * na * dim, 8.0, 0.02);
    let wh = values(seed ^ 1, n * na, 1.0, 0.02);
    let sh = values(seed ^ 2, n * dim, 8.0, 0.02);
    let want = reference::moe_reduce::moe_weighted_reduce(
        &ph,
        &wh,
        shared.then_some(sh.as_slice()),
        n,
        na,
        dim,
    );
    let partial = GpuTensor::from_host(dev, &ph, &[n, na, dim]).unwrap();
    let weight = GpuTensor::from_host(dev, &wh, &[n, na]).unwrap();
    let shared_t = GpuTensor::from_host(dev, &sh, &[n, dim]).unwrap();
    let mut out = GpuTensor::from_host(dev, &poison(n * dim), &[n, dim]).unwrap();
    let s = shared.then_some(&shared_t);
    match version {
        Some(v) => moe_weighted_reduce_version(dev, v, &partial, &weight, s, &mut out).unwrap(),
        None => moe_weighted_reduce(dev, &partial, &weight, s, &mut out).unwrap(),
    }
    assert_bits_eq(
        &format!("moe_weighted_reduce n={n} na={na} dim={dim} shared={shared} seed={seed} version={version:?}"),
        &out.to_host().unwrap(),
        &want,
    );
}

proptest! {
    #![proptest_config(gpu_cases(64))]

    #[test]
    fn matches_reference(
        n in 1usize..=600, na in 1usize..=16, dim in 1usize..=300,
        shared in any::<bool>(), seed in any::<u64>(),
    ) {
        case(n, na, dim, shared, seed, Some(1));
        case(n, na, dim, shared, seed, None);
    }

    #[test]
    fn v2_matches_reference(
        n in 1usize..=300, na in 1usize..=16, dim4 in 1usize..=80,
        shared in any::<bool>(), seed in any::<u64>(),
    ) {
        case(n, na, 4 * dim4, shared, seed, Some(2));
    }
}

#[test]
fn more_rows_than_one_grid() {
    case(70_001, 2, 5, true, 21, Some(1));
    case(70_001, 3, 8, true, 22, Some(2));
    case(70_001, 1, 4, false, 23, None);
}

#[test]
fn bad_shapes_are_typed_errors_and_write_nothing() {
    let Some(dev) = gpu() else { return };
    let (n, na, dim) = (3, 2, 8);
    let partial =
        GpuTensor::from_host(dev, &values(1, n * na * dim, 1.0, 0.0), &[n, na, dim]).unwrap();
    let weight = GpuTensor::from_host(dev, &values(2, n * na, 1.0, 0.0), &[n, na]).unwrap();
    let bad_weight = GpuTensor::from_host(dev, &values(2, n * 3, 1.0, 0.0), &[n, 3]).unwrap();
    let bad_shared = GpuTensor::from_host(dev, &values(3, n * 4, 1.0, 0.0), &[n, 4]).unwrap();
    let mut out = GpuTensor::from_host(dev, &poison(n * dim), &[n, dim]).unwrap();
    let e = moe_weighted_reduce(dev, &partial, &bad_weight, None, &mut out).unwrap_err();
    assert!(
        matches!(e, Error::ShapeMismatch { what: "weight", .. }),
        "{e}"
    );
    let e = moe_weighted_reduce(dev, &partial, &weight, Some(&bad_shared), &mut out).unwrap_err();
    assert!(
        matches!(e, Error::ShapeMismatch { what: "shared", .. }),
        "{e}"
    );
    let mut bad_out = GpuTensor::from_host(dev, &poison(n * 4), &[n, 4]).unwrap();
    let e = moe_weighted_reduce(dev, &partial, &weight, None, &mut bad_out).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { what: "out", .. }), "{e}");
    assert_bits_eq("untouched", &out.to_host().unwrap(), &poison(n * dim));
}
