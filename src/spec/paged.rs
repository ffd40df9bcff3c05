//! Many sequences in one KV cache: fixed-size pages, a block table per sequence, pages freed
//! and handed out again ([`PagedSequences`]), and the ragged batch a step takes
//! ([`BatchToken`]). Host-side bookkeeping, the same for the CPU reference
//! ([`crate::reference::batch::CpuBatchSession`]) and a device cache.
//!
//! Layout: a layer's cache is `[n_kv, n_pages * PAGE, hd]`, the single-sequence cache's layout
//! with `n_pages * PAGE` slots for its capacity. Position `p` of a sequence lives in slot
//! `table[p / PAGE] * PAGE + p % PAGE`. A page is one attention chunk
//! ([`crate::reference::attention::CHUNK`]) and two FastScan tiles of 32, so a chunk's keys are
//! contiguous whatever pages a sequence holds. Which page a position lands in never enters the
//! arithmetic: attention reads a sequence's keys in position order.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// Positions per page: one attention chunk ([`crate::reference::attention::CHUNK`]; the two are
/// held equal at compile time in [`crate::reference::batch`]).
pub const PAGE: usize = 64;

/// A sequence of a batched session, as [`PagedSequences::add`] named it. Ids are not reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SeqId(pub u64);

impl std::fmt::Display for SeqId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sequence {}", self.0)
    }
}

/// One row of a ragged batch: token `token` of sequence `seq`, at position `pos`. A batch may
/// hold any number of rows of any sequences in any interleaving, as long as each sequence's rows
/// continue it in order (positions `len, len + 1, ..`): prefill chunks and decode tokens alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchToken {
    /// The sequence the token continues.
    pub seq: SeqId,
    /// Its position in that sequence.
    pub pos: u32,
    /// The token id.
    pub token: u32,
}

/// A sequence's pages and length.
#[derive(Clone, Debug, Default)]
struct SeqPages {
    pages: Vec<u32>,
    len: usize,
    /// Set when a forward failed after this sequence's state began to change: the sequence
    /// refuses further rows until it is removed.
    poisoned: bool,
}

/// What [`PagedSequences::plan`] decided for a batch: each row's cache slot, and the pages it
/// takes from the free list (committed by [`PagedSequences::commit`] once the forward ran).
#[derive(Clone, Debug)]
pub struct BatchPlan {
    /// Per row, its cache slot (`page * PAGE + pos % PAGE`).
    pub slots: Vec<u32>,
    /// Per row, the index of its sequence among [`BatchPlan::seqs`].
    pub row_seq: Vec<usize>,
    /// The batch's sequences, in order of first appearance.
    pub seqs: Vec<SeqId>,
    /// Per sequence of [`BatchPlan::seqs`], its block table after the batch (pages in
    /// position order).
    pub tables: Vec<Vec<u32>>,
    /// Per sequence, its length after the batch.
    pub lens: Vec<usize>,
    /// Pages the batch takes from the free list.
    taken: usize,
}

/// The sequences of a batched session and the pages of their KV cache: a pool of `n_pages`
/// pages, a block table per sequence, a free list (last freed, first reused).
#[derive(Clone, Debug)]
pub struct PagedSequences {
    n_pages: usize,
    max_context: usize,
    free: Vec<u32>,
    seqs: BTreeMap<SeqId, SeqPages>,
    next_id: u64,
    /// Pages handed out since the start that had been freed before.
    reused: usize,
    /// Every page that has been handed out at least once (for [`PagedSequences::reused`]).
    used_once: Vec<bool>,
}

impl PagedSequences {
    /// Checks a pool size: 1 to `u32::MAX / PAGE` pages (slots are u32 on the device).
    pub fn check_pool(op: &'static str, n_pages: usize) -> Result<()> {
        if n_pages == 0 || n_pages > u32::MAX as usize / PAGE {
            return Err(Error::invalid(
                op,
                format!(
                    "{n_pages} pages: the pool takes 1 to {} pages of {PAGE} positions",
                    u32::MAX as usize / PAGE
                ),
            ));
        }
        Ok(())
    }

    /// A pool of `n_pages` pages ([`PagedSequences::check_pool`]) for sequences of at most
    /// `max_context` positions.
    pub fn new(n_pages: usize, max_context: usize) -> Result<Self> {
        Self::check_pool("PagedSequences::new", n_pages)?;
        Ok(PagedSequences {
            n_pages,
            max_context,
            // Popped from the end: page 0 is handed out first.
            free: (0..n_pages as u32).rev().collect(),
            seqs: BTreeMap::new(),
            next_id: 0,
            reused: 0,
            used_once: vec![false; n_pages],
        })
    }

    /// A new, empty sequence (it holds no page until its first row).
    pub fn add(&mut self) -> SeqId {
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.seqs.insert(id, SeqPages::default());
        id
    }

    /// Removes `seq`, its pages back on the free list.
    pub fn remove(&mut self, seq: SeqId) -> Result<()> {
        let s = self
            .seqs
            .remove(&seq)
            .ok_or_else(|| unknown("remove", seq))?;
        self.free.extend(s.pages.iter().rev());
        Ok(())
    }

    /// Positions `seq` holds.
    pub fn len(&self, seq: SeqId) -> Result<usize> {
        Ok(self.get("len", seq)?.len)
    }

    /// `seq`'s block table: its pages in position order.
    pub fn table(&self, seq: SeqId) -> Result<&[u32]> {
        Ok(&self.get("table", seq)?.pages)
    }

    /// The live sequences, in id order.
    pub fn ids(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.seqs.keys().copied()
    }

    /// Pages in the pool.
    pub fn n_pages(&self) -> usize {
        self.n_pages
    }

    /// Pages on the free list.
    pub fn free_pages(&self) -> usize {
        self.free.len()
    }

    /// Pages handed out that some sequence had held and freed before.
    pub fn reused(&self) -> usize {
        self.reused
    }

    /// Marks the sequences of a batch whose forward failed part way: their states may have
    /// changed, so they take no more rows until removed.
    pub fn poison(&mut self, seqs: &[SeqId]) {
        for s in seqs {
            if let Some(p) = self.seqs.get_mut(s) {
                p.poisoned = true;
            }
        }
    }

    /// Checks `batch` and plans it, changing nothing: every sequence known and not poisoned,
    /// each sequence's rows at positions `len, len + 1, ..` in batch order, every position
    /// below `max_context`, and the new pages within the free list. Refusals are
    /// [`Error::InvalidArgument`] naming the row.
    pub fn plan(&self, op: &'static str, batch: &[BatchToken]) -> Result<BatchPlan> {
        let mut seqs: Vec<SeqId> = Vec::new();
        let mut index: BTreeMap<SeqId, usize> = BTreeMap::new();
        let mut tables: Vec<Vec<u32>> = Vec::new();
        let mut lens: Vec<usize> = Vec::new();
        let mut row_seq = Vec::with_capacity(batch.len());
        let mut slots = Vec::with_capacity(batch.len());
        let mut taken = 0usize;
        for (i, t) in batch.iter().enumerate() {
            let si = match index.get(&t.seq) {
                Some(&si) => si,
                None => {
                    let s = self.seqs.get(&t.seq).ok_or_else(|| {
                        Error::invalid(op, format!("row {i}: {} is not in the session", t.seq))
                    })?;
                    if s.poisoned {
                        return Err(Error::invalid(
                            op,
                            format!(
                                "row {i}: {} was in a batch whose forward failed; remove it",
                                t.seq
                            ),
                        ));
                    }
                    index.insert(t.seq, seqs.len());
                    seqs.push(t.seq);
                    tables.push(s.pages.clone());
                    lens.push(s.len);
                    seqs.len() - 1
                }
            };
            let p = t.pos as usize;
            if p != lens[si] {
                return Err(Error::invalid(
                    op,
                    format!(
                        "row {i}: {} continues at position {}, not {p}",
                        t.seq, lens[si]
                    ),
                ));
            }
            if p >= self.max_context {
                return Err(Error::invalid(
                    op,
                    format!(
                        "row {i}: position {p} of {} is past max_context {}",
                        t.seq, self.max_context
                    ),
                ));
            }
            if p / PAGE == tables[si].len() {
                if taken == self.free.len() {
                    return Err(Error::invalid(
                        op,
                        format!(
                            "row {i}: the batch needs more than the {} free pages of {PAGE} \
                             positions (pool of {})",
                            self.free.len(),
                            self.n_pages
                        ),
                    ));
                }
                tables[si].push(self.free[self.free.len() - 1 - taken]);
                taken += 1;
            }
            slots.push(tables[si][p / PAGE] * PAGE as u32 + (p % PAGE) as u32);
            lens[si] += 1;
            row_seq.push(si);
        }
        Ok(BatchPlan {
            slots,
            row_seq,
            seqs,
            tables,
            lens,
            taken,
        })
    }

    /// Applies a plan of [`PagedSequences::plan`] made against this state (no other change in
    /// between): the sequences' new lengths and tables, the pages off the free list.
    pub fn commit(&mut self, plan: &BatchPlan) {
        let keep = self.free.len() - plan.taken;
        for &page in &self.free[keep..] {
            let once = &mut self.used_once[page as usize];
            self.reused += usize::from(*once);
            *once = true;
        }
        self.free.truncate(keep);
        for (si, seq) in plan.seqs.iter().enumerate() {
            let s = self.seqs.get_mut(seq).expect("planned against this state");
            s.pages.clone_from(&plan.tables[si]);
            s.len = plan.lens[si];
        }
    }

    fn get(&self, what: &'static str, seq: SeqId) -> Result<&SeqPages> {
        self.seqs.get(&seq).ok_or_else(|| unknown(what, seq))
    }
}

fn unknown(what: &'static str, seq: SeqId) -> Error {
    Error::invalid(
        "PagedSequences",
        format!("{what}: {seq} is not in the session"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seq: SeqId, pos: u32) -> BatchToken {
        BatchToken { seq, pos, token: 0 }
    }

    #[test]
    fn pages_are_taken_in_order_freed_and_reused() {
        let mut p = PagedSequences::new(3, 1000).unwrap();
        let (a, b) = (p.add(), p.add());
        // a takes 65 positions (two pages), b one: the pool is full.
        let batch: Vec<_> = (0..65)
            .map(|i| row(a, i))
            .chain(std::iter::once(row(b, 0)))
            .collect();
        let plan = p.plan("t", &batch).unwrap();
        assert_eq!(plan.slots[63], 63);
        assert_eq!(plan.slots[64], PAGE as u32); // page 1, offset 0
        assert_eq!(plan.slots[65], 2 * PAGE as u32); // b's first page is page 2
        p.commit(&plan);
        assert_eq!((p.free_pages(), p.len(a).unwrap()), (0, 65));
        assert_eq!(p.table(a).unwrap(), &[0, 1]);
        // A row that needs a new page is refused, and nothing changes.
        assert!(p.plan("t", &[row(b, 1), row(a, 65)]).is_ok());
        let err = p.plan("t", &(65..129).map(|i| row(a, i)).collect::<Vec<_>>());
        assert!(err.unwrap_err().to_string().contains("free pages"));
        // a leaves; c reuses a's pages.
        p.remove(a).unwrap();
        let c = p.add();
        let plan = p.plan("t", &[row(c, 0)]).unwrap();
        p.commit(&plan);
        assert_eq!(p.table(c).unwrap(), &[0]);
        assert_eq!(p.reused(), 1);
    }

    #[test]
    fn bad_rows_are_refused_before_anything_changes() {
        let mut p = PagedSequences::new(4, 100).unwrap();
        let a = p.add();
        let gone = p.add();
        p.remove(gone).unwrap();
        let bad: [(&[BatchToken], &str); 5] = [
            (&[row(gone, 0)], "not in the session"),
            (&[row(a, 1)], "continues at position 0"),
            (&[row(a, 0), row(a, 0)], "continues at position 1"),
            (&[row(a, 0), row(a, 2)], "continues at position 1"),
            (&[row(SeqId(99), 0)], "not in the session"),
        ];
        for (batch, want) in bad {
            let e = p.plan("t", batch).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        let far: Vec<_> = (0..101).map(|i| row(a, i)).collect();
        assert!(p
            .plan("t", &far)
            .unwrap_err()
            .to_string()
            .contains("max_context"));
        assert_eq!((p.len(a).unwrap(), p.free_pages()), (0, 4));
        p.poison(&[a]);
        assert!(p
            .plan("t", &[row(a, 0)])
            .unwrap_err()
            .to_string()
            .contains("failed"));
        assert!(PagedSequences::new(0, 10).is_err());
        assert!(p.remove(gone).is_err());
    }
}
