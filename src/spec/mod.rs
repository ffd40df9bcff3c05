//! What a model is and how its runs are laid out, below both the CPU reference
//! ([`crate::reference`]) and the GPU model ([`crate::model`]), which compute it: configs
//! ([`config`]), host weights ([`weights`], [`delta_net`]'s types), GGUF import and export
//! ([`gguf`]), what a run records ([`trace`]), and the page and schedule bookkeeping of batched
//! sessions ([`paged`], [`schedule`]). Nothing here launches a kernel or computes a layer.

pub mod config;
pub mod delta_net;
pub mod gguf;
pub mod paged;
pub mod schedule;
pub mod trace;
pub mod weights;
