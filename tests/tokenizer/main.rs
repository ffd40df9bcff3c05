//! The tokenizer against llama.cpp's own test vectors: `ggml-vocab-qwen2.gguf` and
//! `ggml-vocab-qwen35.gguf` with their `.inp` / `.out` cases (llama.cpp's test-tokenizer-0:
//! no BOS/EOS added, special tokens not parsed), kept by `ci/llama-cpp fetch` in
//! `.peers/vocab/`. Every case must give llama.cpp's ids and decode back to its text; the
//! round trip also holds for generated UTF-8 (proptest). Without the files the tests print
//! SKIP, unless `BITEXACT_REQUIRE_VOCAB=1` (CI sets it) makes that a failure.

use std::path::{Path, PathBuf};

use bitexact::gguf::GgufFile;
use bitexact::tokenizer::Tokenizer;

fn vocab(name: &str) -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(".peers/vocab")
        .join(format!("ggml-vocab-{name}.gguf"));
    if p.is_file() {
        return Some(p);
    }
    if std::env::var("BITEXACT_REQUIRE_VOCAB").is_ok_and(|v| v == "1") {
        panic!(
            "{} is missing and BITEXACT_REQUIRE_VOCAB=1: run ci/llama-cpp fetch",
            p.display()
        );
    }
    println!(
        "SKIP {name}: {} missing (ci/llama-cpp fetch keeps it)",
        p.display()
    );
    None
}

fn load(name: &str) -> Option<(Tokenizer, PathBuf)> {
    let p = vocab(name)?;
    let f = GgufFile::open(&p).unwrap();
    Some((Tokenizer::from_gguf(&f).unwrap(), p))
}

/// The `.inp` cases (separated as llama.cpp's reader separates them) and the `.out` ids.
fn cases(p: &Path) -> Vec<(String, Vec<u32>)> {
    let inp = std::fs::read_to_string(p.with_extension("gguf.inp")).unwrap();
    let out = std::fs::read_to_string(p.with_extension("gguf.out")).unwrap();
    // llama.cpp's reader: pieces between separators, none after a final one.
    let mut texts: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    if inp.ends_with("\n__ggml_vocab_test__\n") {
        texts.pop();
    }
    let ids: Vec<Vec<u32>> = out
        .lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect();
    assert_eq!(texts.len(), ids.len(), "{}: cases and answers", p.display());
    texts.into_iter().map(str::to_owned).zip(ids).collect()
}

fn llama_cases(name: &str) {
    let Some((t, p)) = load(name) else { return };
    let all = cases(&p);
    let mut failed = Vec::new();
    for (text, want) in &all {
        let got = t.encode(text, false, false).unwrap();
        if &got != want {
            failed.push(format!("{text:?}: got {got:?}, llama.cpp {want:?}"));
        }
        let back = t.decode(&got, true).unwrap();
        assert_eq!(&back, text, "{name}: decode(encode({text:?}))");
    }
    assert!(
        failed.is_empty(),
        "{name}: {} of {} cases differ from llama.cpp:\n{}",
        failed.len(),
        all.len(),
        failed.join("\n")
    );
    println!("{name}: {} llama.cpp cases, every id equal", all.len());
}

#[test]
fn qwen2_matches_llama_cpp() {
    llama_cases("qwen2");
}

#[test]
fn qwen35_matches_llama_cpp() {
    llama_cases("qwen35");
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000)
    ))]

    /// decode(encode(s)) == s for any UTF-8 text (any code points, spaces, newlines, special
    /// tokens' text), through both pre-tokenizers.
    #[test]
    fn any_text_round_trips(s in "\\PC{0,40}|[ \\t\\n\\r]{0,6}|(<\\|im_start\\|>|<\\|im_end\\|>|a|é|\\u{301}| |\\n|🦙|1){0,12}") {
        for name in ["qwen2", "qwen35"] {
            if let Some(t) = tokenizer(name) {
                for parse_special in [false, true] {
                    let ids = t.encode(&s, false, parse_special).unwrap();
                    proptest::prop_assert_eq!(&t.decode(&ids, true).unwrap(), &s, "{} {}", name, parse_special);
                }
            }
        }
    }
}

/// One tokenizer per vocabulary for the whole test binary (the proptest runs thousands).
fn tokenizer(name: &str) -> Option<&'static Tokenizer> {
    use std::sync::OnceLock;
    static Q2: OnceLock<Option<Tokenizer>> = OnceLock::new();
    static Q35: OnceLock<Option<Tokenizer>> = OnceLock::new();
    let cell = if name == "qwen2" { &Q2 } else { &Q35 };
    cell.get_or_init(|| load(name).map(|(t, _)| t)).as_ref()
}

/// Special tokens: parsed as whole tokens only when asked (CONTROL), their text BPE'd
/// otherwise; decoding without `special` drops CONTROL tokens.
#[test]
fn special_tokens_are_parsed_when_asked() {
    let Some(t) = tokenizer("qwen2") else { return };
    let (start, end) = (
        t.token_id("<|im_start|>").unwrap(),
        t.token_id("<|im_end|>").unwrap(),
    );
    let text = "<|im_start|>user\nHi<|im_end|>";
    let parsed = t.encode(text, false, true).unwrap();
    assert_eq!(parsed.first(), Some(&start));
    assert_eq!(parsed.last(), Some(&end));
    let plain = t.encode(text, false, false).unwrap();
    assert!(
        !plain.contains(&start) && plain.len() > parsed.len(),
        "{plain:?}"
    );
    assert_eq!(t.decode(&parsed, false).unwrap(), "user\nHi");
    assert!(t.is_end(end));
}

/// A file with no vocabulary (our exports write `tokenizer.ggml.model = "none"`) is refused
/// naming the key and the value; an id past the vocabulary is refused when decoding.
#[test]
fn files_without_a_vocabulary_and_bad_ids_are_refused() {
    let cfg =
        bitexact::model::ModelConfig::preset("tiny", bitexact::quant::WeightFormat::F32).unwrap();
    let mut bytes = Vec::new();
    bitexact::model::gguf::export_preset(&cfg, 0, &mut bytes, |_| {}).unwrap();
    let f = GgufFile::parse(bytes).unwrap();
    let e = Tokenizer::from_gguf(&f).unwrap_err().to_string();
    assert!(
        e.contains("tokenizer.ggml.model") && e.contains("none"),
        "{e}"
    );
    if let Some(t) = tokenizer("qwen2") {
        let e = t.decode(&[t.len() as u32], false).unwrap_err().to_string();
        assert!(e.contains("past the vocabulary"), "{e}");
    }
}

/// Text in, text out on the CPU reference: a prompt through the tiny preset with the Qwen2
/// vocabulary; `generate_stream` (the loop `oracle generate` runs) draws the tokens
/// `CpuSession::generate` draws, greedy and sampled, and the streamed text equals the decoded
/// tokens.
#[test]
fn generation_streams_the_reference_tokens() {
    use bitexact::model::{CpuSession, ModelConfig, ModelWeights};
    use bitexact::sample::{generate_stream, Sampling};
    use bitexact::tokenizer::StreamDecoder;
    let Some(t) = tokenizer("qwen2") else { return };
    let mut cfg = ModelConfig::preset("tiny", bitexact::quant::WeightFormat::F32).unwrap();
    cfg.vocab = t.len();
    let w = ModelWeights::generate(&cfg, 3, None).unwrap();
    let prompt = t
        .encode("<|im_start|>user\nWrite a haiku.<|im_end|>\n", true, true)
        .unwrap();
    for params in [
        Sampling::default(),
        Sampling {
            temperature: 0.9,
            top_k: 50,
            top_p: 0.95,
            seed: 7,
        },
    ] {
        let want = CpuSession::new(&w)
            .generate(&prompt, 6, &params, 1)
            .unwrap();
        let mut stream = StreamDecoder::new();
        let mut text = String::new();
        let got = generate_stream(
            &mut CpuSession::new(&w),
            &prompt,
            6,
            &params,
            1,
            true,
            |id| {
                text.push_str(&stream.push(t, id, false).unwrap());
                true
            },
        )
        .unwrap();
        text.push_str(&stream.finish());
        assert_eq!(got.tokens, want, "{params:?}");
        assert_eq!(got.logits.len(), 6);
        assert_eq!(
            text.as_bytes(),
            t.decode_bytes(&want, false).unwrap(),
            "{params:?}"
        );
    }
}

/// llama.cpp's tokenizer program (`peers/tokenize.cpp` on libllama, built by
/// `ci/llama-cpp build-cpu`), or SKIP (a failure under `BITEXACT_REQUIRE_LLAMA=1`).
fn llama_tokenizer() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(".peers/build-cpu/bitexact-tokenize");
    if p.is_file() {
        return Some(p);
    }
    let why = format!("{} is not built (ci/llama-cpp build-cpu)", p.display());
    assert!(
        !std::env::var("BITEXACT_REQUIRE_LLAMA").is_ok_and(|v| v == "1"),
        "BITEXACT_REQUIRE_LLAMA=1 but {why}"
    );
    println!("SKIP: {why}");
    None
}

/// llama.cpp's ids for `texts` in `model` (each text its own list).
fn llama_ids(tool: &Path, model: &Path, texts: &[String], parse_special: bool) -> Vec<Vec<u32>> {
    let dir = std::env::temp_dir().join(format!("bitexact-tokenize-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (inp, out) = (dir.join("texts"), dir.join("ids"));
    let mut bytes = Vec::new();
    for t in texts {
        bytes.extend((t.len() as u32).to_le_bytes());
        bytes.extend(t.as_bytes());
    }
    std::fs::write(&inp, bytes).unwrap();
    let status = std::process::Command::new(tool)
        .arg(model)
        .arg(&inp)
        .arg(&out)
        .args(["--add-special", "1", "--parse-special"])
        .arg(if parse_special { "1" } else { "0" })
        .status()
        .expect("running bitexact-tokenize");
    assert!(
        status.success(),
        "bitexact-tokenize on {}: {status}",
        model.display()
    );
    let words: Vec<u32> = std::fs::read(&out)
        .unwrap()
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    let mut lists = Vec::with_capacity(texts.len());
    let mut at = 0;
    while at < words.len() {
        let n = words[at] as usize;
        lists.push(words[at + 1..at + 1 + n].to_vec());
        at += 1 + n;
    }
    assert_eq!(
        lists.len(),
        texts.len(),
        "bitexact-tokenize answered every text"
    );
    lists
}

/// `n` texts made of pieces that stress the pre-tokenizers (contractions, digit runs,
/// whitespace runs, accents and combining marks, CJK, emoji, special tokens' text, non-breaking
/// and ideographic spaces) and random code points, from a fixed seed.
fn generated_texts(n: usize, seed: u64) -> Vec<String> {
    const PIECES: &[&str] = &[
        "Hello",
        " world",
        "'s",
        "'LL",
        "'ve",
        " 123",
        "4567",
        "\n",
        "\n\n",
        "   ",
        "\t",
        "é",
        "e\u{301}",
        "日本語",
        "🦙",
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
        " <think>",
        "don't",
        "ÀÉÎ",
        "\r\n",
        "ﬁ",
        "Ǆ",
        "x",
        ".",
        "!!!",
        "::",
        "𝔘",
        "\u{a0}",
        " \u{3000}",
        "  \n ",
        "Ｈｅｌｌｏ",
        "ß",
        "ǅ",
        "1,000.5",
        "$",
        "¿",
        "—",
        " a",
        "\u{200b}",
    ];
    let mut state = seed | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..n)
        .map(|_| {
            let mut s = String::new();
            for _ in 0..1 + next() % 12 {
                match next() % 4 {
                    0 => s.extend(char::from_u32((next() % 0x2_0000) as u32)),
                    _ => s.push_str(PIECES[(next() % PIECES.len() as u64) as usize]),
                }
            }
            s
        })
        .collect()
}

/// llama.cpp's tokenizer as a second witness, beside its test vectors: on both vocabulary
/// files, every `.inp` case and 3,000 generated texts (`BITEXACT_TOKENIZE_TEXTS`), with special tokens parsed (llama.cpp's
/// `llama-tokenize` default) and not, give our ids; and a synthetic model exported with the
/// qwen2 vocabulary (`oracle export --vocab`'s path) tokenizes in llama.cpp as in bitexact.
#[test]
fn llama_cpp_tokenizer_gives_our_ids() {
    let Some(tool) = llama_tokenizer() else {
        return;
    };
    for name in ["qwen2", "qwen35"] {
        let Some((t, p)) = load(name) else { return };
        let mut texts: Vec<String> = cases(&p).into_iter().map(|(s, _)| s).collect();
        let n_cases = texts.len();
        // BITEXACT_TOKENIZE_TEXTS sets how many (3,000 by default).
        let n_gen = std::env::var("BITEXACT_TOKENIZE_TEXTS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3000);
        texts.extend(generated_texts(n_gen, 7 + name.len() as u64));
        for parse_special in [true, false] {
            let theirs = llama_ids(&tool, &p, &texts, parse_special);
            let differ: Vec<String> = texts
                .iter()
                .zip(&theirs)
                .filter_map(|(s, want)| {
                    let got = t.encode(s, true, parse_special).unwrap();
                    (&got != want).then(|| format!("{s:?}: ours {got:?}, llama.cpp {want:?}"))
                })
                .take(5)
                .collect();
            assert!(
                differ.is_empty(),
                "{name} (parse_special {parse_special}): texts whose ids differ:\n{}",
                differ.join("\n")
            );
        }
        println!(
            "{name}: {n_cases} cases and {n_gen} generated texts, special tokens parsed and \
             not: llama.cpp's ids equal ours"
        );
    }
    // An export with the qwen2 vocabulary: the tiny preset, its vocab the vocabulary's.
    let Some((t, p)) = load("qwen2") else { return };
    let f = GgufFile::open(&p).unwrap();
    let vocab: Vec<_> = f
        .metadata
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .cloned()
        .collect();
    let mut cfg =
        bitexact::model::ModelConfig::preset("tiny", bitexact::quant::WeightFormat::Q8_0).unwrap();
    cfg.vocab = t.len();
    let model = std::env::temp_dir().join(format!("bitexact-vocab-{}.gguf", std::process::id()));
    let mut out = std::io::BufWriter::new(std::fs::File::create(&model).unwrap());
    bitexact::model::gguf::export_preset_with_vocab(&cfg, 1, &vocab, &mut out, |_| {}).unwrap();
    drop(out);
    let texts = generated_texts(200, 99);
    let theirs = llama_ids(&tool, &model, &texts, true);
    // Ours read back from the export, as `generate --gguf` reads it.
    let ours = Tokenizer::from_gguf(&GgufFile::open(&model).unwrap()).unwrap();
    let _ = std::fs::remove_file(&model);
    for (s, want) in texts.iter().zip(&theirs) {
        assert_eq!(
            &ours.encode(s, true, true).unwrap(),
            want,
            "{s:?} in the export"
        );
    }
}
