//! Bench of the norm family (`cuda/norm.cu`) at the 30B shape (dim 2048): `rmsnorm` and the
//! fused `add_rmsnorm_q8` (the residual add, the norm and the next product's Q8 input in one
//! launch) over 1 (decode) to 2048 (prefill) rows.
//!
//! Napkin math: rmsnorm reads x and writes y (8 bytes an element); add_rmsnorm_q8 reads h
//! and o, writes h and y with its codes and per-32 scales (17.25 bytes an element).
//! Memory-bound: the ceiling is a device-to-device copy of the same bytes in the same run.

mod common;

use bitexact::kernels::norm::{add_rmsnorm_q8, rmsnorm};
use bitexact::kernels::quantize::GpuActPair;
use bitexact::GpuTensor;

const DIM: usize = 2048;
const ROWS: [usize; 4] = [1, 8, 512, 2048];

fn main() {
    common::run_family("norm", |dev, group, rows| {
        let w = GpuTensor::from_host(dev, &common::vals(DIM, 7), &[DIM]).unwrap();
        for &n in &ROWS {
            let len = n * DIM;
            let upload = |salt| GpuTensor::from_host(dev, &common::vals(len, salt), &[n, DIM]);
            let bytes = 8 * len;
            let mut data = common::rotated(bytes, |s| {
                (
                    upload(s).unwrap(),
                    GpuTensor::zeros(dev, &[n, DIM]).unwrap(),
                )
            });
            let sets = data.len();
            common::bench_against_copy(group, dev, rows, "norm", "rmsnorm", n, bytes, |i| {
                let (x, y) = &mut data[i as usize % sets];
                rmsnorm(dev, x, &w, 1e-6, y).unwrap();
            });

            let bytes = 16 * len + len + len / 4;
            let mut data = common::rotated(bytes, |s| {
                let y = GpuActPair::quantize(dev, upload(s + 3).unwrap()).unwrap();
                (upload(s).unwrap(), upload(s + 1).unwrap(), y)
            });
            let sets = data.len();
            let name = "add_rmsnorm_q8";
            common::bench_against_copy(group, dev, rows, "norm", name, n, bytes, |i| {
                let (h, o, y) = &mut data[i as usize % sets];
                add_rmsnorm_q8(dev, h, o, &w, 1e-6, y).unwrap();
            });
        }

        format!("norm, dim {DIM}, against a device copy of the same bytes")
    });
}
