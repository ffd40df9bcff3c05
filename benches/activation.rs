//! Bench of the activation family (`cuda/activation.cu`) at the 30B expert shape (ffn 768):
//! `swiglu_halves_q8`, SwiGLU of each routed row's [gate | up] halves with the down
//! product's Q8 input written beside it, over 8 routed rows (one decode token, top-8) to 16,384
//! (a 2048-token prefill).
//!
//! Napkin math: per output element 8 bytes read (gate and up), 4 written (f32), 1 code and
//! 8 / 32 bytes of scales: 13.25 bytes. Memory-bound: the ceiling is a device copy of the same
//! bytes in the same run.

mod common;

use bitexact::kernels::activation::swiglu_halves_q8;
use bitexact::kernels::quantize::GpuActPair;
use bitexact::GpuTensor;

const FFN: usize = 768;
const ROWS: [usize; 4] = [8, 512, 4096, 16_384];

fn main() {
    common::run_family("activation", |dev, group, rows| {
        for &r in &ROWS {
            let len = r * FFN;
            let bytes = 12 * len + len + len / 4;
            let mut data = common::rotated(bytes, |s| {
                let out = GpuActPair::quantize(dev, GpuTensor::zeros(dev, &[r, FFN]).unwrap());
                let gu = GpuTensor::from_host(dev, &common::vals(2 * len, s), &[r, 2 * FFN]);
                (gu.unwrap(), out.unwrap())
            });
            let sets = data.len();
            let name = "swiglu_halves_q8";
            common::bench_against_copy(group, dev, rows, "activation", name, r, bytes, |i| {
                let (gu, out) = &mut data[i as usize % sets];
                swiglu_halves_q8(dev, gu, out).unwrap();
            });
        }

        format!("swiglu_halves_q8, ffn {FFN}, against a device copy of the same bytes")
    });
}
