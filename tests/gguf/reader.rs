//! The reader on files our writer made, and on malformed files built by hand.

use bitexact::gguf::writer::GgufWriter;
use bitexact::gguf::{Array, GgmlType, GgufError, GgufFile, TensorInfo, Value};
use bitexact::model::gguf as model_gguf;
use bitexact::model::{prompt, CpuSession, Trace};
use bitexact::model::{ModelConfig, ModelWeights};
use bitexact::quant::WeightFormat;

/// What to write for one tensor of a file written again: None drops it, Some gives its type and
/// bytes.
type Edit<'a> = &'a dyn Fn(&TensorInfo) -> Option<(GgmlType, Vec<u8>)>;

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The streaming export (one layer generated at a time) writes the bytes of the in-memory
/// export of the same weights, with and without a shared expert.
#[test]
fn streamed_export_equals_in_memory_export() {
    for (preset, format, shared) in [
        ("tiny", WeightFormat::F32, true),
        ("tiny", WeightFormat::Q8_0, false),
        ("small", WeightFormat::Q4K, true),
        ("tiny-hybrid", WeightFormat::Q8_0, true),
    ] {
        let mut cfg = ModelConfig::preset(preset, format).unwrap();
        if !shared {
            cfg.moe.shared_ffn = None;
        }
        let w = ModelWeights::generate(&cfg, 9, None).unwrap();
        let mut streamed = Vec::new();
        let mut layers = Vec::new();
        let n = model_gguf::export_preset(&cfg, 9, &mut streamed, |l| layers.push(l)).unwrap();
        assert_eq!(n as usize, streamed.len());
        assert_eq!(
            layers,
            (0..cfg.n_layers).collect::<Vec<_>>(),
            "{preset} progress"
        );
        assert!(
            streamed == model_gguf::export(&w).unwrap(),
            "{preset} {format}: bytes differ"
        );
    }
}

/// A model exported and loaded back is the same model, bit for bit, and runs batched ==
/// sequential.
#[test]
fn export_then_load_round_trips() {
    for format in [WeightFormat::F32, WeightFormat::Q8_0] {
        let cfg = ModelConfig::preset("tiny", format).unwrap();
        let w = ModelWeights::generate(&cfg, 5, None).unwrap();
        let f = GgufFile::parse(model_gguf::export(&w).unwrap()).unwrap();
        let back = model_gguf::load(&f, None, None).unwrap();
        assert_eq!(back.cfg.dim, cfg.dim);
        assert_eq!(back.cfg.moe, cfg.moe);
        assert_eq!(back.cfg.max_context, cfg.max_context);
        assert_eq!(bits(&back.embed), bits(&w.embed));
        for (a, b) in back.layers.iter().zip(&w.layers) {
            let (aa, ba) = (a.attention().unwrap(), b.attention().unwrap());
            assert_eq!(aa.wq.bytes(), ba.wq.bytes());
            assert_eq!(a.moe.gate.bytes(), b.moe.gate.bytes());
            assert_eq!(a.moe.down.bytes(), b.moe.down.bytes());
            assert_eq!(bits(&aa.q_norm), bits(&ba.q_norm));
        }
        let tokens = prompt(3, 20, cfg.vocab);
        let run = |chunk: usize| {
            let mut s = CpuSession::new(&back);
            let mut t = Trace::default();
            for c in tokens.chunks(chunk) {
                s.forward(c, &mut t).unwrap();
            }
            t
        };
        let (seq, bat) = (run(1), run(20));
        assert_eq!(bits(&seq.logits), bits(&bat.logits), "{format}");
    }
}

#[test]
fn metadata_of_every_type() {
    let mut g = GgufWriter::new();
    let vals = [
        Value::U8(7),
        Value::I8(-7),
        Value::U16(700),
        Value::I16(-700),
        Value::U32(70_000),
        Value::I32(-70_000),
        Value::F32(1.5),
        Value::Bool(true),
        Value::String("héllo".into()),
        Value::U64(1 << 40),
        Value::I64(-(1 << 40)),
        Value::F64(2.25),
        Value::Array(Array::U8(vec![1, 2, 3])),
        Value::Array(Array::String(vec!["a".into(), String::new(), "ccc".into()])),
        Value::Array(Array::Array(vec![
            Array::I32(vec![-1, 2]),
            Array::F32(vec![0.5]),
        ])),
    ];
    for (i, v) in vals.iter().enumerate() {
        g.meta(&format!("k.{i}"), v.clone());
    }
    g.tensor("t", &[32], GgmlType::of(WeightFormat::F32), vec![0; 128]);
    let f = GgufFile::parse(g.to_bytes()).unwrap();
    for (i, v) in vals.iter().enumerate() {
        assert_eq!(f.get(&format!("k.{i}")), Some(v));
    }
    assert_eq!(f.tensors[0].dims, vec![32]);
}

fn expect_err(bytes: Vec<u8>, needle: &str) {
    match GgufFile::parse(bytes) {
        Ok(_) => panic!("accepted a malformed file (expected `{needle}`)"),
        Err(e) => assert!(
            e.to_string().contains(needle),
            "`{e}` does not mention `{needle}`"
        ),
    }
}

#[test]
fn malformed_files_are_refused_with_reasons() {
    let good = {
        let mut g = GgufWriter::new();
        g.meta("general.architecture", Value::String("qwen3moe".into()));
        g.tensor("a", &[32, 2], GgmlType::of(WeightFormat::Q8_0), vec![0; 68]);
        g.tensor("b", &[4], GgmlType::of(WeightFormat::F32), vec![0; 16]);
        g.to_bytes()
    };
    GgufFile::parse(good.clone()).unwrap();
    expect_err(b"GGML".to_vec(), "magic");
    let mut v = good.clone();
    v[4] = 9;
    expect_err(v, "version");
    // The last 16 bytes are padding; 20 reach into the last tensor's data.
    expect_err(good[..good.len() - 20].to_vec(), "truncated");
    // A tensor count no file could hold.
    let mut v = good.clone();
    v[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    expect_err(v, "overflows");
    let mut v = good.clone();
    v[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    expect_err(v, "truncated");
    // An unknown tensor type names the tensor.
    let mut g = GgufWriter::new();
    g.tensor(
        "weird",
        &[32],
        GgmlType {
            id: 99,
            name: "?",
            block_elems: 1,
            block_bytes: 1,
        },
        vec![0; 32],
    );
    match GgufFile::parse(g.to_bytes()) {
        Err(GgufError::UnsupportedType {
            tensor,
            type_id: 99,
            ..
        }) => assert_eq!(tensor, "weird"),
        other => panic!("{other:?}"),
    }
    // Duplicate names, non-UTF-8 strings, rows not a multiple of the block.
    let mut g = GgufWriter::new();
    g.tensor("x", &[4], GgmlType::of(WeightFormat::F32), vec![0; 16]);
    g.tensor("x", &[4], GgmlType::of(WeightFormat::F32), vec![0; 16]);
    expect_err(g.to_bytes(), "twice");
    let mut g = GgufWriter::new();
    g.meta("k", Value::String("ab".into()));
    let mut v = g.to_bytes();
    let at = v.windows(2).position(|w| w == b"ab").unwrap();
    v[at] = 0xff;
    expect_err(v, "UTF-8");
    let mut g = GgufWriter::new();
    g.tensor("q", &[33], GgmlType::of(WeightFormat::Q8_0), vec![0; 34]);
    expect_err(g.to_bytes(), "block");
    // A tensor whose data runs past the end.
    let mut v = good.clone();
    v.truncate(v.len() - 24);
    expect_err(v, "truncated");
}

#[test]
fn unsupported_models_are_refused_with_reasons() {
    let cfg = ModelConfig::preset("tiny", WeightFormat::F32).unwrap();
    let w = ModelWeights::generate(&cfg, 1, None).unwrap();
    let bytes = model_gguf::export(&w).unwrap();
    // Another architecture.
    let f = GgufFile::parse(bytes.clone()).unwrap();
    let mut g = GgufWriter::new();
    g.meta("general.architecture", Value::String("llama".into()));
    let e = model_gguf::config(&GgufFile::parse(g.to_bytes()).unwrap(), None).unwrap_err();
    assert!(e.to_string().contains("llama"), "{e}");
    // `f` written again with each tensor as `edit` says (None drops it; Some keeps or replaces
    // its type and bytes), then loaded: the error.
    let load_edited = |edit: Edit| {
        let mut g = GgufWriter::new();
        for (k, v) in &f.metadata {
            g.meta(k, v.clone());
        }
        for t in &f.tensors {
            if let Some((ty, bytes)) = edit(t) {
                g.tensor(&t.name, &t.dims, ty, bytes);
            }
        }
        model_gguf::load(&GgufFile::parse(g.to_bytes()).unwrap(), None, None).unwrap_err()
    };
    let same = |t: &TensorInfo| (t.ty, f.tensor_data(t).unwrap().into_owned());
    // A missing tensor is named.
    let e = load_edited(&|t| (t.name != "blk.1.attn_k.weight").then(|| same(t)));
    assert!(e.to_string().contains("blk.1.attn_k.weight"), "{e}");
    // A tensor type the runner cannot run is named with its type: Q8_1 (llama.cpp's
    // activation type, 32 per block) is known and not a weight type the runner takes.
    let e = load_edited(&|t| {
        Some(if t.name == "blk.0.attn_q.weight" {
            let bytes = (t.elements() / 32 * 36) as usize;
            (GgmlType::from_id(9).unwrap(), vec![0; bytes])
        } else {
            same(t)
        })
    });
    assert!(
        matches!(e, GgufError::UnsupportedType { ref tensor, .. } if tensor == "blk.0.attn_q.weight"),
        "{e}"
    );
    assert!(e.to_string().contains("Q8_1"), "{e}");
    // A qwen35moe file with gated-DeltaNet tensors but not the DeltaNet's metadata: the
    // missing key is named.
    let mut g = GgufWriter::new();
    g.meta("general.architecture", Value::String("qwen35moe".into()));
    g.tensor(
        "blk.0.ssm_a",
        &[4],
        GgmlType::of(WeightFormat::F32),
        vec![0; 16],
    );
    let e = model_gguf::config(&GgufFile::parse(g.to_bytes()).unwrap(), None).unwrap_err();
    assert!(e.to_string().contains("ssm.group_count"), "{e}");
}

/// A hybrid (qwen35moe) file our writer made loads back to the same weights, and the CPU
/// reference gives the same bits on both.
#[test]
fn hybrid_export_then_load_round_trips() {
    for fmt in [WeightFormat::F32, WeightFormat::Q8_0] {
        let cfg = ModelConfig::preset("tiny-hybrid", fmt).unwrap();
        let w = ModelWeights::generate(&cfg, 6, None).unwrap();
        let f = GgufFile::parse(model_gguf::export(&w).unwrap()).unwrap();
        let back = model_gguf::load(&f, Some(cfg.max_context), None).unwrap();
        assert_eq!(back.cfg.hybrid, cfg.hybrid);
        assert_eq!(back.cfg.moe, cfg.moe);
        let tokens = prompt(6, 70, cfg.vocab);
        let run = |w: &ModelWeights| {
            let mut s = CpuSession::new(w);
            let mut t = Trace::default();
            s.forward(&tokens, &mut t).unwrap();
            t
        };
        let (a, b) = (run(&w), run(&back));
        assert!(
            a.logits
                .iter()
                .zip(&b.logits)
                .all(|(x, y)| x.to_bits() == y.to_bits()),
            "{fmt}: logits differ after the round trip"
        );
        assert!(a
            .layers
            .iter()
            .flatten()
            .zip(b.layers.iter().flatten())
            .all(|(x, y)| x.to_bits() == y.to_bits()));
    }
}

fn temp_file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("bitexact-gguf-{}-{name}", std::process::id()));
    std::fs::write(&p, bytes).unwrap();
    p
}

/// A file that shrinks after it was opened: the tensor reads give a typed error naming the
/// tensor (no memory map, so no SIGBUS), and the loader passes it on.
#[test]
fn a_file_shrunk_after_open_is_an_error_not_a_crash() {
    let cfg = ModelConfig::preset("tiny", WeightFormat::Q8_0).unwrap();
    let w = ModelWeights::generate(&cfg, 2, None).unwrap();
    let bytes = model_gguf::export(&w).unwrap();
    let path = temp_file("shrink.gguf", &bytes);
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.len(), bytes.len());
    // Before: every tensor reads back its bytes.
    let t0 = &f.tensors[0];
    let start = (f.data_offset + t0.offset) as usize;
    assert_eq!(
        f.tensor_data(t0).unwrap().as_ref(),
        &bytes[start..start + t0.bytes as usize]
    );
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(bytes.len() as u64 / 2)
        .unwrap();
    let last = f.tensors.iter().max_by_key(|t| t.offset).unwrap();
    match f.tensor_data(last) {
        Err(GgufError::Truncated { what, .. }) => {
            assert!(
                what.contains(&last.name) && what.contains("shorter"),
                "{what}"
            )
        }
        other => panic!(
            "expected a truncation error, got {:?}",
            other.map(|b| b.len())
        ),
    }
    assert!(model_gguf::load(&f, None, None).is_err());
    let _ = std::fs::remove_file(&path);
}

/// Metadata larger than the first read (1 MiB): `open` reads on until the head is whole.
#[test]
fn open_reads_a_head_larger_than_its_first_read() {
    let mut g = GgufWriter::new();
    let tokens: Vec<String> = (0..150_000).map(|i| format!("token-{i:08}")).collect();
    g.meta("general.architecture", Value::String("none".into()))
        .meta("tokenizer.ggml.tokens", Value::Array(Array::String(tokens)))
        .tensor(
            "t.weight",
            &[4],
            GgmlType::of(WeightFormat::F32),
            vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16],
        );
    let bytes = g.to_bytes();
    assert!(bytes.len() > 2 << 20);
    let path = temp_file("bighead.gguf", &bytes);
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(
        f.tensor_data(&f.tensors[0]).unwrap().as_ref(),
        &bytes[bytes.len() - 32..][..16]
    );
    let _ = std::fs::remove_file(&path);
}
