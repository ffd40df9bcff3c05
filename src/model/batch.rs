//! Many sequences in one forward on the GPU ([`BatchSession`]): the device twin of
//! [`crate::reference::batch::CpuBatchSession`], over the same page bookkeeping
//! ([`crate::model::paged`]) and the same layer loop as [`crate::model::Session`]
//! ([`crate::model::transformer`]'s `forward_layers`). A step's rows are reordered so that
//! each sequence's rows are contiguous and in position order (decode rows first): every
//! product, norm and the MoE block compute each row on its own, so the order changes no bit;
//! attention reads each row's sequence through its block table, and each sequence's DeltaNet
//! rows run through its own state. The outputs return in the batch's order.

use std::collections::BTreeMap;

use crate::device::Device;
use crate::error::{check_indices, Error, Result};
use crate::kernels::attention::{LayerCache, SPLIT_MAX_QUERIES};
use crate::kernels::delta_net::GpuDeltaNetState;
use crate::kernels::rope::Positions;
use crate::model::paged::{BatchToken, PagedSequences, SeqId, PAGE};
use crate::model::trace::Trace;
use crate::model::transformer::{
    forward_layers, GpuModel, Memory, PagedDevice, PagedRows, PagedSegment,
};
use crate::tensor::{GpuTensor, HostStage};

/// Many sequences over one paged f32 KV cache on the device: sequences join
/// ([`BatchSession::add_sequence`]) and leave ([`BatchSession::remove_sequence`]) at any step,
/// and one [`BatchSession::forward`] takes a ragged batch of prompt chunks and decode tokens of
/// any of them. Every row's bits are those of its sequence run alone (and of the CPU
/// reference). A refused batch changes nothing; a forward that fails part way poisons its
/// sequences (the others are untouched).
pub struct BatchSession<'m> {
    model: &'m GpuModel,
    seqs: PagedSequences,
    mem: PagedDevice,
    /// Where each step's logits are downloaded (kept across steps).
    stage: HostStage<f32>,
}

/// The logits of one [`BatchSession::step`]: each sequence's last row in the batch, in order
/// of first appearance, borrowed from the session until its next step.
#[derive(Debug)]
pub struct StepLogits<'a> {
    seqs: Vec<SeqId>,
    data: &'a [f32],
    vocab: usize,
}

impl<'a> StepLogits<'a> {
    /// Number of sequences in the step.
    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    /// True for an empty step.
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// The sequences, in order of first appearance in the batch.
    pub fn sequences(&self) -> &[SeqId] {
        &self.seqs
    }

    /// The `i`-th sequence's logits (`[vocab]`).
    pub fn logits(&self, i: usize) -> &'a [f32] {
        &self.data[i * self.vocab..(i + 1) * self.vocab]
    }

    /// `seq`'s logits, if it was in the step.
    pub fn get(&self, seq: SeqId) -> Option<&'a [f32]> {
        let i = self.seqs.iter().position(|&s| s == seq)?;
        Some(self.logits(i))
    }

    /// `(sequence, logits)` in order.
    pub fn iter(&self) -> impl Iterator<Item = (SeqId, &'a [f32])> + '_ {
        self.seqs
            .iter()
            .enumerate()
            .map(|(i, &s)| (s, self.logits(i)))
    }
}

impl<'m> BatchSession<'m> {
    /// A session over `model` whose attention layers share a cache of `n_pages` pages of
    /// [`PAGE`] positions.
    pub fn new(dev: &Device, model: &'m GpuModel, n_pages: usize) -> Result<Self> {
        let c = model.config();
        let seqs = PagedSequences::new(n_pages, c.max_context)?;
        if c.head_dim % 4 != 0 || c.head_dim > 256 {
            return Err(Error::invalid(
                "BatchSession::new",
                format!(
                    "the paged attention kernels take head dims in multiples of 4 up to 256, \
                     not {}",
                    c.head_dim
                ),
            ));
        }
        let need = 2 * 4 * c.n_kv_heads * n_pages * PAGE * c.head_dim;
        let attn_layers = (0..c.n_layers).filter(|&l| c.is_attention_layer(l)).count();
        let free = dev.free_memory()?;
        if need * attn_layers > free {
            return Err(Error::OutOfMemory {
                bytes: need * attn_layers,
                what: "the paged KV cache (estimated before allocating)",
            });
        }
        let caches = (0..c.n_layers)
            .map(|l| {
                c.is_attention_layer(l)
                    .then(|| LayerCache::new(dev, c.n_kv_heads, n_pages * PAGE, c.head_dim))
                    .transpose()
            })
            .collect::<Result<_>>()?;
        Ok(BatchSession {
            model,
            seqs,
            mem: PagedDevice {
                caches,
                dn: BTreeMap::new(),
            },
            stage: HostStage::new(),
        })
    }

    /// A new, empty sequence (its DeltaNet states allocated, zeroed).
    pub fn add_sequence(&mut self, dev: &Device) -> Result<SeqId> {
        let c = self.model.config();
        let states = (0..c.n_layers)
            .map(|l| match c.delta_net() {
                Some(dn) if !c.is_attention_layer(l) => GpuDeltaNetState::new(dev, &dn).map(Some),
                _ => Ok(None),
            })
            .collect::<Result<Vec<_>>>()?;
        let id = self.seqs.add();
        self.mem.dn.insert(id, states);
        Ok(id)
    }

    /// Removes `seq`: its pages return to the pool, its states are freed.
    pub fn remove_sequence(&mut self, seq: SeqId) -> Result<()> {
        self.seqs.remove(seq)?;
        self.mem.dn.remove(&seq);
        Ok(())
    }

    /// The page bookkeeping.
    pub fn sequences(&self) -> &PagedSequences {
        &self.seqs
    }

    /// Takes the rows of `batch` in one forward and returns the logits of each sequence's last
    /// row in the batch, in order of first appearance, borrowed until the next step: the
    /// serving loop's call (the logits land in a page-locked buffer the session keeps, and no
    /// per-sequence copy is made). The same bits as [`BatchSession::forward`].
    pub fn step(&mut self, dev: &Device, batch: &[BatchToken]) -> Result<StepLogits<'_>> {
        let (seqs, _) = self.run(dev, batch, None)?;
        let vocab = self.model.config().vocab;
        let data = self.stage_data(seqs.len() * vocab)?;
        Ok(StepLogits { seqs, data, vocab })
    }

    /// Takes the rows of `batch` in one forward. With `trace`, appends every layer's hidden
    /// states of every row and every row's logits, in batch order (as
    /// [`crate::reference::batch::CpuBatchSession::forward`] does); returns the logits of each
    /// sequence's last row in the batch, `(sequence, [vocab])` in order of first appearance.
    pub fn forward(
        &mut self,
        dev: &Device,
        batch: &[BatchToken],
        trace: Option<&mut Trace>,
    ) -> Result<Vec<(SeqId, Vec<f32>)>> {
        let tracing = trace.is_some();
        let (seqs, last) = self.run(dev, batch, trace)?;
        let v = self.model.config().vocab;
        let all = self.stage_data(if tracing { batch.len() } else { seqs.len() } * v)?;
        Ok(seqs
            .iter()
            .enumerate()
            .map(|(si, &seq)| {
                let r = if tracing { last[si] } else { si };
                (seq, all[r * v..(r + 1) * v].to_vec())
            })
            .collect())
    }

    /// The first `len` values of the last download.
    fn stage_data(&self, len: usize) -> Result<&[f32]> {
        self.stage.last(len)
    }

    /// The step behind [`BatchSession::step`] and [`BatchSession::forward`]: the logits land
    /// in the stage (each sequence's last row in order of first appearance, or every row in
    /// batch order when tracing); returns the sequences and, per sequence, the batch row of
    /// its last token.
    fn run(
        &mut self,
        dev: &Device,
        batch: &[BatchToken],
        trace: Option<&mut Trace>,
    ) -> Result<(Vec<SeqId>, Vec<usize>)> {
        const OP: &str = "BatchSession::forward";
        let c = self.model.config();
        let tokens: Vec<u32> = batch.iter().map(|t| t.token).collect();
        check_indices(OP, "tokens", &tokens, c.vocab)?;
        let plan = self.seqs.plan(OP, batch)?;
        if batch.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        // The step's row order: decode segments (at most SPLIT_MAX_QUERIES rows) first, then
        // the longer ones; each sequence's rows contiguous, in batch (= position) order.
        let ns = plan.seqs.len();
        let mut count = vec![0usize; ns];
        for &si in &plan.row_seq {
            count[si] += 1;
        }
        let short = |si: usize| count[si] <= SPLIT_MAX_QUERIES;
        let mut order: Vec<usize> = (0..ns).collect();
        order.sort_by_key(|&si| (!short(si), si));
        let mut start = vec![0usize; ns];
        let mut at = 0;
        for &si in &order {
            start[si] = at;
            at += count[si];
        }
        // perm[k]: the batch row at sorted row k.
        let n = batch.len();
        let mut perm = vec![0usize; n];
        let mut fill = start.clone();
        for (i, &si) in plan.row_seq.iter().enumerate() {
            perm[fill[si]] = i;
            fill[si] += 1;
        }
        let sorted = |v: &[u32]| -> Vec<u32> { perm.iter().map(|&i| v[i]).collect() };
        let pos_all: Vec<u32> = batch.iter().map(|t| t.pos).collect();
        let (ids_h, pos_h, slots_h) = (sorted(&tokens), sorted(&pos_all), sorted(&plan.slots));
        let mut segments = Vec::with_capacity(ns);
        for &si in &order {
            let (row0, rows) = (start[si], count[si]);
            segments.push(PagedSegment {
                seq: plan.seqs[si],
                row0,
                rows,
                // Only a long segment's attention reads its own positions.
                pos: match short(si) {
                    true => None,
                    false => Some(Positions::new(dev, &pos_h[row0..row0 + rows])?),
                },
                table: plan.tables[si].clone(),
            });
        }
        let n_short: usize = (0..ns).filter(|&si| short(si)).map(|si| count[si]).sum();
        let short_block = if n_short > 0 {
            let stride = (0..ns)
                .filter(|&si| short(si))
                .map(|si| plan.tables[si].len())
                .max()
                .unwrap_or(1);
            let mut tables = vec![0u32; n_short * stride];
            for seg in segments.iter().filter(|s| s.row0 < n_short) {
                for r in seg.row0..seg.row0 + seg.rows {
                    tables[r * stride..r * stride + seg.table.len()].copy_from_slice(&seg.table);
                }
            }
            Some((
                n_short,
                Positions::new(dev, &pos_h[..n_short])?,
                tables,
                stride,
            ))
        } else {
            None
        };
        let rows = PagedRows {
            slots: Positions::new(dev, &slots_h)?,
            segments,
            short: short_block,
        };
        let positions = Positions::new(dev, &pos_h)?;
        let ids = GpuTensor::from_host(dev, &ids_h, &[n])?;
        // Logits of each sequence's last row (sorted order), or of every row when tracing.
        let last: Vec<u32> = plan
            .seqs
            .iter()
            .enumerate()
            .map(|(si, _)| (start[si] + count[si] - 1) as u32)
            .collect();
        let tracing = trace.is_some();
        let logit_rows = if tracing { n } else { ns };
        let idx = GpuTensor::from_host(dev, &last, &[ns])?;
        let mut logits = GpuTensor::output(dev, &[logit_rows, c.vocab])?;
        let mut sorted_trace = Trace::default();
        let run = forward_layers(
            self.model,
            // (A paged step's attention takes its own kernels: this choice is not read.)
            crate::kernels::attention::AttentionKernel::Auto,
            dev,
            &ids,
            &positions,
            Memory::Paged(&mut self.mem, &rows),
            tracing.then_some(&mut sorted_trace),
            &mut logits,
            (!tracing).then_some(&idx),
        );
        let all = match run
            .and_then(|()| dev.profile_mark("(logits to host)"))
            .and_then(|()| self.stage.download(&logits))
        {
            Ok(all) => all,
            Err(e) => {
                self.seqs.poison(&plan.seqs);
                return Err(e);
            }
        };
        self.seqs.commit(&plan);
        if let Some(t) = trace {
            let (d, v) = (c.dim, c.vocab);
            // inv[i]: the sorted row of batch row i.
            let mut inv = vec![0usize; n];
            for (k, &i) in perm.iter().enumerate() {
                inv[i] = k;
            }
            for (l, rows_l) in sorted_trace.layers.iter().enumerate() {
                let mut h = Vec::with_capacity(n * d);
                for &k in &inv {
                    h.extend_from_slice(&rows_l[k * d..(k + 1) * d]);
                }
                t.push_layer(l, &h);
            }
            for &k in &inv {
                t.logits.extend_from_slice(&all[k * v..(k + 1) * v]);
            }
        }
        Ok((
            plan.seqs.clone(),
            last.iter().map(|&r| r as usize).collect(),
        ))
    }

    /// `seq`'s recurrent state, [`crate::model::Session::recurrent_state`]'s layout.
    pub fn recurrent_state(&self, seq: SeqId) -> Result<Vec<f32>> {
        self.seqs.len(seq)?;
        let mut out = Vec::new();
        for st in self.mem.dn[&seq].iter().flatten() {
            let h = st.to_host()?;
            out.extend(h.conv);
            out.extend(h.m);
        }
        Ok(out)
    }
}

/// A [`BatchSession`] on its device, driven by a [`crate::model::schedule::Schedule`]
/// ([`crate::model::schedule::drive`]).
pub struct OnDevice<'s, 'm> {
    /// The device the session runs on.
    pub dev: &'s Device,
    /// The session.
    pub session: &'s mut BatchSession<'m>,
}

impl crate::model::schedule::BatchRunner for OnDevice<'_, '_> {
    fn add(&mut self) -> Result<SeqId> {
        self.session.add_sequence(self.dev)
    }
    fn remove(&mut self, seq: SeqId) -> Result<()> {
        self.session.remove_sequence(seq)
    }
    fn step(&mut self, batch: &[BatchToken], trace: &mut Trace) -> Result<()> {
        self.session
            .forward(self.dev, batch, Some(trace))
            .map(|_| ())
    }
    fn reused(&self) -> usize {
        self.session.sequences().reused()
    }
}
