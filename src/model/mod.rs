//! Model building blocks computed three ways: the CPU sequential reference, the GPU one token
//! at a time, and the GPU batched over all tokens. The three must agree bit for bit.

pub mod config;
pub mod init;
pub mod moe_block;
pub mod transformer;

pub use config::ModelConfig;
pub use moe_block::{GpuMoeBlock, MoeConfig, MoeOutput, MoeWeights};
pub use transformer::{CpuSession, GpuModel, ModelWeights, Session, Trace};
