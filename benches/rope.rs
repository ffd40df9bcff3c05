//! Bench of the rope family (`cuda/rope.cu`): `rope_neox` in place on the 30B shape's queries
//! (32 heads of 128, every dim rotated) over 1 (decode) to 2048 (prefill) rows.
//!
//! Napkin math: reads and writes x (8 bytes an element) and reads the table's cos and sin
//! (cached: a position's row serves every head). Memory-bound: the ceiling is a device copy of
//! the same bytes in the same run.

mod common;

use bitexact::kernels::rope::{rope_neox, Positions, RopeTable};
use bitexact::GpuTensor;

const HEADS: usize = 32;
const HD: usize = 128;
const ROWS: [usize; 4] = [1, 8, 512, 2048];

fn main() {
    common::run_family("rope", |dev, group, rows| {
        let table = RopeTable::new(dev, 4096, HD, 1e7).unwrap();
        for &n in &ROWS {
            let len = n * HEADS * HD;
            let bytes = 8 * len;
            let sets = common::rotation(bytes);
            let mut data: Vec<GpuTensor<f32>> = (0..sets)
                .map(|s| GpuTensor::from_host(dev, &common::vals(len, s), &[n, HEADS, HD]).unwrap())
                .collect();
            let pos: Vec<u32> = (0..n as u32).map(|p| p + 100).collect();
            let pos = Positions::new(dev, &pos).unwrap();
            common::bench_against_copy(group, dev, rows, "rope", "rope_neox", n, bytes, |i| {
                rope_neox(dev, &mut data[i as usize % sets], &pos, &table).unwrap();
            });
        }

        format!("rope, {HEADS} heads of {HD}, against a device copy of the same bytes")
    });
}
