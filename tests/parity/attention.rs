//! `attention`: GPU == CPU reference, bit for bit; a query's output does not depend on how many
//! other queries share the launch.

use bitexact::kernels::attention::{attention, attention_version, kv_write, LayerCache};
use bitexact::kernels::rope::Positions;
use bitexact::{reference, GpuTensor};
use proptest::prelude::*;

use crate::common::{assert_bits_eq, gpu, gpu_cases, poison, values};

#[allow(clippy::too_many_arguments)]
fn case(nq: usize, start: usize, n_heads: usize, n_kv: usize, hd: usize, cap: usize, seed: u64) {
    let Some(dev) = gpu() else { return };
    let filled = start + nq;
    // Cache rows 0..start from earlier steps, then this step's nq rows written by kv_write.
    let k_all = values(seed, filled * n_kv * hd, 2.0, 0.0);
    let v_all = values(seed ^ 5, filled * n_kv * hd, 2.0, 0.0);
    let q = values(seed ^ 9, nq * n_heads * hd, 2.0, 0.0);
    let mut kc = vec![0.0f32; n_kv * cap * hd];
    let mut vc = vec![0.0f32; n_kv * cap * hd];
    for p in 0..filled {
        for h in 0..n_kv {
            let (src, dst) = ((p * n_kv + h) * hd, (h * cap + p) * hd);
            kc[dst..dst + hd].copy_from_slice(&k_all[src..src + hd]);
            vc[dst..dst + hd].copy_from_slice(&v_all[src..src + hd]);
        }
    }
    let pos: Vec<u32> = (start as u32..filled as u32).collect();
    let want = reference::attention::attention(&q, &kc, &vc, &pos, n_heads, n_kv, hd, cap);

    let mut cache = LayerCache::new(dev, n_kv, cap, hd).unwrap();
    let early: Vec<u32> = (0..start as u32).collect();
    if start > 0 {
        let ke =
            GpuTensor::from_host(dev, &k_all[..start * n_kv * hd], &[start, n_kv, hd]).unwrap();
        let ve =
            GpuTensor::from_host(dev, &v_all[..start * n_kv * hd], &[start, n_kv, hd]).unwrap();
        kv_write(
            dev,
            &mut cache,
            &ke,
            &ve,
            &Positions::new(dev, &early).unwrap(),
        )
        .unwrap();
    }
    let p = Positions::new(dev, &pos).unwrap();
    let kn = GpuTensor::from_host(dev, &k_all[start * n_kv * hd..], &[nq, n_kv, hd]).unwrap();
    let vn = GpuTensor::from_host(dev, &v_all[start * n_kv * hd..], &[nq, n_kv, hd]).unwrap();
    kv_write(dev, &mut cache, &kn, &vn, &p).unwrap();
    let qg = GpuTensor::from_host(dev, &q, &[nq, n_heads, hd]).unwrap();
    let mut got = Vec::new();
    for version in [1, 2] {
        let mut out = GpuTensor::from_host(dev, &poison(q.len()), &[nq, n_heads, hd]).unwrap();
        attention_version(dev, version, &qg, &cache, &p, &mut out).unwrap();
        got = out.to_host().unwrap();
        assert_bits_eq(
            &format!("attention v{version} nq={nq} start={start} heads={n_heads}/{n_kv} hd={hd}"),
            &got,
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
        &got[(nq - 1) * n_heads * hd..],
    );
}

proptest! {
    #![proptest_config(gpu_cases(24))]

    #[test]
    fn matches_reference(
        nq in 1usize..=70, start in 0usize..=300, gqa in 0usize..4, n_kv in 1usize..=3,
        hd in prop::sample::select(vec![16usize, 32, 64, 128, 256]), seed in any::<u64>(),
    ) {
        let n_heads = n_kv << gqa;
        case(nq, start, n_heads, n_kv, hd, start + nq + 5, seed);
    }
}

#[test]
fn long_context() {
    case(3, 4_500, 4, 2, 128, 4_600, 1);
    case(2, 20_000, 2, 1, 64, 20_002, 2);
}
