//! Approximate nearest neighbours: a hierarchical navigable small world
//! graph (Malkov and Yashunin, 2016) over unit vectors, with cosine
//! similarity as a dot product.
//!
//! Each node sits on layers `0..=level` (levels drawn geometrically, from a
//! fixed seed so builds are reproducible) and keeps up to `m` neighbours per
//! layer (`2m` on layer 0). A search descends greedily from the top layer,
//! then explores layer 0 best-first with a candidate list of `ef`.
//! Removal leaves a tombstone: the node still routes searches but is never
//! returned; the owner rebuilds when tombstones pile up.
//!
//! The graph can be written to a file and read back ([`file`]), so a large
//! index need not be rebuilt every time its owner opens.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, HashSet};

use super::dot;

mod file;

pub use file::{row_fingerprint, GraphFileError, SavedGraph, StaleGraph, FORMAT_VERSION};

/// The highest layer a node can be drawn on.
const MAX_LEVEL: usize = 16;

/// Build settings.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    pub m: usize,
    pub ef_construction: usize,
    pub ef_search: usize,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            m: 16,
            ef_construction: 100,
            ef_search: 96,
        }
    }
}

/// Similarity with a node, ordered by similarity then node index.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Near(f32, u32);

impl Eq for Near {}

impl Ord for Near {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0).then(other.1.cmp(&self.1))
    }
}

impl PartialOrd for Near {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

#[derive(Debug)]
pub struct Hnsw {
    dims: usize,
    params: Params,
    /// Unit vectors, row per node.
    data: Vec<f32>,
    ids: Vec<u64>,
    /// `links[node][layer]`: neighbour node indexes.
    links: Vec<Vec<Vec<u32>>>,
    removed: Vec<bool>,
    by_id: HashMap<u64, u32>,
    entry: Option<u32>,
    top: usize,
    rng: u64,
    tombstones: usize,
    /// Wrapping sum of [`row_fingerprint`] over the live nodes, kept up to
    /// date on insert and remove: what a saved graph is checked against.
    fingerprint: u64,
}

impl Hnsw {
    pub fn new(dims: usize, params: Params) -> Self {
        Hnsw {
            dims,
            params,
            data: Vec::new(),
            ids: Vec::new(),
            links: Vec::new(),
            removed: Vec::new(),
            by_id: HashMap::new(),
            entry: None,
            top: 0,
            rng: 0x9E37_79B9_7F4A_7C15,
            tombstones: 0,
            fingerprint: 0,
        }
    }

    pub fn dims(&self) -> usize {
        self.dims
    }

    /// Every live (id, unit vector).
    pub fn rows(&self) -> impl Iterator<Item = (u64, &[f32])> {
        self.ids
            .iter()
            .copied()
            .zip(self.data.chunks_exact(self.dims.max(1)))
            .zip(&self.removed)
            .filter(|(_, removed)| !**removed)
            .map(|(row, _)| row)
    }

    /// Live nodes.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Removed nodes still in the graph.
    pub fn tombstones(&self) -> usize {
        self.tombstones
    }

    pub fn memory_bytes(&self) -> usize {
        let links: usize = self
            .links
            .iter()
            .map(|l| l.iter().map(|n| n.len() * 4 + 24).sum::<usize>() + 24)
            .sum();
        self.data.len() * 4 + self.ids.len() * 9 + self.by_id.len() * 16 + links
    }

    fn row(&self, node: u32) -> &[f32] {
        let start = node as usize * self.dims;
        &self.data[start..start + self.dims]
    }

    fn sim(&self, q: &[f32], node: u32) -> f32 {
        dot(q, self.row(node))
    }

    /// splitmix64: a level per node, reproducibly.
    fn next_random(&mut self) -> f64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn random_level(&mut self) -> usize {
        let ml = 1.0 / (self.params.m.max(2) as f64).ln();
        ((-self.next_random().ln() * ml) as usize).min(MAX_LEVEL)
    }

    /// Best-first search of one layer from `entry`; the `ef` most similar
    /// nodes found, best first.
    fn search_layer(&self, q: &[f32], entry: &[u32], ef: usize, layer: usize) -> Vec<Near> {
        let mut seen: HashSet<u32> = entry.iter().copied().collect();
        let mut candidates: BinaryHeap<Near> = BinaryHeap::new();
        // Min-heap of the best found (worst on top).
        let mut best: BinaryHeap<std::cmp::Reverse<Near>> = BinaryHeap::new();
        for &e in entry {
            let n = Near(self.sim(q, e), e);
            candidates.push(n);
            best.push(std::cmp::Reverse(n));
        }
        while let Some(c) = candidates.pop() {
            let worst = best.peek().map_or(f32::NEG_INFINITY, |w| w.0 .0);
            if c.0 < worst && best.len() >= ef {
                break;
            }
            let Some(neighbours) = self.links[c.1 as usize].get(layer) else {
                continue;
            };
            for &n in neighbours {
                if !seen.insert(n) {
                    continue;
                }
                let s = self.sim(q, n);
                let worst = best.peek().map_or(f32::NEG_INFINITY, |w| w.0 .0);
                if best.len() < ef || s > worst {
                    candidates.push(Near(s, n));
                    best.push(std::cmp::Reverse(Near(s, n)));
                    if best.len() > ef {
                        best.pop();
                    }
                }
            }
        }
        let mut out: Vec<Near> = best.into_iter().map(|r| r.0).collect();
        out.sort_by(|a, b| b.cmp(a));
        out
    }

    /// Picks up to `m` neighbours from `found` (best first), preferring ones
    /// not already well covered by a closer pick (the paper's heuristic),
    /// then filling with the closest left.
    fn select(&self, found: &[Near], m: usize) -> Vec<u32> {
        let mut picked: Vec<Near> = Vec::with_capacity(m);
        let mut skipped = Vec::new();
        for &c in found {
            if picked.len() >= m {
                break;
            }
            let row = self.row(c.1);
            if picked.iter().all(|p| dot(row, self.row(p.1)) < c.0) {
                picked.push(c);
            } else {
                skipped.push(c);
            }
        }
        for c in skipped {
            if picked.len() >= m {
                break;
            }
            picked.push(c);
        }
        picked.into_iter().map(|n| n.1).collect()
    }

    /// Adds a unit vector under `id` (which must not be present).
    pub fn insert(&mut self, id: u64, v: &[f32]) {
        let node = self.ids.len() as u32;
        let level = self.random_level();
        self.data.extend_from_slice(v);
        self.ids.push(id);
        self.removed.push(false);
        self.links.push(vec![Vec::new(); level + 1]);
        self.by_id.insert(id, node);
        self.fingerprint = self.fingerprint.wrapping_add(row_fingerprint(id, v));
        let Some(mut entry) = self.entry else {
            self.entry = Some(node);
            self.top = level;
            return;
        };
        let q = self.row(node).to_vec();
        for layer in (level + 1..=self.top).rev() {
            if let Some(best) = self.search_layer(&q, &[entry], 1, layer).first() {
                entry = best.1;
            }
        }
        let mut entries = vec![entry];
        for layer in (0..=level.min(self.top)).rev() {
            let found = self.search_layer(&q, &entries, self.params.ef_construction, layer);
            let max = if layer == 0 {
                self.params.m * 2
            } else {
                self.params.m
            };
            let chosen = self.select(&found, self.params.m);
            self.links[node as usize][layer] = chosen.clone();
            for &n in &chosen {
                self.links[n as usize][layer].push(node);
                if self.links[n as usize][layer].len() > max {
                    let base = self.row(n).to_vec();
                    let mut near: Vec<Near> = self.links[n as usize][layer]
                        .iter()
                        .map(|&x| Near(dot(&base, self.row(x)), x))
                        .collect();
                    near.sort_by(|a, b| b.cmp(a));
                    let kept = self.select(&near, max);
                    self.links[n as usize][layer] = kept;
                }
            }
            entries = found.iter().map(|n| n.1).collect();
        }
        if level > self.top {
            self.top = level;
            self.entry = Some(node);
        }
    }

    /// Marks `id` removed; it is never returned again.
    pub fn remove(&mut self, id: u64) -> bool {
        let Some(node) = self.by_id.remove(&id) else {
            return false;
        };
        self.removed[node as usize] = true;
        self.tombstones += 1;
        self.fingerprint = self
            .fingerprint
            .wrapping_sub(row_fingerprint(id, self.row(node)));
        true
    }

    /// Up to `k` live nodes `keep` accepts, most similar first, as (id,
    /// similarity). Approximate: may miss some true neighbours, and with a
    /// restrictive `keep` may return fewer than `k` (the caller falls back
    /// to an exact scan then).
    pub fn search(&self, q: &[f32], k: usize, keep: &dyn Fn(u64) -> bool) -> Vec<(u64, f32)> {
        let Some(mut entry) = self.entry else {
            return Vec::new();
        };
        for layer in (1..=self.top).rev() {
            if let Some(best) = self.search_layer(q, &[entry], 1, layer).first() {
                entry = best.1;
            }
        }
        let ef = self.params.ef_search.max(k * 2);
        self.search_layer(q, &[entry], ef, 0)
            .into_iter()
            .filter(|n| !self.removed[n.1 as usize])
            .map(|n| (self.ids[n.1 as usize], n.0))
            .filter(|(id, _)| keep(*id))
            .take(k)
            .collect()
    }
}
