//! `rope_neox`: GPU == CPU reference, bit for bit, full and partial rotary dims.

use bitexact::kernels::rope::{rope_neox, Positions, RopeTable};
use bitexact::{reference, Error, GpuTensor};
use proptest::prelude::*;

use crate::common::{assert_bits_eq, gpu, gpu_cases, values};

proptest! {
    #![proptest_config(gpu_cases(32))]

    #[test]
    fn matches_reference(
        rows in 1usize..=200, heads in 1usize..=8, hd4 in 1usize..=64, partial in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let Some(dev) = gpu() else { return Ok(()) };
        let hd = 4 * hd4;
        let rd = if partial { 2 * (hd4.max(2) / 2) } else { hd };
        let max_pos = 9000;
        let pos: Vec<u32> = (0..rows as u32).map(|i| (i * 37 + seed as u32 % 1000) % max_pos as u32).collect();
        let xh = values(seed, rows * heads * hd, 4.0, 0.01);
        let (cos, sin) = reference::rope::rope_table(max_pos, rd, 1e7);
        let mut want = xh.clone();
        reference::rope::rope_neox(&mut want, &pos, &cos, &sin, heads, hd, rd / 2);
        let table = RopeTable::new(dev, max_pos, rd, 1e7).unwrap();
        let p = Positions::new(dev, &pos).unwrap();
        let mut x = GpuTensor::from_host(dev, &xh, &[rows, heads, hd]).unwrap();
        rope_neox(dev, &mut x, &p, &table).unwrap();
        assert_bits_eq(&format!("rope rows={rows} heads={heads} hd={hd} rd={rd}"), &x.to_host().unwrap(), &want);
    }
}

#[test]
fn positions_past_the_table_are_refused() {
    let Some(dev) = gpu() else { return };
    let table = RopeTable::new(dev, 16, 8, 1e4).unwrap();
    let p = Positions::new(dev, &[3, 16]).unwrap();
    let host = vec![1.0f32; 2 * 8];
    let mut x = GpuTensor::from_host(dev, &host, &[2, 1, 8]).unwrap();
    assert!(matches!(
        rope_neox(dev, &mut x, &p, &table),
        Err(Error::IndexOutOfRange { .. })
    ));
    assert_bits_eq("untouched", &x.to_host().unwrap(), &host);
}
