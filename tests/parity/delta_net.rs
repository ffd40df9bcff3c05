//! `delta_net_scan` and `delta_net_gate`: GPU == CPU reference (`scan_cpu`), bit for bit, for
//! the outputs and the state a sequence carries, over any chunking of its tokens.

use bitexact::kernels::delta_net::{
    delta_net_gate, delta_net_scan, delta_net_scan_with, GpuDeltaNetConsts, GpuDeltaNetState,
    ScanKernel,
};
use bitexact::quant::WeightFormat;
use bitexact::reference::delta_net::{
    scan_chunked_cpu, scan_cpu, ChunkedState, DeltaNetConfig, DeltaNetState, DeltaNetWeights,
    ScanOrder, SCAN_CHUNK,
};
use bitexact::{Error, GpuTensor};

use crate::common::{assert_bits_eq, gpu, poison, values};

fn cfg(dim: usize, k_heads: usize, v_heads: usize, head_dim: usize, conv: usize) -> DeltaNetConfig {
    DeltaNetConfig {
        dim,
        k_heads,
        v_heads,
        head_dim,
        conv_kernel: conv,
        format: WeightFormat::F32,
    }
}

/// A scan's inputs over all its tokens: `mixed: [n, conv_dim]`, `b, a: [n, Hv]`.
struct Inputs<'a> {
    cfg: &'a DeltaNetConfig,
    mixed: &'a [f32],
    b: &'a [f32],
    a: &'a [f32],
}

/// The tokens of `x` through `st` in calls of `pieces` (cycled), each output poisoned first:
/// every call's outputs in order.
fn scan_in_calls(
    dev: &bitexact::Device,
    kernel: ScanKernel,
    consts: &GpuDeltaNetConsts,
    st: &mut GpuDeltaNetState,
    x: &Inputs,
    pieces: &[usize],
) -> Vec<f32> {
    let (cd, hv, s) = (x.cfg.conv_dim(), x.cfg.v_heads, x.cfg.head_dim);
    let n = x.b.len() / hv;
    let mut got = Vec::with_capacity(n * hv * s);
    let (mut t0, mut i) = (0, 0);
    while t0 < n {
        let m = pieces[i % pieces.len()].min(n - t0);
        let up = |v: &[f32], width: usize| {
            GpuTensor::from_host(dev, &v[t0 * width..(t0 + m) * width], &[m, width]).unwrap()
        };
        let mut o = GpuTensor::from_host(dev, &poison(m * hv * s), &[m, hv, s]).unwrap();
        delta_net_scan_with(
            dev,
            kernel,
            consts,
            st,
            &up(x.mixed, cd),
            &up(x.b, hv),
            &up(x.a, hv),
            1e-6,
            &mut o,
        )
        .unwrap();
        got.extend(o.to_host().unwrap());
        t0 += m;
        i += 1;
    }
    got
}

/// `n` tokens through the GPU scan (`kernel`) in chunks of `chunk` against one CPU scan of all
/// of them: every chunk's outputs and the final state (window and matrices).
fn case(kernel: ScanKernel, c: &DeltaNetConfig, n: usize, chunk: usize, seed: u64) {
    let Some(dev) = gpu() else { return };
    let w = DeltaNetWeights::generate(c, seed, 500).unwrap();
    let (cd, hv) = (c.conv_dim(), c.v_heads);
    let mixed = values(seed ^ 1, n * cd, 2.0, 0.0);
    let b = values(seed ^ 2, n * hv, 2.0, 0.0);
    let a = values(seed ^ 3, n * hv, 2.0, 0.0);
    let mut want_state = DeltaNetState::new(c);
    let want = scan_cpu(&w, &mut want_state, &mixed, &b, &a, n, 1e-6);
    let consts = GpuDeltaNetConsts::upload(dev, &w).unwrap();
    let mut st = GpuDeltaNetState::new(dev, c).unwrap();
    let inputs = Inputs {
        cfg: c,
        mixed: &mixed,
        b: &b,
        a: &a,
    };
    let got = scan_in_calls(dev, kernel, &consts, &mut st, &inputs, &[chunk]);
    let what = format!("scan {kernel:?} {c:?} n={n} chunk={chunk}");
    assert_bits_eq(&format!("{what}: o"), &got, &want);
    let gs = st.to_host().unwrap();
    assert_bits_eq(&format!("{what}: window"), &gs.conv, &want_state.conv);
    assert_bits_eq(&format!("{what}: matrices"), &gs.m, &want_state.m);
}

/// The tiny-hybrid shape (head dim 16: one partial 32-block), a head dim of 48 (a partial
/// second block), no window (conv 1) and the real Qwen3.6 shape (16 key heads, 32 value heads
/// of 128, conv 4); chunks of 1 (decode), of fewer tokens than the window and of all; each
/// through v1, v2 (prep + delta rule), v3 (prep + the column-split delta rule), v5 (v3 without
/// bound checks at head dim 128), v6 (v5 with two tokens' chains in one walk) and the automatic
/// choice (v1 below 16 tokens, v3 from there). The real shape also over 40 tokens in chunks of
/// 17 and 40: v3, v5 and v6 stage 16 tokens at a time, so a chunk of 16 and a partial one meet
/// (v6 reads the next chunk's first token before the current chunk ends).
/// A head dim above 128 is refused.
#[test]
fn scan_matches_reference() {
    for (c, n) in [
        (cfg(64, 2, 4, 16, 4), 23),
        (cfg(64, 1, 3, 48, 2), 9),
        (cfg(2048, 16, 32, 128, 4), 12),
        (cfg(64, 2, 2, 64, 1), 5),
    ] {
        for chunk in [n, 1, 2, 5] {
            for kernel in [
                ScanKernel::Auto,
                ScanKernel::V1,
                ScanKernel::V2,
                ScanKernel::V3,
                ScanKernel::V5,
                ScanKernel::V6,
            ] {
                case(kernel, &c, n, chunk, (n * 7 + chunk) as u64);
            }
        }
    }
    for chunk in [17, 40] {
        for kernel in [
            ScanKernel::V2,
            ScanKernel::V3,
            ScanKernel::V5,
            ScanKernel::V6,
        ] {
            case(kernel, &cfg(2048, 16, 32, 128, 4), 40, chunk, 3);
        }
    }
    // Head dim 128 (v5's and v6's whole-block path) around the 16-token staging: one token
    // short of a chunk, whole chunks, and one token past them (v6 reads token t + 1 across the
    // chunk boundary; n = 33 fetches a third chunk into the first buffer).
    for n in [15, 16, 31, 32, 33, 48, 49] {
        for kernel in [ScanKernel::V3, ScanKernel::V5, ScanKernel::V6] {
            case(kernel, &cfg(256, 2, 4, 128, 4), n, n, 60 + n as u64);
        }
    }
}

proptest::proptest! {
    #![proptest_config(crate::common::gpu_cases(16))]

    /// Any small mixer shape (1-4 key heads, value heads a multiple of them, head dims 3-128,
    /// not multiples of 32, windows 1-4) and any chunking, through v1, v2, v3, v5 and v6.
    #[test]
    fn scan_shapes_match_reference(
        hk in 1usize..=4, mult in 1usize..=3, s in 3usize..=128, kc in 1usize..=4,
        n in 1usize..=40, chunk in 1usize..=40, version in 1u8..=5, seed in 0u64..1000,
    ) {
        let kernel = match version {
            1 => ScanKernel::V1,
            2 => ScanKernel::V2,
            3 => ScanKernel::V3,
            4 => ScanKernel::V5,
            _ => ScanKernel::V6,
        };
        case(kernel, &cfg(64, hk, hk * mult, s, kc), n, chunk, seed);
    }
}

/// `n` tokens through the GPU's chunked order (`delta_net_chunk_*`) in calls of `pieces` (cycled)
/// against one CPU [`scan_chunked_cpu`] of all of them: every call's outputs, then the whole
/// state (window, matrices at the boundary, the chunk under way and its length).
fn chunked_case(c: &DeltaNetConfig, n: usize, pieces: &[usize], seed: u64) {
    let Some(dev) = gpu() else { return };
    let w = DeltaNetWeights::generate(c, seed, 500).unwrap();
    let (cd, hv) = (c.conv_dim(), c.v_heads);
    let mixed = values(seed ^ 1, n * cd, 2.0, 0.0);
    let b = values(seed ^ 2, n * hv, 2.0, 0.0);
    let a = values(seed ^ 3, n * hv, 2.0, 0.0);
    let mut want_state = ChunkedState::new(c);
    let want = scan_chunked_cpu(&w, &mut want_state, &mixed, &b, &a, n, 1e-6);
    let consts = GpuDeltaNetConsts::upload(dev, &w).unwrap();
    let mut st = GpuDeltaNetState::with_order(dev, c, ScanOrder::Chunked).unwrap();
    assert_eq!(st.order(), ScanOrder::Chunked);
    let inputs = Inputs {
        cfg: c,
        mixed: &mixed,
        b: &b,
        a: &a,
    };
    // The kernel choice is the recurrence's: a chunked state runs its own kernels.
    let got = scan_in_calls(dev, ScanKernel::V1, &consts, &mut st, &inputs, pieces);
    let what = format!("chunked {c:?} n={n} pieces={pieces:?}");
    assert_bits_eq(&format!("{what}: o"), &got, &want);
    let gs = st.to_host_chunked().unwrap();
    assert_eq!(gs.len, want_state.len, "{what}: length");
    assert_bits_eq(
        &format!("{what}: window"),
        &gs.base.conv,
        &want_state.base.conv,
    );
    assert_bits_eq(&format!("{what}: matrices"), &gs.base.m, &want_state.base.m);
    assert_bits_eq(&format!("{what}: keys"), &gs.k, &want_state.k);
    assert_bits_eq(&format!("{what}: u"), &gs.u, &want_state.u);
    assert_bits_eq(&format!("{what}: factors"), &gs.f, &want_state.f);
    assert_bits_eq(&format!("{what}: decay"), &gs.e, &want_state.e);
}

/// The chunked order on the GPU equals its CPU reference bit for bit, outputs and state: head
/// dims 16 (one partial block), 48, 100 (a partial fourth block) and 128 (the Qwen3.6 shape, 16
/// key heads, 32 value heads); token counts one short of a chunk, a chunk, one past it and
/// several; calls of one token (decode), of 7, of a chunk, of 100, of all at once, and mixed
/// pieces that start and end inside chunks. 4,100 tokens in one call cross the wrapper's split
/// into calls of 4,096.
#[test]
fn chunked_order_matches_reference() {
    let c = SCAN_CHUNK;
    for (cf, n) in [
        (cfg(64, 2, 4, 16, 4), 2 * c + 5),
        (cfg(64, 1, 3, 48, 2), c + 1),
        (cfg(64, 2, 2, 100, 1), c - 1),
        (cfg(2048, 16, 32, 128, 4), 3 * c + 9),
    ] {
        for pieces in [&[n][..], &[1], &[7], &[c], &[100], &[5, c + 3, 1, 30]] {
            chunked_case(&cf, n, pieces, (n * 3 + pieces[0]) as u64);
        }
    }
    for n in [c - 1, c, c + 1] {
        chunked_case(&cfg(256, 2, 4, 128, 4), n, &[n], 70 + n as u64);
    }
    chunked_case(&cfg(64, 1, 2, 16, 4), 4100, &[4100], 9);
    chunked_case(&cfg(64, 1, 2, 16, 4), 4100, &[4095, 5], 10);
}

proptest::proptest! {
    #![proptest_config(crate::common::gpu_cases(16))]

    /// Any small mixer shape (head dims 3-128, windows 1-4) and any two call sizes, in the
    /// chunked order.
    #[test]
    fn chunked_shapes_match_reference(
        hk in 1usize..=4, mult in 1usize..=3, s in 3usize..=128, kc in 1usize..=4,
        n in 1usize..=200, p1 in 1usize..=80, p2 in 1usize..=80, seed in 0u64..1000,
    ) {
        chunked_case(&cfg(64, hk, hk * mult, s, kc), n, &[p1, p2], seed);
    }
}

/// A chunked state after a reset is the state before the first token, and a recurrence
/// state refuses to be read as a chunked one.
#[test]
fn chunked_state_clears_and_orders_are_kept_apart() {
    let Some(dev) = gpu() else { return };
    let c = cfg(64, 2, 4, 16, 4);
    let w = DeltaNetWeights::generate(&c, 5, 500).unwrap();
    let consts = GpuDeltaNetConsts::upload(dev, &w).unwrap();
    let mut st = GpuDeltaNetState::with_order(dev, &c, ScanOrder::Chunked).unwrap();
    let (cd, hv, s) = (c.conv_dim(), c.v_heads, c.head_dim);
    let n = 70;
    let t = |seed: u64, w: usize| {
        GpuTensor::from_host(dev, &values(seed, n * w, 1.0, 0.0), &[n, w]).unwrap()
    };
    let mut o = GpuTensor::zeros(dev, &[n, hv, s]).unwrap();
    delta_net_scan(
        dev,
        &consts,
        &mut st,
        &t(1, cd),
        &t(2, hv),
        &t(3, hv),
        1e-6,
        &mut o,
    )
    .unwrap();
    assert_ne!(st.to_host_chunked().unwrap(), ChunkedState::new(&c));
    st.clear(dev).unwrap();
    assert_eq!(st.to_host_chunked().unwrap(), ChunkedState::new(&c));
    let plain = GpuDeltaNetState::new(dev, &c).unwrap();
    assert_eq!(plain.order(), ScanOrder::Recurrence);
    assert!(matches!(
        plain.to_host_chunked(),
        Err(Error::InvalidArgument { .. })
    ));
}

/// A mixer too wide for v2's prep (conv_dim 52,224 channels: 204 KB of shared memory): Auto
/// runs v1 (the CPU's bits), V2 refuses before writing anything.
#[test]
fn wide_mixers_fall_back_to_v1() {
    let c = cfg(64, 4, 400, 128, 2);
    case(ScanKernel::Auto, &c, 3, 3, 1);
    let Some(dev) = gpu() else { return };
    let w = DeltaNetWeights::generate(&c, 1, 500).unwrap();
    let consts = GpuDeltaNetConsts::upload(dev, &w).unwrap();
    let mut st = GpuDeltaNetState::new(dev, &c).unwrap();
    let (cd, hv, s) = (c.conv_dim(), c.v_heads, c.head_dim);
    let mixed = GpuTensor::from_host(dev, &values(1, 2 * cd, 1.0, 0.0), &[2, cd]).unwrap();
    let b = GpuTensor::from_host(dev, &values(2, 2 * hv, 1.0, 0.0), &[2, hv]).unwrap();
    let mut o = GpuTensor::from_host(dev, &poison(2 * hv * s), &[2, hv, s]).unwrap();
    let r = delta_net_scan_with(
        dev,
        ScanKernel::V2,
        &consts,
        &mut st,
        &mixed,
        &b,
        &b,
        1e-6,
        &mut o,
    );
    assert!(matches!(r, Err(Error::InvalidArgument { .. })), "{r:?}");
    assert_bits_eq("untouched", &o.to_host().unwrap(), &poison(2 * hv * s));
}

/// Bad shapes are errors and write nothing: a mixed row of the wrong width, an output of the
/// wrong token count, a state of another shape; no tokens is no work.
#[test]
fn bad_scan_input_writes_nothing() {
    let Some(dev) = gpu() else { return };
    let c = cfg(64, 2, 4, 16, 4);
    let w = DeltaNetWeights::generate(&c, 3, 500).unwrap();
    let consts = GpuDeltaNetConsts::upload(dev, &w).unwrap();
    let mut st = GpuDeltaNetState::new(dev, &c).unwrap();
    let (cd, hv, s) = (c.conv_dim(), c.v_heads, c.head_dim);
    let t = |n: usize, w: usize| {
        GpuTensor::from_host(dev, &values(9, n * w, 1.0, 0.0), &[n, w]).unwrap()
    };
    let (mixed, b, a) = (t(3, cd), t(3, hv), t(3, hv));
    let mut o = GpuTensor::from_host(dev, &poison(3 * hv * s), &[3, hv, s]).unwrap();
    let bad_mixed = t(3, cd - 1);
    assert!(delta_net_scan(dev, &consts, &mut st, &bad_mixed, &b, &a, 1e-6, &mut o).is_err());
    let mut o2 = GpuTensor::from_host(dev, &poison(2 * hv * s), &[2, hv, s]).unwrap();
    assert!(delta_net_scan(dev, &consts, &mut st, &mixed, &b, &a, 1e-6, &mut o2).is_err());
    let mut other = GpuDeltaNetState::new(dev, &cfg(64, 2, 4, 32, 4)).unwrap();
    assert!(delta_net_scan(dev, &consts, &mut other, &mixed, &b, &a, 1e-6, &mut o).is_err());
    assert_bits_eq("untouched o", &o.to_host().unwrap(), &poison(3 * hv * s));
    let zero = DeltaNetState::new(&c);
    let gs = st.to_host().unwrap();
    assert_bits_eq("untouched window", &gs.conv, &zero.conv);
    assert_bits_eq("untouched matrices", &gs.m, &zero.m);
}

#[test]
fn wide_heads_are_refused() {
    let Some(dev) = gpu() else { return };
    let w = DeltaNetWeights::generate(&cfg(64, 1, 1, 256, 4), 1, 500).unwrap();
    assert!(matches!(
        GpuDeltaNetConsts::upload(dev, &w),
        Err(Error::InvalidArgument { .. })
    ));
}

#[test]
fn gate_matches_reference_and_bad_shapes_write_nothing() {
    let Some(dev) = gpu() else { return };
    let len = 1000;
    let nh = values(4, len, 4.0, 0.05);
    let zh = values(5, len, 8.0, 0.05);
    let want: Vec<f32> = nh
        .iter()
        .zip(&zh)
        .map(|(&v, &z)| bitexact::math::canon(v * bitexact::math::silu(z)))
        .collect();
    let normed = GpuTensor::from_host(dev, &nh, &[len]).unwrap();
    let z = GpuTensor::from_host(dev, &zh, &[len]).unwrap();
    let mut out = GpuTensor::from_host(dev, &poison(len), &[len]).unwrap();
    delta_net_gate(dev, &normed, &z, &mut out).unwrap();
    assert_bits_eq("gate", &out.to_host().unwrap(), &want);
    let mut bad = GpuTensor::from_host(dev, &poison(len - 1), &[len - 1]).unwrap();
    assert!(matches!(
        delta_net_gate(dev, &normed, &z, &mut bad),
        Err(Error::ShapeMismatch { .. })
    ));
    assert_bits_eq("untouched", &bad.to_host().unwrap(), &poison(len - 1));
}
