//! What a model is and how its runs are laid out, below both the CPU reference
//! ([`crate::reference`]) and the GPU model ([`crate::model`]), which compute it: configs
//! ([`config`]), host weights ([`weights`], [`delta_net`]'s types), GGUF import and export
//! ([`gguf`]), what a run records ([`trace`]), and the page and schedule bookkeeping of batched
//! sessions ([`paged`], [`schedule`]) and the loop that generates text for many requests over
//! any batched session ([`serve`]). Nothing here launches a kernel or computes a layer.

pub mod config;
pub mod delta_net;
pub mod exchange;
pub mod gguf;
pub mod paged;
pub mod schedule;
pub mod serve;
pub mod trace;
pub mod weights;
