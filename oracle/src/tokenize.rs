//! `oracle tokenize` and `oracle detokenize`: text to token ids and back with a GGUF file's
//! own vocabulary ([`bitexact::tokenizer`]), as llama.cpp's `llama-tokenize` does by default
//! (special tokens parsed; BOS / EOS where the file asks for them).

use std::path::PathBuf;

use anyhow::{Context, Result};
use bitexact::gguf::GgufFile;
use bitexact::tokenizer::Tokenizer;

use crate::output::usage;
use crate::parse_input;

#[derive(clap::Args)]
pub struct TokenizeArgs {
    /// The GGUF file whose vocabulary to use (`tokenizer.ggml.*`).
    #[arg(long, value_parser = parse_input)]
    gguf: PathBuf,
    /// The text.
    #[arg(long, conflicts_with = "file", required_unless_present = "file")]
    text: Option<String>,
    /// A file holding the text (UTF-8).
    #[arg(long, value_parser = parse_input)]
    file: Option<PathBuf>,
    /// Print a JSON array instead of space-separated ids.
    #[arg(long, conflicts_with = "pieces")]
    json: bool,
    /// Print each token's id and text, one a line.
    #[arg(long)]
    pieces: bool,
    /// Take special tokens' text (`<|im_start|>`) as ordinary text.
    #[arg(long)]
    no_parse_special: bool,
    /// Add no BOS / EOS even where the file asks for them.
    #[arg(long)]
    no_special: bool,
}

#[derive(clap::Args)]
pub struct DetokenizeArgs {
    /// The GGUF file whose vocabulary to use.
    #[arg(long, value_parser = parse_input)]
    gguf: PathBuf,
    /// Token ids, separated by spaces or commas.
    #[arg(long, conflicts_with = "file", required_unless_present = "file")]
    ids: Option<String>,
    /// A file holding the ids (as text, separated by spaces, commas or newlines).
    #[arg(long, value_parser = parse_input)]
    file: Option<PathBuf>,
    /// Leave control tokens (`<|im_end|>`) out of the text.
    #[arg(long)]
    no_special: bool,
}

/// The tokenizer of the file `flag` names; a file without one (or of a kind not supported) is
/// a usage error naming the flag.
pub(crate) fn tokenizer_of(flag: &str, path: &std::path::Path) -> Result<Tokenizer> {
    let f = GgufFile::open(path).with_context(|| format!("reading {}", path.display()))?;
    match Tokenizer::from_gguf(&f) {
        Ok(t) => Ok(t),
        Err(e) => usage!("{flag} {}: {e}", path.display()),
    }
}

/// A text file as UTF-8, refused naming the byte where it is not.
pub(crate) fn read_text(path: &std::path::Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    match String::from_utf8(bytes) {
        Ok(s) => Ok(s),
        Err(e) => usage!(
            "{}: not UTF-8 text (invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        ),
    }
}

pub fn run(a: &TokenizeArgs) -> Result<bool> {
    let text = match (&a.text, &a.file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => read_text(f)?,
        (None, None) => usage!("give --text or --file"),
    };
    let t = tokenizer_of("--gguf", &a.gguf)?;
    let ids = t.encode(&text, !a.no_special, !a.no_parse_special)?;
    if a.pieces {
        for &id in &ids {
            let p = t.piece(id, true)?;
            println!("{id:>8} {:?}", String::from_utf8_lossy(&p));
        }
    } else if a.json {
        println!("{}", serde_json::to_string(&ids)?);
    } else {
        let s: Vec<String> = ids.iter().map(u32::to_string).collect();
        println!("{}", s.join(" "));
    }
    Ok(true)
}

pub fn run_detokenize(a: &DetokenizeArgs) -> Result<bool> {
    let raw = match (&a.ids, &a.file) {
        (Some(s), _) => s.clone(),
        (None, Some(f)) => read_text(f)?,
        (None, None) => usage!("give --ids or --file"),
    };
    let mut ids = Vec::new();
    for w in raw
        .split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']')
        .filter(|w| !w.is_empty())
    {
        match w.parse::<u32>() {
            Ok(id) => ids.push(id),
            Err(_) => usage!("`{w}` is not a token id"),
        }
    }
    let t = tokenizer_of("--gguf", &a.gguf)?;
    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= t.len()) {
        usage!(
            "token id {bad} is past the vocabulary of {} tokens in {}",
            t.len(),
            a.gguf.display()
        );
    }
    let bytes = t.decode_bytes(&ids, !a.no_special)?;
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(&bytes)?;
    out.write_all(b"\n")?;
    Ok(true)
}
