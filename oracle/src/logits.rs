//! `oracle logits`: every token's logits for given token ids, from the CPU reference or one
//! GPU prefill (the side-by-side harness compares them with llama.cpp's).

use std::path::PathBuf;

use anyhow::{Context, Result};
use bitexact::Device;

use crate::output::{usage, Output};
use crate::{parse_input, parse_output, PresetArgs};

#[derive(clap::Args)]
pub struct LogitsArgs {
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

pub fn run(a: &LogitsArgs) -> Result<bool> {
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
