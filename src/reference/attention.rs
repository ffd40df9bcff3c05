//! Reference for the attention kernels (`cuda/attention.cu`): causal grouped-query attention
//! over a KV cache, in chunks of [`CHUNK`] positions folded left to right.
//!
//! The order is a function of the query's position `t` and the keys alone. Prefill walks the
//! chunks of a tile of queries in one block, decode spreads a query's chunks over many blocks
//! and folds their partials in a second launch; both perform exactly the operations below, so
//! a query gets the same bits in a prefill of any length, in any chunk, or decoded on its own.

use crate::math::{canon, exp, CANON_NAN};
use crate::quant::act::{quantize_block, ACT_BLOCK};
use crate::reference::gemm::dot_f32;

/// Positions per chunk: chunk `c` holds cache rows `c * CHUNK .. (c + 1) * CHUNK`.
pub const CHUNK: usize = 64;

/// Lane partials of a chunk's softmax denominator (row `j` of the chunk feeds partial `j % 4`).
pub const SUM_PARTIALS: usize = 4;

/// The attention scale `1 / sqrt(hd)`, in f32.
pub fn scale(hd: usize) -> f32 {
    1.0 / (hd as f32).sqrt()
}

/// How a score is formed from a query and a key, before the scale. [`QkMode::F32`] is the
/// canonical order every kernel implements today; the int8 modes are candidate orders for
/// tensor-core attention (their integer dots may be formed in any order), kept here so that
/// their cost in accuracy can be measured before a kernel implements them. Only the score
/// changes: max, exp, sums, the output and the fold are the same in every mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum QkMode {
    /// `dot_f32(q, k_j)`, the canonical dot of [`dot_f32`].
    #[default]
    F32,
    /// The query and each key quantized to int8 with one scale per vector
    /// ([`quantize_vec`]): `(dq * dk_j) * isum_j`, where `isum_j` is the exact integer dot of
    /// the codes (below 2^24 in magnitude for `hd <= 1040`, so its conversion is exact). A
    /// key's codes depend on that key alone.
    Int8Vector,
    /// The query and each key quantized per block of 32 as the matrix products quantize their
    /// activations ([`quantize_block`]): block `b` feeds partial `b % 4`,
    /// `p = fma(dq_b * dk_b, isum_b, p)` from `+0`, then `(p0 + p1) + (p2 + p3)` (the Q8_0 dot
    /// of `src/reference/gemm.rs`). Needs `hd % 32 == 0`.
    Int8Block,
}

/// A vector's int8 codes and its one scale, by the rule of [`quantize_block`] over the whole
/// vector: `d = amax / 127`, `q_i = clamp(round_ties_even(x_i / d), -127, 127)` (0 where the
/// quotient is NaN); a vector with a NaN or an infinity gets `d = NaN` and codes 0.
pub fn quantize_vec(x: &[f32]) -> (Vec<i8>, f32) {
    let mut q = vec![0i8; x.len()];
    if x.iter().any(|v| !v.is_finite()) {
        return (q, CANON_NAN);
    }
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    for (c, &v) in q.iter_mut().zip(x) {
        let r = (v / d).round_ties_even();
        *c = if r.is_nan() {
            0
        } else {
            r.clamp(-127.0, 127.0) as i8
        };
    }
    (q, d)
}

/// The score of query `q` and key `k` (both `[hd]`) in `mode`, before the scale.
pub fn qk_score(mode: QkMode, q: &[f32], k: &[f32]) -> f32 {
    let idot = |a: &[i8], b: &[i8]| -> i32 {
        a.iter()
            .zip(b)
            .map(|(&x, &y)| i32::from(x) * i32::from(y))
            .sum()
    };
    match mode {
        QkMode::F32 => dot_f32(q, k),
        QkMode::Int8Vector => {
            let ((cq, dq), (ck, dk)) = (quantize_vec(q), quantize_vec(k));
            (dq * dk) * idot(&cq, &ck) as f32
        }
        QkMode::Int8Block => {
            assert_eq!(
                q.len() % ACT_BLOCK,
                0,
                "qk_score: Int8Block needs hd % 32 == 0"
            );
            let mut p = [0.0f32; 4];
            for (b, (qb, kb)) in q.chunks(ACT_BLOCK).zip(k.chunks(ACT_BLOCK)).enumerate() {
                let ((cq, dq, _), (ck, dk, _)) = (quantize_block(qb), quantize_block(kb));
                p[b % 4] = (dq * dk).mul_add(idot(&cq, &ck) as f32, p[b % 4]);
            }
            (p[0] + p[1]) + (p[2] + p[3])
        }
    }
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
    chunk_partial_with(QkMode::F32, q, k, v, j0, j1)
}

/// [`chunk_partial`] with the scores of `mode` (step 1 becomes `s_j = qk_score(mode, q, k_j) *
/// scale`; the rest is unchanged).
pub fn chunk_partial_with(
    mode: QkMode,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    j0: usize,
    j1: usize,
) -> ChunkPartial {
    let hd = q.len();
    let sc = scale(hd);
    let s: Vec<f32> = (j0..j1)
        .map(|j| qk_score(mode, q, &k[j * hd..(j + 1) * hd]) * sc)
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
    attend_with(QkMode::F32, q, k, v, t, hd)
}

/// [`attend`] with the scores of `mode`.
pub fn attend_with(mode: QkMode, q: &[f32], k: &[f32], v: &[f32], t: usize, hd: usize) -> Vec<f32> {
    assert_eq!(q.len(), hd, "attend: q");
    let chunk =
        |c: usize| chunk_partial_with(mode, q, k, v, c * CHUNK, ((c + 1) * CHUNK).min(t + 1));
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
    attention_with(QkMode::F32, q, k, v, qpos, n_heads, n_kv, hd, cap)
}

/// [`attention`] with the scores of `mode`.
#[allow(clippy::too_many_arguments)]
pub fn attention_with(
    mode: QkMode,
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
            attend_with(mode, q1, kc, vc, qpos[i] as usize, hd)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Int8 scores: exact on vectors the codes represent exactly (`amax = 127`, so `d = 1`),
    /// NaN from a non-finite input, 0 from a zero vector; the per-block mode is the Q8 dot of
    /// the matrix products, block by block.
    #[test]
    fn int8_scores() {
        let q: Vec<f32> = (0..64)
            .map(|i| if i == 0 { 127.0 } else { (i % 7) as f32 - 3.0 })
            .collect();
        let k: Vec<f32> = (0..64)
            .map(|i| if i == 5 { -127.0 } else { (i % 5) as f32 - 2.0 })
            .collect();
        let exact: f32 = q.iter().zip(&k).map(|(a, b)| a * b).sum();
        assert_eq!(qk_score(QkMode::Int8Vector, &q, &k), exact);
        assert_eq!(qk_score(QkMode::F32, &q, &k), exact);
        let mut bad = q.clone();
        bad[3] = f32::INFINITY;
        assert!(qk_score(QkMode::Int8Vector, &bad, &k).is_nan());
        assert!(qk_score(QkMode::Int8Block, &bad, &k).is_nan());
        assert_eq!(qk_score(QkMode::Int8Vector, &[0.0; 64], &k), 0.0);
        // Per block: p_b = fma(dq_b * dk_b, isum_b, +0) for the two blocks, then (p0 + p1).
        let qs: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 19) as f32 - 9.0) * 0.13)
            .collect();
        let ks: Vec<f32> = (0..64)
            .map(|i| ((i * 11 % 23) as f32 - 11.0) * 0.07)
            .collect();
        let p: Vec<f32> = (0..2)
            .map(|b| {
                let (cq, dq, _) = quantize_block(&qs[32 * b..32 * b + 32]);
                let (ck, dk, _) = quantize_block(&ks[32 * b..32 * b + 32]);
                let isum: i32 = cq
                    .iter()
                    .zip(&ck)
                    .map(|(&x, &y)| i32::from(x) * i32::from(y))
                    .sum();
                (dq * dk).mul_add(isum as f32, 0.0)
            })
            .collect();
        assert_eq!(
            qk_score(QkMode::Int8Block, &qs, &ks).to_bits(),
            ((p[0] + p[1]) + (0.0 + 0.0)).to_bits()
        );
        let f = qk_score(QkMode::F32, &qs, &ks);
        let i8v = qk_score(QkMode::Int8Vector, &qs, &ks);
        assert!((i8v - f).abs() < 0.05 * f.abs().max(1.0), "{i8v} vs {f}");
    }

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
