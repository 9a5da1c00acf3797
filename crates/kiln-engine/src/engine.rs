//! The request loop: a bounded queue in front of one worker thread per model.
//!
//! Callers [`EngineHandle::submit`] a tokenized prompt and get a
//! [`GenerationStream`] of events. The queue is bounded: when it is full,
//! `submit` answers [`EngineError::Busy`] at once instead of growing. Dropping
//! the stream cancels the request: the worker notices before the next token
//! and stops (a queued request whose stream is gone is skipped).
//!
//! Invariants: every accepted request ends with exactly one `Finished` event
//! or one error, unless its stream was dropped; text is released only as
//! complete UTF-8 and never includes (a prefix of) a matched stop string.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::error::{EngineError, Result};
use crate::model::TextModel;
use crate::sampler::{Sampler, SamplingParams};
use crate::template::ChatMessage;

/// Tokens fed to the model per forward call while reading the prompt.
const PREFILL_CHUNK: usize = 512;

#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Requests that may wait while one runs; past this `submit` is `Busy`.
    pub queue_capacity: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions { queue_capacity: 16 }
    }
}

#[derive(Debug, Clone)]
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` or the context length was reached.
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
    },
    Finished(Completion),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    /// Tokens the model generated, including a final end-of-generation token.
    pub completion_tokens: usize,
    /// Prompt tokens served from a cache (none until prefix caching lands).
    pub cached_tokens: usize,
    pub queued: Duration,
    pub prefill: Duration,
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
    queue: SyncSender<Job>,
    waiting: AtomicUsize,
    running: AtomicUsize,
}

/// A running model behind a bounded queue. Cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    shared: Arc<Shared>,
}

impl EngineHandle {
    /// Starts the worker thread for `model`.
    pub fn start(model: TextModel, options: EngineOptions) -> Result<EngineHandle> {
        let model = Arc::new(model);
        let (tx, rx) = sync_channel::<Job>(options.queue_capacity.max(1));
        let shared = Arc::new(Shared {
            model: model.clone(),
            queue: tx,
            waiting: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
        });
        let worker_shared = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name(format!("kiln-engine-{}", model.info().name))
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    let Some(shared) = worker_shared.upgrade() else {
                        break;
                    };
                    shared.waiting.fetch_sub(1, Ordering::Relaxed);
                    if job.events.is_closed() {
                        continue;
                    }
                    shared.running.fetch_add(1, Ordering::Relaxed);
                    let queued = job.enqueued.elapsed();
                    // The whole job runs on a compute-pool thread, so the
                    // hundreds of parallel matmuls per token fork and join
                    // inside the pool instead of each crossing threads.
                    let result = rayon::scope(|_| run_job(&model, &job, queued));
                    shared.running.fetch_sub(1, Ordering::Relaxed);
                    if let Err(e) = result {
                        tracing::error!(error = %e, "generation failed");
                        let _ = job.events.send(Err(e));
                    }
                }
            })
            .map_err(|e| EngineError::io("engine worker thread", e))?;
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

    /// Queues a request. Fails at once with `Busy` when the queue is full,
    /// `ContextOverflow` when the prompt cannot fit, `InvalidRequest` for bad
    /// settings.
    pub fn submit(&self, request: GenerateRequest) -> Result<GenerationStream> {
        let ctx = self.shared.model.info().context_length;
        if request.prompt.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        if request.prompt.len() >= ctx {
            return Err(EngineError::ContextOverflow {
                prompt_tokens: request.prompt.len(),
                context_length: ctx,
            });
        }
        if request.max_tokens == 0 {
            return Err(EngineError::InvalidRequest(
                "`max_tokens` must be at least 1".into(),
            ));
        }
        let vocab = self.shared.model.vocab_size();
        if let Some(bad) = request.prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::InvalidRequest(format!(
                "token id {bad} is out of range: the vocabulary has {vocab} tokens"
            )));
        }
        request.sampling.validate()?;
        let (tx, rx) = unbounded_channel();
        let job = Job {
            request,
            events: tx,
            enqueued: Instant::now(),
        };
        self.shared.waiting.fetch_add(1, Ordering::Relaxed);
        match self.shared.queue.try_send(job) {
            Ok(()) => Ok(GenerationStream { rx }),
            Err(TrySendError::Full(_)) => {
                self.shared.waiting.fetch_sub(1, Ordering::Relaxed);
                Err(EngineError::Busy)
            }
            Err(TrySendError::Disconnected(_)) => {
                self.shared.waiting.fetch_sub(1, Ordering::Relaxed);
                Err(EngineError::Stopped)
            }
        }
    }

    /// Requests waiting in the queue.
    pub fn waiting(&self) -> usize {
        self.shared.waiting.load(Ordering::Relaxed)
    }

    /// Requests being generated now.
    pub fn running(&self) -> usize {
        self.shared.running.load(Ordering::Relaxed)
    }
}

fn run_job(model: &TextModel, job: &Job, queued: Duration) -> Result<()> {
    let req = &job.request;
    let ctx = model.info().context_length;
    let tokenizer = model.tokenizer();
    let mut seq = model.new_sequence();
    let mut sampler = Sampler::new(req.sampling.clone(), &req.prompt);
    let banned: Vec<u32> = if req.ignore_eos {
        tokenizer.eog_tokens().to_vec()
    } else {
        Vec::new()
    };
    let mut text = StopWatcher::new(&req.stop);

    let started = Instant::now();
    let mut logits = Vec::new();
    for chunk in req.prompt.chunks(PREFILL_CHUNK) {
        if job.events.is_closed() {
            return Ok(());
        }
        logits = model.forward(chunk, &mut seq)?;
    }
    let prefill = started.elapsed();
    let decode_started = Instant::now();

    let mut generated = 0usize;
    let finish = loop {
        if job.events.is_closed() {
            return Ok(());
        }
        let picked = sampler.sample(&mut logits, &banned, req.logprobs.unwrap_or(0));
        sampler.accept(picked.id);
        generated += 1;
        let is_eog = tokenizer.is_eog(picked.id) && !req.ignore_eos;
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
        let out_of_room = generated >= req.max_tokens || req.prompt.len() + generated >= ctx;
        let (released, stopped) = if is_eog {
            (text.finish(), true)
        } else {
            let (mut released, stopped) = text.push(tokenizer.token_bytes(picked.id));
            if out_of_room && !stopped {
                // Last token: held-back text turned out not to be a stop string.
                released.push_str(&text.finish());
            }
            (released, stopped)
        };
        let _ = job.events.send(Ok(GenerateEvent::Token {
            id: picked.id,
            text: released,
            logprob,
        }));
        if stopped {
            break FinishReason::Stop;
        }
        if out_of_room {
            break FinishReason::Length;
        }
        logits = model.forward(&[picked.id], &mut seq)?;
    };
    let _ = job.events.send(Ok(GenerateEvent::Finished(Completion {
        finish_reason: finish,
        prompt_tokens: req.prompt.len(),
        completion_tokens: generated,
        cached_tokens: 0,
        queued,
        prefill,
        decode: decode_started.elapsed(),
    })));
    Ok(())
}

fn token_text(model: &TextModel, id: u32) -> String {
    String::from_utf8_lossy(model.tokenizer().token_bytes(id)).into_owned()
}

/// Turns a stream of token bytes into released text: holds back incomplete
/// UTF-8 and any tail that could still become a stop string, and cuts the text
/// at the first stop string.
pub struct StopWatcher<'a> {
    stops: &'a [String],
    pending: Vec<u8>,
    stopped: bool,
}

impl<'a> StopWatcher<'a> {
    pub fn new(stops: &'a [String]) -> Self {
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
fn longest_suffix_prefix(text: &[u8], stop: &[u8]) -> usize {
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
        let mut w = StopWatcher::new(&stops);
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
        let mut w = StopWatcher::new(&stops);
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
