//! Matrix products: GPU == the canonical dot of the reference, bit for bit, for every weight
//! format and every kernel the dispatcher can pick; a GEMV row == the same row of a GEMM over N
//! tokens == the grouped expert GEMM.

use bitexact::kernels::gemm::{
    gemm_f32, gemm_grouped_f32, matmul, matmul_grouped_with, matmul_with, GpuMatrix, MatmulKernel,
    RoutedRows, GEMV_MMA_MIN_ROWS,
};
use bitexact::quant::{QuantMatrix, WeightFormat};
use bitexact::reference::gemm::GemmOrder;
use bitexact::{reference, Error, GpuTensor};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::common::{assert_bits_eq, finite, gpu, gpu_cases, poison, values};

const KERNELS: [MatmulKernel; 5] = [
    MatmulKernel::Auto,
    MatmulKernel::Gemv,
    MatmulKernel::Gemm,
    MatmulKernel::GemvMma,
    MatmulKernel::Plain,
];

/// Weights with a wide dynamic range and some all-zero 32-blocks, encoded into `fmt`.
fn weights(fmt: WeightFormat, experts: usize, m: usize, k: usize, seed: u64) -> QuantMatrix {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut v = finite(seed, experts * m * k, 1.0);
    for row in v.chunks_mut(k.max(1)) {
        let scale = 2f32.powi(rng.gen_range(-8..=4));
        for x in row.iter_mut() {
            *x *= scale;
        }
        if k >= 32 && rng.gen_bool(0.2) {
            let b = rng.gen_range(0..k / 32);
            row[32 * b..32 * b + 32].fill(0.0);
        }
    }
    QuantMatrix::quantize(fmt, &v, experts, m, k).unwrap()
}

/// Activations: wide exponent spread, specials (NaN, inf, subnormals) with probability
/// `special`, and some all-zero blocks.
fn activations(n: usize, k: usize, seed: u64, special: f64) -> Vec<f32> {
    let mut x = values(seed, n * k, 4.0, special);
    let mut rng = StdRng::seed_from_u64(seed ^ 0xabc);
    for row in x.chunks_mut(k.max(1)) {
        if k >= 32 && rng.gen_bool(0.2) {
            let b = rng.gen_range(0..k / 32);
            row[32 * b..32 * b + 32].fill(0.0);
        }
    }
    x
}

fn dense(fmt: WeightFormat, n: usize, m: usize, k: usize, seed: u64, kernels: &[MatmulKernel]) {
    let Some(dev) = gpu() else { return };
    let wq = weights(fmt, 1, m, k, seed);
    let xh = activations(n, k, seed ^ 7, 0.002);
    let want = reference::gemm::gemm(&xh, &wq, n).unwrap();
    let w = GpuMatrix::upload(dev, &wq).unwrap();
    let x = GpuTensor::from_host(dev, &xh, &[n, k]).unwrap();
    for &kernel in kernels {
        let mut y = GpuTensor::from_host(dev, &poison(n * m), &[n, m]).unwrap();
        matmul_with(dev, kernel, &x, &w, &mut y).unwrap();
        assert_bits_eq(
            &format!("matmul {fmt} n={n} m={m} k={k} seed={seed} kernel={kernel:?}"),
            &y.to_host().unwrap(),
            &want,
        );
    }
}

fn k_for(fmt: WeightFormat, units: usize, tail: usize) -> usize {
    match fmt.block_elems() {
        1 => units * 32 + tail,
        b => units.max(1) * b,
    }
}

proptest! {
    #![proptest_config(gpu_cases(24))]

    #[test]
    fn float_formats_match_reference(
        f in 0usize..3, n in 1usize..=300, m in 1usize..=80, k in 1usize..=300, seed in any::<u64>(),
    ) {
        dense(WeightFormat::CORE[f], n, m, k, seed, &KERNELS);
    }

    #[test]
    fn quantized_formats_match_reference(
        f in 3usize..7, n in 1usize..=300, m in 1usize..=80, units in 1usize..=5, seed in any::<u64>(),
    ) {
        let fmt = WeightFormat::CORE[f];
        // K in 32-blocks for Q8_0 (not a multiple of the 256-wide chunk), super-blocks otherwise.
        let k = if fmt == WeightFormat::Q8_0 { 32 * (2 * units + 1) } else { 256 * units };
        dense(fmt, n, m, k, seed, &KERNELS);
    }

    /// Q8_0 with K a multiple of 256: the cp.async GEMM (every other Q8_0 K runs the v2 one).
    #[test]
    fn q8_0_whole_chunks_match_reference(
        n in 1usize..=200, m in 1usize..=150, units in 1usize..=3, seed in any::<u64>(),
    ) {
        dense(WeightFormat::Q8_0, n, m, 256 * units, seed, &KERNELS);
        grouped(WeightFormat::Q8_0, n.min(120), 1 + (seed % 5) as usize, m, 256 * units, seed);
    }

    #[test]
    fn grouped_matches_reference(
        f in 0usize..7, n in 1usize..=120, ne in 1usize..=9, m in 1usize..=70, units in 1usize..=3,
        seed in any::<u64>(),
    ) {
        let fmt = WeightFormat::CORE[f];
        grouped(fmt, n, ne, m, k_for(fmt, units, 5), seed);
    }

    #[test]
    fn device_sorted_routing_matches_reference(
        f in 0usize..7, n in 1usize..=200, k in 1usize..=4, ne in 1usize..=40, m in 1usize..=70,
        units in 1usize..=2, seed in any::<u64>(),
    ) {
        let fmt = WeightFormat::CORE[f];
        // Q8_0: K of whole 256-wide chunks every other case (the cp.async GEMM).
        let kk = if fmt == WeightFormat::Q8_0 && seed % 2 == 0 { 256 * units } else { k_for(fmt, units, 3) };
        device_sorted(fmt, n, k, ne, m, kk, seed);
    }
}

/// `RoutedRows::sorted_from_router`'s tables (built on the device from router ids) through
/// every kernel == the reference over the same routing: up (`x` row `r / k`, expert `ids[r]`,
/// output row `r`) and down (`x` row `r`). Ids are skewed so that one expert exceeds the 64-row
/// GEMM tile while others stay empty; ids `>= n_experts` count as the last expert.
fn device_sorted(fmt: WeightFormat, n: usize, k: usize, ne: usize, m: usize, kk: usize, seed: u64) {
    let Some(dev) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(seed);
    let len = n * k;
    let ids: Vec<u32> = (0..len)
        .map(|_| match rng.gen_range(0..10) {
            0..=3 => 0,
            4 => ne as u32 + rng.gen_range(0..3), // out of range: the last expert
            _ => rng.gen_range(0..ne as u32),
        })
        .collect();
    let clamped: Vec<u32> = ids.iter().map(|&e| e.min(ne as u32 - 1)).collect();
    let wq = weights(fmt, ne, m, kk, seed ^ 5);
    let w = GpuMatrix::upload(dev, &wq).unwrap();
    let gids = GpuTensor::from_host(dev, &ids, &[n, k]).unwrap();
    let (up, down) = RoutedRows::sorted_from_router(dev, &gids, ne).unwrap();
    assert_eq!((up.len(), down.len()), (len, len));
    let rows: Vec<u32> = (0..len as u32).collect();
    let tokens: Vec<u32> = rows.iter().map(|&r| r / k as u32).collect();
    for (name, table, nx, xr) in [("up", &up, n, &tokens), ("down", &down, len, &rows)] {
        let xh = activations(nx, kk, seed ^ 11, 0.002);
        let mut want = poison(len * m);
        reference::gemm::gemm_grouped_with(
            GemmOrder::Chain,
            &xh,
            &wq,
            &mut want,
            xr,
            &clamped,
            &rows,
        )
        .unwrap();
        let x = GpuTensor::from_host(dev, &xh, &[nx, kk]).unwrap();
        let mut kernels = KERNELS.to_vec();
        if fmt == WeightFormat::F32 {
            kernels.push(MatmulKernel::V1);
        }
        for kernel in kernels {
            let mut y = GpuTensor::from_host(dev, &poison(len * m), &[len, m]).unwrap();
            matmul_grouped_with(dev, kernel, &x, &w, table, &mut y).unwrap();
            assert_bits_eq(
                &format!("device-sorted {name} {fmt} n={n} k={k} ne={ne} m={m} K={kk} seed={seed} {kernel:?}"),
                &y.to_host().unwrap(),
                &want,
            );
        }
    }
}

#[test]
fn dispatch_thresholds() {
    // One below, at and above every threshold: the GEMV heights (1, 2, 4, 8), the GEMM tile
    // (64), and the sizes of issue 3's table.
    for fmt in WeightFormat::CORE {
        let k = k_for(fmt, 8, 0);
        for n in [1, 2, 3, 4, 5, 7, 8, 9, 63, 64, 65, 511, 512, 513] {
            dense(
                fmt,
                n,
                37,
                k,
                n as u64 + 1000 * fmt.index() as u64,
                &KERNELS,
            );
        }
    }
}

/// The formats with the generic kernels alone (`WeightFormat::GENERIC_ONLY`): dense products
/// at the GEMV heights and across the GEMM tile, K of one and of several blocks (super-blocks
/// for Q3_K and IQ4_XS), through every kernel choice; grouped and device-sorted products.
#[test]
fn generic_only_formats_match_reference() {
    if gpu().is_none() {
        return;
    }
    for fmt in WeightFormat::GENERIC_ONLY {
        for (i, n) in [1usize, 2, 3, 5, 8, 9, 64, 65, 130].into_iter().enumerate() {
            for units in [1usize, 3] {
                let k = k_for(fmt, units, 0);
                let seed = (n * 31 + units + 1000 * fmt.index()) as u64;
                dense(fmt, n, [1, 37, 64][i % 3], k, seed, &KERNELS);
            }
        }
        grouped(fmt, 9, 4, 33, k_for(fmt, 2, 0), 11);
        grouped(fmt, 70, 3, 20, k_for(fmt, 1, 0), 12);
        device_sorted(fmt, 40, 4, 6, 17, k_for(fmt, 2, 0), 13);
    }
}

#[test]
fn large_n() {
    dense(WeightFormat::Q4K, 4096, 24, 256, 42, &[MatmulKernel::Auto]);
    dense(WeightFormat::F32, 4096, 24, 96, 43, &[MatmulKernel::Auto]);
}

#[test]
fn float_k_tails_and_alignment() {
    // K not a multiple of 32, 16, 8 or 4: scalar paths and the -0 padding of the FFMA tiles.
    for fmt in [WeightFormat::F32, WeightFormat::F16, WeightFormat::BF16] {
        for k in [1, 3, 15, 16, 17, 31, 33, 100, 129, 255] {
            dense(fmt, 70, 9, k, k as u64, &KERNELS);
        }
    }
}

#[test]
fn negative_zero_survives_every_kernel() {
    // Products of -2^-20 and 2^-140 underflow to -0, so every partial of a row is -0 (K > 96
    // gives all four partials elements) and so is the result: K-tail padding must not turn a
    // -0 partial into +0.
    let Some(dev) = gpu() else { return };
    for fmt in [WeightFormat::F32, WeightFormat::F16, WeightFormat::BF16] {
        for k in [100, 129, 200] {
            let (n, m) = (66, 3);
            let wq = QuantMatrix::quantize(fmt, &vec![-(2f32.powi(-20)); m * k], 1, m, k).unwrap();
            let xh = vec![2f32.powi(-140); n * k];
            let want = reference::gemm::gemm(&xh, &wq, n).unwrap();
            assert!(
                want.iter().all(|v| v.to_bits() == (-0.0f32).to_bits()),
                "{fmt} k={k}"
            );
            let w = GpuMatrix::upload(dev, &wq).unwrap();
            let x = GpuTensor::from_host(dev, &xh, &[n, k]).unwrap();
            for kernel in KERNELS {
                let mut y = GpuTensor::from_host(dev, &poison(n * m), &[n, m]).unwrap();
                matmul_with(dev, kernel, &x, &w, &mut y).unwrap();
                assert_bits_eq(
                    &format!("-0 {fmt} k={k} {kernel:?}"),
                    &y.to_host().unwrap(),
                    &want,
                );
            }
        }
    }
}

#[test]
fn nan_and_inf_activations() {
    let Some(dev) = gpu() else { return };
    for fmt in WeightFormat::CORE {
        let k = k_for(fmt, 4, 3);
        let seed = 77 + fmt.index() as u64;
        let wq = weights(fmt, 1, 20, k, seed);
        let xh = activations(12, k, seed, 0.05);
        let want = reference::gemm::gemm(&xh, &wq, 12).unwrap();
        let w = GpuMatrix::upload(dev, &wq).unwrap();
        let x = GpuTensor::from_host(dev, &xh, &[12, k]).unwrap();
        for kernel in KERNELS {
            let mut y = GpuTensor::from_host(dev, &poison(12 * 20), &[12, 20]).unwrap();
            matmul_with(dev, kernel, &x, &w, &mut y).unwrap();
            assert_bits_eq(
                &format!("specials {fmt} {kernel:?}"),
                &y.to_host().unwrap(),
                &want,
            );
        }
    }
}

#[test]
fn gemv_row_equals_gemm_row_equals_grouped() {
    let Some(dev) = gpu() else { return };
    for fmt in WeightFormat::CORE {
        let (n, m, k) = (70, 40, k_for(fmt, 8, 0));
        let wq = weights(fmt, 1, m, k, 5);
        let xh = activations(n, k, 6, 0.0);
        let w = GpuMatrix::upload(dev, &wq).unwrap();
        let x = GpuTensor::from_host(dev, &xh, &[n, k]).unwrap();
        let mut full = GpuTensor::zeros(dev, &[n, m]).unwrap();
        matmul_with(dev, MatmulKernel::Gemm, &x, &w, &mut full).unwrap();
        let full = full.to_host().unwrap();
        for t in 0..n {
            let xt = GpuTensor::from_host(dev, &xh[t * k..(t + 1) * k], &[1, k]).unwrap();
            let mut yt = GpuTensor::zeros(dev, &[1, m]).unwrap();
            matmul(dev, &xt, &w, &mut yt).unwrap();
            assert_bits_eq(
                &format!("{fmt} gemv row {t}"),
                &yt.to_host().unwrap(),
                &full[t * m..(t + 1) * m],
            );
        }
        // Every token routed, in reverse order, to the one expert.
        let order: Vec<u32> = (0..n as u32).rev().collect();
        let rows = RoutedRows::new(dev, &order, &vec![0; n], &order, n, 1, n).unwrap();
        for kernel in KERNELS {
            let mut yg = GpuTensor::zeros(dev, &[n, m]).unwrap();
            matmul_grouped_with(dev, kernel, &x, &w, &rows, &mut yg).unwrap();
            assert_bits_eq(
                &format!("{fmt} grouped {kernel:?}"),
                &yg.to_host().unwrap(),
                &full,
            );
        }
    }
}

fn grouped(fmt: WeightFormat, n: usize, ne: usize, m: usize, k: usize, seed: u64) {
    let Some(dev) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(seed);
    let xh = activations(n, k, seed, 0.002);
    let wq = weights(fmt, ne, m, k, seed ^ 9);
    // A random routing: each token to 1..=3 slots of a [n * 3, m] output, experts skewed so
    // that some groups exceed the GEMV height and others hold one row.
    let (mut xr, mut ex, mut yr) = (Vec::new(), Vec::new(), Vec::new());
    for t in 0..n {
        for slot in 0..rng.gen_range(1..=3usize) {
            xr.push(t as u32);
            let e = if rng.gen_bool(0.5) {
                0
            } else {
                rng.gen_range(0..ne)
            };
            ex.push(e as u32);
            yr.push((t * 3 + slot) as u32);
        }
    }
    let ny = n * 3;
    let mut want = poison(ny * m);
    reference::gemm::gemm_grouped_with(GemmOrder::Chain, &xh, &wq, &mut want, &xr, &ex, &yr)
        .unwrap();
    let x = GpuTensor::from_host(dev, &xh, &[n, k]).unwrap();
    let w = GpuMatrix::upload(dev, &wq).unwrap();
    let rows = RoutedRows::new(dev, &xr, &ex, &yr, n, ne, ny).unwrap();
    let mut kernels = KERNELS.to_vec();
    if fmt == WeightFormat::F32 {
        kernels.push(MatmulKernel::V1);
    }
    for kernel in kernels {
        let mut y = GpuTensor::from_host(dev, &poison(ny * m), &[ny, m]).unwrap();
        matmul_grouped_with(dev, kernel, &x, &w, &rows, &mut y).unwrap();
        assert_bits_eq(
            &format!("grouped {fmt} n={n} ne={ne} m={m} k={k} seed={seed} {kernel:?}"),
            &y.to_host().unwrap(),
            &want,
        );
    }
}

#[test]
fn v1_kernels_are_a_second_witness() {
    let Some(dev) = gpu() else { return };
    for (n, m, k) in [(1, 5, 1), (3, 5, 33), (40, 70, 300), (65_535 + 70, 3, 37)] {
        let xh = values(k as u64, n * k, 2.0, 0.01);
        let wh = values(k as u64 ^ 7, m * k, 1.0, 0.01);
        let want = reference::gemm::gemm_f32(&xh, &wh, n, m, k);
        let x = GpuTensor::from_host(dev, &xh, &[n, k]).unwrap();
        let w = GpuTensor::from_host(dev, &wh, &[m, k]).unwrap();
        let mut y = GpuTensor::from_host(dev, &poison(n * m), &[n, m]).unwrap();
        gemm_f32(dev, &x, &w, &mut y).unwrap();
        assert_bits_eq(
            &format!("gemm_f32 v1 n={n} m={m} k={k}"),
            &y.to_host().unwrap(),
            &want,
        );
        let wq = QuantMatrix::quantize(WeightFormat::F32, &wh, 1, m, k).unwrap();
        let wg = GpuMatrix::upload(dev, &wq).unwrap();
        let mut y2 = GpuTensor::from_host(dev, &poison(n * m), &[n, m]).unwrap();
        matmul_with(dev, MatmulKernel::V1, &x, &wg, &mut y2).unwrap();
        assert_bits_eq("matmul V1", &y2.to_host().unwrap(), &want);
    }
    // The grouped v1 kernel on f32 tensors.
    let (n, ne, m, k) = (9, 3, 7, 40);
    let xh = values(1, n * k, 2.0, 0.0);
    let wh = values(2, ne * m * k, 1.0, 0.0);
    let xr: Vec<u32> = (0..n as u32).collect();
    let ex: Vec<u32> = (0..n as u32).map(|i| i % ne as u32).collect();
    let mut want = poison(n * m);
    reference::gemm::gemm_grouped_f32(&xh, &wh, &mut want, &xr, &ex, &xr, m, k);
    let rows = RoutedRows::new(dev, &xr, &ex, &xr, n, ne, n).unwrap();
    let x = GpuTensor::from_host(dev, &xh, &[n, k]).unwrap();
    let w = GpuTensor::from_host(dev, &wh, &[ne, m, k]).unwrap();
    let mut y = GpuTensor::from_host(dev, &poison(n * m), &[n, m]).unwrap();
    gemm_grouped_f32(dev, &x, &w, &rows, &mut y).unwrap();
    assert_bits_eq("gemm_grouped_f32 v1", &y.to_host().unwrap(), &want);
}

#[test]
fn malformed_blocks_and_shapes_are_typed_errors_and_write_nothing() {
    // A Q8_0 block whose f16 scale is NaN, and a Q4_K super-block whose dmin is infinite.
    let mut q8 = QuantMatrix::quantize(WeightFormat::Q8_0, &[0.5; 64], 1, 1, 64)
        .unwrap()
        .bytes()
        .to_vec();
    q8[34..36].copy_from_slice(&0x7e00u16.to_le_bytes());
    let e = QuantMatrix::from_bytes(WeightFormat::Q8_0, 1, 1, 64, q8).unwrap_err();
    assert!(
        matches!(e, Error::InvalidArgument { .. }) && e.to_string().contains("block 1"),
        "{e}"
    );
    let mut q4 = QuantMatrix::quantize(WeightFormat::Q4K, &[0.5; 256], 1, 1, 256)
        .unwrap()
        .bytes()
        .to_vec();
    q4[2..4].copy_from_slice(&0x7c00u16.to_le_bytes());
    assert!(QuantMatrix::from_bytes(WeightFormat::Q4K, 1, 1, 256, q4).is_err());
    assert!(QuantMatrix::from_bytes(WeightFormat::Q6K, 1, 1, 256, vec![0; 209]).is_err());
    assert!(QuantMatrix::quantize(WeightFormat::Q5K, &[0.0; 100], 1, 1, 100).is_err());

    let Some(dev) = gpu() else { return };
    let e = RoutedRows::new(dev, &[0, 1], &[0, 4], &[0, 1], 2, 4, 2).unwrap_err();
    assert!(
        matches!(
            e,
            Error::IndexOutOfRange {
                what: "experts",
                position: 1,
                index: 4,
                bound: 4,
                ..
            }
        ),
        "{e}"
    );
    let e = RoutedRows::new(dev, &[0, 2], &[0, 1], &[0, 1], 2, 4, 2).unwrap_err();
    assert!(
        matches!(e, Error::IndexOutOfRange { what: "x_rows", .. }),
        "{e}"
    );
    let e = RoutedRows::new(dev, &[0, 1], &[0, 1], &[1, 1], 2, 4, 2).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");

    let wq = weights(WeightFormat::Q8_0, 4, 5, 64, 1);
    let w = GpuMatrix::upload(dev, &wq).unwrap();
    let x = GpuTensor::from_host(dev, &values(1, 2 * 64, 1.0, 0.0), &[2, 64]).unwrap();
    let x_bad = GpuTensor::from_host(dev, &values(1, 2 * 32, 1.0, 0.0), &[2, 32]).unwrap();
    let rows = RoutedRows::new(dev, &[0, 1], &[0, 3], &[1, 0], 2, 4, 2).unwrap();
    let rows3 = RoutedRows::new(dev, &[0, 1], &[0, 2], &[1, 0], 2, 3, 2).unwrap();
    let mut y = GpuTensor::from_host(dev, &poison(2 * 5), &[2, 5]).unwrap();
    for kernel in KERNELS {
        assert!(matches!(
            matmul_grouped_with(dev, kernel, &x_bad, &w, &rows, &mut y),
            Err(Error::ShapeMismatch { .. })
        ));
        assert!(matches!(
            matmul_grouped_with(dev, kernel, &x, &w, &rows3, &mut y),
            Err(Error::ShapeMismatch { .. })
        ));
        // A dense product refuses a stack of experts; V1 refuses quantized weights.
        assert!(matches!(
            matmul_with(dev, kernel, &x, &w, &mut y),
            Err(Error::InvalidArgument { .. })
        ));
    }
    let one = GpuMatrix::upload(dev, &weights(WeightFormat::Q8_0, 1, 5, 64, 1)).unwrap();
    assert!(matches!(
        matmul_with(dev, MatmulKernel::V1, &x, &one, &mut y),
        Err(Error::InvalidArgument { .. })
    ));
    let mut y_bad = GpuTensor::from_host(dev, &poison(2 * 4), &[2, 4]).unwrap();
    assert!(matches!(
        matmul(dev, &x, &one, &mut y_bad),
        Err(Error::ShapeMismatch { .. })
    ));
    assert_bits_eq("untouched", &y.to_host().unwrap(), &poison(10));
    assert_bits_eq("untouched", &y_bad.to_host().unwrap(), &poison(8));
}

/// F32 weights one token at a time (the decode router's kernel, `gemv_f32_wide`, a block
/// per row): K on each side of a 32-block, of its 16-byte loads and of its 2048-wide segments;
/// and the same through one-row expert tiles.
#[test]
fn f32_one_row_every_segment() {
    for m in [1usize, 3, 4, 5, 128] {
        for k in [1usize, 31, 33, 2047, 2048, 2049, 4100] {
            dense(WeightFormat::F32, 1, m, k, (m * 7 + k) as u64, &KERNELS);
        }
    }
    grouped(WeightFormat::F32, 1, 3, 9, 2049, 4);
    grouped(WeightFormat::F32, 2, 5, 6, 100, 5);
}

/// Q8_0 and K-quant weights one token at a time with K of whole 256-wide chunks
/// (`gemv_<fmt>_async` for the K-quants and Q8_0 up to 1024 columns, `gemv_q8_0_rows` for wider
/// Q8_0; `gemv_q8_0_mma` and `gemv_q6_k_mma` under `MatmulKernel::GemvMma`): rows on each side
/// of the 8-row and 16-row blocks, K of 1 to 32 chunks (fewer and
/// more than the stages in flight; segments of 64 blocks whole, cut and several; Q6_K rows of
/// an odd number of super-blocks start at every even offset mod 16, and the matrix's last
/// super-block ends short of a 16-byte piece); and one-row expert tiles, padding tiles among
/// them.
#[test]
fn kq_one_row_whole_chunks() {
    for fmt in [
        WeightFormat::Q8_0,
        WeightFormat::Q4K,
        WeightFormat::Q5K,
        WeightFormat::Q6K,
    ] {
        for m in [1usize, 7, 8, 9, 15, 16, 17, 100] {
            for k in [256usize, 768, 1024, 1280, 1536, 2304, 4096, 8192] {
                dense(fmt, 1, m, k, (m * 13 + k) as u64, &KERNELS);
            }
        }
        grouped(fmt, 1, 4, 20, 2048, 6);
        grouped(fmt, 2, 5, 33, 4096, 8);
        grouped(fmt, 1, 3, 17, 2304, 9);
        grouped(fmt, 3, 6, 9, 512, 7);
    }
}

/// Q8_0 weights of [`GEMV_MMA_MIN_ROWS`] rows or more one token at a time (`gemv_q8_0_mma`, the
/// LM head's kernel): rows not a multiple of its 16-row blocks; K of one chunk, of a pass of 8
/// chunks and one more, of two passes.
#[test]
fn q8_0_one_row_tall() {
    for k in [256usize, 2304, 4096] {
        dense(
            WeightFormat::Q8_0,
            1,
            GEMV_MMA_MIN_ROWS + 9,
            k,
            k as u64,
            &KERNELS,
        );
    }
}
