//! Reference for the Gated DeltaNet mixer of the hybrid Qwen3.5/3.6-MoE layers (llama.cpp's
//! `qwen35moe`; three of every four layers): linear attention with a recurrent state, computed
//! token by token. The same operations serve prefill and decode, so a prompt taken at once, in
//! chunks of any size, or one token at a time leaves the same bits in the outputs and in the
//! state. The GPU's `delta_net_scan` (`cuda/delta_net.cu`) performs steps 2 to 5 with these
//! operations ([`scan_cpu`]).
//!
//! Shapes: `Hk` key heads and `Hv` value heads (`Hv % Hk == 0`; value head `h` reads key head
//! `h % Hk`, llama.cpp's tiling), all of `S` dims; `conv_dim = 2 Hk S + Hv S`. Per token `x: [dim]`,
//! in this order:
//! 1. Projections, each the canonical dot of [`crate::reference::gemm`]: `mixed = W_qkv x`
//!    (`[conv_dim]`: q of the `Hk` key heads, then their k, then v of the `Hv` value heads),
//!    `z = W_z x` (`[Hv S]`), `b = W_beta x` and `a = W_alpha x` (`[Hv]`).
//! 2. Causal depthwise convolution of `mixed` over the last `Kc` tokens (the state keeps the
//!    `Kc - 1` before this one, oldest first, zeros at the start): channel `c`'s
//!    `y = fma(w[c, t], in_t, y)` from `+0` for taps `t = 0 .. Kc` in order (tap `Kc - 1` is
//!    this token), then `y = silu(y)` ([`crate::math::silu`]).
//! 3. Per key head, q and k normalised to unit length: `u_i * (1 / sqrt(dot_f32(u, u) + eps))`.
//! 4. Per value head `h`: `beta = sigmoid(b_h)`, `g = softplus(a_h + dt_bias_h) * ssm_a_h`
//!    (`ssm_a` is stored negative, `-exp(A_log)`, as in llama.cpp's files; our own
//!    [`crate::math::softplus`]), `decay = exp(g)`.
//! 5. The delta rule on head `h`'s state `M[j][i]` (`j` a value dim, `i` a key dim): every
//!    element `M *= decay` (one rounding); then for each `j`: `kv = dot_f32(M[j], k)`,
//!    `delta = (v_j - kv) * beta`, `M[j][i] = fma(k_i, delta, M[j][i])` for every `i`, and
//!    `o_j = dot_f32(M[j], q) * (1 / sqrt(S))`. Rows `j` never read each other: any order of
//!    `j`, the same bits.
//! 6. Gated norm per value head: `o = rmsnorm(o, norm_w)` ([`crate::reference::norm::rmsnorm`]
//!    over the head's `S` values), then `o_i * silu(z_i)` (one rounding).
//! 7. `out = W_out o` (`[dim]`).
//!
//! Every reduction is a canonical dot (4 partials over 32-blocks) or the norm's lane chains:
//! a GPU kernel holds a column `M[j]` in the registers of 4 lanes, one 32-block each.
//!
//! [`scan_chunked_cpu`] is a second order of steps 2 to 5 (not the default; the GPU's
//! `delta_net_chunk_*` kernels compute it): the same mathematics cut into chunks of
//! [`SCAN_CHUNK`] tokens, whose work within a chunk is matrix products, measured against f64
//! beside this one.

use crate::error::{Error, Result};
use crate::math::{exp, sigmoid, silu, softplus};
use crate::reference::gemm::{dot_f32, gemm_with, GemmOrder};
use crate::reference::norm::rmsnorm;

pub use crate::spec::delta_net::{
    ChunkedState, DeltaNetConfig, DeltaNetState, DeltaNetWeights, ScanOrder, SCAN_CHUNK,
};

/// `u * (1 / sqrt(dot_f32(u, u) + eps))`, in place.
fn l2_normalize(u: &mut [f32], eps: f32) {
    let inv = 1.0 / (dot_f32(u, u) + eps).sqrt();
    for x in u {
        *x *= inv;
    }
}

/// Steps 2 to 5 over `n` tokens, from `state` (updated): the convolution and SiLU of
/// `mixed: [n, conv_dim]`, the unit q and k, the gates from `b, a: [n, Hv]` and the delta rule;
/// returns `o: [n, Hv, S]` (before the gated norm). The GPU's `delta_net_scan` is this.
pub fn scan_cpu(
    w: &DeltaNetWeights,
    state: &mut DeltaNetState,
    mixed: &[f32],
    b: &[f32],
    a: &[f32],
    n: usize,
    eps: f32,
) -> Vec<f32> {
    let c = &w.cfg;
    let (s, hk, hv, _, cd) = c.scan_dims();
    let scale = 1.0 / (s as f32).sqrt();
    let mut o = vec![0.0f32; n * hv * s];
    for t in 0..n {
        let y = conv_unit(w, &mut state.conv, &mixed[t * cd..(t + 1) * cd], eps);
        let (q, rest) = y.split_at(hk * s);
        let (k, v) = rest.split_at(hk * s);
        // 4, 5. Gates and the delta rule per value head.
        for h in 0..hv {
            let kh = h % hk;
            let (qh, kh_, vh) = (&q[kh * s..][..s], &k[kh * s..][..s], &v[h * s..][..s]);
            let (beta, g) = gates(w, b[t * hv + h], a[t * hv + h], h);
            let decay = exp(g);
            let mh = &mut state.m[h * s * s..(h + 1) * s * s];
            for m in mh.iter_mut() {
                *m *= decay;
            }
            for j in 0..s {
                let row = &mut mh[j * s..(j + 1) * s];
                let kv = dot_f32(row, kh_);
                let delta = (vh[j] - kv) * beta;
                for (mi, &ki) in row.iter_mut().zip(kh_) {
                    *mi = ki.mul_add(delta, *mi);
                }
                o[(t * hv + h) * s + j] = dot_f32(row, qh) * scale;
            }
        }
    }
    o
}

/// Steps 2 and 3 for one token `cur: [conv_dim]`: the convolution over the window `conv`
/// (then moved on by this token) and SiLU, then q and k of every key head made unit; returns
/// `[conv_dim]`: the unit q heads, the unit k heads, the v heads.
fn conv_unit(w: &DeltaNetWeights, conv: &mut [f32], cur: &[f32], eps: f32) -> Vec<f32> {
    let (s, hk, _, kc, cd) = w.cfg.scan_dims();
    let mut y = vec![0.0f32; cd];
    for (ch, yc) in y.iter_mut().enumerate() {
        let taps = &w.conv[ch * kc..(ch + 1) * kc];
        let mut acc = 0.0f32;
        for (tap, &wt) in taps.iter().enumerate() {
            let input = if tap + 1 == kc {
                cur[ch]
            } else {
                conv[tap * cd + ch]
            };
            acc = wt.mul_add(input, acc);
        }
        *yc = silu(acc);
    }
    if kc > 1 {
        conv.copy_within(cd.., 0);
        conv[(kc - 2) * cd..].copy_from_slice(cur);
    }
    for head in y[..2 * hk * s].chunks_mut(s) {
        l2_normalize(head, eps);
    }
    y
}

/// Step 4's gates of value head `h` from its `b` and `a`: `(beta, g)`, `g` the log of the decay.
fn gates(w: &DeltaNetWeights, b: f32, a: f32, h: usize) -> (f32, f32) {
    (sigmoid(b), softplus(a + w.dt_bias[h]) * w.ssm_a[h])
}

/// Steps 2 to 5 in the chunked order: the same mathematics as [`scan_cpu`] (not its bits), in
/// an order whose work within a chunk is matrix products and whose serial chain per token is
/// one fma per earlier token of the chunk. Not the default: its accuracy against f64 stands
/// beside the recurrence's in BENCHMARKS.md; the GPU's `delta_net_chunk_*` kernels
/// (`cuda/delta_net.cu`) compute these bits.
///
/// The tokens are cut into chunks of `C` = [`SCAN_CHUNK`] by their index in the sequence, so
/// a prompt taken at once, in any pieces or one token at a time gives the same bits. Per value
/// head, with `M0` the matrix at the chunk's start (rows `j` value dims), token `t` of the
/// chunk (`t = 0 ..`) with unit `q, k`, value `v`, gates `(beta, decay)` ([`scan_cpu`]'s steps
/// 2 to 4) and the chunk's earlier tokens `l < t`:
/// 1. The decay factors, products of the decays as the recurrence multiplies them: `F_l =
///    F_l * decay` for every `l < t` (set to 1 when token `l` came), `F_t = 1`; `e = e *
///    decay` (`decay` alone at `t = 0`).
/// 2. For `l < t`: `A_l = F_l * dot_f32(k_l, k)`, `B_l = F_l * dot_f32(k_l, q)`; `B_t =
///    dot_f32(k, q)`.
/// 3. For each `j`: `w = e * dot_f32(M0[j], k)`, then `w = fma(A_l, u_l[j], w)` for `l = 0 ..
///    t` in order; `u_t[j] = (v_j - w) * beta`.
/// 4. `r = e * dot_f32(M0[j], q)`, then `r = fma(B_l, u_l[j], r)` for `l = 0 ..= t` in order;
///    `o_j = r * (1 / sqrt(S))`.
///
/// After the chunk's last token (`t = C - 1`), every element `M0[j][i] = e * M0[j][i]`, then
/// `fma(F_l * u_l[j], k_l[i], .)` for `l = 0 .. C` in order; the chunk's buffers are cleared.
/// (Unrolling the recurrence gives these sums: the matrix after token `t` is `e M0 + sum_l F_l
/// u_l k_l^T`, and `u_l` is `beta (v - M k)` with the matrix before the update.) Factors as
/// products, not `exp` of cumulative log decays: the latter doubled the error against f64.
pub fn scan_chunked_cpu(
    w: &DeltaNetWeights,
    state: &mut ChunkedState,
    mixed: &[f32],
    b: &[f32],
    a: &[f32],
    n: usize,
    eps: f32,
) -> Vec<f32> {
    const C: usize = SCAN_CHUNK;
    let (s, hk, hv, _, cd) = w.cfg.scan_dims();
    let scale = 1.0 / (s as f32).sqrt();
    let mut o = vec![0.0f32; n * hv * s];
    for tok in 0..n {
        let y = conv_unit(
            w,
            &mut state.base.conv,
            &mixed[tok * cd..(tok + 1) * cd],
            eps,
        );
        let (q, rest) = y.split_at(hk * s);
        let (k, v) = rest.split_at(hk * s);
        let t = state.len;
        for kh in 0..hk {
            state.k[(kh * C + t) * s..][..s].copy_from_slice(&k[kh * s..][..s]);
        }
        for h in 0..hv {
            let kh = h % hk;
            let (qh, kt, vh) = (&q[kh * s..][..s], &k[kh * s..][..s], &v[h * s..][..s]);
            let keys = &state.k[kh * C * s..][..C * s];
            let (beta, ga) = gates(w, b[tok * hv + h], a[tok * hv + h], h);
            let d = exp(ga);
            let g = &mut state.f[h * C..][..C];
            for f in &mut g[..t] {
                *f *= d;
            }
            g[t] = 1.0;
            let e = if t == 0 { d } else { state.e[h] * d };
            state.e[h] = e;
            let (mut ca, mut cb) = (Vec::with_capacity(t), Vec::with_capacity(t + 1));
            for l in 0..t {
                let f = g[l];
                let kl = &keys[l * s..][..s];
                ca.push(f * dot_f32(kl, kt));
                cb.push(f * dot_f32(kl, qh));
            }
            cb.push(dot_f32(kt, qh));
            let m0 = &state.base.m[h * s * s..][..s * s];
            let u = &mut state.u[h * C * s..][..C * s];
            for j in 0..s {
                let row = &m0[j * s..][..s];
                let mut acc = e * dot_f32(row, kt);
                for (l, &c) in ca.iter().enumerate() {
                    acc = c.mul_add(u[l * s + j], acc);
                }
                let uj = (vh[j] - acc) * beta;
                u[t * s + j] = uj;
                let mut r = e * dot_f32(row, qh);
                for (l, &c) in cb.iter().enumerate() {
                    r = c.mul_add(u[l * s + j], r);
                }
                o[(tok * hv + h) * s + j] = r * scale;
            }
        }
        state.len += 1;
        if state.len == C {
            fold_chunk(s, hk, hv, state);
        }
    }
    o
}

/// The chunked order's fold at a chunk's end ([`scan_chunked_cpu`]): every matrix moved to
/// the boundary, the buffers cleared.
fn fold_chunk(s: usize, hk: usize, hv: usize, st: &mut ChunkedState) {
    const C: usize = SCAN_CHUNK;
    for h in 0..hv {
        let keys = &st.k[(h % hk) * C * s..][..C * s];
        let f = &st.f[h * C..][..C];
        let u = &st.u[h * C * s..][..C * s];
        let e = st.e[h];
        let m0 = &mut st.base.m[h * s * s..][..s * s];
        for j in 0..s {
            let coef: Vec<f32> = (0..C).map(|l| f[l] * u[l * s + j]).collect();
            for i in 0..s {
                let mut acc = e * m0[j * s + i];
                for (l, &c) in coef.iter().enumerate() {
                    acc = c.mul_add(keys[l * s + i], acc);
                }
                m0[j * s + i] = acc;
            }
        }
    }
    st.len = 0;
    st.k.fill(0.0);
    st.u.fill(0.0);
    st.f.fill(0.0);
    st.e.fill(0.0);
}

/// The mixer over `n` tokens `x: [n, dim]` in order (its projections in the order `order`,
/// [`GemmOrder::Chain`] as every kernel), from `state` (updated): `[n, dim]`.
/// `eps` is the model's RMSNorm epsilon (also that of the q/k normalisation). The projections
/// run over all `n` tokens at once, which gives the bits of one token at a time.
pub fn forward_cpu_with(
    order: GemmOrder,
    w: &DeltaNetWeights,
    state: &mut DeltaNetState,
    x: &[f32],
    n: usize,
    eps: f32,
) -> Result<Vec<f32>> {
    forward_scanned(order, w, x, n, eps, |mixed, b, a| {
        scan_cpu(w, state, mixed, b, a, n, eps)
    })
}

/// [`forward_cpu_with`] with steps 2 to 5 in the chunked order ([`scan_chunked_cpu`]).
pub fn forward_chunked_cpu(
    order: GemmOrder,
    w: &DeltaNetWeights,
    state: &mut ChunkedState,
    x: &[f32],
    n: usize,
    eps: f32,
) -> Result<Vec<f32>> {
    forward_scanned(order, w, x, n, eps, |mixed, b, a| {
        scan_chunked_cpu(w, state, mixed, b, a, n, eps)
    })
}

/// The mixer around a scan: the projections, `scan(mixed, b, a)` (steps 2 to 5), the gated
/// norm and the output projection.
fn forward_scanned(
    order: GemmOrder,
    w: &DeltaNetWeights,
    x: &[f32],
    n: usize,
    eps: f32,
    scan: impl FnOnce(&[f32], &[f32], &[f32]) -> Vec<f32>,
) -> Result<Vec<f32>> {
    let gemm = |x: &[f32], m, n| gemm_with(order, x, m, n);
    let c = &w.cfg;
    c.validate()?;
    if x.len() != n * c.dim {
        return Err(Error::shape("delta_net", "x", &[n, c.dim], &[x.len()]));
    }
    let mixed = gemm(x, &w.qkv, n)?;
    let z = gemm(x, &w.z, n)?;
    let b = gemm(x, &w.beta, n)?;
    let a = gemm(x, &w.alpha, n)?;
    let o = scan(&mixed, &b, &a);
    // 6. Gated norm per value head, 7. the output projection.
    let normed = rmsnorm(&o, &w.norm, eps);
    let gated: Vec<f32> = normed
        .iter()
        .zip(&z)
        .map(|(&v, &zz)| crate::math::canon(v * silu(zz)))
        .collect();
    gemm(&gated, &w.out, n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init;
    use crate::quant::WeightFormat;
    use crate::reference::gemm::gemm;

    fn cfg() -> DeltaNetConfig {
        DeltaNetConfig {
            dim: 64,
            k_heads: 2,
            v_heads: 4,
            head_dim: 32,
            conv_kernel: 4,
            format: WeightFormat::F32,
        }
    }

    fn input(n: usize, dim: usize) -> Vec<f32> {
        init::fill(5, 77, n * dim, 1.0)
    }

    /// `n` tokens through one mixer (weights generated from `seed`, `base`) from a fresh state: the config,
    /// weights, input, the state after and the outputs.
    fn whole(
        n: usize,
        seed: u64,
        base: u64,
    ) -> (
        DeltaNetConfig,
        DeltaNetWeights,
        Vec<f32>,
        DeltaNetState,
        Vec<f32>,
    ) {
        let c = cfg();
        let w = DeltaNetWeights::generate(&c, seed, base).unwrap();
        let x = input(n, c.dim);
        let mut st = DeltaNetState::new(&c);
        let out = forward_cpu_with(GemmOrder::Chain, &w, &mut st, &x, n, 1e-6).unwrap();
        (c, w, x, st, out)
    }

    /// A prompt at once, in chunks of any size, or one token at a time: the same outputs and
    /// the same state, bit for bit.
    #[test]
    fn chunking_never_changes_a_bit() {
        let (c, w, x, whole, want) = whole(23, 1, 1000);
        for chunk in [1usize, 2, 5, 7, 22] {
            let mut st = DeltaNetState::new(&c);
            let mut got = Vec::new();
            for part in x.chunks(chunk * c.dim) {
                got.extend(
                    forward_cpu_with(
                        GemmOrder::Chain,
                        &w,
                        &mut st,
                        part,
                        part.len() / c.dim,
                        1e-6,
                    )
                    .unwrap(),
                );
            }
            let same =
                |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same(&got, &want), "outputs, chunk {chunk}");
            assert!(
                same(&st.m, &whole.m) && same(&st.conv, &whole.conv),
                "state, chunk {chunk}"
            );
        }
    }

    /// Steps 2 to 5 in f64 from the f32 inputs, the recurrence as written: `o: [n, Hv, S]`.
    fn scan_f64(w: &DeltaNetWeights, mixed: &[f32], b: &[f32], a: &[f32], n: usize) -> Vec<f64> {
        let (s, hk, hv, kc, cd) = w.cfg.scan_dims();
        let silu64 = |v: f64| v / (1.0 + (-v).exp());
        let mut m = vec![0.0f64; hv * s * s];
        let mut o = vec![0.0f64; n * hv * s];
        for t in 0..n {
            let y: Vec<f64> = (0..cd)
                .map(|ch| {
                    let acc: f64 = (0..kc)
                        .filter(|&tap| t + tap + 1 >= kc)
                        .map(|tap| {
                            f64::from(w.conv[ch * kc + tap])
                                * f64::from(mixed[(t + tap + 1 - kc) * cd + ch])
                        })
                        .sum();
                    silu64(acc)
                })
                .collect();
            let unit = |u: &[f64]| {
                let nn = (u.iter().map(|v| v * v).sum::<f64>() + 1e-6).sqrt();
                u.iter().map(|v| v / nn).collect::<Vec<f64>>()
            };
            for h in 0..hv {
                let kh = h % hk;
                let q = unit(&y[kh * s..][..s]);
                let k = unit(&y[(hk + kh) * s..][..s]);
                let v = &y[(2 * hk + h) * s..][..s];
                let beta = 1.0 / (1.0 + (-f64::from(b[t * hv + h])).exp());
                let sp = (1.0 + (f64::from(a[t * hv + h]) + f64::from(w.dt_bias[h])).exp()).ln();
                let decay = (sp * f64::from(w.ssm_a[h])).exp();
                let mh = &mut m[h * s * s..(h + 1) * s * s];
                for j in 0..s {
                    let row = &mut mh[j * s..(j + 1) * s];
                    row.iter_mut().for_each(|r| *r *= decay);
                    let kv: f64 = row.iter().zip(&k).map(|(r, k)| r * k).sum();
                    let delta = (v[j] - kv) * beta;
                    row.iter_mut().zip(&k).for_each(|(r, k)| *r += k * delta);
                    o[(t * hv + h) * s + j] =
                        row.iter().zip(&q).map(|(r, q)| r * q).sum::<f64>() / (s as f64).sqrt();
                }
            }
        }
        o
    }

    /// Relative L2 of `got` against `want`.
    fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for (&g, &w) in got.iter().zip(want) {
            num += (f64::from(g) - w).powi(2);
            den += w * w;
        }
        (num / den).sqrt()
    }

    /// The scan's inputs for `n` tokens of a mixer of `c` (weights from `seed`, the log
    /// decays times `decay_scale`): the weights, `mixed`, `b`, `a`.
    fn scan_inputs(
        c: &DeltaNetConfig,
        n: usize,
        seed: u64,
        decay_scale: f32,
    ) -> (DeltaNetWeights, Vec<f32>, Vec<f32>, Vec<f32>) {
        let mut w = DeltaNetWeights::generate(c, seed, 100 * seed).unwrap();
        w.ssm_a.iter_mut().for_each(|x| *x *= decay_scale);
        let x = input(n, c.dim);
        let mixed = gemm(&x, &w.qkv, n).unwrap();
        let b = gemm(&x, &w.beta, n).unwrap();
        let a = gemm(&x, &w.alpha, n).unwrap();
        (w, mixed, b, a)
    }

    /// The chunked order's bits depend on the tokens alone: the whole prompt, pieces that
    /// start, end and straddle chunk boundaries, or one token at a time give the same outputs
    /// and the same state (window, matrices and the chunk under way).
    #[test]
    fn chunked_order_is_schedule_invariant() {
        let c = cfg();
        let n = 2 * SCAN_CHUNK + 22;
        let (w, mixed, b, a) = scan_inputs(&c, n, 3, 1.0);
        let (cd, hv) = (c.conv_dim(), c.v_heads);
        let mut whole = ChunkedState::new(&c);
        let want = scan_chunked_cpu(&w, &mut whole, &mixed, &b, &a, n, 1e-6);
        assert_eq!(whole.len, n % SCAN_CHUNK);
        let same = |x: &[f32], y: &[f32]| x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits());
        for piece in [1usize, 5, 63, 64, 65, n - 1] {
            let mut st = ChunkedState::new(&c);
            let mut got = Vec::new();
            let mut t0 = 0;
            while t0 < n {
                let m = piece.min(n - t0);
                got.extend(scan_chunked_cpu(
                    &w,
                    &mut st,
                    &mixed[t0 * cd..(t0 + m) * cd],
                    &b[t0 * hv..(t0 + m) * hv],
                    &a[t0 * hv..(t0 + m) * hv],
                    m,
                    1e-6,
                ));
                t0 += m;
            }
            assert!(same(&got, &want), "outputs, pieces of {piece}");
            let b = &st.base;
            let w0 = &whole.base;
            assert_eq!(st.len, whole.len, "state, pieces of {piece}");
            for (x, y) in [
                (&b.conv, &w0.conv),
                (&b.m, &w0.m),
                (&st.k, &whole.k),
                (&st.u, &whole.u),
                (&st.f, &whole.f),
                (&st.e, &whole.e),
            ] {
                assert!(same(x, y), "state, pieces of {piece}");
            }
        }
    }

    /// The chunked order against f64 beside the recurrence's ([`scan_cpu`]) on the same
    /// inputs: head dims 32 and 128, three seeds, the generator's decays and decays 30 times
    /// stronger (whole chunks decay to nothing), over 3 to 5 chunks. Prints both errors (the accuracy table of
    /// BENCHMARKS.md); a broken fold, coefficient or chain lands far above the bound.
    #[test]
    fn chunked_order_accuracy_against_f64() {
        let cases = [
            (32usize, 200usize, 1.0f32, 4u64),
            (128, 320, 1.0, 4),
            (128, 320, 1.0, 5),
            (128, 320, 1.0, 6),
            (128, 160, 30.0, 4),
        ];
        for (s, n, decay_scale, seed) in cases {
            let mut c = cfg();
            c.head_dim = s;
            let (w, mixed, b, a) = scan_inputs(&c, n, seed, decay_scale);
            let want = scan_f64(&w, &mixed, &b, &a, n);
            let rec = scan_cpu(&w, &mut DeltaNetState::new(&c), &mixed, &b, &a, n, 1e-6);
            let chunked = scan_chunked_cpu(&w, &mut ChunkedState::new(&c), &mixed, &b, &a, n, 1e-6);
            let (er, ec) = (rel_l2(&rec, &want), rel_l2(&chunked, &want));
            println!(
                "S={s} n={n} decay x{decay_scale} seed {seed}: recurrence {er:.3e}, chunked (C={SCAN_CHUNK}) {ec:.3e} relative L2 against f64"
            );
            assert!(er < 1e-5 && ec < 1e-5, "S={s}: {er:e} {ec:e}");
            assert!(
                chunked.iter().zip(&rec).any(|(x, y)| x != y),
                "S={s}: the chunked order is the recurrence's bits"
            );
        }
    }

    /// The order computes the Gated DeltaNet: against the same mathematics in f64 (the
    /// projections taken from the f32 path, everything after them in f64).
    #[test]
    fn matches_the_f64_recurrence() {
        let n = 40;
        let (c, w, x, st, got) = whole(n, 2, 2000);
        let f = |v: &[f32]| v.iter().map(|&u| f64::from(u)).collect::<Vec<f64>>();
        let mixed = gemm(&x, &w.qkv, n).unwrap();
        let z = f(&gemm(&x, &w.z, n).unwrap());
        let b = gemm(&x, &w.beta, n).unwrap();
        let a = gemm(&x, &w.alpha, n).unwrap();
        let (s, _, hv, _, _) = c.scan_dims();
        let silu64 = |v: f64| v / (1.0 + (-v).exp());
        let o = scan_f64(&w, &mixed, &b, &a, n);
        let mut gated = vec![0.0f32; n * hv * s];
        for (r, head) in o.chunks(s).enumerate() {
            let rs = 1.0 / (head.iter().map(|v| v * v).sum::<f64>() / s as f64 + 1e-6).sqrt();
            for (i, &v) in head.iter().enumerate() {
                gated[r * s + i] = (v * rs * f64::from(w.norm[i]) * silu64(z[r * s + i])) as f32;
            }
        }
        let want = gemm(&gated, &w.out, n).unwrap();
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for (&g, &wv) in got.iter().zip(&want) {
            num += (f64::from(g) - f64::from(wv)).powi(2);
            den += f64::from(wv).powi(2);
        }
        let rel = (num / den).sqrt();
        assert!(rel < 1e-5, "relative L2 error {rel:e}");
        assert!(st.m.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn bad_shapes_are_typed_errors() {
        let mut c = cfg();
        c.v_heads = 3;
        assert!(matches!(
            DeltaNetWeights::generate(&c, 1, 0),
            Err(Error::InvalidArgument { .. })
        ));
        let c = cfg();
        let w = DeltaNetWeights::generate(&c, 1, 0).unwrap();
        let mut st = DeltaNetState::new(&c);
        let before = st.clone();
        assert!(matches!(
            forward_cpu_with(GemmOrder::Chain, &w, &mut st, &[0.0; 10], 1, 1e-6),
            Err(Error::ShapeMismatch { .. })
        ));
        assert_eq!(st, before, "nothing written");
    }
}
