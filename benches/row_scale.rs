//! Bench of `row_scale` (`cuda/row_scale.cu`): `buf[i, e] *= scales[i]`, dim 2048.
//!
//! Napkin math: per element one f32 read and one f32 write (8 bytes), the scales are noise.
//! The kernel is memory-bound; its ceiling is the device-to-device copy of the same bytes,
//! measured in the same run (a copy of `rows * dim` floats reads and writes those 8 bytes too).
//! Buffers rotate so that the working set exceeds L2.

mod common;

use bitexact::kernels::row_scale::row_scale_version;
use bitexact::GpuTensor;
use criterion::Throughput;

const DIM: usize = 2048;
const TOKENS: [usize; 6] = [1, 8, 64, 512, 2048, 4096];

fn main() {
    common::run_family("row_scale", |dev, group, rows| {
        for &n in &TOKENS {
            let elems = n * DIM;
            let bytes = 8 * elems;
            let sets = common::rotation(bytes);
            let host: Vec<f32> = (0..elems).map(|i| 1.0 + (i % 7) as f32 * 1e-3).collect();
            let scales_h: Vec<f32> = (0..n).map(|i| 1.0 - (i % 3) as f32 * 1e-7).collect();
            let mut bufs: Vec<GpuTensor<f32>> = (0..sets)
                .map(|_| GpuTensor::from_host(dev, &host, &[n, DIM]).unwrap())
                .collect();
            let scales = GpuTensor::from_host(dev, &scales_h, &[n]).unwrap();
            group.throughput(Throughput::Bytes(bytes as u64));
            for version in [1u32, 2] {
                let name = format!("v{version}");
                common::bench_against_copy(group, dev, rows, "row_scale", &name, n, bytes, |i| {
                    let buf = &mut bufs[i as usize % sets];
                    row_scale_version(dev, version, buf, &scales).unwrap();
                });
            }
        }

        format!("row_scale, dim {DIM}")
    });
}
