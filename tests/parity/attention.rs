//! `attention`: every kernel (v1, the prefill tile, the split decode) == the CPU reference, bit
//! for bit; a query's output does not depend on how many other queries share the launch or on
//! which kernel runs it.

use bitexact::kernels::attention::{
    attention, attention_pair, attention_with, kv_write, AttentionKernel, LayerCache,
    SPLIT_MAX_QUERIES,
};
use bitexact::kernels::quantize::GpuActPair;
use bitexact::kernels::rope::Positions;
use bitexact::{reference, Device, GpuTensor};
use proptest::prelude::*;

use crate::common::{assert_bits_eq, assert_pair_eq, gpu, gpu_cases, poison, values};
use bitexact::kernels::attention::{attention_paged, PagedQueries};
use bitexact::reference::attention::AttnOrder;

const KERNELS: [AttentionKernel; 6] = [
    AttentionKernel::Auto,
    AttentionKernel::V1,
    AttentionKernel::Tile,
    AttentionKernel::Tile2,
    AttentionKernel::Split,
    AttentionKernel::Split2,
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
    let order = AttnOrder::default();
    let want =
        reference::attention::attention_with(order, &q, &kc, &vc, &pos, n_heads, n_kv, hd, cap);

    let p = Positions::new(dev, &pos).unwrap();
    let qg = GpuTensor::from_host(dev, &q, &[nq, n_heads, hd]).unwrap();
    for kernel in KERNELS {
        if matches!(kernel, AttentionKernel::Tile | AttentionKernel::Tile2) && !tile_takes(hd) {
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

    // The output with its quantization (the combine writes it in decode batches with
    // hd % 32 == 0, the two run in turn otherwise): want and want's reference quantization.
    if (n_heads * hd) % 32 == 0 {
        let seed_x = GpuTensor::from_host(dev, &poison(q.len()), &[nq, n_heads * hd]).unwrap();
        let mut pair = GpuActPair::quantize(dev, seed_x).unwrap();
        attention_pair(dev, &qg, &cache, &p, &mut pair).unwrap();
        assert_pair_eq(
            &format!("attention_pair nq={nq} start={start} heads={n_heads}/{n_kv} hd={hd}"),
            &pair,
            &want,
            nq,
            n_heads * hd,
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
        // A decode batch: the split kernels, and attention_pair's quantizing combine.
        case(3, 150, 4, 2, hd, 160, 200 + i as u64, 0.02);
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
    let order = AttnOrder::default();
    let want =
        reference::attention::attention_with(order, &q, &kc, &vc, &pos, n_heads, n_kv, hd, cap);
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
    let cases: [(AttentionKernel, Vec<u32>); 3] = [
        (AttentionKernel::Tile, vec![0, 1]),
        (AttentionKernel::Tile2, vec![0, 1]),
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

    // attention_pair: a position past the cache (the fused decode path) and an output of the
    // wrong width are refused before anything is written.
    let cache = LayerCache::new(dev, 1, 16, 32).unwrap();
    let q = GpuTensor::from_host(dev, &values(2, 2 * 32, 1.0, 0.0), &[1, 2, 32]).unwrap();
    for (pos, width) in [(16u32, 64usize), (3, 96)] {
        let seed_x = GpuTensor::from_host(dev, &poison(width), &[1, width]).unwrap();
        let mut pair = GpuActPair::quantize(dev, seed_x).unwrap();
        let p = Positions::new(dev, &[pos]).unwrap();
        assert!(attention_pair(dev, &q, &cache, &p, &mut pair).is_err());
        assert_bits_eq("untouched", &pair.x().to_host().unwrap(), &poison(width));
    }
}

/// A paged cache of three sequences whose pages lie scrambled in one pool: decode rows of all
/// three in one launch (a block table each), and prefill chunks of one sequence (its table; 5
/// queries run the split kernel, 70 the tile kernel) give the bits of each sequence in a cache
/// of its own; a table entry past the pool or a table too short is refused, nothing written.
#[test]
fn paged_equals_a_cache_of_its_own() {
    // Every paged tile kernel: 128x2, 64x2, one head of 64 (group 3), of 128 (group 1), 256.
    for (n_heads, n_kv, hd) in [
        (8, 2, 128),
        (6, 3, 64),
        (3, 1, 64),
        (2, 2, 128),
        (4, 1, 256),
    ] {
        paged_case(n_heads, n_kv, hd);
    }
}

fn paged_case(n_heads: usize, n_kv: usize, hd: usize) {
    let Some(dev) = gpu() else { return };
    let lens = [300usize, 70, 129];
    let n_pages = 12usize;
    let cap = n_pages * 64;
    // Pages handed out from the end of the pool, interleaved between sequences.
    let mut free: Vec<u32> = (0..n_pages as u32).collect();
    let mut tables: Vec<Vec<u32>> = vec![Vec::new(); lens.len()];
    for c in 0.. {
        let mut any = false;
        for (s, &len) in lens.iter().enumerate() {
            if c * 64 < len {
                tables[s].push(free.pop().unwrap());
                any = true;
            }
        }
        if !any {
            break;
        }
    }
    let (mut kc, mut vc) = (vec![0.0f32; n_kv * cap * hd], vec![0.0f32; n_kv * cap * hd]);
    let mut own: Vec<(Vec<f32>, Vec<f32>)> = Vec::new();
    for (s, &len) in lens.iter().enumerate() {
        let k = values(40 + s as u64, n_kv * len * hd, 2.0, 0.0);
        let v = values(50 + s as u64, n_kv * len * hd, 2.0, 0.0);
        for h in 0..n_kv {
            for p in 0..len {
                let slot = tables[s][p / 64] as usize * 64 + p % 64;
                let (src, dst) = ((h * len + p) * hd, (h * cap + slot) * hd);
                kc[dst..dst + hd].copy_from_slice(&k[src..src + hd]);
                vc[dst..dst + hd].copy_from_slice(&v[src..src + hd]);
            }
        }
        own.push((k, v));
    }
    let mut cache = LayerCache::new(dev, n_kv, cap, hd).unwrap();
    cache.k = GpuTensor::from_host(dev, &kc, &[n_kv, cap, hd]).unwrap();
    cache.v = GpuTensor::from_host(dev, &vc, &[n_kv, cap, hd]).unwrap();
    let want_of = |s: usize, q: &[f32], pos: &[u32]| {
        let (k, v) = &own[s];
        reference::attention::attention_with(
            AttnOrder::default(),
            q,
            k,
            v,
            pos,
            n_heads,
            n_kv,
            hd,
            lens[s],
        )
    };
    // Decode rows: one query per sequence at its last position.
    // One entry more than any table needs: a stride that is not the chunk count.
    let stride = tables.iter().map(|t| t.len()).max().unwrap() + 1;
    let mut flat = vec![0u32; lens.len() * stride];
    for (s, t) in tables.iter().enumerate() {
        flat[s * stride..s * stride + t.len()].copy_from_slice(t);
    }
    let pos: Vec<u32> = lens.iter().map(|&l| l as u32 - 1).collect();
    let q = values(60, lens.len() * n_heads * hd, 2.0, 0.02);
    let mut want = Vec::new();
    for s in 0..lens.len() {
        want.extend(want_of(
            s,
            &q[s * n_heads * hd..(s + 1) * n_heads * hd],
            &pos[s..=s],
        ));
    }
    let p = Positions::new(dev, &pos).unwrap();
    let qg = GpuTensor::from_host(dev, &q, &[lens.len(), n_heads, hd]).unwrap();
    let mut out = GpuTensor::from_host(dev, &poison(q.len()), qg.dims()).unwrap();
    let rows = PagedQueries::Rows {
        tables: &flat,
        stride,
    };
    attention_paged(dev, &qg, &cache, &p, rows, &mut out).unwrap();
    assert_bits_eq(
        &format!("paged decode rows, {n_heads}/{n_kv} heads of {hd}"),
        &out.to_host().unwrap(),
        &want,
    );
    // Prefill chunks of sequence 0: 5 queries (split) and 70 (tile), ending at its last row.
    for nq in [5usize, 70] {
        let pos: Vec<u32> = (lens[0] - nq..lens[0]).map(|p| p as u32).collect();
        let q = values(70 + nq as u64, nq * n_heads * hd, 2.0, 0.0);
        let want = want_of(0, &q, &pos);
        let p = Positions::new(dev, &pos).unwrap();
        let qg = GpuTensor::from_host(dev, &q, &[nq, n_heads, hd]).unwrap();
        let mut out = GpuTensor::from_host(dev, &poison(q.len()), qg.dims()).unwrap();
        let seq = PagedQueries::Sequence { table: &tables[0] };
        attention_paged(dev, &qg, &cache, &p, seq, &mut out).unwrap();
        assert_bits_eq(
            &format!("paged prefill of {nq}"),
            &out.to_host().unwrap(),
            &want,
        );
    }
    // Refusals: a page past the pool, a table that stops before the last chunk.
    let mut bad = tables[0].clone();
    bad[1] = n_pages as u32;
    let pos: Vec<u32> = vec![lens[0] as u32 - 1];
    let p = Positions::new(dev, &pos).unwrap();
    let qg = GpuTensor::from_host(dev, &q[..n_heads * hd], &[1, n_heads, hd]).unwrap();
    for table in [&bad[..], &tables[0][..2]] {
        let mut out = GpuTensor::from_host(dev, &poison(n_heads * hd), qg.dims()).unwrap();
        let r = attention_paged(
            dev,
            &qg,
            &cache,
            &p,
            PagedQueries::Sequence { table },
            &mut out,
        );
        assert!(r.is_err());
        assert_bits_eq("untouched", &out.to_host().unwrap(), &poison(n_heads * hd));
    }
}
