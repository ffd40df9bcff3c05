//! The decoder: batched prefill == chunked prefill == sequential decode == CPU reference, bit
//! for bit at every layer and at the logits.

use bitexact::device::Device;
use bitexact::model::ModelConfig;
use bitexact::model::{
    first_divergence, prompt, CpuSession, GpuModel, ModelWeights, Session, Trace,
};
use bitexact::quant::{QuantMatrix, WeightFormat};
use bitexact::Error;

use crate::common::{assert_bits_eq, gpu};

fn cpu_run(w: &ModelWeights, tokens: &[u32], chunk: Option<usize>) -> Trace {
    let mut s = CpuSession::new(w);
    let mut t = Trace::default();
    match chunk {
        None => s.run(tokens, &mut t).unwrap(),
        Some(c) => {
            for step in tokens.chunks(c) {
                s.forward(step, &mut t).unwrap();
            }
        }
    }
    // The path really ran: every token, every layer.
    assert_eq!(s.position(), tokens.len());
    assert_eq!(t.layers.len(), w.layers.len());
    t
}

fn same(what: &str, a: &Trace, b: &Trace) {
    assert_eq!(a.layers.len(), b.layers.len(), "{what}: layers");
    for (l, (x, y)) in a.layers.iter().zip(&b.layers).enumerate() {
        assert_bits_eq(&format!("{what}: layer {l}"), y, x);
    }
    assert_bits_eq(&format!("{what}: logits"), &b.logits, &a.logits);
}

#[test]
fn cpu_batched_and_chunked_equal_sequential_tiny() {
    let cfg = ModelConfig::preset("tiny", WeightFormat::F32).unwrap();
    let w = ModelWeights::generate(&cfg, 3, None).unwrap();
    for n in [1, 2, 5, 17, 64] {
        let tokens = prompt(n as u64, n, cfg.vocab);
        let seq = cpu_run(&w, &tokens, None);
        for c in [n, 1, 3, 7, 16] {
            same(
                &format!("tiny n={n} chunk={c}"),
                &seq,
                &cpu_run(&w, &tokens, Some(c)),
            );
        }
    }
    // Q8_0 experts too.
    let cfg = ModelConfig::preset("tiny", WeightFormat::Q8_0).unwrap();
    let w = ModelWeights::generate(&cfg, 4, None).unwrap();
    let tokens = prompt(9, 23, cfg.vocab);
    same(
        "tiny Q8_0",
        &cpu_run(&w, &tokens, None),
        &cpu_run(&w, &tokens, Some(5)),
    );
}

#[test]
fn cpu_session_errors_are_typed() {
    let cfg = ModelConfig::preset("tiny", WeightFormat::F32).unwrap();
    let w = ModelWeights::generate(&cfg, 1, None).unwrap();
    let mut s = CpuSession::new(&w);
    let mut t = Trace::default();
    let e = s.forward(&[1, 2, 256], &mut t).unwrap_err();
    assert!(
        matches!(
            e,
            Error::IndexOutOfRange {
                what: "tokens",
                position: 2,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(s.position(), 0);
    let long = vec![0u32; cfg.max_context + 1];
    assert!(matches!(
        s.forward(&long, &mut t),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(t.layers.is_empty());
    assert!(matches!(
        ModelConfig::preset("tiny", WeightFormat::Q4K),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(ModelConfig::preset("huge", WeightFormat::F32).is_err());
}

fn gpu_run(dev: &bitexact::Device, model: &GpuModel, tokens: &[u32], chunk: usize) -> Trace {
    let mut s = Session::new(dev, model).unwrap();
    let mut t = Trace::default();
    for step in tokens.chunks(chunk) {
        s.forward(dev, step, Some(&mut t)).unwrap();
    }
    // The path really ran with the chunking it claims.
    let want: Vec<usize> = tokens.chunks(chunk).map(|c| c.len()).collect();
    assert_eq!(s.stats().calls, want);
    t
}

fn gpu_case(preset: &str, format: WeightFormat, n: usize, chunks: &[usize], seed: u64) {
    let Some(dev) = gpu() else { return };
    let cfg = ModelConfig::preset(preset, format).unwrap();
    let w = ModelWeights::generate(&cfg, seed, None).unwrap();
    let model = GpuModel::load(dev, &w).unwrap();
    let tokens = prompt(seed, n, cfg.vocab);
    let cpu = cpu_run(&w, &tokens, None);
    let seq = gpu_run(dev, &model, &tokens, 1);
    same(
        &format!("{preset} {format} n={n}: gpu decode vs cpu"),
        &cpu,
        &seq,
    );
    for &c in chunks {
        same(
            &format!("{preset} {format} n={n}: gpu chunk {c} vs decode"),
            &seq,
            &gpu_run(dev, &model, &tokens, c),
        );
    }
}

#[test]
fn gpu_tiny_every_path_equals_cpu() {
    for n in [1, 2, 9, 33, 64] {
        gpu_case("tiny", WeightFormat::F32, n, &[n, 3, 8], 10 + n as u64);
    }
    gpu_case("tiny", WeightFormat::Q8_0, 40, &[40, 7], 5);
}

#[test]
fn gpu_small_every_path_equals_cpu() {
    gpu_case("small", WeightFormat::F32, 24, &[24, 5], 1);
    gpu_case("small", WeightFormat::Q4K, 20, &[20, 9], 2);
    gpu_case("small", WeightFormat::Q6K, 12, &[12], 3);
    // Q8_0 at hidden 256: K a multiple of 256, so the prefill runs the cp.async GEMM, and 70
    // tokens take the device-sorted routing.
    gpu_case("small", WeightFormat::Q8_0, 70, &[70, 11], 4);
}

/// The v2 attention kernels (asynchronous tile and split, `Session::set_attention_v2`) in the
/// whole model: decode steps (eager and graph replays), a prefill of 150 tokens (three chunks)
/// and chunks of 17 give the CPU's bits at every layer and logit; so does the hybrid model's
/// gated attention.
#[test]
fn attention_v2_in_the_model_equals_cpu() {
    let Some(dev) = gpu() else { return };
    for (preset, fmt, seed) in [
        ("small", WeightFormat::Q8_0, 6u64),
        ("tiny-hybrid", WeightFormat::F32, 7),
    ] {
        let cfg = ModelConfig::preset(preset, fmt).unwrap();
        let w = ModelWeights::generate(&cfg, seed, None).unwrap();
        let model = GpuModel::load(dev, &w).unwrap();
        let tokens = prompt(seed, 150, cfg.vocab);
        let cpu = cpu_run(&w, &tokens, None);
        for chunk in [150, 17, 1] {
            let mut s = Session::new(dev, &model).unwrap();
            s.set_attention_v2(true);
            let mut t = Trace::default();
            for step in tokens.chunks(chunk) {
                s.forward(dev, step, Some(&mut t)).unwrap();
            }
            same(&format!("{preset} attention v2, chunk {chunk}"), &cpu, &t);
        }
        let vocab = cfg.vocab;
        let mut s = Session::new(dev, &model).unwrap();
        s.set_attention_v2(true);
        s.prefill(dev, &tokens[..100]).unwrap();
        for (i, &t) in tokens[100..].iter().enumerate() {
            s.decode(dev, t).unwrap();
            let at = 100 + i;
            assert_bits_eq(
                &format!("{preset} attention v2, graph decode at {at}"),
                &s.logits().unwrap(),
                &cpu.logits[at * vocab..(at + 1) * vocab],
            );
        }
        assert!(s.stats().graph_replays > 0, "decode ran as graph replays");
    }
}

#[test]
fn a_flipped_weight_bit_is_found_in_its_layer() {
    let Some(dev) = gpu() else { return };
    let cfg = ModelConfig::preset("small", WeightFormat::F32).unwrap();
    let w = ModelWeights::generate(&cfg, 7, None).unwrap();
    let tokens = prompt(7, 6, cfg.vocab);
    let cpu = cpu_run(&w, &tokens, None);
    for layer in [0, 2, 3] {
        let mut bad = w.clone();
        let a = bad.layers[layer].attention_mut().expect("attention layer");
        let mut bytes = a.wo.bytes().to_vec();
        bytes[4 * 37 + 2] ^= 0x10; // one mantissa bit of one weight
        a.wo = QuantMatrix::from_bytes(a.wo.format(), 1, a.wo.rows(), a.wo.cols(), bytes).unwrap();
        let model = GpuModel::load(dev, &bad).unwrap();
        let got = gpu_run(dev, &model, &tokens, 6);
        let (l, _, _) = first_divergence(&cpu, &got, cfg.dim).expect("a flipped bit must show");
        assert_eq!(l, layer, "the first divergence is in the flipped layer");
    }
}

/// Matrices of one layer in different formats, as a GGUF file may hold them (Wv and the experts'
/// up matrices in Q8_0 beside F32): the runner multiplies them apart (no stacked product) and
/// still gives the CPU reference's bits at every layer and for every token's logits.
#[test]
fn mixed_formats_in_one_layer_equal_cpu() {
    let Some(dev) = gpu() else { return };
    let cfg = ModelConfig::preset("tiny", WeightFormat::F32).unwrap();
    let mut w = ModelWeights::generate(&cfg, 11, None).unwrap();
    let requant = |m: &QuantMatrix| {
        QuantMatrix::quantize(
            WeightFormat::Q8_0,
            &m.dequantize(),
            m.experts(),
            m.rows(),
            m.cols(),
        )
        .unwrap()
    };
    for l in 0..2 {
        let a = w.layers[l].attention_mut().expect("attention layer");
        a.wv = requant(&a.wv);
        w.layers[l].moe.up = requant(&w.layers[l].moe.up);
    }
    let tokens = prompt(11, 40, cfg.vocab);
    let cpu = cpu_run(&w, &tokens, None);
    let model = GpuModel::load(dev, &w).unwrap();
    for chunk in [40, 7, 1] {
        let got = gpu_run(dev, &model, &tokens, chunk);
        assert!(
            first_divergence(&cpu, &got, cfg.dim).is_none(),
            "mixed formats, chunk {chunk}: {:?}",
            first_divergence(&cpu, &got, cfg.dim)
        );
        assert_bits_eq(&format!("logits, chunk {chunk}"), &got.logits, &cpu.logits);
    }
}

#[test]
fn session_errors_and_poisoning() {
    let Some(dev) = gpu() else { return };
    let mut cfg = ModelConfig::preset("tiny", WeightFormat::F32).unwrap();
    cfg.max_context = 60_000;
    let w = ModelWeights::generate(&cfg, 1, None).unwrap();
    let model = GpuModel::load(dev, &w).unwrap();
    let mut s = Session::new(dev, &model).unwrap();
    // Bad input: nothing taken.
    assert!(matches!(
        s.prefill(dev, &[3, 999]),
        Err(Error::IndexOutOfRange { .. })
    ));
    assert!(matches!(
        s.prefill(dev, &vec![1; 60_001]),
        Err(Error::InvalidArgument { .. })
    ));
    assert_eq!(s.position(), 0);
    s.prefill(dev, &[1, 2, 3]).unwrap();
    let l3 = s.logits().unwrap();
    // A launch that fails part-way (after the cache writes of layer 0): the session is poisoned.
    // The fault is armed on a device of this test's own, so that tests running beside it on
    // the shared device never see it.
    let own = bitexact::Device::new(0).unwrap();
    let model = GpuModel::load(&own, &w).unwrap();
    let mut s = Session::new(&own, &model).unwrap();
    let dev = &own;
    s.prefill(dev, &[1, 2, 3]).unwrap();
    assert_bits_eq("own device", &s.logits().unwrap(), &l3);
    dev.inject_launch_failure(Some(20));
    let e = s.prefill(dev, &[5; 40]).unwrap_err();
    assert!(matches!(e, Error::InjectedFault { .. }), "{e}");
    let e = s.decode(dev, 1).unwrap_err();
    assert!(e.to_string().contains("reset"), "{e}");
    s.reset();
    s.prefill(dev, &[1, 2, 3]).unwrap();
    assert_bits_eq("after reset", &s.logits().unwrap(), &l3);
    // A preset that does not fit is refused before anything is allocated.
    let mut huge = ModelConfig::preset("qwen3-30b-a3b", WeightFormat::Q8_0).unwrap();
    huge.max_context = 10_000_000;
    let e = GpuModel::generate(dev, &huge, 0, 1, |_| {})
        .err()
        .expect("does not fit");
    assert!(matches!(e, Error::OutOfMemory { .. }), "{e}");
}

#[test]
fn a_model_loaded_from_gguf_runs_bit_exact_on_the_gpu() {
    let Some(dev) = gpu() else { return };
    let cfg = ModelConfig::preset("tiny", WeightFormat::Q8_0).unwrap();
    let w = ModelWeights::generate(&cfg, 12, None).unwrap();
    let file = bitexact::gguf::GgufFile::parse(bitexact::model::gguf::export(&w).unwrap()).unwrap();
    let loaded = bitexact::model::gguf::load(&file, None, None).unwrap();
    let model = GpuModel::load(dev, &loaded).unwrap();
    let tokens = prompt(12, 30, cfg.vocab);
    let cpu = cpu_run(&w, &tokens, None);
    same(
        "gguf: gpu decode vs cpu on the generated weights",
        &cpu,
        &gpu_run(dev, &model, &tokens, 1),
    );
    same(
        "gguf: gpu prefill vs cpu",
        &cpu,
        &gpu_run(dev, &model, &tokens, 30),
    );
}

/// Decode steps replayed from the captured graph give the bits of eager steps and of the CPU
/// reference, at every step, across attention chunk boundaries; the graph path really ran.
#[test]
fn graph_decode_equals_eager_and_cpu() {
    let Some(dev) = gpu() else { return };
    for (preset, fmt, seed) in [
        ("tiny", WeightFormat::F32, 21u64),
        ("tiny", WeightFormat::Q8_0, 22),
        ("small", WeightFormat::Q4K, 23),
    ] {
        let cfg = ModelConfig::preset(preset, fmt).unwrap();
        let w = ModelWeights::generate(&cfg, seed, None).unwrap();
        let model = GpuModel::load(dev, &w).unwrap();
        let tokens = prompt(seed, 140, cfg.vocab);
        let cpu = cpu_run(&w, &tokens, None);
        let (pre, vocab) = (10, cfg.vocab);
        // Eager, a graph, and a graph whose launches overlap the kernel before them (a device
        // handle of its own with programmatic dependent launch on where the device has it):
        // scheduling never changes a bit.
        let overlapped = Device::new(0).unwrap();
        overlapped.set_launch_overlap(true);
        let mut steps = Vec::new();
        for (graphs, d) in [(false, dev), (true, dev), (true, &overlapped)] {
            let mut s = Session::new(d, &model).unwrap();
            s.set_graphs(graphs);
            s.prefill(d, &tokens[..pre]).unwrap();
            let mut logits = Vec::new();
            for &t in &tokens[pre..] {
                s.decode(d, t).unwrap();
                logits.push(s.logits().unwrap());
            }
            let st = s.stats();
            assert_eq!(st.graph_error, None, "{preset} {fmt}");
            let want = if graphs { tokens.len() - pre - 1 } else { 0 };
            assert_eq!(st.graph_replays, want, "{preset} {fmt}: graph replays");
            steps.push(logits);
        }
        for (i, (e, g)) in steps[0].iter().zip(&steps[1]).enumerate() {
            let at = pre + i;
            let what = format!("{preset} {fmt} step at position {at}");
            assert_bits_eq(&format!("{what}: graph vs eager"), g, e);
            assert_bits_eq(
                &format!("{what}: overlapped graph vs graph"),
                &steps[2][i],
                g,
            );
            assert_bits_eq(
                &format!("{what}: graph vs cpu"),
                g,
                &cpu.logits[at * vocab..(at + 1) * vocab],
            );
        }
    }
}

/// The hybrid decoder (Gated DeltaNet and gated attention layers) on the CPU reference: one
/// token at a time == the whole prompt at once == chunks of 3 and 7, at every layer and at the
/// logits, over 150 tokens (three attention chunks; the recurrent state carried across calls).
/// The GPU gives the same bits on every path (see below).
#[test]
fn hybrid_every_path_equals_cpu() {
    // Expert formats, and the attention / DeltaNet projections in Q8_0 too (pre-quantized
    // inputs of the four DeltaNet products, quantized Wo and ssm_out).
    for (fmt, attn) in [
        (WeightFormat::F32, WeightFormat::F32),
        (WeightFormat::Q8_0, WeightFormat::F32),
        (WeightFormat::Q8_0, WeightFormat::Q8_0),
    ] {
        let mut cfg = ModelConfig::preset("tiny-hybrid", fmt).unwrap();
        cfg.attn_format = attn;
        let fmt = format!("{fmt}/{attn}");
        assert!(!cfg.is_attention_layer(0) && cfg.is_attention_layer(1));
        let w = ModelWeights::generate(&cfg, 4, None).unwrap();
        let cpu_state_after = |n: usize| {
            let mut cs = CpuSession::new(&w);
            cs.run(&tokens_of(&cfg)[..n], &mut Trace::default())
                .unwrap();
            cs.recurrent_state()
        };
        let tokens = tokens_of(&cfg);
        let mut cs = CpuSession::new(&w);
        let mut seq = Trace::default();
        cs.run(&tokens, &mut seq).unwrap();
        let cpu_state = cs.recurrent_state();
        assert!(seq.logits.iter().all(|v| v.is_finite()));
        for chunk in [150, 3, 7] {
            same(
                &format!("hybrid {fmt} cpu chunk {chunk}"),
                &seq,
                &cpu_run(&w, &tokens, Some(chunk)),
            );
        }
        let Some(dev) = gpu() else { continue };
        // The GPU: one token at a time, the whole prompt, chunks of 3 and 7 (prefill and the
        // recurrent decode are one arithmetic), then decode steps as graph replays after a
        // prefill, and a reset session: the CPU's bits at every layer, at the logits and in the
        // recurrent state.
        let model = GpuModel::load(dev, &w).unwrap();
        for chunk in [1usize, 150, 3, 7] {
            let mut s = Session::new(dev, &model).unwrap();
            let mut t = Trace::default();
            for step in tokens.chunks(chunk) {
                s.forward(dev, step, Some(&mut t)).unwrap();
            }
            let what = format!("hybrid {fmt} gpu chunk {chunk}");
            same(&what, &seq, &t);
            assert_bits_eq(
                &format!("{what}: recurrent state"),
                &s.recurrent_state().unwrap(),
                &cpu_state,
            );
        }
        let vocab = cfg.vocab;
        let mut s = Session::new(dev, &model).unwrap();
        for round in 0..2 {
            s.prefill(dev, &tokens[..20]).unwrap();
            for (i, &t) in tokens[20..40].iter().enumerate() {
                s.decode(dev, t).unwrap();
                let at = 20 + i;
                assert_bits_eq(
                    &format!("hybrid {fmt} decode (round {round}) at {at}"),
                    &s.logits().unwrap(),
                    &seq.logits[at * vocab..(at + 1) * vocab],
                );
            }
            assert!(s.stats().graph_replays > 0, "decode ran as graph replays");
            assert_eq!(s.stats().graph_error, None);
            assert_bits_eq(
                &format!("hybrid {fmt} state after decode (round {round})"),
                &s.recurrent_state().unwrap(),
                &cpu_state_after(40),
            );
            s.reset();
        }
        // After the reset (round 1 began from it too): a prefill from a zeroed state.
        s.prefill(dev, &tokens[..20]).unwrap();
        assert_bits_eq(
            &format!("hybrid {fmt} state after reset and prefill"),
            &s.recurrent_state().unwrap(),
            &cpu_state_after(20),
        );
    }
}

/// The hybrid decoder in the chunked scan order (`Session::set_scan_order`): the CPU reference's
/// chunked order one token at a time == at once == in chunks of 7 (150 tokens: two chunk
/// boundaries of 64 crossed inside calls); the GPU's `delta_net_chunk_*` kernels give those bits
/// on every path, at every layer, at the logits and in the recurrent state (the chunk under way
/// included), through graph-replayed decode steps and after a reset. The order is refused once
/// a token has been taken.
#[test]
fn hybrid_chunked_order_equals_cpu() {
    use bitexact::reference::model::ScanOrder;
    let cfg = ModelConfig::preset("tiny-hybrid", WeightFormat::Q8_0).unwrap();
    let w = ModelWeights::generate(&cfg, 4, None).unwrap();
    let tokens = tokens_of(&cfg);
    let cpu = |n: usize, chunk: usize| {
        let mut cs = CpuSession::new(&w);
        cs.set_scan_order(ScanOrder::Chunked).unwrap();
        let mut t = Trace::default();
        for step in tokens[..n].chunks(chunk) {
            cs.forward(step, &mut t).unwrap();
        }
        (t, cs.recurrent_state())
    };
    let (seq, cpu_state) = cpu(tokens.len(), 1);
    for chunk in [150, 7] {
        let (t, st) = cpu(tokens.len(), chunk);
        same(&format!("chunked order, cpu chunk {chunk}"), &seq, &t);
        assert_bits_eq(
            &format!("chunked order, cpu chunk {chunk}: state"),
            &st,
            &cpu_state,
        );
    }
    // Another order than the recurrence's: the logits differ somewhere.
    let recurrence = cpu_run(&w, &tokens, None);
    assert_ne!(
        recurrence.logits, seq.logits,
        "the chunked order is another order"
    );
    let Some(dev) = gpu() else { return };
    let model = GpuModel::load(dev, &w).unwrap();
    for chunk in [1usize, 150, 7, 64] {
        let mut s = Session::new(dev, &model).unwrap();
        s.set_scan_order(dev, ScanOrder::Chunked).unwrap();
        assert_eq!(s.scan_order(), ScanOrder::Chunked);
        let mut t = Trace::default();
        for step in tokens.chunks(chunk) {
            s.forward(dev, step, Some(&mut t)).unwrap();
        }
        let what = format!("chunked order, gpu chunk {chunk}");
        same(&what, &seq, &t);
        assert_bits_eq(
            &format!("{what}: recurrent state"),
            &s.recurrent_state().unwrap(),
            &cpu_state,
        );
        assert!(matches!(
            s.set_scan_order(dev, ScanOrder::Recurrence),
            Err(Error::InvalidArgument { .. })
        ));
    }
    let vocab = cfg.vocab;
    let mut s = Session::new(dev, &model).unwrap();
    s.set_scan_order(dev, ScanOrder::Chunked).unwrap();
    for round in 0..2 {
        s.prefill(dev, &tokens[..60]).unwrap();
        for (i, &t) in tokens[60..80].iter().enumerate() {
            s.decode(dev, t).unwrap();
            let at = 60 + i;
            assert_bits_eq(
                &format!("chunked order decode (round {round}) at {at}"),
                &s.logits().unwrap(),
                &seq.logits[at * vocab..(at + 1) * vocab],
            );
        }
        assert!(s.stats().graph_replays > 0, "decode ran as graph replays");
        assert_eq!(s.stats().graph_error, None);
        assert_bits_eq(
            &format!("chunked order state after decode (round {round})"),
            &s.recurrent_state().unwrap(),
            &cpu(80, 80).1,
        );
        s.reset();
    }
}

/// The hybrid test's prompt.
fn tokens_of(cfg: &ModelConfig) -> Vec<u32> {
    prompt(4, 150, cfg.vocab)
}

/// Generation with sampling: the CPU reference (every token one at a time) draws the same tokens
/// on a second run; the GPU session (the prompt prefilled at once, the tokens by graph replays)
/// draws the CPU's tokens, greedy and sampled: the stream depends on (seed, sequence, step)
/// alone and the logits are the same bits. The CPU half runs without a GPU.
#[test]
fn generation_draws_the_same_tokens_everywhere() {
    use bitexact::sample::Sampling;
    let cfg = ModelConfig::preset("tiny", WeightFormat::Q8_0).unwrap();
    let w = ModelWeights::generate(&cfg, 5, None).unwrap();
    let prompt_tokens = prompt(5, 12, cfg.vocab);
    let sampled = Sampling {
        temperature: 0.9,
        top_k: 40,
        top_p: 0.95,
        seed: 77,
    };
    let cpu = |params: &Sampling, seq: u64| {
        CpuSession::new(&w)
            .generate(&prompt_tokens, 16, params, seq)
            .unwrap()
    };
    let greedy = cpu(&Sampling::default(), 0);
    let drawn = cpu(&sampled, 3);
    assert_eq!(drawn, cpu(&sampled, 3), "a second CPU run");
    assert_eq!(drawn.len(), 16);
    assert!(drawn.iter().all(|&t| (t as usize) < cfg.vocab));
    let Some(dev) = gpu() else { return };
    let model = GpuModel::load(dev, &w).unwrap();
    for (params, seq, want) in [(Sampling::default(), 0, &greedy), (sampled, 3, &drawn)] {
        let mut s = Session::new(dev, &model).unwrap();
        let got = s.generate(dev, &prompt_tokens, 16, &params, seq).unwrap();
        assert_eq!(&got, want, "GPU tokens, {params:?}");
        assert!(s.stats().graph_replays > 0, "decode ran as graph replays");
    }
}

/// Every KV mode of the CPU reference keeps the schedule invariance: one token at a time, the
/// whole prompt at once and chunks of 7 give the same bits at every layer and token (FastScan
/// codes a key from that key alone, and its attention's order depends on the position only).
/// CPU only.
#[test]
fn cpu_kv_modes_are_schedule_invariant() {
    use bitexact::reference::model::KvMode;
    let mut cfg = ModelConfig::preset("tiny", WeightFormat::F32).unwrap();
    cfg.head_dim = 64;
    cfg.rope_dim = 64;
    let w = ModelWeights::generate(&cfg, 13, None).unwrap();
    let tokens = prompt(13, 90, cfg.vocab);
    for mode in [
        KvMode::F16,
        KvMode::FastScan { bits: 4 },
        KvMode::FastScan { bits: 3 },
    ] {
        let run = |chunk: usize| {
            let mut s = CpuSession::new(&w);
            s.set_kv_mode(mode).unwrap();
            let mut t = Trace::default();
            for step in tokens.chunks(chunk) {
                s.forward(step, &mut t).unwrap();
            }
            t
        };
        let one = run(1);
        for chunk in [90, 7] {
            let got = run(chunk);
            assert!(
                first_divergence(&one, &got, cfg.dim).is_none(),
                "{mode:?}, chunk {chunk}: {:?}",
                first_divergence(&one, &got, cfg.dim)
            );
            assert_bits_eq(
                &format!("{mode:?} logits, chunk {chunk}"),
                &got.logits,
                &one.logits,
            );
        }
        // A mode is set before the first token only.
        let mut s = CpuSession::new(&w);
        s.forward(&tokens[..1], &mut Trace::default()).unwrap();
        assert!(s.set_kv_mode(mode).is_err());
    }
}

/// The GPU session in every coded KV mode ([`Session::with_kv_mode`]) gives the CPU
/// reference's bits in the same mode over 300 tokens (two of the attention's 256-position
/// chunks; a context of 500, not whole tiles): one token at a time, the whole prompt, chunks of
/// 7 (the encoder's tiles straddled), decode steps as graph replays, and after a reset a longer
/// prefill (its attention scratch larger than the captured step's) then more replays, writing
/// over the codes of the run before; a plain and a hybrid model (gated attention beside
/// DeltaNet layers). A head dim the codes do not take is refused.
#[test]
fn coded_kv_sessions_equal_cpu() {
    use bitexact::model::KvMode;
    let Some(dev) = gpu() else { return };
    for (preset, fmt) in [
        ("tiny", WeightFormat::F32),
        ("tiny", WeightFormat::Q8_0),
        ("tiny-hybrid", WeightFormat::Q8_0),
    ] {
        let mut cfg = ModelConfig::preset(preset, fmt).unwrap();
        let model16 = GpuModel::load(dev, &ModelWeights::generate(&cfg, 5, None).unwrap()).unwrap();
        for mode in [KvMode::F16, KvMode::FastScan { bits: 4 }] {
            assert!(
                Session::with_kv_mode(dev, &model16, mode).is_err(),
                "{preset}: {mode:?} with head dim 16"
            );
        }
        cfg.head_dim = 64;
        cfg.rope_dim = cfg.rope_dim.min(64);
        cfg.max_context = 500;
        let w = ModelWeights::generate(&cfg, 17, None).unwrap();
        let model = GpuModel::load(dev, &w).unwrap();
        let n = 300;
        let tokens = prompt(17, n, cfg.vocab);
        let vocab = cfg.vocab;
        for mode in [
            KvMode::F16,
            KvMode::FastScan { bits: 4 },
            KvMode::FastScan { bits: 3 },
        ] {
            let what = format!("{preset} {fmt} {mode:?}");
            let mut cs = CpuSession::new(&w);
            cs.set_kv_mode(mode).unwrap();
            let mut cpu = Trace::default();
            cs.run(&tokens, &mut cpu).unwrap();
            assert!(cpu.logits.iter().all(|v| v.is_finite()), "{what}");
            let mut s = Session::with_kv_mode(dev, &model, mode).unwrap();
            assert_eq!(s.kv_mode(), mode);
            for chunk in [1usize, n, 7] {
                s.reset();
                let mut t = Trace::default();
                for step in tokens.chunks(chunk) {
                    s.forward(dev, step, Some(&mut t)).unwrap();
                }
                same(&format!("{what}: gpu chunk {chunk} vs cpu"), &cpu, &t);
            }
            // Decode as graph replays after a short prefill, then after a reset a longer one
            // (over the first round's codes; the session's scratch grows, the graph's must
            // not move) and replays past the first 256 positions.
            let mut s = Session::with_kv_mode(dev, &model, mode).unwrap();
            for (round, (pre, end)) in [(10usize, 15usize), (270, n)].into_iter().enumerate() {
                s.reset();
                s.prefill(dev, &tokens[..pre]).unwrap();
                for (i, &t) in tokens[pre..end].iter().enumerate() {
                    s.decode(dev, t).unwrap();
                    let at = pre + i;
                    assert_bits_eq(
                        &format!("{what}: decode (round {round}) at {at}"),
                        &s.logits().unwrap(),
                        &cpu.logits[at * vocab..(at + 1) * vocab],
                    );
                }
                assert_eq!(s.stats().graph_error, None, "{what}");
                assert!(
                    s.stats().graph_replays > 0,
                    "{what}: decode ran as graph replays"
                );
            }
        }
        // The f32 mode is the default session's.
        let mut a = Session::with_kv_mode(dev, &model, KvMode::F32).unwrap();
        let mut b = Session::new(dev, &model).unwrap();
        let (mut ta, mut tb) = (Trace::default(), Trace::default());
        a.forward(dev, &tokens[..20], Some(&mut ta)).unwrap();
        b.forward(dev, &tokens[..20], Some(&mut tb)).unwrap();
        same(&format!("{preset} {fmt}: f32 mode vs new"), &tb, &ta);
    }
}

/// The chunked DeltaNet order in the hybrid model on the CPU ([`CpuSession::set_scan_order`]):
/// one token at a time, the whole prompt and pieces that start, end and straddle its 64-token
/// chunks give the same bits at every layer, at the logits and in the recurrent state (the
/// chunk under way included); its logits are the recurrence's to float rounding, not its bits.
/// CPU only.
#[test]
fn cpu_chunked_scan_order_is_schedule_invariant() {
    use bitexact::reference::model::ScanOrder;
    let cfg = ModelConfig::preset("tiny-hybrid", WeightFormat::Q8_0).unwrap();
    let w = ModelWeights::generate(&cfg, 29, None).unwrap();
    let tokens = prompt(29, 150, cfg.vocab);
    let run = |order: ScanOrder, piece: usize| {
        let mut s = CpuSession::new(&w);
        s.set_scan_order(order).unwrap();
        let mut t = Trace::default();
        for step in tokens.chunks(piece) {
            s.forward(step, &mut t).unwrap();
        }
        (t, s.recurrent_state())
    };
    let (one, state) = run(ScanOrder::Chunked, 1);
    for piece in [150, 7, 64, 65] {
        let (got, st) = run(ScanOrder::Chunked, piece);
        same(&format!("chunked scan, pieces of {piece}"), &one, &got);
        assert_bits_eq(
            &format!("chunked scan state, pieces of {piece}"),
            &st,
            &state,
        );
    }
    let (rec, _) = run(ScanOrder::Recurrence, 150);
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&a, &b) in one.logits.iter().zip(&rec.logits) {
        num += (f64::from(a) - f64::from(b)).powi(2);
        den += f64::from(b).powi(2);
    }
    let rel = (num / den).sqrt();
    assert!(
        rel > 0.0 && rel < 1e-4,
        "chunked vs recurrence logits: {rel:e}"
    );
    let mut s = CpuSession::new(&w);
    s.forward(&tokens[..1], &mut Trace::default()).unwrap();
    assert!(s.set_scan_order(ScanOrder::Chunked).is_err());
}
