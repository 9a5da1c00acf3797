//! The scheduler on a tiny model the test writes itself: batched sequences
//! give the tokens they give alone (also when preempted for KV blocks and
//! recomputed, also when sampling at temperature 1), cancelled requests free
//! their blocks, the waiting queue is bounded per tenant, priority decides
//! who runs when the batch is full, and the prefix cache serves a tenant's
//! own earlier prompts only.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::tiny_gguf::{write_tiny_model, TinyArch};
use kiln_engine::engine::{
    Completion, EngineHandle, EngineOptions, GenerateEvent, GenerateRequest, GenerationStream,
};
use kiln_engine::model::kv::BLOCK_TOKENS;
use kiln_engine::model::TextModel;
use kiln_engine::sampler::SamplingParams;
use kiln_engine::EngineError;

fn tiny_model(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("tiny-qwen2.gguf");
    write_tiny_model(TinyArch::Qwen2, &path).unwrap();
    path
}

fn start(path: &Path, options: EngineOptions) -> EngineHandle {
    EngineHandle::start(TextModel::load(path, "tiny").unwrap(), options).unwrap()
}

fn request(prompt: &str, engine: &EngineHandle, max_tokens: usize, seed: u64) -> GenerateRequest {
    GenerateRequest {
        prompt: engine.model().text_prompt(prompt),
        sampling: SamplingParams {
            temperature: 1.0,
            seed: Some(seed),
            ..SamplingParams::default()
        },
        max_tokens,
        ignore_eos: true,
        ..Default::default()
    }
}

fn drain(mut stream: GenerationStream) -> (Vec<u32>, Completion) {
    let mut ids = Vec::new();
    while let Some(ev) = stream.blocking_next() {
        match ev.unwrap() {
            GenerateEvent::Token { id, .. } => ids.push(id),
            GenerateEvent::Finished(c) => return (ids, c),
        }
    }
    panic!("the stream ended without a Finished event");
}

const PROMPTS: [&str; 4] = [
    "the theory of everything",
    "in the beginning there was",
    "a short one",
    "seven ants in a row on the sand, then a",
];

#[test]
fn preempted_and_batched_sequences_give_the_tokens_they_give_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_model(dir.path());
    let solo = start(&path, EngineOptions::default());
    let alone: Vec<Vec<u32>> = PROMPTS
        .iter()
        .enumerate()
        .map(|(i, p)| drain(solo.submit(request(p, &solo, 70, i as u64)).unwrap()).0)
        .collect();
    assert_eq!(solo.preemptions(), 0);

    // Each sequence needs 6 blocks at its end; the pool holds 7, so the four
    // cannot all fit and sequences are preempted and recomputed.
    let per_block = solo.model().kv_bytes_per_token() * BLOCK_TOKENS;
    let tight = start(
        &path,
        EngineOptions {
            max_batch: 4,
            step_tokens: 8,
            kv_cache_bytes: 7 * per_block,
            ..EngineOptions::default()
        },
    );
    let streams: Vec<_> = PROMPTS
        .iter()
        .enumerate()
        .map(|(i, p)| tight.submit(request(p, &tight, 70, i as u64)).unwrap())
        .collect();
    for ((stream, expected), prompt) in streams.into_iter().zip(&alone).zip(PROMPTS) {
        let (ids, c) = drain(stream);
        assert_eq!(
            &ids, expected,
            "{prompt}: batched tokens differ from solo ones"
        );
        assert_eq!(c.completion_tokens, 70);
    }
    let (used, capacity) = tight.kv_usage();
    println!("{} preemptions", tight.preemptions());
    assert!(
        tight.preemptions() > 0,
        "the tight pool should force preemption"
    );
    assert_eq!(capacity, 7 * per_block);
    assert!(used <= capacity);
}

#[test]
fn a_cancelled_request_frees_its_kv_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_model(dir.path());
    let engine = start(&path, EngineOptions::default());
    let mut stream = engine
        .submit(request("the theory of", &engine, 480, 1))
        .unwrap();
    assert!(matches!(
        stream.blocking_next(),
        Some(Ok(GenerateEvent::Token { .. }))
    ));
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine.kv_usage().0 > 0 || engine.running() > 0 {
        assert!(Instant::now() < deadline, "blocks still held after cancel");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn prompts_larger_than_the_kv_budget_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_model(dir.path());
    let probe = start(&path, EngineOptions::default());
    let per_block = probe.model().kv_bytes_per_token() * BLOCK_TOKENS;
    let engine = start(
        &path,
        EngineOptions {
            kv_cache_bytes: 2 * per_block,
            ..EngineOptions::default()
        },
    );
    let long = "the theory ".repeat(20);
    let err = engine.submit(request(&long, &engine, 4, 0)).err();
    assert!(
        matches!(err, Some(EngineError::KvCacheFull { capacity, .. }) if capacity == 2 * BLOCK_TOKENS),
        "{err:?}"
    );
    // A prompt that fits runs, and stops with `length` when the budget is
    // all it has, instead of waiting forever for blocks.
    let (ids, c) = drain(engine.submit(request("the", &engine, 100, 0)).unwrap());
    assert!(ids.len() < 2 * BLOCK_TOKENS);
    assert_eq!(c.finish_reason, kiln_engine::engine::FinishReason::Length);
    assert!(c.prompt_tokens + c.completion_tokens <= 2 * BLOCK_TOKENS + 1);
}

#[test]
fn one_tenant_cannot_fill_the_whole_queue() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_model(dir.path());
    let engine = start(
        &path,
        EngineOptions {
            queue_capacity: 4,
            max_batch: 1,
            ..EngineOptions::default()
        },
    );
    let mut held = Vec::new();
    let mut refused = false;
    for i in 0..6 {
        let mut r = request("the theory", &engine, 480, i);
        r.tenant = "flood".into();
        match engine.submit(r) {
            Ok(s) => held.push(s),
            Err(EngineError::Busy) => {
                refused = true;
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(refused, "the flooding tenant was never refused");
    // One running plus three quarters of the queue waiting, at most.
    assert!(held.len() <= 4, "{} accepted", held.len());
    let mut r = request("the theory", &engine, 4, 9);
    r.tenant = "other".into();
    let other = engine.submit(r).expect("another tenant still gets a place");
    drop(held);
    let (ids, _) = drain(other);
    assert_eq!(ids.len(), 4);
}

/// On the real SmolLM2 (a few milliseconds per token), so the background
/// request is surely still running when the urgent one arrives.
#[test]
fn a_higher_priority_request_preempts_a_background_one() {
    let path = common::test_home().join("models/smollm2-135m/model.gguf");
    assert!(
        path.exists(),
        "{} is missing: run `kiln pull smollm2-135m`",
        path.display()
    );
    let engine = start(
        &path,
        EngineOptions {
            max_batch: 1,
            ..EngineOptions::default()
        },
    );
    let solo = drain(
        engine
            .submit(request("Once upon a time", &engine, 120, 5))
            .unwrap(),
    )
    .0;
    let mut background = request("Once upon a time", &engine, 120, 5);
    background.priority = -50;
    let mut low = engine.submit(background).unwrap();
    let mut low_ids = Vec::new();
    match low.blocking_next() {
        Some(Ok(GenerateEvent::Token { id, .. })) => low_ids.push(id),
        other => panic!("{other:?}"),
    }
    let urgent = engine.submit(request("Hello", &engine, 3, 2)).unwrap();
    let (urgent_ids, _) = drain(urgent);
    let urgent_done = Instant::now();
    let (rest, _) = drain(low);
    let low_done = Instant::now();
    low_ids.extend(rest);
    assert_eq!(urgent_ids.len(), 3);
    assert!(urgent_done < low_done);
    assert_eq!(
        engine.preemptions(),
        1,
        "the background request was not preempted once"
    );
    assert_eq!(low_ids, solo, "the preempted request's tokens changed");
}

#[test]
fn the_prefix_cache_serves_a_tenant_its_own_prompts_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_model(dir.path());
    let engine = start(&path, EngineOptions::default());
    let shared = "the theory of everything in the beginning there was a short one ".repeat(3);
    let ask = |tenant: &str, text: &str| {
        let mut r = request(text, &engine, 12, 3);
        r.tenant = tenant.into();
        let prompt_len = r.prompt.len();
        let (ids, c) = drain(engine.submit(r).unwrap());
        (ids, c.cached_tokens, prompt_len)
    };
    let (first, cached, len) = ask("acme", &shared);
    assert_eq!(cached, 0, "nothing is cached yet");
    assert!(len > 2 * BLOCK_TOKENS, "the prompt spans several blocks");
    let (again, cached, _) = ask("acme", &shared);
    assert_eq!(cached, (len - 1) / BLOCK_TOKENS * BLOCK_TOKENS);
    assert_eq!(again, first, "a cached prefix changes nothing");
    // Another tenant with the same prompt computes it afresh.
    let (theirs, cached, _) = ask("globex", &shared);
    assert_eq!(cached, 0, "no hit on another tenant's blocks");
    assert_eq!(theirs, first);
    // A prompt that shares only a beginning reuses the blocks of that beginning.
    let mut branch = shared.clone();
    branch.truncate(40);
    branch.push_str(" and then something else entirely, at length, to fill blocks");
    let (_, cached, _) = ask("acme", &branch);
    assert!(cached >= BLOCK_TOKENS && cached < len, "{cached}");
}
