//! Seeded random serving schedules ([`Schedule`]): sequences arrive, are fed prefill chunks and
//! decode tokens in steps that mix them, and leave when done, within a pool of pages. The
//! batched session's tests and `oracle batch` draw them to show that no schedule changes a
//! sequence's bits.

use crate::error::{Error, Result};
use crate::spec::paged::{BatchToken, PagedSequences, SeqId, PAGE};
use crate::spec::trace::Trace;

/// One sequence of a schedule: `len` tokens of which the first `prompt` are its prompt
/// (prefilled in chunks), the rest decoded one a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeqSpec {
    /// Tokens in all.
    pub len: usize,
    /// Tokens of the prompt (`1..=len`).
    pub prompt: usize,
}

/// One step: who joins before it, the batch's rows (per row, the index of the sequence whose
/// next token it is; a sequence's rows in order, sequences interleaved), who leaves after it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Step {
    /// Sequences that join before the step.
    pub arrive: Vec<usize>,
    /// Per row, its sequence.
    pub rows: Vec<usize>,
    /// Sequences done after the step (they leave, freeing their pages).
    pub leave: Vec<usize>,
}

/// What a schedule exercises.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScheduleCounts {
    /// Steps.
    pub steps: usize,
    /// Rows over all steps (every token of every sequence once).
    pub rows: usize,
    /// Steps that hold both a prompt chunk of more than one token and a decode token.
    pub mixed_steps: usize,
    /// The most sequences in one step.
    pub max_batch: usize,
    /// Pages handed to a sequence after another had freed them.
    pub pages_reused: usize,
}

/// A schedule over [`SeqSpec`]s.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// The sequences.
    pub seqs: Vec<SeqSpec>,
    /// Pages of the cache the schedule fits in.
    pub n_pages: usize,
    /// The steps, in order.
    pub steps: Vec<Step>,
}

/// Pages a sequence of `len` positions holds.
pub fn pages_for(len: usize) -> usize {
    len.div_ceil(PAGE)
}

/// A small deterministic generator (SplitMix64): schedules must not depend on a library's
/// random stream.
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

impl Schedule {
    /// A schedule drawn from `seed`: sequences join in order, each admitted only when the
    /// pool of `n_pages` pages can hold it whole beside those already in (so no step waits
    /// on pages forever), at most `max_live` at once; each step feeds each live sequence with
    /// probability 3/4 a chunk of 1 to `max_chunk` prompt tokens or its next decode token, the
    /// rows of different sequences interleaved at random; a sequence leaves after its last
    /// token. Errors when a sequence alone needs more pages than the pool holds.
    pub fn random(
        seed: u64,
        seqs: &[SeqSpec],
        n_pages: usize,
        max_live: usize,
        max_chunk: usize,
    ) -> Result<Self> {
        const OP: &str = "Schedule::random";
        PagedSequences::check_pool(OP, n_pages)?;
        for (i, s) in seqs.iter().enumerate() {
            if s.prompt == 0 || s.prompt > s.len {
                return Err(Error::invalid(
                    OP,
                    format!("sequence {i}: prompt {} of {} tokens", s.prompt, s.len),
                ));
            }
            if pages_for(s.len) > n_pages {
                return Err(Error::invalid(
                    OP,
                    format!(
                        "sequence {i}: {} tokens need {} pages, the pool holds {n_pages}",
                        s.len,
                        pages_for(s.len)
                    ),
                ));
            }
        }
        if max_live == 0 || max_chunk == 0 {
            return Err(Error::invalid(OP, "max_live and max_chunk are at least 1"));
        }
        let mut rng = Mix(seed);
        let mut fed = vec![0usize; seqs.len()];
        let mut live: Vec<usize> = Vec::new();
        let mut next = 0usize; // the next sequence to admit
        let mut reserved = 0usize; // pages the live sequences will hold at their end
        let mut steps = Vec::new();
        while next < seqs.len() || !live.is_empty() {
            let mut step = Step::default();
            // Admit in order while the pool can hold the newcomer whole; sometimes wait a step
            // (so arrivals land mid-stream), never when nothing is live.
            while next < seqs.len()
                && live.len() < max_live
                && reserved + pages_for(seqs[next].len) <= n_pages
                && (live.is_empty() || rng.below(3) != 0)
            {
                reserved += pages_for(seqs[next].len);
                step.arrive.push(next);
                live.push(next);
                next += 1;
            }
            // Each live sequence's rows this step.
            let mut parts: Vec<(usize, usize)> = Vec::new();
            for &s in &live {
                if rng.below(4) == 0 {
                    continue;
                }
                let n = if fed[s] < seqs[s].prompt {
                    1 + rng.below(max_chunk.min(seqs[s].prompt - fed[s]))
                } else {
                    1
                };
                parts.push((s, n));
            }
            if parts.is_empty() {
                let s = live[rng.below(live.len())];
                parts.push((s, 1));
            }
            // Interleave the sequences' rows at random, each sequence's in order.
            let mut left: Vec<(usize, usize)> = parts.clone();
            while !left.is_empty() {
                let i = rng.below(left.len());
                step.rows.push(left[i].0);
                left[i].1 -= 1;
                if left[i].1 == 0 {
                    left.swap_remove(i);
                }
            }
            for &(s, n) in &parts {
                fed[s] += n;
                if fed[s] == seqs[s].len {
                    step.leave.push(s);
                }
            }
            live.retain(|s| !step.leave.contains(s));
            for &s in &step.leave {
                reserved -= pages_for(seqs[s].len);
            }
            steps.push(step);
        }
        Ok(Schedule {
            seqs: seqs.to_vec(),
            n_pages,
            steps,
        })
    }

    /// What the schedule exercises (the page bookkeeping replayed, no model run).
    pub fn counts(&self) -> ScheduleCounts {
        let mut fed = vec![0usize; self.seqs.len()];
        let mut c = ScheduleCounts {
            steps: self.steps.len(),
            ..Default::default()
        };
        let mut pages = PagedSequences::new(self.n_pages, usize::MAX).ok();
        let mut ids: Vec<Option<SeqId>> = vec![None; self.seqs.len()];
        for st in &self.steps {
            let mut n = vec![0usize; self.seqs.len()];
            for &s in &st.rows {
                n[s] += 1;
            }
            let chunk = (0..n.len()).any(|s| n[s] > 1);
            let decode = (0..n.len()).any(|s| n[s] == 1 && fed[s] >= self.seqs[s].prompt);
            c.mixed_steps += usize::from(chunk && decode);
            c.max_batch = c.max_batch.max(n.iter().filter(|&&k| k > 0).count());
            c.rows += st.rows.len();
            if let Some(p) = pages.as_mut() {
                for &a in &st.arrive {
                    ids[a] = Some(p.add());
                }
                let mut at = fed.clone();
                let batch: Option<Vec<BatchToken>> = st
                    .rows
                    .iter()
                    .map(|&s| {
                        at[s] += 1;
                        Some(BatchToken {
                            seq: ids[s]?,
                            pos: (at[s] - 1) as u32,
                            token: 0,
                        })
                    })
                    .collect();
                match batch.and_then(|b| p.plan("Schedule::counts", &b).ok()) {
                    Some(plan) => p.commit(&plan),
                    None => pages = None, // not a schedule of this pool: no page figure
                }
                if let Some(p) = pages.as_mut() {
                    for &l in &st.leave {
                        if let Some(id) = ids[l].take() {
                            let _ = p.remove(id);
                        }
                    }
                }
            }
            for (f, k) in fed.iter_mut().zip(&n) {
                *f += k;
            }
        }
        c.pages_reused = pages.map_or(0, |p| p.reused());
        c
    }
}

/// A batched session a schedule can drive (the CPU reference and the device session).
pub trait BatchRunner {
    /// A new sequence.
    fn add(&mut self) -> Result<SeqId>;
    /// Removes a sequence, its pages freed.
    fn remove(&mut self, seq: SeqId) -> Result<()>;
    /// One step: every row's hidden states and logits appended to `trace` in batch order.
    fn step(&mut self, batch: &[BatchToken], trace: &mut Trace) -> Result<()>;
    /// Pages handed out again after a sequence had freed them.
    fn reused(&self) -> usize;
}

/// Drives `runner` through `schedule`, sequence `s` taking the tokens `streams[s]`: per
/// sequence its trace (every layer's hidden states, `dim` wide, and the logits, `vocab` wide,
/// in position order, as its solo run fills them), and the pages reused.
pub fn drive(
    runner: &mut impl BatchRunner,
    schedule: &Schedule,
    streams: &[Vec<u32>],
    dim: usize,
    vocab: usize,
) -> Result<(Vec<Trace>, usize)> {
    const OP: &str = "run_schedule";
    if streams.len() != schedule.seqs.len()
        || streams
            .iter()
            .zip(&schedule.seqs)
            .any(|(t, s)| t.len() != s.len)
    {
        return Err(Error::invalid(
            OP,
            "one token stream per sequence, of the sequence's length",
        ));
    }
    let mut ids = vec![None; streams.len()];
    let mut fed = vec![0usize; streams.len()];
    let mut traces = vec![Trace::default(); streams.len()];
    for step in &schedule.steps {
        for &s in &step.arrive {
            ids[s] = Some(runner.add()?);
        }
        let mut batch = Vec::with_capacity(step.rows.len());
        for &s in &step.rows {
            let seq = ids[s]
                .ok_or_else(|| Error::invalid(OP, format!("sequence {s} fed before it arrived")))?;
            batch.push(BatchToken {
                seq,
                pos: fed[s] as u32,
                token: streams[s][fed[s]],
            });
            fed[s] += 1;
        }
        let mut t = Trace::default();
        runner.step(&batch, &mut t)?;
        for (i, &s) in step.rows.iter().enumerate() {
            for (l, rows) in t.layers.iter().enumerate() {
                traces[s].push_layer(l, &rows[i * dim..(i + 1) * dim]);
            }
            if !t.logits.is_empty() {
                traces[s]
                    .logits
                    .extend_from_slice(&t.logits[i * vocab..(i + 1) * vocab]);
            }
        }
        for &s in &step.leave {
            let seq = ids[s].take().expect("a sequence leaves once");
            runner.remove(seq)?;
        }
    }
    Ok((traces, runner.reused()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_token_once_in_order_within_the_pool() {
        let seqs: Vec<SeqSpec> = (0..12)
            .map(|i| SeqSpec {
                len: 20 + 37 * i % 150,
                prompt: 1 + (13 * i) % 19,
            })
            .collect();
        let s = Schedule::random(7, &seqs, 6, 8, 16).unwrap();
        let mut fed = vec![0usize; seqs.len()];
        let mut live = std::collections::BTreeSet::new();
        for st in &s.steps {
            for &a in &st.arrive {
                assert!(live.insert(a));
            }
            let pages: usize = live.iter().map(|&q| pages_for(seqs[q].len)).sum();
            assert!(pages <= 6, "admitted past the pool");
            for &r in &st.rows {
                assert!(live.contains(&r));
                fed[r] += 1;
            }
            for &l in &st.leave {
                assert_eq!(fed[l], seqs[l].len);
                live.remove(&l);
            }
        }
        assert!(live.is_empty());
        assert_eq!(fed, seqs.iter().map(|q| q.len).collect::<Vec<_>>());
        let c = s.counts();
        assert_eq!(c.rows, seqs.iter().map(|q| q.len).sum::<usize>());
        assert!(
            c.mixed_steps > 0 && c.max_batch > 1 && c.pages_reused > 0,
            "{c:?}"
        );
        // The same seed, the same schedule.
        assert_eq!(s, Schedule::random(7, &seqs, 6, 8, 16).unwrap());
        let big = [SeqSpec {
            len: 7 * PAGE,
            prompt: 1,
        }];
        assert!(Schedule::random(1, &big, 6, 8, 16).is_err());
    }
}
