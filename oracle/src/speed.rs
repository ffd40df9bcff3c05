//! `oracle speed`: prefill and decode throughput of the runner, beside the ceilings measured in
//! the same run (cuBLAS bf16 for the prefill flops, the device copy rate for the decode bytes).

use std::time::Instant;

use anyhow::{Context, Result};
use bitexact::model::weights::Mixer;
use bitexact::model::ModelConfig;
use bitexact::model::{prompt, GpuModel, Session};
use bitexact::quant::WeightFormat;
use bitexact::Device;
use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use half::bf16;

use crate::parse_format;

#[derive(clap::Args)]
pub struct SpeedArgs {
    /// Model preset: tiny (hidden 64), small (256), qwen3-30b-a3b (2048), tiny-hybrid (64),
    /// qwen3.6-35b-a3b (2048). The K-quant formats (Q4_K, Q5_K, Q6_K) need a hidden size that
    /// is a multiple of 256 (small and the large presets).
    #[arg(long, default_value = "qwen3-30b-a3b")]
    preset: String,
    /// Run a GGUF file (qwen3moe or qwen35moe, any mix of formats) instead of a preset: the
    /// file llama.cpp is measured on (`ci/side-by-side`).
    #[arg(long, value_parser = crate::parse_input, conflicts_with_all = ["preset", "format", "layers"])]
    gguf: Option<std::path::PathBuf>,
    /// Format of the experts (and attention and LM head for the large presets).
    #[arg(long, default_value = "Q8_0", value_parser = parse_format)]
    format: WeightFormat,
    /// Prompt lengths to prefill in one call.
    #[arg(long, default_value = "512,2048", value_delimiter = ',')]
    prefill: Vec<usize>,
    /// Contexts at which to time decode.
    #[arg(long, default_value = "512,8192", value_delimiter = ',')]
    decode_at: Vec<usize>,
    /// Decode steps timed at each context (the median step is reported).
    #[arg(long, default_value_t = 32, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    steps: usize,
    /// Timed repetitions of each prefill, after one warm-up (the median is reported).
    #[arg(long, default_value_t = 5, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    reps: usize,
    /// Keep only the first N layers of the preset (a quicker model for per-kernel work: every
    /// per-layer figure is unchanged, the totals are not the model's).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    layers: Option<usize>,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Also write the rows as JSON (for `ci/side-by-side`): per phase the median, min and max
    /// seconds and tokens per second.
    #[arg(long, value_parser = crate::parse_output)]
    json: Option<crate::output::Output>,
    /// After the timed runs, one more prefill of each length and one eager decode step at each
    /// context with an event before every launch: the time per kernel, longest first.
    #[arg(long)]
    profile: bool,
    /// Also time every prefill and decode row with the v2 attention kernels
    /// (`Session::set_attention_v2`), a same-run comparison (the same bits).
    #[arg(long)]
    attention_v2: bool,
    /// The DeltaNet scan of every solo row: auto (the library's choice), v1, v2, v3, v5 or v6
    /// (`Session::set_scan`; every version gives the same bits).
    #[arg(long, default_value = "auto", value_parser = crate::parse_scan)]
    scan: bitexact::kernels::delta_net::ScanKernel,
    /// The solo rows' KV cache: f32 (the default), f16, fastscan4 or fastscan3
    /// (`Session::with_kv_mode`; the coded modes take head dims 64, 128 or 256). A preset's
    /// context grows to the longest phase.
    #[arg(long, default_value = "f32", value_parser = crate::parse_kv)]
    kv: bitexact::model::KvMode,
    /// The solo rows' DeltaNet scan order: recurrence (the default) or chunked
    /// (`Session::set_scan_order`; other bits, measured against f64 in BENCHMARKS.md).
    #[arg(long, default_value = "recurrence", value_parser = crate::model::parse_scan_order)]
    scan_order: bitexact::reference::model::ScanOrder,
    /// Also time batched decode: for each count S, S sequences each prefilled to every
    /// --decode-at context, then steps of S decode rows (one per sequence) through one
    /// BatchSession; the aggregate tokens/s.
    #[arg(long, value_delimiter = ',', value_parser = crate::parse_positive)]
    sequences: Vec<usize>,
    /// Time batched decode alone (needs --sequences): no solo prefill or decode rows.
    #[arg(long)]
    batched_only: bool,
    /// Also time each batched row with its decode steps replayed from a captured step graph
    /// (`BatchSession::set_graphs`), right after the eager steps, on the same session.
    #[arg(long, requires = "sequences")]
    batch_graphs: bool,
    /// Also time mixed steps: each batched row's S sequences decode one token each while a
    /// new sequence's prompt goes in, this many tokens a step, in the same step (the shape of
    /// a chunked-prefill scheduler); 0: off.
    #[arg(long, default_value_t = 0, requires = "sequences")]
    mixed_chunk: usize,
}

/// The per-kernel table of one profiled stretch (`--profile`).
fn print_profile(what: &str, prof: &[bitexact::device::KernelTime]) {
    let total: f64 = prof.iter().map(|k| k.ms).sum();
    println!();
    println!(
        "profile, {what}: {total:.3} ms in {} launches (eager, an event before each)",
        prof.iter().map(|k| k.launches).sum::<u64>()
    );
    println!("| kernel | launches | ms | us/launch | share | host ms after its launches |");
    println!("|---|---:|---:|---:|---:|---:|");
    for k in prof.iter().take(20) {
        println!(
            "| {} | {} | {:.3} | {:.1} | {:.1}% | {:.3} |",
            k.name,
            k.launches,
            k.ms,
            k.ms * 1e3 / k.launches as f64,
            100.0 * k.ms / total,
            k.host_ms
        );
    }
}

/// One timed row of the JSON report.
#[derive(serde::Serialize)]
struct Row {
    /// `prefill` or `decode`.
    phase: &'static str,
    /// Prompt length (prefill) or context before the first step (decode).
    tokens: usize,
    /// Timed repetitions (prefill) or steps (decode).
    samples: usize,
    /// Seconds per prefill or per step: median, minimum, maximum.
    median_s: f64,
    min_s: f64,
    max_s: f64,
    /// Tokens per second at the median (batched decode: aggregate over the sequences).
    tokens_per_s: f64,
    /// Batched decode: the sequences decoding in each step (one row each).
    #[serde(skip_serializing_if = "Option::is_none")]
    sequences: Option<usize>,
    /// Batched decode: the --decode-at context the row belongs to (its steps start at
    /// `tokens`, later for the graph pass, which follows the eager one).
    #[serde(skip_serializing_if = "Option::is_none")]
    context: Option<usize>,
    /// Solo rows with a KV cache other than f32: its `--kv` name.
    #[serde(skip_serializing_if = "Option::is_none")]
    kv: Option<&'static str>,
    /// Solo rows of a hybrid model in the chunked scan order: `chunked`.
    #[serde(skip_serializing_if = "Option::is_none")]
    scan_order: Option<&'static str>,
}

/// A solo row's `scan_order`: `chunked` when --scan-order says so.
fn chunked_name(a: &SpeedArgs) -> Option<&'static str> {
    (a.scan_order != bitexact::reference::model::ScanOrder::Recurrence).then_some("chunked")
}

/// Parameters one token touches: attention, router and the top-k experts of every layer, plus
/// the LM head (the embedding row is a copy).
fn active(cfg: &ModelConfig) -> (f64, f64) {
    let bytes = |f: WeightFormat, elems: usize| (elems / f.block_elems() * f.block_bytes()) as f64;
    let (d, qd, kvd) = (
        cfg.dim,
        cfg.n_heads * cfg.head_dim,
        cfg.n_kv_heads * cfg.head_dim,
    );
    let m = &cfg.moe;
    let attn = d * qd * 2 + d * kvd * 2;
    let experts = m.top_k * 3 * d * m.ffn + m.shared_ffn.map_or(0, |s| 3 * d * s);
    let params = cfg.n_layers * (attn + d * m.n_experts + experts) + cfg.vocab * d;
    let weight_bytes = cfg.n_layers as f64
        * (bytes(cfg.attn_format, attn)
            + 4.0 * (d * m.n_experts) as f64
            + bytes(m.format, experts))
        + bytes(cfg.lm_head_format, cfg.vocab * d);
    (params as f64, weight_bytes)
}

/// [`active`] counted from the matrices themselves (their own formats, as a GGUF file mixes
/// them): per token, every attention matrix and router, `top_k / n_experts` of each expert
/// stack, the shared expert and the LM head.
fn active_of(w: &bitexact::model::ModelWeights) -> (f64, f64) {
    let c = &w.cfg;
    let share = c.moe.top_k as f64 / c.moe.n_experts as f64;
    let mat = |m: &bitexact::quant::QuantMatrix, f: f64| {
        (
            f * (m.experts() * m.rows() * m.cols()) as f64,
            f * m.bytes().len() as f64,
        )
    };
    let mut total = mat(&w.lm_head, 1.0);
    let mut add = |(p, b): (f64, f64)| {
        total.0 += p;
        total.1 += b;
    };
    for l in &w.layers {
        add(mat(&l.moe.router, 1.0));
        match &l.mixer {
            Mixer::Attention(a) => {
                for m in [&a.wq, &a.wk, &a.wv, &a.wo] {
                    add(mat(m, 1.0));
                }
            }
            Mixer::DeltaNet(d) => {
                for m in [&d.qkv, &d.z, &d.beta, &d.alpha, &d.out] {
                    add(mat(m, 1.0));
                }
            }
        }
        for m in [&l.moe.gate, &l.moe.up, &l.moe.down] {
            add(mat(m, share));
        }
        if let Some(s) = &l.moe.shared {
            for m in [&s.gate_inp, &s.gate, &s.up, &s.down] {
                add(mat(m, 1.0));
            }
        }
    }
    total
}

/// The fastest and slowest of `times`.
fn spread(times: &[f64]) -> (f64, f64) {
    (
        times.iter().copied().fold(f64::INFINITY, f64::min),
        times.iter().copied().fold(0.0, f64::max),
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// cuBLAS bf16 (f32 accumulate) on a `rows x 2048 x 2048` product: TFLOP/s.
fn cublas_bf16_rate(dev: &Device, rows: usize) -> Result<f64> {
    let blas = CudaBlas::new(dev.stream().clone())?;
    let (m, k) = (2048usize, 2048usize);
    let a = dev
        .stream()
        .clone_htod(&vec![bf16::from_f32(0.01); m * k])?;
    let b = dev
        .stream()
        .clone_htod(&vec![bf16::from_f32(0.5); rows * k])?;
    let mut c = dev.stream().alloc_zeros::<bf16>(rows * m)?;
    let cfg = GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_T,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: m as i32,
        n: rows as i32,
        k: k as i32,
        alpha: bf16::ONE,
        lda: k as i32,
        ldb: k as i32,
        beta: bf16::ZERO,
        ldc: m as i32,
    };
    let mut times = Vec::new();
    for i in 0..25 {
        dev.synchronize()?;
        let t = Instant::now();
        // SAFETY: a is [m, k], b [rows, k], c [rows, m], as the config states.
        unsafe { blas.gemm(cfg, &a, &b, &mut c) }?;
        dev.synchronize()?;
        if i >= 5 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    Ok(2.0 * (rows * m * k) as f64 / median(times) / 1e12)
}

/// Device-to-device copy rate (bytes read + written per second).
fn copy_rate(dev: &Device) -> Result<f64> {
    let n = 256usize << 20;
    let src = dev.stream().alloc_zeros::<u8>(n)?;
    let mut dst = dev.stream().alloc_zeros::<u8>(n)?;
    let mut times = Vec::new();
    for i in 0..15 {
        dev.synchronize()?;
        let t = Instant::now();
        dev.stream().memcpy_dtod(&src, &mut dst)?;
        dev.synchronize()?;
        if i >= 3 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    Ok(2.0 * n as f64 / median(times))
}

pub fn run(a: &SpeedArgs) -> Result<bool> {
    if a.batched_only && a.scan_order != bitexact::reference::model::ScanOrder::Recurrence {
        crate::output::usage!(
            "--scan-order chunked applies to the solo rows, and --batched-only runs none (the batched session scans in the recurrence)"
        );
    }
    if a.batched_only && a.kv != bitexact::model::KvMode::F32 {
        crate::output::usage!(
            "--kv {} applies to the solo rows, and --batched-only runs none (the batched session keeps an f32 cache)",
            crate::kv_name(a.kv)
        );
    }
    let longest = a
        .prefill
        .iter()
        .chain(&a.decode_at)
        .copied()
        .max()
        .unwrap_or(1);
    // Batched rows decode `steps` eagerly, `steps` more as graph replays, one profiled step
    // and up to `steps` beside a mixed prompt: at most 3 x steps + 1 past the longest phase.
    let past = if a.sequences.is_empty() {
        a.steps
    } else {
        3 * a.steps + 1
    };
    // A file: its weights as stored (llama.cpp's file, read once into host memory), with a
    // context long enough for the longest phase. A preset: generated layer by layer.
    let file = match &a.gguf {
        Some(path) => {
            let f = bitexact::gguf::GgufFile::open(path)?;
            let context = longest + past + 16;
            Some(bitexact::model::gguf::load(&f, Some(context), None)?)
        }
        None => None,
    };
    let cfg = match &file {
        Some(w) => w.cfg.clone(),
        None => {
            let mut cfg =
                ModelConfig::preset(&a.preset, a.format).map_err(crate::output::usage_err)?;
            if let Some(l) = a.layers {
                if l > cfg.n_layers {
                    crate::output::usage!("--layers {l}: the preset has {}", cfg.n_layers);
                }
                cfg.n_layers = l;
            }
            // Room for the longest phase and the decode steps after it.
            cfg.max_context = cfg.max_context.max(longest + past + 16);
            cfg
        }
    };
    let dev = Device::new(a.device)?;
    dev.warm_up()?;
    println!(
        "bitexact oracle: speed, {} on {} ({})",
        match &a.gguf {
            Some(p) => format!("{} ({})", cfg.name, p.display()),
            None => format!("{} with {} experts", cfg.name, a.format),
        },
        dev.name(),
        dev.arch()
    );
    let t = Instant::now();
    let (model, (params, wbytes)) = match &file {
        Some(w) => (
            GpuModel::load(&dev, w).context("uploading the model")?,
            active_of(w),
        ),
        None => (
            GpuModel::generate(&dev, &cfg, 0, longest, |_| {}).context("building the model")?,
            active(&cfg),
        ),
    };
    drop(file);
    println!(
        "model generated and uploaded in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    if a.batched_only {
        anyhow::ensure!(
            !a.sequences.is_empty(),
            "--batched-only needs --sequences (the counts of sequences to time)"
        );
        let copy = copy_rate(&dev)?;
        println!("same-run ceiling: copy {:.0} GB/s", copy / 1e9);
        let mut rows = Vec::new();
        batched(a, &dev, &model, &cfg, &mut rows)?;
        return finish_json(a, &rows);
    }
    if a.scan_order != bitexact::reference::model::ScanOrder::Recurrence && cfg.hybrid.is_none() {
        crate::output::usage!(
            "--scan-order chunked orders the DeltaNet layers' scan, and {} has none",
            cfg.name
        );
    }
    let mut s = Session::with_kv_mode(&dev, &model, a.kv)?;
    if a.kv != bitexact::model::KvMode::F32 {
        println!("KV cache: {} (solo rows)", crate::kv_name(a.kv));
    }
    s.set_scan_order(&dev, a.scan_order)?;
    if a.scan_order != bitexact::reference::model::ScanOrder::Recurrence {
        println!("DeltaNet scan order: chunked (solo rows)");
    }
    s.set_scan(a.scan);
    if a.scan != bitexact::kernels::delta_net::ScanKernel::Auto {
        println!("DeltaNet scan: {:?}", a.scan);
    }
    let bf16_rate = cublas_bf16_rate(&dev, 2048)?;
    let copy = copy_rate(&dev)?;
    println!("same-run ceilings: cuBLAS bf16 {bf16_rate:.0} TFLOP/s (2048 x 2048 x 2048), copy {:.0} GB/s", copy / 1e9);
    println!();
    println!("| phase | tokens | time | tokens/s | same flops at cuBLAS bf16 / launches | active weight bytes at copy rate |");
    println!("|---|---:|---:|---:|---:|---:|");
    let mut decode_rows = Vec::new();
    let mut rows: Vec<Row> = Vec::new();
    // A short prefill first: module loads and scratch growth stay out of the numbers.
    s.prefill(&dev, &prompt(1, 16, cfg.vocab))?;
    let versions: &[bool] = if a.attention_v2 {
        &[false, true]
    } else {
        &[false]
    };
    for (&n, &v2) in a
        .prefill
        .iter()
        .flat_map(|n| versions.iter().map(move |v| (n, v)))
    {
        s.set_attention_v2(v2);
        let tokens = prompt(2, n, cfg.vocab);
        // A warm-up prefill, then the median of `reps` (prefill is far longer than a step).
        let mut times = Vec::new();
        for rep in 0..=a.reps {
            s.reset();
            dev.synchronize()?;
            let t = Instant::now();
            s.prefill(&dev, &tokens)?;
            dev.synchronize()?;
            if rep > 0 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        let (lo, hi) = spread(&times);
        let secs = median(times);
        rows.push(Row {
            phase: if v2 {
                "prefill, attention v2"
            } else {
                "prefill"
            },
            tokens: n,
            samples: a.reps,
            median_s: secs,
            min_s: lo,
            max_s: hi,
            tokens_per_s: n as f64 / secs,
            sequences: None,
            context: None,
            kv: (a.kv != bitexact::model::KvMode::F32).then(|| crate::kv_name(a.kv)),
            scan_order: chunked_name(a),
        });
        let ideal = 2.0 * params * n as f64 / (bf16_rate * 1e12);
        println!(
            "| prefill{} | {n} | {:.1} ms (min {:.1}, max {:.1}, {} reps) | {:.0} | {:.1} ms | - |",
            if v2 {
                ", attention v2 (same-run comparison)"
            } else {
                ""
            },
            secs * 1e3,
            lo * 1e3,
            hi * 1e3,
            a.reps,
            n as f64 / secs,
            ideal * 1e3
        );
    }
    // Each context twice: kernels launched as the library does by default, then with launch
    // overlap (programmatic dependent launch) the other way, as a same-run comparison; on a
    // device without it, once.
    let default_overlap = dev.launch_overlap();
    dev.set_launch_overlap(true);
    let can_overlap = dev.launch_overlap();
    s.set_attention_v2(false);
    for &c in &a.decode_at {
        // (launch overlap, attention v2): the default, the other overlap, then v2.
        let mut modes = if can_overlap {
            vec![(default_overlap, false), (!default_overlap, false)]
        } else {
            vec![(false, false)]
        };
        if a.attention_v2 {
            modes.push((default_overlap, true));
        }
        for (overlap, v2) in modes {
            dev.set_launch_overlap(overlap);
            s.set_attention_v2(v2);
            // A new capture under this setting.
            s.set_graphs(false);
            s.set_graphs(true);
            s.reset();
            s.prefill(&dev, &prompt(3, c, cfg.vocab))?;
            let steps = prompt(4, a.steps, cfg.vocab);
            dev.synchronize()?;
            let launches0 = dev.launches();
            let replays0 = s.stats().graph_replays;
            let mut times = Vec::with_capacity(steps.len());
            for &tok in &steps {
                let t = Instant::now();
                s.decode(&dev, tok)?;
                times.push(t.elapsed().as_secs_f64());
            }
            let replays = s.stats().graph_replays - replays0;
            if let Some(e) = &s.stats().graph_error {
                println!("decode graph capture failed (steps launched eagerly): {e}");
            }
            let eager = (dev.launches() - launches0) as f64 / a.steps as f64;
            let (lo, hi) = spread(&times);
            let secs = median(times);
            rows.push(Row {
                phase: if v2 {
                    "decode, attention v2"
                } else if overlap == default_overlap {
                    "decode"
                } else if overlap {
                    "decode, launch overlap on"
                } else {
                    "decode, launch overlap off"
                },
                tokens: c,
                samples: a.steps,
                median_s: secs,
                min_s: lo,
                max_s: hi,
                tokens_per_s: 1.0 / secs,
                sequences: None,
                context: None,
                kv: (a.kv != bitexact::model::KvMode::F32).then(|| crate::kv_name(a.kv)),
                scan_order: chunked_name(a),
            });
            // Kernels in one step: those of the captured graph (one launch a step), or the
            // eager launches per step.
            let kernels = s.graph_kernels().map_or(eager, |k| k as f64);
            let label = if v2 {
                format!("decode at context {c}, attention v2 (same-run comparison)")
            } else if overlap == default_overlap {
                format!("decode at context {c}")
            } else {
                let on = if overlap { "on" } else { "off" };
                format!("decode at context {c}, launch overlap {on} (same-run comparison)")
            };
            decode_rows.push(format!(
                "| {label} | {} ({replays} graph replays) | {:.2} ms/token (min {:.2}, max {:.2}) | {:.1} | {kernels:.0} kernels/step ({:.1}/layer) | {:.3} ms/token ({:.0} tokens/s, {:.2} of it) |",
                a.steps,
                secs * 1e3,
                lo * 1e3,
                hi * 1e3,
                1.0 / secs,
                kernels / cfg.n_layers as f64,
                wbytes / copy * 1e3,
                copy / wbytes,
                (1.0 / secs) / (copy / wbytes)
            ));
            println!("{}", decode_rows.last().unwrap());
        }
    }
    dev.set_launch_overlap(default_overlap);
    s.set_attention_v2(false);
    if !a.sequences.is_empty() {
        drop(s);
        batched(a, &dev, &model, &cfg, &mut rows)?;
        return finish_json(a, &rows);
    }
    if a.profile {
        s.set_graphs(false);
        for &v2 in versions {
            s.set_attention_v2(v2);
            let tag = if v2 { ", attention v2" } else { "" };
            for &n in &a.prefill {
                s.reset();
                dev.synchronize()?;
                dev.set_profiling(true);
                s.prefill(&dev, &prompt(2, n, cfg.vocab))?;
                print_profile(&format!("prefill {n}{tag}"), &dev.take_profile()?);
            }
            for &c in &a.decode_at {
                s.reset();
                s.prefill(&dev, &prompt(3, c, cfg.vocab))?;
                s.decode(&dev, 1)?;
                dev.synchronize()?;
                dev.set_profiling(true);
                s.decode(&dev, 2)?;
                print_profile(
                    &format!("decode step at context {}{tag}", c + 1),
                    &dev.take_profile()?,
                );
            }
        }
        s.set_attention_v2(false);
    }
    finish_json(a, &rows)
}

/// Writes the rows as JSON when `--json` was given.
fn finish_json(a: &SpeedArgs, rows: &[Row]) -> Result<bool> {
    if let Some(out) = &a.json {
        out.write(serde_json::to_string_pretty(rows)?.as_bytes())?;
        println!("report: {}", out.path().display());
    }
    Ok(true)
}

/// Batched decode (`--sequences`): for each context `c` of `--decode-at` and each count `S`,
/// `S` sequences of one [`bitexact::model::BatchSession`], each prefilled alone to `c`
/// tokens (its own prompt), then `--steps` steps of `S` decode rows, one per sequence; the
/// median step, the aggregate tokens/s, the launches per step and the KV cache held per
/// sequence. With `--profile`, one more step with an event before each launch.
fn batched(
    a: &SpeedArgs,
    dev: &Device,
    model: &GpuModel,
    cfg: &ModelConfig,
    rows: &mut Vec<Row>,
) -> Result<()> {
    use bitexact::model::{BatchSession, BatchToken, PAGE};
    let attn_layers = (0..cfg.n_layers)
        .filter(|&l| cfg.is_attention_layer(l))
        .count();
    // f32 keys and values of every attention layer's kv heads, per position.
    let kv_bytes_per_pos = 2 * 4 * cfg.n_kv_heads * cfg.head_dim * attn_layers;
    println!();
    println!("| batched decode | context each | sequences | step | aggregate tokens/s | per sequence | launches/step | KV cache per sequence |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for &c in &a.decode_at {
        for &n_seq in &a.sequences {
            // Decode positions: two timed passes, one profiled step, the mixed steps.
            let pages_each = (c + 3 * a.steps + 3).div_ceil(PAGE);
            // The mixed sequence's prompt stays inside the context.
            let mixed_steps = match a.mixed_chunk {
                0 => 0,
                k => a.steps.min(cfg.max_context / k),
            };
            let mixed_pages = (mixed_steps * a.mixed_chunk).div_ceil(PAGE);
            let mut bs = match BatchSession::new(dev, model, n_seq * pages_each + mixed_pages) {
                Err(e @ bitexact::Error::OutOfMemory { .. }) => {
                    println!(
                        "| batched decode | {c} | {n_seq} | does not fit: {e} | - | - | - | - |"
                    );
                    continue;
                }
                r => r?,
            };
            let mut ids = Vec::with_capacity(n_seq);
            for q in 0..n_seq {
                let id = bs.add_sequence(dev)?;
                let rows: Vec<BatchToken> = prompt(3 + q as u64, c, cfg.vocab)
                    .iter()
                    .enumerate()
                    .map(|(p, &token)| BatchToken {
                        seq: id,
                        pos: p as u32,
                        token,
                    })
                    .collect();
                for chunk in rows.chunks(2048) {
                    bs.step(dev, chunk)?;
                }
                ids.push(id);
            }
            let step = |i: usize, tok: u32| -> Vec<BatchToken> {
                ids.iter()
                    .map(|&seq| BatchToken {
                        seq,
                        pos: (c + i) as u32,
                        token: tok,
                    })
                    .collect()
            };
            let toks = prompt(4, 2 * a.steps + 1, cfg.vocab);
            let modes: &[bool] = if a.batch_graphs {
                &[false, true]
            } else {
                &[false]
            };
            for (pass, &graphs) in modes.iter().enumerate() {
                bs.set_graphs(graphs);
                let first = pass * a.steps;
                let mut times = Vec::with_capacity(a.steps);
                dev.synchronize()?;
                let launches0 = dev.launches();
                for (i, &tok) in toks[first..first + a.steps].iter().enumerate() {
                    let batch = step(first + i, tok);
                    dev.synchronize()?;
                    let t = Instant::now();
                    bs.step(dev, &batch)?;
                    times.push(t.elapsed().as_secs_f64());
                }
                let launches = (dev.launches() - launches0) as f64 / a.steps as f64;
                let (lo, hi) = spread(&times);
                let secs = median(times);
                let phase = match graphs {
                    false => "batched decode",
                    true => "batched decode graph",
                };
                rows.push(Row {
                    phase,
                    tokens: c + first,
                    samples: a.steps,
                    median_s: secs,
                    min_s: lo,
                    max_s: hi,
                    tokens_per_s: n_seq as f64 / secs,
                    sequences: Some(n_seq),
                    context: Some(c),
                    kv: None,
                    scan_order: None,
                });
                println!(
                    "| {phase} | {} | {n_seq} | {:.2} ms (min {:.2}, max {:.2}) | {:.1} | {:.1} | {launches:.0} | {:.1} MB |",
                    c + first,
                    secs * 1e3,
                    lo * 1e3,
                    hi * 1e3,
                    n_seq as f64 / secs,
                    1.0 / secs,
                    (pages_each * PAGE * kv_bytes_per_pos) as f64 / 1e6,
                );
                if graphs {
                    let st = bs.stats();
                    println!(
                        "  (graph: {} replays, {} captures{})",
                        st.graph_replays,
                        st.captures,
                        st.graph_error
                            .as_ref()
                            .map_or(String::new(), |e| format!(", failed: {e}"))
                    );
                }
            }
            bs.set_graphs(false);
            let mut next = c + modes.len() * a.steps;
            if a.profile {
                let last = modes.len() * a.steps;
                next += 1;
                let batch = step(last, toks[last]);
                dev.synchronize()?;
                let t = Instant::now();
                dev.set_profiling(true);
                bs.step(dev, &batch)?;
                let prof = dev.take_profile()?;
                let wall = t.elapsed().as_secs_f64();
                print_profile(
                    &format!(
                        "batched decode step, {n_seq} sequences at context {} ({:.3} ms wall)",
                        c + last,
                        wall * 1e3
                    ),
                    &prof,
                );
                println!();
            }
            if mixed_steps > 0 {
                // A new sequence's prompt, mixed_chunk rows a step, beside every decode row.
                let m = bs.add_sequence(dev)?;
                let text = prompt(99, mixed_steps * a.mixed_chunk, cfg.vocab);
                let mut times = Vec::with_capacity(mixed_steps);
                for i in 0..mixed_steps {
                    let mut batch = step(next - c + i, 1);
                    batch.extend((i * a.mixed_chunk..(i + 1) * a.mixed_chunk).map(|p| {
                        BatchToken {
                            seq: m,
                            pos: p as u32,
                            token: text[p],
                        }
                    }));
                    dev.synchronize()?;
                    let t = Instant::now();
                    bs.step(dev, &batch)?;
                    times.push(t.elapsed().as_secs_f64());
                }
                let (lo, hi) = spread(&times);
                let secs = median(times);
                let per_step = n_seq + a.mixed_chunk;
                println!(
                    "| batched mixed: {n_seq} decode rows + {} prompt rows | {next} | {n_seq} | {:.2} ms (min {:.2}, max {:.2}) | {:.1} | - | - | - |",
                    a.mixed_chunk,
                    secs * 1e3,
                    lo * 1e3,
                    hi * 1e3,
                    per_step as f64 / secs,
                );
                rows.push(Row {
                    phase: "batched mixed",
                    tokens: next,
                    samples: mixed_steps,
                    median_s: secs,
                    min_s: lo,
                    max_s: hi,
                    tokens_per_s: per_step as f64 / secs,
                    sequences: Some(n_seq),
                    context: Some(c),
                    kv: None,
                    scan_order: None,
                });
            }
        }
    }
    Ok(())
}
