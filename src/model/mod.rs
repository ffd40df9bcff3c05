//! Model building blocks computed three ways: the CPU sequential reference, the GPU one token
//! at a time, and the GPU batched over all tokens. The three must agree bit for bit.
//!
//! Here: the shapes ([`config`]), the host weights and their synthetic generation
//! ([`weights`]), the GGUF mapping ([`gguf`]), the hidden-state [`trace`] every path fills, the
//! pages and ragged batches of many sequences ([`paged`]) and the random serving schedules
//! that exercise them ([`schedule`]),
//! and the GPU model ([`transformer`], [`moe_block`]) with its batched session of many
//! sequences ([`batch`]). The CPU references of the model live
//! with the kernel references, in [`crate::reference::model`] and
//! [`crate::reference::moe_block`]; they and the GPU model both build on `config`, `weights`
//! and `trace`, and neither imports the other.

pub mod batch;
pub mod config;
pub mod gguf;
pub mod moe_block;
pub mod paged;
pub mod schedule;
pub mod trace;
pub mod transformer;
pub mod weights;

pub use crate::reference::batch::CpuBatchSession;
pub use crate::reference::model::CpuSession;
pub use batch::{BatchSession, StepLogits};
pub use config::{ModelConfig, MoeConfig};
pub use moe_block::GpuMoeBlock;
pub use paged::{BatchToken, PagedSequences, SeqId, PAGE};
pub use schedule::{Schedule, ScheduleCounts, SeqSpec};
pub use trace::{first_divergence, MoeOutput, Trace};
pub use transformer::{GpuModel, Session};
pub use weights::{prompt, LayerWeights, ModelWeights, MoeWeights, SharedWeights};
