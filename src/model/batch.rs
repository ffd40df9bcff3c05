//! Many sequences in one forward on the GPU ([`BatchSession`]): the device twin of
//! [`crate::reference::batch::CpuBatchSession`], over the same page bookkeeping
//! ([`crate::spec::paged`]) and the same layer loop as [`crate::model::Session`]
//! ([`crate::model::transformer`]'s `forward_layers`). A step's rows are reordered so that
//! each sequence's rows are contiguous and in position order (decode rows first): every
//! product, norm and the MoE block compute each row on its own, so the order changes no bit;
//! attention reads each row's sequence through its block table, and each sequence's DeltaNet
//! rows run through its own state. The outputs return in the batch's order.

use std::collections::BTreeMap;

use crate::device::{Device, Graph};
use crate::error::{check_indices, Error, Result};
use crate::kernels::attention::{LayerCache, SPLIT_MAX_QUERIES};
use crate::kernels::delta_net::GpuDeltaNetState;
use crate::kernels::rope::Positions;
use crate::model::transformer::{
    forward_layers, reserve_scratch, BlockTables, GpuModel, Memory, PagedDevice, PagedRows,
    PagedSegment, ShortBlock,
};
use crate::spec::delta_net::ScanOrder;
use crate::spec::paged::{BatchPlan, BatchToken, PagedSequences, SeqId, PAGE};
use crate::spec::trace::Trace;
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
    /// Whether decode steps replay a captured graph ([`BatchSession::set_graphs`]).
    graphs: bool,
    /// The step graphs kept, the most recently replayed first, at most [`GRAPH_SLOTS`].
    cache: Vec<StepGraph>,
    /// The previous decode step's key: a key is captured on its second step in a row.
    last_key: Option<GraphKey>,
    stats: BatchStats,
    /// The DeltaNet layers' scan order ([`BatchSession::set_scan_order`]).
    scan_order: ScanOrder,
}

/// How many step graphs a [`BatchSession`] keeps: the row counts a serving loop cycles
/// through as requests join and leave replay without a new capture.
pub const GRAPH_SLOTS: usize = 4;

/// What a [`BatchSession`]'s steps did, for tests and benches.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Steps that ran as a replay of a captured step graph.
    pub graph_replays: usize,
    /// Step graphs captured.
    pub captures: usize,
    /// Why capturing failed, if it did (graphs are then off for the session).
    pub graph_error: Option<String>,
}

/// A captured decode step: every launch of a forward of `n` rows, one per sequence, in device
/// buffers the host rewrites before each replay (tokens, positions, cache slots, block
/// tables) and one it reads after (the logits).
struct StepGraph {
    key: GraphKey,
    ids: GpuTensor<u32>,
    positions: Positions,
    rows: PagedRows,
    /// `0..n`: every row's logits (the graph's gather reads it).
    _idx: GpuTensor<u32>,
    logits: GpuTensor<f32>,
    graph: Graph,
}

/// What a step graph bakes in: the row count; the chunks its tables and positions cover (a
/// power of two, so the graph is recaptured only when the longest sequence crosses one); for
/// a model with DeltaNet layers the sequences, in row order, whose states it scans.
#[derive(Clone, Debug, PartialEq, Eq)]
struct GraphKey {
    rows: usize,
    chunks: usize,
    seqs: Vec<SeqId>,
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
            graphs: true,
            cache: Vec::new(),
            last_key: None,
            stats: BatchStats::default(),
            scan_order: ScanOrder::Recurrence,
        })
    }

    /// Whether decode steps (every sequence of the batch one row, no trace) replay a captured
    /// CUDA graph: one launch for the step instead of one per kernel. The graph runs the same
    /// kernels on the same buffers, so it returns the same bits (`tests/parity/batch.rs`
    /// checks replay == eager at every step, on a GPU). On by default. A graph bakes
    /// in the row count, the power of two of chunks that covers the longest sequence and (a
    /// model with DeltaNet layers) the sequences; a decode step whose shape is new runs
    /// eagerly, and the shape is captured when the next decode step has it too, so a row
    /// count that changes at every step never captures. The session keeps [`GRAPH_SLOTS`]
    /// graphs, the least recently replayed dropped first. Measured on an H100 (BENCHMARKS.md,
    /// 2026-12-07): replays beat eager steps at every batch size (the 30B shape at context
    /// 512: 1.32x at 1 sequence, 1.02x at 128).
    pub fn set_graphs(&mut self, on: bool) {
        self.graphs = on;
        if !on {
            self.cache.clear();
            self.last_key = None;
        }
    }

    /// What the steps so far did.
    pub fn stats(&self) -> &BatchStats {
        &self.stats
    }

    /// The order of every sequence's DeltaNet scan (the recurrence by default;
    /// [`crate::model::transformer::Session::set_scan_order`]'s, so that a sequence keeps its
    /// solo bits): only while the session has no sequence.
    pub fn set_scan_order(&mut self, order: ScanOrder) -> Result<()> {
        if !self.mem.dn.is_empty() {
            return Err(Error::invalid(
                "BatchSession::set_scan_order",
                "the scan order is set before the first sequence joins",
            ));
        }
        self.scan_order = order;
        Ok(())
    }

    /// The DeltaNet layers' scan order.
    pub fn scan_order(&self) -> ScanOrder {
        self.scan_order
    }

    /// A new, empty sequence (its DeltaNet states allocated, zeroed).
    pub fn add_sequence(&mut self, dev: &Device) -> Result<SeqId> {
        let c = self.model.config();
        let order = self.scan_order;
        let states = (0..c.n_layers)
            .map(|l| match c.delta_net() {
                Some(dn) if !c.is_attention_layer(l) => {
                    GpuDeltaNetState::with_order(dev, &dn, order).map(Some)
                }
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
        // Graphs that scan its DeltaNet states point at the states about to be freed.
        self.cache.retain(|g| !g.key.seqs.contains(&seq));
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
        if self.graphs
            && trace.is_none()
            && plan.seqs.len() == batch.len()
            && self.ensure_graph(dev, batch, &plan)
        {
            // A decode step (every sequence one row, the rows in sequence order) as a replay.
            return match self.replay(dev, batch, &plan) {
                Ok(()) => {
                    self.seqs.commit(&plan);
                    Ok((plan.seqs.clone(), (0..batch.len()).collect()))
                }
                Err(e) => {
                    self.seqs.poison(&plan.seqs);
                    Err(e)
                }
            };
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
            Some(ShortBlock {
                rows: n_short,
                pos: Positions::new(dev, &pos_h[..n_short])?,
                tables: BlockTables::Host(tables),
                stride,
            })
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
            // The library's choices: a paged step's attention takes its own kernels (that
            // choice is not read), its DeltaNet layers scan with ScanKernel::Auto.
            super::transformer::Kernels::default(),
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

    /// Whether a step graph for the decode step `batch` (`plan`'s order) is ready (then the
    /// first of the cache): kept from before, or captured now because the previous decode step
    /// had the same shape. A capture that fails turns graphs off for the session (the reason
    /// kept in [`BatchStats::graph_error`]) and the step runs eagerly.
    fn ensure_graph(&mut self, dev: &Device, batch: &[BatchToken], plan: &BatchPlan) -> bool {
        let c = self.model.config();
        let top = batch.iter().map(|t| t.pos).max().unwrap_or(0) as usize;
        let key = GraphKey {
            rows: batch.len(),
            chunks: (top / PAGE + 1)
                .next_power_of_two()
                .min(c.max_context.div_ceil(PAGE)),
            seqs: match c.delta_net() {
                Some(_) => plan.seqs.clone(),
                None => Vec::new(),
            },
        };
        if let Some(i) = self.cache.iter().position(|g| g.key == key) {
            let g = self.cache.remove(i);
            self.cache.insert(0, g);
            self.last_key = Some(key);
            return true;
        }
        let seen = self.last_key.as_ref() == Some(&key);
        self.last_key = Some(key.clone());
        if !seen {
            return false;
        }
        // The least recently replayed graph's buffers go first: the new one may need the
        // memory.
        self.cache.truncate(GRAPH_SLOTS - 1);
        match self.capture(dev, key) {
            Ok(g) => {
                self.cache.insert(0, g);
                self.stats.captures += 1;
                true
            }
            Err(e) => {
                self.graphs = false;
                self.cache.clear();
                self.stats.graph_error = Some(e.to_string());
                false
            }
        }
    }

    /// Runs the decode step `batch` (one row per sequence, `plan`'s order) as a replay of the
    /// step graph [`BatchSession::ensure_graph`] made ready; the logits land in the stage.
    fn replay(&mut self, dev: &Device, batch: &[BatchToken], plan: &BatchPlan) -> Result<()> {
        const OP: &str = "BatchSession::forward";
        let n = batch.len();
        let pos: Vec<u32> = batch.iter().map(|t| t.pos).collect();
        let g = self.cache.first_mut().expect("made ready above");
        g.graph.check_device(dev, OP)?;
        let stride = g.key.chunks;
        let mut tables = vec![0u32; n * stride];
        for (r, t) in plan.tables.iter().enumerate() {
            // plan() gave each table the pages through this step's position, `top / PAGE + 1`
            // at most, which the key's chunks cover.
            if t.len() > stride {
                return Err(Error::invalid(
                    OP,
                    "a block table past the step graph's chunks",
                ));
            }
            tables[r * stride..r * stride + t.len()].copy_from_slice(t);
        }
        let tokens: Vec<u32> = batch.iter().map(|t| t.token).collect();
        g.ids.copy_from_host(&tokens)?;
        g.positions.set(&pos)?;
        g.rows.slots.set(&plan.slots)?;
        let short = g
            .rows
            .short
            .as_mut()
            .ok_or_else(|| Error::invalid(OP, "the step graph has no decode block"))?;
        short.pos.set(&pos)?;
        match &mut short.tables {
            BlockTables::Device(t) => t.copy_from_host(&tables)?,
            BlockTables::Host(_) => return Err(Error::invalid(OP, "host tables in a graph")),
        }
        // SAFETY: the graph's kernels read the buffers written above, this session's caches
        // and states (the key names every sequence whose state it scans; removing one drops
        // the graph) and the model (alive for 'm), and write the logits buffer; `&mut self`
        // keeps any other launch of it out.
        unsafe { g.graph.replay(dev, OP) }?;
        self.stage.download(&g.logits)?;
        self.stats.graph_replays += 1;
        Ok(())
    }

    /// Captures a decode step of `key.rows` rows (nothing runs): its input buffers, bounded
    /// by the key's chunks and the cache's pages, and the graph.
    fn capture(&mut self, dev: &Device, key: GraphKey) -> Result<StepGraph> {
        let c = self.model.config();
        let n = key.rows;
        let cap = (self.seqs.n_pages() * PAGE) as u32;
        let bound = (key.chunks * PAGE).min(c.max_context) as u32 - 1;
        let segments = (0..n)
            .map(|r| PagedSegment {
                // Read by the DeltaNet scans only, whose graphs the key ties to these ids.
                seq: key.seqs.get(r).copied().unwrap_or(SeqId(u64::MAX)),
                row0: r,
                rows: 1,
                pos: None,
                table: Vec::new(),
            })
            .collect();
        let rows = PagedRows {
            slots: Positions::bounded(dev, n, cap - 1)?,
            segments,
            short: Some(ShortBlock {
                rows: n,
                pos: Positions::bounded(dev, n, bound)?,
                tables: BlockTables::Device(GpuTensor::zeros(dev, &[n * key.chunks])?),
                stride: key.chunks,
            }),
        };
        let ids = GpuTensor::zeros(dev, &[n])?;
        let positions = Positions::bounded(dev, n, bound)?;
        let idx = GpuTensor::from_host(dev, &(0..n as u32).collect::<Vec<_>>(), &[n])?;
        let mut logits = GpuTensor::zeros(dev, &[n, c.vocab])?;
        let (model, mem) = (self.model, &mut self.mem);
        let graph = dev.capture(
            |twin| reserve_scratch(twin, c, n),
            |twin| {
                forward_layers(
                    model,
                    super::transformer::Kernels::default(),
                    twin,
                    &ids,
                    &positions,
                    Memory::Paged(mem, &rows),
                    None,
                    &mut logits,
                    Some(&idx),
                )
            },
        )?;
        Ok(StepGraph {
            key,
            ids,
            positions,
            rows,
            _idx: idx,
            logits,
            graph,
        })
    }

    /// `seq`'s recurrent state, [`crate::model::Session::recurrent_state`]'s layout.
    pub fn recurrent_state(&self, seq: SeqId) -> Result<Vec<f32>> {
        self.seqs.len(seq)?;
        let mut out = Vec::new();
        for st in self.mem.dn[&seq].iter().flatten() {
            out.extend(st.to_host_flat()?);
        }
        Ok(out)
    }
}

/// A [`BatchSession`] on its device, driven by a [`crate::spec::schedule::Schedule`]
/// ([`crate::spec::schedule::drive`]).
pub struct OnDevice<'s, 'm> {
    /// The device the session runs on.
    pub dev: &'s Device,
    /// The session.
    pub session: &'s mut BatchSession<'m>,
}

impl crate::spec::schedule::BatchRunner for OnDevice<'_, '_> {
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

impl crate::spec::serve::BatchDecoder for OnDevice<'_, '_> {
    fn add(&mut self) -> Result<SeqId> {
        self.session.add_sequence(self.dev)
    }
    fn remove(&mut self, seq: SeqId) -> Result<()> {
        self.session.remove_sequence(seq)
    }
    fn step_each(
        &mut self,
        batch: &[BatchToken],
        each: &mut dyn FnMut(SeqId, &[f32]) -> Result<()>,
    ) -> Result<()> {
        for (seq, logits) in self.session.step(self.dev, batch)?.iter() {
            each(seq, logits)?;
        }
        Ok(())
    }
}
