//! `softmax_topk`: GPU == CPU reference for ids and weights, ties and NaN included.

use bitexact::kernels::router::softmax_topk;
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
