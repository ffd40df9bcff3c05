//! `oracle model`: the full decoder on several paths, compared after every layer and at the
//! logits.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use bitexact::kernels::delta_net::ScanKernel;
use bitexact::model::KvMode;
use bitexact::model::ModelConfig;
use bitexact::model::{prompt, CpuSession, GpuModel, ModelWeights, Session, Trace};
use bitexact::quant::WeightFormat;
use bitexact::reference::model::ScanOrder;
use serde::Serialize;

use crate::compare::{compare_f32, Comparison};
use crate::output::{usage, usage_err};
use crate::{fmt_secs, parse_format, Progress, RunArgs};

#[derive(clap::Args)]
pub struct ModelArgs {
    /// Model preset: tiny (hidden 64), small (256), qwen3-30b-a3b (2048), tiny-hybrid (64),
    /// qwen3.6-35b-a3b (2048). The K-quant formats (Q4_K, Q5_K, Q6_K) need a hidden size that
    /// is a multiple of 256 (small and the large presets); --kv fastscan3/4 needs head dims of
    /// 64, 128 or 256 (the large presets).
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Run a real model file (GGUF, qwen3moe or qwen35moe) instead of a preset (its weights
    /// and formats are the file's: --preset and --format do not apply).
    #[arg(long, value_parser = crate::parse_input, conflicts_with_all = ["preset", "format"])]
    gguf: Option<PathBuf>,
    /// KV cache positions for a GGUF model (default: the file's context length, at most 4096;
    /// at most the file's context length).
    #[arg(long, requires = "gguf", value_parser = crate::parse_positive)]
    max_context: Option<usize>,
    /// Format of the experts (and, for the large presets, attention and LM head).
    #[arg(long, default_value = "F32", value_parser = parse_format)]
    format: WeightFormat,
    /// Prompt length.
    #[arg(long, default_value_t = 32, value_parser = crate::parse_positive)]
    tokens: usize,
    /// Seed of the weights and the prompt.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Chunk size of the chunked prefill path (repeat for several).
    #[arg(long = "chunk", value_parser = crate::parse_positive)]
    chunks: Vec<usize>,
    /// Paths to run, comma-separated: cpu (the sequential reference), cpu-batched,
    /// cpu-chunked, gpu-seq, gpu-batched, gpu-chunked.
    #[arg(
        long,
        default_value = "cpu,cpu-batched,cpu-chunked,gpu-seq,gpu-batched,gpu-chunked",
        value_delimiter = ','
    )]
    paths: Vec<String>,
    /// Layers the CPU reference runs (default: all for tiny and small, 2 for the large presets).
    #[arg(long, value_parser = crate::parse_positive)]
    cpu_layers: Option<usize>,
    /// Tokens the CPU reference runs, a prefix of the prompt (default: all for tiny and small,
    /// 16 for the large presets).
    #[arg(long, value_parser = crate::parse_positive)]
    cpu_tokens: Option<usize>,
    /// KV cache of the attention layers, on every path: f32 (the default), f16, fastscan4,
    /// fastscan3 (the coded modes take head dims 64, 128 or 256).
    #[arg(long, default_value = "f32", value_parser = crate::parse_kv)]
    kv: KvMode,
    /// Also run the whole prompt once more with an f32 cache and the recurrent scan (on the
    /// GPU when one opened, else on the CPU over its scope) and report what --kv and
    /// --scan-order cost against it: per token the relative L2 of the logits (median, max),
    /// the tokens whose top-1 changed, and the bytes a position takes per attention layer.
    /// Needs --kv other than f32 or --scan-order chunked.
    #[arg(long)]
    quality: bool,
    /// Reduction orders: f32 (the canonical orders every kernel computes) or exact (the exact
    /// integer orders of attention and of every matrix product, summed exactly and rounded
    /// once: the CPU reference's, the GPU paths then do not run).
    #[arg(long, default_value = "f32", value_parser = crate::parse_orders)]
    order: crate::Orders,
    /// The DeltaNet layers' scan order: recurrence (the default) or chunked (64-token chunks:
    /// the CPU reference's `scan_chunked_cpu`, the GPU's `delta_net_chunk_*` kernels).
    #[arg(long, default_value = "recurrence", value_parser = parse_scan_order)]
    scan_order: ScanOrder,
    /// Stop at the first divergence.
    #[arg(long)]
    stop_early: bool,
    /// Run the GPU paths' attention through the v2 kernels (asynchronous tile and split:
    /// `Session::set_attention_v2`).
    #[arg(long)]
    attention_v2: bool,
    /// The DeltaNet scan the GPU paths run: auto (the library's choice), v1, v2, v3, v5 or v6
    /// (`Session::set_scan`; every version gives the same bits).
    #[arg(long, default_value = "auto", value_parser = crate::parse_scan)]
    scan: ScanKernel,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Serialize)]
struct PathRun {
    name: String,
    tokens: usize,
    layers: usize,
    seconds: f64,
    tokens_per_second: f64,
    forward_calls: Vec<usize>,
}

#[derive(Serialize)]
struct Report {
    mode: &'static str,
    preset: String,
    format: String,
    kv: &'static str,
    order: &'static str,
    scan_order: &'static str,
    tokens: usize,
    seed: u64,
    device: Option<String>,
    note: Option<String>,
    scope: String,
    paths: Vec<PathRun>,
    comparisons: Vec<Comparison>,
    first_divergence: Option<String>,
    differing_total: u64,
    bit_exact: bool,
    quality: Option<Quality>,
}

/// What the KV mode costs against an f32 cache (`--quality`).
#[derive(Serialize)]
struct Quality {
    /// The path whose logits were measured.
    path: String,
    tokens: usize,
    median_relative_l2: f64,
    max_relative_l2: f64,
    top1_changed: usize,
    /// Bytes a position takes per attention layer, K and V, in the mode and with f32.
    bytes_per_position: usize,
    f32_bytes_per_position: usize,
}

impl Quality {
    /// `got` against `want`, logits of `tokens` rows of `vocab`.
    fn of(
        path: &str,
        got: &[f32],
        want: &[f32],
        vocab: usize,
        cfg: &ModelConfig,
        kv: KvMode,
    ) -> Self {
        let mut rel = Vec::new();
        let mut top1_changed = 0;
        let argmax = |r: &[f32]| {
            r.iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |m, (i, &v)| if v > m.1 { (i, v) } else { m },
                )
                .0
        };
        for (g, w) in got.chunks(vocab).zip(want.chunks(vocab)) {
            let num: f64 = g
                .iter()
                .zip(w)
                .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
                .sum();
            let den: f64 = w.iter().map(|b| f64::from(*b).powi(2)).sum();
            rel.push((num / den).sqrt());
            top1_changed += usize::from(argmax(g) != argmax(w));
        }
        let tokens = rel.len();
        rel.sort_by(f64::total_cmp);
        let per_head = |bytes: usize| 2 * cfg.n_kv_heads * bytes;
        let hd = cfg.head_dim;
        let bytes_per_position = match kv {
            KvMode::F32 => per_head(4 * hd),
            KvMode::F16 => per_head(2 * hd),
            KvMode::FastScan { bits } => bitexact::quant::fastscan::FastScanSpec::new(hd, bits, 0)
                .map_or(0, |spec| per_head(spec.tile_bytes()) / 32),
        };
        Quality {
            path: path.into(),
            tokens,
            median_relative_l2: rel.get(tokens / 2).copied().unwrap_or(f64::NAN),
            max_relative_l2: rel.last().copied().unwrap_or(f64::NAN),
            top1_changed,
            bytes_per_position,
            f32_bytes_per_position: per_head(4 * hd),
        }
    }
}

struct Ran {
    run: PathRun,
    trace: Trace,
    /// The recurrent (DeltaNet) state after the path's last token (a hybrid model; empty
    /// otherwise).
    state: Vec<f32>,
}

/// Where the weights come from: a preset's generator, or a GGUF file.
enum Source {
    Preset(u64),
    Gguf(bitexact::gguf::GgufFile),
}

impl Source {
    fn weights(&self, cfg: &ModelConfig, layers: Option<usize>) -> Result<ModelWeights> {
        Ok(match self {
            Source::Preset(seed) => ModelWeights::generate(cfg, *seed, layers)?,
            Source::Gguf(f) => bitexact::model::gguf::load(f, Some(cfg.max_context), layers)?,
        })
    }
}

/// The `--paths` names.
const PATHS: [&str; 6] = [
    "cpu",
    "cpu-batched",
    "cpu-chunked",
    "gpu-seq",
    "gpu-batched",
    "gpu-chunked",
];

/// Prints comparison `c` (`what` in the table, `op` in the first divergence), keeps its first
/// divergence if none was found before, and adds it to the report.
fn record(
    first: &mut Option<String>,
    comparisons: &mut Vec<Comparison>,
    c: Comparison,
    op: &str,
    what: &str,
) {
    let f = c.first.as_ref().map(|f| format!("op {op}, {f}"));
    println_cmp(&c.paths, what, c.elements, c.differing, f.as_deref());
    if first.is_none() {
        *first = f;
    }
    comparisons.push(c);
}

/// What every path of a run shares, settled before any path runs: the model, the prompt,
/// the device (or why there is none) and the CPU reference's scope.
struct Setup {
    cfg: ModelConfig,
    source: Source,
    n: usize,
    prompt_ids: Vec<u32>,
    dev: Option<bitexact::Device>,
    note: Option<String>,
    scope: String,
    cpu_layers: usize,
    cpu_tokens: usize,
}

/// `oracle model`: [`setup`] (the checks, refused before anything runs), [`run_paths`],
/// [`report`].
pub fn run(a: &ModelArgs) -> Result<bool> {
    let s = setup(a)?;
    let (runs, f32_run) = run_paths(a, &s)?;
    report(a, &s, runs, f32_run)
}

/// The model and the run's limits, every argument checked against them.
fn setup(a: &ModelArgs) -> Result<Setup> {
    let (cfg, source) = match &a.gguf {
        Some(path) => {
            let f = bitexact::gguf::GgufFile::open(path)?;
            let cfg = bitexact::model::gguf::config(&f, a.max_context)?;
            println!(
                "model file: {} ({} tensors)",
                path.display(),
                f.tensors.len()
            );
            (cfg, Source::Gguf(f))
        }
        None => (
            ModelConfig::preset(&a.preset, a.format).map_err(usage_err)?,
            Source::Preset(a.seed),
        ),
    };
    let large = cfg.n_layers > 8;
    let n = a.tokens;
    // Limits that depend on the model: refused before anything runs, naming the fix.
    if n > cfg.max_context {
        usage!(
            "--tokens {n} exceeds the model's context of {} positions",
            cfg.max_context
        );
    }
    if let Some(&c) = a.chunks.iter().find(|&&c| c > n) {
        usage!(
            "--chunk {c} exceeds --tokens {n}: that path would be one prefill of the whole \
             prompt, which gpu-batched and cpu-batched already run"
        );
    }
    if let Some(l) = a.cpu_layers.filter(|&l| l > cfg.n_layers) {
        usage!(
            "--cpu-layers {l} exceeds the model's {} layers",
            cfg.n_layers
        );
    }
    if let Some(t) = a.cpu_tokens.filter(|&t| t > n) {
        usage!("--cpu-tokens {t} exceeds --tokens {n}");
    }
    if a.quality && a.kv == KvMode::F32 && a.scan_order == ScanOrder::Recurrence {
        usage!(
            "--quality measures --kv and --scan-order against an f32 cache and the recurrence: name --kv f16, fastscan4 or fastscan3, or --scan-order chunked"
        );
    }
    if let Some(p) = a.paths.iter().find(|p| !PATHS.contains(&p.as_str())) {
        usage!(
            "unknown path `{p}` in --paths (one of {})",
            PATHS.join(", ")
        );
    }
    let want = |p: &str| a.paths.iter().any(|x| x == p);
    let cpu_named = ["cpu", "cpu-batched", "cpu-chunked"]
        .iter()
        .any(|p| want(p));
    if a.run.cpu && !cpu_named {
        usage!(
            "--paths {} names GPU paths only and --cpu forbids them: nothing would run",
            a.paths.join(",")
        );
    }
    if !a.chunks.is_empty() && !want("cpu-chunked") && !want("gpu-chunked") {
        usage!(
            "--chunk applies to the chunked paths, and --paths {} names none",
            a.paths.join(",")
        );
    }
    if a.order != crate::Orders::F32 && !cpu_named {
        usage!(
            "--order {} runs on the CPU paths only, and --paths {} names none",
            a.order.name(),
            a.paths.join(",")
        );
    }
    if a.scan_order != ScanOrder::Recurrence && cfg.hybrid.is_none() {
        usage!("--scan-order chunked orders the DeltaNet layers' scan, and this model has none");
    }
    let prompt_ids = prompt(a.seed, n, cfg.vocab);
    println!("bitexact oracle: model");
    println!(
        "preset: {} ({} layers, hidden {}, {} / {} heads of {}, {} experts top-{}, ffn {}, shared {}, vocab {}), format {}, {} tokens, seed {} ({:.1} MiB of weights)",
        cfg.name,
        cfg.n_layers,
        cfg.dim,
        cfg.n_heads,
        cfg.n_kv_heads,
        cfg.head_dim,
        cfg.moe.n_experts,
        cfg.moe.top_k,
        cfg.moe.ffn,
        cfg.moe.shared_ffn.map_or("none".into(), |s| s.to_string()),
        cfg.vocab,
        if a.gguf.is_some() { cfg.moe.format } else { a.format },
        n,
        a.seed,
        cfg.weight_bytes() as f64 / (1u64 << 20) as f64
    );
    let (dev, note) = a.run.open_device()?;
    let (dev, note) = match (dev, &cfg.hybrid) {
        (Some(_), _) if a.order != crate::Orders::F32 => {
            let why = "the kernels compute the f32 orders: --order exact runs the CPU paths only";
            println!("device: not used ({why})");
            (None, Some(why.to_string()))
        }
        (dev, _) => (dev, note),
    };
    if dev.is_some()
        && a.kv != KvMode::F32
        && !bitexact::quant::fastscan::DIMS.contains(&cfg.head_dim)
    {
        usage!(
            "--kv {} on the GPU takes head dims 64, 128 or 256, and the model's are {} (add --cpu for the CPU paths)",
            crate::kv_name(a.kv),
            cfg.head_dim
        );
    }
    println!("kv cache: {}", crate::kv_name(a.kv));
    println!("order: {}", a.order.name());
    if cfg.hybrid.is_some() {
        println!("scan order: {}", scan_order_name(a.scan_order));
    }
    let cpu_layers = a
        .cpu_layers
        .unwrap_or(if large { 2 } else { cfg.n_layers })
        .min(cfg.n_layers);
    let cpu_tokens = a.cpu_tokens.unwrap_or(if large { 16 } else { n }).min(n);
    let scope = if cpu_layers < cfg.n_layers || cpu_tokens < n {
        format!(
            "the CPU reference runs layers 0..{cpu_layers} over tokens 0..{cpu_tokens}; GPU paths are compared with it there and with each other everywhere"
        )
    } else {
        "every path runs every layer and token".into()
    };
    println!("scope: {scope}");

    Ok(Setup {
        cfg,
        source,
        n,
        prompt_ids,
        dev,
        note,
        scope,
        cpu_layers,
        cpu_tokens,
    })
}

/// Runs the paths `--paths` names (the GPU ones when a device opened), each from the start;
/// with `--quality`, also the whole prompt with an f32 cache.
fn run_paths(a: &ModelArgs, s: &Setup) -> Result<(Vec<Ran>, Option<Ran>)> {
    let Setup {
        cfg,
        source,
        n,
        prompt_ids,
        dev,
        cpu_layers,
        cpu_tokens,
        ..
    } = s;
    let (n, cpu_layers, cpu_tokens) = (*n, *cpu_layers, *cpu_tokens);
    let want = |p: &str| a.paths.iter().any(|x| x == p);
    let mut runs: Vec<Ran> = Vec::new();
    let gpu_paths = dev.is_some() as usize
        * (want("gpu-seq") as usize
            + want("gpu-batched") as usize
            + want("gpu-chunked") as usize * a.chunks.len().max(1));
    let cpu_count = want("cpu") as usize
        + want("cpu-batched") as usize
        + want("cpu-chunked") as usize * a.chunks.len().max(1);
    let mut progress = Progress::new((cpu_count * cpu_tokens + gpu_paths * n) as u64);

    let chunks = if a.chunks.is_empty() {
        vec![(n / 3).max(1)]
    } else {
        a.chunks.clone()
    };
    let cpu_paths: Vec<(String, Vec<Vec<u32>>)> = [
        (
            "cpu",
            prompt_ids[..cpu_tokens].iter().map(|&t| vec![t]).collect(),
        ),
        ("cpu-batched", vec![prompt_ids[..cpu_tokens].to_vec()]),
    ]
    .into_iter()
    .map(|(name, steps)| (name.to_string(), steps))
    .chain(chunks.iter().map(|&c| {
        (
            format!("cpu-chunked-{c}"),
            prompt_ids[..cpu_tokens]
                .chunks(c.max(1))
                .map(|s| s.to_vec())
                .collect(),
        )
    }))
    .filter(|(name, _)| want(kind(name)))
    .collect();
    if !cpu_paths.is_empty() {
        progress.phase("weights");
        let w = source.weights(cfg, Some(cpu_layers))?;
        for (name, steps) in cpu_paths {
            progress.phase("cpu");
            let mut s = CpuSession::new(&w);
            s.set_kv_mode(a.kv)?;
            s.set_scan_order(a.scan_order)?;
            let (attn, gemm) = a.order.parts();
            s.set_orders(attn, gemm);
            let mut trace = Trace::default();
            let t = Instant::now();
            for step in &steps {
                s.forward(step, &mut trace)?;
                progress.inc(step.len() as u64);
            }
            let secs = t.elapsed().as_secs_f64();
            runs.push(Ran {
                run: PathRun {
                    name,
                    tokens: cpu_tokens,
                    layers: cpu_layers,
                    seconds: secs,
                    tokens_per_second: cpu_tokens as f64 / secs.max(1e-12),
                    forward_calls: steps.iter().map(|s| s.len()).collect(),
                },
                trace,
                state: s.recurrent_state(),
            });
        }
    }

    if let Some(dev) = &dev {
        dev.warm_up().context("compiling the kernels")?;
        progress.phase("weights");
        let model = match &source {
            Source::Preset(seed) => GpuModel::generate(dev, cfg, *seed, n, |_| {})
                .context("building the model on the GPU")?,
            Source::Gguf(_) => {
                bitexact::model::transformer::check_fits(dev, cfg, n)?;
                GpuModel::load(dev, &source.weights(cfg, None)?)
                    .context("loading the model onto the GPU")?
            }
        };
        let mut session = Session::with_kv_mode(dev, &model, a.kv)?;
        session.set_attention_v2(a.attention_v2);
        if a.attention_v2 {
            println!("gpu attention: the v2 kernels (asynchronous tile and split)");
        }
        session.set_scan_order(dev, a.scan_order)?;
        session.set_scan(a.scan);
        if a.scan != ScanKernel::Auto {
            println!("gpu DeltaNet scan: {:?}", a.scan);
        }
        let mut gpu_path =
            |name: String, steps: Vec<Vec<u32>>, progress: &mut Progress| -> Result<Ran> {
                progress.phase("gpu");
                session.reset();
                // One untimed step warms the launch paths of this shape.
                let mut trace = Trace::default();
                dev.synchronize()?;
                let t = Instant::now();
                for step in &steps {
                    session.forward(dev, step, Some(&mut trace))?;
                    progress.inc(step.len() as u64);
                }
                dev.synchronize()?;
                let secs = t.elapsed().as_secs_f64();
                Ok(Ran {
                    run: PathRun {
                        name,
                        tokens: n,
                        layers: cfg.n_layers,
                        seconds: secs,
                        tokens_per_second: n as f64 / secs.max(1e-12),
                        forward_calls: session.stats().calls.clone(),
                    },
                    trace,
                    state: session.recurrent_state()?,
                })
            };
        if want("gpu-seq") {
            let steps = prompt_ids.iter().map(|&t| vec![t]).collect();
            runs.push(gpu_path("gpu-seq".into(), steps, &mut progress)?);
        }
        if want("gpu-batched") {
            runs.push(gpu_path(
                "gpu-batched".into(),
                vec![prompt_ids.clone()],
                &mut progress,
            )?);
        }
        if want("gpu-chunked") {
            for &c in &chunks {
                let steps = prompt_ids.chunks(c.max(1)).map(|s| s.to_vec()).collect();
                runs.push(gpu_path(format!("gpu-chunked-{c}"), steps, &mut progress)?);
            }
        }
        if a.quality {
            progress.phase("gpu, f32 cache");
            drop(session);
            let mut f32s = Session::new(dev, &model)?;
            let mut trace = Trace::default();
            f32s.forward(dev, prompt_ids, Some(&mut trace))?;
            progress.finish();
            return Ok((runs, Some(f32_ran("gpu-baseline", n, cfg.n_layers, trace))));
        }
    }
    progress.finish();
    if a.quality {
        // No GPU: the CPU over its scope.
        let w = source.weights(cfg, Some(cpu_layers))?;
        let mut s = CpuSession::new(&w);
        let (attn, gemm) = a.order.parts();
        s.set_orders(attn, gemm);
        let mut trace = Trace::default();
        s.forward(&prompt_ids[..cpu_tokens], &mut trace)?;
        return Ok((
            runs,
            Some(f32_ran("cpu-baseline", cpu_tokens, cpu_layers, trace)),
        ));
    }
    Ok((runs, None))
}

/// The `--quality` run with an f32 cache.
fn f32_ran(name: &str, tokens: usize, layers: usize, trace: Trace) -> Ran {
    Ran {
        run: PathRun {
            name: name.into(),
            tokens,
            layers,
            seconds: 0.0,
            tokens_per_second: 0.0,
            forward_calls: vec![tokens],
        },
        trace,
        state: Vec::new(),
    }
}

/// The paths' table, every comparison, the verdict and the JSON report.
fn report(a: &ModelArgs, s: &Setup, runs: Vec<Ran>, f32_run: Option<Ran>) -> Result<bool> {
    let Setup {
        cfg,
        n,
        dev,
        note,
        scope,
        ..
    } = s;
    let (n, note, scope) = (*n, note.clone(), scope.clone());

    println!();
    println!(
        "{:<18}{:>8}{:>8}{:>14}{:>12}  forward calls",
        "path", "tokens", "layers", "time", "tokens/s"
    );
    for r in &runs {
        let calls = &r.run.forward_calls;
        let shape = if calls.iter().all(|&c| c == 1) {
            format!("{} x 1", calls.len())
        } else {
            format!("{calls:?}")
        };
        println!(
            "{:<18}{:>8}{:>8}{:>14}{:>12.1}  {shape}",
            r.run.name,
            r.run.tokens,
            r.run.layers,
            fmt_secs(r.run.seconds),
            r.run.tokens_per_second
        );
    }

    // Every path against the first (the CPU reference when it ran), then every GPU path
    // against gpu-seq.
    let mut pairs = Vec::new();
    for j in 1..runs.len() {
        pairs.push((0, j));
    }
    if let Some(seq) = runs.iter().position(|r| r.run.name == "gpu-seq") {
        for (j, r) in runs.iter().enumerate() {
            if j != seq && j != 0 && r.run.name.starts_with("gpu") {
                pairs.push((seq, j));
            }
        }
    }
    let d = cfg.dim;
    let mut comparisons = Vec::new();
    let mut first: Option<String> = None;
    'outer: for (i, j) in pairs {
        let (ra, rb) = (&runs[i], &runs[j]);
        let label = format!("{} vs {}", ra.run.name, rb.run.name);
        let tokens = ra.run.tokens.min(rb.run.tokens);
        let layers = ra.run.layers.min(rb.run.layers);
        let mut layer_diff = 0;
        let mut elements = 0;
        let mut worst: Option<String> = None;
        for l in 0..layers {
            let c = compare_f32(
                &label,
                "hidden",
                &ra.trace.layers[l][..tokens * d],
                &rb.trace.layers[l][..tokens * d],
                d,
            );
            elements += c.elements;
            layer_diff += c.differing;
            if worst.is_none() {
                if let Some(f) = &c.first {
                    worst = Some(format!("layer {l}, op layer-output, {f}"));
                }
            }
        }
        comparisons.push(Comparison {
            paths: label.clone(),
            tensor: "hidden (every layer)",
            elements,
            differing: layer_diff,
            first: None,
        });
        println_cmp(
            &label,
            "hidden, every layer",
            elements,
            layer_diff,
            worst.as_deref(),
        );
        if first.is_none() {
            first = worst.clone();
        }
        if ra.run.layers == cfg.n_layers && rb.run.layers == cfg.n_layers {
            let v = cfg.vocab;
            let c = compare_f32(
                &label,
                "logits",
                &ra.trace.logits[..tokens * v],
                &rb.trace.logits[..tokens * v],
                v,
            );
            record(
                &mut first,
                &mut comparisons,
                c,
                "logits",
                "logits, every token",
            );
        }
        // States after the same tokens through the same layers only (the CPU's scope may be
        // shorter than the GPU paths').
        // A path that should have a state of the same length and has not is a divergence.
        let same_scope = ra.run.tokens == rb.run.tokens && ra.run.layers == rb.run.layers;
        if same_scope && (!ra.state.is_empty() || !rb.state.is_empty()) {
            // compare_f32 counts every element one side lacks as differing.
            let n = ra.state.len().max(rb.state.len());
            let c = compare_f32(&label, "state", &ra.state, &rb.state, n);
            record(
                &mut first,
                &mut comparisons,
                c,
                "recurrent-state",
                "state, every DeltaNet",
            );
        }
        if a.stop_early && first.is_some() {
            println!("stopping at the first divergence (--stop-early)");
            break 'outer;
        }
    }
    let differing_total: u64 = comparisons.iter().map(|c| c.differing).sum();
    let bit_exact = differing_total == 0 && !comparisons.is_empty();
    let compared = !comparisons.is_empty();
    println!();
    if !compared {
        println!(
            "verdict: nothing compared ({} ran)",
            match runs.len() {
                0 => "no path".to_string(),
                1 => format!("one path, {},", runs[0].run.name),
                k => format!("{k} paths"),
            }
        );
    } else if bit_exact {
        println!(
            "verdict: BIT-EXACT: 0 differing elements across {} paths ({})",
            runs.len(),
            runs.iter()
                .map(|r| r.run.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    } else {
        println!(
            "verdict: DIVERGENT: {differing_total} differing elements; first: {}",
            first.as_deref().unwrap_or("-")
        );
    }
    // --quality: the mode's run over the f32 run's tokens and layers (the batched one first)
    // against it.
    let quality = f32_run.and_then(|f| {
        let same = |r: &&Ran| r.run.tokens == f.run.tokens && r.run.layers == f.run.layers;
        let Some(got) = runs
            .iter()
            .filter(same)
            .find(|r| r.run.name.ends_with("-batched"))
            .or_else(|| runs.iter().find(same))
        else {
            println!(
                "quality: not measured (no path ran the f32 run's {} tokens and {} layers)",
                f.run.tokens, f.run.layers
            );
            return None;
        };
        let (g, w) = (&got.trace.logits, &f.trace.logits);
        if w.is_empty() || g.len() != w.len() {
            println!("quality: not measured (the f32 run has no logits: its layers are not the whole model's)");
            return None;
        }
        Some(Quality::of(&got.run.name, g, w, cfg.vocab, cfg, a.kv))
    });
    if let Some(q) = &quality {
        println!();
        println!(
            "quality of the {} cache and the {} scan against an f32 cache and the recurrence ({} vs {}, {} tokens; synthetic weights): logits' relative L2 median {:.2e}, max {:.2e}; top-1 changed at {} of {} tokens; {} bytes a position per attention layer (f32: {})",
            crate::kv_name(a.kv),
            scan_order_name(a.scan_order),
            q.path,
            if dev.is_some() { "gpu-baseline" } else { "cpu-baseline" },
            q.tokens,
            q.median_relative_l2,
            q.max_relative_l2,
            q.top1_changed,
            q.tokens,
            q.bytes_per_position,
            q.f32_bytes_per_position
        );
    }
    a.run.write_json(|| Report {
        mode: "model",
        preset: cfg.name.clone(),
        format: if a.gguf.is_some() {
            cfg.moe.format.name().into()
        } else {
            a.format.name().into()
        },
        kv: crate::kv_name(a.kv),
        order: a.order.name(),
        scan_order: scan_order_name(a.scan_order),
        tokens: n,
        seed: a.seed,
        device: dev.as_ref().map(|d| format!("{} ({})", d.name(), d.arch())),
        note,
        scope,
        paths: runs.into_iter().map(|r| r.run).collect(),
        comparisons,
        first_divergence: first,
        differing_total,
        bit_exact,
        quality,
    })?;
    if !compared {
        anyhow::bail!(
            "nothing was compared: a verdict needs two paths that ran ({}); name more in \
             --paths, or run where a GPU opens",
            match dev {
                None => "no GPU path ran here",
                Some(_) => "the paths named cover fewer than two",
            }
        );
    }
    Ok(bit_exact)
}

/// The `--paths` entry a path name belongs to (`cpu-chunked-16` -> `cpu-chunked`).
fn kind(name: &str) -> &str {
    match name.find("-chunked") {
        Some(i) => &name[..i + "-chunked".len()],
        None => name,
    }
}

fn println_cmp(label: &str, what: &str, elements: usize, differing: u64, first: Option<&str>) {
    println!(
        "{label:<34}{what:<22}{elements:>12}{differing:>11}  {}",
        first.unwrap_or("-")
    );
}

/// `--scan-order`: recurrence or chunked.
pub(crate) fn parse_scan_order(s: &str) -> Result<ScanOrder, String> {
    match s {
        "recurrence" => Ok(ScanOrder::Recurrence),
        "chunked" => Ok(ScanOrder::Chunked),
        _ => Err(format!(
            "unknown scan order `{s}` (one of recurrence, chunked)"
        )),
    }
}

/// The `--scan-order` name of an order.
fn scan_order_name(o: ScanOrder) -> &'static str {
    match o {
        ScanOrder::Recurrence => "recurrence",
        ScanOrder::Chunked => "chunked",
    }
}
