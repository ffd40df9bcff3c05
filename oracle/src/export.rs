//! `oracle export`: a preset's synthetic model as a GGUF file.

use anyhow::Result;
use indicatif::{ProgressBar, ProgressDrawTarget};

use crate::output::Output;
use crate::{parse_output, PresetArgs};

#[derive(clap::Args)]
pub struct ExportArgs {
    /// Copy the vocabulary (every `tokenizer.*` entry: tokens, merges, special ids, chat
    /// template) of this GGUF file into the export; the model's vocab becomes its token
    /// count, so text runs end to end on synthetic weights.
    #[arg(long, value_parser = crate::parse_input)]
    vocab: Option<std::path::PathBuf>,
    /// Output path (a new or regular file; a link is followed).
    #[arg(value_parser = parse_output)]
    path: Output,
    #[command(flatten)]
    preset: PresetArgs,
}

/// Streams the preset to `path` one layer at a time (a 30B preset is a 32 GB file), through
/// a temporary file renamed at the end, so an interrupted export (an error, Ctrl-C, SIGTERM)
/// leaves no partial file. A file system without room for it is refused before writing.
pub fn run(a: &ExportArgs) -> Result<bool> {
    use std::io::Write;
    let mut cfg = a.preset.config()?;
    let vocab = match &a.vocab {
        Some(p) => {
            let t = crate::tokenize::tokenizer_of("--vocab", p)?;
            let f = bitexact::gguf::GgufFile::open(p)?;
            cfg.vocab = t.len();
            f.metadata
                .iter()
                .filter(|(k, _)| k.starts_with("tokenizer."))
                .cloned()
                .collect()
        }
        None => Vec::new(),
    };
    a.path.check_space(cfg.weight_bytes() as u64)?;
    let mut pending = a.path.create()?;
    let mut out = std::io::BufWriter::with_capacity(8 << 20, pending.file());
    let bar = ProgressBar::new(cfg.n_layers as u64);
    bar.set_draw_target(ProgressDrawTarget::stderr_with_hz(4));
    let written = bitexact::model::gguf::export_preset_with_vocab(
        &cfg,
        a.preset.seed,
        &vocab,
        &mut out,
        |_| bar.inc(1),
    );
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
