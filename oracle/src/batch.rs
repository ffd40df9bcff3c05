//! `oracle batch`: many sequences served together against each one run alone. Draws S
//! sequences of random lengths and a seeded serving schedule (arrivals, prompt chunks mixed
//! with decode tokens, rows interleaved, pages freed and reused), runs it through the batched
//! session, runs every sequence alone one token at a time, and compares every layer and logit
//! bit for bit, naming the first divergence (sequence, position, layer). On a device the
//! schedule also runs as a server calls it (no trace, decode steps replayed from step graphs):
//! each step's last-row logits of each sequence against the same position alone.

use std::time::Instant;

use anyhow::{bail, Result};
use bitexact::model::batch::OnDevice;
use bitexact::model::schedule::drive;
use bitexact::model::CpuBatchSession;
use bitexact::model::{
    first_divergence, prompt, BatchSession, BatchToken, CpuSession, GpuModel, ModelConfig,
    ModelWeights, Schedule, SeqId, SeqSpec, Trace, PAGE,
};
use bitexact::quant::WeightFormat;
use bitexact::reference::expert_parallel::ExpertParallel;
use bitexact::reference::model::ScanOrder;
use bitexact::spec::exchange::{ExpertPartition, Loopback};
use bitexact::spec::serve::BatchDecoder;
use serde::Serialize;

use crate::{fmt_secs, parse_format, parse_positive, RunArgs};

#[derive(clap::Args)]
pub struct BatchArgs {
    /// Model preset (small presets: every sequence also runs alone on the CPU): tiny (hidden 64), small (256), qwen3-30b-a3b (2048), tiny-hybrid (64),
    /// qwen3.6-35b-a3b (2048). The K-quant formats (Q4_K, Q5_K, Q6_K) need a hidden size that
    /// is a multiple of 256 (small and the large presets).
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Format of the experts.
    #[arg(long, default_value = "F32", value_parser = parse_format)]
    format: WeightFormat,
    /// Sequences in the schedule.
    #[arg(long, default_value_t = 12, value_parser = parse_positive)]
    sequences: usize,
    /// Longest sequence (lengths are drawn from 1 to this).
    #[arg(long, default_value_t = 150, value_parser = parse_positive)]
    max_len: usize,
    /// Pages of the shared KV cache, PAGE (64) positions each (default: room for about
    /// --max-live average sequences, at least the longest one's).
    #[arg(long, value_parser = parse_positive)]
    pages: Option<usize>,
    /// Most sequences live at once.
    #[arg(long, default_value_t = 10, value_parser = parse_positive)]
    max_live: usize,
    /// Longest prompt chunk a step feeds one sequence.
    #[arg(long, default_value_t = 16, value_parser = parse_positive)]
    max_chunk: usize,
    /// Seed of the weights, the sequences and the schedule.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Reduction orders: f32 (every kernel's) or exact (the exact integer orders, CPU only:
    /// the device path then does not run).
    #[arg(long, default_value = "f32", value_parser = crate::parse_orders)]
    order: crate::Orders,
    /// The DeltaNet layers' scan order of every path: recurrence (the default) or chunked
    /// (hybrid presets).
    #[arg(long, default_value = "recurrence", value_parser = crate::model::parse_scan_order)]
    scan_order: ScanOrder,
    /// Expert-parallel ranks of the CPU batched path (virtual ranks in this process, rows
    /// exchanged through the loopback transport; 1: every expert on one rank).
    #[arg(long, default_value_t = 1, value_parser = parse_positive)]
    ranks: usize,
    /// How the experts are dealt to the ranks: contiguous or strided.
    #[arg(long, default_value = "contiguous", value_parser = parse_partition)]
    partition: ExpertPartition,
    #[command(flatten)]
    run: RunArgs,
}

fn parse_partition(s: &str) -> Result<ExpertPartition, String> {
    ExpertPartition::parse(s)
        .ok_or_else(|| format!("unknown partition `{s}` (one of contiguous, strided)"))
}

#[derive(Serialize)]
struct Report {
    mode: &'static str,
    preset: String,
    format: String,
    order: &'static str,
    seed: u64,
    sequences: usize,
    tokens: usize,
    pages: usize,
    steps: usize,
    mixed_steps: usize,
    max_batch: usize,
    pages_reused: usize,
    hidden_elements: usize,
    logits: usize,
    differing: u64,
    first_divergence: Option<String>,
    gpu_note: String,
    bit_exact: bool,
}

pub fn run(a: &BatchArgs) -> Result<bool> {
    let cfg = ModelConfig::preset(&a.preset, a.format).map_err(crate::output::usage_err)?;
    if a.max_len > cfg.max_context {
        crate::output::usage!(
            "--max-len {} exceeds the {} preset's context of {} positions",
            a.max_len,
            a.preset,
            cfg.max_context
        );
    }
    if a.scan_order != ScanOrder::Recurrence && cfg.hybrid.is_none() {
        crate::output::usage!(
            "--scan-order chunked orders the DeltaNet layers' scan, and {} has none",
            a.preset
        );
    }
    // The seeded sequences: lengths 1..=max_len, prompts 1..=len.
    let mut x = a.seed ^ 0x5eed_0fba_7c00;
    let mut draw = |n: usize| {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        1 + (x >> 33) as usize % n
    };
    let seqs: Vec<SeqSpec> = (0..a.sequences)
        .map(|_| {
            let len = draw(a.max_len);
            SeqSpec {
                len,
                prompt: draw(len),
            }
        })
        .collect();
    let longest = seqs.iter().map(|s| s.len.div_ceil(PAGE)).max().unwrap_or(1);
    let all: usize = seqs.iter().map(|s| s.len.div_ceil(PAGE)).sum();
    // Room for about max_live average sequences at once: later arrivals then take over the
    // pages of departed ones.
    let live = a.max_live.min(seqs.len());
    let pages = a
        .pages
        .unwrap_or((all * live).div_ceil(seqs.len()).max(longest));
    // A schedule that batches at least 8 sequences (or all, if fewer), mixes prompt chunks
    // with decode tokens in a step and hands a freed page to another sequence: the first of
    // the seeds seed, seed + 1, .. whose schedule does all three.
    let want_batch = 8.min(seqs.len());
    let mut attempt = 0u64;
    let (schedule, counts) = loop {
        let s = Schedule::random(
            a.seed.wrapping_add(attempt),
            &seqs,
            pages,
            a.max_live,
            a.max_chunk,
        )?;
        let c = s.counts();
        if c.max_batch >= want_batch && c.mixed_steps > 0 && c.pages_reused > 0 {
            break (s, c);
        }
        attempt += 1;
        if attempt == 64 {
            bail!(
                "no schedule of seeds {}..{} batches {want_batch} sequences at once, mixes \
                 prompt chunks with decode tokens and reuses a page (last: {c:?}): give \
                 more --sequences, --max-live or --pages",
                a.seed,
                a.seed.wrapping_add(attempt)
            );
        }
    };
    println!(
        "bitexact oracle: batch, {} ({}), seed {}, {} orders{}",
        a.preset,
        a.format,
        a.seed,
        a.order.name(),
        if a.scan_order == ScanOrder::Chunked {
            ", the chunked scan order"
        } else {
            ""
        }
    );
    println!(
        "schedule (seed {}): {} sequences, {} tokens, {} steps, {} mixing prompt chunks with \
         decode tokens, up to {} sequences a step, a cache of {pages} pages of {PAGE} \
         positions, {} pages reused",
        a.seed.wrapping_add(attempt),
        seqs.len(),
        counts.rows,
        counts.steps,
        counts.mixed_steps,
        counts.max_batch,
        counts.pages_reused
    );
    let w = ModelWeights::generate(&cfg, a.seed, None)?;
    let streams: Vec<Vec<u32>> = seqs
        .iter()
        .enumerate()
        .map(|(i, s)| prompt(a.seed.wrapping_mul(1000) + i as u64, s.len, cfg.vocab))
        .collect();
    // The paths: the CPU batched session, and the device session when a device opens (the
    // device first: a required one that does not open stops the run before the CPU work).
    let (dev, gpu_note) = a.run.open_device()?;
    let (dev, gpu_note) = match dev {
        Some(_) if a.order != crate::Orders::F32 => (
            None,
            Some(
                "the kernels compute the f32 orders: --order exact runs the CPU paths only"
                    .to_string(),
            ),
        ),
        dev => (dev, gpu_note),
    };
    let (attn, gemm) = a.order.parts();
    let mut paths: Vec<(&'static str, f64, Vec<Trace>, usize)> = Vec::new();
    // The schedule as a server calls it (no trace): per path its steps' last-row logits.
    let mut served: Vec<(&'static str, f64, Vec<ServedRow>, String)> = Vec::new();
    let t0 = Instant::now();
    let (batched, reused) = if a.ranks > 1 {
        let ep = ExpertParallel::new(&w, a.partition, Box::new(Loopback::new(a.ranks, a.seed)?))?;
        let mut s = CpuBatchSession::new(&w, schedule.n_pages)?;
        s.set_orders(attn, gemm);
        s.set_scan_order(a.scan_order)?;
        s.set_expert_parallel(ep)?;
        let got = drive(&mut s, &schedule, &streams, cfg.dim, cfg.vocab)?;
        let ep = s.expert_parallel().expect("set above");
        println!(
            "expert parallel: {} ranks ({}), {} experts a layer",
            a.ranks,
            a.partition.name(),
            cfg.moe.n_experts
        );
        for r in 0..a.ranks {
            let t = &ep.traffic();
            let (sent, recv): (usize, usize) = t.iter().fold((0, 0), |(x, y), l| {
                (
                    x + l.dispatch.sent[r] + l.combine.sent[r],
                    y + l.dispatch.received[r] + l.combine.received[r],
                )
            });
            println!(
                "  rank {r}: experts {:?}, {:.1} MiB of weights (of {:.1} MiB on one rank); rows sent {sent}, received {recv} (all layers, dispatch + combine)",
                ep.shard(0, r).experts,
                ep.rank_weight_bytes(&cfg, r) as f64 / (1u64 << 20) as f64,
                cfg.weight_bytes() as f64 / (1u64 << 20) as f64,
            );
        }
        let l0 = &ep.traffic()[0];
        println!(
            "  layer 0: dispatch {} rows ({} bytes) between ranks, combine {} rows",
            l0.dispatch.sent.iter().sum::<usize>(),
            l0.dispatch.bytes,
            l0.combine.sent.iter().sum::<usize>()
        );
        got
    } else {
        let mut s = CpuBatchSession::new(&w, schedule.n_pages)?;
        s.set_orders(attn, gemm);
        s.set_scan_order(a.scan_order)?;
        drive(&mut s, &schedule, &streams, cfg.dim, cfg.vocab)?
    };
    paths.push(("cpu-batched", t0.elapsed().as_secs_f64(), batched, reused));
    if a.ranks == 1 {
        let mut s = CpuBatchSession::new(&w, schedule.n_pages)?;
        s.set_orders(attn, gemm);
        s.set_scan_order(a.scan_order)?;
        let t0 = Instant::now();
        let got = serve(&mut s, &schedule, &streams)?;
        served.push(("cpu-served", t0.elapsed().as_secs_f64(), got, String::new()));
    }
    if let Some(dev) = &dev {
        let model = GpuModel::load(dev, &w)?;
        let mut session = BatchSession::new(dev, &model, pages)?;
        session.set_scan_order(a.scan_order)?;
        let t0 = Instant::now();
        let mut runner = OnDevice {
            dev,
            session: &mut session,
        };
        let (got, reused) = drive(&mut runner, &schedule, &streams, cfg.dim, cfg.vocab)?;
        paths.push(("gpu-batched", t0.elapsed().as_secs_f64(), got, reused));
        // The serving call: no trace, so decode steps replay step graphs (on by default). A
        // fresh session, the traced one's pages freed first.
        drop(session);
        let mut session = BatchSession::new(dev, &model, pages)?;
        session.set_scan_order(a.scan_order)?;
        let t0 = Instant::now();
        let got = serve(
            &mut OnDevice {
                dev,
                session: &mut session,
            },
            &schedule,
            &streams,
        )?;
        let st = session.stats();
        let graphs = format!(
            ", {} steps replayed from {} captured graphs",
            st.graph_replays, st.captures
        );
        served.push(("gpu-served", t0.elapsed().as_secs_f64(), got, graphs));
        if let Some(e) = &st.graph_error {
            println!("step graphs: capture failed ({e}); the steps ran eagerly");
        }
    }
    let t0 = Instant::now();
    let solo: Vec<Trace> = streams
        .iter()
        .map(|toks| {
            let mut t = Trace::default();
            let mut s = CpuSession::new(&w);
            s.set_orders(attn, gemm);
            s.set_scan_order(a.scan_order)?;
            s.run(toks, &mut t).map(|()| t)
        })
        .collect::<bitexact::Result<_>>()?;
    let t_solo = t0.elapsed().as_secs_f64();
    let mut differing = 0u64;
    let mut first = None;
    let (mut hidden, mut logits) = (0usize, 0usize);
    for (name, _, traces, _) in &paths {
        for (s, (got, want)) in traces.iter().zip(&solo).enumerate() {
            for (l, (x, y)) in got.layers.iter().zip(&want.layers).enumerate() {
                hidden += y.len();
                differing += count_differing(x, y);
                if first.is_none() {
                    if let Some((_, p, e)) =
                        first_divergence(&trace_of(&want.layers[l]), &trace_of(x), cfg.dim)
                    {
                        first = Some(format!(
                            "{name}: sequence {s}, position {p}, layer {l}, element {e}"
                        ));
                    }
                }
            }
            differing += got.layers.len().abs_diff(want.layers.len()) as u64;
            logits += want.logits.len();
            let dl = count_differing(&got.logits, &want.logits);
            differing += dl;
            if first.is_none() && dl > 0 {
                first = Some(format!("{name}: sequence {s}, logits"));
            }
        }
    }
    let mut served_rows = 0usize;
    for (name, _, got, _) in &served {
        for (s, pos, x) in got {
            let want = &solo[*s].logits[pos * cfg.vocab..(pos + 1) * cfg.vocab];
            let d = count_differing(x, want);
            served_rows += 1;
            logits += want.len();
            differing += d;
            if first.is_none() && d > 0 {
                first = Some(format!("{name}: sequence {s}, position {pos}, logits"));
            }
        }
    }
    println!();
    println!("| path | time | what |");
    println!("|---|---:|---|");
    for (name, secs, _, _) in &paths {
        println!(
            "| {name} | {} | the schedule through one paged session |",
            fmt_secs(*secs)
        );
    }
    for (name, secs, got, graphs) in &served {
        println!(
            "| {name} | {} | the schedule as a server calls it, no trace (each sequence's last \
             row a step): {} rows of logits{graphs} |",
            fmt_secs(*secs),
            got.len()
        );
    }
    println!(
        "| cpu (solo) | {} | every sequence alone, one token at a time |",
        fmt_secs(t_solo)
    );
    println!();
    let reused = paths[0].3;
    let served_note = match served.len() {
        0 => String::new(),
        k => format!("; {served_rows} served last rows over {k} paths"),
    };
    println!(
        "compared against each sequence alone: {hidden} hidden-state elements and {logits} \
         logits ({} traced paths x {} sequences{served_note}); pages freed and reused by another \
         sequence: {reused}; differing: {differing}",
        paths.len(),
        seqs.len()
    );
    let gpu_note = gpu_note.unwrap_or_default();
    let exact = differing == 0 && first.is_none();
    match &first {
        None if exact => {
            println!("result: BIT-EXACT (every sequence batched == alone, every path)")
        }
        None => println!("result: {differing} differing"),
        Some(f) => println!("result: DIFFERS, first at {f}"),
    }
    a.run.write_json(|| Report {
        mode: "batch",
        preset: a.preset.clone(),
        format: a.format.to_string(),
        seed: a.seed,
        sequences: seqs.len(),
        tokens: counts.rows,
        pages,
        steps: counts.steps,
        mixed_steps: counts.mixed_steps,
        max_batch: counts.max_batch,
        pages_reused: reused,
        hidden_elements: hidden,
        logits,
        differing,
        first_divergence: first.clone(),
        gpu_note: gpu_note.clone(),
        order: a.order.name(),
        bit_exact: exact,
    })?;
    Ok(exact)
}

/// Elements whose bits differ, a length mismatch counting every missing element.
fn count_differing(a: &[f32], b: &[f32]) -> u64 {
    let d = a
        .iter()
        .zip(b)
        .filter(|(x, y)| x.to_bits() != y.to_bits())
        .count();
    (d + a.len().abs_diff(b.len())) as u64
}

/// One layer's rows as a one-layer trace, for [`first_divergence`].
fn trace_of(rows: &[f32]) -> Trace {
    Trace {
        layers: vec![rows.to_vec()],
        logits: Vec::new(),
    }
}

/// A served step's row: the sequence's index, its last row's position, that row's logits.
type ServedRow = (usize, usize, Vec<f32>);

/// `schedule` through `d` as a server calls it ([`BatchDecoder::step_each`], no trace: on the
/// device, decode steps replay step graphs): per step and sequence in it, the sequence's
/// index, its last row's position and that row's logits.
fn serve(
    d: &mut impl BatchDecoder,
    schedule: &Schedule,
    streams: &[Vec<u32>],
) -> Result<Vec<ServedRow>> {
    let mut ids: Vec<Option<SeqId>> = vec![None; streams.len()];
    let mut fed = vec![0usize; streams.len()];
    let mut out = Vec::new();
    for step in &schedule.steps {
        for &s in &step.arrive {
            ids[s] = Some(d.add()?);
        }
        let mut batch = Vec::with_capacity(step.rows.len());
        for &s in &step.rows {
            let Some(seq) = ids[s] else {
                bail!("sequence {s} fed before it arrived")
            };
            batch.push(BatchToken {
                seq,
                pos: fed[s] as u32,
                token: streams[s][fed[s]],
            });
            fed[s] += 1;
        }
        d.step_each(&batch, &mut |seq, logits| {
            let s = ids
                .iter()
                .position(|&i| i == Some(seq))
                .expect("a live sequence");
            out.push((s, fed[s] - 1, logits.to_vec()));
            Ok(())
        })?;
        for &s in &step.leave {
            let Some(seq) = ids[s].take() else {
                bail!("sequence {s} leaves twice")
            };
            d.remove(seq)?;
        }
    }
    Ok(out)
}
