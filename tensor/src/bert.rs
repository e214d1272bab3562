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

use crate::backend::{Activation, Array, AttentionSpec, DeviceInfo, Epilogue, HostWeight, Pass, SharedBackend, Weight};
use crate::budget::Budget;
use crate::error::{Error, invalid_input, invalid_model};
use crate::model::{Graph, ModelFiles};
use crate::safetensors::SafeTensors;
use crate::tensor::{Data, Tensor};
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

/// Where an encoder's tensors go as they are read: onto a backend when
/// loading, nowhere when checking a push ([`check`]: names, shapes and
/// types only, the bytes never read, so a large file costs no memory).
trait Take {
    /// What a tensor becomes.
    type W;
    /// Matrix `name` of `[rows, cols]`.
    fn matrix(&self, st: &SafeTensors, name: &str, rows: usize, cols: usize) -> Result<Self::W, Error>;
    /// Vector `name` of `len` floats.
    fn vector(&self, st: &SafeTensors, name: &str, len: usize) -> Result<Self::W, Error>;
    /// Row 0 of matrix `name` of `[rows, cols]` (`rows` at least 1).
    fn first_row(&self, st: &SafeTensors, name: &str, rows: usize, cols: usize) -> Result<Self::W, Error>;
}

impl Take for SharedBackend {
    type W = Weight;

    fn matrix(&self, st: &SafeTensors, name: &str, rows: usize, cols: usize) -> Result<Weight, Error> {
        self.weight(st.matrix(name, rows, cols)?)
    }

    fn vector(&self, st: &SafeTensors, name: &str, len: usize) -> Result<Weight, Error> {
        self.weight(HostWeight::vector(st.f32(name, &[len])?))
    }

    fn first_row(&self, st: &SafeTensors, name: &str, rows: usize, cols: usize) -> Result<Weight, Error> {
        let mut all = st.f32(name, &[rows, cols])?;
        all.truncate(cols);
        self.weight(HostWeight::vector(all))
    }
}

/// Tensors checked, not read.
struct Check;

impl Take for Check {
    type W = ();

    fn matrix(&self, st: &SafeTensors, name: &str, rows: usize, cols: usize) -> Result<(), Error> {
        st.check_float(name, &[rows, cols])
    }

    fn vector(&self, st: &SafeTensors, name: &str, len: usize) -> Result<(), Error> {
        st.check_float(name, &[len])
    }

    fn first_row(&self, st: &SafeTensors, name: &str, rows: usize, cols: usize) -> Result<(), Error> {
        st.check_float(name, &[rows, cols])
    }
}

struct Linear<W = Weight> {
    w: W,
    b: W,
}

impl<W> Linear<W> {
    fn read(take: &impl Take<W = W>, st: &SafeTensors, name: &str, out: usize, inp: usize) -> Result<Linear<W>, Error> {
        Ok(Linear { w: take.matrix(st, &format!("{name}.weight"), out, inp)?, b: take.vector(st, &format!("{name}.bias"), out)? })
    }
}

impl Linear {
    fn apply(&self, pass: &Pass, x: &Array, then: Epilogue<&Array>) -> Result<Array, Error> {
        pass.linear_then(x, &self.w, Some(&self.b), then)
    }
}

struct Norm<W = Weight> {
    gamma: W,
    beta: W,
}

impl<W> Norm<W> {
    fn read(take: &impl Take<W = W>, st: &SafeTensors, name: &str, width: usize) -> Result<Norm<W>, Error> {
        Ok(Norm { gamma: take.vector(st, &format!("{name}.weight"), width)?, beta: take.vector(st, &format!("{name}.bias"), width)? })
    }
}

struct Layer<W = Weight> {
    query: Linear<W>,
    key: Linear<W>,
    value: Linear<W>,
    attn_out: Linear<W>,
    attn_norm: Norm<W>,
    up: Linear<W>,
    down: Linear<W>,
    out_norm: Norm<W>,
}

impl Layer {
    /// Bytes its weights take.
    fn bytes(&self) -> u64 {
        let linears = [&self.query, &self.key, &self.value, &self.attn_out, &self.up, &self.down];
        let norms = [&self.attn_norm, &self.out_norm];
        linears.iter().map(|l| l.w.bytes() + l.b.bytes()).sum::<u64>() + norms.iter().map(|n| n.gamma.bytes() + n.beta.bytes()).sum::<u64>()
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Pooling {
    Mean,
    Cls,
}

/// A loaded BERT encoder with its tokenizer, its weights on one backend.
pub struct Bert {
    backend: SharedBackend,
    tokenizer: Tokenizer,
    hidden: usize,
    heads: usize,
    eps: f32,
    vocab: usize,
    word: Weight,
    position: Weight,
    /// Row 0 of the token-type embeddings (every token is of type 0).
    token_type: Weight,
    embed_norm: Norm,
    layers: Vec<Layer>,
    pooling: Pooling,
    normalize: bool,
    max_tokens: usize,
}

fn file<'a>(files: &'a ModelFiles, name: &str) -> Result<&'a [u8], Error> {
    files.get(name).map(|f| &**f).ok_or_else(|| invalid_model(format!("missing {name}")))
}

fn json<T: for<'de> Deserialize<'de>>(files: &ModelFiles, name: &str) -> Result<Option<T>, Error> {
    files
        .get(name)
        .map(|bytes| serde_json::from_slice(bytes).map_err(|e| invalid_model(format!("{name}: {e}"))))
        .transpose()
}

/// An encoder's weights, on a backend (or checked only: `W = ()`).
struct Weights<W = Weight> {
    word: W,
    position: W,
    token_type: W,
    embed_norm: Norm<W>,
    layers: Vec<Layer<W>>,
}

impl<W> Weights<W> {
    /// Every tensor of an encoder of `config` from `model.safetensors`,
    /// through `b`.
    fn read(files: &ModelFiles, config: &Config, b: &impl Take<W = W>) -> Result<Weights<W>, Error> {
        let (h, ffn) = (config.hidden_size, config.intermediate_size);
        let st = SafeTensors::parse(file(files, "model.safetensors")?)?;
        let prefix = if st.entries().contains_key("bert.embeddings.word_embeddings.weight") { "bert." } else { "" };
        let name = |n: &str| format!("{prefix}{n}");
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let l = |n: &str| name(&format!("encoder.layer.{i}.{n}"));
                Ok(Layer {
                    query: Linear::read(b, &st, &l("attention.self.query"), h, h)?,
                    key: Linear::read(b, &st, &l("attention.self.key"), h, h)?,
                    value: Linear::read(b, &st, &l("attention.self.value"), h, h)?,
                    attn_out: Linear::read(b, &st, &l("attention.output.dense"), h, h)?,
                    attn_norm: Norm::read(b, &st, &l("attention.output.LayerNorm"), h)?,
                    up: Linear::read(b, &st, &l("intermediate.dense"), ffn, h)?,
                    down: Linear::read(b, &st, &l("output.dense"), h, ffn)?,
                    out_norm: Norm::read(b, &st, &l("output.LayerNorm"), h)?,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        if config.type_vocab_size == 0 {
            return Err(invalid_model("model.safetensors: no token type embeddings"));
        }
        Ok(Weights {
            word: b.matrix(&st, &name("embeddings.word_embeddings.weight"), config.vocab_size, h)?,
            position: b.matrix(&st, &name("embeddings.position_embeddings.weight"), config.max_position_embeddings, h)?,
            token_type: b.first_row(&st, &name("embeddings.token_type_embeddings.weight"), config.type_vocab_size, h)?,
            embed_norm: Norm::read(b, &st, &name("embeddings.LayerNorm"), h)?,
            layers,
        })
    }
}

/// How an encoder reads text and pools its output.
struct Text {
    tokenizer: Tokenizer,
    max_tokens: usize,
    pooling: Pooling,
    normalize: bool,
}

impl Text {
    fn load(files: &ModelFiles, config: &Config) -> Result<Text, Error> {
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
        Ok(Text { tokenizer, max_tokens, pooling, normalize })
    }
}

impl Config {
    /// `config.json`, checked to describe an encoder we run.
    fn read(files: &ModelFiles) -> Result<Config, Error> {
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
        Ok(config)
    }
}

/// The signature of an encoder of `layers` layers and width `hidden`.
fn signature(layers: usize, hidden: usize) -> String {
    format!("BERT encoder, {layers} layers, dimension {hidden}: text (U8) -> embeddings (FP32 [n, {hidden}]), token_counts (I64 [n])")
}

/// Checks an encoder's files as [`Bert::load`] does, without reading its
/// weights' bytes (a push of a large file costs its header and tokenizer,
/// not its size in memory); returns the signature it would have.
pub fn check(files: &ModelFiles) -> Result<String, Error> {
    let config = Config::read(files)?;
    Text::load(files, &config)?;
    let weights = Weights::read(files, &config, &Check)?;
    Ok(signature(weights.layers.len(), config.hidden_size))
}

impl Bert {
    /// Loads an encoder from its files (see [`FILES`]), its weights on `backend`.
    pub fn load(files: &ModelFiles, backend: SharedBackend) -> Result<Bert, Error> {
        let config = Config::read(files)?;
        let (h, heads) = (config.hidden_size, config.num_attention_heads);
        // The tokenizer's tables build while the weights are copied.
        let (text, weights) = std::thread::scope(|s| {
            let text = s.spawn(|| Text::load(files, &config));
            let weights = Weights::read(files, &config, &backend);
            (text.join().expect("building the tokenizer panicked"), weights)
        });
        let (Weights { word, position, token_type, embed_norm, layers }, text) = (weights?, text?);
        Ok(Bert {
            word,
            position,
            token_type,
            embed_norm,
            backend,
            tokenizer: text.tokenizer,
            hidden: h,
            heads,
            eps: config.layer_norm_eps,
            vocab: config.vocab_size,
            layers,
            pooling: text.pooling,
            normalize: text.normalize,
            max_tokens: text.max_tokens,
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

    /// Embeds token sequences within `budget`: `[n, dimension]`, row-major.
    pub fn embed_tokens(&self, seqs: &[Vec<u32>], budget: &Budget) -> Result<Vec<f32>, Error> {
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        for seq in seqs {
            if seq.len() > self.max_tokens {
                return Err(invalid_input(format!("{} tokens, the model takes at most {}", seq.len(), self.max_tokens)));
            }
            if let Some(id) = seq.iter().find(|&&id| id as usize >= self.vocab) {
                return Err(invalid_input(format!("token id {id} outside the vocabulary of {}", self.vocab)));
            }
            ids.extend_from_slice(seq);
            positions.extend(0..seq.len() as u32);
        }
        let lens: Vec<usize> = seqs.iter().map(Vec::len).collect();
        Pass::new(self.backend.as_ref(), budget).run(|pass| self.encode(pass, &ids, &positions, &lens))
    }

    /// The encoder's pass over packed sequences of `lens` tokens: pooled embeddings.
    fn encode(&self, pass: &Pass, ids: &[u32], positions: &[u32], lens: &[usize]) -> Result<Vec<f32>, Error> {
        let words = pass.embedding(&self.word, ids)?;
        let places = pass.embedding(&self.position, positions)?;
        let sum = pass.add_row(&pass.add(&words, &places)?, &self.token_type)?;
        drop((words, places));
        let mut x = pass.layer_norm(&sum, &self.embed_norm.gamma, &self.embed_norm.beta, self.eps)?;
        drop(sum);
        let (heads, dim) = (self.heads, self.hidden / self.heads);
        let spec = AttentionSpec { lens: lens.to_vec(), heads, kv_heads: heads, dim, causal: false, scale: 1.0 / (dim as f32).sqrt() };
        for layer in &self.layers {
            let [q, k, v] = [&layer.query, &layer.key, &layer.value].map(|l| l.apply(pass, &x, Epilogue::None));
            let context = pass.attention(&q?, &k?, &v?, &spec)?;
            x = add_norm(pass, &layer.attn_out, &context, &x, &layer.attn_norm, self.eps)?;
            let inner = layer.up.apply(pass, &x, Epilogue::Activation(Activation::Gelu))?;
            x = add_norm(pass, &layer.down, &inner, &x, &layer.out_norm, self.eps)?;
        }
        Ok(self.pool(&pass.download(&x)?, lens))
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

/// `norm(linear(x) + residual)`.
fn add_norm(pass: &Pass, linear: &Linear, x: &Array, residual: &Array, norm: &Norm, eps: f32) -> Result<Array, Error> {
    pass.layer_norm(&linear.apply(pass, x, Epilogue::Residual(residual))?, &norm.gamma, &norm.beta, eps)
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
        signature(self.layers.len(), self.hidden)
    }

    fn device(&self) -> &DeviceInfo {
        self.backend.info()
    }

    fn resident_bytes(&self) -> u64 {
        let embeddings = [&self.word, &self.position, &self.token_type, &self.embed_norm.gamma, &self.embed_norm.beta];
        embeddings.iter().map(|w| w.bytes()).sum::<u64>() + self.layers.iter().map(Layer::bytes).sum::<u64>()
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
