//! Reference for the attention kernels (`cuda/attention.cu`): causal grouped-query attention
//! over a KV cache, in chunks of [`CHUNK`] positions folded left to right.
//!
//! The order is a function of the query's position `t` and the keys alone. Prefill walks the
//! chunks of a tile of queries in one block, decode spreads a query's chunks over many blocks
//! and folds their partials in a second launch; both perform exactly the operations below, so
//! a query gets the same bits in a prefill of any length, in any chunk, or decoded on its own.

use crate::math::{canon, exp};
use crate::reference::gemm::dot_f32;

/// Positions per chunk: chunk `c` holds cache rows `c * CHUNK .. (c + 1) * CHUNK`.
pub const CHUNK: usize = 64;

/// Lane partials of a chunk's softmax denominator (row `j` of the chunk feeds partial `j % 4`).
pub const SUM_PARTIALS: usize = 4;

/// The attention scale `1 / sqrt(hd)`, in f32.
pub fn scale(hd: usize) -> f32 {
    1.0 / (hd as f32).sqrt()
}

/// What one chunk contributes to one query head: its score maximum `m`, its denominator `l`
/// and its unnormalised output `o: [hd]`.
#[derive(Clone, Debug, PartialEq)]
pub struct ChunkPartial {
    /// `fmax` of the chunk's scores.
    pub m: f32,
    /// Sum of `exp(s_j - m)` over the chunk.
    pub l: f32,
    /// `sum_j exp(s_j - m) * v_j`.
    pub o: Vec<f32>,
}

/// Chunk partial of query `q: [hd]` over cache rows `j0..j1` of one kv head (`k, v: [cap, hd]`,
/// `j0 < j1`, all rows in one chunk). The order:
///
/// 1. `s_j = dot_f32(q, k_j) * scale` (the canonical dot of [`dot_f32`], then one rounded
///    multiply).
/// 2. `m = fmax` over the chunk's `s_j`, from `-inf`; `e_j = exp(s_j - m)`.
/// 3. `l = (l0 + l1) + (l2 + l3)`, where `l_p` adds, from `+0` in increasing `j`, the `e_j`
///    with `(j - j0) % 4 == p`.
/// 4. `o[d]`: an fma chain from `+0` in increasing `j`: `o = fma(e_j, v_j[d], o)`.
pub fn chunk_partial(q: &[f32], k: &[f32], v: &[f32], j0: usize, j1: usize) -> ChunkPartial {
    let hd = q.len();
    let sc = scale(hd);
    let s: Vec<f32> = (j0..j1)
        .map(|j| dot_f32(q, &k[j * hd..(j + 1) * hd]) * sc)
        .collect();
    let m = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let e: Vec<f32> = s.iter().map(|&x| exp(x - m)).collect();
    let mut lanes = [0.0f32; SUM_PARTIALS];
    for (i, &x) in e.iter().enumerate() {
        lanes[i % SUM_PARTIALS] += x;
    }
    let l = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
    let o = (0..hd)
        .map(|d| {
            e.iter()
                .enumerate()
                .fold(0.0f32, |o, (i, &ej)| ej.mul_add(v[(j0 + i) * hd + d], o))
        })
        .collect();
    ChunkPartial { m, l, o }
}

/// The running state of the left-to-right fold over chunks: the prefix maximum `m`, the
/// denominator `l` and the output `o: [hd]` (all relative to `m`).
#[derive(Clone, Debug, PartialEq)]
pub struct FoldState(pub ChunkPartial);

impl FoldState {
    /// The state after chunk 0: its partial, unchanged.
    pub fn start(first: ChunkPartial) -> Self {
        FoldState(first)
    }

    /// Folds the next chunk's partial `p` in:
    /// `m' = fmax(m, p.m)`, `a = exp(m - m')`, `b = exp(p.m - m')`,
    /// `l = fma(l, a, p.l * b)`, `o[d] = fma(o[d], a, p.o[d] * b)`.
    pub fn fold(&mut self, p: &ChunkPartial) {
        let s = &mut self.0;
        let m2 = s.m.max(p.m);
        let a = exp(s.m - m2);
        let b = exp(p.m - m2);
        s.l = s.l.mul_add(a, p.l * b);
        for (o, &po) in s.o.iter_mut().zip(&p.o) {
            *o = o.mul_add(a, po * b);
        }
        s.m = m2;
    }

    /// The output `canon(o[d] / l)`.
    pub fn finish(&self) -> Vec<f32> {
        self.0.o.iter().map(|&o| canon(o / self.0.l)).collect()
    }
}

/// One query head `q: [hd]` at position `t` against cache rows `0..=t` of one kv head
/// (`k, v: [cap, hd]`): the [`chunk_partial`] of every chunk `c = 0..=t / CHUNK` (the last one
/// cut at row `t`), folded left to right by [`FoldState`], then [`FoldState::finish`].
pub fn attend(q: &[f32], k: &[f32], v: &[f32], t: usize, hd: usize) -> Vec<f32> {
    assert_eq!(q.len(), hd, "attend: q");
    let chunk = |c: usize| chunk_partial(q, k, v, c * CHUNK, ((c + 1) * CHUNK).min(t + 1));
    let mut state = FoldState::start(chunk(0));
    for c in 1..=t / CHUNK {
        state.fold(&chunk(c));
    }
    state.finish()
}

/// Attention for queries `q: [nq, n_heads, hd]` at positions `qpos` over one layer's caches
/// `k, v: [n_kv, cap, hd]`; returns `[nq, n_heads, hd]`. Head `h` reads kv head
/// `h / (n_heads / n_kv)`.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    qpos: &[u32],
    n_heads: usize,
    n_kv: usize,
    hd: usize,
    cap: usize,
) -> Vec<f32> {
    use rayon::prelude::*;
    // Every (query, head) is independent: computed on all cores, the bits do not change.
    (0..qpos.len() * n_heads)
        .into_par_iter()
        .flat_map_iter(|qh| {
            let (i, h) = (qh / n_heads, qh % n_heads);
            let kvh = h / (n_heads / n_kv);
            let q1 = &q[(i * n_heads + h) * hd..][..hd];
            let kc = &k[kvh * cap * hd..][..cap * hd];
            let vc = &v[kvh * cap * hd..][..cap * hd];
            attend(q1, kc, vc, qpos[i] as usize, hd)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chunked order against plain f64 softmax attention: same function, f32 rounding.
    #[test]
    fn chunked_fold_is_attention() {
        let hd = 48;
        let t = 200;
        let val = |i: usize, s: u64| ((i as u64 * 2654435761 + s) % 1000) as f32 / 500.0 - 1.0;
        let q: Vec<f32> = (0..hd).map(|i| val(i, 1)).collect();
        let k: Vec<f32> = (0..(t + 1) * hd).map(|i| val(i, 7)).collect();
        let v: Vec<f32> = (0..(t + 1) * hd).map(|i| val(i, 13)).collect();
        let got = attend(&q, &k, &v, t, hd);
        let sc = 1.0 / (hd as f64).sqrt();
        let s: Vec<f64> = (0..=t)
            .map(|j| {
                (0..hd)
                    .map(|d| q[d] as f64 * k[j * hd + d] as f64)
                    .sum::<f64>()
                    * sc
            })
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = e.iter().sum();
        for d in 0..hd {
            let want: f64 = (0..=t).map(|j| e[j] * v[j * hd + d] as f64).sum::<f64>() / z;
            assert!(
                (got[d] as f64 - want).abs() < 1e-5,
                "d {d}: {} vs {want}",
                got[d]
            );
        }
    }
}
