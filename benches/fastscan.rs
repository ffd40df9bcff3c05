//! Bench of `fastscan` (`cuda/fastscan.cu`): attention over a 4-bit FastScan KV cache per
//! (layer, kv head): one kv head, 8 query heads (Qwen3-30B-A3B's group), D = 128.
//!
//! Napkin math: decode reads each position's K and V codes once per query head block, `64 +
//! 16 D` bytes per 32 positions each (2,112 bytes per tile at D = 128: 66 bytes a position for
//! K and V together, against 512 for f16 K and V). The kernels are latency- and
//! shared-memory-bound rather than DRAM-bound at these sizes: 8 query heads re-read the same
//! codes, which stay in L2. The table prints both the effective GB/s over the code bytes and,
//! in the same run, the f16-KV baseline doing the same attention on uncompressed K and V, and
//! a device-to-device copy moving as many bytes (half read, half written; from DRAM).

mod common;

use bitexact::kernels::fastscan::{
    f16kv_attention, fastscan_attention, AttentionWorkspace, F16KvCache, FastScanCache,
};
use bitexact::kernels::rope::Positions;
use bitexact::quant::fastscan::FastScanSpec;
use bitexact::reference::fastscan::{ScoreMode, ValueMode};
use bitexact::GpuTensor;
use criterion::BenchmarkId;

const D: usize = 128;
const HEADS: usize = 8;
const DECODE: [usize; 4] = [1_024, 4_096, 16_384, 65_536];
const PREFILL: [usize; 2] = [1_024, 4_096];
/// The seed engine's CPU FastScan (AVX2, Ryzen 9 7900X), K + V per (layer, kv head), µs.
const SEED_CPU_US: [(usize, f64); 4] = [
    (1_024, 26.0),
    (4_096, 98.0),
    (8_192, 193.0),
    (16_384, 390.0),
];

/// A bench row: its name, the FastScan modes (none: the f16-KV baseline) and the bytes read.
type Variant = (&'static str, Option<(ScoreMode, ValueMode)>, usize);

fn main() {
    let Some(dev) = common::device() else { return };
    let mut c = common::criterion();
    let spec = FastScanSpec::new(D, 4, 1).unwrap();
    let mut rows = Vec::new();
    let mut ratios = Vec::new();
    let mut ws = AttentionWorkspace::default();
    let mut group = c.benchmark_group("fastscan");
    let mut lens: Vec<usize> = DECODE.iter().chain(&PREFILL).copied().collect();
    lens.sort();
    lens.dedup();
    for len in lens {
        let k = common::vals(len * D, 1);
        let v = common::vals(len * D, 2);
        let mut cache = FastScanCache::new(&dev, spec, 1, len).unwrap();
        let kg = GpuTensor::from_host(&dev, &k, &[len, 1, D]).unwrap();
        let vg = GpuTensor::from_host(&dev, &v, &[len, 1, D]).unwrap();
        cache.append(&dev, &kg, &vg).unwrap();
        let f16c = F16KvCache::from_host(&dev, &k, &v, 1, D).unwrap();
        drop((kg, vg));
        for phase in ["decode", "prefill"] {
            let lens: &[usize] = if phase == "decode" { &DECODE } else { &PREFILL };
            if !lens.contains(&len) {
                continue;
            }
            let nq = if phase == "decode" { 1 } else { len };
            let qpos: Vec<u32> = if nq == 1 {
                vec![len as u32 - 1]
            } else {
                (0..len as u32).collect()
            };
            let q = GpuTensor::from_host(&dev, &common::vals(nq * HEADS * D, 3), &[nq, HEADS, D])
                .unwrap();
            let pos = Positions::new(&dev, &qpos).unwrap();
            let mut out = GpuTensor::zeros(&dev, &[nq, HEADS, D]).unwrap();
            let code_bytes = 2 * cache.bytes_read(len);
            let f16_bytes = 2 * len * D * 2;
            let variants: [Variant; 3] = [
                (
                    "int8 tables + int8 values",
                    Some((ScoreMode::Int8, ValueMode::Int8)),
                    code_bytes,
                ),
                (
                    "f32 tables + f32 values",
                    Some((ScoreMode::F32, ValueMode::F32)),
                    code_bytes,
                ),
                ("f16-KV baseline", None, f16_bytes),
            ];
            for (name, mode, bytes) in variants {
                let key = format!("fastscan/{phase}/{name}/{len}");
                group.bench_function(BenchmarkId::new(format!("{phase} {name}"), len), |b| {
                    b.iter_custom(|iters| {
                        common::timed(&dev, &key, iters, |_| match mode {
                            Some((s, vm)) => {
                                fastscan_attention(&dev, &q, &cache, &pos, s, vm, &mut ws, &mut out)
                                    .unwrap()
                            }
                            None => {
                                f16kv_attention(&dev, &q, &f16c, &pos, &mut ws, &mut out).unwrap()
                            }
                        })
                    })
                });
                if phase == "decode" {
                    rows.push(common::Row {
                        kernel: format!("decode, {name}"),
                        n: len,
                        bytes,
                        key: key.clone(),
                        copy_key: format!("fastscan/copy/{bytes}"),
                    });
                }
                ratios.push((phase, name, len, key));
            }
            if phase == "decode" {
                for bytes in [code_bytes, f16_bytes] {
                    let key = format!("fastscan/copy/{bytes}");
                    common::bench_copy(
                        &mut group,
                        &dev,
                        &key,
                        BenchmarkId::new("copy", bytes),
                        bytes,
                    );
                }
            }
        }
    }
    group.finish();
    c.final_summary();
    common::print_table(
        &format!(
            "fastscan decode, 1 kv head x {HEADS} query heads, D={D}, 4 bits ({})",
            dev.name()
        ),
        &rows,
    );
    println!();
    println!("## fastscan against the f16-KV baseline and the seed's CPU FastScan");
    println!();
    println!("| phase | positions | kernel | median | vs f16-KV | vs seed CPU |");
    println!("|---|---:|---|---:|---:|---:|");
    for (phase, name, len, key) in &ratios {
        let Some(t) = common::median_ns(key) else {
            continue;
        };
        let base = common::median_ns(&format!("fastscan/{phase}/f16-KV baseline/{len}"))
            .unwrap_or(f64::NAN);
        let seed = SEED_CPU_US
            .iter()
            .find(|(l, _)| l == len && *phase == "decode")
            .map(|(_, us)| format!("{:.1}x faster", us * 1e3 / t))
            .unwrap_or_else(|| "-".to_string());
        let time = if t > 1e6 {
            format!("{:.3} ms", t / 1e6)
        } else {
            format!("{:.2} us", t / 1e3)
        };
        println!(
            "| {phase} | {len} | {name} | {time} | {:.2}x faster | {seed} |",
            base / t
        );
    }
}
