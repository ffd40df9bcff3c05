//! `oracle moe-block`: one MoE block on the CPU (sequential, batched) and the GPU (token by
//! token, batched), compared bit for bit.

use std::time::Instant;

use anyhow::{Context, Result};
use bitexact::model::moe_block::{upload_input, GpuMoeBlock};
use bitexact::model::{MoeConfig, MoeOutput, MoeWeights};
use bitexact::quant::WeightFormat;
use bitexact::reference::moe_block;
use serde::Serialize;

use crate::compare::{compare_f32, compare_u32, Comparison};
use crate::output::{self, usage_err};
use crate::{fmt_secs, parse_format, parse_positive, Progress, RunArgs};

#[derive(clap::Args)]
pub struct MoeBlockArgs {
    /// Number of tokens (N).
    #[arg(long, default_value_t = 64, value_parser = parse_positive)]
    tokens: usize,
    /// Hidden size.
    #[arg(long, default_value_t = 512, value_parser = parse_positive)]
    dim: usize,
    /// Number of routed experts.
    #[arg(long, default_value_t = 32, value_parser = parse_positive)]
    experts: usize,
    /// Experts per token.
    #[arg(long, default_value_t = 4, value_parser = parse_positive)]
    top_k: usize,
    /// Inner size of each routed expert.
    #[arg(long, default_value_t = 256, value_parser = parse_positive)]
    ffn: usize,
    /// Inner size of the shared expert.
    #[arg(long, default_value_t = 256, value_parser = parse_positive)]
    shared_ffn: usize,
    /// No shared expert.
    #[arg(long)]
    no_shared: bool,
    /// Keep the softmax probabilities of the selected experts (no renormalisation).
    #[arg(long)]
    no_renorm: bool,
    /// Format of the experts' matrices: F32, F16, BF16, Q8_0, Q4_K, Q5_K or Q6_K.
    #[arg(long, default_value = "F32", value_parser = parse_format)]
    format: WeightFormat,
    /// Seed of the synthetic weights and inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    run: RunArgs,
}

/// One path's timing.
#[derive(Serialize)]
struct PathReport {
    name: &'static str,
    seconds: f64,
    tokens_per_second: f64,
}

#[derive(Serialize)]
struct Report {
    mode: &'static str,
    config: ConfigReport,
    device: Option<String>,
    gpu_note: Option<String>,
    paths: Vec<PathReport>,
    comparisons: Vec<Comparison>,
    differing_total: u64,
    bit_exact: bool,
}

#[derive(Serialize)]
struct ConfigReport {
    tokens: usize,
    dim: usize,
    experts: usize,
    top_k: usize,
    ffn: usize,
    shared_ffn: Option<usize>,
    renormalize: bool,
    format: String,
    seed: u64,
}

/// Tokens per progress step on the sequential paths.
const CHUNK: usize = 16;

pub fn run(a: &MoeBlockArgs) -> Result<bool> {
    let cfg = MoeConfig {
        dim: a.dim,
        n_experts: a.experts,
        top_k: a.top_k,
        ffn: a.ffn,
        shared_ffn: (!a.no_shared).then_some(a.shared_ffn),
        renormalize: !a.no_renorm,
        format: a.format,
    };
    cfg.validate().map_err(usage_err)?;
    let n = a.tokens;
    // The f32 weights (generated, then the format's copy) and each path's activations.
    let (d, e, f, k) = (
        cfg.dim as u128,
        cfg.n_experts as u128,
        cfg.ffn as u128,
        cfg.top_k as u128,
    );
    let sf = cfg.shared_ffn.unwrap_or(0) as u128;
    let weights = 4 * (d * e + 3 * d * f * e + 3 * d * sf) * 2;
    let acts = 4 * n as u128 * (2 * d + k * 3 * f + 3 * sf + e) * 4;
    output::check_host_bytes("this moe-block", weights + acts)?;
    println!("bitexact oracle: moe-block");
    println!(
        "config: tokens={n} dim={} experts={} top_k={} ffn={} shared_ffn={} renormalize={} format={} seed={} ({:.1} MiB of weights)",
        cfg.dim,
        cfg.n_experts,
        cfg.top_k,
        cfg.ffn,
        cfg.shared_ffn.map_or("none".to_string(), |s| s.to_string()),
        cfg.renormalize,
        cfg.format,
        a.seed,
        cfg.weight_bytes() as f64 / (1 << 20) as f64
    );

    let (dev, gpu_note) = a.run.open_device()?;

    let w = MoeWeights::generate(&cfg, a.seed)?;
    let x = MoeWeights::inputs(&cfg, a.seed, n);
    let n_paths = if dev.is_some() { 4 } else { 2 };
    let mut progress = Progress::new((n_paths * n) as u64);
    let mut outputs: Vec<(&'static str, MoeOutput, f64)> = Vec::new();

    progress.phase("cpu-seq");
    let t = Instant::now();
    let mut seq = MoeOutput {
        out: Vec::new(),
        ids: Vec::new(),
        weights: Vec::new(),
    };
    for chunk in x.chunks(CHUNK * cfg.dim) {
        let rows = chunk.len() / cfg.dim;
        let o = moe_block::forward_cpu(&w, chunk, rows)?;
        seq.out.extend(o.out);
        seq.ids.extend(o.ids);
        seq.weights.extend(o.weights);
        progress.inc(rows as u64);
    }
    outputs.push(("cpu-seq", seq, t.elapsed().as_secs_f64()));

    progress.phase("cpu-batched");
    let t = Instant::now();
    let o = moe_block::forward_cpu_batched(&w, &x, n)?;
    progress.inc(n as u64);
    outputs.push(("cpu-batched", o, t.elapsed().as_secs_f64()));

    if let Some(dev) = &dev {
        dev.warm_up().context("compiling the kernels")?;
        let block = GpuMoeBlock::upload(dev, &w).context("uploading the weights")?;
        let xg = upload_input(dev, &cfg, &x, n)?;
        dev.synchronize()?;

        progress.phase("gpu-seq");
        let t = Instant::now();
        let o = block.forward_sequential(dev, &xg)?.to_host()?;
        progress.inc(n as u64);
        outputs.push(("gpu-seq", o, t.elapsed().as_secs_f64()));

        progress.phase("gpu-batched");
        // One untimed run first: the first launches pay for module loading.
        block.forward_batched(dev, &xg)?;
        dev.synchronize()?;
        let t = Instant::now();
        let o = block.forward_batched(dev, &xg)?.to_host()?;
        progress.inc(n as u64);
        outputs.push(("gpu-batched", o, t.elapsed().as_secs_f64()));
    }
    progress.finish();

    println!();
    println!("{:<14}{:>12}{:>14}", "path", "time", "tokens/s");
    let mut paths = Vec::new();
    for (name, _, secs) in &outputs {
        let tps = n as f64 / secs.max(1e-12);
        println!("{name:<14}{:>12}{:>14.0}", fmt_secs(*secs), tps);
        paths.push(PathReport {
            name,
            seconds: *secs,
            tokens_per_second: tps,
        });
    }

    // Everything against the CPU sequential reference, and batched against sequential on
    // the GPU.
    let mut pairs = vec![(0, 1)];
    if outputs.len() == 4 {
        pairs.extend([(0, 2), (0, 3), (2, 3)]);
    }
    let mut comparisons = Vec::new();
    for (i, j) in pairs {
        let (a_name, a_out, _) = &outputs[i];
        let (b_name, b_out, _) = &outputs[j];
        let label = format!("{a_name} vs {b_name}");
        comparisons.push(compare_f32(
            &label, "output", &a_out.out, &b_out.out, cfg.dim,
        ));
        comparisons.push(compare_u32(
            &label,
            "expert ids",
            &a_out.ids,
            &b_out.ids,
            cfg.top_k,
        ));
        comparisons.push(compare_f32(
            &label,
            "routing weights",
            &a_out.weights,
            &b_out.weights,
            cfg.top_k,
        ));
    }
    println!();
    println!(
        "{:<28}{:<17}{:>10}{:>11}  first divergence",
        "comparison", "tensor", "elements", "differing"
    );
    for c in &comparisons {
        println!(
            "{:<28}{:<17}{:>10}{:>11}  {}",
            c.paths,
            c.tensor,
            c.elements,
            c.differing,
            c.first.as_ref().map_or("-".to_string(), |f| f.to_string())
        );
    }
    let differing_total: u64 = comparisons.iter().map(|c| c.differing).sum();
    let bit_exact = differing_total == 0;
    println!();
    if bit_exact {
        println!(
            "verdict: BIT-EXACT: 0 differing elements across {} paths ({})",
            outputs.len(),
            outputs.iter().map(|o| o.0).collect::<Vec<_>>().join(", ")
        );
    } else {
        println!("verdict: DIVERGENT: {differing_total} differing elements (see the first divergence above)");
    }

    a.run.write_json(|| Report {
        mode: "moe-block",
        config: ConfigReport {
            tokens: n,
            dim: cfg.dim,
            experts: cfg.n_experts,
            top_k: cfg.top_k,
            ffn: cfg.ffn,
            shared_ffn: cfg.shared_ffn,
            renormalize: cfg.renormalize,
            format: cfg.format.name().to_string(),
            seed: a.seed,
        },
        device: dev.as_ref().map(|d| format!("{} ({})", d.name(), d.arch())),
        gpu_note,
        paths,
        comparisons,
        differing_total,
        bit_exact,
    })?;
    Ok(bit_exact)
}
