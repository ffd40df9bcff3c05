//! Both directions of trust with the Python `gguf` package, the writer and reader llama.cpp
//! ships: its Q8_0 blocks through our reader, our blocks (every format, Q4_K from our encoder)
//! through its reader; dequantization compared bit for bit.

use std::path::{Path, PathBuf};
use std::process::Command;

use bitexact::gguf::writer::GgufWriter;
use bitexact::gguf::{GgmlType, GgufFile, Value};
use bitexact::model::gguf as model_gguf;
use bitexact::model::{prompt, CpuSession, Trace};
use bitexact::model::{ModelConfig, ModelWeights};
use bitexact::quant::{QuantMatrix, WeightFormat};

/// Whether `python3` with the `gguf` package is there; prints `SKIP` when not, or fails under
/// `BITEXACT_REQUIRE_GGUF_PY=1` (CI installs the package and sets it).
fn python() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import gguf, numpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        if std::env::var("BITEXACT_REQUIRE_GGUF_PY").is_ok_and(|v| v == "1") {
            panic!("BITEXACT_REQUIRE_GGUF_PY=1 but `python3 -c 'import gguf'` fails (pip install gguf)");
        }
        println!("SKIP: the Python gguf package is not installed");
    }
    ok
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/gguf/pyref.py")
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("bitexact-pyref-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(args: &[&str]) {
    let out = Command::new("python3")
        .arg(script())
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pyref.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The dump pyref.py writes: tensor name -> values, and metadata.
fn dump(dir: &Path, stem: &str) -> (Vec<(String, Vec<u32>)>, serde_json::Value) {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(format!("{stem}.json"))).unwrap()).unwrap();
    let raw = std::fs::read(dir.join(format!("{stem}.f32"))).unwrap();
    let words: Vec<u32> = raw
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let tensors = index["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let (o, n) = (
                t["offset"].as_u64().unwrap() as usize,
                t["len"].as_u64().unwrap() as usize,
            );
            (
                t["name"].as_str().unwrap().to_string(),
                words[o..o + n].to_vec(),
            )
        })
        .collect();
    (tensors, index["metadata"].clone())
}

/// Our dequantization of a tensor, as the flat f32 bits.
fn ours(f: &GgufFile, name: &str) -> Vec<u32> {
    let t = f.tensor(name).unwrap();
    let cols = t.dims[0] as usize;
    let rows = (t.elements() / t.dims[0]) as usize;
    let m = QuantMatrix::from_bytes(
        t.ty.format().unwrap(),
        1,
        rows,
        cols,
        f.tensor_data(t).unwrap().into_owned(),
    )
    .unwrap();
    m.dequantize().iter().map(|v| v.to_bits()).collect()
}

#[test]
fn their_q8_0_blocks_through_our_reader() {
    if !python() {
        return;
    }
    let dir = scratch("make");
    run(&["make", dir.to_str().unwrap()]);
    let f = GgufFile::open(dir.join("their.gguf")).unwrap();
    let (theirs, meta) = dump(&dir, "their");
    assert!(theirs.len() > 20);
    for (name, want) in &theirs {
        assert_eq!(
            &ours(&f, name),
            want,
            "dequantization of `{name}` differs from the gguf package's"
        );
    }
    // The config read back is the one written.
    let cfg = model_gguf::config(&f, None).unwrap();
    let c = &meta["config"];
    assert_eq!(cfg.n_layers as u64, c["layers"].as_u64().unwrap());
    assert_eq!(cfg.dim as u64, c["dim"].as_u64().unwrap());
    assert_eq!(cfg.n_heads as u64, c["heads"].as_u64().unwrap());
    assert_eq!(cfg.n_kv_heads as u64, c["kv"].as_u64().unwrap());
    assert_eq!(cfg.head_dim as u64, c["hd"].as_u64().unwrap());
    assert_eq!(cfg.moe.n_experts as u64, c["experts"].as_u64().unwrap());
    assert_eq!(cfg.moe.top_k as u64, c["top_k"].as_u64().unwrap());
    assert_eq!(cfg.moe.ffn as u64, c["ffn"].as_u64().unwrap());
    assert_eq!(cfg.vocab as u64, c["vocab"].as_u64().unwrap());
    assert_eq!(cfg.moe.format, WeightFormat::Q8_0);
    // The runner on the loaded model: batched == chunked == sequential.
    let w = model_gguf::load(&f, None, None).unwrap();
    let tokens = prompt(1, 24, cfg.vocab);
    let trace = |chunk: usize| {
        let mut s = CpuSession::new(&w);
        let mut t = Trace::default();
        for c in tokens.chunks(chunk) {
            s.forward(c, &mut t).unwrap();
        }
        t
    };
    let seq = trace(1);
    for chunk in [24, 5] {
        let other = trace(chunk);
        for (a, b) in seq.layers.iter().zip(&other.layers) {
            assert!(
                a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "chunk {chunk}"
            );
        }
        assert!(seq
            .logits
            .iter()
            .zip(&other.logits)
            .all(|(x, y)| x.to_bits() == y.to_bits()));
    }
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn our_blocks_through_their_reader() {
    if !python() {
        return;
    }
    let dir = scratch("read");
    // Every format from our encoder, rows of 512 with a wide dynamic range.
    let mut g = GgufWriter::new();
    g.meta("general.architecture", Value::String("qwen3moe".into()));
    let values: Vec<f32> = (0..3 * 512)
        .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 97.0 * 2f32.powi((i % 7) - 3))
        .collect();
    for f in WeightFormat::ALL {
        let m = QuantMatrix::quantize(f, &values, 1, 3, 512).unwrap();
        g.tensor(
            &format!("t.{}", f.name()),
            &[512, 3],
            GgmlType::of(f),
            m.bytes().to_vec(),
        );
    }
    let path = dir.join("ours.gguf");
    std::fs::write(&path, g.to_bytes()).unwrap();
    run(&["read", path.to_str().unwrap(), dir.to_str().unwrap()]);
    let f = GgufFile::open(&path).unwrap();
    let (theirs, _) = dump(&dir, "read");
    assert_eq!(theirs.len(), WeightFormat::ALL.len());
    for (name, want) in &theirs {
        assert_eq!(
            &ours(&f, name),
            want,
            "the gguf package decodes our `{name}` differently"
        );
    }

    // A model file: the package reads back the config we wrote.
    let cfg = ModelConfig::preset("small", WeightFormat::Q4K).unwrap();
    let w = ModelWeights::generate(&cfg, 2, None).unwrap();
    let path = dir.join("small.gguf");
    std::fs::write(&path, model_gguf::export(&w).unwrap()).unwrap();
    run(&["read", path.to_str().unwrap(), dir.to_str().unwrap()]);
    let (theirs, meta) = dump(&dir, "read");
    let num = |k: &str| meta[k].as_f64().unwrap_or_else(|| panic!("{k} missing"));
    assert_eq!(num("qwen3moe.block_count") as usize, cfg.n_layers);
    assert_eq!(num("qwen3moe.embedding_length") as usize, cfg.dim);
    assert_eq!(num("qwen3moe.expert_count") as usize, cfg.moe.n_experts);
    assert_eq!(
        num("qwen3moe.expert_feed_forward_length") as usize,
        cfg.moe.ffn
    );
    let f = GgufFile::open(&path).unwrap();
    for (name, want) in &theirs {
        let t = f.tensor(name).unwrap();
        let rows = (t.elements() / t.dims[0]) as usize;
        let m = QuantMatrix::from_bytes(
            t.ty.format().unwrap(),
            1,
            rows,
            t.dims[0] as usize,
            f.tensor_data(t).unwrap().into_owned(),
        )
        .unwrap();
        let got: Vec<u32> = m.dequantize().iter().map(|v| v.to_bits()).collect();
        assert_eq!(&got, want, "`{name}`");
    }
    std::fs::remove_dir_all(dir).ok();
}

/// Random blocks of every quantized format (every code, sign and scale bit pattern, the f16
/// scales and mins patched finite), as a file the package reads: its `dequantize` and ours
/// give the same bits, block for block. The decoders of the formats without an encoder-side
/// witness (Q4_0 .. MXFP4) rest on this.
#[test]
fn random_blocks_of_every_format_through_their_reader() {
    if !python() {
        return;
    }
    let dir = scratch("blocks");
    let mut g = GgufWriter::new();
    g.meta("general.architecture", Value::String("qwen3moe".into()));
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let quantized: Vec<WeightFormat> = WeightFormat::ALL
        .into_iter()
        .filter(|f| f.is_quantized())
        .collect();
    for &f in &quantized {
        let (rows, cols) = (4, 1024);
        let blocks = rows * cols / f.block_elems();
        let bb = f.block_bytes();
        let mut data: Vec<u8> = (0..blocks * bb).map(|_| next() as u8).collect();
        for blk in data.chunks_mut(bb) {
            for &o in f.scale_offsets() {
                // Any finite f16: random sign, exponent below the all-ones one, mantissa.
                let bits = (next() as u16) & 0xfbff;
                blk[o..o + 2].copy_from_slice(&bits.to_le_bytes());
            }
        }
        QuantMatrix::from_bytes(f, 1, rows, cols, data.clone()).unwrap();
        g.tensor(
            &format!("t.{}", f.name()),
            &[cols as u64, rows as u64],
            GgmlType::of(f),
            data,
        );
    }
    let path = dir.join("blocks.gguf");
    std::fs::write(&path, g.to_bytes()).unwrap();
    run(&["read", path.to_str().unwrap(), dir.to_str().unwrap()]);
    let file = GgufFile::open(&path).unwrap();
    let (theirs, _) = dump(&dir, "read");
    assert_eq!(theirs.len(), quantized.len());
    for (name, want) in &theirs {
        let got = ours(&file, name);
        let differ = got.iter().zip(want).filter(|(a, b)| a != b).count();
        assert_eq!(
            differ,
            0,
            "the gguf package decodes `{name}` differently at {differ} of {} values",
            got.len()
        );
    }
    println!(
        "{} formats x 4096 random values: the gguf package's dequantization equals ours",
        quantized.len()
    );
    std::fs::remove_dir_all(dir).ok();
}

/// The other direction for the formats the package has a quantizer for (Q8_0, Q4_0, Q4_1,
/// Q5_0, Q5_1, MXFP4): its blocks, of values over ten decades with zeros, constant rows and tied
/// maxima, through our reader give its dequantization bit for bit.
#[test]
fn their_blocks_of_every_format_they_quantize_through_our_reader() {
    if !python() {
        return;
    }
    let dir = scratch("quants");
    run(&["quants", dir.to_str().unwrap()]);
    let f = GgufFile::open(dir.join("quants.gguf")).unwrap();
    let (theirs, _) = dump(&dir, "quants");
    let names: Vec<&str> = theirs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["q.q8_0", "q.q4_0", "q.q4_1", "q.q5_0", "q.q5_1", "q.mxfp4"]
    );
    for (name, want) in &theirs {
        let got = ours(&f, name);
        let differ = got.iter().zip(want).filter(|(a, b)| a != b).count();
        assert_eq!(
            (differ, got.len()),
            (0, want.len()),
            "our reader decodes the package's `{name}` differently"
        );
    }
    println!(
        "{} formats x 16384 values the gguf package quantized: our dequantization equals its own",
        theirs.len()
    );
    std::fs::remove_dir_all(dir).ok();
}
