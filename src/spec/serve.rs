//! Text generation for many requests at once ([`generate_batched`]): continuous batching over
//! any batched session ([`BatchDecoder`]: the CPU reference's
//! [`crate::reference::batch::CpuBatchSession`] and the device's
//! [`crate::model::batch::OnDevice`]). Each step holds one decode row of every request that is
//! generating and prompt chunks of those still taking their prompts; requests join as others
//! finish and free their pages. Every request's tokens are those it draws alone
//! ([`crate::sample::generate_stream`] with the same prompt, sampling and sequence number),
//! whatever shared its steps: the logits of its rows are its solo bits, and
//! [`crate::sample::sample`]'s randomness is a function of (seed, sequence, step) alone.

use crate::error::{Error, Result};
use crate::sample::{check_generate, sample, Sampling};
use crate::spec::paged::{BatchToken, SeqId};

/// A batched session as generation drives it.
pub trait BatchDecoder {
    /// A new, empty sequence.
    fn add(&mut self) -> Result<SeqId>;
    /// Removes a sequence, its pages freed.
    fn remove(&mut self, seq: SeqId) -> Result<()>;
    /// One step of `batch`; `each(seq, logits)` sees the logits (`[vocab]`) after each
    /// sequence's last row in the batch, in order of first appearance.
    fn step_each(
        &mut self,
        batch: &[BatchToken],
        each: &mut dyn FnMut(SeqId, &[f32]) -> Result<()>,
    ) -> Result<()>;
}

/// One generation request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The prompt's tokens (at least one).
    pub prompt: Vec<u32>,
    /// Tokens to draw at most.
    pub max_tokens: usize,
    /// The sampling stream's sequence number (with the seed and the step, all a draw depends
    /// on).
    pub sequence: u64,
}

/// How [`generate_batched`] fills its steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServeLimits {
    /// Requests live at once (each holds a sequence and its pages).
    pub max_live: usize,
    /// Rows a step holds at most: the decode rows first, then prompt chunks.
    pub max_rows: usize,
    /// Prompt rows one request gives a step at most.
    pub chunk: usize,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            max_live: 32,
            max_rows: 512,
            chunk: 256,
        }
    }
}

/// A live request: its sequence, prompt tokens fed, and tokens drawn.
struct Live {
    req: usize,
    seq: SeqId,
    fed: usize,
    drawn: Vec<u32>,
    done: bool,
}

/// Generates every request through `d`, requests admitted in order as room frees: each step
/// one decode row per generating request (its last drawn token), then prompt chunks of at
/// most `limits.chunk` rows per request, `limits.max_rows` rows in all. A request ends after
/// `max_tokens` tokens or one `is_end` accepts (that token kept), and its sequence leaves.
/// Returns each request's drawn tokens, in request order: those of
/// [`crate::sample::generate_stream`] on a solo session with the same arguments.
pub fn generate_batched(
    d: &mut dyn BatchDecoder,
    requests: &[Request],
    params: &Sampling,
    limits: &ServeLimits,
    is_end: &dyn Fn(u32) -> bool,
) -> Result<Vec<Vec<u32>>> {
    const OP: &str = "generate_batched";
    for r in requests {
        check_generate(OP, &r.prompt, params)?;
    }
    if limits.max_live == 0 || limits.max_rows <= limits.max_live || limits.chunk == 0 {
        return Err(Error::invalid(
            OP,
            format!(
                "limits {limits:?}: at least one live request, room for a chunk beside every \
                 decode row, chunks of a row at least"
            ),
        ));
    }
    let mut out = vec![Vec::new(); requests.len()];
    let mut live: Vec<Live> = Vec::new();
    let mut next_req = 0;
    while next_req < requests.len() || !live.is_empty() {
        while live.len() < limits.max_live && next_req < requests.len() {
            live.push(Live {
                req: next_req,
                seq: d.add()?,
                fed: 0,
                drawn: Vec::new(),
                done: false,
            });
            next_req += 1;
        }
        let mut batch = Vec::new();
        // Decode rows: every request whose prompt is in feeds back its last token.
        for l in live.iter().filter(|l| !l.drawn.is_empty()) {
            let p = requests[l.req].prompt.len() + l.drawn.len() - 1;
            batch.push(BatchToken {
                seq: l.seq,
                pos: p as u32,
                token: l.drawn[l.drawn.len() - 1],
            });
        }
        // Prompt chunks, in admission order, while the step has room.
        for l in live.iter_mut() {
            let prompt = &requests[l.req].prompt;
            let take = (prompt.len() - l.fed)
                .min(limits.chunk)
                .min(limits.max_rows - batch.len());
            batch.extend((l.fed..l.fed + take).map(|p| BatchToken {
                seq: l.seq,
                pos: p as u32,
                token: prompt[p],
            }));
            l.fed += take;
        }
        d.step_each(&batch, &mut |seq, logits| {
            let Some(l) = live.iter_mut().find(|l| l.seq == seq) else {
                return Err(Error::invalid(OP, "logits of a sequence not in the step"));
            };
            let r = &requests[l.req];
            if l.fed < r.prompt.len() {
                return Ok(()); // mid-prompt: nothing to draw yet
            }
            if l.drawn.len() == r.max_tokens {
                l.done = true; // max_tokens 0: the prompt taken, nothing drawn
                return Ok(());
            }
            let step = (r.prompt.len() + l.drawn.len()) as u64;
            let t = sample(logits, params, r.sequence, step)?;
            l.drawn.push(t);
            l.done = l.drawn.len() == r.max_tokens || is_end(t);
            Ok(())
        })?;
        for l in live.iter_mut().filter(|l| l.done) {
            d.remove(l.seq)?;
            out[l.req] = std::mem::take(&mut l.drawn);
        }
        live.retain(|l| !l.done);
    }
    Ok(out)
}
