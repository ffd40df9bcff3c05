//! Bench of the quantize family (`cuda/quantize.cu`): `quantize_act`, the per-32 Q8 codes of
//! an activation row (the input of every quantized product), at the 30B shape (dim 2048) over
//! 1 (decode) to 2048 (prefill) rows.
//!
//! Napkin math: reads x (4 bytes an element), writes a code (1 byte) and per 32 elements a
//! scale and a sum (8 bytes): 5.25 bytes an element. Memory-bound: the ceiling is a device
//! copy of the same bytes in the same run.

mod common;

use bitexact::kernels::quantize::quantize_act;
use bitexact::GpuTensor;

const DIM: usize = 2048;
const ROWS: [usize; 4] = [1, 8, 512, 2048];

fn main() {
    common::run_family("quantize", |dev, group, rows| {
        for &n in &ROWS {
            let len = n * DIM;
            let bytes = 4 * len + len + len / 4;
            let data = common::rotated(bytes, |s| {
                GpuTensor::from_host(dev, &common::vals(len, s), &[n, DIM]).unwrap()
            });
            let sets = data.len();
            common::bench_against_copy(
                group,
                dev,
                rows,
                "quantize",
                "quantize_act",
                n,
                bytes,
                |i| {
                    quantize_act(dev, &data[i as usize % sets]).unwrap();
                },
            );
        }

        format!("quantize, dim {DIM}, against a device copy of the same bytes")
    });
}
