//! Expert parallel's exchange: which rank owns which expert ([`ExpertPartition`]), what ranks
//! send each other ([`Packet`]), and the all-to-all that moves it ([`Exchange`]), with an
//! in-process transport ([`Loopback`]: `P` virtual ranks, for the CPU reference and CI).
//!
//! A packet carries its tag (the routed pair `token * k + slot` on its home rank) and the
//! receiver places it by that tag, never by when it arrived: [`Loopback`] delivers every
//! rank's packets in a shuffled order (seeded) to hold the receivers to that.

use crate::error::{Error, Result};

/// How `n_experts` experts are dealt to `ranks` ranks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ExpertPartition {
    /// Rank `r` owns the `r`-th run of `ceil(n_experts / ranks)` consecutive experts.
    #[default]
    Contiguous,
    /// Rank `r` owns the experts `e` with `e % ranks == r`.
    Strided,
}

impl ExpertPartition {
    /// The rank that owns expert `e`.
    pub fn owner(self, e: u32, n_experts: usize, ranks: usize) -> usize {
        match self {
            ExpertPartition::Contiguous => e as usize / n_experts.div_ceil(ranks),
            ExpertPartition::Strided => e as usize % ranks,
        }
    }

    /// The experts rank `r` owns, increasing.
    pub fn experts_of(self, r: usize, n_experts: usize, ranks: usize) -> Vec<u32> {
        (0..n_experts as u32)
            .filter(|&e| self.owner(e, n_experts, ranks) == r)
            .collect()
    }

    /// `contiguous` or `strided`.
    pub fn name(self) -> &'static str {
        match self {
            ExpertPartition::Contiguous => "contiguous",
            ExpertPartition::Strided => "strided",
        }
    }

    /// The partition a [`ExpertPartition::name`] names.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "contiguous" => Some(ExpertPartition::Contiguous),
            "strided" => Some(ExpertPartition::Strided),
            _ => None,
        }
    }
}

/// One row sent between ranks.
#[derive(Clone, Debug, PartialEq)]
pub struct Packet {
    /// The routed pair on the sender's home side: `token * k + slot` among the home rank's
    /// rows (the receiver of a reply places the row by it).
    pub tag: u32,
    /// The expert the row is for.
    pub expert: u32,
    /// The rank the row comes from.
    pub from: u32,
    /// The row (`dim` values).
    pub row: Vec<f32>,
}

/// Rows and bytes one all-to-all moved between different ranks (a rank's rows to itself stay
/// local and are not counted).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Per rank, rows it sent to other ranks.
    pub sent: Vec<usize>,
    /// Per rank, rows it received from other ranks.
    pub received: Vec<usize>,
    /// Bytes of row data that crossed between ranks.
    pub bytes: usize,
}

impl Traffic {
    /// Adds `t`'s counts to these (an empty `Traffic` takes `t`'s rank count).
    pub fn add(&mut self, t: &Traffic) {
        if self.sent.is_empty() {
            self.sent = vec![0; t.sent.len()];
            self.received = vec![0; t.received.len()];
        }
        for (a, b) in self.sent.iter_mut().zip(&t.sent) {
            *a += b;
        }
        for (a, b) in self.received.iter_mut().zip(&t.received) {
            *a += b;
        }
        self.bytes += t.bytes;
    }
}

/// An all-to-all between `ranks()` ranks.
pub trait Exchange {
    /// How many ranks take part.
    fn ranks(&self) -> usize;
    /// `send[r][q]`: rank `r`'s packets for rank `q`. Returns `recv[q]`: everything sent to
    /// `q`, in the order the transport delivered it (receivers must not depend on it), and
    /// what crossed between ranks.
    fn all_to_all(&mut self, send: Vec<Vec<Vec<Packet>>>) -> Result<(Vec<Vec<Packet>>, Traffic)>;
}

/// `P` virtual ranks in one process: the all-to-all is a transpose of the send lists, each
/// receiver's packets then shuffled (a seeded xorshift, a new order every call) as arrivals
/// from several senders would interleave.
#[derive(Clone, Debug)]
pub struct Loopback {
    ranks: usize,
    state: u64,
}

impl Loopback {
    /// `ranks` virtual ranks (at least 1), delivering in orders drawn from `seed`.
    pub fn new(ranks: usize, seed: u64) -> Result<Self> {
        if ranks == 0 {
            return Err(Error::invalid("Loopback::new", "at least one rank"));
        }
        Ok(Loopback {
            ranks,
            state: seed | 1,
        })
    }

    fn next(&mut self) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state
    }
}

impl Exchange for Loopback {
    fn ranks(&self) -> usize {
        self.ranks
    }

    fn all_to_all(&mut self, send: Vec<Vec<Vec<Packet>>>) -> Result<(Vec<Vec<Packet>>, Traffic)> {
        const OP: &str = "Loopback::all_to_all";
        let p = self.ranks;
        if send.len() != p || send.iter().any(|s| s.len() != p) {
            return Err(Error::invalid(
                OP,
                format!("send lists must be {p} x {p} (sender x receiver)"),
            ));
        }
        let mut traffic = Traffic {
            sent: vec![0; p],
            received: vec![0; p],
            bytes: 0,
        };
        let mut recv: Vec<Vec<Packet>> = vec![Vec::new(); p];
        for (r, lists) in send.into_iter().enumerate() {
            for (q, list) in lists.into_iter().enumerate() {
                if r != q {
                    traffic.sent[r] += list.len();
                    traffic.received[q] += list.len();
                    traffic.bytes += list.iter().map(|k| k.row.len() * 4).sum::<usize>();
                }
                recv[q].extend(list);
            }
        }
        for list in &mut recv {
            // Fisher-Yates with the transport's own draws.
            for i in (1..list.len()).rev() {
                let j = (self.next() % (i as u64 + 1)) as usize;
                list.swap(i, j);
            }
        }
        Ok((recv, traffic))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_deal_every_expert_once() {
        for ranks in 1..=5 {
            for part in [ExpertPartition::Contiguous, ExpertPartition::Strided] {
                let mut all: Vec<u32> = (0..ranks)
                    .flat_map(|r| part.experts_of(r, 16, ranks))
                    .collect();
                all.sort_unstable();
                assert_eq!(all, (0..16).collect::<Vec<u32>>(), "{part:?} over {ranks}");
                assert!((0..16).all(|e| part.owner(e, 16, ranks) < ranks));
            }
        }
        assert_eq!(ExpertPartition::Contiguous.experts_of(1, 8, 3), [3, 4, 5]);
        assert_eq!(ExpertPartition::Strided.experts_of(1, 8, 3), [1, 4, 7]);
    }

    #[test]
    fn loopback_delivers_everything_in_a_shuffled_order() {
        let mut x = Loopback::new(3, 7).unwrap();
        let pk = |tag, from| Packet {
            tag,
            expert: 0,
            from,
            row: vec![tag as f32; 2],
        };
        let send: Vec<Vec<Vec<Packet>>> = (0..3u32)
            .map(|r| {
                (0..3u32)
                    .map(|q| (0..10).map(|i| pk(100 * r + 10 * q + i, r)).collect())
                    .collect()
            })
            .collect();
        let (recv, traffic) = x.all_to_all(send).unwrap();
        assert_eq!(traffic.sent, [20, 20, 20]);
        assert_eq!(traffic.received, [20, 20, 20]);
        assert_eq!(traffic.bytes, 60 * 8);
        for (q, list) in recv.iter().enumerate() {
            let mut tags: Vec<u32> = list.iter().map(|k| k.tag).collect();
            let in_order = tags.windows(2).all(|w| w[0] < w[1]);
            assert!(!in_order, "rank {q} got its packets in send order");
            tags.sort_unstable();
            let want: Vec<u32> = (0..3u32)
                .flat_map(|r| (0..10).map(move |i| 100 * r + 10 * q as u32 + i))
                .collect();
            assert_eq!(tags, want);
        }
        assert!(Loopback::new(0, 1).is_err());
        assert!(x.all_to_all(vec![vec![]; 2]).is_err());
    }
}
