//! Hybrid retrieval: BM25 and vector rankings merged by reciprocal rank
//! fusion (Cormack et al., 2009).
//!
//! RRF needs no score calibration between the two sides — BM25 scores are
//! unbounded, cosine similarities are not — only ranks: a chunk's fused
//! score is `Σ weight / (k + rank)` over the rankings it appears in.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Which rankings a search uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Bm25,
    Vector,
    #[default]
    Hybrid,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "bm25" | "fulltext" => Some(Mode::Bm25),
            "vector" => Some(Mode::Vector),
            "hybrid" => Some(Mode::Hybrid),
            _ => None,
        }
    }
}

/// Fusion settings. The defaults (k 60, equal weights) are the usual RRF
/// ones; a grid search on the Vaswani tuning queries (`bench/rag_eval.py`)
/// found nothing reliably better (the best tuning setting scored lower on
/// the held-out queries), so they stay.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Fusion {
    /// The RRF constant: larger flattens the rank curve.
    pub k: f32,
    pub bm25_weight: f32,
    pub vector_weight: f32,
    /// Candidates taken from each side before fusing.
    pub candidates: usize,
}

impl Default for Fusion {
    fn default() -> Self {
        Fusion {
            k: 60.0,
            bm25_weight: 1.0,
            vector_weight: 1.0,
            candidates: 100,
        }
    }
}

/// The optional last stage: a model that scores (query, passage) pairs
/// jointly — a cross-encoder, or an upstream rerank endpoint. The server's
/// implementation meters each call to the caller's key.
pub trait Reranker: Send + Sync {
    fn model(&self) -> &str;
    /// One relevance score per passage, higher is better.
    fn rerank(&self, query: &str, passages: &[&str]) -> Result<Vec<f32>, crate::kb::EmbedError>;
}

/// Fused candidates a reranker sees (at least `k`).
pub const RERANK_CANDIDATES: usize = 30;

/// A fused candidate: its score and where it ranked on each side (1-based).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fused {
    pub id: u64,
    pub score: f32,
    pub bm25: Option<(usize, f32)>,
    pub vector: Option<(usize, f32)>,
}

/// Merges the two rankings (each best first, as (id, score)) and keeps the
/// best `limit`. Ties go to the smaller id, so results are deterministic.
pub fn fuse(bm25: &[(u64, f32)], vector: &[(u64, f32)], f: &Fusion, limit: usize) -> Vec<Fused> {
    let mut by_id: HashMap<u64, Fused> = HashMap::new();
    let blank = |id| Fused {
        id,
        score: 0.0,
        bm25: None,
        vector: None,
    };
    for (rank, &(id, s)) in bm25.iter().enumerate() {
        let e = by_id.entry(id).or_insert_with(|| blank(id));
        e.score += f.bm25_weight / (f.k + rank as f32 + 1.0);
        e.bm25 = Some((rank + 1, s));
    }
    for (rank, &(id, s)) in vector.iter().enumerate() {
        let e = by_id.entry(id).or_insert_with(|| blank(id));
        e.score += f.vector_weight / (f.k + rank as f32 + 1.0);
        e.vector = Some((rank + 1, s));
    }
    let mut out: Vec<Fused> = by_id.into_values().collect();
    out.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.id.cmp(&b.id)));
    out.truncate(limit);
    out
}

/// Normalised discounted cumulative gain of a ranking at `k`, with binary
/// or graded relevance (`rel` maps an id to its grade; absent is 0).
pub fn ndcg_at(ranking: &[u64], rel: &HashMap<u64, f32>, k: usize) -> f64 {
    let gain = |g: f32| (2f64.powf(g as f64)) - 1.0;
    let dcg: f64 = ranking
        .iter()
        .take(k)
        .enumerate()
        .map(|(i, id)| gain(rel.get(id).copied().unwrap_or(0.0)) / ((i + 2) as f64).log2())
        .sum();
    let mut ideal: Vec<f32> = rel.values().copied().filter(|&g| g > 0.0).collect();
    ideal.sort_by(|a, b| b.total_cmp(a));
    let idcg: f64 = ideal
        .iter()
        .take(k)
        .enumerate()
        .map(|(i, &g)| gain(g) / ((i + 2) as f64).log2())
        .sum();
    if idcg == 0.0 {
        0.0
    } else {
        dcg / idcg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fusion_rewards_agreement() {
        let bm25 = [(1, 9.0), (2, 5.0), (5, 3.0), (6, 2.0), (3, 1.0)];
        let vector = [(3, 0.9), (2, 0.8), (4, 0.1)];
        let fused = fuse(&bm25, &vector, &Fusion::default(), 10);
        assert_eq!(fused[0].id, 2, "{fused:?}");
        assert_eq!(fused[0].bm25, Some((2, 5.0)));
        assert_eq!(fused[0].vector, Some((2, 0.8)));
        assert_eq!(fused.len(), 6);
        let only = fuse(&bm25, &[], &Fusion::default(), 2);
        assert_eq!(only.iter().map(|f| f.id).collect::<Vec<_>>(), [1, 2]);
    }

    #[test]
    fn ndcg_of_perfect_and_reversed() {
        let rel: HashMap<u64, f32> = [(1, 1.0), (2, 1.0)].into();
        assert!((ndcg_at(&[1, 2, 3], &rel, 10) - 1.0).abs() < 1e-9);
        let worse = ndcg_at(&[3, 1, 2], &rel, 10);
        assert!(worse < 1.0 && worse > 0.5);
        assert_eq!(ndcg_at(&[3], &rel, 10), 0.0);
    }
}
