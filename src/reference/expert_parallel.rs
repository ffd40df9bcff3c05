//! Expert parallel on the CPU: the routed experts of every layer dealt over `P` ranks
//! ([`ExpertPartition`]), each rank holding only its own experts' weights, rows moved between
//! ranks through an [`Exchange`] (the in-process [`crate::spec::exchange::Loopback`] here; NCCL
//! on GPUs). [`crate::reference::batch::CpuBatchSession::set_expert_parallel`] runs a batched
//! session this way; its bits are those of one rank holding everything.
//!
//! One layer's MoE half over the batch's rows `x = rmsnorm(h, ffn_norm)`, each row on its
//! sequence's home rank:
//! 1. On the home rank: the router and its top-k (`ids`, `weights`), and the shared expert.
//! 2. Dispatch: the row goes once per selected expert `e` (slot `j`) to `e`'s owner, tagged
//!    `row * k + j`.
//! 3. On the owner: gate, up, SwiGLU and down of each received row through its expert (every
//!    output the canonical dot of one row with one weight row, so neither the grouping nor
//!    the arrival order of the rows can change it); each result goes back with its tag.
//! 4. Combine on the home rank: each returned row is placed at its tag (slot order, never
//!    arrival order) and [`crate::reference::moe_reduce::moe_weighted_reduce`] sums the slots
//!    in their documented order, then the shared expert.
//!
//! Step 4 is where engines lose exactness (a combine in arrival order); the loopback transport
//! delivers in a shuffled order, so a combine that read arrivals would show.

use crate::error::{Error, Result};
use crate::quant::QuantMatrix;
use crate::reference::activation::swiglu;
use crate::reference::gemm::{gemm_grouped_with, gemm_with, GemmOrder};
use crate::reference::moe_block::shared_expert;
use crate::reference::moe_reduce::moe_weighted_reduce;
use crate::reference::router::softmax_topk;
use crate::spec::exchange::{Exchange, ExpertPartition, Packet, Traffic};
use crate::spec::weights::{LayerWeights, ModelWeights};

/// One rank's experts of one layer.
#[derive(Clone, Debug)]
pub struct Shard {
    /// The experts it owns (global ids, increasing).
    pub experts: Vec<u32>,
    /// `[experts.len(), ffn, dim]`
    pub gate: QuantMatrix,
    /// `[experts.len(), ffn, dim]`
    pub up: QuantMatrix,
    /// `[experts.len(), dim, ffn]`
    pub down: QuantMatrix,
}

/// What one layer's two all-to-alls moved, summed over the steps so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LayerTraffic {
    /// Dispatch: hidden rows to the experts' owners.
    pub dispatch: Traffic,
    /// Combine: expert outputs back to their home ranks.
    pub combine: Traffic,
}

/// The experts dealt over ranks, and the exchange between them.
pub struct ExpertParallel {
    ranks: usize,
    partition: ExpertPartition,
    /// `[layer][rank]`
    shards: Vec<Vec<Shard>>,
    exchange: Box<dyn Exchange + Send>,
    traffic: Vec<LayerTraffic>,
}

impl std::fmt::Debug for ExpertParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExpertParallel")
            .field("ranks", &self.ranks)
            .field("partition", &self.partition)
            .finish_non_exhaustive()
    }
}

impl ExpertParallel {
    /// `w`'s routed experts dealt over `exchange.ranks()` ranks by `partition`.
    pub fn new(
        w: &ModelWeights,
        partition: ExpertPartition,
        exchange: Box<dyn Exchange + Send>,
    ) -> Result<Self> {
        let ranks = exchange.ranks();
        let ne = w.cfg.moe.n_experts;
        let shards = w
            .layers
            .iter()
            .map(|lw| {
                (0..ranks)
                    .map(|r| {
                        let experts = partition.experts_of(r, ne, ranks);
                        Ok(Shard {
                            gate: lw.moe.gate.select_experts(&experts)?,
                            up: lw.moe.up.select_experts(&experts)?,
                            down: lw.moe.down.select_experts(&experts)?,
                            experts,
                        })
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ExpertParallel {
            ranks,
            partition,
            shards,
            exchange,
            traffic: vec![LayerTraffic::default(); w.layers.len()],
        })
    }

    /// How many ranks.
    pub fn ranks(&self) -> usize {
        self.ranks
    }

    /// Layers whose experts are dealt.
    pub fn layers(&self) -> usize {
        self.shards.len()
    }

    /// The partition of the experts.
    pub fn partition(&self) -> ExpertPartition {
        self.partition
    }

    /// Rank `r`'s experts of layer `l`.
    pub fn shard(&self, l: usize, r: usize) -> &Shard {
        &self.shards[l][r]
    }

    /// Per layer, what its all-to-alls moved so far.
    pub fn traffic(&self) -> &[LayerTraffic] {
        &self.traffic
    }

    /// Bytes of weights rank `r` holds of the whole model `cfg` describes (all its layers, in
    /// their stored formats): everything but the routed experts (every rank runs attention,
    /// the router and the shared expert of its own sequences), plus its own experts.
    pub fn rank_weight_bytes(&self, cfg: &crate::spec::config::ModelConfig, r: usize) -> usize {
        let m = &cfg.moe;
        let own = self.partition.experts_of(r, m.n_experts, self.ranks).len();
        cfg.weight_bytes() - cfg.n_layers * (m.n_experts - own) * m.expert_bytes()
    }

    /// Layer `l`'s MoE half: `h += moe(rmsnorm(h))` over `h: [n, dim]`, row `i` on rank
    /// `home[i]` (module docs).
    pub fn moe(
        &mut self,
        l: usize,
        lw: &LayerWeights,
        h: &mut [f32],
        home: &[usize],
        eps: f32,
        order: GemmOrder,
    ) -> Result<()> {
        const OP: &str = "ExpertParallel::moe";
        let w = &lw.moe;
        let c = &w.cfg;
        let (d, f, k, p) = (c.dim, c.ffn, c.top_k, self.ranks);
        let n = h.len() / d;
        if home.len() != n || home.iter().any(|&r| r >= p) {
            return Err(Error::invalid(
                OP,
                format!("{n} rows need {n} home ranks below {p}"),
            ));
        }
        let x = crate::reference::norm::rmsnorm(h, &lw.ffn_norm, eps);
        // 1. On the home ranks (row by row, the bits of any batch).
        let logits = gemm_with(order, &x, &w.router, n)?;
        let (ids, weights) = softmax_topk(&logits, n, c.n_experts, k, c.renormalize);
        let shared = shared_expert(order, w, &x, n)?;
        // 2. Dispatch.
        let mut send: Vec<Vec<Vec<Packet>>> = vec![vec![Vec::new(); p]; p];
        for t in 0..n {
            for j in 0..k {
                let e = ids[t * k + j];
                let q = self.partition.owner(e, c.n_experts, p);
                send[home[t]][q].push(Packet {
                    tag: (t * k + j) as u32,
                    expert: e,
                    from: home[t] as u32,
                    row: x[t * d..][..d].to_vec(),
                });
            }
        }
        let (recv, dispatched) = self.exchange.all_to_all(send)?;
        // 3. On the owners.
        let mut reply: Vec<Vec<Vec<Packet>>> = vec![vec![Vec::new(); p]; p];
        for (q, packets) in recv.into_iter().enumerate() {
            if packets.is_empty() {
                continue;
            }
            let shard = &self.shards[l][q];
            let m = packets.len();
            let local: Vec<u32> = packets
                .iter()
                .map(|pk| {
                    shard
                        .experts
                        .binary_search(&pk.expert)
                        .map(|i| i as u32)
                        .map_err(|_| {
                            Error::invalid(
                                OP,
                                format!("rank {q} got a row for expert {}, not its own", pk.expert),
                            )
                        })
                })
                .collect::<Result<_>>()?;
            let xs: Vec<f32> = packets
                .iter()
                .flat_map(|pk| pk.row.iter().copied())
                .collect();
            let rows: Vec<u32> = (0..m as u32).collect();
            let (mut g, mut u) = (vec![0.0; m * f], vec![0.0; m * f]);
            gemm_grouped_with(order, &xs, &shard.gate, &mut g, &rows, &local, &rows)?;
            gemm_grouped_with(order, &xs, &shard.up, &mut u, &rows, &local, &rows)?;
            let a = swiglu(&g, &u);
            let mut y = vec![0.0; m * d];
            gemm_grouped_with(order, &a, &shard.down, &mut y, &rows, &local, &rows)?;
            for (i, pk) in packets.into_iter().enumerate() {
                reply[q][pk.from as usize].push(Packet {
                    tag: pk.tag,
                    expert: pk.expert,
                    from: q as u32,
                    row: y[i * d..][..d].to_vec(),
                });
            }
        }
        let (back, combined) = self.exchange.all_to_all(reply)?;
        // 4. Combine on the home ranks: each row at its tag.
        let mut partial = vec![0.0f32; n * k * d];
        let mut filled = vec![false; n * k];
        for pk in back.into_iter().flatten() {
            let at = pk.tag as usize;
            if at >= n * k || filled[at] || pk.row.len() != d {
                return Err(Error::invalid(
                    OP,
                    format!(
                        "a returned row with tag {at} (of {}) came twice or malformed",
                        n * k
                    ),
                ));
            }
            filled[at] = true;
            partial[at * d..][..d].copy_from_slice(&pk.row);
        }
        if let Some(miss) = filled.iter().position(|&x| !x) {
            return Err(Error::invalid(
                OP,
                format!("routed row {miss} never came back"),
            ));
        }
        let out = moe_weighted_reduce(&partial, &weights, shared.as_deref(), n, k, d);
        crate::reference::elementwise::add(h, &out);
        let t = &mut self.traffic[l];
        t.dispatch.add(&dispatched);
        t.combine.add(&combined);
        Ok(())
    }
}
