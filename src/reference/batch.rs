//! The CPU reference of a batched session ([`CpuBatchSession`]): many sequences through one
//! forward, a ragged batch of prefill chunks and decode tokens, keys and values in a paged cache
//! ([`crate::spec::paged`]). Each row is computed exactly as [`CpuSession`] computes it for
//! its sequence alone: the rows of a batch meet only in products whose every output row is its
//! own row's dot products, and attention and the DeltaNet recurrence read the row's own
//! sequence in position order, whichever pages hold it. So a sequence's bits never depend on
//! what else shares its batch, how its prompt was chunked, or where its pages lie; the tests
//! prove it over random schedules.
//!
//! [`CpuSession`]: crate::reference::model::CpuSession

use std::collections::BTreeMap;

use crate::error::{check_indices, Error, Result};
use crate::reference;
use crate::reference::attention::AttnOrder;
use crate::reference::delta_net::{self, ChunkedState, DeltaNetState, DeltaNetWeights, ScanOrder};
use crate::reference::expert_parallel::ExpertParallel;
use crate::reference::gemm::GemmOrder;
use crate::reference::model::{
    flat_chunked, flat_states, forward_rows, new_chunked_states, new_states, store_kv, Memory,
    RopeTable,
};
use crate::spec::config::ModelConfig;
use crate::spec::paged::{BatchPlan, BatchToken, PagedSequences, SeqId, PAGE};
use crate::spec::schedule::{drive, BatchRunner, Schedule};
use crate::spec::trace::Trace;
use crate::spec::weights::{LayerWeights, ModelWeights};

// A page is one attention chunk: the paged kernels walk a sequence's keys page by page.
const _: () = assert!(PAGE == crate::reference::attention::CHUNK);

/// Many sequences over one paged f32 KV cache, on the CPU: sequences join
/// ([`CpuBatchSession::add_sequence`]) and leave ([`CpuBatchSession::remove_sequence`]) at any
/// step, and one [`CpuBatchSession::forward`] takes rows of any of them (the README's example):
///
/// ```
/// use bitexact::model::{BatchToken, CpuBatchSession, CpuSession, ModelConfig, ModelWeights};
/// use bitexact::model::Trace;
/// use bitexact::quant::WeightFormat;
///
/// let cfg = ModelConfig::preset("tiny", WeightFormat::F32)?;
/// let w = ModelWeights::generate(&cfg, 0, None)?;
/// let mut s = CpuBatchSession::new(&w, 8)?; // a cache of 8 pages, shared
/// let (a, b) = (s.add_sequence(), s.add_sequence());
/// let mut t = Trace::default();
/// // a's prompt of three tokens and b's first token in one step ...
/// let row = |seq, pos, token| BatchToken { seq, pos, token };
/// s.forward(&[row(a, 0, 5), row(b, 0, 9), row(a, 1, 6), row(a, 2, 7)], &mut t)?;
/// // ... then a decodes while b continues its prompt; b's pages return when it leaves.
/// s.forward(&[row(b, 1, 3), row(a, 3, 11), row(b, 2, 4)], &mut t)?;
/// s.remove_sequence(b)?;
/// // a's last row equals a run alone, bit for bit.
/// let mut alone = Trace::default();
/// CpuSession::new(&w).run(&[5, 6, 7, 11], &mut alone)?;
/// let v = cfg.vocab;
/// assert_eq!(
///     t.logits[5 * v..6 * v].iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
///     alone.logits[3 * v..].iter().map(|x| x.to_bits()).collect::<Vec<_>>()
/// );
/// # Ok::<(), bitexact::Error>(())
/// ```
pub struct CpuBatchSession<'w> {
    w: &'w ModelWeights,
    rope: RopeTable,
    seqs: PagedSequences,
    mem: PagedMemory,
}

/// The paged caches (per layer `[n_kv, n_pages * PAGE, hd]`, empty for DeltaNet layers) and
/// each sequence's recurrent states.
struct PagedMemory {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    slots: usize,
    dn: BTreeMap<SeqId, Vec<Option<DeltaNetState>>>,
    /// With [`ScanOrder::Chunked`], each sequence's chunked-order states (in place of `dn`'s).
    chunked: BTreeMap<SeqId, Vec<Option<ChunkedState>>>,
    order: ScanOrder,
    attn: AttnOrder,
    gemm: GemmOrder,
    ep: Option<ExpertParallel>,
}

impl<'w> CpuBatchSession<'w> {
    /// A session over `w` whose cache holds `n_pages` pages of [`PAGE`] positions, shared by
    /// all its sequences (each at most `max_context` positions).
    pub fn new(w: &'w ModelWeights, n_pages: usize) -> Result<Self> {
        let c = &w.cfg;
        let seqs = PagedSequences::new(n_pages, c.max_context)?;
        let slots = n_pages * PAGE;
        // A pool larger than the host's memory is an error, not an abort.
        let cache = |attn: bool| -> Result<Vec<f32>> {
            let n = if attn {
                c.n_kv_heads * slots * c.head_dim
            } else {
                0
            };
            let mut v = Vec::new();
            v.try_reserve_exact(n).map_err(|_| {
                Error::invalid(
                    "CpuBatchSession::new",
                    format!(
                        "a cache of {n_pages} pages needs {} bytes a layer for keys alone, \
                         more than the host can allocate",
                        n * 4
                    ),
                )
            })?;
            v.resize(n, 0.0);
            Ok(v)
        };
        let attn: Vec<bool> = w.layers.iter().map(|l| l.attention().is_some()).collect();
        Ok(CpuBatchSession {
            w,
            rope: reference::rope::rope_table(c.max_context, c.rope_dim, c.rope_base),
            seqs,
            mem: PagedMemory {
                k: attn.iter().map(|&a| cache(a)).collect::<Result<_>>()?,
                v: attn.iter().map(|&a| cache(a)).collect::<Result<_>>()?,
                slots,
                dn: BTreeMap::new(),
                chunked: BTreeMap::new(),
                order: ScanOrder::Recurrence,
                attn: AttnOrder::default(),
                gemm: GemmOrder::Chain,
                ep: None,
            },
        })
    }

    /// How attention forms scores and chunk outputs, and how every matrix product reduces
    /// (the canonical f32 orders by default; [`crate::model::CpuSession`]'s modes). Set before
    /// the first step: a sequence's bits are those of a [`crate::model::CpuSession`] in the
    /// same orders.
    pub fn set_orders(&mut self, attn: AttnOrder, gemm: GemmOrder) {
        self.mem.attn = attn;
        self.mem.gemm = gemm;
    }

    /// Runs the MoE halves expert-parallel: the routed experts dealt over `ep`'s ranks, rows
    /// exchanged through its transport, sequence `s`'s rows on home rank `s.0 % ranks`
    /// ([`crate::reference::expert_parallel`]). Every row keeps its bits.
    pub fn set_expert_parallel(&mut self, ep: ExpertParallel) -> Result<()> {
        let held: usize = (0..ep.ranks()).map(|r| ep.shard(0, r).experts.len()).sum();
        if ep.layers() != self.w.layers.len() || held != self.w.cfg.moe.n_experts {
            return Err(Error::invalid(
                "CpuBatchSession::set_expert_parallel",
                "the expert shards are not of these weights",
            ));
        }
        self.mem.ep = Some(ep);
        Ok(())
    }

    /// The expert-parallel ranks, when set.
    pub fn expert_parallel(&self) -> Option<&ExpertParallel> {
        self.mem.ep.as_ref()
    }

    /// The order of the DeltaNet layers' scan for every sequence
    /// ([`crate::reference::model::CpuSession::set_scan_order`]'s): only while the session has
    /// no sequence.
    pub fn set_scan_order(&mut self, order: ScanOrder) -> Result<()> {
        if !self.mem.dn.is_empty() {
            return Err(Error::invalid(
                "CpuBatchSession::set_scan_order",
                "the scan order is set before the first sequence joins",
            ));
        }
        self.mem.order = order;
        Ok(())
    }

    /// A new, empty sequence.
    pub fn add_sequence(&mut self) -> SeqId {
        let id = self.seqs.add();
        self.mem.dn.insert(id, new_states(self.w));
        if self.mem.order == ScanOrder::Chunked {
            self.mem.chunked.insert(id, new_chunked_states(self.w));
        }
        id
    }

    /// Removes `seq`: its pages go back to the pool, its states are dropped.
    pub fn remove_sequence(&mut self, seq: SeqId) -> Result<()> {
        self.seqs.remove(seq)?;
        self.mem.dn.remove(&seq);
        self.mem.chunked.remove(&seq);
        Ok(())
    }

    /// The page bookkeeping (lengths, block tables, free and reused pages).
    pub fn sequences(&self) -> &PagedSequences {
        &self.seqs
    }

    /// Takes the rows of `batch` in one step, appending each layer's hidden states of every
    /// row (in batch order) and, when the weights hold every layer, their logits
    /// (`[rows, vocab]`) to `trace`. Every row's bits are those of its sequence run alone one
    /// token at a time. A refused batch ([`PagedSequences::plan`]'s rules, or a token past the
    /// vocabulary) changes nothing; a forward that fails part way leaves its sequences
    /// poisoned (the others untouched).
    pub fn forward(&mut self, batch: &[BatchToken], trace: &mut Trace) -> Result<()> {
        const OP: &str = "CpuBatchSession::forward";
        let tokens: Vec<u32> = batch.iter().map(|t| t.token).collect();
        check_indices(OP, "tokens", &tokens, self.w.cfg.vocab)?;
        let plan = self.seqs.plan(OP, batch)?;
        if batch.is_empty() {
            return Ok(());
        }
        let pos: Vec<u32> = batch.iter().map(|t| t.pos).collect();
        let mut step = PagedStep {
            mem: &mut self.mem,
            plan: &plan,
        };
        match forward_rows(self.w, &self.rope, &mut step, &tokens, &pos, trace) {
            Ok(()) => {
                self.seqs.commit(&plan);
                Ok(())
            }
            Err(e) => {
                self.seqs.poison(&plan.seqs);
                Err(e)
            }
        }
    }

    /// `seq`'s recurrent state, [`crate::reference::model::CpuSession::recurrent_state`]'s
    /// layout.
    pub fn recurrent_state(&self, seq: SeqId) -> Result<Vec<f32>> {
        self.seqs.len(seq)?;
        Ok(match self.mem.chunked.get(&seq) {
            Some(ch) => flat_chunked(ch),
            None => flat_states(&self.mem.dn[&seq]),
        })
    }
}

/// One forward's view of the paged memory: the plan says where each row's keys go and which
/// pages its sequence reads.
struct PagedStep<'a> {
    mem: &'a mut PagedMemory,
    plan: &'a BatchPlan,
}

impl Memory for PagedStep<'_> {
    fn attention(
        &mut self,
        c: &ModelConfig,
        l: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        pos: &[u32],
    ) -> Result<Vec<f32>> {
        let (hd, nh, nkv, slots) = (c.head_dim, c.n_heads, c.n_kv_heads, self.mem.slots);
        let (kc, vc) = (&mut self.mem.k[l], &mut self.mem.v[l]);
        // Every row's keys and values first: a row sees the batch's earlier rows of its
        // sequence.
        store_kv(kc, vc, k, v, &self.plan.slots, nkv, slots, hd);
        // Then each row over its sequence's keys, gathered in position order from its pages
        // (once per sequence and kv head, up to the sequence's length after the batch).
        let mut gathered: BTreeMap<(usize, usize), (Vec<f32>, Vec<f32>)> = BTreeMap::new();
        let mut out = Vec::with_capacity(pos.len() * nh * hd);
        for (i, &t) in pos.iter().enumerate() {
            let si = self.plan.row_seq[i];
            for head in 0..nh {
                let kvh = head / (nh / nkv);
                let (ks, vs) = gathered.entry((si, kvh)).or_insert_with(|| {
                    let (table, len) = (&self.plan.tables[si], self.plan.lens[si]);
                    let mut ks = Vec::with_capacity(len * hd);
                    let mut vs = Vec::with_capacity(len * hd);
                    for p in 0..len {
                        let slot = table[p / PAGE] as usize * PAGE + p % PAGE;
                        let at = (kvh * slots + slot) * hd;
                        ks.extend_from_slice(&kc[at..at + hd]);
                        vs.extend_from_slice(&vc[at..at + hd]);
                    }
                    (ks, vs)
                });
                let qh = &q[(i * nh + head) * hd..][..hd];
                out.extend(reference::attention::attend_with(
                    self.mem.attn,
                    qh,
                    ks,
                    vs,
                    t as usize,
                    hd,
                ));
            }
        }
        Ok(out)
    }

    fn delta_net(
        &mut self,
        l: usize,
        dw: &DeltaNetWeights,
        x: &[f32],
        eps: f32,
    ) -> Result<Vec<f32>> {
        // Each sequence's rows in order through its own state, then back to their rows.
        let d = dw.cfg.dim;
        let mut out = vec![0.0f32; x.len()];
        for (si, seq) in self.plan.seqs.iter().enumerate() {
            let rows: Vec<usize> = (0..self.plan.row_seq.len())
                .filter(|&i| self.plan.row_seq[i] == si)
                .collect();
            let xs: Vec<f32> = rows
                .iter()
                .flat_map(|&i| x[i * d..(i + 1) * d].iter().copied())
                .collect();
            let o = match self.mem.chunked.get_mut(seq) {
                Some(ch) => {
                    let st = ch[l].as_mut().expect("a DeltaNet layer has a state");
                    delta_net::forward_chunked_cpu(self.mem.gemm, dw, st, &xs, rows.len(), eps)?
                }
                None => {
                    let states = self
                        .mem
                        .dn
                        .get_mut(seq)
                        .expect("a live sequence has states");
                    let st = states[l].as_mut().expect("a DeltaNet layer has a state");
                    delta_net::forward_cpu_with(self.mem.gemm, dw, st, &xs, rows.len(), eps)?
                }
            };
            for (r, &i) in rows.iter().enumerate() {
                out[i * d..(i + 1) * d].copy_from_slice(&o[r * d..(r + 1) * d]);
            }
        }
        Ok(out)
    }

    fn gemm_order(&self) -> GemmOrder {
        self.mem.gemm
    }

    fn moe(&mut self, l: usize, lw: &LayerWeights, h: &mut [f32], eps: f32) -> Result<()> {
        let order = self.mem.gemm;
        match self.mem.ep.as_mut() {
            None => crate::reference::model::moe(lw, h, h.len() / lw.moe.cfg.dim, eps, order),
            Some(ep) => {
                let p = ep.ranks() as u64;
                let home: Vec<usize> = (self.plan.row_seq.iter())
                    .map(|&si| (self.plan.seqs[si].0 % p) as usize)
                    .collect();
                ep.moe(l, lw, h, &home, eps, order)
            }
        }
    }
}

/// Runs `schedule` through a fresh [`CpuBatchSession`] of the schedule's pages, sequence `s` taking
/// the tokens `streams[s]` (`schedule.seqs[s].len` of them): per sequence, its trace (every
/// layer's hidden states and the logits, in position order, as its solo run fills them), and
/// the pages the session handed out again after a sequence had freed them.
pub fn run_schedule(
    w: &ModelWeights,
    schedule: &Schedule,
    streams: &[Vec<u32>],
) -> Result<(Vec<Trace>, usize)> {
    run_schedule_with(w, schedule, streams, AttnOrder::default(), GemmOrder::Chain)
}

/// [`run_schedule`] in the orders `attn` and `gemm` ([`CpuBatchSession::set_orders`]).
pub fn run_schedule_with(
    w: &ModelWeights,
    schedule: &Schedule,
    streams: &[Vec<u32>],
    attn: AttnOrder,
    gemm: GemmOrder,
) -> Result<(Vec<Trace>, usize)> {
    let mut session = CpuBatchSession::new(w, schedule.n_pages)?;
    session.set_orders(attn, gemm);
    drive(&mut session, schedule, streams, w.cfg.dim, w.cfg.vocab)
}

impl BatchRunner for CpuBatchSession<'_> {
    fn add(&mut self) -> Result<SeqId> {
        Ok(self.add_sequence())
    }
    fn remove(&mut self, seq: SeqId) -> Result<()> {
        self.remove_sequence(seq)
    }
    fn step(&mut self, batch: &[BatchToken], trace: &mut Trace) -> Result<()> {
        self.forward(batch, trace)
    }
    fn reused(&self) -> usize {
        self.sequences().reused()
    }
}

impl crate::spec::serve::BatchDecoder for CpuBatchSession<'_> {
    fn add(&mut self) -> Result<SeqId> {
        Ok(self.add_sequence())
    }
    fn remove(&mut self, seq: SeqId) -> Result<()> {
        self.remove_sequence(seq)
    }
    fn step_each(
        &mut self,
        batch: &[BatchToken],
        each: &mut dyn FnMut(SeqId, &[f32]) -> Result<()>,
    ) -> Result<()> {
        let mut t = Trace::default();
        self.forward(batch, &mut t)?;
        let v = self.w.cfg.vocab;
        if t.logits.len() != batch.len() * v {
            return Err(Error::invalid(
                "CpuBatchSession::step_each",
                "weights without every layer give no logits",
            ));
        }
        // Each sequence's last row, in order of first appearance.
        let mut seen: Vec<SeqId> = Vec::new();
        for row in batch {
            if !seen.contains(&row.seq) {
                seen.push(row.seq);
            }
        }
        for seq in seen {
            let r = batch
                .iter()
                .rposition(|row| row.seq == seq)
                .expect("in the batch");
            each(seq, &t.logits[r * v..(r + 1) * v])?;
        }
        Ok(())
    }
}
