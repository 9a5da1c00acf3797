//! The graph's file format: the whole graph except the live nodes' vectors,
//! which their owner keeps elsewhere (a knowledge base's database) and
//! feeds back when reading ([`SavedGraph::fill`]).
//!
//! Leaving the live vectors out keeps the file about a tenth of the size it
//! would be with them (at 384 dimensions a vector is 1,536 bytes, a node's
//! links about a hundred) and keeps one copy of each vector. Removed nodes
//! are the exception: they still route searches, and their owner no longer
//! has them, so their vectors are in the file.
//!
//! All integers little-endian:
//! ```text
//! magic            8 bytes  "KILNHNSW"
//! format version   u32      FORMAT_VERSION
//! dims             u32
//! m                u32
//! ef_construction  u32
//! nodes            u32      every node, removed ones included
//! live             u32      nodes not removed
//! top              u32      the highest layer
//! entry            u32      the entry node; u32::MAX when there are no nodes
//! rng              u64      the level generator's state
//! fingerprint      u64      wrapping sum of row_fingerprint over live nodes
//! per node, in node order:
//!   id             u64
//!   level          u8       on layers 0..=level, at most MAX_LEVEL
//!   removed        u8       0 or 1
//!   per layer:     u32 count (at most 2m on layer 0, m above), count × u32 node
//! per removed node, in node order: dims × f32, its unit vector
//! checksum         32 bytes SHA-256 of everything before it
//! ```
//!
//! Reading trusts nothing in the file: the checksum catches damage and
//! truncation, and every count, index and level is checked again after it,
//! so a file that passes gives a graph that searches and inserts cannot
//! index out of bounds in. Nothing is allocated from a count before the
//! bytes it describes are known to be there.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use super::{Hnsw, Params, MAX_LEVEL};

const MAGIC: &[u8; 8] = b"KILNHNSW";

/// The format this build writes and reads; a file of another version is
/// not read (its owner rebuilds and writes this one).
pub const FORMAT_VERSION: u32 = 1;

const HEADER_BYTES: usize = 56;
const CHECKSUM_BYTES: usize = 32;
const NO_ENTRY: u32 = u32::MAX;
/// The fewest bytes a node takes: id, level, removed, one layer count.
const MIN_NODE_BYTES: usize = 8 + 1 + 1 + 4;

/// Why a graph file was not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GraphFileError {
    #[error("not a graph file")]
    Magic,
    #[error("graph file format version {found}; this build reads version {FORMAT_VERSION}")]
    Version { found: u32 },
    #[error("the graph file is truncated")]
    Truncated,
    #[error("the graph file's checksum does not match: it is damaged or truncated")]
    Checksum,
    #[error("the graph file is corrupt: {0}")]
    Corrupt(String),
    #[error("the graph was built with {what} {found}; the index uses {expected}")]
    Settings {
        what: &'static str,
        found: u64,
        expected: u64,
    },
    #[error("the graph holds {file} live vectors; the database {database}")]
    LiveCount { file: usize, database: usize },
}

impl GraphFileError {
    /// Whether the file is damaged, rather than merely out of date or
    /// written with other settings.
    pub fn is_damage(&self) -> bool {
        match self {
            GraphFileError::Magic
            | GraphFileError::Truncated
            | GraphFileError::Checksum
            | GraphFileError::Corrupt(_) => true,
            GraphFileError::Version { .. }
            | GraphFileError::Settings { .. }
            | GraphFileError::LiveCount { .. } => false,
        }
    }
}

/// Why a graph read from its file does not match the vectors given for it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StaleGraph {
    #[error("chunk {0} is live but not in the saved graph")]
    UnknownId(u64),
    #[error("chunk {0} was given twice")]
    Repeated(u64),
    #[error("a vector of {found} dimensions was given for a graph of {dims}")]
    Dims { found: usize, dims: usize },
    #[error("the saved graph has {live} live vectors; {given} were given")]
    Missing { live: usize, given: usize },
    #[error("the vectors differ from those the graph was saved with")]
    Vectors,
}

/// A 64-bit hash of one live row: its id and its unit vector's exact bits.
/// Summed (wrapping) over a graph's live rows, it is independent of order,
/// so the graph can keep it up to date as rows come and go.
pub fn row_fingerprint(id: u64, v: &[f32]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    // Four independent lanes, so the multiplies overlap.
    let mut lanes = [id, id ^ K, id.rotate_left(17), !id];
    for chunk in v.chunks(4) {
        for (lane, x) in lanes.iter_mut().zip(chunk) {
            *lane = (*lane ^ u64::from(x.to_bits()))
                .wrapping_mul(K)
                .rotate_left(29);
        }
    }
    lanes.iter().fold(v.len() as u64, |h, &l| mix(h ^ l))
}

/// splitmix64's finaliser.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Hnsw {
    /// The graph in the file format above, checksum included.
    pub fn to_bytes(&self) -> Vec<u8> {
        let nodes = self.ids.len();
        // Room for full layer-0 lists, which also covers the upper layers
        // of a typical graph; counting exactly would walk every list twice.
        let mut out = Vec::with_capacity(
            HEADER_BYTES
                + nodes * (MIN_NODE_BYTES + 8 * self.params.m)
                + self.tombstones * self.dims * 4
                + CHECKSUM_BYTES,
        );
        out.extend_from_slice(MAGIC);
        let mut put = |x: u32| out.extend_from_slice(&x.to_le_bytes());
        put(FORMAT_VERSION);
        put(self.dims as u32);
        put(self.params.m as u32);
        put(self.params.ef_construction as u32);
        put(nodes as u32);
        put(self.by_id.len() as u32);
        put(self.top as u32);
        put(self.entry.unwrap_or(NO_ENTRY));
        out.extend_from_slice(&self.rng.to_le_bytes());
        out.extend_from_slice(&self.fingerprint.to_le_bytes());
        for ((id, layers), removed) in self.ids.iter().zip(&self.links).zip(&self.removed) {
            out.extend_from_slice(&id.to_le_bytes());
            out.push(layers.len().saturating_sub(1) as u8);
            out.push(u8::from(*removed));
            for neighbours in layers {
                out.extend_from_slice(&(neighbours.len() as u32).to_le_bytes());
                for n in neighbours {
                    out.extend_from_slice(&n.to_le_bytes());
                }
            }
        }
        for (node, removed) in self.removed.iter().enumerate() {
            if *removed {
                for x in self.row(node as u32) {
                    out.extend_from_slice(&x.to_le_bytes());
                }
            }
        }
        let checksum = Sha256::digest(&out);
        out.extend_from_slice(&checksum);
        out
    }

    /// Reads a graph written by [`Hnsw::to_bytes`] for an index of `dims`
    /// dimensions built with `params` (its `ef_search` is used as given),
    /// whose owner has `live` vectors for it. Any damage, another format
    /// version or other settings are an error.
    pub fn from_bytes(
        bytes: &[u8],
        dims: usize,
        params: Params,
        live: usize,
    ) -> Result<SavedGraph, GraphFileError> {
        let mut r = Reader { bytes, pos: 0 };
        if r.take(MAGIC.len())? != MAGIC {
            return Err(GraphFileError::Magic);
        }
        let found = r.u32()?;
        if found != FORMAT_VERSION {
            return Err(GraphFileError::Version { found });
        }
        let body_len = bytes
            .len()
            .checked_sub(CHECKSUM_BYTES)
            .ok_or(GraphFileError::Truncated)?;
        if body_len < HEADER_BYTES {
            return Err(GraphFileError::Truncated);
        }
        let (body, checksum) = bytes.split_at(body_len);
        if Sha256::digest(body).as_slice() != checksum {
            return Err(GraphFileError::Checksum);
        }
        r.bytes = body;

        let mut setting = |what: &'static str, expected: usize| -> Result<(), GraphFileError> {
            let found = r.u32()?;
            if found as usize == expected {
                Ok(())
            } else {
                Err(GraphFileError::Settings {
                    what,
                    found: u64::from(found),
                    expected: expected as u64,
                })
            }
        };
        setting("dimensions", dims)?;
        setting("m", params.m)?;
        setting("ef_construction", params.ef_construction)?;
        let nodes = r.u32()? as usize;
        let live_in_file = r.u32()? as usize;
        if live_in_file > nodes {
            return Err(corrupt("more live nodes than nodes"));
        }
        if live_in_file != live {
            return Err(GraphFileError::LiveCount {
                file: live_in_file,
                database: live,
            });
        }
        let top = r.u32()? as usize;
        let entry = r.u32()?;
        let rng = r.u64()?;
        let fingerprint = r.u64()?;
        // Bound what the counts make us allocate by the bytes present.
        let removed_count = nodes - live_in_file;
        let tombstone_bytes = removed_count
            .checked_mul(dims)
            .and_then(|x| x.checked_mul(4))
            .ok_or(GraphFileError::Truncated)?;
        if nodes > r.left() / MIN_NODE_BYTES || tombstone_bytes > r.left() {
            return Err(GraphFileError::Truncated);
        }
        let data_len = nodes.checked_mul(dims).ok_or(GraphFileError::Truncated)?;

        let mut ids = Vec::with_capacity(nodes);
        let mut links: Vec<Vec<Vec<u32>>> = Vec::with_capacity(nodes);
        let mut removed = Vec::with_capacity(nodes);
        let mut by_id = HashMap::with_capacity(live_in_file);
        for node in 0..nodes {
            let id = r.u64()?;
            let level = r.u8()? as usize;
            if level > MAX_LEVEL {
                return Err(corrupt(format!("node {node} is on layer {level}")));
            }
            let is_removed = match r.u8()? {
                0 => false,
                1 => true,
                x => return Err(corrupt(format!("node {node} has removed flag {x}"))),
            };
            let mut layers = Vec::with_capacity(level + 1);
            for layer in 0..=level {
                let count = r.u32()? as usize;
                let max = if layer == 0 { params.m * 2 } else { params.m };
                if count > max {
                    return Err(corrupt(format!(
                        "node {node} has {count} neighbours on layer {layer}, more than {max}"
                    )));
                }
                let raw = r.take(count * 4)?;
                layers.push(
                    raw.chunks_exact(4)
                        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect::<Vec<u32>>(),
                );
            }
            if !is_removed && by_id.insert(id, node as u32).is_some() {
                return Err(corrupt(format!("two live nodes hold id {id}")));
            }
            ids.push(id);
            links.push(layers);
            removed.push(is_removed);
        }
        if by_id.len() != live_in_file {
            return Err(corrupt("the live count does not match the nodes"));
        }
        // A neighbour on layer L must itself be on layer L: inserting walks
        // the neighbour's own list on that layer.
        for (node, layers) in links.iter().enumerate() {
            for (layer, neighbours) in layers.iter().enumerate() {
                for &n in neighbours {
                    if links.get(n as usize).is_none_or(|l| l.len() <= layer) {
                        return Err(corrupt(format!(
                            "node {node} links to node {n}, which is not on layer {layer}"
                        )));
                    }
                }
            }
        }
        let highest = links.iter().map(|l| l.len() - 1).max();
        let entry = match (entry, highest) {
            (NO_ENTRY, None) if top == 0 => None,
            (e, Some(h))
                if h == top && links.get(e as usize).is_some_and(|l| l.len() == top + 1) =>
            {
                Some(e)
            }
            _ => return Err(corrupt("the entry node is not on the top layer")),
        };
        let mut data = vec![0f32; data_len];
        for (node, _) in removed.iter().enumerate().filter(|(_, gone)| **gone) {
            let row = &mut data[node * dims..(node + 1) * dims];
            for (x, b) in row.iter_mut().zip(r.take(dims * 4)?.chunks_exact(4)) {
                *x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                if !x.is_finite() {
                    return Err(corrupt(format!(
                        "removed node {node} has a non-finite vector"
                    )));
                }
            }
        }
        if r.left() != 0 {
            return Err(corrupt(format!("{} bytes after the graph", r.left())));
        }
        let graph = Hnsw {
            dims,
            params,
            data,
            ids,
            links,
            removed,
            by_id,
            entry,
            top,
            rng,
            tombstones: removed_count,
            fingerprint,
        };
        Ok(SavedGraph {
            filled: vec![false; nodes],
            given: 0,
            sum: 0,
            graph,
        })
    }
}

fn corrupt(why: impl Into<String>) -> GraphFileError {
    GraphFileError::Corrupt(why.into())
}

/// A graph read from its file whose live nodes still need their vectors:
/// [`SavedGraph::fill`] each, then [`SavedGraph::into_graph`] checks that
/// every live node got one and that they are the vectors it was saved with.
#[derive(Debug)]
pub struct SavedGraph {
    graph: Hnsw,
    filled: Vec<bool>,
    given: usize,
    /// Wrapping sum of [`row_fingerprint`] over the rows filled.
    sum: u64,
}

impl SavedGraph {
    /// Gives live chunk `id` its unit vector.
    pub fn fill(&mut self, id: u64, unit: &[f32]) -> Result<(), StaleGraph> {
        let dims = self.graph.dims;
        if unit.len() != dims {
            return Err(StaleGraph::Dims {
                found: unit.len(),
                dims,
            });
        }
        let node = *self.graph.by_id.get(&id).ok_or(StaleGraph::UnknownId(id))? as usize;
        if std::mem::replace(&mut self.filled[node], true) {
            return Err(StaleGraph::Repeated(id));
        }
        self.graph.data[node * dims..(node + 1) * dims].copy_from_slice(unit);
        self.given += 1;
        self.sum = self.sum.wrapping_add(row_fingerprint(id, unit));
        Ok(())
    }

    /// The (id, unit vector) rows filled so far.
    pub fn filled_rows(&self) -> impl Iterator<Item = (u64, &[f32])> {
        self.graph
            .ids
            .iter()
            .copied()
            .zip(self.graph.data.chunks_exact(self.graph.dims.max(1)))
            .zip(&self.filled)
            .filter(|(_, filled)| **filled)
            .map(|(row, _)| row)
    }

    /// The graph, once every live node has the vector it was saved with;
    /// otherwise why not, with the rows given so far still readable.
    pub fn into_graph(self) -> Result<Hnsw, (StaleGraph, Box<SavedGraph>)> {
        let live = self.graph.by_id.len();
        if self.given != live {
            let given = self.given;
            return Err((StaleGraph::Missing { live, given }, Box::new(self)));
        }
        if self.sum != self.graph.fingerprint {
            return Err((StaleGraph::Vectors, Box::new(self)));
        }
        Ok(self.graph)
    }
}

/// Little-endian reads that fail, rather than panic, past the end.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], GraphFileError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or(GraphFileError::Truncated)?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn left(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn u8(&mut self) -> Result<u8, GraphFileError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, GraphFileError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, GraphFileError> {
        let b = self.take(8)?;
        let mut x = [0u8; 8];
        x.copy_from_slice(b);
        Ok(u64::from_le_bytes(x))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::vector::normalize;

    const DIMS: usize = 8;

    /// Deterministic pseudo-random unit vectors.
    fn random_vectors(n: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut vectors = crate::vector::pseudo_random_vectors(n, DIMS, seed);
        vectors.iter_mut().for_each(|v| normalize(v));
        vectors
    }

    /// A graph of 60 nodes, 5 of them removed, with the live rows.
    fn sample() -> (Hnsw, Vec<(u64, Vec<f32>)>) {
        let mut graph = Hnsw::new(DIMS, Params::default());
        let vectors = random_vectors(60, 3);
        for (i, v) in vectors.iter().enumerate() {
            graph.insert(i as u64 + 100, v);
        }
        for id in [101, 110, 120, 130, 159] {
            assert!(graph.remove(id));
        }
        let live = graph.rows().map(|(id, v)| (id, v.to_vec())).collect();
        (graph, live)
    }

    fn read(bytes: &[u8]) -> Result<SavedGraph, GraphFileError> {
        Hnsw::from_bytes(bytes, DIMS, Params::default(), 55)
    }

    /// Replaces the checksum with the right one for the (changed) body.
    fn reseal(bytes: &mut Vec<u8>) {
        bytes.truncate(bytes.len() - CHECKSUM_BYTES);
        let checksum = Sha256::digest(&bytes[..]);
        bytes.extend_from_slice(&checksum);
    }

    #[test]
    fn reads_back_what_it_wrote() {
        let (graph, live) = sample();
        let bytes = graph.to_bytes();
        let mut saved = read(&bytes).unwrap();
        for (id, v) in live.iter().rev() {
            saved.fill(*id, v).unwrap();
        }
        let back = saved.into_graph().unwrap();
        assert_eq!(back.to_bytes(), bytes);
        assert_eq!(back.tombstones(), 5);
        assert_eq!(back.len(), 55);
        for q in random_vectors(20, 9) {
            assert_eq!(
                graph.search(&q, 5, &|_| true),
                back.search(&q, 5, &|_| true)
            );
        }
    }

    #[test]
    fn an_empty_graph_round_trips() {
        let graph = Hnsw::new(DIMS, Params::default());
        let saved = Hnsw::from_bytes(&graph.to_bytes(), DIMS, Params::default(), 0).unwrap();
        let mut back = saved.into_graph().unwrap();
        assert!(back.is_empty());
        back.insert(1, &random_vectors(1, 1)[0]);
        assert_eq!(back.len(), 1);
    }

    #[test]
    fn other_settings_versions_and_counts_are_refused() {
        let (graph, _) = sample();
        let bytes = graph.to_bytes();
        let wrong_dims = Hnsw::from_bytes(&bytes, DIMS + 1, Params::default(), 55);
        assert!(matches!(
            wrong_dims,
            Err(GraphFileError::Settings {
                what: "dimensions",
                ..
            })
        ));
        let params = Params {
            m: 8,
            ..Params::default()
        };
        assert!(matches!(
            Hnsw::from_bytes(&bytes, DIMS, params, 55),
            Err(GraphFileError::Settings { what: "m", .. })
        ));
        assert_eq!(
            Hnsw::from_bytes(&bytes, DIMS, Params::default(), 54).unwrap_err(),
            GraphFileError::LiveCount {
                file: 55,
                database: 54
            }
        );
        let mut other = bytes.clone();
        other[8..12].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(
            read(&other).unwrap_err(),
            GraphFileError::Version { found: 2 }
        );
        other[0] = b'X';
        assert_eq!(read(&other).unwrap_err(), GraphFileError::Magic);
        assert!(read(b"").is_err());
    }

    #[test]
    fn every_truncation_is_refused() {
        let (graph, _) = sample();
        let bytes = graph.to_bytes();
        for len in 0..bytes.len() {
            assert!(read(&bytes[..len]).is_err(), "{len} bytes accepted");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(read(&longer).is_err());
    }

    #[test]
    fn inconsistent_graphs_are_refused_even_with_a_valid_checksum() {
        let (graph, _) = sample();
        let bytes = graph.to_bytes();
        // Node 0 starts right after the header: id, level, removed, then
        // its layer-0 count and neighbours.
        const LEVEL: usize = HEADER_BYTES + 8;
        const NEIGHBOUR: usize = LEVEL + 1 + 1 + 4;
        type Damage = fn(&mut Vec<u8>);
        let cases: Vec<(&str, Damage)> = vec![
            ("neighbour out of range", |b| {
                b[NEIGHBOUR..NEIGHBOUR + 4].copy_from_slice(&60u32.to_le_bytes())
            }),
            ("level too high", |b| b[LEVEL] = MAX_LEVEL as u8 + 1),
            ("removed flag", |b| b[LEVEL + 1] = 2),
            ("entry out of range", |b| {
                b[36..40].copy_from_slice(&60u32.to_le_bytes())
            }),
            ("top not the highest layer", |b| {
                b[32..36].copy_from_slice(&(MAX_LEVEL as u32).to_le_bytes())
            }),
            ("node count beyond the bytes", |b| {
                b[24..28].copy_from_slice(&u32::MAX.to_le_bytes())
            }),
            ("too many neighbours", |b| {
                b[NEIGHBOUR - 4..NEIGHBOUR].copy_from_slice(&33u32.to_le_bytes())
            }),
        ];
        for (what, change) in cases {
            let mut changed = bytes.clone();
            change(&mut changed);
            reseal(&mut changed);
            assert!(read(&changed).is_err(), "{what} accepted");
        }
    }

    #[test]
    fn vectors_other_than_the_saved_ones_are_stale() {
        let (graph, live) = sample();
        let bytes = graph.to_bytes();
        let mut saved = read(&bytes).unwrap();
        assert_eq!(saved.fill(7, &live[0].1), Err(StaleGraph::UnknownId(7)));
        assert_eq!(
            saved.fill(live[0].0, &[1.0]),
            Err(StaleGraph::Dims {
                found: 1,
                dims: DIMS
            })
        );
        saved.fill(live[0].0, &live[0].1).unwrap();
        assert_eq!(
            saved.fill(live[0].0, &live[0].1),
            Err(StaleGraph::Repeated(live[0].0))
        );
        assert_eq!(saved.filled_rows().count(), 1);
        assert!(matches!(
            saved.into_graph(),
            Err((StaleGraph::Missing { live: 55, given: 1 }, _))
        ));
        let mut saved = read(&bytes).unwrap();
        for (i, (id, v)) in live.iter().enumerate() {
            let mut v = v.clone();
            if i == 30 {
                v[0] = -v[0];
            }
            saved.fill(*id, &v).unwrap();
        }
        assert!(matches!(saved.into_graph(), Err((StaleGraph::Vectors, _))));
    }

    proptest! {
        #[test]
        fn any_flipped_bit_is_refused(at in any::<prop::sample::Index>(), bit in 0..8u8) {
            let (graph, _) = sample();
            let mut bytes = graph.to_bytes();
            let i = at.index(bytes.len());
            bytes[i] ^= 1 << bit;
            prop_assert!(read(&bytes).is_err());
        }

        /// Damage that still carries a valid checksum (written on purpose)
        /// never panics: it is refused, or gives a graph that searches,
        /// inserts and removals work on.
        #[test]
        fn resealed_damage_never_panics(
            changes in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        ) {
            let (graph, live) = sample();
            let mut bytes = graph.to_bytes();
            let body = bytes.len() - CHECKSUM_BYTES;
            for (at, value) in changes {
                bytes[at.index(body)] = value;
            }
            reseal(&mut bytes);
            let Ok(mut saved) = read(&bytes) else {
                return Ok(());
            };
            for (id, v) in &live {
                let _ = saved.fill(*id, v);
            }
            if let Ok(mut back) = saved.into_graph() {
                let extra = random_vectors(5, 11);
                for q in &extra {
                    back.search(q, 5, &|_| true);
                }
                for (i, v) in extra.iter().enumerate() {
                    back.insert(1_000 + i as u64, v);
                }
                back.remove(live[0].0);
                back.search(&extra[0], 5, &|_| true);
            }
        }
    }
}
