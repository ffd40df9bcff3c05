//! The model-level CPU reference of the runner's decoder ([`CpuSession`]): tokens through the
//! plain sequential loops of the kernel references, the specification every GPU path of
//! [`crate::model`] must match bit for bit. The per-token computation is stated in
//! [`crate::model::transformer`]'s module docs.

use crate::error::{Error, Result};
use crate::math::sigmoid;
use crate::model::config::check_tokens;
use crate::model::trace::Trace;
use crate::model::weights::{LayerWeights, Mixer, ModelWeights};
use crate::quant::fastscan::FastScanSpec;
use crate::reference;
use crate::reference::attention::QkMode;
use crate::reference::delta_net::{self, DeltaNetState};
use crate::reference::fastscan::{attend_f16, CpuCache, ScoreMode, ValueMode};
use crate::reference::moe_block;

/// How the attention layers keep their keys and values (and so which attention reads them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum KvMode {
    /// f32 rows, [`reference::attention`]'s canonical order (the GPU runner's cache).
    #[default]
    F32,
    /// f16 rows (rounded to nearest even), [`crate::reference::fastscan::attend_f16`]: the
    /// f16-KV baseline of the FastScan family.
    F16,
    /// FastScan codes of `bits` (3 or 4) bits per coordinate, f32 tables and values
    /// ([`crate::reference::fastscan::CpuCache`]); layer `l`'s rotation seeded by `l`.
    FastScan {
        /// 3 or 4.
        bits: u32,
    },
}

/// One attention layer's cache in a [`KvMode`] other than f32.
enum OtherKv {
    F16 { k: Vec<Vec<u16>>, v: Vec<Vec<u16>> },
    FastScan(CpuCache),
}

/// The CPU reference: tokens one at a time, each through the plain sequential loops of
/// [`crate::reference`], with an f32 KV cache. It runs the layers the weights hold.
pub struct CpuSession<'w> {
    w: &'w ModelWeights,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    pos: usize,
    rope: (Vec<f32>, Vec<f32>),
    qk: QkMode,
    kv: KvMode,
    /// Per layer, its cache when `kv` is not f32 (`None` for DeltaNet layers).
    other_kv: Vec<Option<OtherKv>>,
    /// The state of each DeltaNet layer (`None` for attention layers).
    dn: Vec<Option<DeltaNetState>>,
}

impl<'w> CpuSession<'w> {
    /// A fresh session over `w`.
    pub fn new(w: &'w ModelWeights) -> Self {
        let c = &w.cfg;
        let per = c.n_kv_heads * c.max_context * c.head_dim;
        // A KV cache for the attention layers, a recurrent state for the DeltaNet ones.
        let cache = |l: &LayerWeights| match l.mixer {
            Mixer::Attention(_) => vec![0.0; per],
            Mixer::DeltaNet(_) => Vec::new(),
        };
        CpuSession {
            w,
            k: w.layers.iter().map(cache).collect(),
            v: w.layers.iter().map(cache).collect(),
            pos: 0,
            rope: reference::rope::rope_table(c.max_context, c.rope_dim, c.rope_base),
            qk: QkMode::F32,
            kv: KvMode::F32,
            other_kv: w.layers.iter().map(|_| None).collect(),
            dn: w
                .layers
                .iter()
                .map(|l| match &l.mixer {
                    Mixer::DeltaNet(d) => Some(DeltaNetState::new(&d.cfg)),
                    Mixer::Attention(_) => None,
                })
                .collect(),
        }
    }

    /// How attention scores are formed ([`QkMode::F32`], the canonical order, by default). The
    /// int8 modes exist on the CPU only, to measure what they cost in accuracy.
    pub fn set_qk_mode(&mut self, mode: QkMode) {
        self.qk = mode;
    }

    /// How the attention layers keep keys and values ([`KvMode::F32`] by default). Only before
    /// the first token; FastScan takes head dims 64, 128 and 256. The int8 score modes
    /// ([`CpuSession::set_qk_mode`]) apply to the f32 cache alone.
    pub fn set_kv_mode(&mut self, mode: KvMode) -> Result<()> {
        const OP: &str = "CpuSession::set_kv_mode";
        if self.pos != 0 {
            return Err(Error::invalid(
                OP,
                "the KV mode is set before the first token",
            ));
        }
        let c = &self.w.cfg;
        let (hd, nkv, cap) = (c.head_dim, c.n_kv_heads, c.max_context);
        let mut caches = Vec::with_capacity(self.w.layers.len());
        for (l, lw) in self.w.layers.iter().enumerate() {
            caches.push(match (&lw.mixer, mode) {
                (Mixer::DeltaNet(_), _) | (_, KvMode::F32) => None,
                (_, KvMode::F16) => Some(OtherKv::F16 {
                    k: vec![vec![0; cap * hd]; nkv],
                    v: vec![vec![0; cap * hd]; nkv],
                }),
                (_, KvMode::FastScan { bits }) => Some(OtherKv::FastScan(CpuCache::new(
                    FastScanSpec::new(hd, bits, l as u64)?,
                    nkv,
                    cap,
                ))),
            });
        }
        self.kv = mode;
        self.other_kv = caches;
        Ok(())
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
            let aw = match &lw.mixer {
                Mixer::Attention(aw) => aw,
                Mixer::DeltaNet(dw) => {
                    let st = self.dn[l].as_mut().expect("a DeltaNet layer has a state");
                    let o = delta_net::forward_cpu(dw, st, &x, n, c.norm_eps)?;
                    elementwise::add(&mut h, &o);
                    self.moe(l, lw, &mut h, n)?;
                    trace.push_layer(l, &h);
                    continue;
                }
            };
            let q = gemm(&x, &aw.wq, n)?;
            // A gated query projection holds `[q_h | gate_h]` per head: split it.
            let (q, gate) = if c.hybrid.is_some() {
                let mut qs = Vec::with_capacity(n * nh * hd);
                let mut gs = Vec::with_capacity(n * nh * hd);
                for head in q.chunks(2 * hd) {
                    qs.extend_from_slice(&head[..hd]);
                    gs.extend_from_slice(&head[hd..]);
                }
                (qs, Some(gs))
            } else {
                (q, None)
            };
            let k = gemm(&x, &aw.wk, n)?;
            let v = gemm(&x, &aw.wv, n)?;
            let mut q = rmsnorm(&q, &aw.q_norm, c.norm_eps);
            let mut k = rmsnorm(&k, &aw.k_norm, c.norm_eps);
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
            let mut a = match self.other_kv[l].as_mut() {
                None => {
                    for (i, &p) in pos.iter().enumerate() {
                        for kvh in 0..nkv {
                            let at = (kvh * c.max_context + p as usize) * hd;
                            let src = (i * nkv + kvh) * hd;
                            self.k[l][at..at + hd].copy_from_slice(&k[src..src + hd]);
                            self.v[l][at..at + hd].copy_from_slice(&v[src..src + hd]);
                        }
                    }
                    attention::attention_with(
                        self.qk,
                        &q,
                        &self.k[l],
                        &self.v[l],
                        &pos,
                        nh,
                        nkv,
                        hd,
                        c.max_context,
                    )
                }
                Some(OtherKv::F16 { k: kc, v: vc }) => {
                    let f16 = |x: f32| half::f16::from_f32(x).to_bits();
                    for (i, &p) in pos.iter().enumerate() {
                        for kvh in 0..nkv {
                            let (at, src) = (p as usize * hd, (i * nkv + kvh) * hd);
                            for j in 0..hd {
                                kc[kvh][at + j] = f16(k[src + j]);
                                vc[kvh][at + j] = f16(v[src + j]);
                            }
                        }
                    }
                    let mut a = Vec::with_capacity(n * nh * hd);
                    for (i, &p) in pos.iter().enumerate() {
                        for head in 0..nh {
                            let kvh = head / (nh / nkv);
                            let qh = &q[(i * nh + head) * hd..][..hd];
                            a.extend(attend_f16(qh, &kc[kvh], &vc[kvh], p as usize, hd));
                        }
                    }
                    a
                }
                Some(OtherKv::FastScan(cache)) => {
                    cache.append(&k, &v);
                    cache.attention(&q, &pos, nh, ScoreMode::F32, ValueMode::F32)
                }
            };
            if let Some(g) = gate {
                // The output gate, before the output projection: one rounded multiply each.
                for (ai, &gi) in a.iter_mut().zip(&g) {
                    *ai = crate::math::canon(*ai * sigmoid(gi));
                }
            }
            let o = gemm(&a, &aw.wo, n)?;
            elementwise::add(&mut h, &o);
            self.moe(l, lw, &mut h, n)?;
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

    /// Takes `prompt` (decoded one token at a time), then `n` tokens each drawn by
    /// [`crate::sample::sample`] from the logits before it, sequence `sequence`, step = the
    /// position the drawn token takes; returns the drawn tokens. The GPU session's
    /// `generate` draws the same tokens (its logits are these bits).
    pub fn generate(
        &mut self,
        prompt: &[u32],
        n: usize,
        params: &crate::sample::Sampling,
        sequence: u64,
    ) -> Result<Vec<u32>> {
        crate::sample::check_generate("CpuSession::generate", prompt, params)?;
        if !self.w.is_complete() {
            return Err(Error::invalid(
                "CpuSession::generate",
                "the weights hold fewer layers than the config: no logits",
            ));
        }
        let vocab = self.w.cfg.vocab;
        let mut t = Trace::default();
        self.run(prompt, &mut t)?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let logits = &t.logits[t.logits.len() - vocab..];
            let next = crate::sample::sample(logits, params, sequence, self.pos as u64)?;
            out.push(next);
            t = Trace::default();
            self.forward(&[next], &mut t)?;
        }
        Ok(out)
    }

    /// The recurrent state the session carries into its next token: for every DeltaNet layer
    /// in order, its convolution window, then its delta-rule matrices (empty for a model
    /// without DeltaNet layers). Two schedules of one prompt leave the same bits here.
    pub fn recurrent_state(&self) -> Vec<f32> {
        self.dn
            .iter()
            .flatten()
            .flat_map(|st| st.conv.iter().chain(&st.m).copied())
            .collect()
    }

    /// The MoE half of layer `l`: `h += moe(rmsnorm(h, ffn_norm))`, one token's reference loop
    /// for a single token, the batched schedule otherwise (the same bits).
    fn moe(&self, _l: usize, lw: &LayerWeights, h: &mut [f32], n: usize) -> Result<()> {
        use reference::{elementwise, norm::rmsnorm};
        let x2 = rmsnorm(h, &lw.ffn_norm, self.w.cfg.norm_eps);
        let m = if n == 1 {
            moe_block::forward_cpu(&lw.moe, &x2, 1)?
        } else {
            moe_block::forward_cpu_batched(&lw.moe, &x2, n)?
        };
        elementwise::add(h, &m.out);
        Ok(())
    }
}
