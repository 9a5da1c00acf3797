//! Measures what saving the vector index's HNSW graph buys: opening an
//! index of N random vectors by building the graph (as every open did
//! before) against opening it from the saved graph, plus the file's size
//! and the time to save it. Both opens are fed the same raw vectors, as a
//! knowledge base feeds them from its database; reading those from SQLite
//! is the same for both and not measured here.
//!
//! ```text
//! cargo run -p kiln-rag --example vector_graph -- [vectors=100000] [dims=384]
//! ```
//! (kiln-rag and its dependencies build at opt-level 3 in the dev profile.)
#![allow(clippy::print_stdout)]

use std::time::Instant;

use anyhow::{bail, Context};
use kiln_rag::vector::{
    pseudo_random_vectors, write_atomically, Opened, VectorIndex, APPROXIMATE_FROM,
};
use sha2::{Digest, Sha256};

fn open(
    path: &std::path::Path,
    dims: usize,
    vectors: &[Vec<f32>],
) -> anyhow::Result<(VectorIndex, Opened)> {
    let mut restore = VectorIndex::restore(path, dims, APPROXIMATE_FROM, vectors.len());
    for (i, v) in vectors.iter().enumerate() {
        restore
            .insert(i as u64 + 1, v)
            .map_err(anyhow::Error::msg)?;
    }
    Ok(restore.finish())
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(Ok(100_000), |a| a.parse())?;
    let dims: usize = args.next().map_or(Ok(384), |a| a.parse())?;
    if n <= APPROXIMATE_FROM {
        bail!("use more than {APPROXIMATE_FROM} vectors: below that the index is exact");
    }
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("vectors.hnsw");
    let vectors = pseudo_random_vectors(n, dims, 7);
    println!("{n} vectors of {dims} dimensions");

    let started = Instant::now();
    let (built, opened) = open(&path, dims, &vectors)?;
    let build_s = started.elapsed().as_secs_f64();
    println!("open, building the graph:  {build_s:8.2} s  ({opened:?})");

    let mut serialise_ms = Vec::new();
    let mut write_ms = Vec::new();
    let mut size = 0;
    for _ in 0..5 {
        let started = Instant::now();
        let bytes = built
            .graph_bytes()
            .context("the index is not approximate")?;
        serialise_ms.push(started.elapsed().as_secs_f64() * 1e3);
        let started = Instant::now();
        write_atomically(&path, &bytes)?;
        write_ms.push(started.elapsed().as_secs_f64() * 1e3);
        size = bytes.len();
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (ser, wr) = (median(&mut serialise_ms), median(&mut write_ms));
    let bytes = std::fs::read(&path)?;
    let started = Instant::now();
    let checksum = Sha256::digest(&bytes);
    let sha_ms = started.elapsed().as_secs_f64() * 1e3;
    println!(
        "graph file: {:.1} MB ({:.0} bytes a node; the vectors would add {} bytes a node)",
        size as f64 / 1e6,
        size as f64 / n as f64,
        dims * 4
    );
    println!(
        "save (median of 5): {:.1} ms = serialise and checksum {ser:.1} ms (SHA-256 alone {sha_ms:.1} ms) + write, fsync, rename {wr:.1} ms",
        ser + wr
    );
    assert_eq!(checksum.len(), 32);

    let mut load_s = Vec::new();
    let mut loaded = None;
    for _ in 0..3 {
        let started = Instant::now();
        let (index, opened) = open(&path, dims, &vectors)?;
        load_s.push(started.elapsed().as_secs_f64());
        if !matches!(opened, Opened::Loaded) {
            bail!("the saved graph was not used: {opened:?}");
        }
        loaded = Some(index);
    }
    let load = median(&mut load_s);
    println!(
        "open, reading the graph:   {load:8.2} s  (median of 3; {:.0}x faster)",
        build_s / load
    );

    let loaded = loaded.context("no open")?;
    let queries = pseudo_random_vectors(200, dims, 99);
    let same = queries
        .iter()
        .all(|q| built.search(q, 10, &|_| true) == loaded.search(q, 10, &|_| true));
    println!("same top 10 for 200 queries: {same}");
    if !same {
        bail!("the read graph answers differently");
    }
    Ok(())
}
