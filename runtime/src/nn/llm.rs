//! The host side of `gpuwasm:llm` (wit/deps/llm.wit): text models loaded
//! by name under the same allow-list as wasi-nn, chat templates and
//! tokenizers, and generations a guest reads chunk by chunk (waiting, or
//! through a `wasi:io` pollable). A generation's events come from the
//! model's engine thread through a channel; dropping the generation drops
//! the receiver, which the engine notices before its next step and cancels.

use super::host::{NnView, device_label};
use crate::usage::Meter;
use super::models::{LoadError, Loaded};
use gpuwasm_tensor::llm::engine::{Event, FinishReason, Request};
use gpuwasm_tensor::llm::sample::SamplingParams;
use gpuwasm_tensor::llm::template::Message;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use wasmtime::component::{HasData, Linker, Resource};

mod generated {
    wasmtime::component::bindgen!({
        path: ["../wit/deps/io.wit", "../wit/deps/llm.wit"],
        world: "gpuwasm:llm/llm",
        imports: { default: async | trappable },
        with: {
            "wasi:io": wasmtime_wasi::p2::bindings::io,
            "gpuwasm:llm/generate.model": super::ModelResource,
            "gpuwasm:llm/generate.generation": super::GenerationResource,
        },
    });
}

use generated::gpuwasm::llm::generate::{self, Chunk, Error, ErrorCode, FinishReason as WitFinish, Params, Usage};

/// A text model a guest holds.
pub struct ModelResource(Arc<Loaded>);

/// A generation a guest reads. It holds its model, so the model stays
/// loaded (and charged) while the generation runs, even after the guest
/// drops the model resource.
pub struct GenerationResource {
    _model: Arc<Loaded>,
    events: UnboundedReceiver<Event>,
    /// An event taken by the pollable, not yet returned.
    ready: Option<Event>,
    finish: Option<WitFinish>,
    prompt_tokens: u32,
    completion_tokens: u32,
    max_tokens: u32,
    /// Where the request's usage is metered, when it is; the generation's
    /// tokens and time (submission to its end) go there when it is dropped.
    meter: Option<Arc<Meter>>,
    device: String,
    submitted: Instant,
    took: Option<Duration>,
}

impl Drop for GenerationResource {
    fn drop(&mut self) {
        if let Some(meter) = &self.meter {
            meter.add_tokens(self.prompt_tokens.into(), self.completion_tokens.into());
            meter.add_inference(&self.device, self.took.unwrap_or_else(|| self.submitted.elapsed()));
        }
    }
}

#[async_trait::async_trait]
impl wasmtime_wasi::p2::Pollable for GenerationResource {
    async fn ready(&mut self) {
        if self.ready.is_none() && self.finish.is_none() {
            self.ready = self.events.recv().await;
        }
    }
}

struct HasLlm;

impl HasData for HasLlm {
    type Data<'a> = NnView<'a>;
}

/// Adds `gpuwasm:llm` to `linker`, with `view` finding the state in a store.
pub(crate) fn add_to_linker<T: Send + 'static>(linker: &mut Linker<T>, view: fn(&mut T) -> NnView<'_>) -> wasmtime::Result<()> {
    generate::add_to_linker::<T, HasLlm>(linker, view)
}

type Fallible<T> = wasmtime::Result<Result<T, Error>>;

fn error<T>(code: ErrorCode, message: impl Into<String>) -> Fallible<T> {
    Ok(Err(Error { code, message: message.into() }))
}

fn engine_error<T>(err: gpuwasm_tensor::Error) -> Fallible<T> {
    let code = match err {
        gpuwasm_tensor::Error::InvalidInput(_) => ErrorCode::InvalidArgument,
        gpuwasm_tensor::Error::TooLarge(_) => ErrorCode::TooLarge,
        gpuwasm_tensor::Error::Unsupported(_) | gpuwasm_tensor::Error::InvalidModel(_) => ErrorCode::Unsupported,
    };
    error(code, err.to_string())
}

impl generate::Host for NnView<'_> {}

/// Generations one request may start.
const MAX_GENERATIONS: u32 = 16;
/// Stop texts of one generation, and bytes in each.
const MAX_STOPS: usize = 16;
const MAX_STOP_BYTES: usize = 256;
/// Why `params`' stop texts are refused, if they are: each step of the
/// shared engine pays for them.
fn check_stops(params: &Params) -> Option<String> {
    if params.stop.len() > MAX_STOPS {
        return Some(format!("stop: {} texts, at most {MAX_STOPS}", params.stop.len()));
    }
    if let Some(bad) = params.stop.iter().find(|s| s.is_empty() || s.len() > MAX_STOP_BYTES) {
        return Some(format!("stop: {} bytes in a stop text, 1 to {MAX_STOP_BYTES} allowed", bad.len()));
    }
    None
}

impl NnView<'_> {
    fn model(&self, model: &Resource<ModelResource>) -> wasmtime::Result<Arc<Loaded>> {
        Ok(self.table.get(model)?.0.clone())
    }
}

/// The text model of a model resource.
fn text(loaded: &Loaded) -> &super::models::TextModel {
    loaded.text().expect("model resources hold text models: load refuses graphs")
}

impl generate::HostModel for NnView<'_> {
    async fn load(&mut self, name: String) -> Fallible<Resource<ModelResource>> {
        match self.ctx.models.get(&self.ctx.access, &name).await {
            Ok(loaded) if loaded.text().is_none() => {
                error(ErrorCode::Unsupported, format!("model '{name}' is not a text model (GGUF): use wasi-nn for it"))
            }
            Ok(loaded) => {
                if let Some(meter) = &self.ctx.meter {
                    meter.add_model(&name);
                }
                Ok(Ok(self.table.push(ModelResource(loaded))?))
            }
            Err(LoadError::Denied(m)) => error(ErrorCode::Denied, m),
            Err(LoadError::NotFound(m)) => error(ErrorCode::NotFound, m),
            Err(LoadError::Io(m)) => error(ErrorCode::RuntimeError, format!("model '{name}': {m}")),
            Err(LoadError::Failed(e)) => engine_error(e),
        }
    }

    async fn context_length(&mut self, model: Resource<ModelResource>) -> wasmtime::Result<u32> {
        let loaded = self.model(&model)?;
        Ok(text(&loaded).engine.capacity() as u32)
    }

    async fn apply_chat_template(
        &mut self,
        model: Resource<ModelResource>,
        messages: Vec<generate::Message>,
        add_generation_prompt: bool,
    ) -> Fallible<String> {
        let loaded = self.model(&model)?;
        let Some(template) = &text(&loaded).llm.template else {
            return error(ErrorCode::Unsupported, "this model's file has no chat template (tokenizer.chat_template)");
        };
        let messages: Vec<Message> = messages.into_iter().map(|m| Message { role: m.role, content: m.content }).collect();
        match template.render(&messages, add_generation_prompt) {
            Ok(prompt) => Ok(Ok(prompt)),
            Err(e) => engine_error(e),
        }
    }

    async fn tokenize(&mut self, model: Resource<ModelResource>, prompt: String) -> Fallible<Vec<u32>> {
        let loaded = self.model(&model)?;
        match text(&loaded).llm.tokenizer.encode(&prompt) {
            Ok(tokens) => Ok(Ok(tokens)),
            Err(e) => engine_error(e),
        }
    }

    async fn detokenize(&mut self, model: Resource<ModelResource>, tokens: Vec<u32>) -> wasmtime::Result<String> {
        let loaded = self.model(&model)?;
        Ok(text(&loaded).llm.tokenizer.decode(&tokens))
    }

    async fn generate(&mut self, model: Resource<ModelResource>, prompt: String, params: Params) -> Fallible<Resource<GenerationResource>> {
        let loaded = self.model(&model)?;
        let Some(limits) = &mut self.ctx.generation else {
            return error(ErrorCode::Unsupported, "generating text while the component initialises");
        };
        if limits.started >= MAX_GENERATIONS {
            return error(ErrorCode::TooLarge, format!("a request may start at most {MAX_GENERATIONS} generations"));
        }
        if let Some(why) = check_stops(&params) {
            return error(ErrorCode::InvalidArgument, why);
        }
        limits.started += 1;
        let limits = &*limits;
        let max_tokens = params.max_tokens.min(limits.max_tokens);
        let sampling = SamplingParams {
            temperature: params.temperature,
            top_p: params.top_p,
            top_k: params.top_k as usize,
            min_p: params.min_p,
            repetition_penalty: params.repetition_penalty,
            presence_penalty: params.presence_penalty,
            frequency_penalty: params.frequency_penalty,
            logit_bias: params.logit_bias.into_iter().collect(),
            seed: params.seed,
        };
        if let Err(why) = sampling.check(text(&loaded).llm.model.config.vocab) {
            return error(ErrorCode::InvalidArgument, why);
        }
        if max_tokens == 0 {
            return error(ErrorCode::InvalidArgument, "max-tokens must be at least 1");
        }
        let model = text(&loaded);
        let tokens = match model.llm.tokenizer.encode(&prompt) {
            Ok(tokens) => tokens,
            Err(e) => return engine_error(e),
        };
        let prompt_tokens = tokens.len() as u32;
        let (tx, events) = unbounded_channel();
        let probe = tx.clone();
        let request = Request {
            tenant: self.ctx.access.tenant.as_str().into(),
            prompt: tokens,
            params: sampling,
            max_tokens: max_tokens as usize,
            stop: params.stop,
            sink: Box::new(move |event| tx.send(event).is_ok()),
            cancelled: Box::new(move || probe.is_closed()),
        };
        if let Err(e) = model.engine.submit(request) {
            return engine_error(e);
        }
        self.ctx.models.touch(&loaded);
        // Streaming takes longer than an ordinary request.
        limits.deadline.extend_to(limits.stream_ms);
        let generation = GenerationResource {
            _model: loaded.clone(),
            events,
            ready: None,
            finish: None,
            prompt_tokens,
            completion_tokens: 0,
            max_tokens,
            meter: self.ctx.meter.clone(),
            device: device_label(loaded.device()),
            submitted: Instant::now(),
            took: None,
        };
        Ok(Ok(self.table.push(generation)?))
    }

    async fn drop(&mut self, model: Resource<ModelResource>) -> wasmtime::Result<()> {
        self.table.delete(model)?;
        Ok(())
    }
}

impl generate::HostGeneration for NnView<'_> {
    async fn subscribe(&mut self, generation: Resource<GenerationResource>) -> wasmtime::Result<Resource<wasmtime_wasi::p2::DynPollable>> {
        wasmtime_wasi::p2::subscribe(self.table, generation)
    }

    async fn next_chunk(&mut self, generation: Resource<GenerationResource>) -> Fallible<Option<Chunk>> {
        let g = self.table.get_mut(&generation)?;
        loop {
            if g.finish.is_some() {
                return Ok(Ok(None));
            }
            let event = match g.ready.take() {
                Some(event) => Some(event),
                None => g.events.recv().await,
            };
            match event {
                // Empty texts (a token that ends inside a character) only count.
                Some(Event::Text { text, tokens }) => {
                    g.completion_tokens += tokens as u32;
                    if !text.is_empty() {
                        return Ok(Ok(Some(Chunk { text, tokens: tokens as u32 })));
                    }
                }
                Some(Event::Done { reason, prompt_tokens, completion_tokens }) => {
                    g.prompt_tokens = prompt_tokens as u32;
                    g.completion_tokens = completion_tokens as u32;
                    g.took = Some(g.submitted.elapsed());
                    g.finish = Some(match reason {
                        FinishReason::Stop => WitFinish::Stop,
                        FinishReason::Length => WitFinish::Length,
                        FinishReason::Error(message) => {
                            g.finish = Some(WitFinish::Stop);
                            return error(ErrorCode::RuntimeError, message);
                        }
                    });
                    return Ok(Ok(None));
                }
                None => {
                    g.finish = Some(WitFinish::Stop);
                    return error(ErrorCode::RuntimeError, "the model's engine stopped");
                }
            }
        }
    }

    async fn finish_reason(&mut self, generation: Resource<GenerationResource>) -> wasmtime::Result<Option<WitFinish>> {
        Ok(self.table.get(&generation)?.finish)
    }

    async fn usage(&mut self, generation: Resource<GenerationResource>) -> wasmtime::Result<Usage> {
        let g = self.table.get(&generation)?;
        Ok(Usage { prompt_tokens: g.prompt_tokens, completion_tokens: g.completion_tokens })
    }

    async fn max_tokens(&mut self, generation: Resource<GenerationResource>) -> wasmtime::Result<u32> {
        Ok(self.table.get(&generation)?.max_tokens)
    }

    async fn drop(&mut self, generation: Resource<GenerationResource>) -> wasmtime::Result<()> {
        self.table.delete(generation)?;
        Ok(())
    }
}
