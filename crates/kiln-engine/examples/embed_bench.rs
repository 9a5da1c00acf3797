//! Measures sentence-embedding speed (all-MiniLM-L6-v2 by default) on real
//! text: batches of passages from the Vaswani collection, then one short
//! query at a time.
//!
//!     cargo run --release -p kiln-engine --example embed_bench -- \
//!         [--model DIR] [--docs FILE] [--batch 32] [--rounds 12] [--min-words 64]
//!
//! `--model` defaults to `$KILN_TEST_HOME/models/all-minilm-l6-v2` and
//! `--docs` to `/work/shared/data/vaswani/doc-text.trec` (TREC format:
//! `<DOC><DOCNO>n</DOCNO> text </DOC>`). A passage is consecutive documents
//! joined until it has `--min-words` words (64 words is about 90 tokens, the
//! size of a knowledge-base chunk); `--min-words 0` takes documents as they
//! are. Each round embeds the next `--batch` passages. The machine's load
//! average is printed before and after, since it bounds what the figures mean.
#![allow(clippy::print_stdout)] // a benchmark reports on stdout

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use kiln_engine::bert::BertEmbedder;

const QUERY: &str = "fast transistor switching circuits for digital computers";

struct Options {
    model: PathBuf,
    docs: PathBuf,
    batch: usize,
    rounds: usize,
    min_words: usize,
    query_runs: usize,
}

fn options() -> anyhow::Result<Options> {
    let home = std::env::var_os("KILN_TEST_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(&std::env::var_os("HOME").unwrap_or_default()).join(".cache/kiln/home")
        });
    let mut o = Options {
        model: home.join("models/all-minilm-l6-v2"),
        docs: PathBuf::from("/work/shared/data/vaswani/doc-text.trec"),
        batch: 32,
        rounds: 12,
        min_words: 64,
        query_runs: 100,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<usize>()
                .with_context(|| format!("{flag} {value}"))
        };
        match flag.as_str() {
            "--model" => o.model = PathBuf::from(&value),
            "--docs" => o.docs = PathBuf::from(&value),
            "--batch" => o.batch = number()?.max(1),
            "--rounds" => o.rounds = number()?.max(1),
            "--min-words" => o.min_words = number()?,
            "--query-runs" => o.query_runs = number()?.max(1),
            _ => bail!("unknown option {flag}"),
        }
    }
    Ok(o)
}

/// The text of each `<DOC>` in a TREC file.
fn documents(trec: &str) -> Vec<&str> {
    trec.split("</DOC>")
        .filter_map(|doc| {
            let text = doc.split("</DOCNO>").nth(1)?.trim();
            (!text.is_empty()).then_some(text)
        })
        .collect()
}

fn passages(docs: &[&str], min_words: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for doc in docs {
        if !current.is_empty() {
            current.push(' ');
        }
        current.push_str(doc);
        if current.split_whitespace().count() >= min_words {
            out.push(std::mem::take(&mut current));
        }
    }
    out
}

/// min / median / max of `values`.
fn spread(values: &mut [f64]) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let median = if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    };
    (values[0], median, values[n - 1])
}

/// CPU time this process has used (all threads, user + system), in seconds;
/// 0 where /proc is missing. Under contention from other processes it
/// measures the work done better than wall time.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields overall, in clock ticks (100 per second on Linux).
    let after = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_string())
}

fn main() -> anyhow::Result<()> {
    let o = options()?;
    println!("load average before: {}", load_average());
    let embedder =
        BertEmbedder::load(&o.model).with_context(|| format!("loading {}", o.model.display()))?;
    let trec = std::fs::read_to_string(&o.docs)
        .with_context(|| format!("reading {}", o.docs.display()))?;
    let tokenized: Vec<Vec<u32>> = passages(&documents(&trec), o.min_words)
        .iter()
        .map(|p| embedder.tokenize(p))
        .filter(|ids| ids.len() <= embedder.max_tokens())
        .collect();
    let needed = o.batch * (o.rounds + 1);
    if tokenized.len() < needed {
        bail!(
            "{} has {} passages, {needed} needed",
            o.docs.display(),
            tokenized.len()
        );
    }
    let batches: Vec<&[Vec<u32>]> = tokenized[..needed].chunks(o.batch).collect();
    let tokens_in = |b: &[Vec<u32>]| b.iter().map(Vec::len).sum::<usize>();
    let all_tokens: usize = batches[1..].iter().map(|b| tokens_in(b)).sum();
    println!(
        "threads {}, batches of {} passages, {:.1} tokens per passage on average",
        rayon::current_num_threads(),
        o.batch,
        all_tokens as f64 / (o.batch * o.rounds) as f64
    );

    embedder.embed(batches[0])?; // warm-up
    let (mut tokens_per_s, mut passages_per_s) = (Vec::new(), Vec::new());
    let started = Instant::now();
    let cpu_started = cpu_seconds();
    for batch in &batches[1..] {
        let t = Instant::now();
        let vectors = embedder.embed(batch)?;
        let seconds = t.elapsed().as_secs_f64();
        if vectors.len() != batch.len() {
            bail!("{} vectors for {} passages", vectors.len(), batch.len());
        }
        tokens_per_s.push(tokens_in(batch) as f64 / seconds);
        passages_per_s.push(batch.len() as f64 / seconds);
    }
    let total = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_started;
    let (lo, mid, hi) = spread(&mut tokens_per_s);
    println!(
        "batch {}: tokens/s   min {lo:8.0}  median {mid:8.0}  max {hi:8.0}",
        o.batch
    );
    let (lo, mid, hi) = spread(&mut passages_per_s);
    println!(
        "batch {}: passages/s min {lo:8.1}  median {mid:8.1}  max {hi:8.1}",
        o.batch
    );
    println!(
        "overall: {:.0} tokens/s over {} batches in {total:.2} s; {cpu:.2} CPU-seconds, \
         {:.0} tokens per CPU-second",
        all_tokens as f64 / total,
        o.rounds,
        all_tokens as f64 / cpu.max(1e-9)
    );

    let query = vec![embedder.tokenize(QUERY)];
    embedder.embed(&query)?; // warm-up
    let mut latencies = Vec::with_capacity(o.query_runs);
    for _ in 0..o.query_runs {
        let t = Instant::now();
        embedder.embed(&query)?;
        latencies.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let (lo, mid, hi) = spread(&mut latencies);
    println!(
        "single query ({} tokens): latency ms min {lo:.2}  median {mid:.2}  max {hi:.2}",
        query[0].len()
    );
    println!("load average after: {}", load_average());
    Ok(())
}
