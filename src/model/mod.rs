//! Model building blocks computed three ways: the CPU sequential reference, the GPU one token
//! at a time, and the GPU batched over all tokens. The three must agree bit for bit.
//!
//! Here: the GPU model ([`transformer`], [`moe_block`]) with its batched session of many
//! sequences ([`batch`]). What a model is (shapes, host weights, GGUF mapping, the trace every
//! path fills, the pages and schedules of batched sessions) lives below, in [`crate::spec`]
//! (re-exported here under its old paths); the CPU references of the model live with the
//! kernel references, in [`crate::reference::model`] and [`crate::reference::moe_block`].
//! They and the GPU model both build on `spec`, and the references import nothing from here.

pub mod batch;
/// The model's descriptions, which live in [`crate::spec`] (these paths stay for callers).
pub use crate::spec::{config, gguf, paged, schedule, trace, weights};
pub mod moe_block;
pub mod transformer;

pub use crate::reference::batch::CpuBatchSession;
pub use crate::reference::model::CpuSession;
pub use batch::{BatchSession, StepLogits};
pub use config::{KvMode, ModelConfig, MoeConfig};
pub use moe_block::GpuMoeBlock;
pub use paged::{BatchToken, PagedSequences, SeqId, PAGE};
pub use schedule::{Schedule, ScheduleCounts, SeqSpec};
pub use trace::{first_divergence, MoeOutput, Trace};
pub use transformer::{GpuModel, Session};
pub use weights::{prompt, LayerWeights, ModelWeights, MoeWeights, SharedWeights};
