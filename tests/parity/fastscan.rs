//! `fastscan`: encoding, scoring, softmax and value aggregation on the GPU == the CPU reference,
//! bit for bit, in all four table modes; prefill (every query at once) == decode (one query
//! after each append) at every position; the f16-KV baseline against its reference; bad input
//! gets a typed error and writes nothing.

use bitexact::kernels::fastscan::{
    f16kv_attention, fastscan_attention, AttentionWorkspace, F16KvCache, FastScanCache,
};
use bitexact::kernels::rope::Positions;
use bitexact::quant::fastscan::FastScanSpec;
use bitexact::reference::fastscan::{attend_f16, CpuCache, ScoreMode, ValueMode};
use bitexact::{Device, Error, GpuTensor};
use proptest::prelude::*;

use crate::common::{assert_bits_eq, gpu, gpu_cases, poison, values};

const MODES: [(ScoreMode, ValueMode); 4] = [
    (ScoreMode::Int8, ValueMode::Int8),
    (ScoreMode::Int8, ValueMode::F32),
    (ScoreMode::F32, ValueMode::Int8),
    (ScoreMode::F32, ValueMode::F32),
];

fn run(
    dev: &Device,
    cache: &FastScanCache,
    q: &[f32],
    pos: &[u32],
    n_heads: usize,
    mode: (ScoreMode, ValueMode),
    ws: &mut AttentionWorkspace,
) -> Vec<f32> {
    let d = cache.spec().d;
    let nq = pos.len();
    let qg = GpuTensor::from_host(dev, q, &[nq, n_heads, d]).unwrap();
    let p = Positions::new(dev, pos).unwrap();
    let mut out = GpuTensor::from_host(dev, &poison(q.len()), &[nq, n_heads, d]).unwrap();
    fastscan_attention(dev, &qg, cache, &p, mode.0, mode.1, ws, &mut out).unwrap();
    out.to_host().unwrap()
}

/// Keys and values `[len, n_kv, D]` from `seed`; with `special` > 0 some IEEE corner values,
/// and one all-zero key and value (norm 0).
fn kv(seed: u64, len: usize, n_kv: usize, d: usize, special: f64) -> (Vec<f32>, Vec<f32>) {
    let mut k = values(seed, len * n_kv * d, 2.0, special);
    let mut v = values(seed ^ 0x77, len * n_kv * d, 2.0, special);
    if special > 0.0 {
        let p = (seed as usize) % len;
        k[p * n_kv * d..][..d].fill(0.0);
        v[p * n_kv * d..][..d].fill(0.0);
    }
    (k, v)
}

/// Encodes `len` positions in appends of `steps` (the last one takes the rest) on the GPU and
/// the CPU, checks the bytes, then every query position in every mode against the reference;
/// then decode: a second cache grown one append at a time, the last position queried after
/// each, equal to the prefill's row.
#[allow(clippy::too_many_arguments)]
fn case(
    d: usize,
    bits: u32,
    n_kv: usize,
    gqa: usize,
    len: usize,
    steps: &[usize],
    seed: u64,
    special: f64,
) {
    let Some(dev) = gpu() else { return };
    let what = format!(
        "D={d} bits={bits} heads={}/{n_kv} len={len} seed={seed}",
        n_kv * gqa
    );
    let spec = FastScanSpec::new(d, bits, seed).unwrap();
    let n_heads = n_kv * gqa;
    let (k, v) = kv(seed, len, n_kv, d, special);
    let q = values(seed ^ 0x99, len * n_heads * d, 2.0, special / 4.0);
    let row = n_kv * d;
    let mut bounds = vec![0];
    for &s in steps {
        let b = (bounds.last().unwrap() + s).min(len);
        if b > *bounds.last().unwrap() {
            bounds.push(b);
        }
    }
    if *bounds.last().unwrap() < len {
        bounds.push(len);
    }

    // Positions a..b of k and v into a GPU cache.
    let append = |c: &mut FastScanCache, a: usize, b: usize| {
        let up =
            |x: &[f32]| GpuTensor::from_host(dev, &x[a * row..b * row], &[b - a, n_kv, d]).unwrap();
        c.append(dev, &up(&k), &up(&v)).unwrap();
    };
    let mut cpu = CpuCache::new(spec, n_kv, len);
    let mut gc = FastScanCache::new(dev, spec, n_kv, len).unwrap();
    for w in bounds.windows(2) {
        let (a, b) = (w[0], w[1]);
        cpu.append(&k[a * row..b * row], &v[a * row..b * row]);
        append(&mut gc, a, b);
    }
    let (gk, gv) = gc.to_host().unwrap();
    assert_eq!(gk, cpu.k.concat(), "{what}: K codes differ");
    assert_eq!(gv, cpu.v.concat(), "{what}: V codes differ");

    let pos: Vec<u32> = (0..len as u32).collect();
    // The CPU reference runs every position up to 300, then a sample (the chunk edges, every
    // decode step's position, the last).
    let checked: Vec<u32> = pos
        .iter()
        .copied()
        .filter(|&t| {
            t < 300 || (t + 1) % 256 < 2 || t % 509 == 0 || bounds.contains(&(t as usize + 1))
        })
        .collect();
    let qc: Vec<f32> = checked
        .iter()
        .flat_map(|&t| q[t as usize * n_heads * d..][..n_heads * d].to_vec())
        .collect();
    let mut ws = AttentionWorkspace::default();
    let mut prefill = Vec::new();
    for mode in MODES {
        let got = run(dev, &gc, &q, &pos, n_heads, mode, &mut ws);
        let want = cpu.attention(&qc, &checked, n_heads, mode.0, mode.1);
        let sampled: Vec<f32> = checked
            .iter()
            .flat_map(|&t| got[t as usize * n_heads * d..][..n_heads * d].to_vec())
            .collect();
        assert_bits_eq(&format!("{what} {mode:?} prefill vs CPU"), &sampled, &want);
        prefill.push(got);
    }

    let mut dc = FastScanCache::new(dev, spec, n_kv, len).unwrap();
    for w in bounds.windows(2) {
        let (a, b) = (w[0], w[1]);
        append(&mut dc, a, b);
        let t = b - 1;
        let qt = &q[t * n_heads * d..(t + 1) * n_heads * d];
        for (mode, pre) in MODES.iter().zip(&prefill) {
            let got = run(dev, &dc, qt, &[t as u32], n_heads, *mode, &mut ws);
            assert_bits_eq(
                &format!("{what} {mode:?} decode at {t} vs prefill"),
                &got,
                &pre[t * n_heads * d..(t + 1) * n_heads * d],
            );
        }
    }
}

proptest! {
    #![proptest_config(gpu_cases(16))]

    #[test]
    fn matches_reference_prefill_equals_decode(
        d in prop::sample::select(vec![64usize, 128, 256]),
        bits in 3u32..=4,
        n_kv in 1usize..=2,
        gqa in prop::sample::select(vec![1usize, 2, 4, 8]),
        len in 1usize..=300,
        first in 1usize..=300,
        seed in any::<u64>(),
        special in prop::sample::select(vec![0.0f64, 0.0, 0.003]),
    ) {
        // A prefill of `first` positions, then decode steps of one.
        let mut steps = vec![first];
        steps.extend(std::iter::repeat_n(1, len));
        case(d, bits, n_kv, gqa, len, &steps, seed, special);
    }
}

/// Lengths past 4,096: the chunk loops run long, the grid is wide.
#[test]
fn long_context() {
    let mut steps = vec![4_090];
    steps.extend([1; 10]);
    steps.push(27);
    case(128, 4, 1, 4, 4_133, &steps, 3, 0.0);
    case(64, 3, 2, 2, 4_200, &[4_095, 1, 1, 103], 4, 0.0);
}

/// The f16-KV baseline over `len` positions: every query position up to 300, then a sample,
/// against [`attend_f16`].
fn f16_case(d: usize, n_kv: usize, gqa: usize, len: usize, seed: u64) {
    let Some(dev) = gpu() else { return };
    let n_heads = n_kv * gqa;
    let k = values(seed, n_kv * len * d, 2.0, 0.0);
    let v = values(seed ^ 1, n_kv * len * d, 2.0, 0.0);
    let q = values(seed ^ 2, len * n_heads * d, 2.0, 0.0);
    let cache = F16KvCache::from_host(dev, &k, &v, n_kv, d).unwrap();
    let kb: Vec<u16> = k
        .iter()
        .map(|&x| half::f16::from_f32(x).to_bits())
        .collect();
    let vb: Vec<u16> = v
        .iter()
        .map(|&x| half::f16::from_f32(x).to_bits())
        .collect();
    let pos: Vec<u32> = (0..len as u32)
        .filter(|&t| t < 300 || t % 97 == 0 || t + 1 == len as u32)
        .collect();
    let mut want = Vec::new();
    for &t in &pos {
        for h in 0..n_heads {
            let kvh = h / gqa;
            let qh = &q[(t as usize * n_heads + h) * d..][..d];
            let kc = &kb[kvh * len * d..][..len * d];
            let vc = &vb[kvh * len * d..][..len * d];
            want.extend(attend_f16(qh, kc, vc, t as usize, d));
        }
    }
    let qs: Vec<f32> = pos
        .iter()
        .flat_map(|&t| q[t as usize * n_heads * d..][..n_heads * d].to_vec())
        .collect();
    let qg = GpuTensor::from_host(dev, &qs, &[pos.len(), n_heads, d]).unwrap();
    let p = Positions::new(dev, &pos).unwrap();
    let mut out = GpuTensor::from_host(dev, &poison(qs.len()), &[pos.len(), n_heads, d]).unwrap();
    let mut ws = AttentionWorkspace::default();
    f16kv_attention(dev, &qg, &cache, &p, &mut ws, &mut out).unwrap();
    assert_bits_eq(
        &format!("f16kv D={d} len={len}"),
        &out.to_host().unwrap(),
        &want,
    );
}

#[test]
fn f16kv_matches_reference() {
    f16_case(64, 1, 1, 1, 40);
    f16_case(128, 2, 4, 257, 41);
    f16_case(256, 1, 8, 300, 42);
    f16_case(128, 1, 2, 4_133, 43);
}

/// Small cases of every kernel, sized for compute-sanitizer (`.gpu/run sanitize fastscan::small`).
#[test]
fn small_cases() {
    case(128, 4, 2, 4, 70, &[33, 1, 1, 35], 9, 0.003);
    case(64, 3, 1, 8, 1, &[1], 10, 0.0);
    case(64, 4, 1, 2, 260, &[255, 1, 4], 11, 0.0);
    f16_case(64, 1, 2, 260, 12);
}

#[test]
fn bad_input_is_refused_and_writes_nothing() {
    assert!(matches!(
        FastScanSpec::new(96, 4, 0),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        FastScanSpec::new(128, 2, 0),
        Err(Error::InvalidArgument { .. })
    ));
    let Some(dev) = gpu() else { return };
    let spec = FastScanSpec::new(128, 4, 1).unwrap();
    let mut cache = FastScanCache::new(dev, spec, 2, 40).unwrap();
    assert_eq!(cache.cap(), 64);
    let (k, v) = kv(5, 10, 2, 128, 0.0);
    let kg = GpuTensor::from_host(dev, &k, &[10, 2, 128]).unwrap();
    let vg = GpuTensor::from_host(dev, &v, &[10, 2, 128]).unwrap();
    cache.append(dev, &kg, &vg).unwrap();
    let before = cache.to_host().unwrap();

    // Codes that do not match the cache: another head dim, another head count, K and V apart.
    let k64 = GpuTensor::from_host(dev, &k[..10 * 2 * 64], &[10, 2, 64]).unwrap();
    assert!(matches!(
        cache.append(dev, &k64, &k64),
        Err(Error::ShapeMismatch { .. })
    ));
    let k1 = GpuTensor::from_host(dev, &k[..10 * 128], &[10, 1, 128]).unwrap();
    assert!(matches!(
        cache.append(dev, &k1, &k1),
        Err(Error::ShapeMismatch { .. })
    ));
    let v5 = GpuTensor::from_host(dev, &v[..5 * 2 * 128], &[5, 2, 128]).unwrap();
    assert!(matches!(
        cache.append(dev, &kg, &v5),
        Err(Error::ShapeMismatch { .. })
    ));
    assert_eq!(cache.len(), 10);
    assert_eq!(cache.to_host().unwrap(), before, "a refused append wrote");
    // Past the capacity: 10 + 6 * 10 > 64.
    for _ in 0..5 {
        cache.append(dev, &kg, &vg).unwrap();
    }
    let full = cache.to_host().unwrap();
    assert!(matches!(
        cache.append(dev, &kg, &vg),
        Err(Error::InvalidArgument { .. })
    ));
    assert_eq!(cache.len(), 60);
    assert_eq!(cache.to_host().unwrap(), full, "a refused append wrote");
    let mut small = FastScanCache::new(dev, spec, 2, 40).unwrap();
    small.append(dev, &kg, &vg).unwrap();

    let mut ws = AttentionWorkspace::default();
    let q = values(6, 4 * 128, 1.0, 0.0);
    let qg = GpuTensor::from_host(dev, &q, &[1, 4, 128]).unwrap();
    let mut out = GpuTensor::from_host(dev, &poison(4 * 128), &[1, 4, 128]).unwrap();
    let (s, vm) = (ScoreMode::Int8, ValueMode::Int8);
    // A cache shorter than the query's position.
    let late = Positions::new(dev, &[10]).unwrap();
    assert!(matches!(
        fastscan_attention(dev, &qg, &small, &late, s, vm, &mut ws, &mut out),
        Err(Error::IndexOutOfRange { .. })
    ));
    let ok = Positions::new(dev, &[9]).unwrap();
    // Query of another head dim; heads not a multiple of the kv heads; out of another shape.
    let q64 = GpuTensor::from_host(dev, &q[..4 * 64], &[1, 4, 64]).unwrap();
    assert!(matches!(
        fastscan_attention(dev, &q64, &small, &ok, s, vm, &mut ws, &mut out),
        Err(Error::ShapeMismatch { .. })
    ));
    let q3 = GpuTensor::from_host(dev, &q[..3 * 128], &[1, 3, 128]).unwrap();
    let mut out3 = GpuTensor::from_host(dev, &poison(3 * 128), &[1, 3, 128]).unwrap();
    assert!(matches!(
        fastscan_attention(dev, &q3, &small, &ok, s, vm, &mut ws, &mut out3),
        Err(Error::InvalidArgument { .. })
    ));
    let two = Positions::new(dev, &[1, 2]).unwrap();
    assert!(matches!(
        fastscan_attention(dev, &qg, &small, &two, s, vm, &mut ws, &mut out),
        Err(Error::ShapeMismatch { .. })
    ));
    assert_bits_eq("untouched", &out.to_host().unwrap(), &poison(4 * 128));
    assert_bits_eq("untouched", &out3.to_host().unwrap(), &poison(3 * 128));

    assert!(matches!(
        F16KvCache::from_host(dev, &k, &v, 2, 96),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        F16KvCache::from_host(dev, &k[..100], &v[..100], 2, 128),
        Err(Error::InvalidArgument { .. })
    ));
}
