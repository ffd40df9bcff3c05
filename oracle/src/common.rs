//! What the subcommands share: the run options (device, JSON report), the preset options,
//! the progress bar and the argument parsers.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use bitexact::model::KvMode;
use bitexact::quant::WeightFormat;
use bitexact::Device;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::output::{self, usage_err, Output};

/// A preset's synthetic weights, as `export` and `logits` take them.
#[derive(clap::Args)]
pub(crate) struct PresetArgs {
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
    pub(crate) seed: u64,
    /// Leave the preset's shared expert out (llama.cpp's qwen3moe has none: a file with one
    /// does not load there).
    #[arg(long)]
    no_shared: bool,
}

impl PresetArgs {
    pub(crate) fn config(&self) -> Result<bitexact::model::ModelConfig> {
        let mut cfg =
            bitexact::model::ModelConfig::preset(&self.preset, self.format).map_err(usage_err)?;
        if self.no_shared {
            cfg.moe.shared_ffn = None;
        }
        Ok(cfg)
    }

    pub(crate) fn weights(&self) -> Result<bitexact::model::ModelWeights> {
        Ok(bitexact::model::ModelWeights::generate(
            &self.config()?,
            self.seed,
            None,
        )?)
    }
}

/// Options every comparison mode shares.
#[derive(clap::Args)]
pub(crate) struct RunArgs {
    /// CPU paths only, even when a GPU is present.
    #[arg(long)]
    pub(crate) cpu: bool,
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

/// A count that must be at least 1 (a zero would make the path a no-op under a label that says
/// otherwise).
pub(crate) fn parse_positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(v) => Ok(v),
        Err(e) => Err(format!("not a count: {e}")),
    }
}

/// `--order`: the canonical f32 orders every kernel computes, or the exact integer orders
/// (issue 31: attention's `IntSlices::CHOSEN` and the exact matrix products), which only the
/// CPU reference has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Orders {
    F32,
    Exact,
}

impl Orders {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Orders::F32 => "f32",
            Orders::Exact => "exact",
        }
    }

    /// Attention's order and the matrix products'.
    pub(crate) fn parts(
        self,
    ) -> (
        bitexact::reference::attention::AttnOrder,
        bitexact::reference::gemm::GemmOrder,
    ) {
        use bitexact::reference::attention::{AttnOrder, IntSlices};
        use bitexact::reference::gemm::GemmOrder;
        match self {
            Orders::F32 => (AttnOrder::default(), GemmOrder::Chain),
            Orders::Exact => (AttnOrder::exact(IntSlices::CHOSEN), GemmOrder::Exact),
        }
    }
}

pub(crate) fn parse_orders(s: &str) -> Result<Orders, String> {
    match s {
        "f32" => Ok(Orders::F32),
        "exact" => Ok(Orders::Exact),
        _ => Err(format!("unknown order `{s}` (one of f32, exact)")),
    }
}

/// `--kv`: f32, f16, fastscan4 or fastscan3.
pub(crate) fn parse_kv(s: &str) -> Result<KvMode, String> {
    match s {
        "f32" => Ok(KvMode::F32),
        "f16" => Ok(KvMode::F16),
        "fastscan4" => Ok(KvMode::FastScan { bits: 4 }),
        "fastscan3" => Ok(KvMode::FastScan { bits: 3 }),
        _ => Err(format!(
            "unknown KV mode `{s}` (one of f32, f16, fastscan4, fastscan3)"
        )),
    }
}

/// The `--kv` name of a mode.
pub(crate) fn kv_name(m: KvMode) -> &'static str {
    match m {
        KvMode::F32 => "f32",
        KvMode::F16 => "f16",
        KvMode::FastScan { bits: 3 } => "fastscan3",
        KvMode::FastScan { .. } => "fastscan4",
    }
}

/// `--scan`: which DeltaNet scan the GPU paths run (every version gives the same bits).
pub(crate) fn parse_scan(s: &str) -> Result<bitexact::kernels::delta_net::ScanKernel, String> {
    use bitexact::kernels::delta_net::ScanKernel;
    match s {
        "auto" => Ok(ScanKernel::Auto),
        "v1" => Ok(ScanKernel::V1),
        "v2" => Ok(ScanKernel::V2),
        "v3" => Ok(ScanKernel::V3),
        "v5" => Ok(ScanKernel::V5),
        "v6" => Ok(ScanKernel::V6),
        _ => Err(format!(
            "unknown scan `{s}` (one of auto, v1, v2, v3, v5, v6)"
        )),
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
