//! Bench of the elementwise family (`cuda/elementwise.cu`) at the 30B shape (dim 2048): the
//! residual `add` and the embedding's `gather_rows` (rows of a 151,936 x 2048 table), over 1 to
//! 2048 rows.
//!
//! Napkin math: add reads two and writes one float an element (12 bytes); gather_rows reads a
//! table row and writes it (8 bytes an element; the ids are noise). Memory-bound: the ceiling
//! is a device copy of the same bytes in the same run.

mod common;

use bitexact::kernels::elementwise::{add, gather_rows};
use bitexact::GpuTensor;

const DIM: usize = 2048;
const VOCAB: usize = 151_936;
const ROWS: [usize; 4] = [1, 8, 512, 2048];

fn main() {
    common::run_family("elementwise", |dev, group, rows| {
        let table =
            GpuTensor::from_host(dev, &common::vals(VOCAB * DIM, 5), &[VOCAB, DIM]).unwrap();
        for &n in &ROWS {
            let len = n * DIM;
            let bytes = 12 * len;
            let upload = |salt| GpuTensor::from_host(dev, &common::vals(len, salt), &[n, DIM]);
            let mut data = common::rotated(bytes, |s| (upload(s).unwrap(), upload(s + 9).unwrap()));
            let sets = data.len();
            common::bench_against_copy(group, dev, rows, "elementwise", "add", n, bytes, |i| {
                let (a, o) = &mut data[i as usize % sets];
                add(dev, a, o).unwrap();
            });

            // Spread ids: every row a different part of the table (the upload of the ids is part
            // of the call, as in a prefill).
            let ids: Vec<u32> = (0..n as u32).map(|i| (i * 7_919) % VOCAB as u32).collect();
            let bytes = 8 * len;
            let mut out = GpuTensor::zeros(dev, &[n, DIM]).unwrap();
            let name = "gather_rows (ids uploaded)";
            common::bench_against_copy(group, dev, rows, "elementwise", name, n, bytes, |_| {
                gather_rows(dev, &table, &ids, &mut out).unwrap();
            });
        }

        format!("elementwise, dim {DIM}, against a device copy of the same bytes")
    });
}
