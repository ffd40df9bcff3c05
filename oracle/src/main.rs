//! `oracle`: runs bitexact's computation paths side by side on the same inputs and compares
//! every output bit for bit, naming the first divergence.

mod batch;
mod compare;
mod fastscan;
mod model;
mod output;
mod speed;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bitexact::model::moe_block::{upload_input, GpuMoeBlock};
use bitexact::model::{MoeConfig, MoeOutput, MoeWeights};
use bitexact::quant::WeightFormat;
use bitexact::reference::moe_block;
use bitexact::Device;
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use compare::{compare_f32, compare_u32, Comparison};
use output::{usage, usage_err, Output};

#[derive(Parser)]
#[command(name = "oracle", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The MoE feed-forward block: CPU sequential, CPU batched, GPU one token at a time and GPU
    /// batched over all tokens, compared bit for bit.
    MoeBlock(MoeBlockArgs),
    /// The whole decoder: CPU reference, GPU decode one token at a time, GPU batched prefill and
    /// GPU chunked prefill, compared after every layer and at the logits.
    Model(model::ModelArgs),
    /// Attention over a FastScan-encoded KV cache: GPU prefill of every query against GPU
    /// decode one query at a time and the CPU reference, bit for bit; and the quality table.
    Fastscan(fastscan::FastScanArgs),
    /// Prefill and decode throughput of the runner against same-run ceilings (GPU only).
    Speed(speed::SpeedArgs),
    /// Many sequences served together (a seeded schedule of arrivals, prompt chunks mixed with
    /// decode tokens, pages freed and reused) against each sequence run alone, bit for bit.
    Batch(batch::BatchArgs),
    /// Print a GGUF file's metadata and tensor table.
    Inspect(InspectArgs),
    /// Write a preset's synthetic model as a qwen3moe GGUF file (llama.cpp loads it).
    Export(ExportArgs),
    /// Write every token's logits for given token ids (the side-by-side harness compares them
    /// with llama.cpp's `bitexact-logits`): CPU reference, or the GPU in one prefill.
    Logits(LogitsArgs),
}

#[derive(clap::Args)]
struct LogitsArgs {
    /// Token ids, little-endian u32 (a regular file).
    #[arg(long, value_parser = parse_input)]
    tokens: PathBuf,
    /// Output: one row of `vocab` little-endian f32 logits per token (a new or regular file;
    /// a link is followed).
    #[arg(long, value_parser = parse_output)]
    out: Output,
    /// A GGUF file (qwen3moe or qwen35moe) instead of a preset.
    #[arg(long, value_parser = parse_input, conflicts_with_all = ["preset", "format", "seed", "no_shared"])]
    gguf: Option<PathBuf>,
    #[command(flatten)]
    preset: PresetArgs,
    /// Run on the GPU (one prefill of every token); the CPU reference otherwise. Both give
    /// the same bits.
    #[arg(long)]
    gpu: bool,
}

fn run_logits(a: &LogitsArgs) -> Result<bool> {
    use bitexact::model::{CpuSession, GpuModel, Session, Trace};
    let raw =
        std::fs::read(&a.tokens).with_context(|| format!("reading {}", a.tokens.display()))?;
    if raw.is_empty() || raw.len() % 4 != 0 {
        usage!(
            "{}: {} bytes is not a positive number of u32 token ids",
            a.tokens.display(),
            raw.len()
        );
    }
    let tokens: Vec<u32> = raw
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let w = match &a.gguf {
        Some(path) => {
            let f = bitexact::gguf::GgufFile::open(path)
                .with_context(|| format!("reading {}", path.display()))?;
            bitexact::model::gguf::load(&f, Some(tokens.len().max(1)), None)?
        }
        None => a.preset.weights()?,
    };
    if let Some((i, &t)) = tokens
        .iter()
        .enumerate()
        .find(|(_, &t)| t as usize >= w.cfg.vocab)
    {
        usage!(
            "--tokens {}: token {i} is id {t}, past the model's vocabulary of {} ids",
            a.tokens.display(),
            w.cfg.vocab
        );
    }
    let mut trace = Trace::default();
    if a.gpu {
        let dev = Device::new(0)?;
        let model = GpuModel::load(&dev, &w)?;
        let mut s = Session::new(&dev, &model)?;
        s.forward(&dev, &tokens, Some(&mut trace))?;
    } else {
        CpuSession::new(&w).forward(&tokens, &mut trace)?;
    }
    let bytes: Vec<u8> = trace.logits.iter().flat_map(|x| x.to_le_bytes()).collect();
    a.out.write(&bytes)?;
    println!(
        "wrote {} tokens x {} logits to {}",
        tokens.len(),
        w.cfg.vocab,
        a.out.path().display()
    );
    Ok(true)
}

/// A preset's synthetic weights, as `export` and `logits` take them.
#[derive(clap::Args)]
struct PresetArgs {
    /// Model preset: tiny (hidden 64), small (256), qwen3-30b-a3b (2048), tiny-hybrid (64),
    /// qwen3.6-35b-a3b (2048). The K-quant formats (Q4_K, Q5_K, Q6_K) need a hidden size that
    /// is a multiple of 256 (small and the large presets).
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Format of the experts (and, for large presets, attention and LM head).
    #[arg(long, default_value = "F32", value_parser = parse_format)]
    format: WeightFormat,
    /// Seed of the weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Leave the preset's shared expert out (llama.cpp's qwen3moe has none: a file with one
    /// does not load there).
    #[arg(long)]
    no_shared: bool,
}

impl PresetArgs {
    fn config(&self) -> Result<bitexact::model::ModelConfig> {
        let mut cfg =
            bitexact::model::ModelConfig::preset(&self.preset, self.format).map_err(usage_err)?;
        if self.no_shared {
            cfg.moe.shared_ffn = None;
        }
        Ok(cfg)
    }

    fn weights(&self) -> Result<bitexact::model::ModelWeights> {
        Ok(bitexact::model::ModelWeights::generate(
            &self.config()?,
            self.seed,
            None,
        )?)
    }
}

#[derive(clap::Args)]
struct ExportArgs {
    /// Output path (a new or regular file; a link is followed).
    #[arg(value_parser = parse_output)]
    path: Output,
    #[command(flatten)]
    preset: PresetArgs,
}

/// Streams the preset to `path` one layer at a time (a 30B preset is a 32 GB file), through
/// a temporary file renamed at the end, so an interrupted export (an error, Ctrl-C, SIGTERM)
/// leaves no partial file. A file system without room for it is refused before writing.
fn run_export(a: &ExportArgs) -> Result<bool> {
    use std::io::Write;
    let cfg = a.preset.config()?;
    a.path.check_space(cfg.weight_bytes() as u64)?;
    let mut pending = a.path.create()?;
    let mut out = std::io::BufWriter::with_capacity(8 << 20, pending.file());
    let bar = ProgressBar::new(cfg.n_layers as u64);
    bar.set_draw_target(ProgressDrawTarget::stderr_with_hz(4));
    let written =
        bitexact::model::gguf::export_preset(&cfg, a.preset.seed, &mut out, |_| bar.inc(1));
    bar.finish_and_clear();
    let written = written
        .map_err(anyhow::Error::from)
        .and_then(|n| out.flush().map(|_| n).map_err(anyhow::Error::from))
        .map_err(|e| e.context(format!("writing {}", a.path.path().display())))?;
    drop(out);
    pending.commit()?;
    println!("wrote {} ({written} bytes)", a.path.path().display());
    Ok(true)
}

#[derive(clap::Args)]
struct InspectArgs {
    /// The GGUF file (a regular file).
    #[arg(value_parser = parse_input)]
    path: PathBuf,
    /// Print every metadata value in full (long arrays are abbreviated otherwise).
    #[arg(long)]
    all: bool,
}

fn run_inspect(a: &InspectArgs) -> Result<bool> {
    use bitexact::gguf::GgufFile;
    let f = GgufFile::open(&a.path)?;
    println!(
        "{}: GGUF v{}, {} metadata keys, {} tensors, alignment {}, data at byte {} ({:.1} MiB)",
        a.path.display(),
        f.version,
        f.metadata.len(),
        f.tensors.len(),
        f.alignment,
        f.data_offset,
        f.len() as f64 / (1u64 << 20) as f64
    );
    println!();
    for (k, v) in &f.metadata {
        let shown = if a.all { format!("{v:?}") } else { v.display() };
        println!("  {k:<48} {shown}");
    }
    println!();
    println!(
        "  {:<40} {:<6} {:<28} {:>14}",
        "tensor", "type", "shape", "bytes"
    );
    let mut total = 0u64;
    for t in &f.tensors {
        total += t.bytes;
        println!(
            "  {:<40} {:<6} {:<28} {:>14}",
            t.name,
            t.ty.name,
            format!("{:?}", t.dims),
            t.bytes
        );
    }
    println!("  {:<76} {:>14}", "total", total);
    match bitexact::model::gguf::config(&f, None) {
        Ok(c) => println!("\nrunner config: {c:?}"),
        Err(e) => println!("\nthe runner cannot build this file: {e}"),
    }
    Ok(true)
}

#[derive(clap::Args)]
struct MoeBlockArgs {
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

/// Options every comparison mode shares.
#[derive(clap::Args)]
pub(crate) struct RunArgs {
    /// CPU paths only, even when a GPU is present.
    #[arg(long)]
    cpu: bool,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Write a JSON report to this path (a new or regular file; a link is followed).
    #[arg(long, value_parser = parse_output)]
    json: Option<Output>,
}

impl RunArgs {
    /// The device (none with `--cpu` or when none opens) and a note saying why there is none;
    /// prints the choice. With `BITEXACT_REQUIRE_GPU=1` (the GPU machine's runner sets it) a
    /// device that does not open is an error, not a run of the CPU paths alone.
    pub(crate) fn open_device(&self) -> Result<(Option<Device>, Option<String>)> {
        let (dev, note) = if self.cpu {
            (None, Some("--cpu given: CPU paths only".to_string()))
        } else {
            match Device::new(self.device) {
                Ok(d) => (Some(d), None),
                Err(e) if std::env::var("BITEXACT_REQUIRE_GPU").is_ok_and(|v| v == "1") => {
                    bail!(
                        "{e}, and BITEXACT_REQUIRE_GPU=1 requires the GPU paths (unset it, or pass --cpu, to run the CPU paths only)"
                    )
                }
                Err(e) => (None, Some(format!("{e}: running the CPU paths only"))),
            }
        };
        match (&dev, &note) {
            (Some(d), _) => println!("device: {} ({})", d.name(), d.arch()),
            (None, note) => println!("device: none ({})", note.as_deref().unwrap_or("")),
        }
        Ok((dev, note))
    }

    /// Writes `report` as JSON when `--json` was given.
    pub(crate) fn write_json<T: Serialize>(&self, report: impl FnOnce() -> T) -> Result<()> {
        if let Some(out) = &self.json {
            out.write(serde_json::to_string_pretty(&report())?.as_bytes())?;
            println!("report: {}", out.path().display());
        }
        Ok(())
    }
}

/// `--json`, `--out`, `export PATH`: checked before anything runs ([`Output::check`]).
pub(crate) fn parse_output(s: &str) -> Result<Output, String> {
    Output::check("", std::path::Path::new(s)).map_err(|e| e.to_string())
}

/// An input file: a regular file ([`output::check_input`]).
pub(crate) fn parse_input(s: &str) -> Result<PathBuf, String> {
    output::check_input("", std::path::Path::new(s)).map_err(|e| e.to_string())?;
    Ok(PathBuf::from(s))
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

/// A progress bar that stays hidden for the first second, so quick runs print only the table.
pub(crate) struct Progress {
    bar: ProgressBar,
    start: Instant,
    shown: bool,
}

impl Progress {
    pub(crate) fn new(total: u64) -> Self {
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden());
        bar.set_style(
            ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} tokens ({eta})")
                .expect("static template")
                .progress_chars("=> "),
        );
        Progress {
            bar,
            start: Instant::now(),
            shown: false,
        }
    }

    pub(crate) fn phase(&self, name: &'static str) {
        self.bar.set_message(name);
    }

    pub(crate) fn inc(&mut self, n: u64) {
        if !self.shown && self.start.elapsed() > Duration::from_secs(1) {
            self.bar.set_draw_target(ProgressDrawTarget::stderr());
            self.shown = true;
        }
        self.bar.inc(n);
    }

    pub(crate) fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// Tokens per progress step on the sequential paths.
const CHUNK: usize = 16;

fn main() {
    // A closed pipe (`oracle inspect f.gguf | head`) ends the process quietly, as it does for
    // other Unix tools, instead of a panic in println!.
    // SAFETY: restoring the default disposition of one signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // An interrupted write removes its temporary file.
    output::install_signal_cleanup();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            eprintln!(
                "{} (see --help)",
                clap_line(&e.to_string()).trim_end_matches(':')
            );
            std::process::exit(2);
        }
    };
    let result = match cli.command {
        Command::MoeBlock(args) => run_moe_block(&args),
        Command::Model(args) => model::run(&args),
        Command::Fastscan(args) => fastscan::run(&args),
        Command::Speed(args) => speed::run(&args),
        Command::Batch(args) => batch::run(&args),
        Command::Inspect(args) => run_inspect(&args),
        Command::Export(args) => run_export(&args),
        Command::Logits(args) => run_logits(&args),
    };
    let code = match result {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) => {
            eprintln!("error: {e:#}");
            // Refused before anything ran: 2, as clap's refusals; a failure: 1.
            match e.downcast_ref::<output::Usage>() {
                Some(_) => 2,
                None => 1,
            }
        }
    };
    std::process::exit(code);
}

/// clap's error as one line: its first line, with the items it lists after it (the missing
/// arguments, say) joined on; usage and tips are left to --help.
fn clap_line(text: &str) -> String {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or("invalid arguments");
    if !first.starts_with("error") {
        return "error: a subcommand is needed".into();
    }
    let items: Vec<&str> = lines
        .take_while(|l| {
            !l.starts_with("Usage:") && !l.starts_with("tip:") && !l.starts_with("For more")
        })
        .collect();
    match items.is_empty() {
        true => first.to_string(),
        false => format!("{}: {}", first.trim_end_matches(':'), items.join(", ")),
    }
}

fn run_moe_block(a: &MoeBlockArgs) -> Result<bool> {
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

/// A count that must be at least 1 (a zero would make the path a no-op under a label that says
/// otherwise).
pub(crate) fn parse_positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(v) => Ok(v),
        Err(e) => Err(format!("not a count: {e}")),
    }
}

pub(crate) fn parse_format(s: &str) -> Result<WeightFormat, String> {
    WeightFormat::parse(s).ok_or_else(|| {
        let names: Vec<&str> = WeightFormat::ALL.iter().map(|f| f.name()).collect();
        format!("unknown format `{s}` (one of {})", names.join(", "))
    })
}

pub(crate) fn fmt_secs(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.3} s")
    } else if s >= 1e-3 {
        format!("{:.3} ms", s * 1e3)
    } else {
        format!("{:.1} us", s * 1e6)
    }
}
