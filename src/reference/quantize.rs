//! Reference for `quantize_q8_32` (`cuda/quantize.cu`): the activation quantization of the
//! quantized matrix products. The functions live in [`crate::quant::act`], beside the weight
//! formats; this module names them where the other references are.

pub use crate::quant::act::{quantize_act, quantize_block, ActQ8, ACT_BLOCK};
