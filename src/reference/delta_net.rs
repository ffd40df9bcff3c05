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

use crate::error::{Error, Result};
use crate::math::{exp, sigmoid, silu, softplus};
use crate::reference::gemm::{dot_f32, gemm_with, GemmOrder};
use crate::reference::norm::rmsnorm;

pub use crate::spec::delta_net::{DeltaNetConfig, DeltaNetState, DeltaNetWeights};

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
    let (s, hk, hv, kc, cd) = c.scan_dims();
    let scale = 1.0 / (s as f32).sqrt();
    let mut o = vec![0.0f32; n * hv * s];
    for t in 0..n {
        // 2. The convolution over the window and this token, then SiLU.
        let cur = &mixed[t * cd..(t + 1) * cd];
        let mut y = vec![0.0f32; cd];
        for (ch, yc) in y.iter_mut().enumerate() {
            let taps = &w.conv[ch * kc..(ch + 1) * kc];
            let mut acc = 0.0f32;
            for (tap, &wt) in taps.iter().enumerate() {
                let input = if tap + 1 == kc {
                    cur[ch]
                } else {
                    state.conv[tap * cd + ch]
                };
                acc = wt.mul_add(input, acc);
            }
            *yc = silu(acc);
        }
        if kc > 1 {
            state.conv.copy_within(cd.., 0);
            state.conv[(kc - 2) * cd..].copy_from_slice(cur);
        }
        // 3. Unit q and k per key head.
        let (q, rest) = y.split_at_mut(hk * s);
        let (k, v) = rest.split_at_mut(hk * s);
        for head in q.chunks_mut(s).chain(k.chunks_mut(s)) {
            l2_normalize(head, eps);
        }
        // 4, 5. Gates and the delta rule per value head.
        for h in 0..hv {
            let kh = h % hk;
            let (qh, kh_, vh) = (&q[kh * s..][..s], &k[kh * s..][..s], &v[h * s..][..s]);
            let beta = sigmoid(b[t * hv + h]);
            let g = softplus(a[t * hv + h] + w.dt_bias[h]) * w.ssm_a[h];
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
    let o = scan_cpu(w, state, &mixed, &b, &a, n, eps);
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

    /// The order computes the Gated DeltaNet: against the same mathematics in f64 (the
    /// projections taken from the f32 path, everything after them in f64).
    #[test]
    fn matches_the_f64_recurrence() {
        let n = 40;
        let (c, w, x, st, got) = whole(n, 2, 2000);
        let (s, hk, hv, kc, cd) = c.scan_dims();
        let f = |v: &[f32]| v.iter().map(|&u| f64::from(u)).collect::<Vec<f64>>();
        let mixed = f(&gemm(&x, &w.qkv, n).unwrap());
        let z = f(&gemm(&x, &w.z, n).unwrap());
        let b = f(&gemm(&x, &w.beta, n).unwrap());
        let a = f(&gemm(&x, &w.alpha, n).unwrap());
        let silu64 = |v: f64| v / (1.0 + (-v).exp());
        let mut m = vec![0.0f64; hv * s * s];
        let mut o = vec![0.0f64; n * hv * s];
        for t in 0..n {
            let y: Vec<f64> = (0..cd)
                .map(|ch| {
                    let acc: f64 = (0..kc)
                        .filter(|&tap| t + tap + 1 >= kc)
                        .map(|tap| {
                            f64::from(w.conv[ch * kc + tap]) * mixed[(t + tap + 1 - kc) * cd + ch]
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
                let beta = 1.0 / (1.0 + (-b[t * hv + h]).exp());
                let sp = (1.0 + (a[t * hv + h] + f64::from(w.dt_bias[h])).exp()).ln();
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
