//! Parity of the routing tables (`cuda/route.cu`, `src/kernels/route.rs`) with
//! `src/reference/route.rs`: the tables the device builds from router ids, entry for entry.
//! (The products over them are `tests/parity/gemm.rs`'s.)

use bitexact::kernels::route::RoutedRows;
use bitexact::{reference, GpuTensor};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::common::{gpu, gpu_cases};

/// Ids for `n` tokens of `k` slots over `ne` experts: `skew` of them to expert 0 (groups past a
/// tile), a few past the last expert (clamped; the router never writes them), the rest at
/// random.
fn ids(n: usize, k: usize, ne: usize, skew: f64, seed: u64) -> Vec<u32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n * k)
        .map(|_| match rng.gen_range(0.0..1.0) {
            u if u < skew => 0,
            u if u < skew + 0.05 => ne as u32 + rng.gen_range(0..3u32),
            _ => rng.gen_range(0..ne as u32),
        })
        .collect()
}

/// Both device builders against the reference for one routing.
fn case(n: usize, k: usize, ne: usize, skew: f64, seed: u64) {
    let Some(dev) = gpu() else { return };
    let ih = ids(n, k, ne, skew, seed);
    let ctx = format!("n={n} k={k} experts={ne} skew={skew} seed={seed}");
    let g = GpuTensor::from_host(dev, &ih, &[n, k]).unwrap();
    let (up, down) = RoutedRows::from_router(dev, &g, ne).unwrap();
    let (want_up, want_down) = reference::route::unsorted(&ih, k, ne);
    assert_eq!(up.to_host().unwrap(), want_up, "{ctx}: unsorted up");
    assert_eq!(down.to_host().unwrap(), want_down, "{ctx}: unsorted down");
    let (up, down) = RoutedRows::sorted_from_router(dev, &g, ne).unwrap();
    let (want_up, want_down) = reference::route::sorted(&ih, k, ne);
    assert_eq!(up.to_host().unwrap(), want_up, "{ctx}: sorted up");
    assert_eq!(down.to_host().unwrap(), want_down, "{ctx}: sorted down");
}

/// The 30B shape's decode (1 token, 8 of 128 experts) and a prefill of 300 tokens with a
/// skewed routing (groups of more than 64 rows); one expert; more experts than rows; slots
/// past a route_sort chunk of 256 rows.
#[test]
fn tables_match_reference() {
    case(1, 8, 128, 0.0, 1);
    case(300, 8, 128, 0.3, 2);
    case(40, 2, 1, 0.0, 3);
    case(3, 2, 256, 0.0, 4);
    case(129, 2, 7, 0.5, 5);
    case(0, 4, 16, 0.0, 6);
}

proptest! {
    #![proptest_config(gpu_cases(16))]

    /// Any small routing.
    #[test]
    fn any_routing_matches_reference(
        n in 1usize..=80, k in 1usize..=8, ne in 1usize..=40, skew in 0.0f64..0.9,
        seed in 0u64..1000,
    ) {
        case(n, k, ne, skew, seed);
    }
}
