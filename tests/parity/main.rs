//! Bit-parity properties: every GPU kernel against its sequential CPU reference, compared with
//! `to_bits()`, and the batched MoE block against the sequential one.
//!
//! GPU tests print `SKIP: no CUDA device` and pass when no device is present, unless
//! `BITEXACT_REQUIRE_GPU=1`, which turns a missing device into a failure.

mod common;

mod activation;
mod attention;
mod batch;
mod delta_net;
mod elementwise;
mod emulate;
mod fastscan;
mod faults;
mod gemm;
mod golden;
mod math;
mod model;
mod moe_block;
mod moe_reduce;
mod norm;
mod quantize;
mod rope;
mod route;
mod router;
mod row_scale;
