//! What the knowledge-base tests share: an embedder without weights.
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};

use kiln_rag::kb::{EmbedError, Embedder};

pub const DIMS: usize = 64;

/// Hashes lowercased words into a vector; refuses once `budget` inputs are
/// used up, like a metered embedder whose caller ran out of credit.
pub struct HashEmbedder {
    pub budget: AtomicUsize,
    pub calls: AtomicUsize,
}

impl HashEmbedder {
    pub fn new(budget: usize) -> Self {
        HashEmbedder {
            budget: AtomicUsize::new(budget),
            calls: AtomicUsize::new(0),
        }
    }
}

impl Embedder for HashEmbedder {
    fn model(&self) -> &str {
        "hash-64"
    }
    fn dimensions(&self) -> usize {
        DIMS
    }
    fn max_tokens(&self) -> usize {
        256
    }
    fn count_tokens(&self, text: &str) -> usize {
        text.split_whitespace().count()
    }
    fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let left = self.budget.load(Ordering::SeqCst);
        if left < texts.len() {
            return Err(EmbedError::Refused("insufficient credit".into()));
        }
        self.budget.fetch_sub(texts.len(), Ordering::SeqCst);
        Ok(texts
            .iter()
            .map(|t| {
                let mut v = vec![0f32; DIMS];
                for w in t
                    .split(|c: char| !c.is_alphanumeric())
                    .filter(|w| !w.is_empty())
                {
                    let h = w
                        .to_lowercase()
                        .bytes()
                        .fold(1469598103934665603u64, |h, b| {
                            (h ^ b as u64).wrapping_mul(1099511628211)
                        });
                    v[(h % DIMS as u64) as usize] += 1.0;
                }
                v
            })
            .collect())
    }
}
