//! `add`, `gather_rows`: GPU == CPU reference.

use bitexact::kernels::elementwise::{add, gather_rows};
use bitexact::{reference, Error, GpuTensor};

use crate::common::{assert_bits_eq, gpu, poison, values};

#[test]
fn add_and_gather_match_reference() {
    let Some(dev) = gpu() else { return };
    for n in [1usize, 31, 1000, 100_003] {
        let a = values(n as u64, n, 4.0, 0.05);
        let b = values(n as u64 ^ 3, n, 4.0, 0.05);
        let mut want = a.clone();
        reference::elementwise::add(&mut want, &b);
        let mut ga = GpuTensor::from_host(dev, &a, &[n]).unwrap();
        add(dev, &mut ga, &GpuTensor::from_host(dev, &b, &[n]).unwrap()).unwrap();
        assert_bits_eq("add", &ga.to_host().unwrap(), &want);
    }
    let table = values(1, 50 * 7, 1.0, 0.0);
    let ids = [3u32, 0, 49, 3];
    let t = GpuTensor::from_host(dev, &table, &[50, 7]).unwrap();
    let mut out = GpuTensor::from_host(dev, &poison(28), &[4, 7]).unwrap();
    gather_rows(dev, &t, &ids, &mut out).unwrap();
    assert_bits_eq(
        "gather",
        &out.to_host().unwrap(),
        &reference::elementwise::gather_rows(&table, &ids, 7),
    );
    let mut out2 = GpuTensor::from_host(dev, &poison(14), &[2, 7]).unwrap();
    assert!(matches!(
        gather_rows(dev, &t, &[1, 50], &mut out2),
        Err(Error::IndexOutOfRange { .. })
    ));
    assert_bits_eq("untouched", &out2.to_host().unwrap(), &poison(14));
}
