//! The sequential CPU references: the specification of every kernel, bit for bit.
//!
//! Each function is the slowest obvious loop, and its doc comment states the order of every
//! float operation. A GPU kernel is correct when it returns exactly these bits (NaN results are
//! [`crate::math::CANON_NAN`], see [`crate::math::canon`]).

pub mod activation;
pub mod attention;
pub mod batch;
pub mod delta_net;
pub mod elementwise;
pub mod exact;
pub mod expert_parallel;
pub mod fastscan;
pub mod gemm;
pub mod model;
pub mod moe_block;
pub mod moe_reduce;
pub mod norm;
pub mod quantize;
pub mod rope;
pub mod route;
pub mod router;
pub mod row_scale;
