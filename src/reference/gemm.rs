//! Reference for the matrix products of `cuda/gemm.cu`: the canonical dot product of every
//! weight format, and the dense and expert-grouped products built from it.
//!
//! # The canonical order
//!
//! `dot(x, w)` over `K` elements, whatever the caller (GEMV, GEMM-N for any N, the grouped
//! expert GEMM, any launch configuration or dispatch choice):
//!
//! 1. `K` is cut into blocks of [`DOT_BLOCK`] = 32 consecutive elements; block `b` covers `k` in
//!    `32 b .. min(32 b + 32, K)` (only float formats may have a shorter last block).
//! 2. There are [`DOT_PARTIALS`] = 4 partial sums `p0..p3`, each starting at `+0.0`.
//!    Block `b` belongs to partial `b % 4`.
//! 3. Each partial takes its blocks in increasing `b`; one block's step, by weight format:
//!    - F32, F16, BF16 (widened exactly to f32): for `k` in the block, increasing,
//!      `p = fma(w[k], x[k], p)`.
//!    - Q8_0, Q4_0, Q5_0, IQ4_NL, MXFP4 ([`WScale::Q8`]): `p = fma(d * dx, isum, p)`; IQ4_XS
//!      the same with `d` its 32-block's `d_super * (ls - 32)` (one rounding). The codes are
//!      `q - 8`, `q - 16`, the IQ4 grid's int8 values and MXFP4's doubled e2m1 values (with
//!      `d = 2^(e - 128)`), so each block's integer dot is exact.
//!    - Q4_K, Q5_K, Q4_1, Q5_1: `p = fma(ws * dx, isum, p)`, then `p = fma(wm, ax, p)`, with
//!      `ws = d * sc` and `wm = -(dmin * m)` for the K-quants and `ws = d`, `wm = m` for
//!      Q4_1/Q5_1 ([`WScale::KMin`]).
//!    - Q6_K, Q3_K: `p = fma(d * dx, sc_lo * isum_lo + sc_hi * isum_hi, p)` (Q3_K's scales
//!      `sc - 32`, its codes `q - 4`).
//!    - Q2_K: `p = fma(d * dx, sc_lo * isum_lo + sc_hi * isum_hi, p)`, then
//!      `p = fma(-(dmin * dx), m_lo * sx_lo + m_hi * sx_hi, p)`, `sx_*` the sums of the
//!      activation codes over each half ([`WScale::Q2`]).
//!
//!    `isum` is the exact integer dot of the block's weight codes ([`WBlock`]) with the
//!    activation codes (`isum_lo`, `isum_hi` its halves over elements 0..16 and 16..32), `dx`
//!    the activation block scale and `ax = dx * Σ codes`
//!    ([`crate::reference::quantize`]); each product of two floats is rounded once and the
//!    integers convert exactly (they stay below 2^24).
//! 4. The result is the fixed pairwise tree `(p0 + p1) + (p2 + p3)`.
//!
//! The order depends on `K` and the format alone. Four independent chains give a GEMV four-way
//! parallelism per row, let the float GEMM split K across four groups of threads that each own
//! one partial, and let the tensor-core GEMM keep the partial index a compile-time constant
//! (block `j` of a 256-wide chunk feeds partial `j % 4`), while the chains stay long enough that
//! the combination costs nothing. Integer dots are exact, so the tensor cores may form them in
//! any order.
//!
//! # The exact order (issue 31; CPU reference only, not the default)
//!
//! [`GemmOrder::Exact`] defines `dot(x, w)` as the exact sum of its terms rounded once to the
//! nearest f32 (ties to even, gradual underflow, overflow to `±inf`, an exact zero as `+0`;
//! [`crate::reference::exact::ExactSum`]), so split-K, any tiling and any order of the blocks
//! give the same bits:
//!
//! - Quantized formats: the activations are quantized with 11-bit scales
//!   ([`crate::quant::quantize_act_exact`]: `dx` is `amax / 127` rounded up to 11
//!   significant bits). Each block contributes the products of the step above, unrounded:
//!   `d * dx * isum` (Q8_0, Q4_0, Q5_0, IQ4_NL, IQ4_XS, MXFP4), `ws * dx * isum + wm * dx *
//!   sx` (Q4_K, Q5_K, Q4_1, Q5_1; `sx` the sum of the block's activation codes, where the
//!   chain reads `ax`), `d * dx * (sc_lo * isum_lo + sc_hi * isum_hi)` (Q6_K, Q3_K), and for
//!   Q2_K that minus `dmin * dx * (m_lo * sx_lo + m_hi * sx_hi)`. The weight scales are the
//!   format's exact values (an f16 times a small integer: at most 19 significant bits), `dx`
//!   has 11 and the integers stay below `2^27`, so each term is one 64-bit integer times a
//!   power of two: a kernel sums them exactly in wide integers.
//! - Float formats (F32, F16, BF16): `x` as is; the terms are the exact products `w[k] * x[k]`.
//! - A NaN term, or infinite terms of both signs, make the result NaN; otherwise an infinite
//!   term makes it that infinity (a NaN or infinite activation block has `dx = NaN`).
//!
//! Accuracy against f64, beside the chain's: BENCHMARKS.md (issue 31). How a kernel can form it:
//! [`dot_row_exact_windowed`] (each term one integer below `2^57` times a power of two, summed
//! in one i128 when the dot's exponents span little, the accumulator otherwise; the same bits).

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::math::canon;
use crate::quant::{
    decode_block, quantize_act, quantize_act_exact, ActQ8, QuantMatrix, WBlock, WScale,
    WeightFormat,
};
use crate::reference::exact::ExactSum;

/// Elements per block of the canonical dot product.
pub const DOT_BLOCK: usize = 32;
/// Number of strided partial sums of the canonical dot product.
pub const DOT_PARTIALS: usize = 4;

/// The canonical f32 dot product of `x` and `w` (same length `K`); see the module docs.
///
/// # Panics
/// If the lengths differ.
pub fn dot_f32(x: &[f32], w: &[f32]) -> f32 {
    assert_eq!(x.len(), w.len(), "dot_f32: lengths");
    let mut p = [0.0f32; DOT_PARTIALS];
    for (b, (xb, wb)) in x.chunks(DOT_BLOCK).zip(w.chunks(DOT_BLOCK)).enumerate() {
        let acc = &mut p[b % DOT_PARTIALS];
        for (&xk, &wk) in xb.iter().zip(wb) {
            *acc = wk.mul_add(xk, *acc);
        }
    }
    (p[0] + p[1]) + (p[2] + p[3])
}

/// Dense product `y[n, m] = dot(x[n, :], w[m, :])`.
///
/// Shapes (row-major): `x: [n, k]`, `w: [m, k]` (each output feature's weights contiguous, as
/// GGUF and PyTorch store them); returns `y: [n, m]`. Output rows are computed on all cores;
/// each element is the sequential [`dot_f32`], so the bits do not depend on the threads.
///
/// # Panics
/// If the slice lengths do not match the shape.
pub fn gemm_f32(x: &[f32], w: &[f32], n: usize, m: usize, k: usize) -> Vec<f32> {
    assert_eq!(x.len(), n * k, "gemm_f32: x");
    assert_eq!(w.len(), m * k, "gemm_f32: w");
    let mut y = vec![0.0f32; n * m];
    y.par_chunks_mut(m.max(1)).enumerate().for_each(|(i, yr)| {
        let xr = &x[i * k..(i + 1) * k];
        for (j, out) in yr.iter_mut().enumerate() {
            *out = canon(dot_f32(xr, &w[j * k..(j + 1) * k]));
        }
    });
    y
}

/// Expert-grouped product: for each routed row `r`,
/// `y[y_rows[r], m] = dot(x[x_rows[r], :], w[experts[r], m, :])`.
///
/// Shapes (row-major): `x: [nx, k]`, `w: [n_experts, m, k]`, `y: [ny, m]`; `x_rows`,
/// `experts` and `y_rows` have one entry per routed row. Rows of `y` that no `y_rows` entry
/// names are left as they are.
///
/// # Panics
/// If the lengths do not match or an index is out of range.
#[allow(clippy::too_many_arguments)]
pub fn gemm_grouped_f32(
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    x_rows: &[u32],
    experts: &[u32],
    y_rows: &[u32],
    m: usize,
    k: usize,
) {
    assert_eq!(x_rows.len(), experts.len(), "gemm_grouped_f32: table");
    assert_eq!(y_rows.len(), experts.len(), "gemm_grouped_f32: table");
    let rows: Vec<Vec<f32>> = (0..experts.len())
        .into_par_iter()
        .map(|r| {
            let xr = &x[x_rows[r] as usize * k..][..k];
            let e = experts[r] as usize;
            (0..m)
                .map(|j| canon(dot_f32(xr, &w[(e * m + j) * k..][..k])))
                .collect()
        })
        .collect();
    for (r, row) in rows.into_iter().enumerate() {
        y[y_rows[r] as usize * m..][..m].copy_from_slice(&row);
    }
}

/// One block's step of the canonical order for a quantized weight block `w` against the
/// activation codes `xq` (32 of them) with block scale `dx` and `ax = dx * Σ xq`.
pub fn qstep(acc: f32, w: &WBlock, xq: &[i8], dx: f32, ax: f32) -> f32 {
    let half = |r: std::ops::Range<usize>| -> i32 {
        r.map(|i| i32::from(w.q[i]) * i32::from(xq[i])).sum()
    };
    let (lo, hi) = (half(0..16), half(16..32));
    match w.scale {
        WScale::Q8 { d } => (d * dx).mul_add((lo + hi) as f32, acc),
        WScale::KMin { ws, wm } => wm.mul_add(ax, (ws * dx).mul_add((lo + hi) as f32, acc)),
        WScale::Q6 { d, sc } => {
            let i = i32::from(sc[0]) * lo + i32::from(sc[1]) * hi;
            (d * dx).mul_add(i as f32, acc)
        }
        WScale::Q2 { d, dmin, sc, m } => {
            let i = i32::from(sc[0]) * lo + i32::from(sc[1]) * hi;
            let sum =
                |r: std::ops::Range<usize>| -> i32 { xq[r].iter().map(|&c| i32::from(c)).sum() };
            let im = i32::from(m[0]) * sum(0..16) + i32::from(m[1]) * sum(16..32);
            (-(dmin * dx)).mul_add(im as f32, (d * dx).mul_add(i as f32, acc))
        }
    }
}

/// One block's terms of the exact order ([`GemmOrder::Exact`]), added to `sum`: the block's
/// value `Σ_l w_l * dx * q_l` as products of its exact scales, `dx` and integers.
pub fn exact_step(sum: &mut ExactSum, w: &WBlock, xq: &[i8], dx: f32) {
    block_terms(w, xq, dx, |a, b, i| sum.add_product(a, b, i));
}

/// Each term `a * b * i` of one block in the exact order (`a` a weight scale, `b` the
/// activation scale, `i` an integer below `2^27`).
fn block_terms(w: &WBlock, xq: &[i8], dx: f32, mut term: impl FnMut(f32, f32, i64)) {
    let half = |r: std::ops::Range<usize>| -> i64 {
        r.map(|i| i64::from(w.q[i]) * i64::from(xq[i])).sum()
    };
    let codes = |r: std::ops::Range<usize>| -> i64 { xq[r].iter().map(|&c| i64::from(c)).sum() };
    let (lo, hi) = (half(0..16), half(16..32));
    match w.scale {
        WScale::Q8 { d } => term(d, dx, lo + hi),
        WScale::KMin { ws, wm } => {
            term(ws, dx, lo + hi);
            term(wm, dx, codes(0..32));
        }
        WScale::Q6 { d, sc } => term(d, dx, i64::from(sc[0]) * lo + i64::from(sc[1]) * hi),
        WScale::Q2 { d, dmin, sc, m } => {
            term(d, dx, i64::from(sc[0]) * lo + i64::from(sc[1]) * hi);
            let im = i64::from(m[0]) * codes(0..16) + i64::from(m[1]) * codes(16..32);
            term(-dmin, dx, im);
        }
    }
}

/// The exact order of a quantized row as a kernel can form it (the plan for issue 32's
/// tensor-core GEMMs): each term `a * b * i` becomes one integer `M * 2^E` (`a` and `b` with
/// their trailing zero bits dropped: at most 19 + 11 significant bits, times `|i| < 2^27`, so
/// `|M| < 2^57`); when the dot's exponents span little enough that every term fits one i128
/// anchored at the least exponent (`span + bits(M) + log2(terms) <= 99`), the terms are summed
/// there and rounded once, else the row takes [`ExactSum`]. Returns the result and whether the
/// i128 window held it: the bits are [`dot_row`]'s exact order's either way (tested).
pub fn dot_row_exact_windowed(
    format: WeightFormat,
    w_row: &[u8],
    k: usize,
    act: &ActQ8,
    row: usize,
) -> (f32, bool) {
    let nb = k / DOT_BLOCK;
    let mut terms: Vec<(f32, f32, i64)> = Vec::with_capacity(2 * nb);
    for b in 0..nb {
        let w = decode_block(format, w_row, b);
        let xq = &act.codes[row * k + b * DOT_BLOCK..][..DOT_BLOCK];
        block_terms(&w, xq, act.d[row * nb + b], |a, x, i| terms.push((a, x, i)));
    }
    let exact = |terms: &[(f32, f32, i64)]| {
        let mut s = ExactSum::new();
        for &(a, b, i) in terms {
            s.add_product(a, b, i);
        }
        s.round()
    };
    if terms
        .iter()
        .any(|&(a, b, _)| !a.is_finite() || !b.is_finite())
    {
        return (exact(&terms), false);
    }
    let part = |x: f32| {
        let (m, e) = crate::reference::exact::f32_parts(x);
        let tz = if m == 0 { 0 } else { m.trailing_zeros() };
        (m >> tz, e + tz as i32)
    };
    let ints: Vec<(i128, i32)> = terms
        .iter()
        .map(|&(a, b, i)| {
            let ((ma, ea), (mb, eb)) = (part(a), part(b));
            (i128::from(ma) * i128::from(mb) * i128::from(i), ea + eb)
        })
        .filter(|&(m, _)| m != 0)
        .collect();
    let Some(e_min) = ints.iter().map(|&(_, e)| e).min() else {
        return (0.0, true);
    };
    let e_max = ints.iter().map(|&(_, e)| e).max().unwrap_or(e_min);
    let bits = ints
        .iter()
        .map(|&(m, _)| 128 - m.unsigned_abs().leading_zeros() as i32)
        .max()
        .unwrap_or(0);
    let count_bits = 64 - (ints.len() as u64).leading_zeros() as i32;
    if e_max - e_min + bits + count_bits > 99 {
        return (exact(&terms), false);
    }
    let d: i128 = ints.iter().map(|&(m, e)| m << (e - e_min)).sum();
    (crate::reference::attention::round_scaled(d, e_min), true)
}

/// The order a matrix product reduces in (module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GemmOrder {
    /// The canonical f32 chain: four strided partials of rounded block steps.
    #[default]
    Chain,
    /// The exact order: every block term summed exactly and rounded once, with the
    /// activations quantized under 11-bit scales (CPU reference only, not the default).
    Exact,
}

/// The dot of one stored weight row (`format`, `k` columns) with one activation row in `order`:
/// f32 values `x` for the float formats, or row `row` of the quantized activations `act`
/// (from [`crate::quant::quantize_act`] for the chain, [`crate::quant::quantize_act_exact`]
/// for the exact order) for the quantized ones.
/// - [`GemmOrder::Chain`], the canonical dot: [`dot_f32`] of the dequantized row, or block `b`
///   into partial `b % 4` by [`qstep`], then `(p0 + p1) + (p2 + p3)`.
/// - [`GemmOrder::Exact`]: every `w[k] * x[k]` (every block term, [`exact_step`]) summed
///   exactly, rounded once.
pub fn dot_row(
    order: GemmOrder,
    format: WeightFormat,
    w_row: &[u8],
    k: usize,
    x: &[f32],
    act: Option<(&ActQ8, usize)>,
) -> f32 {
    if !format.is_quantized() {
        let mut w = Vec::with_capacity(k);
        crate::quant::dequantize_row(format, w_row, k, &mut w);
        return match order {
            GemmOrder::Chain => dot_f32(x, &w),
            GemmOrder::Exact => {
                let mut sum = ExactSum::new();
                for (&wi, &xi) in w.iter().zip(x) {
                    sum.add_product(wi, xi, 1);
                }
                sum.round()
            }
        };
    }
    let (act, row) = act.expect("quantized formats take quantized activations");
    let nb = k / DOT_BLOCK;
    // Block b: its decoded weights, its activation codes and the index of its scales.
    let blocks = (0..nb).map(|b| {
        let xq = &act.codes[row * k + b * DOT_BLOCK..][..DOT_BLOCK];
        (decode_block(format, w_row, b), xq, row * nb + b)
    });
    match order {
        GemmOrder::Chain => {
            let mut p = [0.0f32; DOT_PARTIALS];
            for (b, (w, xq, at)) in blocks.enumerate() {
                p[b % DOT_PARTIALS] = qstep(p[b % DOT_PARTIALS], &w, xq, act.d[at], act.a[at]);
            }
            (p[0] + p[1]) + (p[2] + p[3])
        }
        GemmOrder::Exact => {
            let mut sum = ExactSum::new();
            for (w, xq, at) in blocks {
                exact_step(&mut sum, &w, xq, act.d[at]);
            }
            sum.round()
        }
    }
}

fn check_product(op: &'static str, w: &QuantMatrix, x_len: usize, nx: usize) -> Result<()> {
    if x_len != nx * w.cols() {
        return Err(Error::shape(op, "x", &[nx, w.cols()], &[x_len]));
    }
    Ok(())
}

/// Dense product `y[n, m] = dot(x[n, :], w[m, :])` for a single matrix `w` in any format
/// (`w.experts() == 1`); quantized formats first quantize each row of `x`
/// ([`quantize_act`]). Shapes: `x: [n, k]`, returns `[n, m]`.
pub fn gemm(x: &[f32], w: &QuantMatrix, n: usize) -> Result<Vec<f32>> {
    gemm_with(GemmOrder::Chain, x, w, n)
}

/// [`gemm`] in the order `order`.
pub fn gemm_with(order: GemmOrder, x: &[f32], w: &QuantMatrix, n: usize) -> Result<Vec<f32>> {
    check_product("reference::gemm", w, x.len(), n)?;
    if w.experts() != 1 {
        return Err(Error::invalid(
            "reference::gemm",
            "a dense product takes one matrix",
        ));
    }
    let mut y = vec![0.0f32; n * w.rows()];
    let rows: Vec<u32> = (0..n as u32).collect();
    gemm_grouped_with(order, x, w, &mut y, &rows, &vec![0; n], &rows)?;
    Ok(y)
}

/// Expert-grouped product for any format in the order `order` ([`GemmOrder::Chain`] is every
/// kernel's): `y[y_rows[r], m] = dot(x[x_rows[r], :],
/// w[experts[r], m, :])`. Shapes: `x: [nx, k]`, `w: [n_experts, m, k]`, `y: [ny, m]`; output
/// rows no routed row names are left as they are.
pub fn gemm_grouped_with(
    order: GemmOrder,
    x: &[f32],
    w: &QuantMatrix,
    y: &mut [f32],
    x_rows: &[u32],
    experts: &[u32],
    y_rows: &[u32],
) -> Result<()> {
    let (m, k) = (w.rows(), w.cols());
    let nx = x.len().checked_div(k).unwrap_or(0);
    check_product("reference::gemm_grouped", w, x.len(), nx)?;
    let quantize = match order {
        GemmOrder::Chain => quantize_act,
        GemmOrder::Exact => quantize_act_exact,
    };
    let act = w.format().is_quantized().then(|| quantize(x, nx, k));
    let rows: Vec<Vec<f32>> = (0..experts.len())
        .into_par_iter()
        .map(|r| {
            let xr = x_rows[r] as usize;
            let e = experts[r] as usize;
            (0..m)
                .map(|j| {
                    let row = w.row(e, j);
                    canon(dot_row(
                        order,
                        w.format(),
                        row,
                        k,
                        &x[xr * k..][..k],
                        act.as_ref().map(|a| (a, xr)),
                    ))
                })
                .collect()
        })
        .collect();
    for (r, row) in rows.into_iter().enumerate() {
        y[y_rows[r] as usize * m..][..m].copy_from_slice(&row);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel plan of the exact order gives its bits: on rows of one scale (every dot in
    /// the i128 window) and on rows whose blocks span 2^-60 .. 2^60 (some dots past the
    /// window, through the accumulator), every quantized format.
    #[test]
    fn windowed_exact_dot_equals_the_exact_order() {
        let (rows, k) = (8, 512);
        let u = |t: u64, i: usize| f64::from(crate::init::uniform(11, t, i as u64));
        let values: Vec<f32> = (0..rows * k).map(|i| u(1, i) as f32).collect();
        let plain: Vec<f32> = (0..2 * k).map(|i| (u(2, i) + 0.2) as f32).collect();
        let wide: Vec<f32> = (0..2 * k)
            .map(|i| {
                let scale = 2f64.powi(((i / 32) * 37 % 121) as i32 - 60);
                (u(3, i) * scale) as f32
            })
            .collect();
        for format in WeightFormat::ALL.into_iter().filter(|f| f.is_quantized()) {
            let w = QuantMatrix::quantize(format, &values, 1, rows, k).unwrap();
            for (name, x, all_fast) in [("plain", &plain, true), ("wide", &wide, false)] {
                let act = quantize_act_exact(x, 2, k);
                let mut fast = 0;
                for n in 0..2 {
                    for r in 0..rows {
                        let want =
                            dot_row(GemmOrder::Exact, format, w.row(0, r), k, x, Some((&act, n)));
                        let (got, in_window) =
                            dot_row_exact_windowed(format, w.row(0, r), k, &act, n);
                        assert_eq!(got.to_bits(), want.to_bits(), "{format} {name} {n} {r}");
                        fast += usize::from(in_window);
                    }
                }
                if all_fast {
                    assert_eq!(fast, 2 * rows, "{format}: a plain row left the window");
                } else {
                    assert!(fast < 2 * rows, "{format}: no wide row left the window");
                }
            }
        }
    }

    /// Every quantized format's block step, summed in the canonical order, against the f64 dot
    /// of the decoded weights (the decoders the gguf package checks) with the decoded activations:
    /// the two differ by f32 rounding only, so a wrong scale, min or half in a step shows.
    #[test]
    fn block_steps_equal_the_decoded_dot_up_to_rounding() {
        let (rows, k) = (16, 1024);
        let u = |t: u64, i: usize| f64::from(crate::init::uniform(12, t, i as u64));
        let values: Vec<f32> = (0..rows * k)
            .map(|i| (u(1, i) * (1.0 + (i / 256 % 5) as f64)) as f32)
            .collect();
        // Activations with a positive bias, so the min terms (Σ codes) do not average out.
        let x: Vec<f32> = (0..k).map(|i| (u(2, i) + 0.3) as f32).collect();
        // (order, its activations, its dot, the bound relative to (size, |want|)): the chain
        // within a few roundings per block; the exact order within one rounding of the result
        // and the decoded weights' own roundings.
        let orders: [(&str, ActQ8, GemmOrder, f64, f64); 2] = [
            ("chain", quantize_act(&x, 1, k), GemmOrder::Chain, 1e-5, 0.0),
            (
                "exact",
                quantize_act_exact(&x, 1, k),
                GemmOrder::Exact,
                2f64.powi(-23),
                2f64.powi(-24),
            ),
        ];
        for format in WeightFormat::ALL.into_iter().filter(|f| f.is_quantized()) {
            let w = QuantMatrix::quantize(format, &values, 1, rows, k).unwrap();
            let wd = w.dequantize();
            for (name, act, order, by_size, by_want) in &orders {
                let xd: Vec<f64> = (0..k)
                    .map(|i| f64::from(act.codes[i]) * f64::from(act.d[i / 32]))
                    .collect();
                for r in 0..rows {
                    let got =
                        f64::from(dot_row(*order, format, w.row(0, r), k, &x, Some((act, 0))));
                    let row = &wd[r * k..][..k];
                    let want: f64 = row.iter().zip(&xd).map(|(&a, b)| f64::from(a) * b).sum();
                    let size: f64 = row
                        .iter()
                        .zip(&xd)
                        .map(|(&a, b)| (f64::from(a) * b).abs())
                        .sum();
                    assert!(
                        (got - want).abs() <= by_size * size + by_want * want.abs(),
                        "{name} {format} row {r}: {got} against {want} (size {size})"
                    );
                }
            }
        }
    }
}
