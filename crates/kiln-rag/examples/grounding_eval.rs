//! Scores the lexical checks of [`kiln_rag::ground`] on PubMedQA (PQA-L):
//!
//! - **support checker**: each sentence of a question's long answer against
//!   its own abstract's passages (labelled supported) and against the
//!   passages of another question (labelled unsupported);
//! - **relevance gate** (term coverage only; the cosine side needs the
//!   embedding model and is not scored here): each question against its
//!   own passages (relevant) and another question's (irrelevant).
//!
//! "Another question" is taken two ways: the next one in id order (an
//! unrelated abstract, the easy case), and the one of the same split whose
//! passages share the most terms with this question's answer (a related
//! abstract on a neighbouring topic, the hard case).
//!
//! Thresholds are tuned on the 500 questions outside the official test
//! split and scored on the 500 test questions.
//!
//! ```text
//! cargo run -p kiln-rag --release --example grounding_eval -- ../shared/data/pubmedqa
//! ```
#![allow(clippy::print_stdout)]

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

use kiln_rag::ground::{content_terms, coverage, sentences, support};
use serde::Deserialize;

#[derive(Deserialize)]
struct Item {
    #[serde(rename = "QUESTION")]
    question: String,
    #[serde(rename = "CONTEXTS")]
    contexts: Vec<String>,
    #[serde(rename = "LONG_ANSWER")]
    long_answer: String,
}

/// A scored example: the checker's score and the label.
type Scored = Vec<(f32, bool)>;

fn best_support(sentence: &[String], sources: &[Vec<String>]) -> f32 {
    sources
        .iter()
        .map(|s| support(sentence, s))
        .fold(0.0, f32::max)
}

/// Which other question's passages are the unsupported side.
#[derive(Clone, Copy)]
enum Other {
    /// The next question in id order.
    Next,
    /// The question whose passages share the most terms with this one's
    /// answer.
    Nearest,
}

/// The index in `ids` of the question whose passages cover most of
/// question `i`'s answer terms.
fn nearest(i: usize, ids: &[&String], items: &BTreeMap<String, Item>) -> usize {
    let answer: HashSet<String> = content_terms(&items[ids[i]].long_answer)
        .into_iter()
        .collect();
    let shared = |j: usize| {
        let terms: HashSet<String> = items[ids[j]]
            .contexts
            .iter()
            .flat_map(|c| content_terms(c))
            .collect();
        answer.intersection(&terms).count()
    };
    (0..ids.len())
        .filter(|&j| j != i)
        .max_by_key(|&j| shared(j))
        .unwrap_or((i + 1) % ids.len())
}

fn pairs(ids: &[&String], items: &BTreeMap<String, Item>, pick: Other) -> (Scored, Scored) {
    let mut support_scores = Vec::new();
    let mut gate_scores = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let own = &items[*id];
        let other = match pick {
            Other::Next => &items[ids[(i + 1) % ids.len()]],
            Other::Nearest => &items[ids[nearest(i, ids, items)]],
        };
        let own_sources: Vec<Vec<String>> = own.contexts.iter().map(|c| content_terms(c)).collect();
        let other_sources: Vec<Vec<String>> =
            other.contexts.iter().map(|c| content_terms(c)).collect();
        for (_, _, s) in sentences(&own.long_answer) {
            let terms = content_terms(s);
            if terms.len() < 3 {
                continue;
            }
            support_scores.push((best_support(&terms, &own_sources), true));
            support_scores.push((best_support(&terms, &other_sources), false));
        }
        let q = content_terms(&own.question);
        let cover = |sources: &[Vec<String>]| {
            sources
                .iter()
                .map(|s| coverage(&q, &s.iter().cloned().collect::<HashSet<_>>()))
                .fold(0.0, f32::max)
        };
        gate_scores.push((cover(&own_sources), true));
        gate_scores.push((cover(&other_sources), false));
    }
    (support_scores, gate_scores)
}

struct Metrics {
    threshold: f32,
    accuracy: f32,
    precision: f32,
    recall: f32,
    f1: f32,
}

fn metrics(scored: &Scored, threshold: f32) -> Metrics {
    let (mut tp, mut fp, mut tn, mut fneg) = (0f32, 0f32, 0f32, 0f32);
    for &(s, label) in scored {
        match (s >= threshold, label) {
            (true, true) => tp += 1.0,
            (true, false) => fp += 1.0,
            (false, false) => tn += 1.0,
            (false, true) => fneg += 1.0,
        }
    }
    let precision = if tp + fp > 0.0 { tp / (tp + fp) } else { 0.0 };
    let recall = if tp + fneg > 0.0 {
        tp / (tp + fneg)
    } else {
        0.0
    };
    Metrics {
        threshold,
        accuracy: (tp + tn) / scored.len().max(1) as f32,
        precision,
        recall,
        f1: if precision + recall > 0.0 {
            2.0 * precision * recall / (precision + recall)
        } else {
            0.0
        },
    }
}

/// The threshold (on a 0.05 grid) with the best accuracy.
fn tune(scored: &Scored) -> f32 {
    (1..20)
        .map(|i| i as f32 * 0.05)
        .max_by(|a, b| {
            metrics(scored, *a)
                .accuracy
                .total_cmp(&metrics(scored, *b).accuracy)
        })
        .unwrap_or(0.5)
}

fn report(what: &str, m: &Metrics) {
    println!(
        "{what:<28} threshold {:.2}  accuracy {:.3}  precision {:.3}  recall {:.3}  F1 {:.3}",
        m.threshold, m.accuracy, m.precision, m.recall, m.f1
    );
}

fn main() -> anyhow::Result<()> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "../shared/data/pubmedqa".into()),
    );
    let items: BTreeMap<String, Item> =
        serde_json::from_slice(&std::fs::read(dir.join("ori_pqal.json"))?)?;
    let test: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&std::fs::read(dir.join("test_ground_truth.json"))?)?;
    let (test_ids, tune_ids): (Vec<&String>, Vec<&String>) =
        items.keys().partition(|id| test.contains_key(*id));
    let defaults = kiln_rag::ground::Thresholds::default();
    for (pick, name) in [(Other::Next, "next"), (Other::Nearest, "nearest")] {
        let (tune_support, tune_gate) = pairs(&tune_ids, &items, pick);
        let (test_support, test_gate) = pairs(&test_ids, &items, pick);
        println!(
            "PubMedQA PQA-L, unsupported side = the {name} question's passages: tuned on {} questions, \
             scored on {} (support pairs: {} / {})",
            tune_ids.len(),
            test_ids.len(),
            tune_support.len(),
            test_support.len()
        );
        let s = tune(&tune_support);
        report("support, tuned threshold", &metrics(&test_support, s));
        report(
            "support, shipped default",
            &metrics(&test_support, defaults.support),
        );
        let g = tune(&tune_gate);
        report("relevance gate, tuned", &metrics(&test_gate, g));
        report(
            "relevance gate, default",
            &metrics(&test_gate, defaults.coverage),
        );
    }
    Ok(())
}
