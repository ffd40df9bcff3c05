//! # bitexact
//!
//! Hand-written CUDA kernels for mixture-of-experts LLM inference in which every fast path is
//! bit-identical to a plain sequential CPU reference: prefill over N tokens returns exactly the
//! bits of decoding one token at a time, for every N, and the GPU returns exactly the bits of
//! the CPU.
//!
//! - [`Device`]: a CUDA context and stream; kernel families (`cuda/*.cu`) are compiled by
//!   NVRTC once per process under pinned options (`--fmad=false`, IEEE division and square
//!   root, no flush-to-zero, no fast math).
//! - [`kernels`]: typed launch wrappers that validate every shape and index and return
//!   [`Result`]; an error means nothing was queued.
//! - [`mod@reference`]: the sequential CPU references, the specification of every kernel's bits,
//!   and of the model built from them ([`reference::model`], [`reference::moe_block`]).
//! - [`math`]: the scalar functions (our own `exp`, sigmoid, silu) shared by both sides.
//! - [`quant`]: the weight formats (GGUF layouts) and the activation quantization.
//! - [`model`]: shapes, host weights, the GGUF mapping and the GPU MoE block and decoder, token
//!   by token and batched; they agree bit for bit with the CPU references.
//! - [`gguf`]: the GGUF file format (reader, writer); [`init`]: the seeded hash of every
//!   synthetic weight.
//!
//! ```no_run
//! use bitexact::{Device, GpuTensor, kernels::row_scale::row_scale};
//! let dev = Device::new(0)?;
//! let mut buf = GpuTensor::from_host(&dev, &[1.0f32, 2.0, 3.0, 4.0], &[2, 2])?;
//! let scales = GpuTensor::from_host(&dev, &[0.5f32, 2.0], &[2])?;
//! row_scale(&dev, &mut buf, &scales)?;
//! assert_eq!(buf.to_host()?, vec![0.5, 1.0, 6.0, 8.0]);
//! # Ok::<(), bitexact::Error>(())
//! ```

#![warn(missing_docs)]

// README.md's Rust examples, compiled (and the CPU ones run) by `cargo test --doc`.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

pub mod device;
pub mod error;
pub mod gguf;
pub mod init;
pub mod kernels;
mod launch;
pub mod math;
pub mod model;
pub mod quant;
pub mod reference;
pub mod sample;
pub mod spec;
pub mod tensor;
pub mod tokenizer;

pub use device::Device;
pub use error::{Error, Result};
pub use tensor::GpuTensor;

#[cfg(test)]
mod layers {
    /// The crate's modules from the bottom up: a module may import (in code, not in doc links)
    /// only modules of a lower rank, so no import points up or sideways and none forms a circle.
    const RANKS: &[(&str, u32)] = &[
        ("error", 0),
        ("math", 1),
        ("init", 2),
        ("quant", 3),
        ("sample", 3),
        ("gguf", 4),
        ("tokenizer", 5),
        ("spec", 5),
        ("reference", 6),
        ("device", 7),
        ("launch", 8),
        ("tensor", 8),
        ("kernels", 9),
        ("model", 10),
    ];

    fn rank(m: &str) -> Option<u32> {
        // The crate root's re-exports count as their modules.
        let m = match m {
            "Error" | "Result" => "error",
            "Device" => "device",
            "GpuTensor" => "tensor",
            m => m,
        };
        RANKS.iter().find(|(n, _)| *n == m).map(|&(_, r)| r)
    }

    /// Each `crate::X` a file names outside comments, as `(importing module, X)`.
    fn imports(dir: &std::path::Path, root: &std::path::Path, out: &mut Vec<(String, String)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                imports(&p, root, out);
                continue;
            }
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let module = rel.split(['/', '.']).next().unwrap_or_default().to_string();
            if module == "lib" {
                continue;
            }
            for line in std::fs::read_to_string(&p).unwrap().lines() {
                let code = line.split("//").next().unwrap_or_default();
                for (i, _) in code.match_indices("crate::") {
                    let name: String = code[i + 7..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if name != module {
                        out.push((module.clone(), name));
                    }
                }
            }
        }
    }

    /// The layer rule holds for every `crate::` path in `src/`, and every module has a rank.
    /// (Tried: `model::config` imported by `reference` again fails it.)
    #[test]
    fn imports_point_down_only() {
        let root = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src"));
        let mut found = Vec::new();
        imports(root, root, &mut found);
        assert!(found.len() > 100, "the scan found {} imports", found.len());
        let mut bad: Vec<String> = found
            .iter()
            .filter_map(|(from, to)| match (rank(from), rank(to)) {
                (Some(a), Some(b)) if b < a => None,
                (a, b) => Some(format!("{from} ({a:?}) -> {to} ({b:?})")),
            })
            .collect();
        bad.sort();
        bad.dedup();
        assert!(bad.is_empty(), "imports against the layers: {bad:#?}");
    }
}
