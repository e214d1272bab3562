//! BERT-style sentence encoders (all-MiniLM-L6-v2 and its family) in the
//! sentence-transformers layout: text in, pooled embeddings out.
//!
//! The graph takes one input, `text`: a `U8` tensor holding UTF-8, either
//! one text (rank 1) or `n` texts as rows of an `[n, width]` tensor padded
//! with zero bytes. It gives `embeddings` (`FP32 [n, hidden]`: mean- or
//! CLS-pooled, L2-normalised when the model says so) and `token_counts`
//! (`I64 [n]`, tokens per text after truncation, for usage accounting).
//!
//! Tokenising happens on the host with the model's own `tokenizer.json`.
//! Sequences are not padded: the dense layers run over every token of every
//! text at once, and attention runs per text, so a batch of mixed lengths
//! costs what its tokens cost.

use crate::budget::Budget;
use crate::cpu::{View, gelu, gemm, layer_norm, linear, softmax_rows};
use crate::error::{Error, invalid_input, invalid_model};
use crate::model::{Graph, ModelFiles};
use crate::safetensors::SafeTensors;
use crate::tensor::{Data, Tensor};
use rayon::prelude::*;
use serde::Deserialize;
use tokenizers::{Tokenizer, TruncationParams};

/// The files of a model in this layout, relative to its directory.
pub const FILES: &[&str] = &[
    "model.safetensors",
    "config.json",
    "tokenizer.json",
    "modules.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
];

/// Texts one call may carry.
pub const MAX_TEXTS: usize = 2048;

/// Tokens one pass of the encoder takes at most; longer batches run in
/// several passes, so the host's working memory stays bounded (about
/// 100 MiB for MiniLM) whatever a guest sends.
const PASS_TOKENS: usize = 8192;

#[derive(Deserialize)]
struct Config {
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    max_position_embeddings: usize,
    vocab_size: usize,
    #[serde(default = "default_type_vocab")]
    type_vocab_size: usize,
    #[serde(default = "default_eps")]
    layer_norm_eps: f32,
    #[serde(default = "default_act")]
    hidden_act: String,
}

fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f32 {
    1e-12
}
fn default_act() -> String {
    "gelu".into()
}

struct Linear {
    w: Vec<f32>,
    b: Vec<f32>,
    inp: usize,
    out: usize,
}

impl Linear {
    fn load(st: &SafeTensors, name: &str, out: usize, inp: usize) -> Result<Linear, Error> {
        Ok(Linear { w: st.f32(&format!("{name}.weight"), &[out, inp])?, b: st.f32(&format!("{name}.bias"), &[out])?, inp, out })
    }

    /// Fuses linears that read the same input into one wider one.
    fn concat(parts: Vec<Linear>) -> Linear {
        let inp = parts[0].inp;
        Linear {
            out: parts.iter().map(|p| p.out).sum(),
            w: parts.iter().flat_map(|p| p.w.iter().copied()).collect(),
            b: parts.iter().flat_map(|p| p.b.iter().copied()).collect(),
            inp,
        }
    }

    fn apply(&self, x: &[f32], rows: usize) -> Vec<f32> {
        linear(x, rows, self.inp, &self.w, self.out, Some(&self.b))
    }
}

struct Norm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

impl Norm {
    fn load(st: &SafeTensors, name: &str, width: usize) -> Result<Norm, Error> {
        Ok(Norm { gamma: st.f32(&format!("{name}.weight"), &[width])?, beta: st.f32(&format!("{name}.bias"), &[width])? })
    }
}

struct Layer {
    qkv: Linear,
    attn_out: Linear,
    attn_norm: Norm,
    up: Linear,
    down: Linear,
    out_norm: Norm,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Pooling {
    Mean,
    Cls,
}

/// A loaded BERT encoder with its tokenizer.
pub struct Bert {
    tokenizer: Tokenizer,
    hidden: usize,
    heads: usize,
    eps: f32,
    vocab: usize,
    word: Vec<f32>,
    position: Vec<f32>,
    token_type: Vec<f32>,
    embed_norm: Norm,
    layers: Vec<Layer>,
    pooling: Pooling,
    normalize: bool,
    max_tokens: usize,
}

fn file<'a>(files: &'a ModelFiles, name: &str) -> Result<&'a [u8], Error> {
    files.get(name).map(Vec::as_slice).ok_or_else(|| invalid_model(format!("missing {name}")))
}

fn json<T: for<'de> Deserialize<'de>>(files: &ModelFiles, name: &str) -> Result<Option<T>, Error> {
    files
        .get(name)
        .map(|bytes| serde_json::from_slice(bytes).map_err(|e| invalid_model(format!("{name}: {e}"))))
        .transpose()
}

impl Bert {
    /// Loads an encoder from its files (see [`FILES`]).
    pub fn load(files: &ModelFiles) -> Result<Bert, Error> {
        let config: Config = json(files, "config.json")?.ok_or_else(|| invalid_model("missing config.json"))?;
        let (h, heads) = (config.hidden_size, config.num_attention_heads);
        if heads == 0 || h % heads != 0 || config.num_hidden_layers == 0 || config.num_hidden_layers > 256 {
            return Err(invalid_model(format!(
                "config.json: hidden size {h}, {heads} heads, {} layers do not describe an encoder",
                config.num_hidden_layers
            )));
        }
        if config.hidden_act != "gelu" {
            return Err(Error::Unsupported(format!("activation {:?} (only gelu)", config.hidden_act)));
        }
        let st = SafeTensors::parse(file(files, "model.safetensors")?)?;
        let prefix = if st.entries().contains_key("bert.embeddings.word_embeddings.weight") { "bert." } else { "" };
        let name = |n: &str| format!("{prefix}{n}");
        let ffn = config.intermediate_size;
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let l = |n: &str| name(&format!("encoder.layer.{i}.{n}"));
                Ok(Layer {
                    qkv: Linear::concat(vec![
                        Linear::load(&st, &l("attention.self.query"), h, h)?,
                        Linear::load(&st, &l("attention.self.key"), h, h)?,
                        Linear::load(&st, &l("attention.self.value"), h, h)?,
                    ]),
                    attn_out: Linear::load(&st, &l("attention.output.dense"), h, h)?,
                    attn_norm: Norm::load(&st, &l("attention.output.LayerNorm"), h)?,
                    up: Linear::load(&st, &l("intermediate.dense"), ffn, h)?,
                    down: Linear::load(&st, &l("output.dense"), h, ffn)?,
                    out_norm: Norm::load(&st, &l("output.LayerNorm"), h)?,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;

        let (pooling, normalize) = pooling_of(files)?;
        #[derive(Deserialize)]
        struct SentenceConfig {
            max_seq_length: usize,
        }
        let max_tokens = json::<SentenceConfig>(files, "sentence_bert_config.json")?
            .map_or(config.max_position_embeddings, |c| c.max_seq_length)
            .min(config.max_position_embeddings);
        let mut tokenizer = Tokenizer::from_bytes(file(files, "tokenizer.json")?)
            .map_err(|e| invalid_model(format!("tokenizer.json: {e}")))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams { max_length: max_tokens, ..Default::default() }))
            .map_err(|e| invalid_model(format!("tokenizer.json: {e}")))?;
        if tokenizer.get_vocab_size(true) > config.vocab_size {
            return Err(invalid_model(format!(
                "tokenizer.json has {} tokens, the model's vocabulary only {}",
                tokenizer.get_vocab_size(true),
                config.vocab_size
            )));
        }
        Ok(Bert {
            tokenizer,
            hidden: h,
            heads,
            eps: config.layer_norm_eps,
            vocab: config.vocab_size,
            word: st.f32(&name("embeddings.word_embeddings.weight"), &[config.vocab_size, h])?,
            position: st.f32(&name("embeddings.position_embeddings.weight"), &[config.max_position_embeddings, h])?,
            token_type: st.f32(&name("embeddings.token_type_embeddings.weight"), &[config.type_vocab_size, h])?,
            embed_norm: Norm::load(&st, &name("embeddings.LayerNorm"), h)?,
            layers,
            pooling,
            normalize,
            max_tokens,
        })
    }

    /// The width of an embedding.
    pub fn dimension(&self) -> usize {
        self.hidden
    }

    /// Tokenises `texts` (with the model's special tokens, truncated to
    /// its maximum sequence length).
    pub fn tokenize(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>, Error> {
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| invalid_input(format!("tokenizing: {e}")))?;
        Ok(encodings.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// Host memory one pass over `seqs` allocates at its peak: the
    /// per-token activations of a layer (input, query/key/value, context,
    /// attention output, the feed-forward inner layer) and the attention
    /// scores of as many sequence-heads as run at once.
    fn pass_bytes(&self, seqs: &[Vec<u32>]) -> u64 {
        let total: u64 = seqs.iter().map(|s| s.len() as u64).sum();
        let longest = seqs.iter().map(|s| s.len() as u64).max().unwrap_or(0);
        let inner = self.layers.first().map_or(0, |l| l.up.out) as u64;
        let per_token = 6 * self.hidden as u64 + inner;
        let threads = rayon::current_num_threads() as u64;
        4 * (total * per_token + threads * longest * longest)
    }

    /// Embeds token sequences: `[n, dimension]`, row-major, within `budget`.
    pub fn embed_tokens(&self, seqs: &[Vec<u32>], budget: &Budget) -> Result<Vec<f32>, Error> {
        let h = self.hidden;
        let total: usize = seqs.iter().map(Vec::len).sum();
        let _pass = budget.reserve(self.pass_bytes(seqs), || format!("an encoder pass over {total} tokens"))?;
        let mut x = vec![0.0f32; total * h];
        let mut rows = x.chunks_exact_mut(h);
        for seq in seqs {
            if seq.len() > self.max_tokens {
                return Err(invalid_input(format!("{} tokens, the model takes at most {}", seq.len(), self.max_tokens)));
            }
            for (pos, &id) in seq.iter().enumerate() {
                let id = id as usize;
                if id >= self.vocab {
                    return Err(invalid_input(format!("token id {id} outside the vocabulary of {}", self.vocab)));
                }
                let row = rows.next().expect("one row per token");
                let (w, p, t) = (&self.word[id * h..][..h], &self.position[pos * h..][..h], &self.token_type[..h]);
                for (i, v) in row.iter_mut().enumerate() {
                    *v = w[i] + p[i] + t[i];
                }
            }
        }
        layer_norm(&mut x, &self.embed_norm.gamma, &self.embed_norm.beta, self.eps);
        let lens: Vec<usize> = seqs.iter().map(Vec::len).collect();
        for layer in &self.layers {
            let qkv = layer.qkv.apply(&x, total);
            let context = self.attention(&qkv, &lens);
            let mut y = layer.attn_out.apply(&context, total);
            add_norm(&mut y, &x, &layer.attn_norm, self.eps);
            x = y;
            let mut inner = layer.up.apply(&x, total);
            gelu(&mut inner);
            let mut y = layer.down.apply(&inner, total);
            add_norm(&mut y, &x, &layer.out_norm, self.eps);
            x = y;
        }
        Ok(self.pool(&x, &lens))
    }

    /// Self-attention of each sequence over its own tokens, head by head
    /// (in parallel); `qkv` holds `[query | key | value]` per token.
    fn attention(&self, qkv: &[f32], lens: &[usize]) -> Vec<f32> {
        let (h, heads) = (self.hidden, self.heads);
        let dh = h / heads;
        let scale = 1.0 / (dh as f32).sqrt();
        let mut starts = Vec::with_capacity(lens.len());
        let mut at = 0;
        for &len in lens {
            starts.push(at);
            at += len;
        }
        let work: Vec<(usize, usize, usize)> = starts
            .iter()
            .zip(lens)
            .flat_map(|(&start, &len)| (0..heads).map(move |head| (start, len, head)))
            .collect();
        let parts: Vec<Vec<f32>> = work
            .par_iter()
            .map(|&(start, len, head)| {
                let part = |which: usize| View {
                    rows: len,
                    cols: dh,
                    offset: start * 3 * h + which * h + head * dh,
                    row_stride: 3 * h,
                    col_stride: 1,
                };
                let mut scores = vec![0.0; len * len];
                gemm(scale, qkv, part(0), qkv, part(1).t(), 0.0, &mut scores, View::dense(len, len, 0));
                softmax_rows(&mut scores, len);
                let mut out = vec![0.0; len * dh];
                gemm(1.0, &scores, View::dense(len, len, 0), qkv, part(2), 0.0, &mut out, View::dense(len, dh, 0));
                out
            })
            .collect();
        let mut context = vec![0.0; at * h];
        for (&(start, len, head), part) in work.iter().zip(parts) {
            for i in 0..len {
                context[(start + i) * h + head * dh..][..dh].copy_from_slice(&part[i * dh..][..dh]);
            }
        }
        context
    }

    fn pool(&self, x: &[f32], lens: &[usize]) -> Vec<f32> {
        let h = self.hidden;
        let mut out = vec![0.0; lens.len() * h];
        let mut start = 0;
        for (row, &len) in out.chunks_exact_mut(h).zip(lens) {
            let tokens = &x[start * h..(start + len) * h];
            start += len;
            match self.pooling {
                Pooling::Cls => row.copy_from_slice(tokens.get(..h).unwrap_or(&vec![0.0; h])),
                Pooling::Mean => {
                    for token in tokens.chunks_exact(h) {
                        row.iter_mut().zip(token).for_each(|(r, t)| *r += t);
                    }
                    let n = len.max(1) as f32;
                    row.iter_mut().for_each(|r| *r /= n);
                }
            }
            if self.normalize {
                let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                row.iter_mut().for_each(|r| *r /= norm);
            }
        }
        out
    }

    /// Embeds `texts` within `budget`: `[n, dimension]` and the tokens of each.
    pub fn embed(&self, texts: &[&str], budget: &Budget) -> Result<(Vec<f32>, Vec<usize>), Error> {
        let seqs = self.tokenize(texts)?;
        let counts = seqs.iter().map(Vec::len).collect();
        let mut vectors = Vec::with_capacity(seqs.len() * self.hidden);
        let mut rest = seqs.as_slice();
        while !rest.is_empty() {
            // As many sequences as fit in one pass (at least one).
            let mut tokens = 0;
            let take = rest.iter().take_while(|s| {
                tokens += s.len();
                tokens <= PASS_TOKENS
            });
            let n = take.count().max(1);
            vectors.extend(self.embed_tokens(&rest[..n], budget)?);
            rest = &rest[n..];
        }
        Ok((vectors, counts))
    }
}

fn add_norm(y: &mut [f32], residual: &[f32], norm: &Norm, eps: f32) {
    y.iter_mut().zip(residual).for_each(|(a, b)| *a += b);
    layer_norm(y, &norm.gamma, &norm.beta, eps);
}

/// Pooling and normalisation from the sentence-transformers files; a bare
/// BERT checkpoint gets mean pooling without normalisation.
fn pooling_of(files: &ModelFiles) -> Result<(Pooling, bool), Error> {
    #[derive(Deserialize)]
    struct Module {
        #[serde(rename = "type")]
        kind: String,
    }
    #[derive(Deserialize)]
    struct PoolingConfig {
        #[serde(default)]
        pooling_mode_cls_token: bool,
        #[serde(default)]
        pooling_mode_mean_tokens: bool,
        #[serde(default)]
        pooling_mode_max_tokens: bool,
        #[serde(default)]
        pooling_mode_mean_sqrt_len_tokens: bool,
    }
    let modules = json::<Vec<Module>>(files, "modules.json")?.unwrap_or_default();
    let normalize = modules.iter().any(|m| m.kind.ends_with("Normalize"));
    let pooling = match json::<PoolingConfig>(files, "1_Pooling/config.json")? {
        None => Pooling::Mean,
        Some(p) if p.pooling_mode_max_tokens || p.pooling_mode_mean_sqrt_len_tokens => {
            return Err(Error::Unsupported("max and sqrt-length pooling (mean and CLS are supported)".into()));
        }
        Some(p) if p.pooling_mode_cls_token && !p.pooling_mode_mean_tokens => Pooling::Cls,
        Some(_) => Pooling::Mean,
    };
    Ok((pooling, normalize))
}

/// The texts a `text` tensor holds.
fn texts_of(inputs: &[(String, Tensor)]) -> Result<Vec<String>, Error> {
    let [(name, tensor)] = inputs else {
        return Err(invalid_input(format!("this graph takes one input, `text`; got {}", inputs.len())));
    };
    if name != "text" {
        return Err(invalid_input(format!("unknown input {name:?}: this graph takes `text`")));
    }
    let Data::U8(bytes) = tensor.data() else {
        return Err(invalid_input(format!("`text` must be a U8 tensor of UTF-8, not {}", tensor.data().type_name())));
    };
    let rows: Vec<&[u8]> = match tensor.shape() {
        [_] => vec![bytes.as_slice()],
        [n, width] => {
            if *n > MAX_TEXTS {
                return Err(invalid_input(format!("{n} texts in one call; at most {MAX_TEXTS}")));
            }
            bytes.chunks(*width.max(&1)).take(*n).collect()
        }
        shape => return Err(invalid_input(format!("`text` must have rank 1 or 2, not dimensions {shape:?}"))),
    };
    rows.into_iter()
        .enumerate()
        .map(|(i, row)| {
            let end = row.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
            String::from_utf8(row[..end].to_vec()).map_err(|_| invalid_input(format!("text {i} is not UTF-8")))
        })
        .collect()
}

impl Graph for Bert {
    fn signature(&self) -> String {
        format!(
            "BERT encoder, {} layers, dimension {}: text (U8) -> embeddings (FP32 [n, {}]), token_counts (I64 [n])",
            self.layers.len(),
            self.hidden,
            self.hidden
        )
    }

    fn run(&self, inputs: Vec<(String, Tensor)>, budget: &Budget) -> Result<Vec<(String, Tensor)>, Error> {
        self.run_batch(vec![inputs], budget).pop().expect("one result per request")
    }

    fn run_batch(&self, requests: Vec<Vec<(String, Tensor)>>, budget: &Budget) -> Vec<Result<Vec<(String, Tensor)>, Error>> {
        let parsed: Vec<Result<Vec<String>, Error>> = requests.iter().map(|r| texts_of(r)).collect();
        let all: Vec<&str> = parsed.iter().flatten().flatten().map(String::as_str).collect();
        let embedded = self.embed(&all, budget);
        let (h, mut at) = (self.hidden, 0);
        parsed
            .into_iter()
            .map(|texts| {
                let n = texts?.len();
                let (vectors, counts) = embedded.as_ref().map_err(Clone::clone)?;
                let rows = vectors[at * h..(at + n) * h].to_vec();
                let tokens = counts[at..at + n].iter().map(|&c| c as i64).collect();
                at += n;
                Ok(vec![
                    ("embeddings".to_string(), Tensor::f32(vec![n, h], rows)),
                    ("token_counts".to_string(), Tensor::new(vec![n], Data::I64(tokens))?),
                ])
            })
            .collect()
    }
}
