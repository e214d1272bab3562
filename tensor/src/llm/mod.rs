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
        let tokenizer = tokenizer::Tokenizer::from_gguf(gguf)?;
        let model = model::Llama::load(gguf, backend)?;
        if tokenizer.vocab() > model.config.vocab {
            return Err(crate::error::invalid_model(format!(
                "gguf: the tokenizer has {} tokens, the model's vocabulary {}",
                tokenizer.vocab(),
                model.config.vocab
            )));
        }
        let template = match gguf.metadata.get("tokenizer.chat_template") {
            Some(Value::Str(source)) => {
                let text = |id: Option<u32>| id.map_or("", |id| tokenizer.text(id)).to_string();
                Some(template::ChatTemplate::new(source, &text(tokenizer.bos), &text(tokenizer.stops.first().copied()))?)
            }
            _ => None,
        };
        Ok(Llm { model: Arc::new(model), tokenizer: Arc::new(tokenizer), template })
    }
}
