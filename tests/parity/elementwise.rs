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

/// The per-kernel profile: every launch of the stretch is counted under its kernel's name, the
/// times are positive, and a stretch with profiling off yields nothing. A device of its own,
/// so that other tests' launches stay out of the profile.
#[test]
fn profile_counts_each_launch() {
    if gpu().is_none() {
        return;
    }
    let dev = &bitexact::Device::new(0).unwrap();
    let n = 1 << 20;
    let mut a = GpuTensor::from_host(dev, &values(1, n, 1.0, 0.0), &[n]).unwrap();
    let b = GpuTensor::from_host(dev, &values(2, n, 1.0, 0.0), &[n]).unwrap();
    let table = GpuTensor::from_host(dev, &values(3, 50 * 7, 1.0, 0.0), &[50, 7]).unwrap();
    let mut out = GpuTensor::from_host(dev, &poison(14), &[2, 7]).unwrap();
    assert!(dev.take_profile().unwrap().is_empty());
    dev.set_profiling(true);
    for _ in 0..3 {
        add(dev, &mut a, &b).unwrap();
    }
    gather_rows(dev, &table, &[1, 2], &mut out).unwrap();
    let prof = dev.take_profile().unwrap();
    let names: Vec<_> = prof.iter().map(|k| (k.name, k.launches)).collect();
    assert_eq!(prof.len(), 2, "{names:?}");
    let add_t = prof
        .iter()
        .find(|k| k.name == "add_f32")
        .expect("add profiled");
    assert_eq!(add_t.launches, 3);
    assert!(
        prof.iter()
            .any(|k| k.name == "gather_rows_f32" && k.launches == 1),
        "{names:?}"
    );
    assert!(prof.iter().all(|k| k.ms > 0.0), "{prof:?}");
    // Off again: the next stretch is not recorded.
    add(dev, &mut a, &b).unwrap();
    assert!(dev.take_profile().unwrap().is_empty());
}
