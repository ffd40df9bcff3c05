//! Bench of `moe_weighted_reduce` (`cuda/moe_reduce.cu`), dim 2048, 8 routed experts plus a
//! shared term.
//!
//! Napkin math: per output element `na` partials + 1 shared read and 1 write, so
//! `4 * (na + 2)` bytes (40 at na = 8); the weights are noise. Memory-bound: the ceiling is a
//! device-to-device copy of `N * dim * (na + 2) / 2` floats, which reads and writes the same
//! total bytes, measured in the same run. Buffers rotate so that the working set exceeds L2.

mod common;

use bitexact::kernels::moe_reduce::moe_weighted_reduce_version;
use bitexact::GpuTensor;
use criterion::Throughput;

const DIM: usize = 2048;
const NA: usize = 8;
const TOKENS: [usize; 6] = [1, 8, 64, 512, 2048, 4096];

struct Set {
    partial: GpuTensor<f32>,
    weight: GpuTensor<f32>,
    shared: GpuTensor<f32>,
    out: GpuTensor<f32>,
}

fn main() {
    common::run_family("moe_reduce", |dev, group, rows| {
        for &n in &TOKENS {
            let bytes = 4 * n * DIM * (NA + 2);
            let sets = common::rotation(bytes);
            let ph: Vec<f32> = (0..n * NA * DIM)
                .map(|i| (i % 13) as f32 * 0.25 - 1.5)
                .collect();
            let wh: Vec<f32> = (0..n * NA).map(|i| 0.125 + (i % 5) as f32 * 0.01).collect();
            let sh: Vec<f32> = (0..n * DIM).map(|i| (i % 11) as f32 * 0.5).collect();
            let mut data: Vec<Set> = (0..sets)
                .map(|_| Set {
                    partial: GpuTensor::from_host(dev, &ph, &[n, NA, DIM]).unwrap(),
                    weight: GpuTensor::from_host(dev, &wh, &[n, NA]).unwrap(),
                    shared: GpuTensor::from_host(dev, &sh, &[n, DIM]).unwrap(),
                    out: GpuTensor::zeros(dev, &[n, DIM]).unwrap(),
                })
                .collect();
            group.throughput(Throughput::Bytes(bytes as u64));
            for version in [1u32, 2] {
                let name = format!("v{version}");
                common::bench_against_copy(group, dev, rows, "moe_reduce", &name, n, bytes, |i| {
                    let s = &mut data[i as usize % sets];
                    moe_weighted_reduce_version(
                        dev,
                        version,
                        &s.partial,
                        &s.weight,
                        Some(&s.shared),
                        &mut s.out,
                    )
                    .unwrap();
                });
            }
        }

        format!("moe_weighted_reduce, dim {DIM}, na {NA} + shared")
    });
}
