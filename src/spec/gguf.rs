//! Mapping between GGUF model files and the runner: `qwen3moe` and the hybrid `qwen35moe` to
//! [`ModelConfig`] and [`ModelWeights`], and the runner's synthetic models back to GGUF with
//! llama.cpp's tensor names. A hybrid layer `l` is attention when `(l + 1) %
//! full_attention_interval == 0`, a Gated DeltaNet otherwise (`attn_qkv`, `attn_gate`,
//! `ssm_beta`, `ssm_alpha`, `ssm_dt.bias`, `ssm_a`, `ssm_conv1d` stored `[Kc, conv_dim]`,
//! `ssm_norm`, `ssm_out`); its attention queries carry each head's output gate
//! (`[q_h | gate_h]`) and its pre-MoE norm is `post_attention_norm`.
//!
//! Tensor names are llama.cpp's: `token_embd`, `output_norm`, `output` (absent: tied to the
//! embedding), and per layer `blk.N.` + `attn_norm`, `attn_q`, `attn_k`, `attn_v`,
//! `attn_output`, `attn_q_norm`, `attn_k_norm`, `ffn_norm`, `ffn_gate_inp` (the router),
//! `ffn_{gate,up,down}_exps`, and the shared expert's `ffn_{gate,up,down}_shexp` with its gate
//! `ffn_gate_inp_shexp`. GGUF lists dims innermost first: a `[rows, cols]` matrix is stored with
//! dims `[cols, rows]`, a stack of experts as `[cols, rows, experts]`.

use crate::gguf::{GgmlType, GgufError, GgufFile, GgufResult, TensorInfo, Value};
use crate::quant::{dequantize_row, QuantMatrix, WeightFormat};
use crate::spec::config::{HybridConfig, ModelConfig, MoeConfig};
use crate::spec::delta_net::DeltaNetWeights;
use crate::spec::weights::{
    AttentionWeights, LayerWeights, Mixer, ModelWeights, MoeWeights, SharedWeights,
};

/// Architectures the runner builds.
pub const ARCHITECTURES: [&str; 2] = ["qwen3moe", "qwen35moe"];

/// Default cap on the KV cache a loaded model gets (the file's context length is often 40K+).
pub const DEFAULT_MAX_CONTEXT: usize = 4096;

fn meta_u64(f: &GgufFile, key: &str) -> GgufResult<u64> {
    f.get(key)
        .and_then(Value::as_u64)
        .ok_or_else(|| GgufError::Model(format!("metadata `{key}` is missing or not an integer")))
}

fn meta_usize(f: &GgufFile, key: &str) -> GgufResult<usize> {
    usize::try_from(meta_u64(f, key)?).map_err(|_| GgufError::Model(format!("`{key}` too large")))
}

fn tensor<'a>(f: &'a GgufFile, name: &str) -> GgufResult<&'a TensorInfo> {
    f.tensor(name)
        .ok_or_else(|| GgufError::Model(format!("tensor `{name}` is missing")))
}

fn format_of(t: &TensorInfo) -> GgufResult<WeightFormat> {
    t.ty.format().ok_or_else(|| GgufError::UnsupportedType {
        tensor: t.name.clone(),
        type_id: t.ty.id,
        type_name: t.ty.name.to_string(),
    })
}

/// A `[experts, rows, cols]` matrix from a tensor of dims `[cols, rows]` or
/// `[cols, rows, experts]`, checked against the expected shape.
fn matrix(
    f: &GgufFile,
    name: &str,
    experts: usize,
    rows: usize,
    cols: usize,
) -> GgufResult<QuantMatrix> {
    let t = tensor(f, name)?;
    let want: Vec<u64> = match (experts, rows) {
        (1, 1) => vec![cols as u64],
        (1, _) => vec![cols as u64, rows as u64],
        _ => vec![cols as u64, rows as u64, experts as u64],
    };
    let squeezed: Vec<u64> = {
        let mut d = t.dims.clone();
        while d.len() > want.len() && d.last() == Some(&1) {
            d.pop();
        }
        d
    };
    if squeezed != want {
        return Err(GgufError::Model(format!(
            "tensor `{name}` has dims {:?}, expected {want:?}",
            t.dims
        )));
    }
    QuantMatrix::from_bytes(
        format_of(t)?,
        experts,
        rows,
        cols,
        f.tensor_data(t)?.into_owned(),
    )
    .map_err(|e| GgufError::Model(format!("tensor `{name}`: {e}")))
}

/// A vector (norm weights, embedding rows) decoded to f32 exactly as llama.cpp dequantizes it.
fn vector(f: &GgufFile, name: &str, len: usize) -> GgufResult<Vec<f32>> {
    let m = matrix(f, name, 1, 1, len)?;
    Ok(m.dequantize())
}

/// Reads the runner's configuration from a GGUF file's metadata (the KV cache capped at
/// `max_context`, or [`DEFAULT_MAX_CONTEXT`]).
pub fn config(f: &GgufFile, max_context: Option<usize>) -> GgufResult<ModelConfig> {
    let arch = match f.get("general.architecture") {
        Some(Value::String(s)) => s.clone(),
        _ => {
            return Err(GgufError::Model(
                "metadata `general.architecture` is missing".into(),
            ))
        }
    };
    if !ARCHITECTURES.contains(&arch.as_str()) {
        return Err(GgufError::Model(format!(
            "architecture `{arch}` is not supported (the runner builds {})",
            ARCHITECTURES.join(", ")
        )));
    }
    let key = |k: &str| format!("{arch}.{k}");
    let delta_net = f.tensors.iter().find(|t| {
        t.name.contains(".ssm_") || t.name.contains("linear_attn") || t.name.contains(".attn_qkv.")
    });
    let hybrid = match delta_net {
        None => None,
        Some(t) if arch != "qwen35moe" => {
            return Err(GgufError::Model(format!(
                "`{arch}` file with gated-DeltaNet layers (tensor `{}`): only qwen35moe's layout is supported",
                t.name
            )))
        }
        Some(_) => {
            if f.get(&key("attention.recurrent_layers")).is_some() {
                return Err(GgufError::Model(
                    "`attention.recurrent_layers` is not supported: layers follow `full_attention_interval`".into(),
                ));
            }
            let h = HybridConfig {
                full_attention_interval: f
                    .get(&key("full_attention_interval"))
                    .and_then(Value::as_u64)
                    .map_or(4, |v| v as usize),
                k_heads: meta_usize(f, &key("ssm.group_count"))?,
                v_heads: meta_usize(f, &key("ssm.time_step_rank"))?,
                head_dim: meta_usize(f, &key("ssm.state_size"))?,
                conv_kernel: meta_usize(f, &key("ssm.conv_kernel"))?,
            };
            if meta_usize(f, &key("ssm.inner_size"))? != h.head_dim * h.v_heads {
                return Err(GgufError::Model(
                    "`ssm.inner_size` must equal `ssm.state_size * ssm.time_step_rank`".into(),
                ));
            }
            Some(h)
        }
    };
    let dim = meta_usize(f, &key("embedding_length"))?;
    let n_heads = meta_usize(f, &key("attention.head_count"))?;
    let n_kv_heads = meta_usize(f, &key("attention.head_count_kv"))?;
    let head_dim = match f.get(&key("attention.key_length")).and_then(Value::as_u64) {
        Some(v) => v as usize,
        None => dim / n_heads.max(1),
    };
    let n_experts = meta_usize(f, &key("expert_count"))?;
    let top_k = meta_usize(f, &key("expert_used_count"))?;
    let ffn = meta_usize(f, &key("expert_feed_forward_length"))?;
    let shared = f.tensor("blk.0.ffn_gate_shexp.weight").is_some();
    let shared_ffn = if shared {
        Some(
            match f
                .get(&key("expert_shared_feed_forward_length"))
                .and_then(Value::as_u64)
            {
                Some(v) => v as usize,
                None => tensor(f, "blk.0.ffn_gate_shexp.weight")?
                    .dims
                    .get(1)
                    .copied()
                    .unwrap_or(0) as usize,
            },
        )
    } else {
        None
    };
    let vocab = tensor(f, "token_embd.weight")?
        .dims
        .get(1)
        .copied()
        .unwrap_or(0) as usize;
    let fmt = |name: &str| -> GgufResult<WeightFormat> { format_of(tensor(f, name)?) };
    let lm = if f.tensor("output.weight").is_some() {
        "output.weight"
    } else {
        "token_embd.weight"
    };
    let context = f
        .get(&key("context_length"))
        .and_then(Value::as_u64)
        .unwrap_or(4096) as usize;
    let cfg = ModelConfig {
        name: f
            .get("general.name")
            .and_then(|v| match v {
                Value::String(s) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_else(|| arch.clone()),
        n_layers: meta_usize(f, &key("block_count"))?,
        dim,
        n_heads,
        n_kv_heads,
        head_dim,
        rope_dim: f
            .get(&key("rope.dimension_count"))
            .and_then(Value::as_u64)
            .map_or(head_dim, |v| v as usize),
        rope_base: f
            .get(&key("rope.freq_base"))
            .and_then(Value::as_f64)
            .unwrap_or(10_000.0),
        vocab,
        norm_eps: f
            .get(&key("attention.layer_norm_rms_epsilon"))
            .and_then(Value::as_f64)
            .unwrap_or(1e-6) as f32,
        moe: MoeConfig {
            dim,
            n_experts,
            top_k,
            ffn,
            shared_ffn,
            renormalize: !matches!(f.get(&key("expert_weights_norm")), Some(Value::Bool(false))),
            format: fmt("blk.0.ffn_gate_exps.weight")?,
        },
        attn_format: {
            // The first attention layer's query projection (layer 0 is a DeltaNet in a hybrid).
            let first = match &hybrid {
                Some(h) => h.full_attention_interval.max(1) - 1,
                None => 0,
            };
            fmt(&format!("blk.{first}.attn_q.weight"))?
        },
        lm_head_format: fmt(lm)?,
        max_context: context.min(max_context.unwrap_or(DEFAULT_MAX_CONTEXT)),
        hybrid,
    };
    cfg.validate()
        .map_err(|e| GgufError::Model(e.to_string()))?;
    Ok(cfg)
}

/// Loads the weights of the first `layers` layers (all when `None`) of a `qwen3moe` file or a
/// hybrid `qwen35moe` one (its DeltaNet layers by `full_attention_interval`).
pub fn load(
    f: &GgufFile,
    max_context: Option<usize>,
    layers: Option<usize>,
) -> GgufResult<ModelWeights> {
    let cfg = config(f, max_context)?;
    let (d, hd, e, ffn) = (cfg.dim, cfg.head_dim, cfg.moe.n_experts, cfg.moe.ffn);
    let (qd, kvd) = (cfg.n_heads * hd, cfg.n_kv_heads * hd);
    let embed_m = matrix(f, "token_embd.weight", 1, cfg.vocab, d)?;
    let mut embed = Vec::with_capacity(cfg.vocab * d);
    for r in 0..cfg.vocab {
        dequantize_row(embed_m.format(), embed_m.row(0, r), d, &mut embed);
    }
    let lm_head = match f.tensor("output.weight") {
        Some(_) => matrix(f, "output.weight", 1, cfg.vocab, d)?,
        None => embed_m.clone(),
    };
    let n = layers.unwrap_or(cfg.n_layers).min(cfg.n_layers);
    let mut out_layers = Vec::with_capacity(n);
    for l in 0..n {
        let p = |s: &str| format!("blk.{l}.{s}.weight");
        let shared = match cfg.moe.shared_ffn {
            Some(sf) => Some(SharedWeights {
                gate_inp: matrix(f, &p("ffn_gate_inp_shexp"), 1, 1, d)?,
                gate: matrix(f, &p("ffn_gate_shexp"), 1, sf, d)?,
                up: matrix(f, &p("ffn_up_shexp"), 1, sf, d)?,
                down: matrix(f, &p("ffn_down_shexp"), 1, d, sf)?,
            }),
            None => None,
        };
        let mixer = if cfg.is_attention_layer(l) {
            Mixer::Attention(AttentionWeights {
                wq: matrix(f, &p("attn_q"), 1, cfg.q_rows(), d)?,
                wk: matrix(f, &p("attn_k"), 1, kvd, d)?,
                wv: matrix(f, &p("attn_v"), 1, kvd, d)?,
                wo: matrix(f, &p("attn_output"), 1, d, qd)?,
                q_norm: vector(f, &p("attn_q_norm"), hd)?,
                k_norm: vector(f, &p("attn_k_norm"), hd)?,
            })
        } else {
            let dc = cfg
                .delta_net()
                .expect("a DeltaNet layer is in a hybrid model");
            let (s, hv, cd) = (dc.head_dim, dc.v_heads, dc.conv_dim());
            Mixer::DeltaNet(DeltaNetWeights {
                qkv: matrix(f, &p("attn_qkv"), 1, cd, d)?,
                z: matrix(f, &p("attn_gate"), 1, hv * s, d)?,
                beta: matrix(f, &p("ssm_beta"), 1, hv, d)?,
                alpha: matrix(f, &p("ssm_alpha"), 1, hv, d)?,
                dt_bias: vector(f, &format!("blk.{l}.ssm_dt.bias"), hv)?,
                ssm_a: vector(f, &format!("blk.{l}.ssm_a"), hv)?,
                conv: matrix(f, &p("ssm_conv1d"), 1, cd, dc.conv_kernel)?.dequantize(),
                norm: vector(f, &p("ssm_norm"), s)?,
                out: matrix(f, &p("ssm_out"), 1, d, hv * s)?,
                cfg: dc,
            })
        };
        let ffn_norm = if cfg.hybrid.is_some() {
            "post_attention_norm"
        } else {
            "ffn_norm"
        };
        out_layers.push(LayerWeights {
            attn_norm: vector(f, &p("attn_norm"), d)?,
            mixer,
            ffn_norm: vector(f, &p(ffn_norm), d)?,
            moe: MoeWeights {
                cfg: cfg.moe.clone(),
                router: matrix(f, &p("ffn_gate_inp"), 1, e, d)?,
                gate: matrix(f, &p("ffn_gate_exps"), e, ffn, d)?,
                up: matrix(f, &p("ffn_up_exps"), e, ffn, d)?,
                down: matrix(f, &p("ffn_down_exps"), e, d, ffn)?,
                shared,
            },
        });
    }
    Ok(ModelWeights {
        cfg: cfg.clone(),
        embed,
        layers: out_layers,
        out_norm: vector(f, "output_norm.weight", d)?,
        lm_head,
    })
}

fn dims(m: &QuantMatrix) -> Vec<u64> {
    match (m.experts(), m.rows()) {
        (1, 1) => vec![m.cols() as u64],
        (1, r) => vec![m.cols() as u64, r as u64],
        (e, r) => vec![m.cols() as u64, r as u64, e as u64],
    }
}

/// The `qwen3moe` metadata of `c` (llama.cpp's keys and `qwen3moe.vocab_size`), with the
/// `tokenizer.*` entries of `vocab`, or without one, `tokenizer.ggml.model = "none"` (so
/// llama.cpp loads the file without a vocabulary).
fn put_metadata(
    g: &mut crate::gguf::writer::GgufWriter,
    c: &ModelConfig,
    vocab: &[(String, Value)],
) {
    let a = arch_of(c);
    let u = |v: usize| Value::U32(v as u32);
    g.meta("general.architecture", Value::String(a.into()))
        .meta("general.name", Value::String(c.name.clone()));
    if vocab.is_empty() {
        // No vocabulary: the ids are the interface.
        g.meta("tokenizer.ggml.model", Value::String("none".into()));
    }
    for (k, v) in vocab {
        g.meta(k, v.clone());
    }
    g.meta(&format!("{a}.vocab_size"), u(c.vocab))
        .meta(&format!("{a}.block_count"), u(c.n_layers))
        .meta(&format!("{a}.context_length"), u(c.max_context))
        .meta(&format!("{a}.embedding_length"), u(c.dim))
        .meta(&format!("{a}.attention.head_count"), u(c.n_heads))
        .meta(&format!("{a}.attention.head_count_kv"), u(c.n_kv_heads))
        .meta(&format!("{a}.attention.key_length"), u(c.head_dim))
        .meta(&format!("{a}.attention.value_length"), u(c.head_dim))
        .meta(&format!("{a}.rope.dimension_count"), u(c.rope_dim))
        .meta(
            &format!("{a}.rope.freq_base"),
            Value::F32(c.rope_base as f32),
        )
        .meta(
            &format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(c.norm_eps),
        )
        .meta(&format!("{a}.expert_count"), u(c.moe.n_experts))
        .meta(&format!("{a}.expert_used_count"), u(c.moe.top_k))
        .meta(&format!("{a}.expert_feed_forward_length"), u(c.moe.ffn));
    if let Some(sf) = c.moe.shared_ffn {
        g.meta(&format!("{a}.expert_shared_feed_forward_length"), u(sf));
    }
    if let Some(h) = &c.hybrid {
        // IMROPE sections covering the rope_dim / 2 rotated pairs (text positions: NEOX).
        let r = (c.rope_dim / 2) as i32;
        let s0 = (r + 2) / 3;
        let s1 = (r - s0 + 1) / 2;
        g.meta(
            &format!("{a}.rope.dimension_sections"),
            Value::Array(crate::gguf::Array::I32(vec![s0, s1, r - s0 - s1, 0])),
        )
        .meta(&format!("{a}.ssm.conv_kernel"), u(h.conv_kernel))
        .meta(&format!("{a}.ssm.inner_size"), u(h.head_dim * h.v_heads))
        .meta(&format!("{a}.ssm.state_size"), u(h.head_dim))
        .meta(&format!("{a}.ssm.time_step_rank"), u(h.v_heads))
        .meta(&format!("{a}.ssm.group_count"), u(h.k_heads))
        .meta(
            &format!("{a}.full_attention_interval"),
            u(h.full_attention_interval),
        );
    }
}

/// `qwen35moe` for a hybrid model, `qwen3moe` otherwise.
fn arch_of(c: &ModelConfig) -> &'static str {
    if c.hybrid.is_some() {
        "qwen35moe"
    } else {
        "qwen3moe"
    }
}

/// One tensor as the file stores it: name, dims (innermost first), type, bytes.
type FileTensor = (String, Vec<u64>, GgmlType, Vec<u8>);

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn file_matrix(name: String, m: &QuantMatrix) -> FileTensor {
    (name, dims(m), GgmlType::of(m.format()), m.bytes().to_vec())
}

/// The embedding, final norm and LM head, in file order.
fn head_tensors(w: &ModelWeights) -> Vec<FileTensor> {
    let c = &w.cfg;
    let f32_t = GgmlType::of(WeightFormat::F32);
    vec![
        (
            "token_embd.weight".into(),
            vec![c.dim as u64, c.vocab as u64],
            f32_t,
            f32_bytes(&w.embed),
        ),
        (
            "output_norm.weight".into(),
            vec![c.dim as u64],
            f32_t,
            f32_bytes(&w.out_norm),
        ),
        file_matrix("output.weight".into(), &w.lm_head),
    ]
}

/// Layer `l`'s tensors, in file order: llama.cpp's names for `qwen3moe`, and for `qwen35moe`
/// (the pre-MoE norm is `post_attention_norm` there; a DeltaNet layer's `ssm_a` and
/// `ssm_dt.bias` carry no `.weight` suffix; its convolution is stored `[Kc, conv_dim]`).
fn layer_tensors(c: &ModelConfig, l: usize, lw: &LayerWeights) -> Vec<FileTensor> {
    let p = |s: &str| format!("blk.{l}.{s}.weight");
    let f32_t = GgmlType::of(WeightFormat::F32);
    let vector = |name: String, n: usize, v: &[f32]| (name, vec![n as u64], f32_t, f32_bytes(v));
    let ffn_norm = if c.hybrid.is_some() {
        "post_attention_norm"
    } else {
        "ffn_norm"
    };
    let mut t = vec![
        vector(p("attn_norm"), c.dim, &lw.attn_norm),
        vector(p(ffn_norm), c.dim, &lw.ffn_norm),
    ];
    match &lw.mixer {
        Mixer::Attention(a) => t.extend([
            vector(p("attn_q_norm"), c.head_dim, &a.q_norm),
            vector(p("attn_k_norm"), c.head_dim, &a.k_norm),
            file_matrix(p("attn_q"), &a.wq),
            file_matrix(p("attn_k"), &a.wk),
            file_matrix(p("attn_v"), &a.wv),
            file_matrix(p("attn_output"), &a.wo),
        ]),
        Mixer::DeltaNet(d) => {
            let dc = &d.cfg;
            t.extend([
                file_matrix(p("attn_qkv"), &d.qkv),
                file_matrix(p("attn_gate"), &d.z),
                file_matrix(p("ssm_beta"), &d.beta),
                file_matrix(p("ssm_alpha"), &d.alpha),
                file_matrix(p("ssm_out"), &d.out),
                (
                    p("ssm_conv1d"),
                    vec![dc.conv_kernel as u64, dc.conv_dim() as u64],
                    f32_t,
                    f32_bytes(&d.conv),
                ),
                vector(format!("blk.{l}.ssm_dt.bias"), dc.v_heads, &d.dt_bias),
                vector(format!("blk.{l}.ssm_a"), dc.v_heads, &d.ssm_a),
                vector(p("ssm_norm"), dc.head_dim, &d.norm),
            ]);
        }
    }
    t.extend([
        file_matrix(p("ffn_gate_inp"), &lw.moe.router),
        file_matrix(p("ffn_gate_exps"), &lw.moe.gate),
        file_matrix(p("ffn_up_exps"), &lw.moe.up),
        file_matrix(p("ffn_down_exps"), &lw.moe.down),
    ]);
    if let Some(s) = &lw.moe.shared {
        t.push(file_matrix(p("ffn_gate_inp_shexp"), &s.gate_inp));
        t.push(file_matrix(p("ffn_gate_shexp"), &s.gate));
        t.push(file_matrix(p("ffn_up_shexp"), &s.up));
        t.push(file_matrix(p("ffn_down_shexp"), &s.down));
    }
    t
}

/// Writes complete weights as a `qwen3moe` GGUF file (llama.cpp's names and metadata keys;
/// llama.cpp loads it when the model has no shared expert): the tests hand such files to the
/// Python `gguf` reader and to llama.cpp.
pub fn export(w: &ModelWeights) -> GgufResult<Vec<u8>> {
    if !w.is_complete() {
        return Err(GgufError::Model("export needs every layer".into()));
    }
    let mut g = crate::gguf::writer::GgufWriter::new();
    put_metadata(&mut g, &w.cfg, &[]);
    let layers = w.layers.iter().enumerate();
    for (name, d, ty, bytes) in head_tensors(w)
        .into_iter()
        .chain(layers.flat_map(|(l, lw)| layer_tensors(&w.cfg, l, lw)))
    {
        g.tensor(&name, &d, ty, bytes);
    }
    Ok(g.to_bytes())
}

/// Writes the synthetic weights of `cfg` from `seed` (those of [`ModelWeights::generate`]) as
/// the file [`export`] writes, generating and writing one layer at a time, so that a 30B
/// preset never sits in memory whole. `progress(l)` is called after layer `l` is written.
/// Returns the bytes written.
pub fn export_preset(
    cfg: &ModelConfig,
    seed: u64,
    out: &mut impl std::io::Write,
    progress: impl FnMut(usize),
) -> GgufResult<u64> {
    export_preset_with_vocab(cfg, seed, &[], out, progress)
}

/// [`export_preset`] with a vocabulary: `vocab` holds the `tokenizer.*` metadata entries of
/// another file (its tokens, merges, types, special ids, chat template), written in place of
/// `tokenizer.ggml.model = "none"`; `cfg.vocab` must be its token count.
pub fn export_preset_with_vocab(
    cfg: &ModelConfig,
    seed: u64,
    vocab: &[(String, Value)],
    out: &mut impl std::io::Write,
    mut progress: impl FnMut(usize),
) -> GgufResult<u64> {
    if let Some((_, Value::Array(t))) = vocab.iter().find(|(k, _)| k == "tokenizer.ggml.tokens") {
        if t.len() != cfg.vocab {
            return Err(GgufError::Model(format!(
                "the vocabulary holds {} tokens, the model's vocab is {}",
                t.len(),
                cfg.vocab
            )));
        }
    }
    cfg.validate()
        .map_err(|e| GgufError::Model(e.to_string()))?;
    let model_err = |e: crate::Error| GgufError::Model(e.to_string());
    let head = ModelWeights::generate_head(cfg, seed).map_err(model_err)?;
    // Layers of one kind have the same tensors and sizes: the first of each kind gives the
    // infos of all of that kind.
    let rep = |attention: bool| -> GgufResult<Option<LayerWeights>> {
        (0..cfg.n_layers)
            .find(|&l| cfg.is_attention_layer(l) == attention)
            .map(|l| LayerWeights::generate(cfg, seed, l).map_err(model_err))
            .transpose()
    };
    let (attn_rep, dn_rep) = (rep(true)?, rep(false)?);
    let infos = |l: usize| {
        let r = if cfg.is_attention_layer(l) {
            &attn_rep
        } else {
            &dn_rep
        };
        layer_tensors(cfg, l, r.as_ref().expect("a layer of this kind exists"))
    };
    let mut g = crate::gguf::writer::GgufWriter::new();
    put_metadata(&mut g, cfg, vocab);
    let head_t = head_tensors(&head);
    let n_head = head_t.len();
    for (name, d, ty, bytes) in head_t {
        g.tensor(&name, &d, ty, bytes);
    }
    // starts[l]: index (after the head) of layer l's first tensor.
    let mut starts = vec![0usize];
    for l in 0..cfg.n_layers {
        let t = infos(l);
        for (name, d, ty, bytes) in &t {
            g.tensor_deferred(name, d, *ty, bytes.len() as u64);
        }
        starts.push(starts[l] + t.len());
    }
    drop((attn_rep, dn_rep));
    let mut current: Option<(usize, Vec<FileTensor>)> = None;
    let written = g
        .write_streaming(out, |i| {
            let k = i - n_head;
            let l = starts.partition_point(|&s| s <= k) - 1;
            if current.as_ref().is_none_or(|(cl, _)| *cl != l) {
                if let Some((done, _)) = current.take() {
                    progress(done);
                }
                let lw = LayerWeights::generate(cfg, seed, l)
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                current = Some((l, layer_tensors(cfg, l, &lw)));
            }
            let (_, tensors) = current.as_mut().expect("set above");
            Ok(std::mem::take(&mut tensors[k - starts[l]].3))
        })
        .map_err(|e| GgufError::Model(format!("writing the file: {e}")))?;
    if let Some((done, _)) = current {
        progress(done);
    }
    Ok(written)
}
