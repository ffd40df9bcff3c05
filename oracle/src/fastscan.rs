//! `oracle fastscan`: attention over a FastScan-encoded KV cache, batched (every query of the
//! sequence in one prefill) against one query at a time (decode after each append) and against
//! the CPU reference, in all four table modes, bit for bit; and the quality table: relative
//! error of the attention output against exact f32 attention on the same keys and values.

use std::time::Instant;

use anyhow::Result;
use bitexact::init;
use bitexact::kernels::fastscan::{fastscan_attention, AttentionWorkspace, FastScanCache};
use bitexact::kernels::rope::Positions;
use bitexact::quant::fastscan::{FastScanSpec, DIMS};
use bitexact::reference::attention::attend as exact_attend;
use bitexact::reference::fastscan::{CpuCache, ScoreMode, ValueMode};
use bitexact::{Device, GpuTensor};
use rayon::prelude::*;
use serde::Serialize;

use crate::compare::{compare_f32, compare_u32, Comparison};
use crate::output::usage;
use crate::{fmt_secs, parse_positive, Progress, RunArgs};

#[derive(clap::Args)]
pub struct FastScanArgs {
    /// Sequence length (positions; every one is a query).
    #[arg(long, default_value_t = 4_133, value_parser = parse_positive)]
    len: usize,
    /// Head dim: 64, 128 or 256.
    #[arg(long, default_value_t = 128)]
    dim: usize,
    /// Bits per coordinate: 3 or 4.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(3..=4))]
    bits: u32,
    /// Query heads.
    #[arg(long, default_value_t = 8, value_parser = parse_positive)]
    heads: usize,
    /// KV heads.
    #[arg(long, default_value_t = 2, value_parser = parse_positive)]
    kv_heads: usize,
    /// Seed of the rotation and the data.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Query positions the CPU reference runs (spread evenly, the last included; at most
    /// --len of them).
    #[arg(long, default_value_t = 48, value_parser = parse_positive)]
    cpu_positions: usize,
    /// Query positions per quality measurement (spread evenly over the sequence; at most
    /// --len of them).
    #[arg(long, default_value_t = 24, value_parser = parse_positive)]
    quality_positions: usize,
    #[command(flatten)]
    run: RunArgs,
}

const MODES: [(ScoreMode, ValueMode); 4] = [
    (ScoreMode::Int8, ValueMode::Int8),
    (ScoreMode::Int8, ValueMode::F32),
    (ScoreMode::F32, ValueMode::Int8),
    (ScoreMode::F32, ValueMode::F32),
];

fn mode_name(m: (ScoreMode, ValueMode)) -> &'static str {
    match m {
        (ScoreMode::Int8, ValueMode::Int8) => "int8 tables, int8 values",
        (ScoreMode::Int8, ValueMode::F32) => "int8 tables, f32 values",
        (ScoreMode::F32, ValueMode::Int8) => "f32 tables, int8 values",
        (ScoreMode::F32, ValueMode::F32) => "f32 tables, f32 values",
    }
}

/// Roughly standard normal values (the sum of 4 uniforms, scaled), a pure function of the seed.
fn normal(seed: u64, tensor: u64, len: usize) -> Vec<f32> {
    (0..len as u64)
        .into_par_iter()
        .map(|i| {
            let s: f32 = (0..4).map(|j| init::uniform(seed, tensor, 4 * i + j)).sum();
            s * 0.866 // sqrt(3 / 4): unit variance
        })
        .collect()
}

/// Keys, values `[len, n_kv, D]` and queries `[len, H, D]`. Structured: 4 dominant positions
/// whose keys lie along one direction `u` that every query leans towards, so attention
/// concentrates on them.
struct Data {
    k: Vec<f32>,
    v: Vec<f32>,
    q: Vec<f32>,
}

fn data(seed: u64, len: usize, n_kv: usize, heads: usize, d: usize, structured: bool) -> Data {
    let mut k = normal(seed, 1, len * n_kv * d);
    let v = normal(seed, 2, len * n_kv * d);
    let mut q = normal(seed, 3, len * heads * d);
    if structured {
        let u: Vec<f32> = normal(seed, 4, d);
        let un = u.iter().map(|x| x * x).sum::<f32>().sqrt();
        let u: Vec<f32> = u.iter().map(|x| x / un).collect();
        let amp = 4.0 * (d as f32).sqrt();
        for j in 0..4u64 {
            let p = (init::hash(seed, 5, j) % len as u64) as usize;
            for h in 0..n_kv {
                let row = &mut k[(p * n_kv + h) * d..][..d];
                row.iter_mut()
                    .zip(&u)
                    .for_each(|(x, &ui)| *x = 0.1 * *x + amp * ui);
            }
        }
        q.chunks_mut(d)
            .for_each(|row| row.iter_mut().zip(&u).for_each(|(x, &ui)| *x += 2.0 * ui));
    }
    Data { k, v, q }
}

/// `k: [len, n_kv, D]` as per-head `[len, D]`.
fn per_head(x: &[f32], len: usize, n_kv: usize, d: usize, h: usize) -> Vec<f32> {
    (0..len)
        .flat_map(|p| x[(p * n_kv + h) * d..][..d].to_vec())
        .collect()
}

/// Positions `0..len` spread evenly, `count` of them, the last included.
fn spread(len: usize, count: usize) -> Vec<u32> {
    let count = count.clamp(1, len);
    let mut v: Vec<u32> = (0..count)
        .map(|i| ((len - 1) * (i + 1) / count) as u32)
        .collect();
    v.dedup();
    v
}

#[derive(Serialize)]
struct QualityRow {
    bits: u32,
    keys: &'static str,
    mode: &'static str,
    mean_relative_error: f64,
    max_relative_error: f64,
}

/// Relative error `|out - exact| / |exact|` (2-norms per query head) over `positions`.
fn quality(a: &FastScanArgs, positions: &[u32]) -> Vec<QualityRow> {
    let (d, nkv, heads) = (a.dim, a.kv_heads, a.heads);
    let mut rows = Vec::new();
    for structured in [false, true] {
        let dat = data(a.seed, a.len, nkv, heads, d, structured);
        let kh: Vec<Vec<f32>> = (0..nkv)
            .map(|h| per_head(&dat.k, a.len, nkv, d, h))
            .collect();
        let vh: Vec<Vec<f32>> = (0..nkv)
            .map(|h| per_head(&dat.v, a.len, nkv, d, h))
            .collect();
        let exact: Vec<Vec<f32>> = positions
            .par_iter()
            .flat_map_iter(|&t| {
                let (kh, vh, q) = (&kh, &vh, &dat.q);
                (0..heads).map(move |h| {
                    let qh = &q[(t as usize * heads + h) * d..][..d];
                    exact_attend(
                        qh,
                        &kh[h / (heads / nkv)],
                        &vh[h / (heads / nkv)],
                        t as usize,
                        d,
                    )
                })
            })
            .collect();
        for bits in [3, 4] {
            let spec = FastScanSpec::new(d, bits, a.seed).expect("checked dims");
            let mut cache = CpuCache::new(spec, nkv, a.len);
            cache.append(&dat.k, &dat.v);
            for mode in MODES {
                let outs: Vec<Vec<f32>> = positions
                    .par_iter()
                    .flat_map_iter(|&t| {
                        let qt = &dat.q[t as usize * heads * d..][..heads * d];
                        let out = cache.attention(qt, &[t], heads, mode.0, mode.1);
                        out.chunks(d).map(|o| o.to_vec()).collect::<Vec<_>>()
                    })
                    .collect();
                let errs: Vec<f64> = outs
                    .par_iter()
                    .zip(exact.par_iter())
                    .map(|(o, e)| {
                        let num: f64 = o
                            .iter()
                            .zip(e)
                            .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
                            .sum();
                        let den: f64 = e.iter().map(|&y| (y as f64).powi(2)).sum();
                        (num / den).sqrt()
                    })
                    .collect();
                rows.push(QualityRow {
                    bits,
                    keys: if structured { "structured" } else { "random" },
                    mode: mode_name(mode),
                    mean_relative_error: errs.iter().sum::<f64>() / errs.len() as f64,
                    max_relative_error: errs.iter().cloned().fold(0.0, f64::max),
                });
            }
        }
    }
    rows
}

#[derive(Serialize)]
struct Report {
    mode: &'static str,
    len: usize,
    dim: usize,
    bits: u32,
    heads: usize,
    kv_heads: usize,
    seed: u64,
    device: Option<String>,
    gpu_note: Option<String>,
    cpu_positions: Vec<u32>,
    comparisons: Vec<Comparison>,
    differing_total: u64,
    bit_exact: bool,
    codebook_mse_times_d: f64,
    quality: Vec<QualityRow>,
}

pub fn run(a: &FastScanArgs) -> Result<bool> {
    if !DIMS.contains(&a.dim) {
        usage!("--dim {}: one of 64, 128 or 256", a.dim);
    }
    if a.heads % a.kv_heads != 0 {
        usage!(
            "--heads {} must be a multiple of --kv-heads {}",
            a.heads,
            a.kv_heads
        );
    }
    // q, k, v in f32, the CPU cache's codes and the GPU paths' copies of q and outputs.
    let (len, d) = (a.len as u128, a.dim as u128);
    let (h, kv) = (a.heads as u128, a.kv_heads as u128);
    crate::output::check_host_bytes(
        "this fastscan run",
        4 * len * d * (3 * h + 2 * kv) + 2 * len * kv * d,
    )?;
    let spec = FastScanSpec::new(a.dim, a.bits, a.seed).map_err(crate::output::usage_err)?;
    let (d, nkv, heads, len) = (a.dim, a.kv_heads, a.heads, a.len);
    println!(
        "fastscan: {len} positions, D={d}, {} bits, {heads} query heads over {nkv} kv heads, seed {}",
        a.bits, a.seed
    );
    let (dev, gpu_note) = a.run.open_device()?;
    let dat = data(a.seed, len, nkv, heads, d, false);
    let cpu_pos = spread(len, a.cpu_positions);
    let mut comparisons = Vec::new();
    let mut progress = Progress::new((MODES.len() * (len + cpu_pos.len())) as u64);

    let t0 = Instant::now();
    let mut cpu = CpuCache::new(spec, nkv, len);
    cpu.append(&dat.k, &dat.v);
    let cpu_out: Vec<Vec<f32>> = MODES
        .iter()
        .map(|&m| {
            let o: Vec<f32> = cpu_pos
                .par_iter()
                .flat_map_iter(|&t| {
                    let qt = &dat.q[t as usize * heads * d..][..heads * d];
                    cpu.attention(qt, &[t], heads, m.0, m.1)
                })
                .collect();
            progress.inc(cpu_pos.len() as u64);
            o
        })
        .collect();
    println!(
        "cpu: {} query positions x 4 modes in {}",
        cpu_pos.len(),
        fmt_secs(t0.elapsed().as_secs_f64())
    );

    if let Some(dev) = &dev {
        let (batched, seq, codes) = gpu_paths(dev, a, spec, &dat, &mut progress)?;
        let (ck, cv) = (cpu.k.concat(), cpu.v.concat());
        let as_u32 = |b: &[u8]| b.iter().map(|&x| u32::from(x)).collect::<Vec<u32>>();
        comparisons.push(compare_u32(
            "cpu vs gpu",
            "K codes",
            &as_u32(&ck),
            &as_u32(&codes.0),
            spec.tile_bytes(),
        ));
        comparisons.push(compare_u32(
            "cpu vs gpu",
            "V codes",
            &as_u32(&cv),
            &as_u32(&codes.1),
            spec.tile_bytes(),
        ));
        for (i, &m) in MODES.iter().enumerate() {
            let name = mode_name(m);
            comparisons.push(compare_f32(
                "gpu-seq vs gpu-batched",
                name,
                &seq[i],
                &batched[i],
                heads * d,
            ));
            let sampled: Vec<f32> = cpu_pos
                .iter()
                .flat_map(|&t| batched[i][t as usize * heads * d..][..heads * d].to_vec())
                .collect();
            comparisons.push(compare_f32(
                "cpu vs gpu-batched",
                name,
                &cpu_out[i],
                &sampled,
                heads * d,
            ));
        }
    }
    progress.finish();

    println!();
    println!("| paths | tensor | elements | differing |");
    println!("|---|---|---:|---:|");
    for c in &comparisons {
        println!(
            "| {} | {} | {} | {} |",
            c.paths, c.tensor, c.elements, c.differing
        );
    }
    let differing_total: u64 = comparisons.iter().map(|c| c.differing).sum();
    for c in comparisons.iter().filter(|c| c.differing > 0) {
        if let Some(f) = &c.first {
            println!(
                "first divergence, {} {} (row = query position, column = head * D + d): {f}",
                c.paths, c.tensor
            );
        }
    }
    let bit_exact = differing_total == 0 && dev.is_some();
    if dev.is_none() {
        println!("no GPU paths ran: the CPU reference only");
    } else {
        println!(
            "\n{}: {differing_total} differing elements",
            if bit_exact { "BIT-EXACT" } else { "DIVERGED" }
        );
    }

    let t0 = Instant::now();
    let qpos = spread(len, a.quality_positions);
    let cb = bitexact::quant::fastscan::codebook(d, a.bits);
    let q = quality(a, &qpos);
    println!(
        "\nquality against exact f32 attention ({} query positions x {heads} heads, {}; codebook \
         MSE x D at {} bits: {:.6}):",
        qpos.len(),
        fmt_secs(t0.elapsed().as_secs_f64()),
        a.bits,
        cb.mse_times_d
    );
    println!("| bits | keys | mode | mean relative error | max relative error |");
    println!("|---:|---|---|---:|---:|");
    for r in &q {
        println!(
            "| {} | {} | {} | {:.4} | {:.4} |",
            r.bits, r.keys, r.mode, r.mean_relative_error, r.max_relative_error
        );
    }
    a.run.write_json(|| Report {
        mode: "fastscan",
        len,
        dim: d,
        bits: a.bits,
        heads,
        kv_heads: nkv,
        seed: a.seed,
        device: dev.as_ref().map(|d| d.name().to_string()),
        gpu_note,
        cpu_positions: cpu_pos.clone(),
        comparisons,
        differing_total,
        bit_exact,
        codebook_mse_times_d: cb.mse_times_d,
        quality: q,
    })?;
    if dev.is_none() {
        anyhow::bail!(
            "nothing was compared: the bit comparison needs the GPU paths (this run printed the \
             CPU reference's quality table only)"
        );
    }
    Ok(bit_exact)
}

type Codes = (Vec<u8>, Vec<u8>);
/// Per mode, every query's output `[len, H, D]`.
type PerMode = Vec<Vec<f32>>;

/// gpu-batched: one append of every position, one prefill launch of every query; gpu-seq: a
/// second cache appended one position at a time, the new position's query after each.
fn gpu_paths(
    dev: &Device,
    a: &FastScanArgs,
    spec: FastScanSpec,
    dat: &Data,
    progress: &mut Progress,
) -> Result<(PerMode, PerMode, Codes)> {
    let (d, nkv, heads, len) = (a.dim, a.kv_heads, a.heads, a.len);
    let mut ws = AttentionWorkspace::default();
    let t0 = Instant::now();
    let mut cache = FastScanCache::new(dev, spec, nkv, len)?;
    cache.append(
        dev,
        &GpuTensor::from_host(dev, &dat.k, &[len, nkv, d])?,
        &GpuTensor::from_host(dev, &dat.v, &[len, nkv, d])?,
    )?;
    let q = GpuTensor::from_host(dev, &dat.q, &[len, heads, d])?;
    let pos = Positions::new(dev, &(0..len as u32).collect::<Vec<_>>())?;
    let mut batched = Vec::new();
    for m in MODES {
        let mut out = GpuTensor::zeros(dev, &[len, heads, d])?;
        fastscan_attention(dev, &q, &cache, &pos, m.0, m.1, &mut ws, &mut out)?;
        batched.push(out.to_host()?);
    }
    println!(
        "gpu-batched: {len} queries x 4 modes in {}",
        fmt_secs(t0.elapsed().as_secs_f64())
    );

    let t0 = Instant::now();
    let mut inc = FastScanCache::new(dev, spec, nkv, len)?;
    let row = nkv * d;
    let mut seq: Vec<Vec<f32>> = vec![Vec::with_capacity(len * heads * d); MODES.len()];
    let mut out = GpuTensor::zeros(dev, &[1, heads, d])?;
    for t in 0..len {
        inc.append(
            dev,
            &GpuTensor::from_host(dev, &dat.k[t * row..(t + 1) * row], &[1, nkv, d])?,
            &GpuTensor::from_host(dev, &dat.v[t * row..(t + 1) * row], &[1, nkv, d])?,
        )?;
        let qt = GpuTensor::from_host(
            dev,
            &dat.q[t * heads * d..(t + 1) * heads * d],
            &[1, heads, d],
        )?;
        let pt = Positions::new(dev, &[t as u32])?;
        for (i, m) in MODES.iter().enumerate() {
            fastscan_attention(dev, &qt, &inc, &pt, m.0, m.1, &mut ws, &mut out)?;
            seq[i].extend(out.to_host()?);
        }
        progress.inc(MODES.len() as u64);
    }
    println!(
        "gpu-seq: {len} decode steps x 4 modes in {}",
        fmt_secs(t0.elapsed().as_secs_f64())
    );
    Ok((batched, seq, inc.to_host()?))
}
