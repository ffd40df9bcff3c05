//! The model-level CPU reference of the runner's decoder ([`CpuSession`]): tokens through the
//! plain sequential loops of the kernel references, the specification every GPU path of
//! [`crate::model`] must match bit for bit. The per-token computation is stated in
//! [`crate::model::transformer`]'s module docs.

use crate::error::Result;
use crate::model::config::check_tokens;
use crate::model::trace::Trace;
use crate::model::weights::ModelWeights;
use crate::reference;
use crate::reference::attention::QkMode;
use crate::reference::moe_block;

/// The CPU reference: tokens one at a time, each through the plain sequential loops of
/// [`crate::reference`], with an f32 KV cache. It runs the layers the weights hold.
pub struct CpuSession<'w> {
    w: &'w ModelWeights,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    pos: usize,
    rope: (Vec<f32>, Vec<f32>),
    qk: QkMode,
}

impl<'w> CpuSession<'w> {
    /// A fresh session over `w`.
    pub fn new(w: &'w ModelWeights) -> Self {
        let c = &w.cfg;
        let per = c.n_kv_heads * c.max_context * c.head_dim;
        CpuSession {
            w,
            k: vec![vec![0.0; per]; w.layers.len()],
            v: vec![vec![0.0; per]; w.layers.len()],
            pos: 0,
            rope: reference::rope::rope_table(c.max_context, c.rope_dim, c.rope_base),
            qk: QkMode::F32,
        }
    }

    /// How attention scores are formed ([`QkMode::F32`], the canonical order, by default). The
    /// int8 modes exist on the CPU only, to measure what they cost in accuracy.
    pub fn set_qk_mode(&mut self, mode: QkMode) {
        self.qk = mode;
    }

    /// Decodes `tokens` one at a time, appending each layer's hidden state (and, when the
    /// weights hold every layer, the logits) to `trace`.
    pub fn run(&mut self, tokens: &[u32], trace: &mut Trace) -> Result<()> {
        check_tokens("CpuSession::run", &self.w.cfg, tokens, self.pos)?;
        for &t in tokens {
            self.forward(&[t], trace)?;
        }
        Ok(())
    }

    /// Takes `tokens` in one batched step: every stage over all of them (the schedule of the
    /// GPU prefill, on the CPU). It must give the bits of [`CpuSession::run`].
    pub fn forward(&mut self, tokens: &[u32], trace: &mut Trace) -> Result<()> {
        use reference::{attention, elementwise, gemm::gemm, norm::rmsnorm, rope::rope_neox};
        check_tokens("CpuSession::forward", &self.w.cfg, tokens, self.pos)?;
        let w = self.w;
        let c = &w.cfg;
        let n = tokens.len();
        let (d, hd, nh, nkv) = (c.dim, c.head_dim, c.n_heads, c.n_kv_heads);
        let pos: Vec<u32> = (self.pos..self.pos + n).map(|p| p as u32).collect();
        let mut h = elementwise::gather_rows(&w.embed, tokens, d);
        for (l, lw) in w.layers.iter().enumerate() {
            let x = rmsnorm(&h, &lw.attn_norm, c.norm_eps);
            let q = gemm(&x, &lw.wq, n)?;
            let k = gemm(&x, &lw.wk, n)?;
            let v = gemm(&x, &lw.wv, n)?;
            let mut q = rmsnorm(&q, &lw.q_norm, c.norm_eps);
            let mut k = rmsnorm(&k, &lw.k_norm, c.norm_eps);
            rope_neox(
                &mut q,
                &pos,
                &self.rope.0,
                &self.rope.1,
                nh,
                hd,
                c.rope_dim / 2,
            );
            rope_neox(
                &mut k,
                &pos,
                &self.rope.0,
                &self.rope.1,
                nkv,
                hd,
                c.rope_dim / 2,
            );
            for (i, &p) in pos.iter().enumerate() {
                for kvh in 0..nkv {
                    let at = (kvh * c.max_context + p as usize) * hd;
                    let src = (i * nkv + kvh) * hd;
                    self.k[l][at..at + hd].copy_from_slice(&k[src..src + hd]);
                    self.v[l][at..at + hd].copy_from_slice(&v[src..src + hd]);
                }
            }
            let a = attention::attention_with(
                self.qk,
                &q,
                &self.k[l],
                &self.v[l],
                &pos,
                nh,
                nkv,
                hd,
                c.max_context,
            );
            let o = gemm(&a, &lw.wo, n)?;
            elementwise::add(&mut h, &o);
            let x2 = rmsnorm(&h, &lw.ffn_norm, c.norm_eps);
            let m = if n == 1 {
                moe_block::forward_cpu(&lw.moe, &x2, 1)?
            } else {
                moe_block::forward_cpu_batched(&lw.moe, &x2, n)?
            };
            elementwise::add(&mut h, &m.out);
            trace.push_layer(l, &h);
        }
        if w.is_complete() {
            let hn = rmsnorm(&h, &w.out_norm, c.norm_eps);
            trace.logits.extend(gemm(&hn, &w.lm_head, n)?);
        }
        self.pos += n;
        Ok(())
    }

    /// Tokens taken so far.
    pub fn position(&self) -> usize {
        self.pos
    }
}
