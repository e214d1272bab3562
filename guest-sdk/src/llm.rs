//! Text generation through `gpuwasm:llm`: load a model the deployment may
//! use, render a chat with its template, generate, and read the text as
//! it comes.
//!
//! ```ignore
//! use gpuwasm_guest::llm::{Message, Model, Params};
//!
//! let model = Model::load("smollm2")?;                          // [models] allow = ["smollm2"]
//! let prompt = model.chat(&[Message::user("Hello!")])?;
//! for chunk in model.generate(&prompt, &Params { max_tokens: 64, ..Params::default() })? {
//!     print!("{}", chunk?.text);                                // as the tokens come
//! }
//! ```
//!
//! A [`Generation`] is an iterator of chunks; dropping it cancels the
//! generation before the engine's next step.


#[allow(missing_docs)]
mod bindings {
    wit_bindgen::generate!({
        path: ["../wit/deps/io.wit", "../wit/deps/llm.wit"],
        world: "gpuwasm:llm/llm",
        with: { "wasi:io/poll@0.2.12": wasip2::io::poll },
        default_bindings_module: "gpuwasm_guest::llm::bindings",
    });
}

use bindings::gpuwasm::llm::generate as wit;

pub use wit::FinishReason;

pub use crate::Error;

impl From<wit::Error> for Error {
    fn from(e: wit::Error) -> Self {
        use wit::ErrorCode as C;
        let code = match e.code {
            C::NotFound => "not-found",
            C::Denied => "denied",
            C::InvalidArgument => "invalid-argument",
            C::TooLarge => "too-large",
            C::Unsupported => "unsupported",
            C::RuntimeError => "runtime-error",
        };
        Error { code, message: e.message }
    }
}

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// Its text.
    pub content: String,
}

impl Message {
    /// A message of `role`.
    pub fn new(role: &str, content: &str) -> Message {
        Message { role: role.into(), content: content.into() }
    }

    /// A user's message.
    pub fn user(content: &str) -> Message {
        Message::new("user", content)
    }
}

/// How to generate. The defaults sample at temperature 1 with every
/// filter off; `max_tokens` is capped by the deployment's limit.
#[derive(Clone, Debug, PartialEq)]
pub struct Params {
    /// Tokens to generate at most.
    pub max_tokens: u32,
    /// 0: always the most likely token.
    pub temperature: f32,
    /// Nucleus sampling (1: off).
    pub top_p: f32,
    /// The k most likely tokens only (0: off).
    pub top_k: u32,
    /// Tokens at least this fraction as likely as the best (0: off).
    pub min_p: f32,
    /// Penalises tokens already in the sequence (1: off).
    pub repetition_penalty: f32,
    /// Subtracted once from every generated token's logit.
    pub presence_penalty: f32,
    /// Subtracted per occurrence of a generated token.
    pub frequency_penalty: f32,
    /// The same seed gives the same tokens.
    pub seed: Option<u64>,
    /// Texts that end the generation (not returned).
    pub stop: Vec<String>,
    /// Added to the logits of the tokens named.
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            max_tokens: 256,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            stop: Vec::new(),
            logit_bias: Vec::new(),
        }
    }
}

/// A text model.
pub struct Model(wit::Model);

impl Model {
    /// Loads model `name`: the tenant's own, else the public one. Only
    /// names the manifest's `[models] allow` lists load.
    pub fn load(name: &str) -> Result<Model, Error> {
        Ok(Model(wit::Model::load(name)?))
    }

    /// Tokens a prompt and its generation may take in all.
    pub fn context_length(&self) -> u32 {
        self.0.context_length()
    }

    /// The prompt for `messages` by the model's chat template, ready for
    /// the assistant's answer.
    pub fn chat(&self, messages: &[Message]) -> Result<String, Error> {
        let messages: Vec<wit::Message> = messages.iter().map(|m| wit::Message { role: m.role.clone(), content: m.content.clone() }).collect();
        Ok(self.0.apply_chat_template(&messages, true)?)
    }

    /// The tokens of `text`.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, Error> {
        Ok(self.0.tokenize(text)?)
    }

    /// The text of `tokens`.
    pub fn detokenize(&self, tokens: &[u32]) -> String {
        self.0.detokenize(tokens)
    }

    /// Starts generating after `prompt`.
    pub fn generate(&self, prompt: &str, params: &Params) -> Result<Generation, Error> {
        let p = wit::Params {
            max_tokens: params.max_tokens,
            temperature: params.temperature,
            top_p: params.top_p,
            top_k: params.top_k,
            min_p: params.min_p,
            repetition_penalty: params.repetition_penalty,
            presence_penalty: params.presence_penalty,
            frequency_penalty: params.frequency_penalty,
            seed: params.seed,
            stop: params.stop.clone(),
            logit_bias: params.logit_bias.clone(),
        };
        Ok(Generation(self.0.generate(prompt, &p)?))
    }
}

/// Some generated text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// The text (whole characters).
    pub text: String,
    /// Tokens that made it.
    pub tokens: u32,
}

/// A generation in progress: an iterator of chunks, waiting for each.
/// Dropping it cancels the generation.
pub struct Generation(wit::Generation);

impl Generation {
    /// A pollable ready when the next chunk (or the end) can be read, to
    /// wait on it together with other I/O.
    pub fn subscribe(&self) -> wasip2::io::poll::Pollable {
        self.0.subscribe()
    }

    /// Why it ended, once it has.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.0.finish_reason()
    }

    /// (prompt tokens, tokens generated so far).
    pub fn usage(&self) -> (u32, u32) {
        let u = self.0.usage();
        (u.prompt_tokens, u.completion_tokens)
    }

    /// The tokens it may generate (after the deployment's cap).
    pub fn max_tokens(&self) -> u32 {
        self.0.max_tokens()
    }
}

impl Iterator for Generation {
    type Item = Result<Chunk, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.0.next_chunk() {
            Ok(Some(c)) => Some(Ok(Chunk { text: c.text, tokens: c.tokens })),
            Ok(None) => None,
            Err(e) => Some(Err(e.into())),
        }
    }
}
