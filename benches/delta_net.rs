//! Bench of the Gated DeltaNet scan (`cuda/delta_net.cu`) at the Qwen3.6-35B-A3B shape (16 key
//! heads, 32 value heads of 128, window 4): v1 (every step in one token-ordered loop), v2 (the
//! state-free steps of every token at once, then the delta rule alone), v3 (v2's prep, the
//! delta rule spread over 4 blocks a head), v5, v6 and the chunked order (`chunked`: other
//! bits, chunks of 64 tokens as matrix products), 1 to 2048 tokens, in one run.
//!
//! Napkin math: the scan is bound by its token-ordered chain, not by bytes: per token two
//! 32-long fmaf chains a column, six barriers (v2: three) and, in v1, a global round trip and a
//! serial gate. Its bytes (the mixed rows, b and a read, o written, the state read and written)
//! are still set against a device copy of as many, the same-run ceiling the table prints.

mod common;

use bitexact::kernels::delta_net::{
    delta_net_scan_with, GpuDeltaNetConsts, GpuDeltaNetState, ScanKernel,
};
use bitexact::quant::WeightFormat;
use bitexact::reference::delta_net::{DeltaNetConfig, DeltaNetWeights, ScanOrder};
use bitexact::GpuTensor;

const TOKENS: [usize; 4] = [1, 16, 512, 2048];

fn main() {
    common::run_family("delta_net", |dev, group, rows| {
        let cfg = DeltaNetConfig {
            dim: 2048,
            k_heads: 16,
            v_heads: 32,
            head_dim: 128,
            conv_kernel: 4,
            format: WeightFormat::F32,
        };
        let w = DeltaNetWeights::generate(&cfg, 1, 500).unwrap();
        let consts = GpuDeltaNetConsts::upload(dev, &w).unwrap();
        let mut state = GpuDeltaNetState::new(dev, &cfg).unwrap();
        let mut chunked = GpuDeltaNetState::with_order(dev, &cfg, ScanOrder::Chunked).unwrap();
        let (cd, hv, s) = (cfg.conv_dim(), cfg.v_heads, cfg.head_dim);
        // Small inputs: the state stays finite over the bench's calls.
        let small = |len: usize, salt: usize| -> Vec<f32> {
            common::vals(len, salt).iter().map(|v| v * 0.05).collect()
        };
        for &n in &TOKENS {
            let mixed = GpuTensor::from_host(dev, &small(n * cd, 1), &[n, cd]).unwrap();
            let b = GpuTensor::from_host(dev, &small(n * hv, 2), &[n, hv]).unwrap();
            let a = GpuTensor::from_host(dev, &small(n * hv, 3), &[n, hv]).unwrap();
            let mut o = GpuTensor::zeros(dev, &[n, hv, s]).unwrap();
            let bytes = 4 * (n * cd + 2 * n * hv + n * hv * s + 2 * hv * s * s);
            use ScanKernel::{V1, V2, V3, V5, V6};
            for kernel in [V1, V2, V3, V5, V6] {
                let name = format!("{kernel:?}").to_lowercase();
                common::bench_against_copy(group, dev, rows, "delta_net", &name, n, bytes, |_| {
                    delta_net_scan_with(
                        dev, kernel, &consts, &mut state, &mixed, &b, &a, 1e-6, &mut o,
                    )
                    .unwrap();
                });
            }
            // The chunked order (other bits: the state keeps its own order's kernels).
            common::bench_against_copy(group, dev, rows, "delta_net", "chunked", n, bytes, |_| {
                delta_net_scan_with(dev, V1, &consts, &mut chunked, &mixed, &b, &a, 1e-6, &mut o)
                    .unwrap();
            });
        }
        "Gated DeltaNet scan (v1, v2, v3, v5, v6, chunked; N = tokens), 16/32 heads of 128, against a device copy \
         of the same bytes"
            .to_string()
    });
}
