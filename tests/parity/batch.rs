//! Many sequences in one batch, each bit-identical to running alone: random serving schedules
//! (arrivals, prompt chunks mixed with decode tokens, interleaved rows, pages freed and reused)
//! through the batched session, every sequence's hidden states and logits against its solo
//! run one token at a time: the CPU reference, and the device session (`gpu_*`).

use bitexact::model::batch::OnDevice;
use bitexact::model::schedule::drive;
use bitexact::model::{
    first_divergence, prompt, BatchSession, BatchToken, CpuBatchSession, CpuSession, GpuModel,
    ModelConfig, ModelWeights, Schedule, ScheduleCounts, SeqSpec, Trace, PAGE,
};
use bitexact::quant::WeightFormat;
use bitexact::reference::batch::run_schedule;
use bitexact::spec::serve::{generate_batched, BatchDecoder, Request, ServeLimits};
use bitexact::Error;
use proptest::prelude::*;

use crate::common::{assert_bits_eq, gpu};

fn solo(w: &ModelWeights, tokens: &[u32]) -> Trace {
    let mut s = CpuSession::new(w);
    let mut t = Trace::default();
    s.run(tokens, &mut t).unwrap();
    t
}

/// Sequence `s`'s tokens: a prompt of its own.
fn streams(cfg: &ModelConfig, seqs: &[SeqSpec], seed: u64) -> Vec<Vec<u32>> {
    seqs.iter()
        .enumerate()
        .map(|(i, s)| {
            prompt(
                seed.wrapping_mul(1000).wrapping_add(i as u64),
                s.len,
                cfg.vocab,
            )
        })
        .collect()
}

/// Runs `schedule` batched and every sequence alone; panics naming the first divergence
/// (sequence, position, layer) if any bit differs.
fn check(w: &ModelWeights, schedule: &Schedule, streams: &[Vec<u32>]) -> usize {
    let (got, reused) = run_schedule(w, schedule, streams).unwrap();
    same_as_solo(w, &got, streams);
    reused
}

/// Every sequence's trace against its solo CPU run; panics naming the first divergence.
fn same_as_solo(w: &ModelWeights, got: &[Trace], streams: &[Vec<u32>]) {
    for (s, (t, toks)) in got.iter().zip(streams).enumerate() {
        let want = solo(w, toks);
        if let Some((l, p, e)) = first_divergence(&want, t, w.cfg.dim) {
            panic!("sequence {s} first differs at position {p}, layer {l}, element {e}");
        }
        assert_eq!(t.layers.len(), want.layers.len(), "sequence {s}: layers");
        for (l, (a, b)) in t.layers.iter().zip(&want.layers).enumerate() {
            assert_eq!(a.len(), b.len(), "sequence {s} layer {l}: rows");
        }
        assert_bits_eq(&format!("sequence {s}: logits"), &t.logits, &want.logits);
    }
}

/// The twelve sequences of the fixed schedules: lengths 30..140, prompts 1..40.
fn twelve() -> Vec<SeqSpec> {
    (0..12)
        .map(|i| SeqSpec {
            len: 30 + (41 * i) % 110,
            prompt: 1 + (17 * i) % 40,
        })
        .collect()
}

/// The first schedule of `seqs` from seed 13 that batches 8 sequences at once, mixes prompt
/// chunks with decode tokens and reuses pages (the oracle's rule), and its counts.
fn mixing_schedule(seqs: &[SeqSpec]) -> (Schedule, ScheduleCounts) {
    (13u64..)
        .map(|seed| {
            let s = Schedule::random(seed, seqs, 16, 10, 24).unwrap();
            let c = s.counts();
            (s, c)
        })
        .find(|(_, c)| c.max_batch >= 8 && c.mixed_steps > 0 && c.pages_reused > 0)
        .unwrap()
}

fn tiny(name: &str, fmt: WeightFormat, seed: u64) -> ModelWeights {
    let cfg = ModelConfig::preset(name, fmt).unwrap();
    ModelWeights::generate(&cfg, seed, None).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// Any schedule: 1..=9 sequences of 1..=140 tokens (prompts of 1..=len), a pool from just
    /// enough for the longest to enough for all, up to 6 live at once, chunks up to 1..=24.
    #[test]
    fn every_schedule_equals_solo(
        hybrid in any::<bool>(),
        specs in prop::collection::vec((1usize..=140, 1usize..=140), 1..=9),
        extra_pages in 0usize..=8, max_live in 1usize..=6, max_chunk in 1usize..=24,
        seed in any::<u64>(),
    ) {
        let name = if hybrid { "tiny-hybrid" } else { "tiny" };
        let w = tiny(name, WeightFormat::F32, 3);
        let seqs: Vec<SeqSpec> = specs
            .iter()
            .map(|&(len, p)| SeqSpec { len, prompt: p.min(len) })
            .collect();
        let n_pages = seqs.iter().map(|s| s.len.div_ceil(PAGE)).max().unwrap() + extra_pages;
        let schedule = Schedule::random(seed, &seqs, n_pages, max_live, max_chunk).unwrap();
        check(&w, &schedule, &streams(&w.cfg, &seqs, seed));
    }
}

/// A fixed schedule that shows what the property covers: 12 sequences, at least 8 in one step,
/// steps mixing prompt chunks with decode tokens, pages freed and handed to later sequences;
/// Q8_0 experts, and the hybrid model (per-sequence DeltaNet states).
#[test]
fn twelve_sequences_mix_and_reuse_pages() {
    let seqs = twelve();
    for (name, fmt) in [
        ("tiny", WeightFormat::Q8_0),
        ("tiny-hybrid", WeightFormat::F32),
    ] {
        let w = tiny(name, fmt, 5);
        let schedule = Schedule::random(11, &seqs, 14, 10, 16).unwrap();
        let c = schedule.counts();
        assert!(
            c.max_batch >= 8 && c.mixed_steps > 0 && c.pages_reused > 0,
            "the schedule exercises too little: {c:?}"
        );
        let reused = check(&w, &schedule, &streams(&w.cfg, &seqs, 2));
        assert!(reused > 0, "no page was reused");
        assert_eq!(reused, c.pages_reused, "the replayed page count");
    }
}

/// The exact integer orders (issue 31: attention's chosen slices and exact matrix products)
/// keep the property: the same schedule of twelve sequences, every sequence's bits those of
/// its solo run one token at a time in the same orders, on Q4_0 and Q8_0 experts and the
/// hybrid model; and the orders are not the f32 ones (the logits differ).
#[test]
fn exact_orders_twelve_sequences_equal_solo() {
    use bitexact::reference::attention::{AttnOrder, IntSlices};
    use bitexact::reference::batch::run_schedule_with;
    use bitexact::reference::gemm::GemmOrder;
    let (attn, gemm) = (AttnOrder::exact(IntSlices::CHOSEN), GemmOrder::Exact);
    let seqs = twelve();
    for (name, fmt) in [
        ("tiny", WeightFormat::Q4_0),
        ("tiny", WeightFormat::Q8_0),
        ("tiny-hybrid", WeightFormat::F32),
    ] {
        let w = tiny(name, fmt, 5);
        let schedule = Schedule::random(11, &seqs, 14, 10, 16).unwrap();
        let streams = streams(&w.cfg, &seqs, 2);
        let (got, _) = run_schedule_with(&w, &schedule, &streams, attn, gemm).unwrap();
        for (s, (t, toks)) in got.iter().zip(&streams).enumerate() {
            let mut one = CpuSession::new(&w);
            one.set_orders(attn, gemm);
            let mut want = Trace::default();
            one.run(toks, &mut want).unwrap();
            if let Some((l, p, e)) = first_divergence(&want, t, w.cfg.dim) {
                panic!("{name} {fmt}: sequence {s} first differs at position {p}, layer {l}, element {e}");
            }
            assert_bits_eq(
                &format!("{name} {fmt} sequence {s}"),
                &t.logits,
                &want.logits,
            );
            if s == 0 {
                let f32_orders = solo(&w, toks);
                assert!(
                    f32_orders
                        .logits
                        .iter()
                        .zip(&want.logits)
                        .any(|(a, b)| a.to_bits() != b.to_bits()),
                    "{name} {fmt}: the exact orders gave the f32 orders' logits"
                );
            }
        }
    }
}

/// Expert parallel on the CPU (issue 18): the routed experts dealt over P = 1..4 virtual
/// ranks (contiguous and strided), rows exchanged through the loopback transport (which
/// delivers in a shuffled order), each sequence's rows on its home rank: every sequence of the
/// twelve-sequence schedule gives its solo bits, on Q8_0 experts and the hybrid model.
#[test]
fn expert_parallel_equals_one_rank() {
    use bitexact::model::schedule::drive;
    use bitexact::reference::expert_parallel::ExpertParallel;
    use bitexact::spec::exchange::{ExpertPartition, Loopback};
    let seqs = twelve();
    for (name, fmt) in [
        ("tiny", WeightFormat::Q8_0),
        ("tiny-hybrid", WeightFormat::F32),
    ] {
        let w = tiny(name, fmt, 5);
        let schedule = Schedule::random(11, &seqs, 14, 10, 16).unwrap();
        let streams = streams(&w.cfg, &seqs, 2);
        let alone: Vec<Trace> = streams.iter().map(|t| solo(&w, t)).collect();
        for ranks in 1..=4 {
            for part in [ExpertPartition::Contiguous, ExpertPartition::Strided] {
                let ep = ExpertParallel::new(
                    &w,
                    part,
                    Box::new(Loopback::new(ranks, ranks as u64).unwrap()),
                )
                .unwrap();
                let mut s = CpuBatchSession::new(&w, schedule.n_pages).unwrap();
                s.set_expert_parallel(ep).unwrap();
                let (got, _) = drive(&mut s, &schedule, &streams, w.cfg.dim, w.cfg.vocab).unwrap();
                for (i, (g, want)) in got.iter().zip(&alone).enumerate() {
                    if let Some((l, p, e)) = first_divergence(want, g, w.cfg.dim) {
                        panic!("{name} P={ranks} {part:?}: sequence {i} first differs at position {p}, layer {l}, element {e}");
                    }
                    assert_bits_eq(
                        &format!("{name} P={ranks} sequence {i}"),
                        &g.logits,
                        &want.logits,
                    );
                }
                let ep = s.expert_parallel().unwrap();
                let t = &ep.traffic()[0];
                if ranks > 1 {
                    // Rows crossed between ranks, both ways, and no rank holds every expert.
                    assert!(
                        t.dispatch.sent.iter().all(|&r| r > 0),
                        "{name} P={ranks} {part:?}: {t:?}"
                    );
                    assert_eq!(t.dispatch.sent, t.combine.received);
                    assert!((0..ranks).all(|r| ep.shard(0, r).experts.len() < w.cfg.moe.n_experts));
                } else {
                    assert_eq!(t.dispatch.bytes, 0);
                }
            }
        }
    }
}

/// Refused rows: an unknown or removed sequence, a position that skips ahead or repeats, a
/// batch over the free pages, a token past the vocabulary. Each is a typed error that changes
/// nothing: the other sequences' next steps still give their solo bits.
#[test]
fn bad_batches_leave_every_sequence_untouched() {
    let w = tiny("tiny", WeightFormat::F32, 1);
    let vocab = w.cfg.vocab as u32;
    let (ta, tb) = (prompt(1, 140, w.cfg.vocab), prompt(2, 140, w.cfg.vocab));
    let mut s = CpuBatchSession::new(&w, 3).unwrap();
    let (a, b) = (s.add_sequence(), s.add_sequence());
    let gone = s.add_sequence();
    s.remove_sequence(gone).unwrap();
    let row = |seq, pos: usize, toks: &[u32]| BatchToken {
        seq,
        pos: pos as u32,
        token: toks[pos],
    };
    let mut got_a = Trace::default();
    let mut got_b = Trace::default();
    // a takes 65 tokens (two pages), b one: one page left.
    let first: Vec<_> = (0..65).map(|p| row(a, p, &ta)).collect();
    s.forward(&first, &mut got_a).unwrap();
    s.forward(&[row(b, 0, &tb)], &mut got_b).unwrap();
    let bad: Vec<Vec<BatchToken>> = vec![
        vec![row(b, 1, &tb), row(gone, 0, &tb)],
        vec![row(b, 2, &tb)],
        vec![row(b, 1, &tb), row(b, 1, &tb)],
        vec![
            row(a, 65, &ta),
            BatchToken {
                seq: b,
                pos: 1,
                token: vocab,
            },
        ],
        // b needs a page at position 64 and another at 128: more than the one free page.
        (1..130).map(|p| row(b, p, &tb)).collect(),
    ];
    for batch in &bad {
        let mut t = Trace::default();
        let e = s.forward(batch, &mut t).unwrap_err();
        assert!(
            matches!(
                e,
                Error::InvalidArgument { .. } | Error::IndexOutOfRange { .. }
            ),
            "{e}"
        );
        assert!(
            t.layers.is_empty() && t.logits.is_empty(),
            "a refused batch wrote"
        );
    }
    assert_eq!(s.sequences().len(a).unwrap(), 65);
    assert_eq!(s.sequences().len(b).unwrap(), 1);
    assert_eq!(s.sequences().free_pages(), 0);
    // Both continue as if nothing had been tried.
    let next: Vec<_> = (65..70)
        .map(|p| row(a, p, &ta))
        .zip((1..6).map(|p| row(b, p, &tb)))
        .flat_map(|(x, y)| [x, y])
        .collect();
    let mut t = Trace::default();
    s.forward(&next, &mut t).unwrap();
    let vocab = w.cfg.vocab;
    for (i, r) in next.iter().enumerate() {
        let g = if r.seq == a { &mut got_a } else { &mut got_b };
        g.logits
            .extend_from_slice(&t.logits[i * vocab..(i + 1) * vocab]);
    }
    assert_bits_eq("a", &got_a.logits, &solo(&w, &ta[..70]).logits);
    assert_bits_eq("b", &got_b.logits, &solo(&w, &tb[..6]).logits);
}

/// Requests of 1 to 75 prompt tokens, 0 to 13 to draw, each its own sampling sequence.
fn requests(vocab: usize) -> Vec<Request> {
    (0..7)
        .map(|i| Request {
            prompt: prompt(50 + i as u64, 1 + (37 * i) % 75, vocab),
            max_tokens: (5 * i) % 14,
            sequence: 100 + i as u64,
        })
        .collect()
}

/// Every request's tokens from `generate_batched` against `generate_stream` alone on the CPU
/// (greedy and sampled; an end token rule that stops some early).
fn batched_generation_equals_solo(
    w: &ModelWeights,
    d: &mut dyn BatchDecoder,
    limits: &ServeLimits,
) {
    use bitexact::sample::{generate_stream, Sampling};
    let reqs = requests(w.cfg.vocab);
    let is_end = |t: u32| t % 23 == 0;
    for params in [
        Sampling::default(),
        Sampling {
            temperature: 0.9,
            top_k: 20,
            top_p: 0.9,
            seed: 4,
        },
    ] {
        let got = generate_batched(d, &reqs, &params, limits, &is_end).unwrap();
        for (r, req) in reqs.iter().enumerate() {
            let alone = generate_stream(
                &mut CpuSession::new(w),
                &req.prompt,
                req.max_tokens,
                &params,
                req.sequence,
                false,
                |t| !is_end(t),
            )
            .unwrap();
            assert_eq!(got[r], alone.tokens, "request {r}, {params:?}, {limits:?}");
        }
    }
}

/// Sampling in a batch (`generate_batched`, continuous batching: requests join as others
/// leave, decode rows beside prompt chunks): each request draws from its own logits with a
/// stream that depends on (seed, sequence, step) alone, so its completion is the one it gets
/// alone, whatever it was batched with, for any limits; attention and hybrid models.
#[test]
fn sampled_completions_do_not_depend_on_the_batch() {
    for name in ["tiny", "tiny-hybrid"] {
        let w = tiny(name, WeightFormat::F32, 9);
        for limits in [
            ServeLimits {
                max_live: 3,
                max_rows: 20,
                chunk: 7,
            },
            ServeLimits {
                max_live: 7,
                max_rows: 300,
                chunk: 64,
            },
            ServeLimits {
                max_live: 1,
                max_rows: 2,
                chunk: 1,
            },
        ] {
            let mut s = CpuBatchSession::new(&w, 24).unwrap();
            batched_generation_equals_solo(&w, &mut s, &limits);
        }
    }
}

/// The device session on serving schedules: every sequence's layers and logits equal its solo
/// run (the CPU reference) for the attention model (F32 and Q8_0 experts, and `small`'s wider
/// heads) and the hybrid model; chunks of 17 to 24 rows take the paged tile kernel, shorter
/// ones and decode rows the paged split kernel, and pages are freed and reused.
#[test]
fn gpu_schedules_equal_solo() {
    let Some(dev) = gpu() else { return };
    let seqs: Vec<SeqSpec> = (0..12)
        .map(|i| SeqSpec {
            len: 30 + (41 * i) % 110,
            prompt: (1 + (17 * i) % 60).min(30 + (41 * i) % 110),
        })
        .collect();
    for (name, fmt) in [
        ("tiny", WeightFormat::F32),
        ("tiny", WeightFormat::Q8_0),
        ("tiny-hybrid", WeightFormat::F32),
        ("small", WeightFormat::Q8_0),
    ] {
        let w = tiny(name, fmt, 5);
        let model = GpuModel::load(dev, &w).unwrap();
        let (schedule, c) = mixing_schedule(&seqs);
        assert!(
            c.max_batch >= 8 && c.mixed_steps > 0 && c.pages_reused > 0,
            "{c:?}"
        );
        let mut session = BatchSession::new(dev, &model, schedule.n_pages).unwrap();
        let streams = streams(&w.cfg, &seqs, 3);
        let mut runner = OnDevice {
            dev,
            session: &mut session,
        };
        let (got, reused) =
            drive(&mut runner, &schedule, &streams, w.cfg.dim, w.cfg.vocab).unwrap();
        assert_eq!(reused, c.pages_reused, "{name} {fmt}: pages reused");
        same_as_solo(&w, &got, &streams);
    }
}

/// The chunked scan order in the batched sessions (`set_scan_order`): a twelve-sequence
/// schedule on the hybrid model (sequences up to 139 tokens: chunk boundaries of 64 crossed in
/// prompt chunks and in decode rows) gives every sequence the bits of its solo run in the chunked
/// order, on the CPU reference and on the device; the order is refused once a sequence has
/// joined.
#[test]
fn chunked_order_schedules_equal_solo() {
    use bitexact::reference::model::ScanOrder;
    let w = tiny("tiny-hybrid", WeightFormat::F32, 5);
    let seqs = twelve();
    let streams = streams(&w.cfg, &seqs, 3);
    let (schedule, c) = mixing_schedule(&seqs);
    let solo_chunked = |toks: &[u32]| {
        let mut s = CpuSession::new(&w);
        s.set_scan_order(ScanOrder::Chunked).unwrap();
        let mut t = Trace::default();
        s.run(toks, &mut t).unwrap();
        t
    };
    let same = |got: &[Trace], what: &str| {
        for (i, (t, toks)) in got.iter().zip(&streams).enumerate() {
            let want = solo_chunked(toks);
            if let Some((l, p, e)) = first_divergence(&want, t, w.cfg.dim) {
                panic!(
                    "{what}: sequence {i} first differs at position {p}, layer {l}, element {e}"
                );
            }
            assert_bits_eq(
                &format!("{what}: sequence {i}: logits"),
                &t.logits,
                &want.logits,
            );
        }
    };
    let mut cpu = CpuBatchSession::new(&w, schedule.n_pages).unwrap();
    cpu.set_scan_order(ScanOrder::Chunked).unwrap();
    let (got, reused) = drive(&mut cpu, &schedule, &streams, w.cfg.dim, w.cfg.vocab).unwrap();
    assert_eq!(reused, c.pages_reused);
    same(&got, "cpu batched, chunked order");
    // The recurrence's solo bits differ (another order).
    assert_ne!(
        solo(&w, &streams[0]).logits,
        solo_chunked(&streams[0]).logits
    );
    let mut late = CpuBatchSession::new(&w, 4).unwrap();
    late.add_sequence();
    assert!(matches!(
        late.set_scan_order(ScanOrder::Chunked),
        Err(Error::InvalidArgument { .. })
    ));
    let Some(dev) = gpu() else { return };
    let model = GpuModel::load(dev, &w).unwrap();
    let mut session = BatchSession::new(dev, &model, schedule.n_pages).unwrap();
    session.set_scan_order(ScanOrder::Chunked).unwrap();
    let mut runner = OnDevice {
        dev,
        session: &mut session,
    };
    let (got, _) = drive(&mut runner, &schedule, &streams, w.cfg.dim, w.cfg.vocab).unwrap();
    same(&got, "gpu batched, chunked order");
    let mut late = BatchSession::new(dev, &model, 4).unwrap();
    late.add_sequence(dev).unwrap();
    assert!(matches!(
        late.set_scan_order(ScanOrder::Chunked),
        Err(Error::InvalidArgument { .. })
    ));
}

/// Without a trace the device session returns each sequence's last-row logits, in order of
/// first appearance: the CPU's bits; a refused batch (an unknown sequence, a skipped
/// position) writes nothing and the next step still gives the solo bits.
#[test]
fn gpu_last_rows_and_refusals() {
    let Some(dev) = gpu() else { return };
    let w = tiny("tiny", WeightFormat::F32, 2);
    let model = GpuModel::load(dev, &w).unwrap();
    let v = w.cfg.vocab;
    let (ta, tb) = (prompt(5, 40, v), prompt(6, 150, v));
    let mut s = BatchSession::new(dev, &model, 6).unwrap();
    let (a, b) = (s.add_sequence(dev).unwrap(), s.add_sequence(dev).unwrap());
    let row = |seq, pos: usize, toks: &[u32]| BatchToken {
        seq,
        pos: pos as u32,
        token: toks[pos],
    };
    // A sequence that comes and goes first, so that b's pages are not the pool's first.
    s.forward(dev, &[row(a, 0, &ta)], None).unwrap(); // page 0
    let early = s.add_sequence(dev).unwrap();
    s.forward(dev, &[row(early, 0, &ta)], None).unwrap(); // page 1, freed next
    s.remove_sequence(early).unwrap();
    // b's prompt of 130 (the tile kernel over three pages, the first a reused one), a's next
    // two, interleaved.
    let mut first: Vec<BatchToken> = (0..130).map(|p| row(b, p, &tb)).collect();
    first.insert(5, row(a, 1, &ta));
    first.insert(90, row(a, 2, &ta));
    let got = s.forward(dev, &first, None).unwrap();
    assert_eq!(
        s.sequences().table(b).unwrap(),
        &[1, 2, 3],
        "b starts on a reused page"
    );
    let alone = |t: &[u32]| solo(&w, t).logits[(t.len() - 1) * v..].to_vec();
    assert_eq!(got.iter().map(|(q, _)| *q).collect::<Vec<_>>(), vec![b, a]);
    assert_bits_eq("b after 130", &got[0].1, &alone(&tb[..130]));
    assert_bits_eq("a after 3", &got[1].1, &alone(&ta[..3]));
    let gone = s.add_sequence(dev).unwrap();
    s.remove_sequence(gone).unwrap();
    for bad in [
        vec![row(a, 3, &ta), row(gone, 0, &ta)],
        vec![row(b, 131, &tb)],
    ] {
        assert!(s.forward(dev, &bad, None).is_err());
    }
    // The serving call: the same bits, borrowed from the session's stage.
    let got = s.step(dev, &[row(a, 3, &ta), row(b, 130, &tb)]).unwrap();
    assert_eq!(got.sequences(), &[a, b]);
    assert_bits_eq("a after 4", got.logits(0), &alone(&ta[..4]));
    assert_bits_eq("b after 131", got.get(b).unwrap(), &alone(&tb[..131]));
    assert!(got.get(gone).is_none());
    let got = s.step(dev, &[row(b, 131, &tb)]).unwrap();
    assert_eq!(got.len(), 1);
    assert_bits_eq("b after 132", got.logits(0), &alone(&tb[..132]));
}

/// One decode step of the sequences `ids[i]` for `i` in `which`, each at its length `len[i]`
/// with its next token from `streams[i]` (the lengths advanced): each row's logits.
fn decode_step(
    dev: &bitexact::Device,
    s: &mut BatchSession<'_>,
    ids: &[bitexact::model::SeqId],
    which: &[usize],
    len: &mut [usize],
    streams: &[Vec<u32>],
) -> Vec<Vec<f32>> {
    let batch: Vec<BatchToken> = which
        .iter()
        .map(|&i| BatchToken {
            seq: ids[i],
            pos: len[i] as u32,
            token: streams[i][len[i]],
        })
        .collect();
    let got = s.step(dev, &batch).unwrap();
    for &i in which {
        len[i] += 1;
    }
    got.iter().map(|(_, l)| l.to_vec()).collect()
}

/// Decode steps replayed from a captured step graph give the eager steps' bits (and so the
/// CPU's): sequences prefilled eagerly, then decode steps through positions 63-64 and 127-128
/// (the graph's chunks cross a power of two: one eager step, then captured), a sequence
/// leaving and another joining at the same row count (the attention-only graph carries on
/// with the newcomer's tables; the hybrid's names its sequences: captured again), then one
/// leaving (fewer rows: captured again), on the attention-only and the hybrid model, F32 and
/// Q8_0.
#[test]
fn gpu_decode_graphs_equal_eager_steps() {
    let Some(dev) = gpu() else { return };
    for (name, fmt) in [
        ("tiny", WeightFormat::F32),
        ("tiny", WeightFormat::Q8_0),
        ("tiny-hybrid", WeightFormat::F32),
    ] {
        let w = tiny(name, fmt, 9);
        let model = GpuModel::load(dev, &w).unwrap();
        let v = w.cfg.vocab;
        let streams: Vec<Vec<u32>> = (0..5).map(|i| prompt(40 + i, 150, v)).collect();
        let run = |graphs: bool| {
            let mut s = BatchSession::new(dev, &model, 24).unwrap();
            s.set_graphs(graphs);
            let mut ids: Vec<_> = (0..4).map(|_| s.add_sequence(dev).unwrap()).collect();
            let mut len = [0usize; 5];
            let mut out = Vec::new();
            // Prompts of 50, 60, 61 and 62 tokens (eager: many rows a sequence).
            for (i, &id) in ids.iter().enumerate() {
                let p = [50, 60, 61, 62][i];
                let rows: Vec<BatchToken> = (0..p)
                    .map(|pos| BatchToken {
                        seq: id,
                        pos: pos as u32,
                        token: streams[i][pos],
                    })
                    .collect();
                s.step(dev, &rows).unwrap();
                len[i] = p;
            }
            let mut which: Vec<usize> = (0..4).collect();
            for step in 0..80 {
                if step == 30 {
                    // Sequence 1 leaves, 4 joins with a one-token prompt (a one-row step).
                    s.remove_sequence(ids[1]).unwrap();
                    ids.push(s.add_sequence(dev).unwrap());
                    which = vec![0, 2, 3, 4];
                }
                if step == 50 {
                    s.remove_sequence(ids[0]).unwrap();
                    which = vec![2, 3, 4];
                }
                out.push(decode_step(dev, &mut s, &ids, &which, &mut len, &streams));
            }
            (out, s.stats().clone())
        };
        let (eager, es) = run(false);
        let (graphed, gs) = run(true);
        assert_eq!(es.graph_replays, 0);
        assert_eq!(gs.graph_error, None, "{name} {fmt}");
        assert!(gs.graph_replays >= 75, "{name} {fmt}: {gs:?}");
        assert!(gs.captures >= 4, "{name} {fmt}: {gs:?}");
        for (step, (a, b)) in eager.iter().zip(&graphed).enumerate() {
            for (r, (x, y)) in a.iter().zip(b).enumerate() {
                assert_bits_eq(&format!("{name} {fmt} step {step} row {r}"), y, x);
            }
        }
    }
}

/// The session's graph cache: a decode shape is captured on its second step in a row, so
/// row counts that alternate from step to step run eagerly; once both are captured they
/// alternate as replays with no new capture; a third and a fourth shape join the cache, a
/// fifth drops the least recently replayed. Every step's bits are the eager steps'.
#[test]
fn gpu_graph_cache_captures_repeated_shapes() {
    let Some(dev) = gpu() else { return };
    let w = tiny("tiny", WeightFormat::Q8_0, 9);
    let model = GpuModel::load(dev, &w).unwrap();
    let v = w.cfg.vocab;
    let streams: Vec<Vec<u32>> = (0..5).map(|i| prompt(60 + i, 80, v)).collect();
    // Rows per step: alternating 5 and 4, then 5, 5, 4, 4 (both captured), alternating
    // (replays), then 3, 3, 2, 2, 1, 1 (three more shapes: the cache drops 5 rows), then 5.
    let counts: Vec<usize> = [5, 4, 5, 4, 5, 5, 4, 4, 5, 4, 5, 4, 3, 3, 2, 2, 1, 1, 5].to_vec();
    let run = |graphs: bool| {
        let mut s = BatchSession::new(dev, &model, 16).unwrap();
        s.set_graphs(graphs);
        let ids: Vec<_> = (0..5).map(|_| s.add_sequence(dev).unwrap()).collect();
        let mut len = [0usize; 5];
        let mut out = Vec::new();
        let mut stats = Vec::new();
        for &k in &counts {
            let which: Vec<usize> = (0..k).collect();
            out.push(decode_step(dev, &mut s, &ids, &which, &mut len, &streams));
            stats.push((s.stats().captures, s.stats().graph_replays));
        }
        (out, stats)
    };
    let (eager, es) = run(false);
    let (graphed, gs) = run(true);
    assert!(es.iter().all(|&(c, r)| c == 0 && r == 0));
    // (captures, replays) after each step.
    let want = [
        (0, 0),
        (0, 0),
        (0, 0),
        (0, 0),
        (0, 0), // alternating: nothing captured
        (1, 1),
        (1, 1),
        (2, 2), // 5, 5 then 4, 4
        (2, 3),
        (2, 4),
        (2, 5),
        (2, 6), // alternating replays
        (2, 6),
        (3, 7),
        (3, 7),
        (4, 8),
        (4, 8),
        (5, 9), // 3, 2, 1 rows: 5 rows dropped
        (5, 9), // 5 rows again: eager (no longer kept)
    ];
    assert_eq!(gs, want);
    for (step, (a, b)) in eager.iter().zip(&graphed).enumerate() {
        for (r, (x, y)) in a.iter().zip(b).enumerate() {
            assert_bits_eq(&format!("step {step} row {r}"), y, x);
        }
    }
}

/// `generate_batched` through the device session: every request's tokens those it draws alone
/// on the CPU (attention and hybrid models, F32 and Q8_0), eagerly and with decode steps
/// replayed from graphs.
#[test]
fn gpu_batched_generation_equals_solo() {
    let Some(dev) = gpu() else { return };
    for (name, fmt) in [
        ("tiny", WeightFormat::F32),
        ("tiny", WeightFormat::Q8_0),
        ("tiny-hybrid", WeightFormat::F32),
    ] {
        let w = tiny(name, fmt, 9);
        let model = GpuModel::load(dev, &w).unwrap();
        for graphs in [false, true] {
            let mut session = BatchSession::new(dev, &model, 24).unwrap();
            session.set_graphs(graphs);
            let mut d = OnDevice {
                dev,
                session: &mut session,
            };
            batched_generation_equals_solo(
                &w,
                &mut d,
                &ServeLimits {
                    max_live: 4,
                    max_rows: 40,
                    chunk: 16,
                },
            );
            assert_eq!(session.stats().graph_error, None, "{name} {fmt}");
        }
    }
}
