//! Measures Kiln's quantized matmul kernels on a real model's weights: every
//! 2-D tensor of one transformer block (plus the output matrix) at several
//! batch sizes, once per kernel variant this CPU runs.
//!
//!     cargo run --release -p kiln-engine --example kernel_bench -- \
//!         [--model FILE.gguf] [--layer 0] [--batches 1,16,512] [--threads 2] [--rounds 5] \
//!         [--variants scalar,avx2,avx512]
//!
//! Q5_0 matrices are timed widened, as the engine runs them, unless
//! `KILN_Q5_0=keep`; the type column names the file's type either way.
//!
//! `--model` defaults to SmolLM2-135M under `$KILN_TEST_HOME`. For each
//! tensor and batch size it prints the median time of `--rounds` runs and the
//! multiply-adds per second it comes to (rows × cols × batch / time), at the
//! median and at the best round (the one least disturbed on a shared
//! machine), so a variant's figure can be set against the CPU's peak. The machine's load
//! average is printed too, since it bounds what the figures mean. The rounds
//! run on a thread of the benchmark's pool, as the forward pass does, so a
//! product's fork-join is the one a forward pass pays (called from outside,
//! each round would also pay for waking the pool and the caller).
#![allow(clippy::print_stdout)] // a benchmark reports on stdout

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use kiln_engine::gguf::GgufFile;
use kiln_engine::kernels::{KernelVariant, QMatrix};

struct Options {
    model: PathBuf,
    layer: usize,
    batches: Vec<usize>,
    threads: usize,
    rounds: usize,
    variants: Vec<KernelVariant>,
}

fn options() -> anyhow::Result<Options> {
    let home = std::env::var_os("KILN_TEST_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(&std::env::var_os("HOME").unwrap_or_default()).join(".cache/kiln/home")
        });
    let mut o = Options {
        model: home.join("models/smollm2-135m/model.gguf"),
        layer: 0,
        batches: vec![1, 16, 512],
        threads: 2,
        rounds: 5,
        variants: KernelVariant::available(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--model" => o.model = value.into(),
            "--layer" => o.layer = value.parse()?,
            "--batches" => {
                o.batches = value
                    .split(',')
                    .map(|b| b.trim().parse())
                    .collect::<Result<_, _>>()?
            }
            "--threads" => o.threads = value.parse()?,
            "--rounds" => o.rounds = value.parse::<usize>()?.max(1),
            "--variants" => {
                o.variants = value
                    .split(',')
                    .map(|v| {
                        KernelVariant::parse(v)
                            .filter(|v| v.is_available())
                            .with_context(|| format!("{v}: not a kernel variant this CPU runs"))
                    })
                    .collect::<anyhow::Result<_>>()?
            }
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(o)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn main() -> anyhow::Result<()> {
    let o = options()?;
    let mut file = GgufFile::open(&o.model)?;
    let prefix = format!("blk.{}.", o.layer);
    let mut names: Vec<String> = file
        .content()
        .tensor_infos
        .iter()
        .filter(|(name, info)| {
            info.shape.dims().len() == 2
                && (name.starts_with(&prefix) || name.as_str() == "output.weight")
        })
        .map(|(name, _)| name.clone())
        .collect();
    // A model with tied embeddings (Gemma) multiplies by its embedding table
    // at every step instead: that is its output matrix.
    if !names.iter().any(|n| n == "output.weight")
        && file
            .content()
            .tensor_infos
            .contains_key("token_embd.weight")
    {
        names.push("token_embd.weight".into());
    }
    names.sort();
    let matrices = names
        .iter()
        .map(|name| Ok((name.clone(), QMatrix::from_qtensor(&file.tensor(name)?)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(o.threads)
        .build()?;
    println!(
        "model {} · {} threads · load average {}",
        o.model.display(),
        o.threads,
        load_average()
    );
    println!(
        "{:<24} {:>6} {:>11} {:>6} {:>8} {:>10} {:>8} {:>8}",
        "tensor", "type", "shape", "batch", "variant", "median ms", "GMAC/s", "best"
    );
    for (name, m) in &matrices {
        for &n in &o.batches {
            // The output matrix is applied to one row per sequence.
            if (name == "output.weight" || name == "token_embd.weight") && n > 16 {
                continue;
            }
            let x: Vec<f32> = (0..n * m.cols())
                .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
                .collect();
            for &variant in &o.variants {
                let mut times = pool.install(|| -> anyhow::Result<Vec<f64>> {
                    let mut times = Vec::with_capacity(o.rounds);
                    for _ in 0..o.rounds {
                        let start = Instant::now();
                        m.matmul_with(&x, n, o.threads, variant)?;
                        times.push(start.elapsed().as_secs_f64());
                    }
                    Ok(times)
                })?;
                times.sort_by(f64::total_cmp);
                let median = times[times.len() / 2];
                let macs = (m.rows() * m.cols() * n) as f64;
                println!(
                    "{:<24} {:>6} {:>11} {:>6} {:>8} {:>10.3} {:>8.1} {:>8.1}",
                    name,
                    format!("{:?}", m.dtype()),
                    format!("{}x{}", m.rows(), m.cols()),
                    n,
                    variant.name(),
                    median * 1e3,
                    macs / median / 1e9,
                    macs / times[0] / 1e9
                );
            }
        }
    }
    println!("load average after: {}", load_average());
    Ok(())
}
