//! A knowledge base whose vector index is approximate keeps its graph in
//! `vectors.hnsw`: reopening reads it instead of rebuilding, and a file that
//! does not match the database (stale after a crash, damaged) is rebuilt,
//! with every live chunk still found. The threshold is lowered so a dozen
//! chunks make the index approximate.
#![allow(clippy::unwrap_used)]
#![cfg(unix)]

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use kiln_rag::chunk::ChunkOptions;
use kiln_rag::fulltext::Filter;
use kiln_rag::kb::{KnowledgeBase, Query, Settings, Status, Upload};
use kiln_rag::retrieve::{Fusion, Mode};

mod common;

use common::{HashEmbedder, DIMS};

const THRESHOLD: usize = 4;

fn settings() -> Settings {
    Settings {
        id: "kb-graph".into(),
        tenant: "t1".into(),
        name: "graph".into(),
        description: String::new(),
        embedding_model: "hash-64".into(),
        dimensions: DIMS,
        chunking: ChunkOptions {
            max_tokens: 40,
            overlap_tokens: 8,
        },
        grounding: Default::default(),
        created_ms: 0,
    }
}

/// Document `i`'s text: words no other document has, one chunk.
fn text(i: usize) -> String {
    format!("topic{i} subject{i} code{i} marker{i}")
}

/// Adds and ingests document `i`; returns its id.
fn add(kb: &KnowledgeBase, i: usize) -> String {
    let added = kb
        .add(Upload {
            name: format!("doc{i}.txt"),
            bytes: text(i).into_bytes(),
            ..Default::default()
        })
        .unwrap();
    let id = added.document.id;
    assert_eq!(
        kb.ingest(&id, 1, &HashEmbedder::new(usize::MAX)).unwrap(),
        Status::Ready
    );
    id
}

/// Whether vector search finds document `i` first.
fn finds(kb: &KnowledgeBase, i: usize) -> bool {
    let hits = kb
        .search(
            &Query {
                text: text(i),
                k: 3,
                mode: Mode::Vector,
                fusion: Fusion::default(),
                filter: Filter::default(),
            },
            Some(&HashEmbedder::new(usize::MAX)),
        )
        .unwrap();
    hits.first()
        .is_some_and(|h| h.document_name == format!("doc{i}.txt"))
}

/// The graph file's identity: a rewrite renames a new file over it.
fn identity(path: &Path) -> Option<(u64, i64, i64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.ino(), m.mtime(), m.mtime_nsec()))
}

fn open(dir: &Path) -> KnowledgeBase {
    KnowledgeBase::open_with_vector_threshold(dir, THRESHOLD).unwrap()
}

#[test]
fn the_graph_is_saved_reused_and_rebuilt_when_stale() {
    let dir = tempfile::tempdir().unwrap();
    let graph = dir.path().join("vectors.hnsw");
    let kb = KnowledgeBase::create(dir.path(), settings()).unwrap();
    let ids: Vec<String> = (0..12).map(|i| add(&kb, i)).collect();
    // Exact at the normal threshold: no file.
    assert!(!graph.exists());
    drop(kb);

    // Approximate: built at open and saved.
    let kb = open(dir.path());
    // Saved after the rebuild.
    let saved = identity(&graph).unwrap();
    assert!((0..12).all(|i| finds(&kb, i)));
    drop(kb);

    // Reopened as it was: read, not rewritten.
    let kb = open(dir.path());
    assert_eq!(identity(&graph), Some(saved));
    assert!((0..12).all(|i| finds(&kb, i)));

    // Each change saves the graph again.
    let before = std::fs::read(&graph).unwrap();
    let new_id = add(&kb, 12);
    let after_add = std::fs::read(&graph).unwrap();
    assert_ne!(after_add, before);
    kb.delete(&ids[0]).unwrap();
    let after_delete = std::fs::read(&graph).unwrap();
    assert_ne!(after_delete, after_add);
    drop(kb);

    // A crash before the last saves: the file holds the first twelve
    // chunks, the database the same number but not the same ones.
    std::fs::write(&graph, &before).unwrap();
    let kb = open(dir.path());
    assert_ne!(std::fs::read(&graph).unwrap(), before, "stale graph kept");
    assert!((1..=12).all(|i| finds(&kb, i)));
    assert!(!finds(&kb, 0));
    let rebuilt = identity(&graph).unwrap();
    drop(kb);

    // A damaged file: rebuilt, and all still found.
    let mut damaged = std::fs::read(&graph).unwrap();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0x01;
    std::fs::write(&graph, &damaged).unwrap();
    let kb = open(dir.path());
    assert!((1..=12).all(|i| finds(&kb, i)));
    assert_ne!(std::fs::read(&graph).unwrap(), damaged);
    drop(kb);
    let kb = open(dir.path());
    let fresh = identity(&graph).unwrap();
    assert_ne!(fresh, rebuilt);
    drop(kb);
    let kb = open(dir.path());
    assert_eq!(identity(&graph), Some(fresh), "a good file is rewritten");

    // Shrunk to half the threshold: exact again, and the file goes.
    kb.delete(&new_id).unwrap();
    for id in &ids[1..10] {
        kb.delete(id).unwrap();
    }
    assert!(!graph.exists());
    assert!((10..12).all(|i| finds(&kb, i)));
    drop(kb);

    // A graph left from a larger index is not used for an exact one.
    std::fs::write(&graph, &before).unwrap();
    let kb = open(dir.path());
    assert!(!graph.exists());
    assert!((10..12).all(|i| finds(&kb, i)));
}
