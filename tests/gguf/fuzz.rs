//! A fuzzer over malformed GGUF files: random mutations of a committed seed corpus (truncation,
//! bit flips, huge counts and lengths, offsets past the end, bytes inserted and copied over).
//! Every mutant must parse or be refused without a panic, and a parse may not allocate out of
//! proportion to the file: no single allocation above 16x the file (+64 KiB), no more than 64x
//! in all (+1 MiB). (Parsed structures are larger than their encodings: a tensor info of 32
//! bytes in the file is a ~100-byte struct, so "never more than the file" is not the bound; a
//! count is never trusted before the bytes it needs are known to be there.) Runs for
//! `BITEXACT_FUZZ_SECONDS` (default 5) of core time spread over the cores, from seeds
//! `BITEXACT_FUZZ_SEED` onward (one a thread); a failing input is written to the temp dir and its
//! seed printed.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::time::{Duration, Instant};

use bitexact::gguf::writer::GgufWriter;
use bitexact::gguf::{Array, GgmlType, GgufFile, Value};
use bitexact::model::gguf as model_gguf;
use bitexact::model::{ModelConfig, ModelWeights, MoeConfig};
use bitexact::quant::{QuantMatrix, WeightFormat};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::alloc::measure;

fn corpus_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/gguf/corpus")
}

fn micro(format: WeightFormat) -> ModelConfig {
    ModelConfig {
        name: "micro".into(),
        n_layers: 1,
        dim: 32,
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 16,
        rope_dim: 16,
        rope_base: 1e6,
        vocab: 16,
        norm_eps: 1e-6,
        moe: MoeConfig {
            dim: 32,
            n_experts: 4,
            top_k: 2,
            ffn: 32,
            shared_ffn: Some(32),
            renormalize: true,
            format,
        },
        attn_format: WeightFormat::F32,
        lm_head_format: WeightFormat::F32,
        max_context: 64,
        hybrid: None,
    }
}

/// The seed corpus: two micro models, one tensor of every format, metadata of every type.
fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let model =
        |f| model_gguf::export(&ModelWeights::generate(&micro(f), 1, None).unwrap()).unwrap();
    let mut formats = GgufWriter::new();
    let v: Vec<f32> = (0..256).map(|i| (i as f32 - 128.0) / 17.0).collect();
    for f in WeightFormat::ALL {
        let m = QuantMatrix::quantize(f, &v, 1, 1, 256).unwrap();
        formats.tensor(f.name(), &[256], GgmlType::of(f), m.bytes().to_vec());
    }
    let mut meta = GgufWriter::new();
    meta.meta("general.alignment", Value::U32(64))
        .meta("s", Value::String("text".into()))
        .meta("u8s", Value::Array(Array::U8(vec![1, 2, 3])))
        .meta(
            "strs",
            Value::Array(Array::String(vec!["a".into(), "bc".into()])),
        )
        .meta(
            "nested",
            Value::Array(Array::Array(vec![
                Array::F64(vec![1.0]),
                Array::Bool(vec![true]),
            ])),
        )
        .meta("f", Value::F32(0.5))
        .tensor(
            "t",
            &[8, 2],
            GgmlType::of(WeightFormat::F16),
            vec![0x3c; 32],
        );
    vec![
        ("micro-f32.gguf", model(WeightFormat::F32)),
        ("micro-q8_0.gguf", model(WeightFormat::Q8_0)),
        ("formats.gguf", formats.to_bytes()),
        ("meta.gguf", meta.to_bytes()),
    ]
}

/// Rewrites the committed corpus (`cargo test --test gguf -- --ignored write_seed_corpus`).
#[test]
#[ignore]
fn write_seed_corpus() {
    std::fs::create_dir_all(corpus_dir()).unwrap();
    for (name, bytes) in seeds() {
        std::fs::write(corpus_dir().join(name), bytes).unwrap();
    }
}

fn load_corpus() -> Vec<Vec<u8>> {
    let mut files: Vec<_> = std::fs::read_dir(corpus_dir())
        .expect("tests/gguf/corpus")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .collect();
    files.sort();
    let corpus: Vec<Vec<u8>> = files.iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert!(corpus.len() >= 4, "the seed corpus is missing");
    for c in &corpus {
        GgufFile::parse(c.clone()).expect("every seed parses");
    }
    corpus
}

fn mutate(rng: &mut StdRng, mut b: Vec<u8>) -> Vec<u8> {
    for _ in 0..rng.gen_range(1..=4) {
        if b.is_empty() {
            b.push(rng.gen());
        }
        let at = rng.gen_range(0..b.len());
        match rng.gen_range(0..8) {
            0 => b.truncate(at),
            1 => {
                for _ in 0..rng.gen_range(1..=8) {
                    let i = rng.gen_range(0..b.len());
                    b[i] ^= 1 << rng.gen_range(0..8);
                }
            }
            2 => {
                let v: u64 =
                    [u64::MAX, 1 << 40, 1 << 32, b.len() as u64, rng.gen(), 0][rng.gen_range(0..6)];
                let end = (at + 8).min(b.len());
                b[at..end].copy_from_slice(&v.to_le_bytes()[..end - at]);
            }
            3 => {
                let v: u32 = [0, 1, 5, 9, 12, 99, u32::MAX][rng.gen_range(0..7)];
                let end = (at + 4).min(b.len());
                b[at..end].copy_from_slice(&v.to_le_bytes()[..end - at]);
            }
            4 => {
                let len = rng.gen_range(1..=64).min(b.len() - at);
                let src = b[at..at + len].to_vec();
                let to = rng.gen_range(0..b.len());
                let end = (to + len).min(b.len());
                b[to..end].copy_from_slice(&src[..end - to]);
            }
            5 => {
                let extra: Vec<u8> = (0..rng.gen_range(1..=16)).map(|_| rng.gen()).collect();
                b.splice(at..at, extra);
            }
            6 => {
                let end = (at + rng.gen_range(1..=32)).min(b.len());
                b[at..end].fill(0xff);
            }
            _ => {
                // The header counts, where they matter most.
                let field = [8usize, 16][rng.gen_range(0..2)];
                if b.len() >= field + 8 {
                    let v: u64 = [u64::MAX, 1 << 50, rng.gen_range(0..100)][rng.gen_range(0..3)];
                    b[field..field + 8].copy_from_slice(&v.to_le_bytes());
                }
            }
        }
    }
    b
}

/// Parses `bytes` (and, when it parses, maps it to a model): no panic, bounded allocation.
/// Keeps the largest allocation ratios seen (single, total) over the file size in `worst`.
fn check_with(bytes: &[u8], worst: &mut (f64, f64)) -> Result<bool, String> {
    let len = bytes.len();
    let owned = bytes.to_vec();
    let (parsed, largest, total) =
        measure(|| catch_unwind(AssertUnwindSafe(|| GgufFile::parse(owned))));
    let parsed = parsed.map_err(|_| "the parser panicked".to_string())?;
    if len > 0 {
        worst.0 = worst.0.max(largest as f64 / len as f64);
        worst.1 = worst.1.max(total as f64 / len as f64);
    }
    // The input copy itself is one allocation of `len`.
    if largest > 16 * len + (64 << 10) || total > 64 * len + (1 << 20) + len {
        return Err(format!(
            "allocation out of proportion: largest {largest}, total {total}, file {len}"
        ));
    }
    match parsed {
        Err(_) => Ok(false),
        Ok(f) => {
            catch_unwind(AssertUnwindSafe(|| {
                if model_gguf::config(&f, Some(64)).is_ok() {
                    let _ = model_gguf::load(&f, Some(64), Some(1));
                }
                for t in &f.tensors {
                    let _ = f.tensor_data(t);
                }
            }))
            .map_err(|_| "mapping a parsed file to a model panicked".to_string())?;
            Ok(true)
        }
    }
}

/// One fuzzing thread: mutated files from `seed` until `secs` have passed or a check fails;
/// `(cases, accepted, worst, failure)`.
#[allow(clippy::type_complexity)]
fn fuzz_thread(
    corpus: &[Vec<u8>],
    seed: u64,
    secs: u64,
) -> (u64, u64, (f64, f64), Option<(String, Vec<u8>)>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let start = Instant::now();
    let (mut cases, mut accepted) = (0u64, 0u64);
    let mut worst = (0.0f64, 0.0f64);
    while start.elapsed() < Duration::from_secs(secs) {
        let base = corpus[rng.gen_range(0..corpus.len())].clone();
        let input = mutate(&mut rng, base);
        cases += 1;
        match check_with(&input, &mut worst) {
            Ok(ok) => accepted += u64::from(ok),
            Err(why) => return (cases, accepted, worst, Some((why, input))),
        }
    }
    (cases, accepted, worst, None)
}

/// `BITEXACT_FUZZ_SECONDS` (default 5) of fuzzing, spread over the cores: thread `i` of `T`
/// fuzzes from seed `BITEXACT_FUZZ_SEED + i` for `seconds / T` (at least 1 s), so CI's 60 s
/// of mutated files take 30 s of its two cores.
#[test]
fn fuzz_malformed_files() {
    let secs: u64 = std::env::var("BITEXACT_FUZZ_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let seed: u64 = std::env::var("BITEXACT_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let each = (secs / threads).max(1);
    let corpus = load_corpus();
    // The panic hook would print every caught panic; failures are reported below instead.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let runs: Vec<_> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let corpus = &corpus;
                sc.spawn(move || fuzz_thread(corpus, seed + i, each))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    std::panic::set_hook(hook);
    let (mut cases, mut accepted, mut worst) = (0u64, 0u64, (0.0f64, 0.0f64));
    for (i, (c, a, w, failure)) in runs.into_iter().enumerate() {
        cases += c;
        accepted += a;
        worst = (worst.0.max(w.0), worst.1.max(w.1));
        if let Some((why, input)) = failure {
            let s = seed + i as u64;
            let path = std::env::temp_dir().join(format!("gguf-fuzz-failure-{s}-{c}.bin"));
            std::fs::write(&path, &input).unwrap();
            panic!(
                "fuzz case {c} (seed {s}): {why}; input saved to {}",
                path.display()
            );
        }
    }
    println!(
        "gguf fuzz: {cases} mutated files in {threads} threads of {each} s (seeds {seed}..), \
         {accepted} still parsed, no panic; worst allocation per file byte: {:.2} (single), \
         {:.2} (total)",
        worst.0, worst.1
    );
    assert!(cases > 100);
}
