//! The llama-family decoder: its configuration and weights from a GGUF
//! file, and one forward step over many sequences at once, written over
//! the backend seam (RMS norm, rotary embeddings, grouped-query attention
//! over a paged key/value cache, SwiGLU), so it runs on every backend.
//! Weights stay in the file's format (quantised blocks included) and are
//! decoded inside the kernels.

use crate::backend::{
    Activation, CachedAttention, CachedSeq, Epilogue, HostData, HostWeight, KvCache, Pass, RopeSpec, SharedBackend, Weight, WeightFormat,
};
use crate::error::{Error, invalid_model};
use crate::gguf::{Gguf, Value};

/// Architectures whose GGUF files this decoder reads (their tensors and
/// metadata follow llama's layout; Qwen2 adds biases on q, k and v).
pub const ARCHITECTURES: [&str; 3] = ["llama", "qwen2", "mistral"];

/// What a decoder's GGUF metadata declares.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// `general.architecture`.
    pub architecture: String,
    /// Transformer blocks.
    pub layers: usize,
    /// Width of the residual stream.
    pub dim: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Values per head.
    pub head_dim: usize,
    /// Width of the feed-forward layer.
    pub ffn: usize,
    /// Tokens in the vocabulary.
    pub vocab: usize,
    /// Positions the model was trained for.
    pub context: usize,
    /// RMS normalisation's epsilon.
    pub eps: f32,
    /// Rotary embedding: base of the frequencies, values rotated per head,
    /// and whether pairs are adjacent (llama's GGUF layout) or halves (NeoX,
    /// Qwen2).
    pub rope_theta: f32,
    /// Values of each head that rotate.
    pub rope_dim: usize,
    /// Adjacent pairs rather than halves.
    pub rope_interleaved: bool,
}

fn uint(gguf: &Gguf, key: &str) -> Result<Option<usize>, Error> {
    match gguf.metadata.get(key) {
        None => Ok(None),
        Some(Value::UInt(v)) => usize::try_from(*v).map(Some).map_err(|_| invalid_model(format!("gguf: {key} = {v} is too large"))),
        Some(Value::Int(v)) if *v >= 0 => Ok(Some(*v as usize)),
        Some(other) => Err(invalid_model(format!("gguf: {key} is {other:?}, expected a count"))),
    }
}

fn float(gguf: &Gguf, key: &str) -> Result<Option<f32>, Error> {
    match gguf.metadata.get(key) {
        None => Ok(None),
        Some(Value::Float(v)) => Ok(Some(*v as f32)),
        Some(other) => Err(invalid_model(format!("gguf: {key} is {other:?}, expected a number"))),
    }
}

/// Bounds on what a file may declare, far past any real model's, so that
/// a hostile file cannot make the engine allocate on its word.
const MAX_DIM: usize = 1 << 16;
const MAX_LAYERS: usize = 1024;
const MAX_CONTEXT: usize = 1 << 20;

impl LlamaConfig {
    /// Reads and checks the configuration of `gguf`.
    pub fn from_gguf(gguf: &Gguf) -> Result<LlamaConfig, Error> {
        let arch = gguf
            .architecture()
            .ok_or_else(|| Error::Unsupported("a GGUF file that names no architecture (general.architecture)".into()))?
            .to_string();
        if !ARCHITECTURES.contains(&arch.as_str()) {
            return Err(Error::Unsupported(format!("the {arch} architecture (llama, qwen2 and mistral are supported)")));
        }
        let need = |key: &str| -> Result<usize, Error> {
            uint(gguf, &format!("{arch}.{key}"))?.ok_or_else(|| invalid_model(format!("gguf: no {arch}.{key}")))
        };
        let (layers, dim, heads, ffn) = (need("block_count")?, need("embedding_length")?, need("attention.head_count")?, need("feed_forward_length")?);
        let kv_heads = uint(gguf, &format!("{arch}.attention.head_count_kv"))?.unwrap_or(heads);
        let vocab = match uint(gguf, &format!("{arch}.vocab_size"))? {
            Some(v) => v,
            None => gguf.array("tokenizer.ggml.tokens").map(|a| a.len).ok_or_else(|| invalid_model("gguf: no vocabulary size"))?,
        };
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) || !dim.is_multiple_of(heads) {
            return Err(invalid_model(format!("gguf: {heads} heads and {kv_heads} key/value heads for a width of {dim}")));
        }
        if dim > MAX_DIM || ffn > 8 * MAX_DIM || layers == 0 || layers > MAX_LAYERS || vocab == 0 || vocab > 1 << 22 {
            return Err(invalid_model(format!("gguf: implausible sizes: {layers} layers, width {dim}, feed-forward {ffn}, vocabulary {vocab}")));
        }
        let head_dim = uint(gguf, &format!("{arch}.attention.key_length"))?.unwrap_or(dim / heads);
        let rope_dim = uint(gguf, &format!("{arch}.rope.dimension_count"))?.unwrap_or(head_dim);
        if head_dim == 0 || head_dim > 512 || rope_dim > head_dim || !rope_dim.is_multiple_of(2) {
            return Err(invalid_model(format!("gguf: heads of {head_dim} values, {rope_dim} of them rotated")));
        }
        if gguf.tensors.contains_key("rope_freqs.weight") {
            return Err(Error::Unsupported("rotary frequency factors (rope_freqs.weight, Llama 3.1's rope scaling)".into()));
        }
        let context = uint(gguf, &format!("{arch}.context_length"))?.unwrap_or(2048).clamp(1, MAX_CONTEXT);
        Ok(LlamaConfig {
            layers,
            dim,
            heads,
            kv_heads,
            head_dim,
            ffn,
            vocab,
            context,
            eps: float(gguf, &format!("{arch}.attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5),
            rope_theta: float(gguf, &format!("{arch}.rope.freq_base"))?.unwrap_or(10000.0),
            rope_dim,
            // llama.cpp stores llama's q and k so that adjacent pairs rotate;
            // Qwen2 keeps NeoX's halves.
            rope_interleaved: arch != "qwen2",
            architecture: arch,
        })
    }

    /// Values of one position's keys (or values), all key/value heads.
    pub fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

struct Block {
    attn_norm: Weight,
    q: Weight,
    k: Weight,
    v: Weight,
    q_bias: Option<Weight>,
    k_bias: Option<Weight>,
    v_bias: Option<Weight>,
    out: Weight,
    ffn_norm: Weight,
    gate: Weight,
    up: Weight,
    down: Weight,
}

/// A loaded decoder, its weights on one backend.
pub struct Llama {
    /// Its configuration.
    pub config: LlamaConfig,
    backend: SharedBackend,
    embed: Weight,
    blocks: Vec<Block>,
    norm: Weight,
    /// `None`: the output projection is the embedding table (tied).
    output: Option<Weight>,
}

/// One forward step: the new tokens of some sequences, each sequence's
/// rows in turn.
pub struct Step {
    /// The tokens.
    pub tokens: Vec<u32>,
    /// The position of each token in its sequence.
    pub positions: Vec<u32>,
    /// The cache slot each token's keys and values go to.
    pub slots: Vec<u32>,
    /// The sequences, in the order of their rows: how many new tokens
    /// each has, and the slots of all its positions.
    pub seqs: Vec<CachedSeq>,
    /// The rows whose next-token logits are wanted (a sequence's last row,
    /// unless it is in the middle of its prompt).
    pub logits: Vec<u32>,
}

/// A tensor the decoder reads: its name, its shape as `[rows, cols]`
/// (`rows` 1 for vectors), and whether a file may leave it out.
struct Tensor {
    name: String,
    rows: usize,
    cols: usize,
    optional: bool,
}

/// Every tensor a decoder of `c` reads, in one place for checking and
/// loading.
fn layout(c: &LlamaConfig) -> Vec<Tensor> {
    let t = |name: String, rows: usize, cols: usize, optional: bool| Tensor { name, rows, cols, optional };
    let (q_rows, kv_rows) = (c.heads * c.head_dim, c.kv_width());
    let mut all = vec![
        t("token_embd.weight".into(), c.vocab, c.dim, false),
        t("output_norm.weight".into(), 1, c.dim, false),
        t("output.weight".into(), c.vocab, c.dim, true),
    ];
    for i in 0..c.layers {
        let n = |part: &str| format!("blk.{i}.{part}");
        all.extend([
            t(n("attn_norm.weight"), 1, c.dim, false),
            t(n("attn_q.weight"), q_rows, c.dim, false),
            t(n("attn_k.weight"), kv_rows, c.dim, false),
            t(n("attn_v.weight"), kv_rows, c.dim, false),
            t(n("attn_q.bias"), 1, q_rows, true),
            t(n("attn_k.bias"), 1, kv_rows, true),
            t(n("attn_v.bias"), 1, kv_rows, true),
            t(n("attn_output.weight"), c.dim, q_rows, false),
            t(n("ffn_norm.weight"), 1, c.dim, false),
            t(n("ffn_gate.weight"), c.ffn, c.dim, false),
            t(n("ffn_up.weight"), c.ffn, c.dim, false),
            t(n("ffn_down.weight"), c.dim, c.ffn, false),
        ]);
    }
    all
}

impl Llama {
    /// Checks `gguf`'s configuration and every tensor's presence, shape and
    /// encoding against it, copying nothing: what a push runs.
    pub fn check(gguf: &Gguf) -> Result<LlamaConfig, Error> {
        let config = LlamaConfig::from_gguf(gguf)?;
        for t in layout(&config) {
            if !t.optional || gguf.tensors.contains_key(&t.name) {
                tensor_bytes(gguf, &t.name, t.rows, t.cols)?;
            }
        }
        Ok(config)
    }

    /// Loads the decoder of `gguf` onto `backend`, checking every tensor's
    /// presence, shape and encoding against the configuration first.
    pub fn load(gguf: &Gguf, backend: SharedBackend) -> Result<Llama, Error> {
        let config = Self::check(gguf)?;
        let mut weights = std::collections::HashMap::new();
        for t in layout(&config) {
            if gguf.tensors.contains_key(&t.name) {
                weights.insert(t.name.clone(), backend.weight(host_weight(gguf, &t.name, t.rows, t.cols)?)?);
            }
        }
        // Every required tensor was checked present above.
        let mut take = |name: String| weights.remove(&name);
        let blocks = (0..config.layers)
            .map(|i| {
                let mut n = |part: &str| take(format!("blk.{i}.{part}"));
                Block {
                    attn_norm: n("attn_norm.weight").expect("checked"),
                    q: n("attn_q.weight").expect("checked"),
                    k: n("attn_k.weight").expect("checked"),
                    v: n("attn_v.weight").expect("checked"),
                    q_bias: n("attn_q.bias"),
                    k_bias: n("attn_k.bias"),
                    v_bias: n("attn_v.bias"),
                    out: n("attn_output.weight").expect("checked"),
                    ffn_norm: n("ffn_norm.weight").expect("checked"),
                    gate: n("ffn_gate.weight").expect("checked"),
                    up: n("ffn_up.weight").expect("checked"),
                    down: n("ffn_down.weight").expect("checked"),
                }
            })
            .collect();
        Ok(Llama {
            embed: take("token_embd.weight".into()).expect("checked"),
            norm: take("output_norm.weight".into()).expect("checked"),
            output: take("output.weight".into()),
            blocks,
            backend,
            config,
        })
    }

    /// The backend it runs on.
    pub fn backend(&self) -> &SharedBackend {
        &self.backend
    }

    /// Bytes its weights hold on the device.
    pub fn resident_bytes(&self) -> u64 {
        let blocks: u64 = self
            .blocks
            .iter()
            .map(|b| {
                let biases = [&b.q_bias, &b.k_bias, &b.v_bias].iter().filter_map(|w| w.as_ref().map(Weight::bytes)).sum::<u64>();
                [&b.attn_norm, &b.q, &b.k, &b.v, &b.out, &b.ffn_norm, &b.gate, &b.up, &b.down].iter().map(|w| w.bytes()).sum::<u64>() + biases
            })
            .sum();
        blocks + self.embed.bytes() + self.norm.bytes() + self.output.as_ref().map_or(0, Weight::bytes)
    }

    /// A key/value cache of `slots` positions for every layer.
    pub fn cache(&self, slots: usize) -> Result<Vec<KvCache>, Error> {
        (0..self.config.layers).map(|_| self.backend.kv_cache(slots, self.config.kv_width())).collect()
    }

    /// Runs `step`: writes its tokens' keys and values into `cache` and
    /// returns the logits of its `logits` rows, `[step.logits.len(), vocab]`
    /// row after row.
    pub fn forward(&self, pass: &Pass, cache: &mut [KvCache], step: &Step) -> Result<Vec<f32>, Error> {
        let c = &self.config;
        let n = step.tokens.len();
        if step.positions.len() != n || step.slots.len() != n || step.seqs.iter().map(|s| s.queries).sum::<usize>() != n || cache.len() != c.layers {
            return Err(crate::error::invalid_input("a decoder step whose tokens, positions, slots and sequences disagree"));
        }
        let rope = |heads: usize| RopeSpec { heads, dim: c.head_dim, rotated: c.rope_dim, theta: c.rope_theta, interleaved: c.rope_interleaved };
        let attention = CachedAttention {
            heads: c.heads,
            kv_heads: c.kv_heads,
            dim: c.head_dim,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
            seqs: step.seqs.clone(),
        };
        let mut x = pass.embedding(&self.embed, &step.tokens)?;
        for (block, layer_cache) in self.blocks.iter().zip(cache.iter_mut()) {
            let h = pass.rms_norm(&x, &block.attn_norm, c.eps)?;
            let q = pass.rope(&pass.linear(&h, &block.q, block.q_bias.as_ref())?, &step.positions, &rope(c.heads))?;
            let k = pass.rope(&pass.linear(&h, &block.k, block.k_bias.as_ref())?, &step.positions, &rope(c.kv_heads))?;
            let v = pass.linear(&h, &block.v, block.v_bias.as_ref())?;
            drop(h);
            pass.write_kv(layer_cache, &k, &v, &step.slots)?;
            let attended = pass.cached_attention(&q, layer_cache, &attention)?;
            x = pass.linear_then(&attended, &block.out, None, Epilogue::Residual(&x))?;
            let h = pass.rms_norm(&x, &block.ffn_norm, c.eps)?;
            let gate = pass.linear_then(&h, &block.gate, None, Epilogue::Activation(Activation::Silu))?;
            let hidden = pass.mul(&gate, &pass.linear(&h, &block.up, None)?)?;
            x = pass.linear_then(&hidden, &block.down, None, Epilogue::Residual(&x))?;
        }
        if step.logits.is_empty() {
            return Ok(Vec::new());
        }
        let last = pass.rms_norm(&pass.select_rows(&x, &step.logits)?, &self.norm, c.eps)?;
        let logits = pass.linear(&last, self.output.as_ref().unwrap_or(&self.embed), None)?;
        pass.download(&logits)
    }
}

/// Tensor `name` of the file as a `rows` x `cols` weight in its encoding,
/// checked against what the configuration says it must be.
/// Tensor `name`'s format and bytes, after checking it is `[rows, cols]`
/// in a format the kernels read.
fn tensor_bytes<'a>(gguf: &Gguf<'a>, name: &str, rows: usize, cols: usize) -> Result<(WeightFormat, &'a [u8]), Error> {
    let info = gguf.tensors.get(name).ok_or_else(|| invalid_model(format!("gguf: no tensor {name}")))?;
    let shape_ok = match info.dims.as_slice() {
        [c] => rows == 1 && *c == cols,
        [c, r] => *c == cols && *r == rows,
        _ => false,
    };
    if !shape_ok {
        return Err(invalid_model(format!("gguf: tensor {name} is {:?}, the architecture needs [{cols}, {rows}]", info.dims)));
    }
    let format = info.ty.format().ok_or_else(|| Error::Unsupported(format!("gguf: tensor {name} is {}", info.ty.name())))?;
    if format.row_bytes(cols).is_none() {
        return Err(invalid_model(format!("gguf: tensor {name}: {cols} columns are not whole {format:?} blocks")));
    }
    Ok((format, gguf.raw(name).expect("listed above")))
}

fn host_weight(gguf: &Gguf, name: &str, rows: usize, cols: usize) -> Result<HostWeight, Error> {
    let (format, bytes) = tensor_bytes(gguf, name, rows, cols)?;
    Ok(match format {
        WeightFormat::F32 => HostWeight::f32(rows, cols, crate::quant::decode(format, bytes)),
        _ => HostWeight { rows, cols, data: HostData::Encoded(format, bytes.to_vec()) },
    })
}
