//! The model-level CPU reference of the runner's decoder ([`CpuSession`]): tokens through the
//! plain sequential loops of the kernel references, the specification every GPU path of
//! [`crate::model`] must match bit for bit. The per-token computation is stated in
//! [`crate::model::transformer`]'s module docs.

use crate::error::{Error, Result};
use crate::math::sigmoid;
use crate::quant::fastscan::FastScanSpec;
use crate::reference;
use crate::reference::attention::{AttnOrder, PvMode, QkMode};
pub use crate::reference::delta_net::ScanOrder;
use crate::reference::delta_net::{self, ChunkedState, DeltaNetState, DeltaNetWeights};
use crate::reference::fastscan::{attend_f16, CpuCache, ScoreMode, ValueMode};
use crate::reference::gemm::GemmOrder;
use crate::reference::moe_block;
pub use crate::spec::config::KvMode;
use crate::spec::config::{check_tokens, ModelConfig};
use crate::spec::trace::Trace;
use crate::spec::weights::{LayerWeights, Mixer, ModelWeights};

/// One attention layer's cache in a [`KvMode`] other than f32.
enum OtherKv {
    F16 { k: Vec<Vec<u16>>, v: Vec<Vec<u16>> },
    FastScan(CpuCache),
}

/// The CPU reference: tokens one at a time, each through the plain sequential loops of
/// [`crate::reference`], with an f32 KV cache. It runs the layers the weights hold.
pub struct CpuSession<'w> {
    w: &'w ModelWeights,
    pos: usize,
    rope: RopeTable,
    mem: SoloMemory,
}

/// The rope table of a model's context: `(cos, sin)`, [`reference::rope::rope_table`]'s.
pub(crate) type RopeTable = (Vec<f32>, Vec<f32>);

/// One sequence's caches and states ([`CpuSession`]'s [`Memory`]).
struct SoloMemory {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    max_context: usize,
    order: AttnOrder,
    gemm: GemmOrder,
    kv: KvMode,
    /// Per layer, its cache when `kv` is not f32 (`None` for DeltaNet layers).
    other_kv: Vec<Option<OtherKv>>,
    /// The state of each DeltaNet layer (`None` for attention layers).
    dn: Vec<Option<DeltaNetState>>,
    /// With [`ScanOrder::Chunked`], the chunked order's state of each DeltaNet layer, in
    /// place of `dn` (empty otherwise).
    chunked: Vec<Option<ChunkedState>>,
}

/// Where a forward's rows keep their keys, values and recurrent states, and how attention reads
/// them back: the one thing [`CpuSession`] (one sequence) and
/// [`crate::reference::batch::CpuBatchSession`] (many, paged) do differently. The rest of a
/// forward is [`forward_rows`], the same for both.
pub(crate) trait Memory {
    /// Attention layer `l`: stores the rows' `k, v: [n, n_kv, hd]` (row `i` at position
    /// `pos[i]` of its sequence), then returns `[n, n_heads, hd]`: each row's query heads
    /// `q: [n, n_heads, hd]` over keys `0..=pos[i]` of its sequence.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &mut self,
        c: &ModelConfig,
        l: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        pos: &[u32],
    ) -> Result<Vec<f32>>;
    /// DeltaNet layer `l` over rows `x: [n, dim]`, each continuing its sequence's state.
    fn delta_net(
        &mut self,
        l: usize,
        dw: &DeltaNetWeights,
        x: &[f32],
        eps: f32,
    ) -> Result<Vec<f32>>;
    /// The order of every matrix product ([`GemmOrder::Chain`] unless set).
    fn gemm_order(&self) -> GemmOrder;
    /// The MoE half of layer `l` over the rows `h: [n, dim]`: `h += moe(rmsnorm(h, ffn_norm))`.
    /// Where the experts live is the memory's business (all here, or dealt over ranks:
    /// [`crate::reference::expert_parallel`]); the bits are the same.
    fn moe(&mut self, l: usize, lw: &LayerWeights, h: &mut [f32], eps: f32) -> Result<()> {
        let _ = l;
        moe(lw, h, h.len() / lw.moe.cfg.dim, eps, self.gemm_order())
    }
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
            pos: 0,
            rope: reference::rope::rope_table(c.max_context, c.rope_dim, c.rope_base),
            mem: SoloMemory {
                k: w.layers.iter().map(cache).collect(),
                v: w.layers.iter().map(cache).collect(),
                max_context: c.max_context,
                order: AttnOrder::default(),
                gemm: GemmOrder::Chain,
                kv: KvMode::F32,
                other_kv: w.layers.iter().map(|_| None).collect(),
                dn: new_states(w),
                chunked: Vec::new(),
            },
        }
    }

    /// How attention scores are formed ([`QkMode::F32`], the canonical order, by default). The
    /// int8 modes exist on the CPU only, to measure what they cost in accuracy.
    pub fn set_qk_mode(&mut self, mode: QkMode) {
        self.mem.order.qk = mode;
    }

    /// How attention forms each chunk's output ([`PvMode::F32`], the canonical order, by
    /// default). The exact integer order exists on the CPU only, to measure its accuracy.
    pub fn set_pv_mode(&mut self, mode: PvMode) {
        self.mem.order.pv = mode;
    }

    /// Attention's order and every matrix product's at once ([`CpuSession::set_qk_mode`],
    /// [`CpuSession::set_pv_mode`], [`CpuSession::set_gemm_order`]).
    pub fn set_orders(&mut self, attn: AttnOrder, gemm: GemmOrder) {
        self.mem.order = attn;
        self.mem.gemm = gemm;
    }

    /// How every matrix product reduces ([`GemmOrder::Chain`], the canonical order, by
    /// default). The exact order exists on the CPU only, to measure its accuracy; set it before
    /// the first token (a change midway gives a sequence of two orders).
    pub fn set_gemm_order(&mut self, order: GemmOrder) {
        self.mem.gemm = order;
    }

    /// How the attention layers keep keys and values ([`KvMode::F32`] by default). Only before
    /// the first token; FastScan takes head dims 64, 128 and 256. The score and output modes
    /// ([`CpuSession::set_qk_mode`], [`CpuSession::set_pv_mode`]) apply to the f32 cache
    /// alone.
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
        self.mem.kv = mode;
        self.mem.other_kv = caches;
        Ok(())
    }

    /// The order of the DeltaNet layers' scan ([`ScanOrder::Recurrence`], every kernel's, by
    /// default). The GPU computes either ([`crate::model::transformer::Session::set_scan_order`]). Only
    /// before the first token.
    pub fn set_scan_order(&mut self, order: ScanOrder) -> Result<()> {
        if self.pos != 0 {
            return Err(Error::invalid(
                "CpuSession::set_scan_order",
                "the scan order is set before the first token",
            ));
        }
        self.mem.chunked = match order {
            ScanOrder::Recurrence => Vec::new(),
            ScanOrder::Chunked => new_chunked_states(self.w),
        };
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
        check_tokens("CpuSession::forward", &self.w.cfg, tokens, self.pos)?;
        let n = tokens.len();
        let pos: Vec<u32> = (self.pos..self.pos + n).map(|p| p as u32).collect();
        forward_rows(self.w, &self.rope, &mut self.mem, tokens, &pos, trace)?;
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
    /// without DeltaNet layers; in the chunked order, the matrices at the last chunk boundary,
    /// then the chunk under way's keys, corrected values `u`, factors and decays). Two schedules of one
    /// prompt leave the same bits here.
    pub fn recurrent_state(&self) -> Vec<f32> {
        if self.mem.chunked.is_empty() {
            return flat_states(&self.mem.dn);
        }
        flat_chunked(&self.mem.chunked)
    }
}

/// Stores rows `k, v: [n, n_kv, hd]` into caches `kc, vc: [n_kv, cap, hd]`, row `i` at cache
/// row `rows[i]` (its position, or its page slot in a paged cache).
#[allow(clippy::too_many_arguments)]
pub(crate) fn store_kv(
    kc: &mut [f32],
    vc: &mut [f32],
    k: &[f32],
    v: &[f32],
    rows: &[u32],
    nkv: usize,
    cap: usize,
    hd: usize,
) {
    for (i, &r) in rows.iter().enumerate() {
        for kvh in 0..nkv {
            let at = (kvh * cap + r as usize) * hd;
            let src = (i * nkv + kvh) * hd;
            kc[at..at + hd].copy_from_slice(&k[src..src + hd]);
            vc[at..at + hd].copy_from_slice(&v[src..src + hd]);
        }
    }
}

/// A fresh state for each DeltaNet layer of `w` (`None` for attention layers).
pub(crate) fn new_states(w: &ModelWeights) -> Vec<Option<DeltaNetState>> {
    w.layers
        .iter()
        .map(|l| match &l.mixer {
            Mixer::DeltaNet(d) => Some(DeltaNetState::new(&d.cfg)),
            Mixer::Attention(_) => None,
        })
        .collect()
}

/// The chunked order's states of each layer of `w` (`None` for attention layers).
pub(crate) fn new_chunked_states(w: &ModelWeights) -> Vec<Option<ChunkedState>> {
    w.layers
        .iter()
        .map(|l| match &l.mixer {
            Mixer::DeltaNet(d) => Some(ChunkedState::new(&d.cfg)),
            Mixer::Attention(_) => None,
        })
        .collect()
}

/// Chunked-order states flattened as [`CpuSession::recurrent_state`] gives them: per DeltaNet
/// layer its window, the matrices at the last boundary, then the chunk under way's keys,
/// corrected values, factors and decays.
pub(crate) fn flat_chunked(states: &[Option<ChunkedState>]) -> Vec<f32> {
    states
        .iter()
        .flatten()
        .flat_map(|st| {
            let b = &st.base;
            b.conv
                .iter()
                .chain(&b.m)
                .chain(&st.k)
                .chain(&st.u)
                .chain(&st.f)
                .chain(&st.e)
        })
        .copied()
        .collect()
}

/// The states of [`new_states`]' layout, flattened: for every DeltaNet layer in order, its
/// convolution window, then its delta-rule matrices.
pub(crate) fn flat_states(dn: &[Option<DeltaNetState>]) -> Vec<f32> {
    dn.iter()
        .flatten()
        .flat_map(|st| st.conv.iter().chain(&st.m).copied())
        .collect()
}

/// One forward over rows `tokens` at positions `pos` (each row continuing its sequence in
/// `mem`): every layer of `w` over all rows (the per-token computation of
/// [`crate::model::transformer`]'s module docs), each layer's hidden states and, when the
/// weights hold every layer, the logits appended to `trace`. The caller has checked the tokens
/// and positions.
pub(crate) fn forward_rows(
    w: &ModelWeights,
    rope: &RopeTable,
    mem: &mut impl Memory,
    tokens: &[u32],
    pos: &[u32],
    trace: &mut Trace,
) -> Result<()> {
    use reference::{elementwise, norm::rmsnorm, rope::rope_neox};
    let order = mem.gemm_order();
    let gemm = |x: &[f32], m, n| reference::gemm::gemm_with(order, x, m, n);
    let c = &w.cfg;
    let n = tokens.len();
    let (d, hd, nh, nkv) = (c.dim, c.head_dim, c.n_heads, c.n_kv_heads);
    let mut h = elementwise::gather_rows(&w.embed, tokens, d);
    for (l, lw) in w.layers.iter().enumerate() {
        let x = rmsnorm(&h, &lw.attn_norm, c.norm_eps);
        let aw = match &lw.mixer {
            Mixer::Attention(aw) => aw,
            Mixer::DeltaNet(dw) => {
                let o = mem.delta_net(l, dw, &x, c.norm_eps)?;
                elementwise::add(&mut h, &o);
                mem.moe(l, lw, &mut h, c.norm_eps)?;
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
        let half = c.rope_dim / 2;
        rope_neox(&mut q, pos, &rope.0, &rope.1, nh, hd, half);
        rope_neox(&mut k, pos, &rope.0, &rope.1, nkv, hd, half);
        let mut a = mem.attention(c, l, &q, &k, &v, pos)?;
        if let Some(g) = gate {
            // The output gate, before the output projection: one rounded multiply each.
            for (ai, &gi) in a.iter_mut().zip(&g) {
                *ai = crate::math::canon(*ai * sigmoid(gi));
            }
        }
        let o = gemm(&a, &aw.wo, n)?;
        elementwise::add(&mut h, &o);
        mem.moe(l, lw, &mut h, c.norm_eps)?;
        trace.push_layer(l, &h);
    }
    if w.is_complete() {
        let hn = rmsnorm(&h, &w.out_norm, c.norm_eps);
        trace.logits.extend(gemm(&hn, &w.lm_head, n)?);
    }
    Ok(())
}

/// The MoE half of a layer: `h += moe(rmsnorm(h, ffn_norm))`, one token's reference loop for a
/// single token, the batched schedule otherwise (the same bits).
pub(crate) fn moe(
    lw: &LayerWeights,
    h: &mut [f32],
    n: usize,
    eps: f32,
    order: GemmOrder,
) -> Result<()> {
    use reference::{elementwise, norm::rmsnorm};
    let x2 = rmsnorm(h, &lw.ffn_norm, eps);
    let m = if n == 1 {
        moe_block::forward_cpu_with(order, &lw.moe, &x2, 1)?
    } else {
        moe_block::forward_cpu_batched_with(order, &lw.moe, &x2, n)?
    };
    elementwise::add(h, &m.out);
    Ok(())
}

impl Memory for SoloMemory {
    fn attention(
        &mut self,
        c: &ModelConfig,
        l: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        pos: &[u32],
    ) -> Result<Vec<f32>> {
        use reference::attention;
        let (hd, nh, nkv, cap) = (c.head_dim, c.n_heads, c.n_kv_heads, self.max_context);
        Ok(match self.other_kv[l].as_mut() {
            None => {
                store_kv(&mut self.k[l], &mut self.v[l], k, v, pos, nkv, cap, hd);
                attention::attention_with(
                    self.order, q, &self.k[l], &self.v[l], pos, nh, nkv, hd, cap,
                )
            }
            Some(OtherKv::F16 { k: kc, v: vc }) => {
                let f16 = crate::reference::fastscan::f16_bits;
                for (i, &p) in pos.iter().enumerate() {
                    for kvh in 0..nkv {
                        let (at, src) = (p as usize * hd, (i * nkv + kvh) * hd);
                        for j in 0..hd {
                            kc[kvh][at + j] = f16(k[src + j]);
                            vc[kvh][at + j] = f16(v[src + j]);
                        }
                    }
                }
                let mut a = Vec::with_capacity(pos.len() * nh * hd);
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
                cache.append(k, v);
                cache.attention(q, pos, nh, ScoreMode::F32, ValueMode::F32)
            }
        })
    }

    fn delta_net(
        &mut self,
        l: usize,
        dw: &DeltaNetWeights,
        x: &[f32],
        eps: f32,
    ) -> Result<Vec<f32>> {
        let n = x.len() / dw.cfg.dim;
        if let Some(st) = self.chunked.get_mut(l) {
            let st = st.as_mut().expect("a DeltaNet layer has a state");
            return delta_net::forward_chunked_cpu(self.gemm, dw, st, x, n, eps);
        }
        let st = self.dn[l].as_mut().expect("a DeltaNet layer has a state");
        delta_net::forward_cpu_with(self.gemm, dw, st, x, n, eps)
    }

    fn gemm_order(&self) -> GemmOrder {
        self.gemm
    }
}

impl crate::sample::Decoder for CpuSession<'_> {
    fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        // Checked before the tokens are taken: a refusal changes nothing.
        if !self.w.is_complete() {
            return Err(Error::invalid(
                "CpuSession::feed",
                "the weights hold fewer layers than the config: no logits",
            ));
        }
        let mut t = Trace::default();
        self.forward(tokens, &mut t)?;
        let v = self.w.cfg.vocab;
        Ok(t.logits[t.logits.len() - v..].to_vec())
    }

    fn position(&self) -> usize {
        self.pos
    }
}
