//! Times the engine's forward pass alone (no server, no scheduler): a
//! prompt prefilled in one batch, then greedy decode steps one token at a
//! time, on the rayon pool the engine uses.
//!
//!     cargo run --release -p kiln-engine --example forward_bench -- \
//!         [--model FILE.gguf] [--prompt-tokens 512] [--decode-tokens 64] [--threads 2] [--rounds 3] \
//!         [--batch 1]
//!
//! Prints per round the prefill rate (prompt tokens / s) and the decode rate
//! (tokens / s), then min / median / max. With `--batch B` above 1, B
//! sequences (each prompt with its own first token) go through the batched
//! forward pass the server's scheduler runs: their prompts in one pass, then
//! decode steps of one token for each, the rates counting every sequence's
//! tokens. `KILN_KERNELS=scalar|avx2|avx512`
//! picks the kernel variant. Useful under `perf record` to see where a
//! forward pass spends its time.
#![allow(clippy::print_stdout)] // a benchmark reports on stdout

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use kiln_engine::kernels::KernelVariant;
use kiln_engine::model::kv::{BlockTable, KvPool, BLOCK_TOKENS};
use kiln_engine::model::{BatchItem, TextModel};

fn main() -> anyhow::Result<()> {
    let home = std::env::var_os("KILN_TEST_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(&std::env::var_os("HOME").unwrap_or_default()).join(".cache/kiln/home")
        });
    let mut model = home.join("models/smollm2-135m/model.gguf");
    let (mut prompt_tokens, mut decode_tokens, mut threads, mut rounds) = (512usize, 64usize, 2, 3);
    let mut batch = 1usize;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--model" => model = value.into(),
            "--prompt-tokens" => prompt_tokens = value.parse()?,
            "--decode-tokens" => decode_tokens = value.parse()?,
            "--threads" => threads = value.parse()?,
            "--rounds" => rounds = value.parse::<usize>()?.max(1),
            "--batch" => batch = value.parse::<usize>()?.max(1),
            other => bail!("unknown flag {other}"),
        }
    }
    let m = TextModel::load(&model, "bench")?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let text = "The committee met on a grey Tuesday to review the harbour accounts, the \
                price of coal, the school roof and a letter about the fog. "
        .repeat(prompt_tokens / 8 + 8);
    let mut prompt = m.text_prompt(&text);
    prompt.truncate(prompt_tokens);
    println!(
        "{} · {} prompt tokens · {} decode steps · batch {batch} · {} threads · kernels {} · load {}",
        model.display(),
        prompt.len(),
        decode_tokens,
        threads,
        KernelVariant::selected().name(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let (p, d) = if batch == 1 {
            single(&m, &pool, &prompt, decode_tokens)?
        } else {
            batched(&m, &pool, &prompt, decode_tokens, batch)?
        };
        prefill.push((batch * prompt.len()) as f64 / p);
        decode.push((batch * decode_tokens) as f64 / d);
        println!(
            "round {round}: prefill {:.1} tok/s · decode {:.1} tok/s",
            prefill[round], decode[round]
        );
    }
    for (name, v) in [("prefill", &mut prefill), ("decode", &mut decode)] {
        v.sort_by(f64::total_cmp);
        println!(
            "{name}: min {:.1} / median {:.1} / max {:.1} tok/s",
            v[0],
            v[v.len() / 2],
            v[v.len() - 1]
        );
    }
    Ok(())
}

/// The greedy choice of `logits`.
fn argmax(logits: &[f32]) -> u32 {
    logits
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i as u32)
}

/// One sequence: (prefill seconds, decode seconds).
fn single(
    m: &TextModel,
    pool: &rayon::ThreadPool,
    prompt: &[u32],
    decode_tokens: usize,
) -> anyhow::Result<(f64, f64)> {
    let mut seq = m.new_sequence();
    let start = Instant::now();
    let mut logits = pool.install(|| m.forward(prompt, &mut seq))?;
    let p = start.elapsed().as_secs_f64();
    let start = Instant::now();
    for _ in 0..decode_tokens {
        let next = argmax(&logits);
        logits = pool.install(|| m.forward(&[next], &mut seq))?;
    }
    Ok((p, start.elapsed().as_secs_f64()))
}

/// `batch` sequences through the batched forward pass: (prefill seconds,
/// decode seconds).
fn batched(
    m: &TextModel,
    pool: &rayon::ThreadPool,
    prompt: &[u32],
    decode_tokens: usize,
    batch: usize,
) -> anyhow::Result<(f64, f64)> {
    let positions = prompt.len() + decode_tokens + 2 * BLOCK_TOKENS;
    let mut kv = m.new_kv_pool(batch * positions * m.kv_bytes_per_token());
    // Distinct prompts, so that nothing could be shared between them.
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|i| {
            let mut p = prompt.to_vec();
            if let Some(t) = p.first_mut() {
                *t = (*t + i as u32) % m.vocab_size() as u32;
            }
            p
        })
        .collect();
    let mut tables: Vec<BlockTable> = (0..batch).map(|_| BlockTable::new()).collect();
    let step = |kv: &mut KvPool,
                tables: &mut [BlockTable],
                tokens: &[&[u32]]|
     -> anyhow::Result<Vec<u32>> {
        let mut items: Vec<BatchItem<'_>> = tables
            .iter_mut()
            .zip(tokens)
            .map(|(cache, &tokens)| BatchItem {
                tokens,
                cache,
                logits: true,
            })
            .collect();
        let logits = pool.install(|| m.forward_batch(kv, &mut items))?;
        Ok(logits
            .iter()
            .map(|l| l.as_deref().map_or(0, argmax))
            .collect())
    };
    let start = Instant::now();
    let firsts: Vec<&[u32]> = prompts.iter().map(|p| &p[..]).collect();
    let mut next = step(&mut kv, &mut tables, &firsts)?;
    let p = start.elapsed().as_secs_f64();
    let start = Instant::now();
    for _ in 0..decode_tokens {
        let tokens: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let tokens: Vec<&[u32]> = tokens.iter().map(|t| &t[..]).collect();
        next = step(&mut kv, &mut tables, &tokens)?;
    }
    Ok((p, start.elapsed().as_secs_f64()))
}
