//! The FastScan KV-cache code: a fixed random-sign Hadamard rotation, one scalar Lloyd-Max
//! codebook per bit width for the rotated coordinates, an f16 norm per vector, and a tile
//! layout of 32 positions.
//!
//! Tile layout (`64 + 16 D` bytes, positions `32 τ .. 32 τ + 32` of one kv head):
//! - bytes `0..64`: the 32 norms, f16 little-endian, position `j` at `2 j`;
//! - then for each coordinate `d`, 16 bytes: byte `i` holds the code of position `i` in its low
//!   nibble and of position `i + 16` in its high nibble. 3-bit codes are nibbles with the top bit
//!   0, so one kernel serves both widths.
//!
//! This is the seed engine's K tile (32 norms, then per coordinate 16 bytes for positions
//! `b` and `b + 16`), used for K and V alike.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::error::{Error, Result};
use crate::init;

/// Positions per tile.
pub const TILE: usize = 32;

/// Head dims and bit widths FastScan supports.
pub const DIMS: [usize; 3] = [64, 128, 256];

/// A FastScan code: head dim, bits per coordinate and the rotation's seed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FastScanSpec {
    /// Head dim `D` (64, 128 or 256).
    pub d: usize,
    /// Bits per coordinate (3 or 4).
    pub bits: u32,
    /// Seed of the rotation's random signs.
    pub seed: u64,
}

impl FastScanSpec {
    /// Checks `d` and `bits`.
    pub fn new(d: usize, bits: u32, seed: u64) -> Result<Self> {
        if !DIMS.contains(&d) {
            return Err(Error::invalid(
                "FastScanSpec",
                format!("head dim {d} (supported: 64, 128, 256)"),
            ));
        }
        if !(3..=4).contains(&bits) {
            return Err(Error::invalid(
                "FastScanSpec",
                format!("{bits} bits (supported: 3, 4)"),
            ));
        }
        Ok(FastScanSpec { d, bits, seed })
    }

    /// Codebook levels (`2^bits`).
    pub fn levels(&self) -> usize {
        1 << self.bits
    }

    /// Bytes per tile of 32 positions.
    pub fn tile_bytes(&self) -> usize {
        2 * TILE + 16 * self.d
    }

    /// Bytes of a cache of `len` positions (whole tiles).
    pub fn cache_bytes(&self, len: usize) -> usize {
        len.div_ceil(TILE) * self.tile_bytes()
    }

    /// The rotation's signs, `±1.0` from `(seed, i)`.
    pub fn signs(&self) -> Vec<f32> {
        (0..self.d as u64)
            .map(|i| {
                if init::hash(self.seed, 0xfa57_5ca1, i) & 1 == 0 {
                    1.0
                } else {
                    -1.0
                }
            })
            .collect()
    }

    /// `1 / sqrt(D)` in f32.
    pub fn inv_sqrt_d(&self) -> f32 {
        1.0 / (self.d as f32).sqrt()
    }
}

/// A Lloyd-Max codebook for one coordinate of a rotated unit vector.
#[derive(Clone, Debug, PartialEq)]
pub struct Codebook {
    /// The `2^bits` reconstruction levels, increasing, as f32.
    pub centroids: Vec<f32>,
    /// The decision bounds between consecutive levels: `(c_j + c_{j+1}) * 0.5` in f32. A
    /// coordinate `y` gets the code `#{j : bounds[j] < y}` (a tie goes to the lower code).
    pub bounds: Vec<f32>,
    /// Mean squared error per coordinate, times `D`, reached by the f64 iteration (the
    /// distortion of a unit-variance coordinate).
    pub mse_times_d: f64,
}

/// The Lloyd-Max quantizer with `2^bits` levels for one coordinate of a uniformly random unit
/// vector in `D` dims after the rotation: density `∝ (1 - y²)^((D - 3) / 2)` on `[-1, 1]`.
/// Computed in f64 (trapezoid rule on 200,001 points over ±12 standard deviations, 400
/// iterations from a uniform start), then rounded to f32. For large `D` the distortion
/// approaches the Gaussian Lloyd-Max values, 0.03454 (3 bits) and 0.009497 (4 bits).
pub fn lloyd_max(d: usize, bits: u32) -> Codebook {
    let levels = 1usize << bits;
    let sd = 1.0 / (d as f64).sqrt();
    let span = (12.0 * sd).min(1.0);
    let n = 200_001;
    let ys: Vec<f64> = (0..n)
        .map(|i| -span + 2.0 * span * i as f64 / (n - 1) as f64)
        .collect();
    let h = 2.0 * span / (n - 1) as f64;
    let expo = (d as f64 - 3.0) / 2.0;
    let mut f: Vec<f64> = ys
        .iter()
        .map(|&y| (1.0 - y * y).max(0.0).powf(expo))
        .collect();
    let total: f64 = f.iter().sum::<f64>() * h;
    f.iter_mut().for_each(|v| *v /= total);
    let mut c: Vec<f64> = (0..levels)
        .map(|j| (-2.5 + 5.0 * j as f64 / (levels - 1) as f64) * sd)
        .collect();
    // The points are sorted, so each pass walks them once with the cell index.
    let cells = |c: &[f64]| -> Vec<usize> {
        let t: Vec<f64> = c.windows(2).map(|w| (w[0] + w[1]) * 0.5).collect();
        let mut j = 0;
        ys.iter()
            .map(|&y| {
                while j < t.len() && t[j] < y {
                    j += 1;
                }
                j
            })
            .collect()
    };
    let weight = |i: usize| if i == 0 || i == n - 1 { 0.5 } else { 1.0 };
    for _ in 0..400 {
        let mut num = vec![0.0f64; levels];
        let mut den = vec![0.0f64; levels];
        for (i, j) in cells(&c).into_iter().enumerate() {
            num[j] += weight(i) * ys[i] * f[i];
            den[j] += weight(i) * f[i];
        }
        for j in 0..levels {
            if den[j] > 0.0 {
                c[j] = num[j] / den[j];
            }
        }
    }
    let mse: f64 = cells(&c)
        .into_iter()
        .enumerate()
        .map(|(i, j)| {
            let e = ys[i] - c[j];
            weight(i) * e * e * f[i] * h
        })
        .sum();
    let centroids: Vec<f32> = c.iter().map(|&v| v as f32).collect();
    let bounds = centroids.windows(2).map(|w| (w[0] + w[1]) * 0.5).collect();
    Codebook {
        centroids,
        bounds,
        mse_times_d: mse * d as f64,
    }
}

/// The codebook of `(d, bits)`: [`lloyd_max`], computed once per process.
pub fn codebook(d: usize, bits: u32) -> Codebook {
    static CACHE: Mutex<BTreeMap<(usize, u32), Codebook>> = Mutex::new(BTreeMap::new());
    let mut map = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    map.entry((d, bits))
        .or_insert_with(|| lloyd_max(d, bits))
        .clone()
}

/// Byte offset of position `pos`'s norm in a cache, and of coordinate `d`'s code byte.
pub fn norm_at(spec: &FastScanSpec, pos: usize) -> usize {
    (pos / TILE) * spec.tile_bytes() + 2 * (pos % TILE)
}

/// Byte holding coordinate `d` of position `pos` (nibble `(pos % 32) / 16`).
pub fn code_at(spec: &FastScanSpec, pos: usize, d: usize) -> usize {
    (pos / TILE) * spec.tile_bytes() + 2 * TILE + 16 * d + (pos % 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lloyd_max_reaches_the_gaussian_distortion() {
        for (bits, gauss) in [(3, 0.03454), (4, 0.009497)] {
            for d in DIMS {
                let cb = lloyd_max(d, bits);
                let rel = (cb.mse_times_d - gauss) / gauss;
                println!(
                    "D={d} bits={bits}: mse*D = {:.6} (Gaussian Lloyd-Max {gauss})",
                    cb.mse_times_d
                );
                assert!(rel.abs() < 0.05, "D={d} bits={bits}: {rel}");
                assert!(cb.centroids.windows(2).all(|w| w[0] < w[1]));
                let (lo, hi) = (cb.centroids[0], cb.centroids[cb.centroids.len() - 1]);
                assert!((lo + hi).abs() < 1e-3 * hi, "not symmetric: {lo} {hi}");
            }
        }
    }
}
