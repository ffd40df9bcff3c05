//! `rmsnorm` and `add_rmsnorm`: GPU == CPU reference, bit for bit.

use bitexact::kernels::norm::{add_rmsnorm, add_rmsnorm_q8, rmsnorm};
use bitexact::kernels::quantize::GpuActPair;
use bitexact::{reference, Error, GpuTensor};
use proptest::prelude::*;

use crate::common::{assert_bits_eq, assert_pair_eq, gpu, gpu_cases, poison, values};

proptest! {
    #![proptest_config(gpu_cases(48))]

    #[test]
    fn matches_reference(rows in 1usize..=300, width in 1usize..=700, seed in any::<u64>()) {
        case(rows, width, seed);
    }
}

/// `rows x width` values from `seed` through the GPU norm == the reference, bit for bit.
fn case(rows: usize, width: usize, seed: u64) {
    let Some(dev) = gpu() else { return };
    let xh = values(seed, rows * width, 8.0, 0.01);
    let wh = values(seed ^ 1, width, 2.0, 0.0);
    let want = reference::norm::rmsnorm(&xh, &wh, 1e-6);
    let x = GpuTensor::from_host(dev, &xh, &[rows, width]).unwrap();
    let w = GpuTensor::from_host(dev, &wh, &[width]).unwrap();
    let mut y = GpuTensor::from_host(dev, &poison(rows * width), &[rows, width]).unwrap();
    rmsnorm(dev, &x, &w, 1e-6, &mut y).unwrap();
    assert_bits_eq(
        &format!("rmsnorm rows={rows} width={width} seed={seed}"),
        &y.to_host().unwrap(),
        &want,
    );
}

/// Both kernels (warp per row below `ROW_KERNEL_MIN_WIDTH`, block per row from it) and the
/// block kernel's 2048-wide segments: widths on each side of both boundaries, one row (decode)
/// and many.
#[test]
fn wide_rows_and_segments() {
    let t = bitexact::kernels::norm::ROW_KERNEL_MIN_WIDTH;
    for width in [t - 1, t, t + 1, 2047, 2048, 2049, 4096, 4100, 6200] {
        for rows in [1usize, 3, 40] {
            case(rows, width, (width * 31 + rows) as u64);
        }
    }
}

#[test]
fn shapes_must_match() {
    let Some(dev) = gpu() else { return };
    let x = GpuTensor::from_host(dev, &[1.0f32; 12], &[3, 4]).unwrap();
    let w = GpuTensor::from_host(dev, &[1.0f32; 3], &[3]).unwrap();
    let mut y = GpuTensor::from_host(dev, &poison(12), &[3, 4]).unwrap();
    assert!(matches!(
        rmsnorm(dev, &x, &w, 1e-6, &mut y),
        Err(Error::ShapeMismatch { .. })
    ));
    assert_bits_eq("untouched", &y.to_host().unwrap(), &poison(12));
}

/// `add_rmsnorm` == the reference add then the reference norm, for the sum written back to
/// `h` and the normed rows: widths on each side of a warp, of the segments and of the row
/// kernel's threshold (the fused kernel takes every width), one row and many; NaN and Inf in
/// the residual pass through as the two kernels would carry them.
#[test]
fn add_then_norm() {
    for width in [1usize, 31, 32, 33, 511, 512, 2047, 2048, 2049, 4096, 4100] {
        for rows in [1usize, 3, 40] {
            add_case(rows, width, (width * 17 + rows) as u64, false);
        }
    }
    add_case(2, 2048, 5, true);
}

fn add_case(rows: usize, width: usize, seed: u64, specials: bool) {
    let Some(dev) = gpu() else { return };
    let mut hh = values(seed, rows * width, 8.0, 0.01);
    let oh = values(seed ^ 2, rows * width, 8.0, 0.01);
    if specials {
        hh[3] = f32::NAN;
        hh[width + 7] = f32::INFINITY;
        hh[width + 9] = f32::MIN_POSITIVE / 4.0;
    }
    let wh = values(seed ^ 1, width, 2.0, 0.0);
    let mut want_h = hh.clone();
    reference::elementwise::add(&mut want_h, &oh);
    let want_y = reference::norm::rmsnorm(&want_h, &wh, 1e-6);
    let mut h = GpuTensor::from_host(dev, &hh, &[rows, width]).unwrap();
    let o = GpuTensor::from_host(dev, &oh, &[rows, width]).unwrap();
    let w = GpuTensor::from_host(dev, &wh, &[width]).unwrap();
    let mut y = GpuTensor::from_host(dev, &poison(rows * width), &[rows, width]).unwrap();
    add_rmsnorm(dev, &mut h, &o, &w, 1e-6, &mut y).unwrap();
    let what = format!("add_rmsnorm rows={rows} width={width} seed={seed}");
    assert_bits_eq(&format!("{what} h"), &h.to_host().unwrap(), &want_h);
    assert_bits_eq(&format!("{what} y"), &y.to_host().unwrap(), &want_y);
    if width % 32 != 0 {
        return;
    }
    // The variant that writes y's quantization too: the same h and y, and the codes, scales
    // and block sums of the reference quantization of y.
    let mut h = GpuTensor::from_host(dev, &hh, &[rows, width]).unwrap();
    let mut yp = GpuActPair::zeros(dev, rows, width).unwrap();
    add_rmsnorm_q8(dev, &mut h, &o, &w, 1e-6, &mut yp).unwrap();
    let what = format!("add_rmsnorm_q8 rows={rows} width={width} seed={seed}");
    assert_bits_eq(&format!("{what} h"), &h.to_host().unwrap(), &want_h);
    assert_pair_eq(&what, &yp, &want_y, rows, width);
}

#[test]
fn add_rmsnorm_shapes_must_match() {
    let Some(dev) = gpu() else { return };
    let mut h = GpuTensor::from_host(dev, &[1.0f32; 12], &[3, 4]).unwrap();
    let o = GpuTensor::from_host(dev, &[1.0f32; 8], &[2, 4]).unwrap();
    let w = GpuTensor::from_host(dev, &[1.0f32; 4], &[4]).unwrap();
    let mut y = GpuTensor::from_host(dev, &poison(12), &[3, 4]).unwrap();
    assert!(matches!(
        add_rmsnorm(dev, &mut h, &o, &w, 1e-6, &mut y),
        Err(Error::ShapeMismatch { .. })
    ));
    assert_bits_eq("untouched y", &y.to_host().unwrap(), &poison(12));
    assert_bits_eq("untouched h", &h.to_host().unwrap(), &[1.0f32; 12]);
    // The quantizing variant: a pair of another shape than h is refused, nothing written.
    let mut h = GpuTensor::from_host(dev, &[1.0f32; 96], &[3, 32]).unwrap();
    let o = GpuTensor::from_host(dev, &[1.0f32; 96], &[3, 32]).unwrap();
    let w = GpuTensor::from_host(dev, &[1.0f32; 32], &[32]).unwrap();
    let mut yp = GpuActPair::zeros(dev, 2, 32).unwrap();
    assert!(matches!(
        add_rmsnorm_q8(dev, &mut h, &o, &w, 1e-6, &mut yp),
        Err(Error::ShapeMismatch { .. })
    ));
    assert_bits_eq("untouched pair", &yp.x().to_host().unwrap(), &[0.0f32; 64]);
    assert_bits_eq("untouched h (q8)", &h.to_host().unwrap(), &[1.0f32; 96]);
    assert!(
        GpuActPair::zeros(dev, 2, 48).is_err(),
        "k % 32 != 0 is refused"
    );
}

/// `qkv_norm_rope` == the references in turn: per-head `rmsnorm` of q and k, `rope_neox` of
/// both, k and v into their cache rows; head dims that are and are not multiples of a warp,
/// full and partial rotary dims, one token (decode) and many, positions in any order.
#[test]
fn qkv_norm_rope_matches_the_references() {
    for (n, nh, nkv, hd, rd) in [
        (1usize, 4usize, 2usize, 128usize, 128usize),
        (1, 32, 4, 128, 128),
        (5, 4, 1, 96, 48),
        (37, 6, 3, 16, 16),
        (3, 2, 2, 130, 64),
    ] {
        // Finite values (a NaN or Inf in a head makes the whole head NaN or zero, which would
        // hide an order error), then one run with specials among them.
        qkv_case(n, nh, nkv, hd, rd, (n * 1000 + hd) as u64, 0.0);
    }
    qkv_case(4, 4, 2, 96, 96, 17, 0.01);
}

/// Per-head norms are caught by the norm family's mutant (`ss * (1 / width)`) only for head
/// dims that are not powers of two (the product is exact for those): hence 96 and 130 above.
fn qkv_case(n: usize, nh: usize, nkv: usize, hd: usize, rd: usize, seed: u64, special: f64) {
    use bitexact::kernels::attention::LayerCache;
    use bitexact::kernels::norm::{qkv_norm_rope, QkvInput};
    use bitexact::kernels::rope::{Positions, RopeTable};
    let Some(dev) = gpu() else { return };
    let (cap, eps) = (300usize, 1e-6f32);
    let slots = nh + 2 * nkv;
    let qkv_h = values(seed, n * slots * hd, 8.0, special);
    let qn_h = values(seed ^ 1, hd, 2.0, 0.0);
    let kn_h = values(seed ^ 2, hd, 2.0, 0.0);
    let pos: Vec<u32> = (0..n as u32).map(|i| (i * 97 + 11) % cap as u32).collect();
    // The references in turn.
    let (cos, sin) = reference::rope::rope_table(cap, rd, 1e6);
    let mut want_q = Vec::with_capacity(n * nh * hd);
    let mut want_k = vec![0.0f32; nkv * cap * hd];
    let mut want_v = vec![0.0f32; nkv * cap * hd];
    for (r, row) in qkv_h.chunks(slots * hd).enumerate() {
        let mut q = reference::norm::rmsnorm(&row[..nh * hd], &qn_h, eps);
        let mut k = reference::norm::rmsnorm(&row[nh * hd..(nh + nkv) * hd], &kn_h, eps);
        reference::rope::rope_neox(&mut q, &pos[r..r + 1], &cos, &sin, nh, hd, rd / 2);
        reference::rope::rope_neox(&mut k, &pos[r..r + 1], &cos, &sin, nkv, hd, rd / 2);
        want_q.extend(q);
        let p = pos[r] as usize;
        for h in 0..nkv {
            let at = (h * cap + p) * hd;
            want_k[at..at + hd].copy_from_slice(&k[h * hd..(h + 1) * hd]);
            let v = &row[(nh + nkv + h) * hd..(nh + nkv + h + 1) * hd];
            want_v[at..at + hd].copy_from_slice(v);
        }
    }
    let qkv = GpuTensor::from_host(dev, &qkv_h, &[n, slots * hd]).unwrap();
    let qn = GpuTensor::from_host(dev, &qn_h, &[hd]).unwrap();
    let kn = GpuTensor::from_host(dev, &kn_h, &[hd]).unwrap();
    let p = Positions::new(dev, &pos).unwrap();
    let table = RopeTable::new(dev, cap, rd, 1e6).unwrap();
    // The same heads as three inputs (a file whose Wq, Wk, Wv formats differ).
    let cols = |from: usize, to: usize| -> Vec<f32> {
        qkv_h
            .chunks(slots * hd)
            .flat_map(|row| row[from * hd..to * hd].to_vec())
            .collect()
    };
    let xq = GpuTensor::from_host(dev, &cols(0, nh), &[n, nh * hd]).unwrap();
    let xk = GpuTensor::from_host(dev, &cols(nh, nh + nkv), &[n, nkv * hd]).unwrap();
    let xv = GpuTensor::from_host(dev, &cols(nh + nkv, slots), &[n, nkv * hd]).unwrap();
    let separate = QkvInput::Separate {
        q: &xq,
        k: &xk,
        v: &xv,
    };
    // One launch into fresh buffers, checked against the reference; returns the cache.
    let run = |input: QkvInput<'_>, gated: bool, how: &str| {
        let mut c = LayerCache::new(dev, nkv, cap, hd).unwrap();
        let mut q = GpuTensor::from_host(dev, &poison(n * nh * hd), &[n, nh, hd]).unwrap();
        qkv_norm_rope(dev, input, gated, &qn, &kn, eps, &p, &table, &mut c, &mut q).unwrap();
        let what = format!("qkv_norm_rope {how} n={n} nh={nh} nkv={nkv} hd={hd} rd={rd}");
        assert_bits_eq(&format!("{what} q"), &q.to_host().unwrap(), &want_q);
        assert_bits_eq(&format!("{what} k cache"), &c.k.to_host().unwrap(), &want_k);
        assert_bits_eq(&format!("{what} v cache"), &c.v.to_host().unwrap(), &want_v);
        c
    };
    run(QkvInput::Stacked(&qkv), false, "stacked");
    let mut cache = run(separate, false, "separate");

    // Gated (a hybrid model's attention): each q head followed by its output gate in the row;
    // the same q and caches, then the gate applied to an attention output from those gates.
    let gates = values(seed ^ 3, n * nh * hd, 4.0, special);
    let gated_h: Vec<f32> = (0..n)
        .flat_map(|r| {
            let row = &qkv_h[r * slots * hd..(r + 1) * slots * hd];
            let mut out = Vec::with_capacity((2 * nh + 2 * nkv) * hd);
            for h in 0..nh {
                out.extend_from_slice(&row[h * hd..(h + 1) * hd]);
                out.extend_from_slice(&gates[(r * nh + h) * hd..(r * nh + h + 1) * hd]);
            }
            out.extend_from_slice(&row[nh * hd..]);
            out
        })
        .collect();
    let width = (2 * nh + 2 * nkv) * hd;
    let gated = GpuTensor::from_host(dev, &gated_h, &[n, width]).unwrap();
    // ... and as three inputs, the q one holding the gates.
    let gq_h: Vec<f32> = gated_h
        .chunks(width)
        .flat_map(|row| row[..2 * nh * hd].to_vec())
        .collect();
    let gq = GpuTensor::from_host(dev, &gq_h, &[n, 2 * nh * hd]).unwrap();
    let gsep = QkvInput::Separate {
        q: &gq,
        k: &xk,
        v: &xv,
    };
    run(QkvInput::Stacked(&gated), true, "gated stacked");
    run(gsep, true, "gated separate");
    let what = format!("gate_heads_sigmoid n={n} nh={nh} hd={hd}");
    let a_h = values(seed ^ 4, n * nh * hd, 4.0, special);
    let mut want_a = a_h.clone();
    reference::activation::gate_heads_sigmoid(&mut want_a, &gated_h, n, nh, hd, width, hd, 2 * hd);
    let gate = |input: &GpuTensor<f32>, which: &str| {
        let mut a = GpuTensor::from_host(dev, &a_h, &[n, nh, hd]).unwrap();
        bitexact::kernels::activation::gate_heads_sigmoid(dev, &mut a, input, hd, 2 * hd).unwrap();
        assert_bits_eq(&format!("{what} {which}"), &a.to_host().unwrap(), &want_a);
        a
    };
    gate(&gq, "output gate (q input alone)");
    let mut a = gate(&gated, "output gate");
    // A gate past the row is refused, nothing written.
    let e = bitexact::kernels::activation::gate_heads_sigmoid(
        dev,
        &mut a,
        &gated,
        width - hd + 1,
        2 * hd,
    );
    assert!(matches!(e, Err(Error::InvalidArgument { .. })), "{e:?}");
    assert_bits_eq("untouched gated output", &a.to_host().unwrap(), &want_a);

    // Refusals write nothing: a position past the cache, a qkv row of the wrong width.
    let mut q2 = GpuTensor::from_host(dev, &poison(n * nh * hd), &[n, nh, hd]).unwrap();
    let mut bad_pos = pos.clone();
    bad_pos[n - 1] = cap as u32;
    let bp = Positions::new(dev, &bad_pos).unwrap();
    let stacked = QkvInput::Stacked(&qkv);
    let e = qkv_norm_rope(
        dev, stacked, false, &qn, &kn, eps, &bp, &table, &mut cache, &mut q2,
    );
    assert!(matches!(e, Err(Error::IndexOutOfRange { .. })), "{e:?}");
    let narrow =
        GpuTensor::from_host(dev, &qkv_h[..n * (slots - 1) * hd], &[n, (slots - 1) * hd]).unwrap();
    let narrow = QkvInput::Stacked(&narrow);
    let e = qkv_norm_rope(
        dev, narrow, false, &qn, &kn, eps, &p, &table, &mut cache, &mut q2,
    );
    assert!(matches!(e, Err(Error::ShapeMismatch { .. })), "{e:?}");
    assert_bits_eq("untouched q", &q2.to_host().unwrap(), &poison(n * nh * hd));
    assert_bits_eq("untouched k cache", &cache.k.to_host().unwrap(), &want_k);
}
