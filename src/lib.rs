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
pub mod tensor;
pub mod tokenizer;

pub use device::Device;
pub use error::{Error, Result};
pub use tensor::GpuTensor;
