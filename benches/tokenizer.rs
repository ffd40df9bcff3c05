//! Bench of the tokenizer (CPU): encoding 1 MiB of text with llama.cpp's Qwen2 test
//! vocabulary (`.peers/vocab`, kept by `ci/llama-cpp fetch`): prose, code, numbers and
//! non-Latin scripts, repeated. The goal is under 1 s a MiB on one core (issue: text in, text
//! out); the rate printed is MiB/s of UTF-8 input.

use std::time::Duration;

use bitexact::gguf::GgufFile;
use bitexact::tokenizer::Tokenizer;
use criterion::{Criterion, Throughput};

const SAMPLE: &str = "The quick brown fox jumps over the lazy dog. It's 3.14159 o'clock, \
isn't it? fn main() { println!(\"{}\", 42); }\n\tИ быстрый бурый лис 🦙 прыгает.\n\
快速的棕色狐狸跳过了懒狗。 Ünïcödé naïve café — 2026-12-07 12:34:56 +0000\n\n";

fn main() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".peers/vocab/ggml-vocab-qwen2.gguf");
    if !path.is_file() {
        println!(
            "SKIP tokenizer bench: {} missing (ci/llama-cpp fetch)",
            path.display()
        );
        return;
    }
    let t = Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    let mut text = String::new();
    while text.len() < 1 << 20 {
        text.push_str(SAMPLE);
    }
    let mut c = Criterion::default()
        .configure_from_args()
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    let mut g = c.benchmark_group("tokenizer");
    g.throughput(Throughput::Bytes(text.len() as u64));
    g.bench_function("encode_1MiB_qwen2", |b| {
        b.iter(|| t.encode(&text, false, false).unwrap())
    });
    let ids = t.encode(&text, false, false).unwrap();
    g.bench_function("decode_1MiB_qwen2", |b| {
        b.iter(|| t.decode(&ids, false).unwrap())
    });
    g.finish();
    c.final_summary();
    println!("{} bytes -> {} tokens", text.len(), ids.len());
}
