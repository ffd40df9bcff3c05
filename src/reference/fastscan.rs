//! Reference for `cuda/fastscan.cu`: encoding vectors into the FastScan cache, and causal
//! attention of a query over an encoded K and V cache.
//!
//! The order of every operation:
//! - Rotation `R x = (1/sqrt D) H S x`: multiply by the signs `S` (exact), then the fast
//!   Walsh-Hadamard transform in one butterfly order (`h = 1, 2, 4, ..`; for each pair
//!   `(j, j + h)` with bit `h` of `j` clear, `a = x[j]`, `b = x[j + h]`, `x[j] = a + b`,
//!   `x[j + h] = a - b`), then multiply by `1/sqrt D`. Inverse `R^T y`: the transform, the scale,
//!   then the signs.
//! - Encode: `norm = sqrt(dot(x, x))` (the canonical 4-partial dot), stored as f16 (round to
//!   nearest even; a NaN norm as `0x7e00`); `y = R x` times `inv = 1 / norm` (0 when the norm is 0 or not finite);
//!   code `= #{j : bounds[j] < y_d}`.
//! - Scores of query `q` at position `t`, positions `p = 0..=t`: `qr = R q`; table
//!   `T[d][c] = qr[d] * centroid[c]`.
//!   - f32 tables: `raw = Σ_d T[d][code(p, d)]` as 4 partials over 32-dim blocks (block `β`
//!     feeds partial `β % 4`, adds in increasing `d` from +0), `(p0 + p1) + (p2 + p3)`;
//!   - int8 tables: `s = max |T| / 127`, `L = clamp(round_ties_even(T / s), -127, 127)` (0 when
//!     `s = 0`), `raw = (Σ_d L[d][code]) * s` (exact integer sum, one rounding).
//!
//!   `score = (raw * norm_p) * (1 / sqrt D)`.
//! - Softmax and values ([`combine`]), over chunks of [`CHUNK`] positions (8 tiles) so that
//!   the GPU can give each chunk its own block while the order stays one:
//!   - `m = fmax` of the scores from `-inf`; `e_p = exp(s_p - m)` (our fma `exp`);
//!   - per chunk, `esum_c`: 32 lane partials over the chunk's `p ≡ l (mod 32)` in increasing
//!     `p` (adds from +0), then [`butterfly_sum`]; `S = Σ_c esum_c` in chunk order from +0;
//!   - weights `w_p = e_p * vnorm_p` (the softmax's division comes last, once per output);
//!   - per tile `τ` and coordinate `d`, `a_τ[d]`: f32 mode, `fma(w_p, centroid[code], a)` in
//!     position order from +0; int8 mode (the seed's fast mode), `ws = max |w| / 127` over the
//!     tile, `cs = max |centroid| / 127`, `a = (ws * cs) * Σ q8(w_p, ws) * q8(centroid, cs)`
//!     (exact integer sum, `q8` as for the tables);
//!   - `V_c[d] = Σ_τ a_τ[d]` over the chunk's tiles in order from +0, `out_rot[d] =
//!     (Σ_c V_c[d]) / S` in chunk order from +0.
//! - `out = canon(R^T out_rot)`.
//!
//! The f16-KV baseline ([`attend_f16`]) is the same attention on uncompressed keys and values:
//! `s_p = dot(q, k_p) * (1 / sqrt D)` ([`dot_f32`] on the f16 values widened), the same
//! softmax and chunks, `a_τ[d] = fma(e_p, v_p[d], a)` in position order, no rotation.

use half::f16;

use crate::math::{butterfly_sum, canon, exp, LANES};
use crate::quant::fastscan::{code_at, codebook, norm_at, Codebook, FastScanSpec, TILE};
use crate::reference::gemm::dot_f32;

/// How query scores are formed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScoreMode {
    /// An int8 table per query with one scale (the seed's FastScan).
    Int8,
    /// An f32 table: less quantization error.
    F32,
}

/// How values are aggregated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueMode {
    /// f32 weights and codebook, fma per position.
    F32,
    /// The seed's fast mode: int8 weights per tile, exact integer sums.
    Int8,
}

/// The butterfly transform in place (length a power of two).
pub fn fwht(x: &mut [f32]) {
    let n = x.len();
    let mut h = 1;
    while h < n {
        for i in (0..n).step_by(2 * h) {
            for j in i..i + h {
                let (a, b) = (x[j], x[j + h]);
                x[j] = a + b;
                x[j + h] = a - b;
            }
        }
        h *= 2;
    }
}

/// `R x`.
pub fn rotate(spec: &FastScanSpec, x: &[f32]) -> Vec<f32> {
    let mut y: Vec<f32> = x.iter().zip(spec.signs()).map(|(&v, s)| v * s).collect();
    fwht(&mut y);
    let k = spec.inv_sqrt_d();
    y.iter_mut().for_each(|v| *v *= k);
    y
}

/// `R^T y`.
pub fn unrotate(spec: &FastScanSpec, y: &[f32]) -> Vec<f32> {
    let mut x = y.to_vec();
    fwht(&mut x);
    let k = spec.inv_sqrt_d();
    x.iter_mut()
        .zip(spec.signs())
        .for_each(|(v, s)| *v = (*v * k) * s);
    x
}

/// Encodes `x: [n, D]` into positions `pos0..pos0 + n` of `cache` (one kv head, whole tiles).
pub fn encode(spec: &FastScanSpec, cb: &Codebook, cache: &mut [u8], x: &[f32], pos0: usize) {
    let d = spec.d;
    for (i, v) in x.chunks(d).enumerate() {
        let pos = pos0 + i;
        let norm = dot_f32(v, v).sqrt();
        let inv = if norm > 0.0 && norm.is_finite() {
            1.0 / norm
        } else {
            0.0
        };
        let r = rotate(spec, v);
        let at = norm_at(spec, pos);
        cache[at..at + 2].copy_from_slice(&f16_bits(norm).to_le_bytes());
        let shift = 4 * ((pos % TILE) / 16);
        for (dd, &rv) in r.iter().enumerate() {
            let y = rv * inv;
            let code = cb.bounds.iter().filter(|&&b| b < y).count() as u8;
            let byte = &mut cache[code_at(spec, pos, dd)];
            *byte = (*byte & !(0xF << shift)) | (code << shift);
        }
    }
}

/// The f16 bits the family stores a float as (a code's norm, an f16 cache's keys and values):
/// round to nearest even, NaN as `0x7e00` (the payload a conversion keeps differs between the
/// CPU and the GPU).
pub fn f16_bits(x: f32) -> u16 {
    if x.is_nan() {
        0x7e00
    } else {
        f16::from_f32(x).to_bits()
    }
}

fn code(spec: &FastScanSpec, cache: &[u8], pos: usize, d: usize) -> usize {
    ((cache[code_at(spec, pos, d)] >> (4 * ((pos % TILE) / 16))) & 0xF) as usize
}

fn norm(spec: &FastScanSpec, cache: &[u8], pos: usize) -> f32 {
    let at = norm_at(spec, pos);
    f16::from_le_bytes([cache[at], cache[at + 1]]).to_f32()
}

/// `round_ties_even(v / s)` clamped to ±127 (0 when `s` is 0 or the quotient NaN).
fn q8(v: f32, s: f32) -> i32 {
    if s == 0.0 {
        return 0;
    }
    let r = (v / s).round_ties_even();
    if r.is_nan() {
        0
    } else {
        r.clamp(-127.0, 127.0) as i32
    }
}

/// Positions per chunk of the softmax and value sums (8 tiles).
pub const CHUNK: usize = 256;

/// Softmax of `scores` (one query, positions `0..scores.len()`) and the weighted value sum:
/// returns `out_rot` (before any rotation), in [the order above](self). `vnorm(p)` scales
/// position `p`'s weight; `tile(τ, w)` returns the tile's `D` partials `a_τ` from the weights
/// `w` of its positions `32 τ ..`.
pub fn combine(
    scores: &[f32],
    d: usize,
    vnorm: impl Fn(usize) -> f32,
    tile: impl Fn(usize, &[f32]) -> Vec<f32>,
) -> Vec<f32> {
    let n = scores.len();
    let m = scores.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let e: Vec<f32> = scores.iter().map(|&x| exp(x - m)).collect();
    let w: Vec<f32> = e.iter().enumerate().map(|(p, &x)| x * vnorm(p)).collect();
    let mut sum = 0.0f32;
    let mut acc = vec![0.0f32; d];
    for c0 in (0..n).step_by(CHUNK) {
        let c1 = (c0 + CHUNK).min(n);
        let mut lanes = [0.0f32; LANES];
        for p in c0..c1 {
            lanes[p % LANES] += e[p];
        }
        sum += butterfly_sum(lanes);
        let mut vc = vec![0.0f32; d];
        for t0 in (c0..c1).step_by(TILE) {
            let a = tile(t0 / TILE, &w[t0..(t0 + TILE).min(n)]);
            vc.iter_mut().zip(&a).for_each(|(v, &x)| *v += x);
        }
        acc.iter_mut().zip(&vc).for_each(|(v, &x)| *v += x);
    }
    acc.into_iter().map(|x| x / sum).collect()
}

/// Scores of one query head `q: [D]` (unrotated) at position `t` against positions `0..=t` of
/// one kv head's K cache.
pub fn scores(
    spec: &FastScanSpec,
    cb: &Codebook,
    q: &[f32],
    k: &[u8],
    t: usize,
    smode: ScoreMode,
) -> Vec<f32> {
    let d = spec.d;
    let levels = spec.levels();
    let qr = rotate(spec, q);
    let table: Vec<f32> = (0..d * levels)
        .map(|i| qr[i / levels] * cb.centroids[i % levels])
        .collect();
    let tmax = table.iter().fold(0.0f32, |m, &x| m.max(x.abs()));
    let ts = tmax / 127.0;
    let lut: Vec<i32> = table.iter().map(|&x| q8(x, ts)).collect();
    let scale = spec.inv_sqrt_d();
    (0..=t)
        .map(|p| {
            let raw = match smode {
                ScoreMode::F32 => {
                    let mut part = [0.0f32; 4];
                    for dd in 0..d {
                        part[(dd / 32) % 4] += table[dd * levels + code(spec, k, p, dd)];
                    }
                    (part[0] + part[1]) + (part[2] + part[3])
                }
                ScoreMode::Int8 => {
                    let isum: i32 = (0..d)
                        .map(|dd| lut[dd * levels + code(spec, k, p, dd)])
                        .sum();
                    isum as f32 * ts
                }
            };
            (raw * norm(spec, k, p)) * scale
        })
        .collect()
}

/// Attention of one query head `q: [D]` (unrotated) at position `t` over one kv head's K and
/// V caches; returns `[D]`.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    spec: &FastScanSpec,
    cb: &Codebook,
    q: &[f32],
    k: &[u8],
    v: &[u8],
    t: usize,
    smode: ScoreMode,
    vmode: ValueMode,
) -> Vec<f32> {
    let d = spec.d;
    let s = scores(spec, cb, q, k, t, smode);
    let cmax = cb.centroids.iter().fold(0.0f32, |m, &x| m.max(x.abs()));
    let cs = cmax / 127.0;
    let cq: Vec<i32> = cb.centroids.iter().map(|&c| q8(c, cs)).collect();
    let tile = |tau: usize, w: &[f32]| -> Vec<f32> {
        let ps = || (0..w.len()).map(|i| (i, tau * TILE + i));
        (0..d)
            .map(|dd| match vmode {
                ValueMode::F32 => ps().fold(0.0f32, |a, (i, p)| {
                    w[i].mul_add(cb.centroids[code(spec, v, p, dd)], a)
                }),
                ValueMode::Int8 => {
                    let ws = w.iter().fold(0.0f32, |m, &x| m.max(x.abs())) / 127.0;
                    let isum: i32 = ps()
                        .map(|(i, p)| q8(w[i], ws) * cq[code(spec, v, p, dd)])
                        .sum();
                    (ws * cs) * isum as f32
                }
            })
            .collect()
    };
    let out_rot = combine(&s, d, |p| norm(spec, v, p), tile);
    unrotate(spec, &out_rot).into_iter().map(canon).collect()
}

/// The f16-KV baseline: one query head `q: [D]` at position `t` over `k, v: [cap, D]` (f16
/// bits) of one kv head; returns `[D]`.
pub fn attend_f16(q: &[f32], k: &[u16], v: &[u16], t: usize, d: usize) -> Vec<f32> {
    let widen = |x: &[u16]| -> Vec<f32> { x.iter().map(|&b| f16::from_bits(b).to_f32()).collect() };
    let scale = 1.0 / (d as f32).sqrt();
    let s: Vec<f32> = (0..=t)
        .map(|p| dot_f32(q, &widen(&k[p * d..(p + 1) * d])) * scale)
        .collect();
    let tile = |tau: usize, w: &[f32]| -> Vec<f32> {
        let rows: Vec<Vec<f32>> = (0..w.len())
            .map(|i| widen(&v[(tau * TILE + i) * d..][..d]))
            .collect();
        (0..d)
            .map(|dd| {
                w.iter()
                    .zip(&rows)
                    .fold(0.0f32, |a, (&wi, r)| wi.mul_add(r[dd], a))
            })
            .collect()
    };
    combine(&s, d, |_| 1.0, tile)
        .into_iter()
        .map(canon)
        .collect()
}

/// One layer's FastScan K and V caches on the CPU: per kv head `cache_bytes(cap)` bytes each,
/// positions `0..len` written.
#[derive(Clone, Debug)]
pub struct CpuCache {
    /// The code.
    pub spec: FastScanSpec,
    /// Its codebook.
    pub cb: Codebook,
    /// KV heads.
    pub n_kv: usize,
    /// Positions the cache holds (a multiple of 32).
    pub cap: usize,
    /// Positions written.
    pub len: usize,
    /// Per kv head, the K tiles.
    pub k: Vec<Vec<u8>>,
    /// Per kv head, the V tiles.
    pub v: Vec<Vec<u8>>,
}

impl CpuCache {
    /// An empty cache of at least `cap` positions (zeroed bytes).
    pub fn new(spec: FastScanSpec, n_kv: usize, cap: usize) -> Self {
        let cap = cap.next_multiple_of(TILE);
        let bytes = spec.cache_bytes(cap);
        CpuCache {
            spec,
            cb: codebook(spec.d, spec.bits),
            n_kv,
            cap,
            len: 0,
            k: vec![vec![0; bytes]; n_kv],
            v: vec![vec![0; bytes]; n_kv],
        }
    }

    /// Encodes `k, v: [n, n_kv, D]` at positions `len..len + n`.
    ///
    /// # Panics
    /// If the shapes do not match or the cache would overflow.
    pub fn append(&mut self, k: &[f32], v: &[f32]) {
        let (d, n_kv) = (self.spec.d, self.n_kv);
        let n = k.len() / (n_kv * d);
        assert!(
            k.len() == n * n_kv * d && v.len() == k.len(),
            "CpuCache::append: shapes"
        );
        assert!(
            self.len + n <= self.cap,
            "CpuCache::append: past the capacity"
        );
        for h in 0..n_kv {
            let rows = |x: &[f32]| -> Vec<f32> {
                (0..n)
                    .flat_map(|i| x[(i * n_kv + h) * d..][..d].to_vec())
                    .collect()
            };
            encode(&self.spec, &self.cb, &mut self.k[h], &rows(k), self.len);
            encode(&self.spec, &self.cb, &mut self.v[h], &rows(v), self.len);
        }
        self.len += n;
    }

    /// Attention of `q: [nq, n_heads, D]`, query `i` at position `qpos[i] < len`; returns
    /// `[nq, n_heads, D]`. Head `h` reads kv head `h / (n_heads / n_kv)`.
    pub fn attention(
        &self,
        q: &[f32],
        qpos: &[u32],
        n_heads: usize,
        smode: ScoreMode,
        vmode: ValueMode,
    ) -> Vec<f32> {
        let d = self.spec.d;
        let mut out = Vec::with_capacity(q.len());
        for (i, &t) in qpos.iter().enumerate() {
            assert!(
                (t as usize) < self.len,
                "CpuCache::attention: position past the cache"
            );
            for h in 0..n_heads {
                let kvh = h / (n_heads / self.n_kv);
                let qh = &q[(i * n_heads + h) * d..][..d];
                out.extend(attend(
                    &self.spec,
                    &self.cb,
                    qh,
                    &self.k[kvh],
                    &self.v[kvh],
                    t as usize,
                    smode,
                    vmode,
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(a: &[f32], b: &[f32]) -> f32 {
        let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
        (num / b.iter().map(|y| y * y).sum::<f32>()).sqrt()
    }

    #[test]
    fn rotation_is_orthogonal() {
        let spec = FastScanSpec::new(128, 4, 7).unwrap();
        let x: Vec<f32> = (0..128).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
        let back = unrotate(&spec, &rotate(&spec, &x));
        assert!(rel(&back, &x) < 1e-6);
        let n = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        assert!((n(&rotate(&spec, &x)) / n(&x) - 1.0).abs() < 1e-5);
    }

    /// One position: the output is the decoded value, within the codebook's distortion; and
    /// the scores follow the exact dot products.
    #[test]
    fn attention_approximates_the_exact_one() {
        for bits in [3, 4] {
            let spec = FastScanSpec::new(64, bits, 3).unwrap();
            let mut c = CpuCache::new(spec, 1, 40);
            let k: Vec<f32> = (0..40 * 64)
                .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
                .collect();
            let v: Vec<f32> = (0..40 * 64)
                .map(|i| ((i * 104_729) % 997) as f32 / 498.5 - 1.0)
                .collect();
            c.append(&k, &v);
            let q = &k[5 * 64..6 * 64];
            for (sm, vm) in [
                (ScoreMode::Int8, ValueMode::Int8),
                (ScoreMode::F32, ValueMode::F32),
            ] {
                let out = c.attention(q, &[0], 1, sm, vm);
                let bound = if bits == 4 { 0.15 } else { 0.3 };
                assert!(
                    rel(&out, &v[..64]) < bound,
                    "bits {bits}: {}",
                    rel(&out, &v[..64])
                );
                let s = scores(&spec, &c.cb, q, &c.k[0], 39, sm);
                let exact: Vec<f32> = (0..40)
                    .map(|p| dot_f32(q, &k[p * 64..(p + 1) * 64]) / 8.0)
                    .collect();
                assert!(
                    rel(&s, &exact) < bound,
                    "scores, bits {bits}: {}",
                    rel(&s, &exact)
                );
            }
        }
    }
}
