//! Kiln's forward pass against llama.cpp's, on the golden greedy continuations
//! in tests/fixtures/generation/ (made by scripts/make_generation_fixtures.py
//! with llama-cpp-python; the fixtures record version, settings and sha256).
//!
//! The rule, per prompt and step:
//! - our logits for llama.cpp's ten most likely tokens must be within
//!   [`LOGIT_TOLERANCE`] of llama.cpp's (teacher forcing: both sides are fed
//!   llama.cpp's tokens, so every step is compared on the same context);
//! - our greedy choice must be llama.cpp's, except at a step where llama.cpp's
//!   top two logits are within [`TIE_GAP`]: there a divergence is accepted,
//!   recorded, and the prompt ends (the continuations differ from there on);
//! - finally the real generation loop (the engine's queue and sampler, greedy,
//!   EOS ignored) must produce exactly llama.cpp's tokens up to that point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

mod common;

use std::path::Path;

use common::tiny_gguf::TinyArch;
use common::{generation_fixture, test_home, write_checked_tiny_model, GenerationFixture};
use kiln_engine::gguf::GgufFile;
use kiln_engine::model::transformer::Transformer;
use kiln_engine::sampler::argmax;

/// Largest accepted |ours - llama.cpp| on any of llama.cpp's top-10 logits.
const LOGIT_TOLERANCE: f32 = 5.0;
/// llama.cpp top-2 gap below which either choice is right.
const TIE_GAP: f32 = 0.01;

struct PromptReport {
    name: String,
    compared_steps: usize,
    max_diff: f32,
    divergence: Option<(usize, f32)>,
}

fn compare(model_path: &Path, fixture: &GenerationFixture) -> Vec<PromptReport> {
    let mut file = GgufFile::open(model_path).unwrap();
    let arch = file.architecture().unwrap();
    assert_eq!(arch, fixture.model.architecture);
    let t = Transformer::load(&mut file, &arch).unwrap();
    let mut reports = Vec::new();
    for p in &fixture.prompts {
        let mut cache = t.new_cache();
        let mut logits = t.forward(&p.prompt_tokens, &mut cache).unwrap();
        let mut report = PromptReport {
            name: p.name.clone(),
            compared_steps: 0,
            max_diff: 0.0,
            divergence: None,
        };
        for (i, step) in p.steps.iter().enumerate() {
            for &(id, reference) in &step.top {
                let diff = (logits[id as usize] - reference).abs();
                report.max_diff = report.max_diff.max(diff);
                assert!(
                    diff <= LOGIT_TOLERANCE,
                    "{}: step {i}: logit of token {id} is {} here, {reference} in llama.cpp (tolerance {LOGIT_TOLERANCE})",
                    p.name,
                    logits[id as usize]
                );
            }
            report.compared_steps = i + 1;
            let ours = argmax(&logits);
            if ours != step.token {
                if std::env::var("KILN_REPORT_ONLY").is_ok() {
                    report.divergence = Some((i, step.gap));
                    break;
                }
                assert!(
                    step.gap < TIE_GAP,
                    "{}: step {i}: we chose token {ours}, llama.cpp chose {} with a top-2 gap of {} (only gaps < {TIE_GAP} may diverge)",
                    p.name,
                    step.token,
                    step.gap
                );
                report.divergence = Some((i, step.gap));
                break;
            }
            logits = t.forward(&[step.token], &mut cache).unwrap();
        }
        reports.push(report);
    }
    reports
}

fn print_reports(model: &str, reports: &[PromptReport]) {
    for r in reports {
        println!(
            "{model} / {}: {} steps compared, max |logit diff| {:.4}, {}",
            r.name,
            r.compared_steps,
            r.max_diff,
            match r.divergence {
                Some((step, gap)) =>
                    format!("accepted divergence at step {step} (llama.cpp gap {gap:.4})"),
                None => "no divergence".to_string(),
            }
        );
    }
}

fn real_model(name: &str) -> std::path::PathBuf {
    let path = test_home().join(format!("models/{name}/model.gguf"));
    assert!(
        path.exists(),
        "{} is missing: run `kiln pull {name}` (with KILN_HOME={})",
        path.display(),
        test_home().display()
    );
    path
}

/// The engine's own greedy loop (queue, sampler, EOS ignored) must emit
/// llama.cpp's tokens up to any accepted divergence.
fn check_engine_generation(
    model_path: &Path,
    name: &str,
    fixture: &GenerationFixture,
    reports: &[PromptReport],
) {
    use kiln_engine::engine::{EngineHandle, EngineOptions, GenerateEvent, GenerateRequest};
    use kiln_engine::model::TextModel;
    use kiln_engine::sampler::SamplingParams;
    let model = TextModel::load(model_path, name).unwrap();
    let engine = EngineHandle::start(model, EngineOptions::default()).unwrap();
    for (p, r) in fixture.prompts.iter().zip(reports) {
        if let Some(text) = &p.text {
            assert_eq!(
                engine.model().text_prompt(text),
                p.prompt_tokens,
                "{}: prompt tokenization differs from llama.cpp's",
                p.name
            );
        }
        let n = r.divergence.map_or(p.steps.len(), |(s, _)| s);
        if n == 0 {
            continue;
        }
        let mut stream = engine
            .submit(GenerateRequest {
                prompt: p.prompt_tokens.clone(),
                sampling: SamplingParams::greedy(),
                max_tokens: n,
                stop: Vec::new(),
                logprobs: None,
                ignore_eos: true,
            })
            .unwrap();
        let mut ids = Vec::new();
        while let Some(ev) = stream.blocking_next() {
            match ev.unwrap() {
                GenerateEvent::Token { id, .. } => ids.push(id),
                GenerateEvent::Finished(c) => {
                    assert_eq!(c.completion_tokens, n);
                    assert_eq!(c.prompt_tokens, p.prompt_tokens.len());
                    break;
                }
            }
        }
        ids.dedup_by(|_, _| false);
        let expected: Vec<u32> = p.steps[..n].iter().map(|s| s.token).collect();
        assert_eq!(
            &ids[..n.min(ids.len())],
            &expected[..],
            "{}: generated tokens differ",
            p.name
        );
    }
}

#[test]
fn smollm2_matches_llamacpp() {
    let fixture = generation_fixture("smollm2-135m").unwrap();
    let path = real_model("smollm2-135m");
    let reports = compare(&path, &fixture);
    print_reports("smollm2-135m", &reports);
    check_engine_generation(&path, "smollm2-135m", &fixture, &reports);
}

#[test]
fn gemma3_matches_llamacpp_past_the_sliding_window() {
    let fixture = generation_fixture("gemma3-270m").unwrap();
    assert!(
        fixture.prompts.iter().any(|p| p.prompt_tokens.len() > 600),
        "one Gemma prompt must run past the 512-token window"
    );
    let path = real_model("gemma3-270m");
    let reports = compare(&path, &fixture);
    print_reports("gemma3-270m", &reports);
    check_engine_generation(&path, "gemma3-270m", &fixture, &reports);
}

fn tiny(arch: TinyArch) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_checked_tiny_model(arch, dir.path()).unwrap();
    let fixture = generation_fixture(&format!("tiny-{}", arch.name())).unwrap();
    let reports = compare(&path, &fixture);
    print_reports(arch.name(), &reports);
}

#[test]
fn tiny_qwen2_matches_llamacpp() {
    tiny(TinyArch::Qwen2);
}

#[test]
fn tiny_qwen3_matches_llamacpp() {
    tiny(TinyArch::Qwen3);
}
