//! The embedding side: nearest chunks to a query vector by cosine
//! similarity.
//!
//! [`FlatIndex`] compares the query with every vector: exact, and at 384
//! dimensions fast enough for a knowledge base of some hundred thousand
//! chunks (one pass over the matrix, memory-bandwidth bound). Vectors are
//! L2-normalised on the way in, so similarity is a dot product. The
//! vectors' durable copy is the knowledge base's database; this index is
//! rebuilt from it when the knowledge base opens.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

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
            return Err(format!(
                "a vector of {} dimensions cannot go into an index of {}",
                vector.len(),
                self.dims
            ));
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
        if k == 0 || query.len() != self.dims || self.dims == 0 {
            return Vec::new();
        }
        let mut q = query.to_vec();
        normalize(&mut q);
        let mut heap: BinaryHeap<Scored> = BinaryHeap::with_capacity(k + 1);
        for (row, v) in self.data.chunks_exact(self.dims).enumerate() {
            let score = dot(&q, v);
            if heap.len() == k && heap.peek().is_some_and(|w| score <= w.0) {
                continue;
            }
            let id = self.ids[row];
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

    #[test]
    fn dot_matches_naive() {
        let a: Vec<f32> = (0..37).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..37).map(|i| 3.0 - i as f32).collect();
        let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - naive).abs() < 1e-3);
    }
}
