//! The embedding side: nearest chunks to a query vector by cosine
//! similarity.
//!
//! [`VectorIndex`] is exact while small and approximate at scale:
//! - up to [`APPROXIMATE_FROM`] vectors, [`FlatIndex`] compares the query
//!   with every vector (one pass over the matrix, memory-bandwidth bound);
//! - past that, an HNSW graph ([`hnsw`]) answers; when a filter (groups,
//!   metadata) leaves it fewer than `k` results, the same query is answered
//!   by an exact scan instead, so a restricted caller still gets its best
//!   chunks.
//!
//! Vectors are L2-normalised on the way in, so similarity is a dot product.
//! The vectors' durable copy is the knowledge base's database; the index is
//! rebuilt from it when the knowledge base opens, except that an HNSW graph
//! saved to a file ([`persist`]) is reused when it matches those vectors
//! exactly, which spares rebuilding a large graph.

pub mod hnsw;
pub mod persist;

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use hnsw::Hnsw;
pub use persist::{store_graph, write_atomically, NotRestored, Opened, Restore};

/// Vectors past which searches use the HNSW graph.
pub const APPROXIMATE_FROM: usize = 20_000;

/// All vectors in one row-major matrix, with the chunk id of each row.
#[derive(Debug, Default)]
pub struct FlatIndex {
    dims: usize,
    ids: Vec<u64>,
    rows: HashMap<u64, usize>,
    data: Vec<f32>,
}

/// A scored candidate, ordered so the heap's top is the worst kept.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Scored(f32, u64);

impl Eq for Scored {}

impl Ord for Scored {
    fn cmp(&self, other: &Self) -> Ordering {
        // Reverse: a min-heap on score; ties broken by id for determinism.
        other
            .0
            .total_cmp(&self.0)
            .then_with(|| self.1.cmp(&other.1))
    }
}

impl PartialOrd for Scored {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

fn wrong_dims(found: usize, dims: usize) -> String {
    format!("a vector of {found} dimensions cannot go into an index of {dims}")
}

/// Scales `v` to unit length (a zero vector stays zero).
pub fn normalize(v: &mut [f32]) {
    let norm = dot(v, v).sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

/// Dot product with eight independent accumulators, so the compiler keeps
/// them in vector registers.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, ar) = a.split_at(a.len() - a.len() % 8);
    let (bc, br) = b.split_at(b.len().min(ac.len()));
    for (x, y) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ar.iter().zip(br).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

impl FlatIndex {
    pub fn new(dims: usize) -> Self {
        FlatIndex {
            dims,
            ..Default::default()
        }
    }

    pub fn dims(&self) -> usize {
        self.dims
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Bytes the vectors take in memory.
    pub fn memory_bytes(&self) -> usize {
        self.data.len() * 4 + self.ids.len() * (8 + 24)
    }

    /// Adds (or replaces) the vector of chunk `id`. A vector of the wrong
    /// length is refused.
    pub fn insert(&mut self, id: u64, vector: &[f32]) -> Result<(), String> {
        if vector.len() != self.dims {
            return Err(wrong_dims(vector.len(), self.dims));
        }
        let mut v = vector.to_vec();
        normalize(&mut v);
        match self.rows.get(&id) {
            Some(&row) => self.data[row * self.dims..(row + 1) * self.dims].copy_from_slice(&v),
            None => {
                self.rows.insert(id, self.ids.len());
                self.ids.push(id);
                self.data.extend_from_slice(&v);
            }
        }
        Ok(())
    }

    /// Removes chunk `id`'s vector; the last row moves into its place.
    pub fn remove(&mut self, id: u64) -> bool {
        let Some(row) = self.rows.remove(&id) else {
            return false;
        };
        let last = self.ids.len() - 1;
        if row != last {
            let moved = self.ids[last];
            self.ids[row] = moved;
            self.rows.insert(moved, row);
            let (head, tail) = self.data.split_at_mut(last * self.dims);
            head[row * self.dims..(row + 1) * self.dims].copy_from_slice(&tail[..self.dims]);
        }
        self.ids.pop();
        self.data.truncate(last * self.dims);
        true
    }

    /// The `k` most similar chunks that `keep` accepts, best first, as
    /// (chunk id, cosine similarity).
    pub fn search(&self, query: &[f32], k: usize, keep: &dyn Fn(u64) -> bool) -> Vec<(u64, f32)> {
        if query.len() != self.dims || self.dims == 0 {
            return Vec::new();
        }
        let mut q = query.to_vec();
        normalize(&mut q);
        top_k(
            &q,
            self.ids
                .iter()
                .copied()
                .zip(self.data.chunks_exact(self.dims)),
            k,
            keep,
        )
    }

    /// Every (id, unit vector).
    pub fn rows(&self) -> impl Iterator<Item = (u64, &[f32])> {
        self.ids
            .iter()
            .copied()
            .zip(self.data.chunks_exact(self.dims.max(1)))
    }
}

/// The exact `k` best of `rows` for unit vector `q`, best first.
pub(crate) fn top_k<'a>(
    q: &[f32],
    rows: impl Iterator<Item = (u64, &'a [f32])>,
    k: usize,
    keep: &dyn Fn(u64) -> bool,
) -> Vec<(u64, f32)> {
    if k == 0 {
        return Vec::new();
    }
    let mut heap: BinaryHeap<Scored> = BinaryHeap::with_capacity(k + 1);
    for (id, v) in rows {
        let score = dot(q, v);
        if heap.len() == k && heap.peek().is_some_and(|w| score <= w.0) {
            continue;
        }
        if !keep(id) {
            continue;
        }
        heap.push(Scored(score, id));
        if heap.len() > k {
            heap.pop();
        }
    }
    let mut out: Vec<(u64, f32)> = heap.into_iter().map(|s| (s.1, s.0)).collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    out
}

/// Exact while small, an HNSW graph past a threshold.
#[derive(Debug)]
pub enum VectorIndex {
    Flat { flat: FlatIndex, threshold: usize },
    Graph { graph: Hnsw, threshold: usize },
}

impl Default for VectorIndex {
    fn default() -> Self {
        VectorIndex::new(0)
    }
}

impl VectorIndex {
    pub fn new(dims: usize) -> Self {
        Self::with_threshold(dims, APPROXIMATE_FROM)
    }

    /// An index that turns approximate past `threshold` vectors.
    pub fn with_threshold(dims: usize, threshold: usize) -> Self {
        VectorIndex::Flat {
            flat: FlatIndex::new(dims),
            threshold,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            VectorIndex::Flat { flat, .. } => flat.len(),
            VectorIndex::Graph { graph, .. } => graph.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_approximate(&self) -> bool {
        matches!(self, VectorIndex::Graph { .. })
    }

    pub fn memory_bytes(&self) -> usize {
        match self {
            VectorIndex::Flat { flat, .. } => flat.memory_bytes(),
            VectorIndex::Graph { graph, .. } => graph.memory_bytes(),
        }
    }

    /// Adds (or replaces) chunk `id`'s vector.
    pub fn insert(&mut self, id: u64, vector: &[f32]) -> Result<(), String> {
        match self {
            VectorIndex::Flat { flat, threshold } => {
                flat.insert(id, vector)?;
                if flat.len() > *threshold {
                    let graph = build(flat.dims(), flat.rows());
                    *self = VectorIndex::Graph {
                        graph,
                        threshold: *threshold,
                    };
                }
                Ok(())
            }
            VectorIndex::Graph { graph, .. } => {
                if vector.len() != graph.dims() {
                    return Err(wrong_dims(vector.len(), graph.dims()));
                }
                let mut v = vector.to_vec();
                normalize(&mut v);
                graph.remove(id);
                graph.insert(id, &v);
                self.compact();
                Ok(())
            }
        }
    }

    /// Removes chunk `id`'s vector.
    pub fn remove(&mut self, id: u64) -> bool {
        let removed = match self {
            VectorIndex::Flat { flat, .. } => flat.remove(id),
            VectorIndex::Graph { graph, .. } => graph.remove(id),
        };
        self.compact();
        removed
    }

    /// Rebuilds the graph once removed nodes are a quarter of it, or goes
    /// back to exact search when it has shrunk below the threshold.
    fn compact(&mut self) {
        let VectorIndex::Graph { graph, threshold } = self else {
            return;
        };
        let threshold = *threshold;
        if graph.len() <= threshold / 2 {
            let mut flat = FlatIndex::new(graph.dims());
            for (id, v) in graph.rows() {
                let _ = flat.insert(id, v);
            }
            *self = VectorIndex::Flat { flat, threshold };
        } else if graph.tombstones() > graph.len() / 4 {
            let rebuilt = build(graph.dims(), graph.rows());
            *self = VectorIndex::Graph {
                graph: rebuilt,
                threshold,
            };
        }
    }

    /// The `k` most similar chunks that `keep` accepts, best first, as
    /// (chunk id, cosine similarity).
    pub fn search(&self, query: &[f32], k: usize, keep: &dyn Fn(u64) -> bool) -> Vec<(u64, f32)> {
        match self {
            VectorIndex::Flat { flat, .. } => flat.search(query, k, keep),
            VectorIndex::Graph { graph, .. } => {
                if query.len() != graph.dims() {
                    return Vec::new();
                }
                let mut q = query.to_vec();
                normalize(&mut q);
                let found = graph.search(&q, k, keep);
                if found.len() >= k.min(graph.len()) {
                    return found;
                }
                top_k(&q, graph.rows(), k, keep)
            }
        }
    }
}

fn build<'a>(dims: usize, rows: impl Iterator<Item = (u64, &'a [f32])>) -> Hnsw {
    let mut graph = Hnsw::new(dims, hnsw::Params::default());
    for (id, v) in rows {
        graph.insert(id, v);
    }
    graph
}

/// Deterministic pseudo-random vectors with components in [-0.5, 0.5), not
/// normalised (a linear congruential generator), for tests and benchmarks.
#[doc(hidden)]
pub fn pseudo_random_vectors(n: usize, dims: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut state = seed;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as f32 / (1u64 << 31) as f32) - 0.5
    };
    (0..n)
        .map(|_| (0..dims).map(|_| next()).collect())
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn finds_nearest_and_respects_the_filter() {
        let mut idx = FlatIndex::new(3);
        idx.insert(1, &[1.0, 0.0, 0.0]).unwrap();
        idx.insert(2, &[0.0, 2.0, 0.0]).unwrap();
        idx.insert(3, &[1.0, 1.0, 0.0]).unwrap();
        assert!(idx.insert(4, &[1.0]).is_err());
        let hits = idx.search(&[1.0, 0.1, 0.0], 2, &|_| true);
        assert_eq!(hits.iter().map(|h| h.0).collect::<Vec<_>>(), [1, 3]);
        let hits = idx.search(&[1.0, 0.1, 0.0], 2, &|id| id != 1);
        assert_eq!(hits.iter().map(|h| h.0).collect::<Vec<_>>(), [3, 2]);
        assert!((idx.search(&[0.0, 5.0, 0.0], 1, &|_| true)[0].1 - 1.0).abs() < 1e-6);
    }

    #[test]
    fn remove_keeps_the_rest_intact() {
        let mut idx = FlatIndex::new(2);
        for i in 0..10u64 {
            idx.insert(i, &[i as f32 + 1.0, 1.0]).unwrap();
        }
        assert!(idx.remove(3));
        assert!(!idx.remove(3));
        assert!(idx.remove(9));
        assert_eq!(idx.len(), 8);
        for i in [0u64, 1, 2, 4, 5, 6, 7, 8] {
            let mut v = vec![i as f32 + 1.0, 1.0];
            normalize(&mut v);
            let hit = idx.search(&v, 1, &|_| true)[0];
            assert_eq!(hit.0, i);
        }
    }

    /// Deterministic pseudo-random unit vectors.
    fn random_vectors(n: usize, dims: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut vectors = pseudo_random_vectors(n, dims, seed);
        vectors.iter_mut().for_each(|v| normalize(v));
        vectors
    }

    #[test]
    fn past_the_threshold_search_is_approximate_with_high_recall() {
        let dims = 32;
        let data = random_vectors(3000, dims, 7);
        let mut approx = VectorIndex::with_threshold(dims, 500);
        let mut exact = FlatIndex::new(dims);
        for (i, v) in data.iter().enumerate() {
            approx.insert(i as u64, v).unwrap();
            exact.insert(i as u64, v).unwrap();
        }
        assert!(approx.is_approximate());
        assert_eq!(approx.len(), 3000);
        let queries = random_vectors(50, dims, 99);
        let mut found = 0;
        for q in &queries {
            let truth: Vec<u64> = exact.search(q, 10, &|_| true).iter().map(|h| h.0).collect();
            let got: Vec<u64> = approx
                .search(q, 10, &|_| true)
                .iter()
                .map(|h| h.0)
                .collect();
            assert_eq!(got.len(), 10);
            found += got.iter().filter(|id| truth.contains(id)).count();
        }
        let recall = found as f32 / 500.0;
        assert!(recall >= 0.95, "recall@10 {recall}");
        // A restrictive filter falls back to the exact answer.
        let q = &queries[0];
        let keep = |id: u64| id.is_multiple_of(97);
        assert_eq!(approx.search(q, 10, &keep), exact.search(q, 10, &keep));
        // Replacing and removing keep results right.
        approx.insert(5, &queries[1]).unwrap();
        assert_eq!(approx.search(&queries[1], 1, &|_| true)[0].0, 5);
        for i in 0..2000u64 {
            approx.remove(i);
        }
        assert_eq!(approx.len(), 1000);
        let live = |id: u64| id >= 2000;
        for q in queries.iter().take(5) {
            let got = approx.search(q, 10, &|_| true);
            assert!(got.iter().all(|h| live(h.0)), "{got:?}");
        }
        // Shrunk below half the threshold: exact again.
        for i in 2000..2800u64 {
            approx.remove(i);
        }
        assert!(!approx.is_approximate());
        assert_eq!(approx.len(), 200);
    }

    #[test]
    fn dot_matches_naive() {
        let a: Vec<f32> = (0..37).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..37).map(|i| 3.0 - i as f32).collect();
        let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - naive).abs() < 1e-3);
    }
}
