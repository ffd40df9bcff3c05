//! Golden digests: FNV-1a hashes of the bits of fixed-seed model outputs (every token's logits
//! and every layer's hidden states of the `tiny`, `small` and `tiny-hybrid` presets), committed here. A refactor that
//! changes no bit keeps them; only a deliberate change of a canonical order may update them,
//! in the same commit as the reference that defines the new order. The GPU must give the same
//! digests as the CPU.
//!
//! To print the current values: `BITEXACT_PRINT_GOLDEN=1 cargo test --test parity golden --
//! --nocapture`.

use bitexact::model::ModelConfig;
use bitexact::model::{prompt, CpuSession, GpuModel, ModelWeights, Session, Trace};
use bitexact::quant::WeightFormat;

use crate::common::gpu;

/// (preset, format, seed, tokens, digest). More than 64 tokens: several attention chunks, so
/// the fold runs.
/// `tiny-hybrid`: Gated DeltaNet and gated attention layers.
const GOLDEN: [(&str, WeightFormat, u64, usize, u64); 4] = [
    ("tiny", WeightFormat::F32, 7, 150, 0x867d4587d0aa1c07),
    ("tiny", WeightFormat::Q8_0, 8, 150, 0x10dcf04c06f69dfb),
    ("small", WeightFormat::Q4K, 9, 100, 0xab29c1e345c5aaa6),
    (
        "tiny-hybrid",
        WeightFormat::F32,
        10,
        150,
        0x433f66e8278c9133,
    ),
];

/// The exact integer orders (issue 31; the CPU reference's only): (preset, format, seed,
/// tokens, digest), each over one batched forward, one token at a time and chunks of 37.
const GOLDEN_EXACT: [(&str, WeightFormat, u64, usize, u64); 4] = [
    ("tiny", WeightFormat::F32, 7, 150, 0x3bcf2fe6bae6bb5d),
    ("tiny", WeightFormat::Q8_0, 8, 150, 0x93f22e35b1c8cbda),
    ("tiny", WeightFormat::Q4_0, 12, 150, 0x178dc44b656b39ad),
    (
        "tiny-hybrid",
        WeightFormat::F32,
        10,
        150,
        0x3a76d3974c594be5,
    ),
];

fn fnv1a(trace: &Trace) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for x in trace.layers.iter().flatten().chain(&trace.logits) {
        for b in x.to_bits().to_le_bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

fn check(what: &str, got: u64, want: u64) {
    if std::env::var("BITEXACT_PRINT_GOLDEN").is_ok_and(|v| v == "1") {
        println!("golden {what}: {got:#018x}");
        return;
    }
    assert_eq!(
        got, want,
        "{what}: digest {got:#018x}, committed {want:#018x}"
    );
}

/// The digest of the CPU reference's batched forward of `n` tokens of `preset` from `seed`.
fn cpu_digest(preset: &str, fmt: WeightFormat, seed: u64, n: usize) -> u64 {
    let cfg = ModelConfig::preset(preset, fmt).unwrap();
    let w = ModelWeights::generate(&cfg, seed, None).unwrap();
    let mut s = CpuSession::new(&w);
    let mut t = Trace::default();
    s.forward(&prompt(seed, n, cfg.vocab), &mut t).unwrap();
    fnv1a(&t)
}

#[test]
fn cpu_digests() {
    for (preset, fmt, seed, n, want) in GOLDEN {
        check(
            &format!("cpu {preset} {fmt}"),
            cpu_digest(preset, fmt, seed, n),
            want,
        );
    }
}

#[test]
fn cpu_digests_exact_orders() {
    use bitexact::reference::attention::{AttnOrder, IntSlices};
    use bitexact::reference::gemm::GemmOrder;
    for (preset, fmt, seed, n, want) in GOLDEN_EXACT {
        let cfg = ModelConfig::preset(preset, fmt).unwrap();
        let w = ModelWeights::generate(&cfg, seed, None).unwrap();
        let tokens = prompt(seed, n, cfg.vocab);
        for chunk in [n, 1, 37] {
            let mut s = CpuSession::new(&w);
            s.set_orders(AttnOrder::exact(IntSlices::CHOSEN), GemmOrder::Exact);
            let mut t = Trace::default();
            for step in tokens.chunks(chunk) {
                s.forward(step, &mut t).unwrap();
            }
            check(
                &format!("cpu exact orders {preset} {fmt} chunk {chunk}"),
                fnv1a(&t),
                want,
            );
        }
    }
}

#[test]
fn gpu_digests() {
    let Some(dev) = gpu() else { return };
    for (preset, fmt, seed, n, want) in GOLDEN {
        let cfg = ModelConfig::preset(preset, fmt).unwrap();
        let w = ModelWeights::generate(&cfg, seed, None).unwrap();
        let model = GpuModel::load(dev, &w).unwrap();
        let mut s = Session::new(dev, &model).unwrap();
        let tokens = prompt(seed, n, cfg.vocab);
        for chunk in [n, 1, 37] {
            s.reset();
            let mut t = Trace::default();
            for step in tokens.chunks(chunk) {
                s.forward(dev, step, Some(&mut t)).unwrap();
            }
            check(
                &format!("gpu {preset} {fmt} chunk {chunk}"),
                fnv1a(&t),
                want,
            );
        }
    }
}
