//! Saving the approximate index's graph, and opening an index from it.
//!
//! The saved graph is a cache of work, never a source of truth: the vectors'
//! owner (a knowledge base's database) keeps every live vector, and feeds
//! them to [`Restore`] at open as it always did. The saved graph is used
//! only when those vectors are exactly the ones it was saved with: the same
//! number (checked before anything else is read), every id a live node of
//! the graph, given once, and the same vectors bit for bit (the graph's
//! fingerprint). Otherwise (no file, a damaged one, another format version
//! or other build settings, a graph older or newer than the vectors) the
//! index is built from the vectors as before, and [`Opened::Built`] says why.
//! So a crash at any moment costs at most a rebuild, never a wrong answer.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::hnsw::{self, GraphFileError, Hnsw, SavedGraph, StaleGraph};
use super::{normalize, wrong_dims, VectorIndex};

/// How [`Restore::finish`] made its index.
#[derive(Debug)]
pub enum Opened {
    /// The index is exact: no graph was needed.
    Exact,
    /// The saved graph matched the vectors and was used as it is.
    Loaded,
    /// The graph was built from the vectors, because the saved one could
    /// not be used.
    Built(NotRestored),
}

/// Why a saved graph was not used.
#[derive(Debug, thiserror::Error)]
pub enum NotRestored {
    #[error("there is no saved graph")]
    NoFile,
    #[error("the saved graph cannot be read: {0}")]
    Io(io::Error),
    #[error(transparent)]
    File(#[from] GraphFileError),
    #[error("the saved graph is out of date: {0}")]
    Stale(#[from] StaleGraph),
}

impl NotRestored {
    /// Whether the file is damaged or unreadable, rather than absent or out
    /// of date (which happens in normal operation, after a crash say).
    pub fn is_damage(&self) -> bool {
        match self {
            NotRestored::NoFile | NotRestored::Stale(_) => false,
            NotRestored::Io(_) => true,
            NotRestored::File(e) => e.is_damage(),
        }
    }
}

/// An index being opened: from its saved graph while the vectors given
/// match it, from scratch once one does not.
#[derive(Debug)]
pub struct Restore {
    dims: usize,
    threshold: usize,
    state: State,
    why: Option<NotRestored>,
}

#[derive(Debug)]
enum State {
    Saved(SavedGraph),
    Building(VectorIndex),
}

impl VectorIndex {
    /// Starts opening an index of `dims` dimensions that turns approximate
    /// past `threshold` vectors, from the graph saved at `path` if there is
    /// a usable one. `live` is how many vectors will be given; at or below
    /// the threshold the index is exact and no file is read.
    pub fn restore(path: &Path, dims: usize, threshold: usize, live: usize) -> Restore {
        let fresh = || State::Building(VectorIndex::with_threshold(dims, threshold));
        let (state, why) = if live <= threshold {
            (fresh(), None)
        } else {
            match fs::read(path) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    (fresh(), Some(NotRestored::NoFile))
                }
                Err(e) => (fresh(), Some(NotRestored::Io(e))),
                Ok(bytes) => match Hnsw::from_bytes(&bytes, dims, hnsw::Params::default(), live) {
                    Ok(saved) => (State::Saved(saved), None),
                    Err(e) => (fresh(), Some(NotRestored::File(e))),
                },
            }
        };
        Restore {
            dims,
            threshold,
            state,
            why,
        }
    }

    /// The graph in its file format when the index is approximate; `None`
    /// when it is exact (and needs no file).
    pub fn graph_bytes(&self) -> Option<Vec<u8>> {
        match self {
            VectorIndex::Flat { .. } => None,
            VectorIndex::Graph { graph, .. } => Some(graph.to_bytes()),
        }
    }
}

impl Restore {
    /// Gives live chunk `id`'s vector; a vector of the wrong length is
    /// refused, as [`VectorIndex::insert`] refuses it.
    pub fn insert(&mut self, id: u64, vector: &[f32]) -> Result<(), String> {
        if let State::Saved(saved) = &mut self.state {
            if vector.len() != self.dims {
                return Err(wrong_dims(vector.len(), self.dims));
            }
            let mut v = vector.to_vec();
            normalize(&mut v);
            match saved.fill(id, &v) {
                Ok(()) => return Ok(()),
                Err(stale) => {
                    self.state = State::Building(rebuild(saved, self.dims, self.threshold));
                    self.why = Some(NotRestored::Stale(stale));
                }
            }
        }
        match &mut self.state {
            State::Building(index) => index.insert(id, vector),
            State::Saved(_) => Ok(()),
        }
    }

    /// The index, once every vector has been given, and how it was made.
    pub fn finish(self) -> (VectorIndex, Opened) {
        let threshold = self.threshold;
        match self.state {
            State::Saved(saved) => match saved.into_graph() {
                Ok(graph) => {
                    let mut index = VectorIndex::Graph { graph, threshold };
                    index.compact();
                    (index, Opened::Loaded)
                }
                Err((stale, saved)) => (
                    rebuild(&saved, self.dims, threshold),
                    Opened::Built(NotRestored::Stale(stale)),
                ),
            },
            State::Building(index) if index.is_approximate() => (
                index,
                Opened::Built(self.why.unwrap_or(NotRestored::NoFile)),
            ),
            State::Building(index) => (index, Opened::Exact),
        }
    }
}

/// An index built from scratch from the rows given so far.
fn rebuild(saved: &SavedGraph, dims: usize, threshold: usize) -> VectorIndex {
    let mut index = VectorIndex::with_threshold(dims, threshold);
    for (id, v) in saved.filled_rows() {
        // Cannot fail: the rows were checked for `dims` when given.
        let _ = index.insert(id, v);
    }
    index
}

/// Brings the graph file at `path` in line with an index: writes `graph`
/// when there is one ([`write_atomically`]), removes the file when there is
/// none (an exact index).
pub fn store_graph(path: &Path, graph: Option<&[u8]>) -> io::Result<()> {
    match graph {
        Some(bytes) => write_atomically(path, bytes),
        None => match fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
    }
}

/// Writes `bytes` to `path` so that a crash leaves the old file or the new
/// one, whole: a temporary file beside it is written and synced, renamed
/// over it, and the directory synced.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let written = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)?;
        #[cfg(unix)]
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    const DIMS: usize = 16;
    const THRESHOLD: usize = 200;

    /// Deterministic pseudo-random vectors, not normalised (as a database
    /// holds them).
    fn random_vectors(n: usize, seed: u64) -> Vec<Vec<f32>> {
        crate::vector::pseudo_random_vectors(n, DIMS, seed)
    }

    /// An approximate index with removals and a replacement behind it,
    /// and the raw vectors it holds by id.
    fn sample() -> (VectorIndex, BTreeMap<u64, Vec<f32>>) {
        let mut index = VectorIndex::with_threshold(DIMS, THRESHOLD);
        let mut rows = BTreeMap::new();
        for (i, v) in random_vectors(1000, 5).into_iter().enumerate() {
            index.insert(i as u64 + 1, &v).unwrap();
            rows.insert(i as u64 + 1, v);
        }
        for id in (1..=1000u64).step_by(7) {
            index.remove(id);
            rows.remove(&id);
        }
        let v = random_vectors(1, 77).remove(0);
        index.insert(500, &v).unwrap();
        rows.insert(500, v);
        assert!(index.is_approximate());
        (index, rows)
    }

    fn open(path: &Path, rows: &BTreeMap<u64, Vec<f32>>) -> (VectorIndex, Opened) {
        let mut restore = VectorIndex::restore(path, DIMS, THRESHOLD, rows.len());
        // Another order than the graph's, as a database may give them.
        for (id, v) in rows.iter().rev() {
            restore.insert(*id, v).unwrap();
        }
        restore.finish()
    }

    fn same_answers(a: &VectorIndex, b: &VectorIndex) -> bool {
        random_vectors(40, 99).iter().all(|q| {
            a.search(q, 10, &|_| true) == b.search(q, 10, &|_| true)
                && a.search(q, 10, &|id| id % 5 == 0) == b.search(q, 10, &|id| id % 5 == 0)
        })
    }

    #[test]
    fn a_saved_graph_answers_as_the_original() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vectors.hnsw");
        let (mut index, rows) = sample();
        let bytes = index.graph_bytes().unwrap();
        store_graph(&path, Some(&bytes)).unwrap();
        let (mut back, opened) = open(&path, &rows);
        assert!(matches!(opened, Opened::Loaded), "{opened:?}");
        assert_eq!(back.len(), rows.len());
        assert_eq!(back.graph_bytes().unwrap(), bytes);
        assert!(same_answers(&index, &back));
        // Both go on the same way: the level generator was saved too.
        for (i, v) in random_vectors(50, 123).iter().enumerate() {
            index.insert(5_000 + i as u64, v).unwrap();
            back.insert(5_000 + i as u64, v).unwrap();
        }
        index.remove(2);
        back.remove(2);
        assert_eq!(index.graph_bytes(), back.graph_bytes());
        assert!(same_answers(&index, &back));
    }

    #[test]
    fn a_graph_that_does_not_match_the_vectors_is_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vectors.hnsw");
        let (index, rows) = sample();
        let (rebuilt, opened) = open(&path, &rows);
        assert!(matches!(opened, Opened::Built(NotRestored::NoFile)));
        store_graph(&path, index.graph_bytes().as_deref()).unwrap();

        let mut other_ids = rows.clone();
        let v = other_ids.remove(&3).unwrap();
        other_ids.insert(9_999, v);
        let mut other_vector = rows.clone();
        other_vector.insert(4, random_vectors(1, 4).remove(0));
        let mut fewer = rows.clone();
        fewer.remove(&5);
        for (what, given) in [
            ("other ids", other_ids),
            ("another vector", other_vector),
            ("fewer vectors", fewer),
        ] {
            let (back, opened) = open(&path, &given);
            assert!(
                matches!(&opened, Opened::Built(why) if !why.is_damage()),
                "{what}: {opened:?}"
            );
            assert!(back.is_approximate());
            assert_eq!(back.len(), given.len());
            // Every vector is found, and nothing else.
            for (id, v) in &given {
                assert_eq!(back.search(v, 1, &|_| true)[0].0, *id, "{what}");
            }
        }

        let (back, opened) = open(&path, &rows);
        assert!(matches!(opened, Opened::Loaded));
        assert!(same_answers(&rebuilt, &back));

        let mut damaged = std::fs::read(&path).unwrap();
        let middle = damaged.len() / 2;
        damaged[middle] ^= 0x10;
        std::fs::write(&path, &damaged).unwrap();
        let (back, opened) = open(&path, &rows);
        assert!(
            matches!(&opened, Opened::Built(why) if why.is_damage()),
            "{opened:?}"
        );
        assert!(same_answers(&rebuilt, &back));
    }

    #[test]
    fn an_exact_index_needs_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vectors.hnsw");
        let mut index = VectorIndex::with_threshold(DIMS, THRESHOLD);
        let rows: BTreeMap<u64, Vec<f32>> = (1..=THRESHOLD as u64)
            .zip(random_vectors(THRESHOLD, 8))
            .collect();
        for (id, v) in &rows {
            index.insert(*id, v).unwrap();
        }
        assert!(index.graph_bytes().is_none());
        // A file left from when it was approximate is not even read...
        std::fs::write(&path, b"not a graph").unwrap();
        let (back, opened) = open(&path, &rows);
        assert!(matches!(opened, Opened::Exact));
        assert!(!back.is_approximate());
        // ...and storing the exact index removes it.
        store_graph(&path, back.graph_bytes().as_deref()).unwrap();
        assert!(!path.exists());
        store_graph(&path, None).unwrap();
    }

    #[test]
    fn a_wrong_sized_vector_is_refused_as_by_insert() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vectors.hnsw");
        let (index, rows) = sample();
        store_graph(&path, index.graph_bytes().as_deref()).unwrap();
        let mut restore = VectorIndex::restore(&path, DIMS, THRESHOLD, rows.len());
        assert!(restore.insert(1, &[1.0, 2.0]).is_err());
    }

    #[test]
    fn writing_replaces_the_file_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        write_atomically(&path, b"first").unwrap();
        write_atomically(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "the temporary file is left: {names:?}");
    }
}
