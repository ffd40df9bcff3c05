//! `oracle inspect`: a GGUF file's metadata and tensor table, and whether the runner takes it.

use std::path::PathBuf;

use anyhow::Result;

use crate::parse_input;

#[derive(clap::Args)]
pub struct InspectArgs {
    /// The GGUF file (a regular file).
    #[arg(value_parser = parse_input)]
    path: PathBuf,
    /// Print every metadata value in full (long arrays are abbreviated otherwise).
    #[arg(long)]
    all: bool,
}

pub fn run(a: &InspectArgs) -> Result<bool> {
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
