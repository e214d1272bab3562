//! Text generation with llama-family models from GGUF files: the decoder
//! ([`model`]), the tokenizer and chat template the file declares
//! ([`tokenizer`], [`template`]), sampling ([`sample`]), and the engine
//! that runs many sequences of many tenants through one model with
//! continuous batching over a paged key/value cache ([`engine`]).
//! [`Llm::load`] puts the pieces of one file together.

pub mod engine;
pub mod model;
pub mod sample;
pub mod template;
pub mod tokenizer;

use crate::backend::SharedBackend;
use crate::error::Error;
use crate::gguf::{Gguf, Value};
use std::sync::Arc;

/// A loaded model for generation: decoder, tokenizer, chat template.
pub struct Llm {
    /// The decoder, its weights on a backend.
    pub model: Arc<model::Llama>,
    /// Its tokenizer.
    pub tokenizer: Arc<tokenizer::Tokenizer>,
    /// Its chat template, when the file has one.
    pub template: Option<template::ChatTemplate>,
}

impl Llm {
    /// Loads everything a GGUF file declares for generation onto `backend`.
    pub fn load(gguf: &Gguf, backend: SharedBackend) -> Result<Llm, Error> {
        // What the file is first: a file of another kind says so, not
        // what its tokenizer lacks.
        model::LlamaConfig::from_gguf(gguf)?;
        // The tokenizer's tables build while the weights are copied.
        let (text, model) = std::thread::scope(|s| {
            let text = s.spawn(|| text_parts(gguf));
            let model = model::Llama::load(gguf, backend);
            (text.join().expect("building the tokenizer panicked"), model)
        });
        let ((tokenizer, template), model) = (text?, model?);
        check_vocab(&tokenizer, &model.config)?;
        Ok(Llm { model: Arc::new(model), tokenizer: Arc::new(tokenizer), template })
    }

    /// Checks everything [`Llm::load`] would, loading no weights: the
    /// configuration, every tensor's shape and encoding, the tokenizer and
    /// the chat template. Returns a one-line description.
    pub fn check(gguf: &Gguf) -> Result<String, Error> {
        let config = model::Llama::check(gguf)?;
        let (tokenizer, template) = text_parts(gguf)?;
        check_vocab(&tokenizer, &config)?;
        Ok(format!(
            "{} decoder, {} layers, width {}, {} heads ({} key/value), vocabulary {}, context {}{}",
            config.architecture,
            config.layers,
            config.dim,
            config.heads,
            config.kv_heads,
            config.vocab,
            config.context,
            if template.is_some() { ", chat template" } else { ", no chat template" }
        ))
    }
}

/// The tokenizer and chat template `gguf` declares.
fn text_parts(gguf: &Gguf) -> Result<(tokenizer::Tokenizer, Option<template::ChatTemplate>), Error> {
    let tokenizer = tokenizer::Tokenizer::from_gguf(gguf)?;
    let template = match gguf.metadata.get("tokenizer.chat_template") {
        Some(Value::Str(source)) => {
            let text = |id: Option<u32>| id.map_or("", |id| tokenizer.text(id)).to_string();
            Some(template::ChatTemplate::new(source, &text(tokenizer.bos), &text(tokenizer.stops.first().copied()))?)
        }
        _ => None,
    };
    Ok((tokenizer, template))
}

fn check_vocab(tokenizer: &tokenizer::Tokenizer, config: &model::LlamaConfig) -> Result<(), Error> {
    if tokenizer.vocab() > config.vocab {
        return Err(crate::error::invalid_model(format!("gguf: the tokenizer has {} tokens, the model's vocabulary {}", tokenizer.vocab(), config.vocab)));
    }
    Ok(())
}
