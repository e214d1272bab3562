//! The tokenizer a GGUF file declares (`tokenizer.ggml.*`): byte-level
//! BPE (`tokenizer.ggml.model = "gpt2"`, used by SmolLM2, Qwen2, Llama 3,
//! the DeepSeek-R1 distills) with the pre-tokenizer its `pre` names, its
//! control tokens matched whole in text, and a streaming decoder that
//! turns tokens back into bytes and emits only whole UTF-8 characters.

use crate::error::{Error, invalid_model};
use crate::gguf::{Gguf, Value};
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer as HfTokenizer};

/// GGUF token types (llama.cpp's `llama_token_type`).
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// Splitting rules of the pre-tokenizers llama.cpp names in
/// `tokenizer.ggml.pre` (from the models' own tokenizer.json files).
const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A model's tokenizer.
pub struct Tokenizer {
    inner: HfTokenizer,
    /// Each token's bytes (control tokens: their text).
    bytes: Vec<Vec<u8>>,
    /// Control tokens (never shown as text by default).
    control: Vec<bool>,
    /// Token texts by id, for templates and errors.
    texts: Vec<String>,
    /// Beginning of sequence, if the model has one.
    pub bos: Option<u32>,
    /// Tokens that end a generation: end of sequence and end of turn.
    pub stops: Vec<u32>,
    /// Whether a prompt starts with `bos` (`tokenizer.ggml.add_bos_token`).
    pub add_bos: bool,
}

/// The byte GPT-2's byte-level alphabet writes as `c`.
fn byte_of(c: char) -> Option<u8> {
    let c = c as u32;
    let direct = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    if direct(c) {
        return Some(c as u8);
    }
    // The other bytes map, in order, to 256, 257, ...
    let mut n = 256;
    for b in 0..=255u32 {
        if !direct(b) {
            if n == c {
                return Some(b as u8);
            }
            n += 1;
        }
    }
    None
}

fn token_id(gguf: &Gguf, key: &str, vocab: usize) -> Result<Option<u32>, Error> {
    match gguf.metadata.get(key) {
        None => Ok(None),
        Some(Value::UInt(id)) if (*id as usize) < vocab => Ok(Some(*id as u32)),
        Some(other) => Err(invalid_model(format!("gguf: {key} is {other:?}, not a token of the {vocab}-token vocabulary"))),
    }
}

impl Tokenizer {
    /// The tokenizer `gguf` declares.
    pub fn from_gguf(gguf: &Gguf) -> Result<Tokenizer, Error> {
        let model = match gguf.metadata.get("tokenizer.ggml.model") {
            Some(Value::Str(m)) => m.as_str(),
            _ => return Err(invalid_model("gguf: no tokenizer.ggml.model")),
        };
        if model != "gpt2" {
            return Err(Error::Unsupported(format!("the {model:?} tokenizer (byte-level BPE, \"gpt2\", is supported)")));
        }
        let tokens_array = gguf.array("tokenizer.ggml.tokens").ok_or_else(|| invalid_model("gguf: no tokenizer.ggml.tokens"))?;
        let texts: Vec<String> = gguf
            .strings(tokens_array)
            .ok_or_else(|| invalid_model("gguf: tokenizer.ggml.tokens is not a list of strings"))?
            .map(str::to_string)
            .collect();
        let vocab = texts.len();
        let types: Vec<i64> = match gguf.array("tokenizer.ggml.token_type") {
            Some(a) if a.len == vocab => gguf
                .values(a)
                .ok_or_else(|| invalid_model("gguf: tokenizer.ggml.token_type is not a list of numbers"))?
                .map(|v| match v {
                    Value::Int(i) => i,
                    Value::UInt(u) => u as i64,
                    _ => 1,
                })
                .collect(),
            Some(a) => return Err(invalid_model(format!("gguf: {} token types for {vocab} tokens", a.len))),
            None => vec![1; vocab],
        };
        let merges_array = gguf.array("tokenizer.ggml.merges").ok_or_else(|| invalid_model("gguf: a BPE tokenizer without tokenizer.ggml.merges"))?;
        let merges = gguf
            .strings(merges_array)
            .ok_or_else(|| invalid_model("gguf: tokenizer.ggml.merges is not a list of strings"))?
            .map(|m| m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())).ok_or_else(|| invalid_model(format!("gguf: merge {m:?}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let ids: Vocab = texts.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let bpe = BPE::builder()
            .vocab_and_merges(ids, merges)
            .build()
            .map_err(|e| invalid_model(format!("gguf: the BPE vocabulary and merges disagree: {e}")))?;
        let pre = match gguf.metadata.get("tokenizer.ggml.pre") {
            Some(Value::Str(p)) => p.as_str(),
            _ => "default",
        };
        let byte_level = |regex: bool| PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, regex));
        let split = |pattern: &str| -> Result<PreTokenizerWrapper, Error> {
            Split::new(SplitPattern::Regex(pattern.into()), SplitDelimiterBehavior::Isolated, false)
                .map(PreTokenizerWrapper::Split)
                .map_err(|e| Error::Unsupported(format!("pre-tokenizer regex: {e}")))
        };
        let pre_tokenizer = match pre {
            "default" | "gpt2" => byte_level(true),
            "smollm" => PreTokenizerWrapper::Sequence(Sequence::new(vec![PreTokenizerWrapper::Digits(Digits::new(true)), byte_level(true)])),
            "llama-bpe" | "llama3" => PreTokenizerWrapper::Sequence(Sequence::new(vec![split(LLAMA3)?, byte_level(false)])),
            "qwen2" | "deepseek-r1-qwen" => PreTokenizerWrapper::Sequence(Sequence::new(vec![split(QWEN2)?, byte_level(false)])),
            other => return Err(Error::Unsupported(format!("the {other:?} pre-tokenizer (gpt2, smollm, llama-bpe, qwen2 are supported)"))),
        };
        let mut inner = HfTokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        let added: Vec<AddedToken> = texts
            .iter()
            .zip(&types)
            .filter(|(_, t)| **t == CONTROL || **t == USER_DEFINED)
            .map(|(text, t)| AddedToken::from(text.clone(), *t == CONTROL))
            .collect();
        inner.add_special_tokens(added).map_err(|e| invalid_model(format!("gguf: control tokens: {e}")))?;
        let control: Vec<bool> = types.iter().map(|t| *t == CONTROL).collect();
        let bytes = texts
            .iter()
            .zip(&types)
            .map(|(text, t)| match *t {
                CONTROL | USER_DEFINED => text.as_bytes().to_vec(),
                _ => text.chars().map(|c| byte_of(c).unwrap_or(b'?')).collect(),
            })
            .collect();
        let bos = token_id(gguf, "tokenizer.ggml.bos_token_id", vocab)?;
        let mut stops = Vec::new();
        for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            if let Some(id) = token_id(gguf, key, vocab)?
                && !stops.contains(&id)
            {
                stops.push(id);
            }
        }
        let add_bos = matches!(gguf.metadata.get("tokenizer.ggml.add_bos_token"), Some(Value::Bool(true)));
        Ok(Tokenizer { inner, bytes, control, texts, bos, stops, add_bos })
    }

    /// Tokens in the vocabulary.
    pub fn vocab(&self) -> usize {
        self.texts.len()
    }

    /// The tokens of `text`, control tokens written in it matched whole,
    /// with the model's beginning-of-sequence token first when it asks for
    /// one and `text` does not start with it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, Error> {
        let encoding = self.inner.encode(text, false).map_err(|e| crate::error::invalid_input(format!("tokenizing: {e}")))?;
        let mut ids = encoding.get_ids().to_vec();
        if let Some(bos) = self.bos.filter(|_| self.add_bos)
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        Ok(ids)
    }

    /// The text of token `id` (its vocabulary entry; control tokens as written).
    pub fn text(&self, id: u32) -> &str {
        self.texts.get(id as usize).map_or("", String::as_str)
    }

    /// The token whose vocabulary entry is `text`, if one is.
    pub fn token(&self, text: &str) -> Option<u32> {
        self.inner.token_to_id(text)
    }

    /// Whether `id` is a control token.
    pub fn is_control(&self, id: u32) -> bool {
        self.control.get(id as usize).copied().unwrap_or(false)
    }

    /// The text of `ids`, control tokens left out.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut stream = TextStream::default();
        let mut text: String = ids.iter().map(|&id| stream.push(self, id)).collect();
        text.push_str(&stream.finish());
        text
    }
}

/// Turns tokens into text as they come: a token may end in the middle of
/// a UTF-8 character, so bytes wait until their character is whole.
#[derive(Default)]
pub struct TextStream {
    pending: Vec<u8>,
}

impl TextStream {
    /// The text that token `id` completes (control tokens add none).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> String {
        if tokenizer.is_control(id) {
            return String::new();
        }
        self.pending.extend_from_slice(tokenizer.bytes.get(id as usize).map_or(&[][..], Vec::as_slice));
        let whole = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            // Bytes that can still become a character wait; others are invalid.
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => self.pending.len(),
        };
        let rest = self.pending.split_off(whole);
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending = rest;
        text
    }

    /// What is left at the end (an incomplete character, replaced).
    pub fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }
}
