//! The generation engine: continuous batching over a paged key/value
//! cache, on a thread of its own per loaded model.
//!
//! The cache is one pool of fixed-size blocks of positions; a sequence
//! takes blocks as it grows and gives them all back the moment it ends,
//! is cancelled, or its receiver goes away, so sequences of any length
//! share the memory without fragmenting it. Every step runs one forward
//! pass over many sequences at once: each running sequence's next token,
//! plus chunks of prompts still being read (at most `step_tokens` in all,
//! so a long prompt is read over several steps and never stalls the
//! others' decoding). A request joins at the next step. Sequences are
//! admitted round-robin over tenants; when every slot is taken and a
//! tenant with nothing running waits, the tenant running the most gives
//! up its newest sequence, which is queued again with what it has
//! generated and recomputed when readmitted (so are sequences that run
//! out of blocks). Tokens come back as text, whole UTF-8 characters only,
//! held back while they might be the start of a stop sequence.

use super::model::{Llama, Step};
use super::sample::{Sampler, SamplingParams};
use super::tokenizer::{TextStream, Tokenizer};
use crate::backend::{CachedSeq, KvCache, Pass};
use crate::budget::Budget;
use crate::error::{Error, invalid_input};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::Arc;

/// How an engine sizes its cache and steps.
#[derive(Clone, Debug)]
pub struct EngineSettings {
    /// Positions the key/value cache holds over all sequences.
    pub cache_tokens: usize,
    /// Positions per block.
    pub block: usize,
    /// Sequences running at once.
    pub max_seqs: usize,
    /// Tokens one step computes at most (decodes and prompt chunks).
    pub step_tokens: usize,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings { cache_tokens: 4096, block: 16, max_seqs: 64, step_tokens: 256 }
    }
}

/// Why a generation ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// The model ended its turn, or a stop sequence came.
    Stop,
    /// `max_tokens`, the model's context or the cache ran out.
    Length,
    /// The engine failed on it (the message says why).
    Error(String),
}

/// What a generation sends its receiver.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Text, and how many tokens produced it.
    Text { text: String, tokens: usize },
    /// The end: why, and the token counts.
    Done { reason: FinishReason, prompt_tokens: usize, completion_tokens: usize },
}

/// A generation to run.
pub struct Request {
    /// Who asked (for fair shares).
    pub tenant: Arc<str>,
    /// The prompt's tokens.
    pub prompt: Vec<u32>,
    /// Sampling.
    pub params: SamplingParams,
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// Texts that end the generation (not sent).
    pub stop: Vec<String>,
    /// Receives the events; returns `false` when nobody listens any more,
    /// which cancels the generation.
    pub sink: Box<dyn FnMut(Event) -> bool + Send>,
    /// Whether nobody listens any more, asked before each step: a waiting
    /// or running sequence whose reader left is dropped there, before it
    /// costs a prefill or a token.
    pub cancelled: Box<dyn Fn() -> bool + Send>,
}

/// What an engine is doing, for tests and `model list`.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Sequences running.
    pub running: AtomicUsize,
    /// Sequences waiting to be admitted.
    pub waiting: AtomicUsize,
    /// Blocks of the cache free.
    pub free_blocks: AtomicUsize,
    /// Blocks in the cache.
    pub total_blocks: AtomicUsize,
    /// Forward steps run.
    pub steps: AtomicU64,
    /// Tokens generated.
    pub generated: AtomicU64,
    /// Generations cancelled by their receiver going away.
    pub cancelled: AtomicU64,
    /// Sequences preempted (recomputed later).
    pub preempted: AtomicU64,
    /// Generations submitted.
    pub generations: AtomicU64,
    /// The most sequences one step held.
    pub largest_step: AtomicUsize,
}

/// A running engine; dropping it stops the thread once its work is done.
pub struct Engine {
    jobs: Sender<Request>,
    /// Its counters.
    pub stats: Arc<EngineStats>,
    capacity: usize,
    /// The model's context (`capacity` is less when the cache is).
    context: usize,
}

impl Engine {
    /// Starts an engine for `model` (its cache allocated now, on the
    /// model's device) whose passes run within `budget`.
    pub fn start(model: Arc<Llama>, tokenizer: Arc<Tokenizer>, settings: EngineSettings, budget: Budget) -> Result<Engine, Error> {
        let block = settings.block.max(1);
        let blocks = (settings.cache_tokens / block).max(1);
        let cache = model.cache(blocks * block)?;
        let stats = Arc::new(EngineStats::default());
        stats.free_blocks.store(blocks, Ordering::Relaxed);
        stats.total_blocks.store(blocks, Ordering::Relaxed);
        let context = model.config.context;
        let capacity = (blocks * block).min(context);
        let (jobs, rx) = channel();
        let mut state = State {
            model,
            tokenizer,
            settings: EngineSettings { block, ..settings },
            budget,
            cache,
            free: (0..blocks as u32).rev().collect(),
            waiting: BTreeMap::new(),
            running: Vec::new(),
            last_tenant: None,
            next_id: 0,
            stats: stats.clone(),
            capacity,
        };
        std::thread::Builder::new()
            .name("gpuwasm-llm".into())
            .spawn(move || state.run(rx))
            .map_err(|e| Error::Unsupported(format!("starting the engine's thread: {e}")))?;
        Ok(Engine { jobs, stats, capacity, context })
    }

    /// Positions one sequence may reach: the model's context, or the cache.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Queues a generation. Its prompt must leave room for a token.
    pub fn submit(&self, request: Request) -> Result<(), Error> {
        if request.prompt.is_empty() {
            return Err(invalid_input("an empty prompt"));
        }
        if request.prompt.len() >= self.capacity {
            let bound = if self.capacity < self.context { "this node's key/value cache for it holds" } else { "the model's context is" };
            return Err(invalid_input(format!(
                "the prompt has {} tokens; {bound} at most {} in all",
                request.prompt.len(),
                self.capacity
            )));
        }
        self.stats.generations.fetch_add(1, Ordering::Relaxed);
        self.jobs.send(request).map_err(|_| Error::Unsupported("the engine stopped".into()))
    }
}

struct Seq {
    id: u64,
    tenant: Arc<str>,
    /// Prompt and generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens whose keys and values are in the cache.
    computed: usize,
    blocks: Vec<u32>,
    sampler: Sampler,
    max_tokens: usize,
    stop: Vec<String>,
    text: TextStream,
    /// Text held back: it may be the start of a stop sequence.
    held: String,
    sink: Box<dyn FnMut(Event) -> bool + Send>,
    cancelled: Box<dyn Fn() -> bool + Send>,
}

impl Seq {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}

struct State {
    model: Arc<Llama>,
    tokenizer: Arc<Tokenizer>,
    settings: EngineSettings,
    budget: Budget,
    cache: Vec<KvCache>,
    free: Vec<u32>,
    waiting: BTreeMap<Arc<str>, VecDeque<Seq>>,
    running: Vec<Seq>,
    last_tenant: Option<Arc<str>>,
    next_id: u64,
    stats: Arc<EngineStats>,
    /// Positions one sequence may reach.
    capacity: usize,
}

impl State {
    fn run(&mut self, rx: Receiver<Request>) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                match rx.recv() {
                    Ok(request) => self.enqueue(request),
                    Err(_) => return,
                }
            }
            while let Ok(request) = rx.try_recv() {
                self.enqueue(request);
            }
            self.drop_cancelled();
            self.admit();
            self.publish();
            if self.running.is_empty() {
                // Nothing admitted: the waiting need blocks nobody holds.
                if let Some(seq) = self.pop_waiting() {
                    self.finish(seq, FinishReason::Length);
                }
                continue;
            }
            self.step();
        }
    }

    /// Drops the waiting and running sequences whose readers left.
    fn drop_cancelled(&mut self) {
        let mut gone = 0;
        for queue in self.waiting.values_mut() {
            let before = queue.len();
            queue.retain(|seq| !(seq.cancelled)());
            gone += before - queue.len();
        }
        self.waiting.retain(|_, queue| !queue.is_empty());
        let mut i = 0;
        while i < self.running.len() {
            if (self.running[i].cancelled)() {
                let mut seq = self.running.remove(i);
                self.release(&mut seq);
                gone += 1;
            } else {
                i += 1;
            }
        }
        self.stats.cancelled.fetch_add(gone as u64, Ordering::Relaxed);
    }

    fn enqueue(&mut self, request: Request) {
        let Request { tenant, prompt, params, max_tokens, stop, sink, cancelled } = request;
        let seq = Seq {
            id: self.next_id,
            tenant: tenant.clone(),
            prompt_len: prompt.len(),
            tokens: prompt,
            computed: 0,
            blocks: Vec::new(),
            sampler: Sampler::new(params),
            max_tokens,
            stop,
            text: TextStream::default(),
            held: String::new(),
            sink,
            cancelled,
        };
        self.next_id += 1;
        self.waiting.entry(tenant).or_default().push_back(seq);
    }

    fn publish(&self) {
        let s = &self.stats;
        s.running.store(self.running.len(), Ordering::Relaxed);
        s.waiting.store(self.waiting.values().map(VecDeque::len).sum(), Ordering::Relaxed);
        s.free_blocks.store(self.free.len(), Ordering::Relaxed);
    }

    /// Blocks a sequence of `positions` needs.
    fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.settings.block)
    }

    /// The next waiting sequence, tenants in turn.
    fn pop_waiting(&mut self) -> Option<Seq> {
        let tenant = crate::turns::next_after(&self.waiting, self.last_tenant.as_ref())?;
        self.last_tenant = Some(tenant.clone());
        self.pop_tenant(&tenant)
    }

    /// Admits waiting sequences while there is room, tenants in turn; a
    /// tenant with nothing running may take a slot from the tenant running
    /// the most.
    fn admit(&mut self) {
        loop {
            if self.waiting.is_empty() {
                return;
            }
            let seq = if self.running.len() < self.settings.max_seqs {
                self.pop_waiting()
            } else {
                let starved = self.waiting.keys().find(|t| !self.running.iter().any(|s| &s.tenant == *t)).cloned();
                // Only when what the busiest tenant gives up makes room.
                let fits = |tenant: &Arc<str>| {
                    let need = self.waiting[tenant].front().map_or(usize::MAX, |s| self.blocks_for(s.tokens.len() + 1));
                    need <= self.free.len() + self.busiest_newest().map_or(0, |i| self.running[i].blocks.len())
                };
                match starved {
                    Some(tenant) if fits(&tenant) && self.preempt_from_busiest() => self.pop_tenant(&tenant),
                    _ => return,
                }
            };
            let Some(seq) = seq else { return };
            let need = self.blocks_for(seq.tokens.len() + 1);
            if need > self.free.len() {
                // Back to the front of its queue; try again when blocks free up.
                let tenant = seq.tenant.clone();
                self.waiting.entry(tenant).or_default().push_front(seq);
                return;
            }
            let mut seq = seq;
            let at = self.free.len() - need;
            seq.blocks = self.free.split_off(at);
            self.running.push(seq);
        }
    }

    /// The next waiting sequence of `tenant`.
    fn pop_tenant(&mut self, tenant: &Arc<str>) -> Option<Seq> {
        let queue = self.waiting.get_mut(tenant)?;
        let seq = queue.pop_front();
        if queue.is_empty() {
            self.waiting.remove(tenant);
        }
        seq
    }

    /// The newest running sequence of the tenant running the most, when
    /// that tenant runs more than one.
    fn busiest_newest(&self) -> Option<usize> {
        let mut counts: BTreeMap<&Arc<str>, usize> = BTreeMap::new();
        for s in &self.running {
            *counts.entry(&s.tenant).or_default() += 1;
        }
        let (tenant, n) = counts.into_iter().max_by_key(|(_, n)| *n)?;
        if n < 2 {
            return None;
        }
        self.running.iter().enumerate().filter(|(_, s)| &s.tenant == tenant).max_by_key(|(_, s)| s.id).map(|(i, _)| i)
    }

    /// Preempts [`State::busiest_newest`]; whether there was one.
    fn preempt_from_busiest(&mut self) -> bool {
        match self.busiest_newest() {
            Some(i) => {
                self.preempt(i);
                true
            }
            None => false,
        }
    }

    /// Gives running sequence `i`'s blocks back and queues it again, first
    /// of its tenant, to be recomputed.
    fn preempt(&mut self, i: usize) {
        let mut seq = self.running.remove(i);
        self.release(&mut seq);
        seq.computed = 0;
        self.stats.preempted.fetch_add(1, Ordering::Relaxed);
        let tenant = seq.tenant.clone();
        self.waiting.entry(tenant).or_default().push_front(seq);
    }

    fn slot(&self, seq: &Seq, position: usize) -> u32 {
        let block = self.settings.block;
        seq.blocks[position / block] * block as u32 + (position % block) as u32
    }

    /// One forward pass over the running sequences.
    fn step(&mut self) {
        // Decodes first (one token each), then prompt chunks, within the
        // step's tokens; each sequence's blocks grow to what it computes.
        let mut plan: Vec<(usize, usize)> = Vec::new(); // (running index, tokens)
        let mut budget = self.settings.step_tokens.max(1);
        let mut order: Vec<usize> = (0..self.running.len()).collect();
        order.sort_by_key(|&i| (self.running[i].tokens.len() - self.running[i].computed > 1, self.running[i].id));
        for i in order {
            if budget == 0 {
                break;
            }
            let seq = &self.running[i];
            let want = (seq.tokens.len() - seq.computed).min(budget);
            // Blocks for the positions it will have computed.
            let need = self.blocks_for(seq.computed + want).saturating_sub(seq.blocks.len());
            let take = need.min(self.free.len());
            let seq = &mut self.running[i];
            let at = self.free.len() - take;
            seq.blocks.extend(self.free.split_off(at));
            let fits = (seq.blocks.len() * self.settings.block).saturating_sub(seq.computed).min(want);
            if fits > 0 {
                plan.push((i, fits));
                budget -= fits;
            }
        }
        if plan.is_empty() {
            // Every sequence needs a block and none is free: the newest
            // gives its blocks up (or, alone, has used the whole cache).
            if self.running.len() == 1 {
                let seq = self.running.remove(0);
                self.finish(seq, FinishReason::Length);
            } else if let Some(newest) = self.running.iter().enumerate().max_by_key(|(_, s)| s.id).map(|(i, _)| i) {
                self.preempt(newest);
            }
            return;
        }
        let mut step = Step { tokens: Vec::new(), positions: Vec::new(), slots: Vec::new(), seqs: Vec::new(), logits: Vec::new() };
        let mut sampled: Vec<usize> = Vec::new();
        for &(i, n) in &plan {
            let seq = &self.running[i];
            let end = seq.computed + n;
            step.tokens.extend_from_slice(&seq.tokens[seq.computed..end]);
            step.positions.extend((seq.computed..end).map(|p| p as u32));
            step.slots.extend((seq.computed..end).map(|p| self.slot(seq, p)));
            step.seqs.push(CachedSeq { queries: n, slots: (0..end).map(|p| self.slot(seq, p)).collect() });
            if end == seq.tokens.len() {
                step.logits.push((step.tokens.len() - 1) as u32);
                sampled.push(i);
            }
        }
        self.stats.largest_step.fetch_max(plan.len(), Ordering::Relaxed);
        let pass = Pass::new(self.model.backend().as_ref(), &self.budget);
        let (model, cache) = (&self.model, &mut self.cache);
        let logits = pass.run(|pass| model.forward(pass, cache, &step));
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        let logits = match logits {
            Ok(l) => l,
            Err(e) => {
                // The pass failed: its sequences end with the reason.
                let mut failed: Vec<usize> = plan.iter().map(|(i, _)| *i).collect();
                failed.sort_unstable_by(|a, b| b.cmp(a));
                for i in failed {
                    let seq = self.running.remove(i);
                    self.finish(seq, FinishReason::Error(e.to_string()));
                }
                return;
            }
        };
        for &(i, n) in &plan {
            self.running[i].computed += n;
        }
        let vocab = self.model.config.vocab;
        let mut done: Vec<(usize, Option<FinishReason>)> = Vec::new();
        for (k, &i) in sampled.iter().enumerate() {
            let mut row = logits[k * vocab..(k + 1) * vocab].to_vec();
            let seq = &mut self.running[i];
            let token = seq.sampler.sample(&mut row, &seq.tokens[..seq.prompt_len], &seq.tokens[seq.prompt_len..]);
            seq.tokens.push(token);
            self.stats.generated.fetch_add(1, Ordering::Relaxed);
            let end = emit(seq, &self.tokenizer, token, self.capacity);
            if end.is_some() {
                done.push((i, end));
            }
        }
        done.sort_unstable_by_key(|d| std::cmp::Reverse(d.0));
        for (i, reason) in done {
            let mut seq = self.running.remove(i);
            match reason {
                Some(FinishReason::Error(_)) | None => {
                    // The receiver went away.
                    self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                    self.release(&mut seq);
                }
                Some(reason) => self.finish(seq, reason),
            }
        }
        self.publish();
    }

    /// Gives `seq`'s blocks back.
    fn release(&mut self, seq: &mut Seq) {
        self.free.append(&mut seq.blocks);
    }

    /// Ends `seq`: its blocks back first (so whoever sees it done sees them
    /// free), then the rest of its text and the final event.
    fn finish(&mut self, mut seq: Seq, reason: FinishReason) {
        self.release(&mut seq);
        self.publish();
        let rest = std::mem::take(&mut seq.held) + &seq.text.finish();
        if !rest.is_empty() && reason != FinishReason::Stop {
            (seq.sink)(Event::Text { text: rest, tokens: 0 });
        }
        let (prompt_tokens, completion_tokens) = (seq.prompt_len, seq.generated());
        (seq.sink)(Event::Done { reason, prompt_tokens, completion_tokens });
    }
}

/// Sends what `token` adds to `seq`'s text; the reason it ends, if it
/// does (`Some(Error)` when its receiver is gone: a cancellation).
fn emit(seq: &mut Seq, tokenizer: &Tokenizer, token: u32, capacity: usize) -> Option<FinishReason> {
    let gone = Some(FinishReason::Error("cancelled".into()));
    if tokenizer.stops.contains(&token) {
        let rest = std::mem::take(&mut seq.held) + &seq.text.finish();
        if !rest.is_empty() && !(seq.sink)(Event::Text { text: rest, tokens: 0 }) {
            return gone;
        }
        return Some(FinishReason::Stop);
    }
    seq.held.push_str(&seq.text.push(tokenizer, token));
    let stop_at = seq.stop.iter().filter_map(|s| seq.held.find(s.as_str())).min();
    if let Some(at) = stop_at {
        let text = seq.held[..at].to_string();
        seq.held.clear();
        if !text.is_empty() && !(seq.sink)(Event::Text { text, tokens: 1 }) {
            return gone;
        }
        return Some(FinishReason::Stop);
    }
    // Hold back the longest tail that may begin a stop sequence.
    let keep = seq
        .stop
        .iter()
        .flat_map(|s| (1..s.len()).filter(|k| s.is_char_boundary(*k)).map(move |k| &s[..k]))
        .filter(|prefix| seq.held.ends_with(prefix))
        .map(str::len)
        .max()
        .unwrap_or(0);
    let send = seq.held.len() - keep;
    let text: String = seq.held.drain(..send).collect();
    if !(seq.sink)(Event::Text { text, tokens: 1 }) {
        return gone;
    }
    if seq.generated() >= seq.max_tokens || seq.tokens.len() >= capacity {
        return Some(FinishReason::Length);
    }
    None
}
