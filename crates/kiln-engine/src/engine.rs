//! The scheduler: one loop per model that runs every admitted request
//! together, step by step (continuous batching).
//!
//! Callers [`EngineHandle::submit`] a tokenized prompt and get a
//! [`GenerationStream`] of events. Each step of the loop
//! - takes newly submitted requests into the waiting list;
//! - drops requests whose stream was dropped (cancellation), freeing their
//!   KV blocks;
//! - admits waiting requests while the batch has room and the KV pool has
//!   blocks for their prompt: highest priority first, then the tenant with
//!   the fewest requests running, then the oldest;
//! - plans one forward pass of at most `step_tokens` tokens: one decode token
//!   for each generating sequence and chunks of prompts still being read
//!   (chunked prefill), so a long prompt never stalls the others;
//! - runs it over all of them at once ([`Transformer::forward_batch`]) and
//!   samples the next token of every sequence that produced logits.
//!
//! KV memory comes from a paged pool with a fixed budget
//! ([`crate::model::kv`]), which doubles as a per-tenant prefix cache: an
//! admitted request starts after the longest run of blocks its tenant's
//! earlier requests already computed for the same leading tokens. When a sequence needs a block and none is free,
//! the least important sequence (lowest priority, then newest) is preempted:
//! its blocks are freed and it waits to be recomputed from its prompt and
//! the tokens it already generated. Results do not change, since a row's
//! arithmetic never depends on the batch. Admission is bounded: past
//! `queue_capacity` waiting requests (or a tenant's share of them) `submit`
//! answers [`EngineError::Busy`] at once.
//!
//! Invariants: every accepted request ends with exactly one `Finished` event
//! or one error, unless its stream was dropped; text is released only as
//! complete UTF-8 and never includes (a prefix of) a matched stop string;
//! a sequence never needs more KV than the whole pool (it finishes with
//! `length` first), so a lone sequence always runs.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::constrain::{Grammar, MaskCache, Matcher, TokenTrie};
use crate::error::{EngineError, Result};
use crate::model::kv::{blocks_for, BlockTable, KvPool, BLOCK_TOKENS};
use crate::model::transformer::BatchItem;
use crate::model::TextModel;
use crate::sampler::{Sampler, SamplingParams};
use crate::template::ChatMessage;

#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Requests that may wait to be admitted; past this `submit` is `Busy`.
    pub queue_capacity: usize,
    /// Sequences generating together at most.
    pub max_batch: usize,
    /// Bytes of KV cache for all sequences together.
    pub kv_cache_bytes: usize,
    /// Tokens fed to the model per step at most (decode tokens plus prompt chunks).
    pub step_tokens: usize,
}

/// Default KV cache budget per model.
pub const DEFAULT_KV_CACHE_MB: usize = 512;

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            queue_capacity: 16,
            max_batch: 16,
            kv_cache_bytes: DEFAULT_KV_CACHE_MB << 20,
            step_tokens: 512,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    /// Upper bound on generated tokens; must be at least 1.
    pub max_tokens: usize,
    /// Generation ends before the first occurrence of any of these strings.
    pub stop: Vec<String>,
    /// `Some(n)`: report each token's log-probability and the `n` most likely alternatives.
    pub logprobs: Option<usize>,
    /// Keep generating past end-of-generation tokens (benchmarks, tests).
    pub ignore_eos: bool,
    /// Higher runs first when the machine is full (and may preempt lower).
    pub priority: i32,
    /// Whom the request serves; tenants share the queue and the batch fairly.
    pub tenant: String,
    /// Output that must follow this grammar (JSON, tool calls): only the
    /// tokens it allows are sampled, and generation ends when it is complete.
    pub grammar: Option<Arc<Grammar>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens`, the context length or the KV budget was reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
    /// The most likely alternatives, most likely first: `(token, bytes, logprob)`.
    pub top: Vec<(String, Vec<u8>, f32)>,
}

#[derive(Debug, Clone)]
pub enum GenerateEvent {
    /// One generated token (exactly one event per token). `text` is the text
    /// released with it: possibly empty while bytes of an incomplete character
    /// or a possible stop string are held back, possibly longer when held text
    /// is released.
    Token {
        id: u32,
        text: String,
        logprob: Option<TokenLogprob>,
        /// Prompt tokens whose keys and values came from the prefix cache
        /// (the same in every token of a request), so a caller that stops
        /// early can still price them as cached.
        cached_tokens: usize,
    },
    Finished(Completion),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    /// Tokens the model generated, including a final end-of-generation token.
    pub completion_tokens: usize,
    /// Prompt tokens whose keys and values came from the prefix cache.
    pub cached_tokens: usize,
    /// From submission to the first step that ran the request.
    pub queued: Duration,
    /// From then to the first generated token.
    pub prefill: Duration,
    /// From then to the end.
    pub decode: Duration,
}

/// Events of one request; dropping it cancels the request.
pub struct GenerationStream {
    rx: UnboundedReceiver<Result<GenerateEvent>>,
}

impl GenerationStream {
    pub async fn next(&mut self) -> Option<Result<GenerateEvent>> {
        self.rx.recv().await
    }

    /// For callers outside an async runtime (the CLI, tests).
    pub fn blocking_next(&mut self) -> Option<Result<GenerateEvent>> {
        self.rx.blocking_recv()
    }
}

struct Job {
    request: GenerateRequest,
    events: UnboundedSender<Result<GenerateEvent>>,
    enqueued: Instant,
}

struct Shared {
    model: Arc<TextModel>,
    queue: Mutex<Sender<Job>>,
    queue_capacity: usize,
    /// Positions the KV pool holds in all.
    kv_capacity_tokens: usize,
    /// Submitted requests not yet admitted, in all and per tenant.
    waiting: AtomicUsize,
    waiting_by_tenant: Mutex<HashMap<String, usize>>,
    running: AtomicUsize,
    preemptions: Arc<AtomicUsize>,
    kv_used_bytes: AtomicUsize,
    kv_capacity_bytes: usize,
}

impl Shared {
    /// Counts a request out of the waiting ones (admitted or dropped).
    fn leave_queue(&self, tenant: &str) {
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        let mut by_tenant = self
            .waiting_by_tenant
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = by_tenant.get_mut(tenant) {
            *n -= 1;
            if *n == 0 {
                by_tenant.remove(tenant);
            }
        }
    }

    /// The most requests one tenant may have waiting: three quarters of the
    /// queue (at least one), so a flood from one tenant leaves room for others.
    fn tenant_share(&self) -> usize {
        (self.queue_capacity * 3 / 4).max(1)
    }
}

/// A running model behind a bounded queue. Cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    shared: Arc<Shared>,
}

impl EngineHandle {
    /// Starts the scheduler thread for `model`.
    pub fn start(model: TextModel, options: EngineOptions) -> Result<EngineHandle> {
        let model = Arc::new(model);
        let (tx, rx) = channel::<Job>();
        let pool = model.new_kv_pool(options.kv_cache_bytes);
        if pool.capacity() < 2 {
            return Err(EngineError::InvalidRequest(format!(
                "a KV cache budget of {} bytes is too small for model `{}`: one block of {} positions takes {} bytes",
                options.kv_cache_bytes,
                model.info().name,
                BLOCK_TOKENS,
                pool.block_bytes()
            )));
        }
        let shared = Arc::new(Shared {
            model: model.clone(),
            queue: Mutex::new(tx),
            queue_capacity: options.queue_capacity.max(1),
            kv_capacity_tokens: pool.capacity() * BLOCK_TOKENS,
            waiting: AtomicUsize::new(0),
            waiting_by_tenant: Mutex::new(HashMap::new()),
            running: AtomicUsize::new(0),
            preemptions: Arc::new(AtomicUsize::new(0)),
            kv_used_bytes: AtomicUsize::new(0),
            kv_capacity_bytes: pool.capacity() * pool.block_bytes(),
        });
        tracing::info!(
            model = %model.info().name,
            kv_blocks = pool.capacity(),
            kv_tokens = pool.capacity() * BLOCK_TOKENS,
            kv_mb = (pool.capacity() * pool.block_bytes()) >> 20,
            max_batch = options.max_batch,
            "scheduler started"
        );
        let scheduler = Scheduler {
            model: model.clone(),
            shared: Arc::downgrade(&shared),
            rx,
            pool,
            waiting: Vec::new(),
            running: Vec::new(),
            max_batch: options.max_batch.max(1),
            step_tokens: options.step_tokens.max(options.max_batch).max(1),
            arrivals: 0,
            preemptions: shared.preemptions.clone(),
            trie: None,
            masks: MaskCache::new(MASK_CACHE_ENTRIES),
        };
        std::thread::Builder::new()
            .name(format!("kiln-engine-{}", model.info().name))
            .spawn(move || scheduler.run())
            .map_err(|e| EngineError::io("engine scheduler thread", e))?;
        Ok(EngineHandle { shared })
    }

    pub fn model(&self) -> &TextModel {
        &self.shared.model
    }

    /// Renders a chat with the model's template and tokenizes it; text from
    /// the messages is never read as control tokens.
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        self.shared.model.chat_prompt(messages)
    }

    /// [`EngineHandle::chat_prompt`] with tools offered (see
    /// [`TextModel::chat_prompt_with_tools`]).
    pub fn chat_prompt_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: &[crate::tools::ToolSpec],
    ) -> Result<Vec<u32>> {
        self.shared.model.chat_prompt_with_tools(messages, tools)
    }

    /// Queues a request. Fails at once with `Busy` when the queue (or the
    /// tenant's share of it) is full, `ContextOverflow` or `KvCacheFull` when
    /// the prompt cannot fit, `InvalidRequest` for bad settings.
    pub fn submit(&self, request: GenerateRequest) -> Result<GenerationStream> {
        let shared = &self.shared;
        let ctx = shared.model.info().context_length;
        if request.prompt.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        if request.prompt.len() >= ctx {
            return Err(EngineError::ContextOverflow {
                prompt_tokens: request.prompt.len(),
                context_length: ctx,
            });
        }
        if request.prompt.len() >= shared.kv_capacity_tokens {
            return Err(EngineError::KvCacheFull {
                needed: request.prompt.len() + 1,
                capacity: shared.kv_capacity_tokens,
            });
        }
        if request.max_tokens == 0 {
            return Err(EngineError::InvalidRequest(
                "`max_tokens` must be at least 1".into(),
            ));
        }
        let vocab = shared.model.vocab_size();
        if let Some(bad) = request.prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::InvalidRequest(format!(
                "token id {bad} is out of range: the vocabulary has {vocab} tokens"
            )));
        }
        request.sampling.validate()?;
        {
            let mut by_tenant = shared
                .waiting_by_tenant
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let mine = by_tenant.get(&request.tenant).copied().unwrap_or(0);
            if shared.waiting.load(Ordering::Relaxed) >= shared.queue_capacity
                || mine >= shared.tenant_share()
            {
                return Err(EngineError::Busy);
            }
            *by_tenant.entry(request.tenant.clone()).or_default() += 1;
            shared.waiting.fetch_add(1, Ordering::Relaxed);
        }
        let tenant = request.tenant.clone();
        let (tx, rx) = unbounded_channel();
        let job = Job {
            request,
            events: tx,
            enqueued: Instant::now(),
        };
        let sent = shared
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(job);
        match sent {
            Ok(()) => Ok(GenerationStream { rx }),
            Err(_) => {
                shared.leave_queue(&tenant);
                Err(EngineError::Stopped)
            }
        }
    }

    /// Requests waiting to be admitted.
    pub fn waiting(&self) -> usize {
        self.shared.waiting.load(Ordering::Relaxed)
    }

    /// Requests being generated now.
    pub fn running(&self) -> usize {
        self.shared.running.load(Ordering::Relaxed)
    }

    /// Sequences preempted for KV blocks so far (each recomputed later).
    pub fn preemptions(&self) -> usize {
        self.shared.preemptions.load(Ordering::Relaxed)
    }

    /// KV cache bytes held by sequences now, and the budget.
    pub fn kv_usage(&self) -> (usize, usize) {
        (
            self.shared.kv_used_bytes.load(Ordering::Relaxed),
            self.shared.kv_capacity_bytes,
        )
    }
}

/// One request inside the scheduler.
struct Sequence {
    request: GenerateRequest,
    events: UnboundedSender<Result<GenerateEvent>>,
    /// The prompt, then every generated token.
    tokens: Vec<u32>,
    cache: BlockTable,
    sampler: Sampler,
    text: StopWatcher,
    /// Tokens never sampled (end-of-generation tokens under `ignore_eos`).
    banned: Vec<u32>,
    /// Where a constrained output stands.
    matcher: Option<Matcher>,
    arrival: u64,
    enqueued: Instant,
    /// Prompt positions found in the prefix cache at first admission.
    cached: usize,
    /// First admission; until then the request counts among the waiting.
    admitted: Option<Instant>,
    first_token: Option<Instant>,
}

impl Sequence {
    /// Tokens generated so far.
    fn generated(&self) -> usize {
        self.tokens.len() - self.request.prompt.len()
    }

    /// Tokens not yet fed to the model.
    fn pending(&self) -> usize {
        self.tokens.len() - self.cache.len()
    }

    /// Sort key: most important first.
    fn rank(&self) -> (Reverse<i32>, u64) {
        (Reverse(self.request.priority), self.arrival)
    }
}

struct Scheduler {
    model: Arc<TextModel>,
    shared: std::sync::Weak<Shared>,
    rx: Receiver<Job>,
    pool: KvPool,
    /// Not admitted: new requests and preempted ones.
    waiting: Vec<Sequence>,
    running: Vec<Sequence>,
    max_batch: usize,
    step_tokens: usize,
    arrivals: u64,
    preemptions: Arc<AtomicUsize>,
    /// The vocabulary by bytes, built at the first constrained request.
    trie: Option<TokenTrie>,
    masks: MaskCache,
}

/// Allowed-token sets kept per model (each is a bit per vocabulary entry).
const MASK_CACHE_ENTRIES: usize = 2048;

impl Scheduler {
    fn run(mut self) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                match self.rx.recv() {
                    Ok(job) => self.enqueue(job),
                    Err(_) => return,
                }
            }
            while let Ok(job) = self.rx.try_recv() {
                self.enqueue(job);
            }
            let Some(shared) = self.shared.upgrade() else {
                return;
            };
            self.drop_cancelled(&shared);
            self.admit(&shared);
            let plan = self.plan();
            shared.running.store(self.running.len(), Ordering::Relaxed);
            shared.kv_used_bytes.store(
                self.pool.used_blocks() * self.pool.block_bytes(),
                Ordering::Relaxed,
            );
            if plan.is_empty() {
                continue;
            }
            // The step runs on a compute-pool thread, so the hundreds of
            // parallel matmuls in it fork and join inside the pool.
            let result = rayon::scope(|_| self.step(&plan));
            if let Err(e) = result {
                tracing::error!(error = %e, "generation step failed");
                let mut failed: Vec<usize> = plan.iter().map(|&(i, _)| i).collect();
                failed.sort_unstable();
                for i in failed.into_iter().rev() {
                    let mut seq = self.running.swap_remove(i);
                    self.pool.release(&mut seq.cache);
                    let _ = seq.events.send(Err(clone_error(&e)));
                }
            }
        }
    }

    fn enqueue(&mut self, job: Job) {
        let sampler = Sampler::new(job.request.sampling.clone(), &job.request.prompt);
        let matcher = job.request.grammar.clone().map(Matcher::new);
        let banned = if job.request.ignore_eos && matcher.is_none() {
            self.model.tokenizer().eog_tokens().to_vec()
        } else {
            Vec::new()
        };
        self.arrivals += 1;
        self.waiting.push(Sequence {
            tokens: job.request.prompt.clone(),
            text: StopWatcher::new(job.request.stop.clone()),
            request: job.request,
            events: job.events,
            cache: BlockTable::new(),
            sampler,
            banned,
            matcher,
            arrival: self.arrivals,
            enqueued: job.enqueued,
            cached: 0,
            admitted: None,
            first_token: None,
        });
    }

    fn drop_cancelled(&mut self, shared: &Shared) {
        for list in [&mut self.running, &mut self.waiting] {
            let mut i = 0;
            while i < list.len() {
                if list[i].events.is_closed() {
                    let mut seq = list.swap_remove(i);
                    self.pool.release(&mut seq.cache);
                    if seq.admitted.is_none() {
                        shared.leave_queue(&seq.request.tenant);
                    }
                } else {
                    i += 1;
                }
            }
        }
    }

    /// Moves waiting sequences into the batch while there is room, most
    /// important first; a waiting sequence of higher priority than a running
    /// one takes its place when the batch or the pool is full.
    fn admit(&mut self, shared: &Shared) {
        let watermark = self.pool.capacity() / 100;
        while !self.waiting.is_empty() {
            let mut running_by_tenant: HashMap<&str, usize> = HashMap::new();
            for seq in &self.running {
                *running_by_tenant
                    .entry(seq.request.tenant.as_str())
                    .or_default() += 1;
            }
            let best = (0..self.waiting.len()).min_by_key(|&i| {
                let seq = &self.waiting[i];
                let share = running_by_tenant
                    .get(seq.request.tenant.as_str())
                    .copied()
                    .unwrap_or(0);
                (Reverse(seq.request.priority), share, seq.arrival)
            });
            let Some(best) = best else { break };
            let priority = self.waiting[best].request.priority;
            // Blocks of a prefix this tenant already computed are taken as they are.
            let candidate = &mut self.waiting[best];
            let attached = self.pool.attach_prefix(
                &candidate.request.tenant,
                &candidate.tokens,
                &mut candidate.cache,
            );
            let needed = blocks_for(candidate.tokens.len() + 1) - candidate.cache.blocks();
            let fits = |s: &Self| {
                s.running.len() < s.max_batch
                    && (s.running.is_empty() || needed + watermark <= s.pool.free_blocks())
            };
            if !fits(self) {
                self.pool.release(&mut self.waiting[best].cache);
                // Preempt the least important running sequence if it ranks
                // strictly below the candidate; otherwise wait for room.
                let victim = (0..self.running.len()).max_by_key(|&j| self.running[j].rank());
                match victim {
                    Some(v) if self.running[v].request.priority < priority => self.preempt(v),
                    _ => break,
                }
                continue;
            }
            let mut seq = self.waiting.swap_remove(best);
            if seq.admitted.is_none() {
                seq.admitted = Some(Instant::now());
                seq.cached = attached.min(seq.request.prompt.len());
                shared.leave_queue(&seq.request.tenant);
            }
            self.running.push(seq);
        }
    }

    /// Frees a running sequence's KV blocks and sends it back to wait; it
    /// will recompute its prompt and generated tokens when readmitted.
    fn preempt(&mut self, i: usize) {
        let mut seq = self.running.swap_remove(i);
        tracing::debug!(
            arrival = seq.arrival,
            positions = seq.cache.len(),
            "preempting a sequence for KV blocks"
        );
        self.pool.release(&mut seq.cache);
        self.preemptions.fetch_add(1, Ordering::Relaxed);
        self.waiting.push(seq);
    }

    /// Chooses what each running sequence feeds this step and gives it the
    /// KV blocks for that, preempting less important sequences when the pool
    /// runs dry. Returns `(index in running, tokens)` pairs.
    fn plan(&mut self) -> Vec<(usize, usize)> {
        let mut budget = self.step_tokens;
        // Sequences are named by arrival number: preemption reorders `running`.
        let mut planned: Vec<u64> = Vec::new();
        let mut takes: Vec<(u64, usize)> = Vec::new();
        // Most important first; among equals, decoding sequences before
        // prompts being read, so a long prompt never stalls generation.
        while let Some(current) = self
            .running
            .iter()
            .filter(|s| !planned.contains(&s.arrival))
            .min_by_key(|s| (Reverse(s.request.priority), s.pending() != 1, s.arrival))
            .map(|s| s.arrival)
        {
            planned.push(current);
            let mut take = budget;
            while take > 0 {
                let Some(i) = self.index_of(current) else {
                    take = 0;
                    break;
                };
                let seq = &mut self.running[i];
                take = take.min(seq.pending());
                let end = seq.cache.len() + take;
                if self.pool.grow(&mut seq.cache, end) {
                    break;
                }
                // Room in the sequence's own blocks plus the free ones.
                let room =
                    (seq.cache.blocks() + self.pool.free_blocks()) * BLOCK_TOKENS - seq.cache.len();
                if room > 0 && room < take {
                    take = room;
                    continue;
                }
                // Preempt the least important sequence not planned yet, or
                // this one when all the others rank above it.
                let victim = (0..self.running.len())
                    .filter(|&j| !planned.contains(&self.running[j].arrival))
                    .max_by_key(|&j| self.running[j].rank())
                    .unwrap_or(i);
                self.preempt(victim);
                if victim == i {
                    take = 0;
                }
            }
            if take > 0 {
                takes.push((current, take));
                budget -= take;
            }
        }
        // Only unplanned sequences are preempted, so every planned one is
        // still running.
        takes
            .into_iter()
            .filter_map(|(arrival, take)| Some((self.index_of(arrival)?, take)))
            .collect()
    }

    fn index_of(&self, arrival: u64) -> Option<usize> {
        self.running.iter().position(|s| s.arrival == arrival)
    }

    /// Runs one planned forward pass and handles its results.
    fn step(&mut self, plan: &[(usize, usize)]) -> Result<()> {
        let mut items: Vec<BatchItem<'_>> = Vec::with_capacity(plan.len());
        let mut order: Vec<usize> = Vec::with_capacity(plan.len());
        {
            // Borrow the planned sequences mutably, in index order.
            let mut sorted: Vec<(usize, usize)> = plan.to_vec();
            sorted.sort_unstable();
            let mut rest: &mut [Sequence] = &mut self.running;
            let mut base = 0;
            for &(i, take) in &sorted {
                let (_, tail) = rest.split_at_mut(i - base);
                let (seq, tail) = tail.split_first_mut().ok_or_else(|| {
                    EngineError::InvalidRequest("planned a sequence that is not running".into())
                })?;
                rest = tail;
                base = i + 1;
                let start = seq.cache.len();
                items.push(BatchItem {
                    tokens: &seq.tokens[start..start + take],
                    logits: start + take == seq.tokens.len(),
                    cache: &mut seq.cache,
                });
                order.push(i);
            }
        }
        let logits = self.model.forward_batch(&mut self.pool, &mut items)?;
        drop(items);
        // File the blocks this step completed, for later requests to reuse.
        for &i in &order {
            let seq = &mut self.running[i];
            self.pool
                .register(&seq.request.tenant, &seq.tokens, &mut seq.cache);
        }
        let mut finished = Vec::new();
        for (i, logits) in order.into_iter().zip(logits) {
            let Some(mut logits) = logits else { continue };
            if self.emit_next(i, &mut logits) {
                finished.push(i);
            }
        }
        finished.sort_unstable();
        for i in finished.into_iter().rev() {
            let mut seq = self.running.swap_remove(i);
            self.pool.release(&mut seq.cache);
        }
        Ok(())
    }

    /// Samples sequence `i`'s next token from `logits` and sends it; true
    /// when the sequence is finished (its `Finished` event sent).
    fn emit_next(&mut self, i: usize, logits: &mut [f32]) -> bool {
        let kv_capacity = self.pool.capacity() * BLOCK_TOKENS;
        let model = &self.model;
        let tokenizer = model.tokenizer();
        let ctx = model.info().context_length;
        if let Some(matcher) = &self.running[i].matcher {
            let trie = self.trie.get_or_insert_with(|| TokenTrie::new(tokenizer));
            let allowed = self.masks.allowed(trie, matcher);
            if allowed.is_empty() {
                let seq = &mut self.running[i];
                let _ = seq.events.send(Err(EngineError::InvalidRequest(
                    "the output format allows no token of this model's vocabulary here".into(),
                )));
                return true;
            }
            for (id, l) in logits.iter_mut().enumerate() {
                if !allowed.contains(id as u32) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        let seq = &mut self.running[i];
        let now = Instant::now();
        seq.first_token.get_or_insert(now);
        let req = &seq.request;
        let picked = seq
            .sampler
            .sample(logits, &seq.banned, req.logprobs.unwrap_or(0));
        seq.sampler.accept(picked.id);
        seq.tokens.push(picked.id);
        let constrained = seq.matcher.is_some();
        let is_eog = tokenizer.is_eog(picked.id) && (constrained || !req.ignore_eos);
        // The grammar took the token (the mask allowed it); a complete
        // output ends here, without waiting for end-of-generation.
        let complete = match &mut seq.matcher {
            Some(m) if !is_eog => m.advance(tokenizer.token_bytes(picked.id)) && m.complete(),
            _ => false,
        };
        let logprob = req.logprobs.map(|_| TokenLogprob {
            token: token_text(model, picked.id),
            bytes: tokenizer.token_bytes(picked.id).to_vec(),
            logprob: picked.logprob,
            top: picked
                .top
                .iter()
                .map(|&(t, lp)| (token_text(model, t), tokenizer.token_bytes(t).to_vec(), lp))
                .collect(),
        });
        // Feeding this token next would need `tokens.len()` positions.
        let out_of_room = seq.generated() >= req.max_tokens
            || seq.tokens.len() >= ctx
            || seq.tokens.len() > kv_capacity;
        let (released, stopped) = if is_eog {
            (seq.text.finish(), true)
        } else if complete {
            let (mut released, _) = seq.text.push(tokenizer.token_bytes(picked.id));
            released.push_str(&seq.text.finish());
            (released, true)
        } else {
            let (mut released, stopped) = seq.text.push(tokenizer.token_bytes(picked.id));
            if out_of_room && !stopped {
                // Last token: held-back text turned out not to be a stop string.
                released.push_str(&seq.text.finish());
            }
            (released, stopped)
        };
        let _ = seq.events.send(Ok(GenerateEvent::Token {
            id: picked.id,
            text: released,
            logprob,
            cached_tokens: seq.cached,
        }));
        let finish = if stopped {
            FinishReason::Stop
        } else if out_of_room {
            FinishReason::Length
        } else {
            return false;
        };
        let admitted = seq.admitted.unwrap_or(seq.enqueued);
        let first = seq.first_token.unwrap_or(now);
        let _ = seq.events.send(Ok(GenerateEvent::Finished(Completion {
            finish_reason: finish,
            prompt_tokens: req.prompt.len(),
            completion_tokens: seq.generated(),
            cached_tokens: seq.cached,
            queued: admitted - seq.enqueued,
            prefill: first - admitted,
            decode: now - first,
        })));
        true
    }
}

/// The error a failed step reports to each of its sequences.
fn clone_error(e: &EngineError) -> EngineError {
    match e {
        EngineError::InvalidRequest(m) => EngineError::InvalidRequest(m.clone()),
        EngineError::ContextOverflow {
            prompt_tokens,
            context_length,
        } => EngineError::ContextOverflow {
            prompt_tokens: *prompt_tokens,
            context_length: *context_length,
        },
        EngineError::KvCacheFull { needed, capacity } => EngineError::KvCacheFull {
            needed: *needed,
            capacity: *capacity,
        },
        other => EngineError::Metadata(format!("generation step failed: {other}")),
    }
}

fn token_text(model: &TextModel, id: u32) -> String {
    String::from_utf8_lossy(model.tokenizer().token_bytes(id)).into_owned()
}

/// Turns a stream of token bytes into released text: holds back incomplete
/// UTF-8 and any tail that could still become a stop string, and cuts the text
/// at the first stop string.
pub struct StopWatcher {
    stops: Vec<String>,
    pending: Vec<u8>,
    stopped: bool,
}

impl StopWatcher {
    pub fn new(stops: Vec<String>) -> Self {
        StopWatcher {
            stops,
            pending: Vec::new(),
            stopped: false,
        }
    }

    /// Adds bytes; returns the text that can be released now and whether a
    /// stop string was hit (after which nothing more is released).
    pub fn push(&mut self, bytes: &[u8]) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        self.pending.extend_from_slice(bytes);
        // Earliest stop string occurrence wins.
        let hit = self
            .stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| find(&self.pending, s.as_bytes()))
            .min();
        if let Some(at) = hit {
            self.stopped = true;
            let out = lossy(&self.pending[..at]);
            self.pending.clear();
            return (out, true);
        }
        // Hold back the longest tail that is a proper prefix of a stop string.
        let hold = self
            .stops
            .iter()
            .map(|s| longest_suffix_prefix(&self.pending, s.as_bytes()))
            .max()
            .unwrap_or(0);
        let mut cut = self.pending.len() - hold;
        // ...and any incomplete UTF-8 sequence at the cut.
        cut = complete_utf8_prefix(&self.pending[..cut]);
        let out = lossy(&self.pending[..cut]);
        self.pending.drain(..cut);
        (out, false)
    }

    /// Releases everything still held (end of generation).
    pub fn finish(&mut self) -> String {
        let out = lossy(&self.pending);
        self.pending.clear();
        out
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`.
pub(crate) fn longest_suffix_prefix(text: &[u8], stop: &[u8]) -> usize {
    let max = stop.len().saturating_sub(1).min(text.len());
    (1..=max)
        .rev()
        .find(|&n| text[text.len() - n..] == stop[..n])
        .unwrap_or(0)
}

/// Length of the longest prefix of `bytes` that does not end inside a UTF-8
/// sequence (invalid bytes count as complete: they become U+FFFD).
fn complete_utf8_prefix(bytes: &[u8]) -> usize {
    let n = bytes.len();
    // A UTF-8 sequence is at most 4 bytes: look at the last 3 for a lead byte.
    for back in 1..=3.min(n) {
        let b = bytes[n - back];
        if b & 0b1100_0000 == 0b1000_0000 {
            continue; // continuation byte
        }
        let need = if b >= 0b1111_0000 {
            4
        } else if b >= 0b1110_0000 {
            3
        } else if b >= 0b1100_0000 {
            2
        } else {
            1
        };
        return if back < need { n - back } else { n };
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(stops: &[&str], pieces: &[&[u8]]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut w = StopWatcher::new(stops);
        let mut out = String::new();
        for p in pieces {
            let (t, stopped) = w.push(p);
            out.push_str(&t);
            if stopped {
                return (out, true);
            }
        }
        out.push_str(&w.finish());
        (out, false)
    }

    #[test]
    fn stop_string_split_across_tokens_is_cut() {
        assert_eq!(
            run(&["\n\nUser"], &[b"Hello", b"\n", b"\nUs", b"er: hi"]),
            ("Hello".to_string(), true)
        );
    }

    #[test]
    fn false_start_of_stop_string_is_released() {
        assert_eq!(run(&["END"], &[b"EN", b"D?"]), (String::new(), true));
        assert_eq!(run(&["END"], &[b"EN", b"Tx"]), ("ENTx".to_string(), false));
    }

    #[test]
    fn multibyte_characters_are_not_split() {
        let snow = "☃".as_bytes();
        let stops: Vec<String> = Vec::new();
        let mut w = StopWatcher::new(stops);
        assert_eq!(w.push(&snow[..1]).0, "");
        assert_eq!(w.push(&snow[1..2]).0, "");
        assert_eq!(w.push(&snow[2..]).0, "☃");
    }

    proptest! {
        #[test]
        fn without_stops_all_text_comes_out(s in "\\PC{0,40}", cuts in proptest::collection::vec(0usize..40, 0..6)) {
            let bytes = s.as_bytes();
            let mut idx: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
            idx.push(0);
            idx.push(bytes.len());
            idx.sort_unstable();
            let pieces: Vec<&[u8]> = idx.windows(2).map(|w| &bytes[w[0]..w[1]]).collect();
            let (out, stopped) = run(&[], &pieces);
            prop_assert!(!stopped);
            prop_assert_eq!(out, s);
        }

        #[test]
        fn output_never_contains_a_stop_string(s in "[ab\\n]{0,40}", cut in 1usize..5) {
            let bytes = s.as_bytes();
            let pieces: Vec<&[u8]> = bytes.chunks(cut).collect();
            let (out, stopped) = run(&["ab\n"], &pieces);
            prop_assert!(!out.contains("ab\n"));
            prop_assert_eq!(stopped, s.contains("ab\n"));
            if stopped {
                let at = s.find("ab\n").unwrap_or(0);
                prop_assert_eq!(out, &s[..at]);
            }
        }
    }
}
