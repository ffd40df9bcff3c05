//! `oracle`: runs bitexact's computation paths side by side on the same inputs and compares
//! every output bit for bit, naming the first divergence. This file parses and dispatches;
//! each subcommand is a module of its own, and what they share is in `common`.

mod batch;
mod common;
mod compare;
mod export;
mod fastscan;
mod generate;
mod inspect;
mod logits;
mod model;
mod moe_block;
mod output;
mod speed;
mod tokenize;

use clap::{Parser, Subcommand};

pub(crate) use common::{
    fmt_secs, kv_name, parse_format, parse_input, parse_kv, parse_orders, parse_output,
    parse_positive, parse_scan, Orders, PresetArgs, Progress, RunArgs,
};

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
    MoeBlock(moe_block::MoeBlockArgs),
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
    Inspect(inspect::InspectArgs),
    /// Write a preset's synthetic model as a qwen3moe GGUF file (llama.cpp loads it).
    Export(export::ExportArgs),
    /// Write every token's logits for given token ids (the side-by-side harness compares them
    /// with llama.cpp's `bitexact-logits`): CPU reference, or the GPU in one prefill.
    Logits(logits::LogitsArgs),
    /// Text in, text out: a prompt through the model, the answer streamed as it is drawn;
    /// `--verify` proves every step's logits bit for bit against one prefill.
    Generate(generate::GenerateArgs),
    /// Text to token ids with a GGUF file's own vocabulary (special tokens parsed, as
    /// llama.cpp's llama-tokenize does by default).
    Tokenize(tokenize::TokenizeArgs),
    /// Token ids to text with a GGUF file's own vocabulary.
    Detokenize(tokenize::DetokenizeArgs),
}

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
        Command::MoeBlock(args) => moe_block::run(&args),
        Command::Model(args) => model::run(&args),
        Command::Fastscan(args) => fastscan::run(&args),
        Command::Speed(args) => speed::run(&args),
        Command::Batch(args) => batch::run(&args),
        Command::Inspect(args) => inspect::run(&args),
        Command::Export(args) => export::run(&args),
        Command::Logits(args) => logits::run(&args),
        Command::Generate(args) => generate::run(&args),
        Command::Tokenize(args) => tokenize::run(&args),
        Command::Detokenize(args) => tokenize::run_detokenize(&args),
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
