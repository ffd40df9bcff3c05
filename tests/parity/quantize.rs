//! `quantize_q8_32`: GPU == CPU reference for codes, scales and block sums, bit for bit.

use bitexact::kernels::quantize::quantize_act;
use bitexact::{reference, Error, GpuTensor};
use proptest::prelude::*;

use crate::common::{assert_bits_eq, gpu, gpu_cases, values};

fn case(x: &[f32], n: usize, k: usize, what: &str) {
    let Some(dev) = gpu() else { return };
    let want = reference::quantize::quantize_act(x, n, k);
    let xg = GpuTensor::from_host(dev, x, &[n, k]).unwrap();
    let got = quantize_act(dev, &xg).unwrap();
    assert_eq!(got.codes.to_host().unwrap(), want.codes, "{what}: codes");
    assert_bits_eq(&format!("{what}: d"), &got.d.to_host().unwrap(), &want.d);
    assert_bits_eq(&format!("{what}: a"), &got.a.to_host().unwrap(), &want.a);
}

proptest! {
    #![proptest_config(gpu_cases(48))]

    #[test]
    fn matches_reference(n in 1usize..=300, kb in 1usize..=16, seed in any::<u64>(), special in 0.0f64..0.05) {
        let k = 32 * kb;
        case(&values(seed, n * k, 8.0, special), n, k, &format!("n={n} k={k} seed={seed}"));
    }
}

#[test]
fn edge_blocks() {
    let mut x = vec![0.0f32; 32 * 8];
    // Block 1: one subnormal (d underflows to 0); block 2: ties at .5; block 3: -0 only;
    // block 4: one NaN; block 5: huge values; block 6: one infinity; block 7: min/max mix.
    x[32] = f32::from_bits(3);
    for (i, v) in x[64..96].iter_mut().enumerate() {
        *v = (i as f32 - 16.0) * 0.5;
    }
    x[96..128].fill(-0.0);
    x[128] = f32::NAN;
    x[160..192].fill(3.0e38);
    x[192] = f32::NEG_INFINITY;
    x[224] = f32::MAX;
    x[225] = f32::MIN_POSITIVE;
    case(&x, 1, 256, "edge blocks");
}

#[test]
fn k_must_be_a_multiple_of_32() {
    let Some(dev) = gpu() else { return };
    let x = GpuTensor::from_host(dev, &[1.0f32; 40], &[1, 40]).unwrap();
    assert!(matches!(
        quantize_act(dev, &x),
        Err(Error::InvalidArgument { .. })
    ));
}
