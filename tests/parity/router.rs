//! `softmax_topk` and `route`: GPU == CPU reference for logits, ids, weights and routing
//! tables, ties and NaN included.

use bitexact::kernels::gemm::GpuMatrix;
use bitexact::kernels::router::{route, softmax_topk, RouteCounters};
use bitexact::quant::{QuantMatrix, WeightFormat};
use bitexact::{reference, Error, GpuTensor};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::common::{assert_bits_eq, gpu, gpu_cases, poison, SPECIALS};

/// Logits with many exact ties (drawn from a small set), some specials, and wide ranges.
fn logits(seed: u64, len: usize, mode: u8) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len)
        .map(|_| match mode % 3 {
            0 => rng.gen_range(-8.0f32..8.0),
            1 => [0.5f32, -1.0, 2.0, 2.0, 0.0, -0.0][rng.gen_range(0..6)],
            _ => {
                if rng.gen_bool(0.05) {
                    SPECIALS[rng.gen_range(0..SPECIALS.len())]
                } else {
                    rng.gen_range(-200.0f32..200.0)
                }
            }
        })
        .collect()
}

fn case(n: usize, e: usize, k: usize, renorm: bool, seed: u64, mode: u8) {
    let Some(dev) = gpu() else { return };
    let lh = logits(seed, n * e, mode);
    let (want_ids, want_w) = reference::router::softmax_topk(&lh, n, e, k, renorm);
    let l = GpuTensor::from_host(dev, &lh, &[n, e]).unwrap();
    let mut ids = GpuTensor::from_host(dev, &vec![u32::MAX; n * k], &[n, k]).unwrap();
    let mut w = GpuTensor::from_host(dev, &poison(n * k), &[n, k]).unwrap();
    softmax_topk(dev, &l, k, renorm, &mut ids, &mut w).unwrap();
    let ctx = format!("softmax_topk n={n} e={e} k={k} renorm={renorm} seed={seed} mode={mode}");
    assert_eq!(ids.to_host().unwrap(), want_ids, "{ctx}: ids");
    assert_bits_eq(&ctx, &w.to_host().unwrap(), &want_w);
}

proptest! {
    #![proptest_config(gpu_cases(64))]

    #[test]
    fn matches_reference(
        n in 1usize..=300, e in 1usize..=256, kf in 0.0f64..1.0,
        renorm in any::<bool>(), seed in any::<u64>(), mode in 0u8..3,
    ) {
        let k = 1 + ((e.min(32) - 1) as f64 * kf) as usize;
        case(n, e, k, renorm, seed, mode);
    }
}

#[test]
fn large_expert_counts() {
    case(7, 2048, 32, true, 1, 0);
    case(5, 1000, 8, false, 2, 1);
    case(3, 257, 9, true, 3, 2);
}

#[test]
fn ties_go_to_the_lower_expert_id() {
    let Some(_) = gpu() else { return };
    // All logits equal: the top-k must be experts 0..k in order.
    let (ids, _) = reference::router::softmax_topk(&[1.5; 16], 1, 16, 4, true);
    assert_eq!(ids, vec![0, 1, 2, 3]);
    case(4, 16, 4, true, 0, 1);
}

#[test]
fn bad_arguments_are_typed_errors_and_write_nothing() {
    let Some(dev) = gpu() else { return };
    let l = GpuTensor::from_host(dev, &[0.0f32; 2 * 8], &[2, 8]).unwrap();
    let mut ids = GpuTensor::from_host(dev, &[7u32; 2 * 9], &[2, 9]).unwrap();
    let mut w = GpuTensor::from_host(dev, &poison(18), &[2, 9]).unwrap();
    assert!(matches!(
        softmax_topk(dev, &l, 9, true, &mut ids, &mut w),
        Err(Error::InvalidArgument { .. })
    ));
    let mut ids3 = GpuTensor::from_host(dev, &[7u32; 2 * 3], &[2, 3]).unwrap();
    assert!(matches!(
        softmax_topk(dev, &l, 3, true, &mut ids3, &mut w),
        Err(Error::ShapeMismatch { .. })
    ));
    let big = GpuTensor::<f32>::zeros(dev, &[1, 4096]).unwrap();
    assert!(matches!(
        softmax_topk(dev, &big, 9, true, &mut ids, &mut w),
        Err(Error::InvalidArgument { .. })
    ));
    assert_eq!(ids.to_host().unwrap(), vec![7u32; 18]);
    assert_eq!(ids3.to_host().unwrap(), vec![7u32; 6]);
    assert_bits_eq("untouched", &w.to_host().unwrap(), &poison(18));
}

/// `route` (router product, softmax, top-k and tables in one launch) == the reference product
/// and routing, bit for bit, and its tables == `reference::route::unsorted`; three launches on one set of
/// counters (each must leave them at zero for the next), specials among the inputs.
fn route_case(n: usize, e: usize, kd: usize, k: usize, renorm: bool, seed: u64) {
    let Some(dev) = gpu() else { return };
    let wh = crate::common::values(seed, e * kd, 1.0, 0.0);
    let w = GpuMatrix::upload(
        dev,
        &QuantMatrix::quantize(WeightFormat::F32, &wh, 1, e, kd).unwrap(),
    )
    .unwrap();
    let mut counters = RouteCounters::new(dev, 8).unwrap();
    for call in 0..3u64 {
        let special = if call == 2 { 0.02 } else { 0.0 };
        let xh = crate::common::values(seed ^ (call + 1), n * kd, 2.0, special);
        let want_l = reference::gemm::gemm_f32(&xh, &wh, n, e, kd);
        let (want_ids, want_w) = reference::router::softmax_topk(&want_l, n, e, k, renorm);
        let x = GpuTensor::from_host(dev, &xh, &[n, kd]).unwrap();
        let mut l = GpuTensor::from_host(dev, &poison(n * e), &[n, e]).unwrap();
        let mut ids = GpuTensor::from_host(dev, &vec![u32::MAX; n * k], &[n, k]).unwrap();
        let mut wt = GpuTensor::from_host(dev, &poison(n * k), &[n, k]).unwrap();
        let (up, down) = route(
            dev,
            &x,
            &w,
            k,
            renorm,
            &mut counters,
            &mut l,
            &mut ids,
            &mut wt,
        )
        .unwrap();
        let ctx = format!("route n={n} e={e} K={kd} k={k} renorm={renorm} seed={seed} call={call}");
        assert_bits_eq(&format!("{ctx} logits"), &l.to_host().unwrap(), &want_l);
        assert_eq!(ids.to_host().unwrap(), want_ids, "{ctx}: ids");
        assert_bits_eq(&format!("{ctx} weights"), &wt.to_host().unwrap(), &want_w);
        let (want_up, want_down) = reference::route::unsorted(&want_ids, k, e);
        assert_eq!(
            &up.to_host().unwrap()[..9 * n * k],
            &want_up[..],
            "{ctx}: up table"
        );
        assert_eq!(
            &down.to_host().unwrap()[..9 * n * k],
            &want_down[..],
            "{ctx}: down table"
        );
    }
}

/// One token and the most the counters take; the 128 experts of the 30B shape and the limits
/// (1, 2048); K below, at and past a 2048-wide segment, and K % 4 != 0 (the scalar loads).
#[test]
fn route_matches_reference() {
    route_case(1, 128, 2048, 8, true, 1);
    route_case(8, 128, 2048, 8, true, 2);
    route_case(3, 2048, 64, 32, false, 3);
    route_case(2, 1, 100, 1, true, 4);
    route_case(5, 60, 4100, 6, false, 5);
    route_case(1, 37, 2049, 9, true, 6);
    route_case(4, 16, 5, 4, true, 7);
}

/// Counters past the launch grid's limit are refused.
#[test]
fn route_counters_have_a_limit() {
    let Some(dev) = gpu() else { return };
    assert!(matches!(
        RouteCounters::new(dev, bitexact::kernels::router::MAX_ROUTE_TOKENS + 1),
        Err(Error::InvalidArgument { .. })
    ));
}

/// More tokens than the counters, a router that is not F32, or a logits buffer of the wrong
/// shape: typed errors, nothing written.
#[test]
fn route_refuses_bad_input() {
    let Some(dev) = gpu() else { return };
    let (e, kd) = (16usize, 64usize);
    let wh = crate::common::values(9, e * kd, 1.0, 0.0);
    let f32w = GpuMatrix::upload(
        dev,
        &QuantMatrix::quantize(WeightFormat::F32, &wh, 1, e, kd).unwrap(),
    )
    .unwrap();
    let q8w = GpuMatrix::upload(
        dev,
        &QuantMatrix::quantize(WeightFormat::Q8_0, &wh, 1, e, kd).unwrap(),
    )
    .unwrap();
    let mut counters = RouteCounters::new(dev, 2).unwrap();
    for (n, w, lrows) in [(3usize, &f32w, 3usize), (1, &q8w, 1), (1, &f32w, 2)] {
        let x = GpuTensor::from_host(dev, &vec![1.0f32; n * kd], &[n, kd]).unwrap();
        let mut l = GpuTensor::from_host(dev, &poison(lrows * e), &[lrows, e]).unwrap();
        let mut ids = GpuTensor::from_host(dev, &vec![7u32; n * 4], &[n, 4]).unwrap();
        let mut wt = GpuTensor::from_host(dev, &poison(n * 4), &[n, 4]).unwrap();
        assert!(route(
            dev,
            &x,
            w,
            4,
            true,
            &mut counters,
            &mut l,
            &mut ids,
            &mut wt
        )
        .is_err());
        assert_bits_eq("untouched", &l.to_host().unwrap(), &poison(lrows * e));
        assert_eq!(ids.to_host().unwrap(), vec![7u32; n * 4]);
        assert_bits_eq("untouched", &wt.to_host().unwrap(), &poison(n * 4));
    }
}
