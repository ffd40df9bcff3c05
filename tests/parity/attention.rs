//! `attention`: every kernel (v1, the prefill tile, the split decode) == the CPU reference, bit
//! for bit; a query's output does not depend on how many other queries share the launch or on
//! which kernel runs it.

use bitexact::kernels::attention::{
    attention, attention_with, kv_write, AttentionKernel, LayerCache, SPLIT_MAX_QUERIES,
};
use bitexact::kernels::rope::Positions;
use bitexact::{reference, Device, GpuTensor};
use proptest::prelude::*;

use crate::common::{assert_bits_eq, gpu, gpu_cases, poison, values};

const KERNELS: [AttentionKernel; 4] = [
    AttentionKernel::Auto,
    AttentionKernel::V1,
    AttentionKernel::Tile,
    AttentionKernel::Split,
];

fn tile_takes(hd: usize) -> bool {
    hd % 4 == 0 && hd <= 256
}

/// A cache of `cap` rows whose rows `0..filled` hold `k_all, v_all` (`[filled, n_kv, hd]`),
/// written by `kv_write` in two steps (the rows before `start`, then the rest), and the host
/// copies in the cache layout.
#[allow(clippy::too_many_arguments)]
fn filled_cache(
    dev: &Device,
    k_all: &[f32],
    v_all: &[f32],
    start: usize,
    filled: usize,
    n_kv: usize,
    hd: usize,
    cap: usize,
) -> (LayerCache, Vec<f32>, Vec<f32>) {
    let mut kc = vec![0.0f32; n_kv * cap * hd];
    let mut vc = vec![0.0f32; n_kv * cap * hd];
    for p in 0..filled {
        for h in 0..n_kv {
            let (src, dst) = ((p * n_kv + h) * hd, (h * cap + p) * hd);
            kc[dst..dst + hd].copy_from_slice(&k_all[src..src + hd]);
            vc[dst..dst + hd].copy_from_slice(&v_all[src..src + hd]);
        }
    }
    let mut cache = LayerCache::new(dev, n_kv, cap, hd).unwrap();
    for (r0, r1) in [(0, start), (start, filled)] {
        if r1 == r0 {
            continue;
        }
        let rows: Vec<u32> = (r0 as u32..r1 as u32).collect();
        let w = n_kv * hd;
        let kt = GpuTensor::from_host(dev, &k_all[r0 * w..r1 * w], &[r1 - r0, n_kv, hd]).unwrap();
        let vt = GpuTensor::from_host(dev, &v_all[r0 * w..r1 * w], &[r1 - r0, n_kv, hd]).unwrap();
        kv_write(
            dev,
            &mut cache,
            &kt,
            &vt,
            &Positions::new(dev, &rows).unwrap(),
        )
        .unwrap();
    }
    (cache, kc, vc)
}

/// `nq` queries at positions `start..start + nq` (or `pos` when given) against a cache of
/// `cap` rows: every kernel against the reference; then the last query alone.
#[allow(clippy::too_many_arguments)]
fn case(
    nq: usize,
    start: usize,
    n_heads: usize,
    n_kv: usize,
    hd: usize,
    cap: usize,
    seed: u64,
    special: f64,
) {
    let Some(dev) = gpu() else { return };
    let filled = start + nq;
    let k_all = values(seed, filled * n_kv * hd, 2.0, special);
    let v_all = values(seed ^ 5, filled * n_kv * hd, 2.0, special);
    let q = values(seed ^ 9, nq * n_heads * hd, 2.0, special);
    let (cache, kc, vc) = filled_cache(dev, &k_all, &v_all, start, filled, n_kv, hd, cap);
    let pos: Vec<u32> = (start as u32..filled as u32).collect();
    let want = reference::attention::attention(&q, &kc, &vc, &pos, n_heads, n_kv, hd, cap);

    let p = Positions::new(dev, &pos).unwrap();
    let qg = GpuTensor::from_host(dev, &q, &[nq, n_heads, hd]).unwrap();
    for kernel in KERNELS {
        if kernel == AttentionKernel::Tile && !tile_takes(hd) {
            continue;
        }
        let mut out = GpuTensor::from_host(dev, &poison(q.len()), &[nq, n_heads, hd]).unwrap();
        attention_with(dev, kernel, &qg, &cache, &p, &mut out).unwrap();
        assert_bits_eq(
            &format!("attention {kernel:?} nq={nq} start={start} heads={n_heads}/{n_kv} hd={hd} seed={seed}"),
            &out.to_host().unwrap(),
            &want,
        );
    }

    // The last query alone gives the same bits.
    let last = Positions::new(dev, &[filled as u32 - 1]).unwrap();
    let q1 = GpuTensor::from_host(dev, &q[(nq - 1) * n_heads * hd..], &[1, n_heads, hd]).unwrap();
    let mut o1 = GpuTensor::from_host(dev, &poison(n_heads * hd), &[1, n_heads, hd]).unwrap();
    attention(dev, &q1, &cache, &last, &mut o1).unwrap();
    assert_bits_eq(
        "last query alone",
        &o1.to_host().unwrap(),
        &want[(nq - 1) * n_heads * hd..],
    );
}

proptest! {
    #![proptest_config(gpu_cases(24))]

    #[test]
    fn matches_reference(
        nq in 1usize..=140, start in 0usize..=300, gqa in 0usize..4, n_kv in 1usize..=3,
        hd in prop::sample::select(vec![16usize, 18, 32, 48, 64, 80, 96, 128, 200, 256]),
        seed in any::<u64>(),
    ) {
        let n_heads = n_kv << gqa;
        case(nq, start, n_heads, n_kv, hd, start + nq + 5, seed, 0.0);
    }
}

/// Every chunk boundary and the split/tile dispatch boundary: queries ending just below, at and
/// above a multiple of 64, and launches of SPLIT_MAX_QUERIES - 1 ..= + 1 queries.
#[test]
fn chunk_and_dispatch_boundaries() {
    for (nq, start) in [
        (1, 62),
        (1, 63),
        (1, 64),
        (2, 126),
        (64, 0),
        (65, 0),
        (63, 1),
    ] {
        case(nq, start, 8, 2, 128, start + nq, 11 + start as u64, 0.0);
    }
    for nq in [
        SPLIT_MAX_QUERIES - 1,
        SPLIT_MAX_QUERIES,
        SPLIT_MAX_QUERIES + 1,
    ] {
        case(nq, 100, 8, 1, 64, 200, nq as u64, 0.0);
    }
}

/// NaN, infinities, signed zeros and subnormals in q, k and v: the kernels agree with the
/// reference on every bit, NaN included (canonical NaN).
#[test]
fn ieee_specials() {
    for (i, hd) in [32usize, 128, 20].into_iter().enumerate() {
        case(70, 90, 4, 2, hd, 170, 100 + i as u64, 0.02);
    }
}

/// Queries at arbitrary, unsorted, repeated positions in one launch.
#[test]
fn scattered_positions() {
    let Some(dev) = gpu() else { return };
    let (n_heads, n_kv, hd, cap) = (4, 2, 64, 400);
    let k_all = values(3, cap * n_kv * hd, 2.0, 0.0);
    let v_all = values(4, cap * n_kv * hd, 2.0, 0.0);
    let (cache, kc, vc) = filled_cache(dev, &k_all, &v_all, 100, cap, n_kv, hd, cap);
    let pos: Vec<u32> = (0..90u32).map(|i| (i * 997 + 13) % cap as u32).collect();
    let q = values(5, pos.len() * n_heads * hd, 2.0, 0.0);
    let want = reference::attention::attention(&q, &kc, &vc, &pos, n_heads, n_kv, hd, cap);
    let p = Positions::new(dev, &pos).unwrap();
    let qg = GpuTensor::from_host(dev, &q, &[pos.len(), n_heads, hd]).unwrap();
    for kernel in KERNELS {
        let mut out = GpuTensor::from_host(dev, &poison(q.len()), qg.dims()).unwrap();
        attention_with(dev, kernel, &qg, &cache, &p, &mut out).unwrap();
        assert_bits_eq(
            &format!("scattered {kernel:?}"),
            &out.to_host().unwrap(),
            &want,
        );
    }
}

/// Query heads per kv head that are not a multiple of 4 (the tiled split kernel pads its head
/// groups of 4): 6, 5 and 3, at head dims the tiled kernel takes.
#[test]
fn odd_head_groups() {
    case(3, 100, 12, 2, 128, 200, 4, 0.0);
    case(2, 70, 5, 1, 64, 100, 5, 0.0);
    case(1, 300, 3, 1, 48, 310, 6, 0.0);
}

/// Long contexts; the combine kernel stages 128 chunks at a time: queries whose chunks end
/// on either side of that batch boundary (129 and 130 chunks: positions 8255 and 8256).
#[test]
fn long_context() {
    case(2, 8_255, 8, 2, 128, 8_300, 4, 0.0);
    case(3, 4_500, 4, 2, 128, 4_600, 1, 0.0);
    case(2, 20_000, 2, 1, 64, 20_002, 2, 0.0);
    case(130, 2_000, 8, 1, 128, 2_130, 3, 0.0);
}

/// Refusals write nothing: the tile kernel with a head dim it does not take, a position past
/// the cache, heads that are not a multiple of the kv heads.
#[test]
fn bad_input_writes_nothing() {
    let Some(dev) = gpu() else { return };
    let cache = LayerCache::new(dev, 2, 16, 18).unwrap();
    let q = GpuTensor::from_host(dev, &values(1, 2 * 4 * 18, 1.0, 0.0), &[2, 4, 18]).unwrap();
    let cases: [(AttentionKernel, Vec<u32>); 2] = [
        (AttentionKernel::Tile, vec![0, 1]),
        (AttentionKernel::Auto, vec![3, 16]),
    ];
    for (kernel, pos) in cases {
        let mut out = GpuTensor::from_host(dev, &poison(2 * 4 * 18), &[2, 4, 18]).unwrap();
        let p = Positions::new(dev, &pos).unwrap();
        assert!(attention_with(dev, kernel, &q, &cache, &p, &mut out).is_err());
        let got = out.to_host().unwrap();
        assert!(
            got.iter().all(|x| x.to_bits() == 0x7fa5_a5a5),
            "{kernel:?} wrote"
        );
    }
    let q3 = GpuTensor::from_host(dev, &values(1, 2 * 3 * 18, 1.0, 0.0), &[2, 3, 18]).unwrap();
    let mut out = GpuTensor::from_host(dev, &poison(2 * 3 * 18), &[2, 3, 18]).unwrap();
    let p = Positions::new(dev, &[0, 1]).unwrap();
    assert!(attention(dev, &q3, &cache, &p, &mut out).is_err());
}
