//! Deterministic synthetic weights: every value is a pure function of `(seed, tensor, index)`,
//! so any device (or any thread) can generate any slice of any tensor on its own.

/// SplitMix64's finaliser: a bijective 64-bit mix.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The 64-bit hash of `(seed, tensor, index)`.
#[inline]
pub fn hash(seed: u64, tensor: u64, index: u64) -> u64 {
    mix64(mix64(mix64(seed) ^ tensor.wrapping_mul(0x9e37_79b9_7f4a_7c15)) ^ index)
}

/// A value uniform on `[-1, 1)` in steps of `2^-23` (exact in f32): the top 24 bits of the
/// hash as a signed integer, times `2^-23`.
#[inline]
pub fn uniform(seed: u64, tensor: u64, index: u64) -> f32 {
    let h = (hash(seed, tensor, index) >> 40) as i32 - (1 << 23);
    h as f32 * f32::from_bits(0x3400_0000) // 2^-23
}

/// `len` values `uniform(seed, tensor, i) * scale` (one rounded multiply each), generated in
/// parallel.
pub fn fill(seed: u64, tensor: u64, len: usize, scale: f32) -> Vec<f32> {
    use rayon::prelude::*;
    (0..len as u64)
        .into_par_iter()
        .map(|i| uniform(seed, tensor, i) * scale)
        .collect()
}

/// The scale `1 / sqrt(fan_in)` that keeps a product's outputs near unit size.
pub fn fan_in_scale(fan_in: usize) -> f32 {
    1.0 / (fan_in.max(1) as f32).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_is_in_range_and_deterministic() {
        let v: Vec<f32> = (0..10_000).map(|i| uniform(7, 3, i)).collect();
        assert!(v.iter().all(|&x| (-1.0..1.0).contains(&x)));
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.05, "mean {mean}");
        assert_eq!(uniform(7, 3, 5).to_bits(), v[5].to_bits());
        assert_ne!(uniform(8, 3, 5).to_bits(), v[5].to_bits());
    }
}
