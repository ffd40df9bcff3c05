//! The thin Qwen3-MoE-style decoder (and its hybrid Gated DeltaNet form) on the GPU: [`GpuModel`] and its [`Session`] (batched
//! prefill, chunked prefill, sequential decode). Its weights are [`crate::spec::weights`]'; its
//! CPU reference is [`crate::reference::model::CpuSession`].
//!
//! Per token `t` at position `pos`, every path computes:
//! ```text
//! h = embed[t]
//! per layer:
//!   x = rmsnorm(h, attn_norm)
//!   q = Wq x, k = Wk x, v = Wv x              (per head: rmsnorm(q, q_norm), rmsnorm(k, k_norm))
//!   rope(q, pos), rope(k, pos); cache[pos] = (k, v)
//!   h = h + Wo attention(q, cache[0..=pos])
//!   h = h + moe(rmsnorm(h, ffn_norm))
//! logits = W_lm rmsnorm(h, out_norm)
//! ```
//! A hybrid model (Qwen3.5/3.6-MoE) replaces the attention of three layers in four by a Gated
//! DeltaNet ([`crate::reference::delta_net`]: projections, the scan over the tokens in order
//! with the recurrent state the session keeps, the gated norm, the output projection), and its
//! attention layers are gated: each query head of Wq is followed by an output gate,
//! `attention(q, ..) * sigmoid(gate)` before Wo.
//! Each operation is a kernel whose bits are its reference's (norm, rope, attention, gemm,
//! moe block, elementwise), and each reduction's order depends only on the token's own row
//! and position: a prompt prefilled at once, in chunks of any size, or decoded one token at a
//! time gives the same bits at every layer.

use crate::device::{Device, Graph};
use crate::error::{Error, Result};
use crate::kernels::activation::gate_heads_sigmoid;
use crate::kernels::attention::{attention_pair_with, attention_with, AttentionKernel, LayerCache};
use crate::kernels::delta_net::{
    delta_net_gate, delta_net_scan_with, GpuDeltaNetConsts, GpuDeltaNetState, ScanKernel,
};
use crate::kernels::elementwise::{add, gather_rows_device};
use crate::kernels::fastscan::{
    coded_attention, AttentionWorkspace, CodedKvRef, F16KvCache, FastScanCache,
};
use crate::kernels::gemm::{matmul, matmul_shared_pair, GpuMatrix, Product};
use crate::kernels::norm::{add_rmsnorm_q8, qkv_norm_rope, qkv_norm_rope_paged, rmsnorm, QkvInput};
use crate::kernels::quantize::GpuActPair;
use crate::kernels::rope::{Positions, RopeTable};
use crate::model::moe_block::GpuMoeBlock;
use crate::quant::fastscan::FastScanSpec;
use crate::quant::QuantMatrix;
use crate::spec::config::{check_tokens, KvMode, ModelConfig};
use crate::spec::delta_net::ScanOrder;
use crate::spec::trace::Trace;
use crate::spec::weights::{LayerWeights, Mixer, ModelWeights};
use crate::tensor::GpuTensor;

struct GpuLayer {
    attn_norm: GpuTensor<f32>,
    mixer: GpuMixer,
    ffn_norm: GpuTensor<f32>,
    moe: GpuMoeBlock,
}

/// A layer's token mixer on the device.
enum GpuMixer {
    Attention(AttentionMixer),
    DeltaNet(DeltaNetMixer),
}

/// Grouped-query attention; `gated` (a hybrid model): each query head of Wq is followed by its
/// output gate.
struct AttentionMixer {
    qkv: QkvWeights,
    wo: GpuMatrix,
    q_norm: GpuTensor<f32>,
    k_norm: GpuTensor<f32>,
    gated: bool,
}

/// The Gated DeltaNet ([`crate::reference::delta_net`]): its four input projections (qkv, z,
/// beta, alpha: one quantization of x for the four), the scan's constants, the gated norm's
/// weights and the output projection.
struct DeltaNetMixer {
    proj: Box<[GpuMatrix; 4]>,
    consts: GpuDeltaNetConsts,
    norm: GpuTensor<f32>,
    out: GpuMatrix,
}

/// What a session keeps per layer: the KV cache of an attention layer (f32 rows, or coded in
/// another [`KvMode`]), the recurrent state of a DeltaNet layer.
pub(crate) enum LayerState {
    Kv(LayerCache),
    Coded(CodedKv),
    DeltaNet(GpuDeltaNetState),
}

/// An attention layer's cache in a [`KvMode`] other than f32, written by position from the
/// step's f32 rows ([`CodedScratch`]) and read by the FastScan family's attention: the bits of
/// [`crate::reference::model::CpuSession`] in the same mode.
pub(crate) enum CodedKv {
    F16(F16KvCache),
    FastScan(Box<FastScanCache>),
}

/// What the coded caches of a session share: the f32 rows of one layer's keys and values for
/// the step (`[n_kv, max_context, hd]`, row `p` holding position `p`: the fused norm and
/// rotation write them as they write an f32 cache, then the layer's cache codes them) and the
/// attention's scratch. One per session, used by each attention layer in turn.
pub(crate) struct CodedScratch {
    rows: LayerCache,
    ws: AttentionWorkspace,
}

/// A layer's Wq, Wk and Wv: stacked into one matrix ([`QuantMatrix::concat_rows`], one
/// product for the three) when they share a format, as three otherwise (a GGUF file may keep
/// Wv in another format). The same bits either way.
enum QkvWeights {
    Stacked(GpuMatrix),
    Separate([GpuMatrix; 3]),
}

/// A model on the device. Build it with [`GpuModel::load`] (host weights) or
/// [`GpuModel::generate`] (synthetic weights made layer by layer, so that a 30B preset never
/// sits in host memory whole).
pub struct GpuModel {
    cfg: ModelConfig,
    embed: GpuTensor<f32>,
    layers: Vec<GpuLayer>,
    out_norm: GpuTensor<f32>,
    lm_head: GpuMatrix,
    rope: RopeTable,
}

fn upload_layer(dev: &Device, cfg: &ModelConfig, lw: &LayerWeights) -> Result<GpuLayer> {
    let vec = |v: &[f32]| GpuTensor::from_host(dev, v, &[v.len()]);
    let mixer = match &lw.mixer {
        Mixer::Attention(a) => GpuMixer::Attention(AttentionMixer {
            qkv: if a.wq.format() == a.wk.format() && a.wk.format() == a.wv.format() {
                QkvWeights::Stacked(GpuMatrix::upload(
                    dev,
                    &QuantMatrix::concat_rows(&[&a.wq, &a.wk, &a.wv])?,
                )?)
            } else {
                QkvWeights::Separate([
                    GpuMatrix::upload(dev, &a.wq)?,
                    GpuMatrix::upload(dev, &a.wk)?,
                    GpuMatrix::upload(dev, &a.wv)?,
                ])
            },
            wo: GpuMatrix::upload(dev, &a.wo)?,
            q_norm: vec(&a.q_norm)?,
            k_norm: vec(&a.k_norm)?,
            gated: cfg.hybrid.is_some(),
        }),
        Mixer::DeltaNet(d) => GpuMixer::DeltaNet(DeltaNetMixer {
            proj: Box::new([
                GpuMatrix::upload(dev, &d.qkv)?,
                GpuMatrix::upload(dev, &d.z)?,
                GpuMatrix::upload(dev, &d.beta)?,
                GpuMatrix::upload(dev, &d.alpha)?,
            ]),
            consts: GpuDeltaNetConsts::upload(dev, d)?,
            norm: vec(&d.norm)?,
            out: GpuMatrix::upload(dev, &d.out)?,
        }),
    };
    Ok(GpuLayer {
        attn_norm: vec(&lw.attn_norm)?,
        mixer,
        ffn_norm: vec(&lw.ffn_norm)?,
        moe: GpuMoeBlock::upload(dev, &lw.moe)?,
    })
}

/// Fails with [`Error::OutOfMemory`] before anything is allocated when the weights, one KV
/// cache and the activations of a `rows`-token forward would not fit the device's free memory.
pub fn check_fits(dev: &Device, cfg: &ModelConfig, rows: usize) -> Result<()> {
    let need = cfg.weight_bytes() + cfg.cache_bytes() + cfg.activation_bytes(rows);
    let free = dev.free_memory()?;
    if need > free {
        return Err(Error::OutOfMemory {
            bytes: need,
            what: "model weights, KV cache and activations (estimated before allocating)",
        });
    }
    Ok(())
}

impl GpuModel {
    /// Uploads complete host weights.
    pub fn load(dev: &Device, w: &ModelWeights) -> Result<Self> {
        if !w.is_complete() {
            return Err(Error::invalid(
                "GpuModel::load",
                "the weights hold fewer layers than the config",
            ));
        }
        let lm = GpuMatrix::upload(dev, &w.lm_head)?;
        Self::assemble(dev, &w.cfg, &w.embed, &w.out_norm, lm, |l| {
            upload_layer(dev, &w.cfg, &w.layers[l])
        })
    }

    /// Generates the synthetic weights of `cfg` from `seed` layer by layer (bit-identical to
    /// [`ModelWeights::generate`]) and uploads each as it is made. `progress(l)` is called
    /// after each layer. Refuses with [`Error::OutOfMemory`] before allocating when the model
    /// will not fit ([`check_fits`] for a forward of `rows` tokens).
    pub fn generate(
        dev: &Device,
        cfg: &ModelConfig,
        seed: u64,
        rows: usize,
        mut progress: impl FnMut(usize),
    ) -> Result<Self> {
        cfg.validate()?;
        check_fits(dev, cfg, rows)?;
        let head = ModelWeights::generate_head(cfg, seed)?;
        let lm = GpuMatrix::upload(dev, &head.lm_head)?;
        Self::assemble(dev, cfg, &head.embed, &head.out_norm, lm, |l| {
            let layer = upload_layer(dev, cfg, &LayerWeights::generate(cfg, seed, l)?);
            progress(l);
            layer
        })
    }

    fn assemble(
        dev: &Device,
        cfg: &ModelConfig,
        embed: &[f32],
        out_norm: &[f32],
        lm_head: GpuMatrix,
        mut layer: impl FnMut(usize) -> Result<GpuLayer>,
    ) -> Result<Self> {
        Ok(GpuModel {
            cfg: cfg.clone(),
            embed: GpuTensor::from_host(dev, embed, &[cfg.vocab, cfg.dim])?,
            layers: (0..cfg.n_layers).map(&mut layer).collect::<Result<_>>()?,
            out_norm: GpuTensor::from_host(dev, out_norm, &[cfg.dim])?,
            lm_head,
            rope: RopeTable::new(dev, cfg.max_context, cfg.rope_dim, cfg.rope_base)?,
        })
    }

    /// The shape.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }
}

/// What one forward call of a [`Session`] did: how many tokens it took at once, and how many
/// decode steps replayed the captured graph. Tests read these to check that the path they
/// claim to test really ran.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Rows of each forward call, in order.
    pub calls: Vec<usize>,
    /// Decode steps that ran as a replay of the captured step graph.
    pub graph_replays: usize,
    /// Why capturing the decode step failed, if it did (decode then launches every kernel
    /// itself).
    pub graph_error: Option<String>,
}

/// The captured decode step: one CUDA graph holding every launch of a one-token forward, with
/// its token, position and logits in fixed device buffers that the host writes (token,
/// position) and reads (logits) around each replay.
struct DecodeGraph {
    ids: GpuTensor<u32>,
    pos: Positions,
    logits: GpuTensor<f32>,
    graph: Graph,
    /// A coded cache's attention scratch the graph's kernels read and write: the graph's own,
    /// so that an eager forward that grows the session's scratch never moves it.
    _coded_ws: Option<AttentionWorkspace>,
}

/// A decoding session on the GPU: a KV cache for `max_context` positions per attention layer
/// (f32 rows, or f16 rows or FastScan codes: [`Session::with_kv_mode`]), the recurrent state
/// of each Gated DeltaNet layer (a hybrid model), and the position reached. `prefill` takes
/// many tokens at once, `decode` one; both give the bits of the CPU reference for every
/// token. After an error in the middle of a forward the session refuses
/// further calls until [`Session::reset`], rather than go on from a half-written cache.
///
/// Decode steps run as CUDA graph replays (one launch for the whole step instead of one per
/// kernel): the first decode of a session runs eagerly and captures the step; later ones
/// write their token and position into the graph's device buffers and replay it. The graph
/// runs the same kernels on the same buffers, so it returns the same bits;
/// [`Session::set_graphs`] turns it off.
pub struct Session<'m> {
    model: &'m GpuModel,
    /// Per layer: its KV cache or its DeltaNet state.
    states: Vec<LayerState>,
    /// Set by [`Session::reset`]: the DeltaNet states are zeroed before the next forward.
    clear_states: bool,
    pos: usize,
    poisoned: bool,
    last_logits: Option<Vec<f32>>,
    stats: SessionStats,
    graphs: bool,
    graph: Option<DecodeGraph>,
    /// The kernel choices ([`Session::set_attention_v2`], [`Session::set_scan`]).
    kernels: Kernels,
    /// How the attention layers keep keys and values ([`Session::with_kv_mode`]).
    kv_mode: KvMode,
    /// The coded caches' shared rows and scratch (`None` with an f32 cache).
    coded: Option<CodedScratch>,
    /// The DeltaNet layers' scan order ([`Session::set_scan_order`]).
    scan_order: ScanOrder,
}

impl<'m> Session<'m> {
    /// A fresh session with an f32 KV cache (allocates the KV caches and the DeltaNet
    /// states, zeroed).
    pub fn new(dev: &Device, model: &'m GpuModel) -> Result<Self> {
        Self::with_kv_mode(dev, model, KvMode::F32)
    }

    /// A fresh session whose attention layers keep keys and values as `kv` says: f32 rows
    /// (as [`Session::new`]), f16 rows or FastScan codes of 3 or 4 bits (head dims 64, 128
    /// and 256), each the bits of [`crate::reference::model::CpuSession`] with
    /// [`crate::reference::model::CpuSession::set_kv_mode`] set alike, on every path. A coded
    /// mode also keeps one layer's f32 rows of `max_context` positions, shared by the layers.
    pub fn with_kv_mode(dev: &Device, model: &'m GpuModel, kv: KvMode) -> Result<Self> {
        const OP: &str = "Session::with_kv_mode";
        let c = &model.cfg;
        let (nkv, cap, hd) = (c.n_kv_heads, c.max_context, c.head_dim);
        if kv != KvMode::F32 && !crate::quant::fastscan::DIMS.contains(&hd) {
            return Err(Error::invalid(
                OP,
                format!("a {kv:?} KV cache takes head dims 64, 128 or 256, not {hd}"),
            ));
        }
        let attention = |l: usize| -> Result<LayerState> {
            Ok(match kv {
                KvMode::F32 => LayerState::Kv(LayerCache::new(dev, nkv, cap, hd)?),
                KvMode::F16 => {
                    LayerState::Coded(CodedKv::F16(F16KvCache::zeros(dev, nkv, cap, hd)?))
                }
                KvMode::FastScan { bits } => {
                    // Layer l's rotation seeded by l, as the CPU reference's.
                    let spec = FastScanSpec::new(hd, bits, l as u64)?;
                    LayerState::Coded(CodedKv::FastScan(Box::new(FastScanCache::new(
                        dev, spec, nkv, cap,
                    )?)))
                }
            })
        };
        let coded = match kv {
            KvMode::F32 => None,
            _ => Some(CodedScratch {
                rows: LayerCache::new(dev, nkv, cap, hd)?,
                ws: AttentionWorkspace::default(),
            }),
        };
        Ok(Session {
            model,
            states: (0..c.n_layers)
                .map(|l| match c.delta_net() {
                    Some(dn) if !c.is_attention_layer(l) => {
                        Ok(LayerState::DeltaNet(GpuDeltaNetState::new(dev, &dn)?))
                    }
                    _ => attention(l),
                })
                .collect::<Result<_>>()?,
            clear_states: false,
            pos: 0,
            poisoned: false,
            last_logits: None,
            stats: SessionStats::default(),
            graphs: true,
            graph: None,
            kernels: Kernels::default(),
            kv_mode: kv,
            coded,
            scan_order: ScanOrder::Recurrence,
        })
    }

    /// The order of the DeltaNet layers' scan: [`ScanOrder::Recurrence`] (the default, every
    /// [`ScanKernel`]'s) or [`ScanOrder::Chunked`] (the `delta_net_chunk_*` kernels, the bits of
    /// [`crate::reference::model::CpuSession::set_scan_order`] set alike, on every path). Only
    /// before the first token (or after a reset); a model without DeltaNet layers keeps its
    /// bits either way. The captured decode step is dropped.
    pub fn set_scan_order(&mut self, dev: &Device, order: ScanOrder) -> Result<()> {
        if self.pos != 0 {
            return Err(Error::invalid(
                "Session::set_scan_order",
                "the scan order is set before the first token",
            ));
        }
        if let Some(dn) = self.model.cfg.delta_net() {
            for st in &mut self.states {
                if let LayerState::DeltaNet(d) = st {
                    if d.order() != order {
                        *d = GpuDeltaNetState::with_order(dev, &dn, order)?;
                    }
                }
            }
        }
        self.scan_order = order;
        self.graph = None;
        Ok(())
    }

    /// The DeltaNet layers' scan order.
    pub fn scan_order(&self) -> ScanOrder {
        self.scan_order
    }

    /// How the attention layers keep keys and values.
    pub fn kv_mode(&self) -> KvMode {
        self.kv_mode
    }

    /// Tokens taken so far (the next token's position).
    pub fn position(&self) -> usize {
        self.pos
    }

    /// The forward calls made since the last reset.
    pub fn stats(&self) -> &SessionStats {
        &self.stats
    }

    /// Whether [`Session::decode`] replays a captured graph (the default) or launches every
    /// kernel itself. Either gives the same bits.
    pub fn set_graphs(&mut self, on: bool) {
        self.graphs = on;
        if !on {
            self.graph = None;
        }
    }

    /// Runs attention through its v2 kernels ([`AttentionKernel::Auto2`]: the asynchronous
    /// tile and split kernels) or the v1 ones (the default). Either gives the same bits; the
    /// captured decode step is dropped and captured again under the new choice.
    pub fn set_attention_v2(&mut self, on: bool) {
        let k = [AttentionKernel::Auto, AttentionKernel::Auto2][usize::from(on)];
        if k != self.kernels.attention {
            self.kernels.attention = k;
            self.graph = None;
        }
    }

    /// Runs the DeltaNet layers' scan through `scan` ([`ScanKernel::Auto`] by default): every
    /// version gives the same bits; the captured decode step is dropped and captured again
    /// under the new choice.
    pub fn set_scan(&mut self, scan: ScanKernel) {
        if scan != self.kernels.scan {
            self.kernels.scan = scan;
            self.graph = None;
        }
    }

    /// Forgets every token: position 0, the error state cleared. The KV cache is overwritten
    /// as positions are reused, so it is not cleared; the DeltaNet states are zeroed before the
    /// next forward.
    pub fn reset(&mut self) {
        self.clear_states = true;
        self.pos = 0;
        self.poisoned = false;
        self.last_logits = None;
        self.stats = SessionStats::default();
    }

    /// Takes `tokens` in one batched forward.
    pub fn prefill(&mut self, dev: &Device, tokens: &[u32]) -> Result<()> {
        self.forward(dev, tokens, None)
    }

    /// Takes one token (a graph replay once the step is captured).
    pub fn decode(&mut self, dev: &Device, token: u32) -> Result<()> {
        const OP: &str = "Session::decode";
        if !self.graphs || self.poisoned || self.graph.is_none() {
            self.forward(dev, &[token], None)?;
            if self.graphs && self.graph.is_none() {
                // The step ran; a capture that fails only turns graphs off, and says why.
                match self.capture(dev) {
                    Ok(g) => self.graph = Some(g),
                    Err(e) => {
                        self.graphs = false;
                        self.stats.graph_error = Some(e.to_string());
                    }
                }
            }
            return Ok(());
        }
        check_tokens(OP, &self.model.cfg, &[token], self.pos)?;
        let g = self.graph.as_ref().expect("checked above");
        g.graph.check_device(dev, OP)?;
        self.clear_if_reset(dev)?;
        let g = self.graph.as_mut().expect("checked above");
        self.poisoned = true;
        g.ids.copy_from_host(&[token])?;
        g.pos.set(&[self.pos as u32])?;
        // SAFETY: the graph's kernels read the token and position buffers written above and
        // this session's caches and the model (alive for 'm), and write the logits buffer; it
        // is launched on the device's stream, after the copies, and `&mut self` keeps any
        // other launch of it out.
        unsafe { g.graph.replay(dev, OP) }?;
        let logits = g.logits.to_host()?;
        self.last_logits = Some(logits);
        self.pos += 1;
        self.stats.calls.push(1);
        self.stats.graph_replays += 1;
        self.poisoned = false;
        Ok(())
    }

    /// Captures a one-token forward (nothing runs) on a twin of `dev` (a stream of its own,
    /// so no other thread's launches land in the graph): buffers for the token, the position
    /// (bounded by the context) and the logits, and the graph.
    fn capture(&mut self, dev: &Device) -> Result<DecodeGraph> {
        let c = &self.model.cfg;
        let ids = GpuTensor::zeros(dev, &[1])?;
        let pos = Positions::bounded(dev, 1, c.max_context as u32 - 1)?;
        let mut logits = GpuTensor::zeros(dev, &[1, c.vocab])?;
        // A coded cache's attention reads up to the bound of the step's positions: the graph's
        // scratch for it is allocated now (not inside the capture) and lent to the session
        // while it captures.
        let mut coded_ws = None;
        if let Some(cs) = &mut self.coded {
            let mut ws = AttentionWorkspace::default();
            ws.reserve(dev, 1, c.n_heads, c.head_dim, c.max_context)?;
            std::mem::swap(&mut cs.ws, &mut ws);
            coded_ws = Some(ws);
        }
        let graph = dev.capture(
            |twin| reserve_scratch(twin, c, 1),
            |twin| self.forward_inner(twin, &ids, &pos, None, &mut logits),
        );
        // The session's own scratch back, the graph's kept with it.
        if let (Some(cs), Some(own)) = (&mut self.coded, coded_ws.as_mut()) {
            std::mem::swap(&mut cs.ws, own);
        }
        Ok(DecodeGraph {
            ids,
            pos,
            logits,
            graph: graph?,
            _coded_ws: coded_ws,
        })
    }

    /// Zeroes the DeltaNet states after a [`Session::reset`].
    fn clear_if_reset(&mut self, dev: &Device) -> Result<()> {
        if self.clear_states {
            for st in &mut self.states {
                if let LayerState::DeltaNet(d) = st {
                    d.clear(dev)?;
                }
            }
            self.clear_states = false;
        }
        Ok(())
    }

    /// Every DeltaNet layer's recurrent state after the tokens taken, in layer order: its
    /// convolution window, then its delta-rule matrices (empty for a model without DeltaNet
    /// layers; in the chunked order the matrices at the last boundary, then the chunk under
    /// way's keys, u, factors and decays): [`crate::reference::model::CpuSession::recurrent_state`]'s
    /// layout, to compare bit for bit.
    pub fn recurrent_state(&self) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        for st in &self.states {
            if let LayerState::DeltaNet(d) = st {
                let flat = d.to_host_flat()?;
                if self.clear_states {
                    // Reset, not yet zeroed on the device: the state before the first token.
                    out.resize(out.len() + flat.len(), 0.0);
                } else {
                    out.extend(flat);
                }
            }
        }
        Ok(out)
    }

    /// Kernels in the captured decode step (one graph launch replays them all), once captured.
    pub fn graph_kernels(&self) -> Option<u64> {
        self.graph.as_ref().map(|g| g.graph.kernels())
    }

    /// Takes `prompt` in one prefill, then `n` tokens each drawn by [`crate::sample::sample`]
    /// from the logits before it (sequence `sequence`, step = the position the drawn token
    /// takes) and decoded; returns the drawn tokens: the tokens of
    /// [`crate::reference::model::CpuSession::generate`], whatever the schedule.
    pub fn generate(
        &mut self,
        dev: &Device,
        prompt: &[u32],
        n: usize,
        params: &crate::sample::Sampling,
        sequence: u64,
    ) -> Result<Vec<u32>> {
        crate::sample::check_generate("Session::generate", prompt, params)?;
        self.prefill(dev, prompt)?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let next = crate::sample::sample(&self.logits()?, params, sequence, self.pos as u64)?;
            out.push(next);
            self.decode(dev, next)?;
        }
        Ok(out)
    }

    /// Logits `[vocab]` after the last token taken.
    pub fn logits(&self) -> Result<Vec<f32>> {
        self.last_logits
            .clone()
            .ok_or_else(|| Error::invalid("Session::logits", "no token has been taken"))
    }

    /// Takes `tokens` in one forward, appending every layer's hidden states and every token's
    /// logits to `trace` when given.
    pub fn forward(
        &mut self,
        dev: &Device,
        tokens: &[u32],
        trace: Option<&mut Trace>,
    ) -> Result<()> {
        const OP: &str = "Session::forward";
        if self.poisoned {
            return Err(Error::invalid(
                OP,
                "an earlier forward failed part-way; call reset()",
            ));
        }
        check_tokens(OP, &self.model.cfg, tokens, self.pos)?;
        if tokens.is_empty() {
            return Ok(());
        }
        self.poisoned = true;
        self.clear_if_reset(dev)?;
        let n = tokens.len();
        let pos: Vec<u32> = (self.pos..self.pos + n).map(|p| p as u32).collect();
        let positions = Positions::new(dev, &pos)?;
        let ids = GpuTensor::from_host(dev, tokens, &[n])?;
        let rows = if trace.is_some() { n } else { 1 };
        let mut logits = GpuTensor::output(dev, &[rows, self.model.cfg.vocab])?;
        let mut trace = trace;
        self.forward_inner(dev, &ids, &positions, trace.as_deref_mut(), &mut logits)?;
        let all = logits.to_host()?;
        let vocab = self.model.cfg.vocab;
        self.last_logits = Some(all[(rows - 1) * vocab..].to_vec());
        if let Some(t) = trace {
            t.logits.extend(all);
        }
        self.pos += n;
        self.stats.calls.push(n);
        self.poisoned = false;
        Ok(())
    }

    /// The forward of `ids: [n]` (on the device, each below the vocabulary) at `positions`:
    /// every layer's hidden states appended to `trace` when given, and the logits of every
    /// token (tracing) or of the last one into `logits: [rows, vocab]`. Queues work only (no
    /// host round trip unless tracing), so a one-token call can be captured as a graph.
    fn forward_inner(
        &mut self,
        dev: &Device,
        ids: &GpuTensor<u32>,
        positions: &Positions,
        trace: Option<&mut Trace>,
        logits: &mut GpuTensor<f32>,
    ) -> Result<()> {
        let mem = Memory::Solo(&mut self.states, self.coded.as_mut());
        forward_layers(
            self.model,
            self.kernels,
            dev,
            ids,
            positions,
            mem,
            trace,
            logits,
            None,
        )
    }
}

/// A [`Session`] with the device it runs on: a [`crate::sample::Decoder`] (a prompt in one
/// prefill, then one decode step a token).
pub struct SessionOnDevice<'s, 'm> {
    /// The device.
    pub dev: &'s Device,
    /// The session.
    pub session: &'s mut Session<'m>,
}

impl crate::sample::Decoder for SessionOnDevice<'_, '_> {
    fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        match tokens {
            [t] if self.session.position() > 0 => self.session.decode(self.dev, *t)?,
            _ => self.session.prefill(self.dev, tokens)?,
        }
        self.session.logits()
    }

    fn position(&self) -> usize {
        self.session.position()
    }
}

/// Where a forward's rows keep their keys, values and recurrent states: one sequence's caches
/// ([`Session`]) or the paged caches and per-sequence states of many
/// ([`crate::model::batch::BatchSession`], with the step's rows). The layer loop,
/// [`forward_layers`], is the same for both.
pub(crate) enum Memory<'a> {
    /// Per layer its KV cache or DeltaNet state, and the coded caches' shared rows.
    Solo(&'a mut [LayerState], Option<&'a mut CodedScratch>),
    /// The paged caches and states, and where this step's rows go.
    Paged(&'a mut PagedDevice, &'a PagedRows),
}

/// A batched session's device memory: per layer a paged KV cache (`[n_kv, n_pages * 64, hd]`,
/// attention layers), per sequence its DeltaNet states.
pub(crate) struct PagedDevice {
    pub(crate) caches: Vec<Option<LayerCache>>,
    pub(crate) dn:
        std::collections::BTreeMap<crate::spec::paged::SeqId, Vec<Option<GpuDeltaNetState>>>,
}

/// One segment of a batched step: rows `row0..row0 + rows` (after the step's reordering, a
/// sequence's rows are contiguous and in position order), their positions on the device (a
/// segment of the decode block has none: the block's own serve it) and the sequence's block
/// table.
pub(crate) struct PagedSegment {
    pub(crate) seq: crate::spec::paged::SeqId,
    pub(crate) row0: usize,
    pub(crate) rows: usize,
    pub(crate) pos: Option<Positions>,
    pub(crate) table: Vec<u32>,
}

/// Where a batched step's rows go: every row's cache slot, the segments, and the decode block
/// (rows `0..short.0` are the segments of at most `SPLIT_MAX_QUERIES` rows: one attention
/// launch with a block table per row, `short.2` entries each).
pub(crate) struct PagedRows {
    pub(crate) slots: Positions,
    pub(crate) segments: Vec<PagedSegment>,
    pub(crate) short: Option<ShortBlock>,
}

/// A batched step's decode block: its first `rows` rows (segments of at most
/// `SPLIT_MAX_QUERIES` rows), their positions and a block table per row, `stride` entries each.
pub(crate) struct ShortBlock {
    pub(crate) rows: usize,
    pub(crate) pos: Positions,
    pub(crate) tables: BlockTables,
    pub(crate) stride: usize,
}

/// Where a decode block's tables are: on the host (checked and uploaded by each attention
/// layer's launch), or already on the device (a captured step's, checked when written).
pub(crate) enum BlockTables {
    Host(Vec<u32>),
    Device(GpuTensor<u32>),
}

/// The layer loop of every forward: `ids: [n]` at `positions` through the model's layers,
/// each layer's hidden states appended to `trace` when given; logits into `logits: [rows,
/// vocab]` of the rows `logit_rows` names (on the device), or, without them, of every token
/// (`rows == n`) or the last one.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_layers(
    m: &GpuModel,
    kernels: Kernels,
    dev: &Device,
    ids: &GpuTensor<u32>,
    positions: &Positions,
    mut mem: Memory<'_>,
    mut trace: Option<&mut Trace>,
    logits: &mut GpuTensor<f32>,
    logit_rows: Option<&GpuTensor<u32>>,
) -> Result<()> {
    let c = &m.cfg;
    let (n, d) = (ids.len(), c.dim);
    let mut h = GpuTensor::output(dev, &[n, d])?;
    gather_rows_device(dev, &m.embed, ids, &mut h)?;
    // The norms' outputs with their quantization beside them (add_rmsnorm_q8): the
    // products that read them launch no quantization of their own.
    // SAFETY: written below (the first layer's norm) before anything reads it.
    let mut x = unsafe { GpuActPair::uninit(dev, n, d) }?;
    let mut o = GpuTensor::output(dev, &[n, d])?;
    let mut bufs = AttentionBuffers::new(m, dev, n)?;
    // x = the first layer's attention norm of h; every later one comes fused with the
    // residual add before it (add_rmsnorm: the bits of add then rmsnorm, a launch fewer).
    if let Some(first) = m.layers.first() {
        x.write_with(dev, |x| rmsnorm(dev, &h, &first.attn_norm, c.norm_eps, x))?;
    }
    for (l, layer) in m.layers.iter().enumerate() {
        match &layer.mixer {
            GpuMixer::Attention(mixer) => {
                let step = AttentionStep {
                    kernel: kernels.attention,
                    positions,
                };
                mixer.forward(m, dev, &step, mem.kv(l)?, &x, &mut bufs, &mut o)?
            }
            GpuMixer::DeltaNet(mixer) => {
                mixer.forward(c, dev, kernels.scan, l, &mut mem, &x, &mut o)?
            }
        }
        add_rmsnorm_q8(dev, &mut h, &o, &layer.ffn_norm, c.norm_eps, &mut x)?;
        let moe = layer.moe.forward_batched_pair(dev, &x)?;
        match m.layers.get(l + 1) {
            Some(next) => {
                add_rmsnorm_q8(dev, &mut h, &moe.out, &next.attn_norm, c.norm_eps, &mut x)?
            }
            None => add(dev, &mut h, &moe.out)?,
        }
        if let Some(t) = trace.as_deref_mut() {
            t.push_layer(l, &h.to_host()?);
        }
    }
    // Logits: of the rows asked for, or every token's when tracing, the last token's otherwise.
    let rows = logits.dims()[0];
    let hl = if let Some(idx) = logit_rows {
        let mut sel = GpuTensor::output(dev, &[idx.len(), d])?;
        gather_rows_device(dev, &h, idx, &mut sel)?;
        sel
    } else if rows == n {
        h
    } else {
        let mut last = GpuTensor::output(dev, &[1, d])?;
        dev.stream()
            .memcpy_dtod(&h.slice().slice((n - 1) * d..), last.slice_mut())?;
        last
    };
    let mut hn = GpuTensor::output(dev, &[rows, d])?;
    rmsnorm(dev, &hl, &m.out_norm, c.norm_eps, &mut hn)?;
    matmul(dev, &hn, &m.lm_head, logits)?;
    Ok(())
}

/// The attention layers' activations, allocated once per forward and reused by every layer:
/// the normed and rotated queries `qn: [n, nh, hd]`, the attention output `a: [n, nh, hd]`,
/// and, where the model has ungated layers and `nh * hd % 32 == 0`, that output with its
/// quantization (`ap`, which the attention writes itself: Wo launches no quantization).
struct AttentionBuffers {
    qn: GpuTensor<f32>,
    a: GpuTensor<f32>,
    ap: Option<GpuActPair>,
}

impl AttentionBuffers {
    fn new(m: &GpuModel, dev: &Device, n: usize) -> Result<Self> {
        let (hd, nh) = (m.cfg.head_dim, m.cfg.n_heads);
        let ungated = m
            .layers
            .iter()
            .any(|l| matches!(&l.mixer, GpuMixer::Attention(a) if !a.gated));
        Ok(AttentionBuffers {
            qn: GpuTensor::output(dev, &[n, nh, hd])?,
            a: GpuTensor::output(dev, &[n, nh, hd])?,
            ap: match ungated && (nh * hd) % 32 == 0 {
                // SAFETY: attention_pair writes the whole pair before Wo reads it.
                true => Some(unsafe { GpuActPair::uninit(dev, n, nh * hd) }?),
                false => None,
            },
        })
    }
}

/// The kernel choices of a forward that are not fixed by the shapes: attention's and the
/// DeltaNet scan's. Every choice gives the same bits (the tests hold each to the reference);
/// the default is each family's `Auto`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Kernels {
    /// How attention picks its kernels.
    pub attention: AttentionKernel,
    /// Which DeltaNet scan runs.
    pub scan: ScanKernel,
}

/// How one forward's attention layers run: the kernel choice and the rows' positions.
struct AttentionStep<'a> {
    kernel: AttentionKernel,
    positions: &'a Positions,
}

/// Where an attention layer keeps this step's keys and values.
enum LayerKv<'a> {
    /// One sequence's f32 cache, row = position.
    Solo(&'a mut LayerCache),
    /// The paged f32 cache, with where each of the step's rows goes.
    Paged(&'a PagedRows, &'a mut LayerCache),
    /// One sequence's coded cache, with the session's shared rows.
    Coded(&'a mut CodedKv, &'a mut CodedScratch),
}

impl Memory<'_> {
    /// Layer `l`'s KV cache.
    fn kv(&mut self, l: usize) -> Result<LayerKv<'_>> {
        match self {
            Memory::Solo(states, scratch) => match (&mut states[l], scratch) {
                (LayerState::Kv(cache), _) => Ok(LayerKv::Solo(cache)),
                (LayerState::Coded(cache), Some(sc)) => Ok(LayerKv::Coded(cache, sc)),
                _ => Err(mismatch()),
            },
            Memory::Paged(pd, rows) => {
                let cache = pd.caches[l].as_mut().ok_or_else(mismatch)?;
                Ok(LayerKv::Paged(rows, cache))
            }
        }
    }
}

impl AttentionMixer {
    /// The attention mixer of `x` into `o: [n, dim]`, writing this step's keys and values
    /// into `kv` first: one product for q, k and v (three if their formats differ); one
    /// launch for their norms, rotations and the cache write (the bits of rmsnorm, rope_neox
    /// and kv_write in turn; a coded cache then codes those rows); attention; for a gated
    /// layer each head's output gate; Wo.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        m: &GpuModel,
        dev: &Device,
        step: &AttentionStep<'_>,
        kv: LayerKv<'_>,
        x: &GpuActPair,
        bufs: &mut AttentionBuffers,
        o: &mut GpuTensor<f32>,
    ) -> Result<()> {
        let c = &m.cfg;
        let n = x.x().dims()[0];
        let (hd, nh, nkv) = (c.head_dim, c.n_heads, c.n_kv_heads);
        let AttentionBuffers { qn, a, ap } = bufs;
        // Gated: each q head is followed by its output gate, applied to the attention's
        // output before Wo.
        let qw = if self.gated { 2 * nh * hd } else { nh * hd };
        let (mut y0, mut y1, mut y2);
        let input = match &self.qkv {
            QkvWeights::Stacked(w) => {
                y0 = GpuTensor::output(dev, &[n, qw + 2 * nkv * hd])?;
                matmul_shared_pair(dev, x, &mut [Product::Dense(w, &mut y0)])?;
                QkvInput::Stacked(&y0)
            }
            QkvWeights::Separate([wq, wk, wv]) => {
                y0 = GpuTensor::output(dev, &[n, qw])?;
                y1 = GpuTensor::output(dev, &[n, nkv * hd])?;
                y2 = GpuTensor::output(dev, &[n, nkv * hd])?;
                matmul_shared_pair(
                    dev,
                    x,
                    &mut [
                        Product::Dense(wq, &mut y0),
                        Product::Dense(wk, &mut y1),
                        Product::Dense(wv, &mut y2),
                    ],
                )?;
                QkvInput::Separate {
                    q: &y0,
                    k: &y1,
                    v: &y2,
                }
            }
        };
        let (qnw, knw, eps, pos) = (&self.q_norm, &self.k_norm, c.norm_eps, step.positions);
        // Keys and values into the cache, the attention into `a` (or straight into Wo's
        // quantized input).
        match kv {
            LayerKv::Solo(cache) => {
                qkv_norm_rope(
                    dev, input, self.gated, qnw, knw, eps, pos, &m.rope, cache, qn,
                )?;
                if let (Some(ap), false) = (ap.as_mut(), self.gated) {
                    // The attention writes Wo's quantized input itself (a launch fewer).
                    attention_pair_with(dev, step.kernel, qn, cache, pos, ap)?;
                    return matmul_shared_pair(dev, ap, &mut [Product::Dense(&self.wo, o)]);
                }
                attention_with(dev, step.kernel, qn, cache, pos, a)?;
            }
            LayerKv::Paged(rows, cache) => {
                qkv_norm_rope_paged(
                    dev,
                    input,
                    self.gated,
                    qnw,
                    knw,
                    eps,
                    pos,
                    &rows.slots,
                    &m.rope,
                    cache,
                    qn,
                )?;
                attend_paged(dev, cache, rows, qn, a)?;
            }
            LayerKv::Coded(cache, sc) => {
                let CodedScratch { rows, ws } = sc;
                qkv_norm_rope(
                    dev, input, self.gated, qnw, knw, eps, pos, &m.rope, rows, qn,
                )?;
                let view = match cache {
                    CodedKv::F16(c) => {
                        c.write_rows(dev, rows, pos)?;
                        CodedKvRef::F16(c)
                    }
                    CodedKv::FastScan(c) => {
                        c.write_rows(dev, rows, pos)?;
                        CodedKvRef::FastScan(c)
                    }
                };
                coded_attention(dev, qn, view, pos, ws, a)?;
            }
        }
        if self.gated {
            // The gates sit at hd + h * 2 hd of the q product's rows (the stacked product's q
            // columns come first).
            gate_heads_sigmoid(dev, a, &y0, hd, 2 * hd)?;
        }
        a.reshape(&[n, nh * hd])?;
        matmul(dev, a, &self.wo, o)?;
        a.reshape(&[n, nh, hd])
    }
}

impl DeltaNetMixer {
    /// The Gated DeltaNet mixer of layer `l` on `x` into `o: [n, dim]`: the four projections
    /// of x (one quantization), the scan through the state `mem` keeps for the layer (conv,
    /// unit q/k, gates, the delta rule), the gated norm per value head, the output.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        c: &ModelConfig,
        dev: &Device,
        scan: ScanKernel,
        l: usize,
        mem: &mut Memory<'_>,
        x: &GpuActPair,
        o: &mut GpuTensor<f32>,
    ) -> Result<()> {
        let n = x.x().dims()[0];
        let dn = c.delta_net().ok_or_else(mismatch)?;
        let (hv, sd) = (dn.v_heads, dn.head_dim);
        let [wqkv, wz, wb, wa] = &*self.proj;
        let mut mixed = GpuTensor::output(dev, &[n, dn.conv_dim()])?;
        let mut z = GpuTensor::output(dev, &[n * hv, sd])?;
        let mut bt = GpuTensor::output(dev, &[n, hv])?;
        let mut al = GpuTensor::output(dev, &[n, hv])?;
        z.reshape(&[n, hv * sd])?;
        matmul_shared_pair(
            dev,
            x,
            &mut [
                Product::Dense(wqkv, &mut mixed),
                Product::Dense(wz, &mut z),
                Product::Dense(wb, &mut bt),
                Product::Dense(wa, &mut al),
            ],
        )?;
        z.reshape(&[n * hv, sd])?;
        let mut so = GpuTensor::output(dev, &[n, hv, sd])?;
        let consts = &self.consts;
        match mem {
            Memory::Solo(states, _) => {
                let LayerState::DeltaNet(state) = &mut states[l] else {
                    return Err(mismatch());
                };
                let eps = c.norm_eps;
                delta_net_scan_with(dev, scan, consts, state, &mixed, &bt, &al, eps, &mut so)?;
            }
            Memory::Paged(pd, rows) => scan_paged(
                dev, scan, consts, pd, rows, l, &mixed, &bt, &al, c.norm_eps, &mut so,
            )?,
        }
        so.reshape(&[n * hv, sd])?;
        let mut normed = GpuTensor::output(dev, &[n * hv, sd])?;
        rmsnorm(dev, &so, &self.norm, c.norm_eps, &mut normed)?;
        let mut gated = GpuTensor::output(dev, &[n * hv, sd])?;
        delta_net_gate(dev, &normed, &z, &mut gated)?;
        gated.reshape(&[n, hv * sd])?;
        matmul(dev, &gated, &self.out, o)
    }
}

/// Grows `dev`'s activation scratch to what a forward of `n` rows quantizes at most (the
/// widest input of any product, per row), so that it never grows (and moves) inside a capture.
pub(crate) fn reserve_scratch(dev: &Device, c: &ModelConfig, n: usize) -> Result<()> {
    let widest = [
        c.dim,
        c.n_heads * c.head_dim,
        c.moe.top_k * c.moe.ffn,
        c.moe.shared_ffn.unwrap_or(0),
        c.delta_net().map_or(0, |d| d.v_heads * d.head_dim),
    ];
    drop(dev.act_scratch(n.max(1) * widest.into_iter().max().unwrap_or(1))?);
    Ok(())
}

fn mismatch() -> Error {
    Error::invalid(
        "Session::forward",
        "a layer's state does not match its mixer",
    )
}

/// Rows `r0..r0 + rows` of `x: [n, w]` (any trailing dims flattened) as a tensor of their own.
fn rows_of(dev: &Device, x: &GpuTensor<f32>, r0: usize, rows: usize) -> Result<GpuTensor<f32>> {
    let n = x.dims()[0];
    let w = x.len() / n.max(1);
    let mut dims = x.dims().to_vec();
    dims[0] = rows;
    let mut out = GpuTensor::output(dev, &dims)?;
    dev.stream()
        .memcpy_dtod(&x.slice().slice(r0 * w..(r0 + rows) * w), out.slice_mut())?;
    Ok(out)
}

/// Writes `part` into rows `r0..` of `x`.
fn put_rows(dev: &Device, x: &mut GpuTensor<f32>, r0: usize, part: &GpuTensor<f32>) -> Result<()> {
    let w = x.len() / x.dims()[0].max(1);
    let len = part.len();
    dev.stream().memcpy_dtod(
        part.slice(),
        &mut x.slice_mut().slice_mut(r0 * w..r0 * w + len),
    )?;
    Ok(())
}

/// A batched step's attention into `a: [n, nh, hd]`: the decode block (rows `0..short`) in one
/// launch with a block table per row, each longer segment in one launch with its sequence's.
fn attend_paged(
    dev: &Device,
    cache: &LayerCache,
    rows: &PagedRows,
    qn: &GpuTensor<f32>,
    a: &mut GpuTensor<f32>,
) -> Result<()> {
    use crate::kernels::attention::{attention_paged, attention_paged_rows, PagedQueries};
    let n = qn.dims()[0];
    if let Some(b) = &rows.short {
        let launch = |q: &GpuTensor<f32>, o: &mut GpuTensor<f32>| match &b.tables {
            BlockTables::Host(tables) => {
                let t = PagedQueries::Rows {
                    tables,
                    stride: b.stride,
                };
                attention_paged(dev, q, cache, &b.pos, t, o)
            }
            BlockTables::Device(tables) => {
                attention_paged_rows(dev, q, cache, &b.pos, tables, b.stride, o)
            }
        };
        if b.rows == n {
            // A step of decode rows only: the block is every row, in place.
            launch(qn, a)?;
        } else {
            let q = rows_of(dev, qn, 0, b.rows)?;
            let mut o = GpuTensor::output(dev, q.dims())?;
            launch(&q, &mut o)?;
            put_rows(dev, a, 0, &o)?;
        }
    }
    let first_long = rows.short.as_ref().map_or(0, |s| s.rows);
    for seg in rows.segments.iter().filter(|s| s.row0 >= first_long) {
        let pos = seg.pos.as_ref().ok_or_else(mismatch)?;
        let t = PagedQueries::Sequence { table: &seg.table };
        if seg.rows == n {
            attention_paged(dev, qn, cache, pos, t, a)?;
        } else {
            let q = rows_of(dev, qn, seg.row0, seg.rows)?;
            let mut o = GpuTensor::output(dev, q.dims())?;
            attention_paged(dev, &q, cache, pos, t, &mut o)?;
            put_rows(dev, a, seg.row0, &o)?;
        }
    }
    debug_assert!(rows.segments.iter().all(|s| s.row0 + s.rows <= n));
    Ok(())
}

/// A batched step's DeltaNet scan of layer `l`: each segment's rows through its sequence's
/// state, in order.
#[allow(clippy::too_many_arguments)]
fn scan_paged(
    dev: &Device,
    scan: ScanKernel,
    consts: &GpuDeltaNetConsts,
    pd: &mut PagedDevice,
    rows: &PagedRows,
    l: usize,
    mixed: &GpuTensor<f32>,
    bt: &GpuTensor<f32>,
    al: &GpuTensor<f32>,
    eps: f32,
    so: &mut GpuTensor<f32>,
) -> Result<()> {
    let n = mixed.dims()[0];
    for seg in &rows.segments {
        let states = pd.dn.get_mut(&seg.seq).ok_or_else(mismatch)?;
        let state = states[l].as_mut().ok_or_else(mismatch)?;
        if seg.rows == n {
            // One sequence's rows: the step's tensors as they are.
            delta_net_scan_with(dev, scan, consts, state, mixed, bt, al, eps, so)?;
            continue;
        }
        let (mx, b, a) = (
            rows_of(dev, mixed, seg.row0, seg.rows)?,
            rows_of(dev, bt, seg.row0, seg.rows)?,
            rows_of(dev, al, seg.row0, seg.rows)?,
        );
        let mut dims = so.dims().to_vec();
        dims[0] = seg.rows;
        let mut o = GpuTensor::output(dev, &dims)?;
        delta_net_scan_with(dev, scan, consts, state, &mx, &b, &a, eps, &mut o)?;
        put_rows(dev, so, seg.row0, &o)?;
    }
    Ok(())
}
