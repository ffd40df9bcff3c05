//! The MoE block: CPU sequential == CPU batched (always), and with a GPU, GPU token by token ==
//! GPU batched == CPU reference, bit for bit, for every N in 1..=64.

use bitexact::model::moe_block::{upload_input, GpuMoeBlock};
use bitexact::model::MoeOutput;
use bitexact::model::{MoeConfig, MoeWeights};
use bitexact::quant::WeightFormat;
use bitexact::reference::moe_block::{forward_cpu, forward_cpu_batched, ExpertPlan};
use bitexact::Error;
use proptest::prelude::*;

use crate::common::{assert_bits_eq, gpu, gpu_cases};

fn cfg(dim: usize, n_experts: usize, top_k: usize, ffn: usize, shared: bool) -> MoeConfig {
    MoeConfig {
        dim,
        n_experts,
        top_k,
        ffn,
        shared_ffn: shared.then_some(ffn + 8),
        renormalize: top_k % 2 == 0,
        format: WeightFormat::F32,
    }
}

fn same(what: &str, a: &MoeOutput, b: &MoeOutput) {
    assert_eq!(a.ids, b.ids, "{what}: expert ids");
    assert_bits_eq(&format!("{what}: routing weights"), &a.weights, &b.weights);
    assert_bits_eq(&format!("{what}: output"), &a.out, &b.out);
}

proptest! {
    #![proptest_config(gpu_cases(24))]

    #[test]
    fn cpu_batched_equals_sequential(
        n in 1usize..=64, dim in 8usize..=96, e in 1usize..=12, kf in 0.0f64..1.0,
        ffn in 4usize..=48, shared in any::<bool>(), seed in any::<u64>(),
    ) {
        let k = 1 + ((e.min(8) - 1) as f64 * kf) as usize;
        let c = cfg(dim, e, k, ffn, shared);
        let w = MoeWeights::generate(&c, seed).unwrap();
        let x = MoeWeights::inputs(&c, seed, n);
        same("cpu batched vs sequential", &forward_cpu_batched(&w, &x, n).unwrap(), &forward_cpu(&w, &x, n).unwrap());
    }

    #[test]
    fn gpu_paths_equal_cpu(
        n in 1usize..=64, dim in 8usize..=160, e in 1usize..=16, kf in 0.0f64..1.0,
        ffn in 4usize..=64, shared in any::<bool>(), seed in any::<u64>(),
    ) {
        gpu_case(n, dim, e, kf, ffn, shared, seed);
    }
}

fn gpu_case(n: usize, dim: usize, e: usize, kf: f64, ffn: usize, shared: bool, seed: u64) {
    let k = 1 + ((e.min(8) - 1) as f64 * kf) as usize;
    let c = cfg(dim, e, k, ffn, shared);
    gpu_paths(&c, seed, n, &format!("n={n} cfg={c:?} seed={seed}"));
}

/// CPU batched == CPU sequential, GPU sequential (the GEMV kernels) == CPU, GPU batched (GEMM
/// and tensor-core kernels) == GPU sequential, for `n` tokens through the block of `c`.
fn gpu_paths(c: &MoeConfig, seed: u64, n: usize, ctx: &str) {
    let Some(dev) = gpu() else { return };
    let w = MoeWeights::generate(c, seed).unwrap();
    let x = MoeWeights::inputs(c, seed, n);
    let want = forward_cpu(&w, &x, n).unwrap();
    same(
        &format!("cpu batched vs sequential, {ctx}"),
        &forward_cpu_batched(&w, &x, n).unwrap(),
        &want,
    );
    let block = GpuMoeBlock::upload(dev, &w).unwrap();
    let xg = upload_input(dev, c, &x, n).unwrap();
    let seq = block
        .forward_sequential(dev, &xg)
        .unwrap()
        .to_host()
        .unwrap();
    let bat = block.forward_batched(dev, &xg).unwrap().to_host().unwrap();
    same(&format!("gpu sequential vs cpu, {ctx}"), &seq, &want);
    same(&format!("gpu batched vs gpu sequential, {ctx}"), &bat, &seq);
}

#[test]
fn every_n_up_to_64_on_one_model() {
    let Some(_) = gpu() else { return };
    for n in 1..=64 {
        gpu_case(n, 72, 10, 0.5, 40, true, 99);
    }
}

/// GPU sequential (GEMV kernels) == GPU batched (GEMM and tensor-core kernels) == CPU, for an
/// MoE block whose experts are stored in `format`.
fn format_case(
    format: WeightFormat,
    n: usize,
    dim: usize,
    ffn: usize,
    e: usize,
    k: usize,
    seed: u64,
) {
    let c = MoeConfig {
        dim,
        n_experts: e,
        top_k: k,
        ffn,
        shared_ffn: Some(ffn),
        renormalize: true,
        format,
    };
    gpu_paths(&c, seed, n, &format!("{format}, n={n}"));
}

#[test]
fn every_format_batched_equals_sequential() {
    for format in WeightFormat::CORE {
        let dim = format.block_elems().max(32) * if format.block_elems() == 256 { 1 } else { 4 };
        for n in [1, 9, 40] {
            format_case(format, n, dim, 2 * dim.min(128), 6, 2, 17 + n as u64);
        }
    }
}

#[test]
fn bad_inputs_are_typed_errors() {
    let c = cfg(16, 4, 2, 8, true);
    let w = MoeWeights::generate(&c, 1).unwrap();
    assert!(matches!(
        forward_cpu(&w, &[0.0; 15], 1),
        Err(Error::ShapeMismatch { .. })
    ));
    let e = ExpertPlan::new(&[0, 1, 4, 2], 2, 4).unwrap_err();
    assert!(
        matches!(
            e,
            Error::IndexOutOfRange {
                position: 2,
                index: 4,
                bound: 4,
                ..
            }
        ),
        "{e}"
    );
    let bad = MoeConfig {
        top_k: 5,
        ..c.clone()
    };
    assert!(matches!(
        MoeWeights::generate(&bad, 1),
        Err(Error::InvalidArgument { .. })
    ));
    if let Some(dev) = gpu() {
        assert!(upload_input(dev, &c, &[0.0; 17], 1).is_err());
        let block = GpuMoeBlock::upload(dev, &w).unwrap();
        let xg = upload_input(dev, &cfg(12, 4, 2, 8, true), &[0.0; 12], 1).unwrap();
        let q4 = MoeConfig {
            format: WeightFormat::Q4K,
            ..cfg(128, 4, 2, 256, false)
        };
        assert!(matches!(q4.validate(), Err(Error::InvalidArgument { .. })));
        assert!(matches!(
            block.forward_batched(dev, &xg),
            Err(Error::ShapeMismatch { .. })
        ));
    }
}
