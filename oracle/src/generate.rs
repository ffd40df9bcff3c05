//! `oracle generate`: text in, text out, with a GGUF file's own vocabulary (or a preset and a
//! vocabulary file): the prompt (optionally through the file's chat template) tokenized, then
//! tokens drawn one at a time (`bitexact::sample`: greedy, or temperature / top-k / top-p from
//! a seed) and streamed as text. `--verify` recomputes the finished sequence in one prefill
//! and compares every step's logits bit for bit; `--verify-cpu N` also runs the CPU reference
//! over the first N tokens. On the GPU when one opens, on the CPU otherwise.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use bitexact::model::{CpuSession, GpuModel, ModelWeights, Session, Trace};
use bitexact::sample::{generate_stream, Sampling};
use bitexact::tokenizer::StreamDecoder;

use crate::output::{usage, usage_err};
use crate::tokenize::{read_text, tokenizer_of};
use crate::{parse_input, parse_positive, PresetArgs, RunArgs};

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// The model file (qwen3moe or qwen35moe) with its vocabulary.
    #[arg(long, value_parser = parse_input, conflicts_with_all = ["preset", "format", "seed", "no_shared"])]
    gguf: Option<PathBuf>,
    /// With a preset (no --gguf): the GGUF file whose vocabulary to use; the preset's vocab
    /// becomes its token count.
    #[arg(long, value_parser = parse_input, conflicts_with = "gguf")]
    vocab: Option<PathBuf>,
    #[command(flatten)]
    preset: PresetArgs,
    /// The prompt.
    #[arg(
        long,
        conflicts_with = "prompt_file",
        required_unless_present = "prompt_file"
    )]
    prompt: Option<String>,
    /// A file holding the prompt (UTF-8).
    #[arg(long, value_parser = parse_input)]
    prompt_file: Option<PathBuf>,
    /// Render the prompt as a user message through the file's chat template
    /// (`tokenizer.chat_template`, with the generation prompt appended).
    #[arg(long)]
    chat: bool,
    /// With --chat: a system message before the user's.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Tokens to generate at most (generation also stops at an end-of-sequence token).
    #[arg(short = 'n', long, default_value_t = 64, value_parser = parse_positive)]
    tokens: usize,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Keep the most likely tokens whose probability reaches p (1: all).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Seed of the draws (with the step, all they depend on).
    #[arg(long = "sample-seed", default_value_t = 0)]
    sample_seed: u64,
    /// Recompute the whole sequence in one prefill and compare every step's logits, bit for
    /// bit.
    #[arg(long)]
    verify: bool,
    /// Also run the CPU reference over the first N tokens of the sequence and compare their
    /// logits (implies --verify).
    #[arg(long, value_parser = parse_positive)]
    verify_cpu: Option<usize>,
    /// KV cache of the attention layers: f32 (the default), f16, fastscan4 or fastscan3 (the
    /// coded modes take head dims 64, 128 or 256); --verify and --verify-cpu use the same.
    #[arg(long, default_value = "f32", value_parser = crate::parse_kv)]
    kv: bitexact::model::KvMode,
    #[command(flatten)]
    run: RunArgs,
}

/// The prompt through the chat template: messages `[system?, user]`, the generation prompt
/// appended (minijinja renders the file's Jinja template).
fn render_chat(template: &str, system: Option<&str>, user: &str) -> Result<String> {
    let mut env = minijinja::Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_template("chat", template)
        .map_err(|e| usage_err(format!("the file's chat template does not parse: {e}")))?;
    let mut messages = Vec::new();
    if let Some(s) = system {
        messages.push(minijinja::context! { role => "system", content => s });
    }
    messages.push(minijinja::context! { role => "user", content => user });
    let t = env.get_template("chat")?;
    t.render(minijinja::context! {
        messages => messages,
        add_generation_prompt => true,
    })
    .map_err(|e| usage_err(format!("rendering the chat template: {e}")))
}

/// Bits that differ between two logit rows (32 for each value one row has and the other not).
fn differing(a: &[f32], b: &[f32]) -> u64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| u64::from((x.to_bits() ^ y.to_bits()).count_ones()))
        .sum::<u64>()
        + 32 * a.len().abs_diff(b.len()) as u64
}

pub fn run(a: &GenerateArgs) -> Result<bool> {
    let sampling = Sampling {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.sample_seed,
    };
    sampling.validate().map_err(usage_err)?;
    // Everything that can refuse the arguments first (the vocabulary, the prompt, the
    // template, the context), the weights after.
    enum Source {
        File(bitexact::gguf::GgufFile),
        Preset,
    }
    let (tok, cfg, source) = match (&a.gguf, &a.vocab) {
        (Some(path), _) => {
            let t = tokenizer_of("--gguf", path)?;
            let f = bitexact::gguf::GgufFile::open(path)?;
            let cfg = bitexact::model::gguf::config(&f, None).map_err(usage_err)?;
            (t, cfg, Source::File(f))
        }
        (None, Some(v)) => {
            let t = tokenizer_of("--vocab", v)?;
            let mut cfg = a.preset.config()?;
            cfg.vocab = t.len();
            (t, cfg, Source::Preset)
        }
        (None, None) => usage!(
            "a vocabulary is needed: --gguf FILE (the model's own), or --vocab FILE with a preset"
        ),
    };
    if tok.len() != cfg.vocab {
        usage!(
            "the vocabulary holds {} tokens, the model's output {}",
            tok.len(),
            cfg.vocab
        );
    }
    let text = match (&a.prompt, &a.prompt_file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => read_text(f)?,
        (None, None) => usage!("give --prompt or --prompt-file"),
    };
    let text = match a.chat {
        true => match tok.chat_template() {
            Some(tpl) => render_chat(tpl, a.system.as_deref(), &text)?,
            None => usage!("--chat: the file carries no tokenizer.chat_template"),
        },
        false => text,
    };
    let prompt = tok.encode(&text, true, true)?;
    if prompt.is_empty() {
        usage!("the prompt is empty after tokenizing");
    }
    let total = prompt.len() + a.tokens;
    if total > cfg.max_context {
        usage!(
            "{} prompt tokens and -n {} exceed the model's context of {} positions",
            prompt.len(),
            a.tokens,
            cfg.max_context
        );
    }
    let w: ModelWeights = match &source {
        Source::File(f) => bitexact::model::gguf::load(f, None, None)?,
        Source::Preset => ModelWeights::generate(&cfg, a.preset.seed, None)?,
    };
    let verify_cpu = a.verify_cpu.map(|n| n.min(total));
    let verify = a.verify || verify_cpu.is_some();
    let (dev, _) = a.run.open_device()?;
    eprintln!(
        "{} prompt tokens, up to {} more ({}; {})",
        prompt.len(),
        a.tokens,
        if sampling.temperature == 0.0 {
            "greedy".to_string()
        } else {
            format!(
                "temperature {}, top-k {}, top-p {}, seed {}",
                a.temperature, a.top_k, a.top_p, a.sample_seed
            )
        },
        match (dev.is_some(), a.kv) {
            (true, bitexact::model::KvMode::F32) => "GPU".to_string(),
            (false, bitexact::model::KvMode::F32) => "CPU reference".to_string(),
            (gpu, kv) => format!(
                "{}, {} KV cache",
                if gpu { "GPU" } else { "CPU reference" },
                crate::kv_name(kv)
            ),
        }
    );
    let mut stream = StreamDecoder::new();
    let mut stdout = std::io::stdout().lock();
    // The first failure to decode or write stops generation and is reported after it.
    let mut failed: Option<anyhow::Error> = None;
    let mut emit = |id: u32| -> bool {
        let r = stream
            .push(&tok, id, false)
            .map_err(anyhow::Error::from)
            .and_then(|s| {
                stdout.write_all(s.as_bytes())?;
                stdout.flush()?;
                Ok(())
            });
        match r {
            Ok(()) => !tok.is_end(id),
            Err(e) => {
                failed = Some(e);
                false
            }
        }
    };
    let gpu_model;
    let gen;
    let t0;
    let mut session = None;
    match &dev {
        Some(dev) => {
            gpu_model = GpuModel::load(dev, &w).context("loading the model onto the GPU")?;
            session = Some(Session::with_kv_mode(dev, &gpu_model, a.kv)?);
            let mut d = bitexact::model::transformer::SessionOnDevice {
                dev,
                session: session.as_mut().unwrap(),
            };
            t0 = Instant::now();
            gen = generate_stream(&mut d, &prompt, a.tokens, &sampling, 0, verify, &mut emit)?;
        }
        None => {
            let mut cpu = cpu_session(&w, a.kv)?;
            t0 = Instant::now();
            gen = generate_stream(&mut cpu, &prompt, a.tokens, &sampling, 0, verify, &mut emit)?;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    if let Some(e) = failed {
        return Err(e.context("writing the generated text"));
    }
    let tail = stream.finish();
    print!("{tail}");
    println!();
    eprintln!(
        "{} tokens in {:.2} s ({:.1} tokens/s, prompt included)",
        gen.tokens.len(),
        secs,
        gen.tokens.len() as f64 / secs
    );
    if !verify {
        return Ok(true);
    }
    // The whole sequence (prompt and drawn tokens but the last, whose logits nothing drew
    // from) in one prefill: step i's logits are the prefill's row prompt.len() - 1 + i.
    let mut seq = prompt.clone();
    seq.extend(&gen.tokens[..gen.tokens.len() - 1]);
    let mut trace = Trace::default();
    let v = w.cfg.vocab;
    match (&dev, session.as_mut()) {
        (Some(dev), Some(s)) => {
            s.reset();
            s.forward(dev, &seq, Some(&mut trace))?;
        }
        _ => cpu_session(&w, a.kv)?.forward(&seq, &mut trace)?,
    }
    let p0 = prompt.len() - 1;
    let mut diff = 0u64;
    for (i, row) in gen.logits.iter().enumerate() {
        diff += differing(row, &trace.logits[(p0 + i) * v..(p0 + i + 1) * v]);
    }
    let where_ = if dev.is_some() { "GPU" } else { "CPU" };
    println!(
        "verified: {} steps, {diff} differing bits (each step's logits against one {where_} prefill of {} tokens)",
        gen.logits.len(),
        seq.len()
    );
    let mut ok = diff == 0;
    if let Some(m) = verify_cpu {
        let m = m.min(seq.len());
        let mut cpu_trace = Trace::default();
        cpu_session(&w, a.kv)?.forward(&seq[..m], &mut cpu_trace)?;
        let d2 = differing(&cpu_trace.logits, &trace.logits[..m * v]);
        println!(
            "verified: the CPU reference over the first {m} tokens, {d2} differing bits against the {where_} prefill"
        );
        ok &= d2 == 0;
    }
    if !ok {
        anyhow::bail!("verification failed: logits differ (see above)");
    }
    Ok(true)
}

/// The CPU reference session with the KV cache `kv`.
fn cpu_session(
    w: &bitexact::model::ModelWeights,
    kv: bitexact::model::KvMode,
) -> Result<CpuSession<'_>> {
    let mut s = CpuSession::new(w);
    s.set_kv_mode(kv)?;
    Ok(s)
}
