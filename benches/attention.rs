//! Bench of `attention` (`cuda/attention.cu`): one layer of the Qwen3-30B-A3B shape (32 query
//! heads over 4 kv heads, head dim 128, f32 KV cache).
//!
//! Napkin math. Prefill of N tokens (causal): `4 * hd * n_heads * N (N + 1) / 2` FLOPs (two
//! products); at N = 8192 that is 0.55e12 FLOPs per layer; f32 FMAs on the CUDA
//! cores (the exact path may not use float tensor cores) peak near 67 TFLOP/s, so the floor is
//! about 8 ms per layer at 8192 and 0.5 ms at 2048. The table gives TFLOP/s beside PyTorch SDPA
//! (`ci/sdpa-bench.py`, run in the same call). Decode at context C reads K and V once:
//! `2 * n_kv * C * hd * 4` bytes (16.8 MB at 8192), set against the copy of as many bytes.

mod common;

use bitexact::kernels::attention::{attention_with, AttentionKernel, LayerCache};
use bitexact::kernels::rope::Positions;
use bitexact::GpuTensor;
use criterion::BenchmarkId;

const HEADS: usize = 32;
const KV: usize = 4;
const HD: usize = 128;
const PREFILL: [usize; 3] = [512, 2_048, 8_192];
const DECODE: [usize; 3] = [512, 8_192, 32_768];

fn main() {
    let Some(dev) = common::device() else { return };
    let mut c = common::criterion();
    let cap = *DECODE.iter().max().unwrap();
    let mut cache = LayerCache::new(&dev, KV, cap, HD).unwrap();
    cache.k = GpuTensor::from_host(&dev, &common::vals(KV * cap * HD, 1), &[KV, cap, HD]).unwrap();
    cache.v = GpuTensor::from_host(&dev, &common::vals(KV * cap * HD, 2), &[KV, cap, HD]).unwrap();
    let mut group = c.benchmark_group("attention");
    let mut flops_rows = Vec::new();
    for n in PREFILL {
        let q =
            GpuTensor::from_host(&dev, &common::vals(n * HEADS * HD, 3), &[n, HEADS, HD]).unwrap();
        let pos = Positions::new(&dev, &(0..n as u32).collect::<Vec<_>>()).unwrap();
        let mut out = GpuTensor::zeros(&dev, &[n, HEADS, HD]).unwrap();
        let flops = 4.0 * (HD * HEADS) as f64 * (n * (n + 1) / 2) as f64;
        let kernels: &[AttentionKernel] = if n <= 2_048 {
            &[
                AttentionKernel::Tile,
                AttentionKernel::Tile2,
                AttentionKernel::V1,
            ]
        } else {
            &[AttentionKernel::Tile, AttentionKernel::Tile2]
        };
        for &k in kernels {
            let key = format!("prefill {k:?} {n}");
            group.bench_function(BenchmarkId::new(format!("prefill {k:?}"), n), |b| {
                b.iter_custom(|iters| {
                    common::timed(&dev, &key, iters, |_| {
                        attention_with(&dev, k, &q, &cache, &pos, &mut out).unwrap()
                    })
                })
            });
            flops_rows.push((format!("prefill, {k:?}"), n, flops, key));
        }
    }
    let mut rows = Vec::new();
    for ctx in DECODE {
        let q = GpuTensor::from_host(&dev, &common::vals(HEADS * HD, 4), &[1, HEADS, HD]).unwrap();
        let pos = Positions::new(&dev, &[ctx as u32 - 1]).unwrap();
        let mut out = GpuTensor::zeros(&dev, &[1, HEADS, HD]).unwrap();
        let bytes = 2 * KV * ctx * HD * 4;
        for k in [
            AttentionKernel::Split,
            AttentionKernel::Split2,
            AttentionKernel::V1,
        ] {
            let key = format!("decode {k:?} {ctx}");
            group.bench_function(BenchmarkId::new(format!("decode {k:?}"), ctx), |b| {
                b.iter_custom(|iters| {
                    common::timed(&dev, &key, iters, |_| {
                        attention_with(&dev, k, &q, &cache, &pos, &mut out).unwrap()
                    })
                })
            });
            rows.push(common::Row {
                kernel: format!("decode, {k:?}"),
                n: ctx,
                bytes,
                key,
                copy_key: format!("copy {ctx}"),
            });
        }
        common::bench_copy(
            &mut group,
            &dev,
            &format!("copy {ctx}"),
            BenchmarkId::new("copy", ctx),
            bytes,
        );
    }
    group.finish();
    println!();
    println!("## attention prefill, {HEADS} heads over {KV} kv heads, hd {HD}, causal");
    println!();
    println!("| kernel | N | median time | TFLOP/s |");
    println!("|---|---:|---:|---:|");
    for (name, n, flops, key) in flops_rows {
        if let Some(t) = common::median_ns(&key) {
            println!(
                "| {name} | {n} | {:.3} ms | {:.1} |",
                t / 1e6,
                flops / t / 1e3
            );
        }
    }
    common::print_table(
        &format!("attention decode, {HEADS} heads over {KV} kv heads, hd {HD}, K and V bytes"),
        &rows,
    );
}
