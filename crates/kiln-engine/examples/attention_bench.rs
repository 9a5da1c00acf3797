//! Measures the attention loops alone on one thread: a prompt's causal
//! attention over an f16 cache (row r attends over cells 0..=r), the query
//! heads that share a KV head scored and summed together or one at a time.
//!
//!     cargo run --release -p kiln-engine --example attention_bench -- \
//!         [--cells 512] [--heads 4] [--head-dim 256] [--rounds 5]
//!
//! The defaults are Gemma-3-270M's shape (four query heads on one KV head
//! of 256). For each variant it prints the median time of `--rounds` passes
//! and the multiply-adds per second of the key products and of the value
//! sums separately (a pass is `cells · (cells + 1) / 2 · head-dim · heads`
//! of each), with the best round beside it.
#![allow(clippy::print_stdout)] // a benchmark reports on stdout

use std::time::Instant;

use anyhow::{bail, Context};
use half::f16;
use kiln_engine::kernels::attention;
use kiln_engine::kernels::KernelVariant;
use kiln_engine::model::kv::BLOCK_TOKENS;

struct Options {
    cells: usize,
    heads: usize,
    hd: usize,
    rounds: usize,
}

fn options() -> anyhow::Result<Options> {
    let mut o = Options {
        cells: 512,
        heads: 4,
        hd: 256,
        rounds: 5,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--cells" => o.cells = value.parse()?,
            "--heads" => o.heads = value.parse()?,
            "--head-dim" => o.hd = value.parse()?,
            "--rounds" => o.rounds = value.parse::<usize>()?.max(1),
            _ => bail!("unknown flag {flag}"),
        }
    }
    if o.cells == 0 || o.heads == 0 || o.hd == 0 {
        bail!("--cells, --heads and --head-dim must be positive");
    }
    Ok(o)
}

/// Times of one pass: (key products, value sums) in seconds.
type Pass = (f64, f64);

fn main() -> anyhow::Result<()> {
    let o = options()?;
    let mut seed = 0x2545_f491_u32;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        (seed % 20_000) as f32 / 10_000.0 - 1.0
    };
    // One KV head: a block holds BLOCK_TOKENS key rows of `hd`, or `hd`
    // value columns of BLOCK_TOKENS cells (the cache's layouts).
    let blocks = o.cells.div_ceil(BLOCK_TOKENS);
    let make = |next: &mut dyn FnMut() -> f32| -> Vec<Vec<f16>> {
        (0..blocks)
            .map(|_| {
                (0..o.hd * BLOCK_TOKENS)
                    .map(|_| f16::from_f32(next()))
                    .collect()
            })
            .collect()
    };
    let (keys, values) = (make(&mut next), make(&mut next));
    let keys: Vec<&[f16]> = keys.iter().map(|b| &b[..]).collect();
    let values: Vec<&[f16]> = values.iter().map(|b| &b[..]).collect();
    let queries: Vec<f32> = (0..o.cells * o.heads * o.hd)
        .map(|_| f16::from_f32(next()).to_f32())
        .collect();
    let weights: Vec<f32> = (0..o.cells * o.heads)
        .map(|_| f16::from_f32(next().abs() / 64.0).to_f32())
        .collect();

    let simd = KernelVariant::Avx2.is_available();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "{} cells · {} heads of {} on one KV head · 1 thread · {} · load average {}",
        o.cells,
        o.heads,
        o.hd,
        if simd { "avx2" } else { "portable" },
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let pass = |group: usize| -> Pass {
        let (mut tk, mut tv) = (0f64, 0f64);
        let mut scores = vec![0f32; group * o.cells];
        let mut out = vec![0f32; group * o.hd];
        for r in 0..o.cells {
            let cells = r + 1;
            for h0 in (0..o.heads).step_by(group) {
                let g = group.min(o.heads - h0);
                let q = &queries[(r * o.heads + h0) * o.hd..(r * o.heads + h0 + g) * o.hd];
                let s = &mut scores[..g * cells];
                let start = Instant::now();
                key_dots(simd, q, o.hd, &keys, s);
                tk += start.elapsed().as_secs_f64();
                for (h, s) in s.chunks_exact_mut(cells).enumerate() {
                    let w = &weights[(h0 + h) * o.cells..];
                    s.copy_from_slice(&w[..cells]);
                }
                let start = Instant::now();
                weighted_values(simd, &values, g, s, &mut out[..g * o.hd]);
                tv += start.elapsed().as_secs_f64();
            }
        }
        (tk, tv)
    };
    let macs = (o.cells * (o.cells + 1) / 2 * o.hd * o.heads) as f64;
    println!(
        "variant              keys: median ms  GMAC/s   best   values: median ms  GMAC/s   best"
    );
    for (name, group) in [("heads together", o.heads), ("one head a time", 1)] {
        let runs: Vec<Pass> = (0..o.rounds).map(|_| pass(group)).collect();
        let stat = |f: fn(&Pass) -> f64| {
            let mut v: Vec<f64> = runs.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            (v[v.len() / 2], v[0])
        };
        let (k, kb) = stat(|p| p.0);
        let (v, vb) = stat(|p| p.1);
        println!(
            "{name:<20} {:>16.1} {:>7.1} {:>6.1} {:>18.1} {:>7.1} {:>6.1}",
            k * 1e3,
            macs / k / 1e9,
            macs / kb / 1e9,
            v * 1e3,
            macs / v / 1e9,
            macs / vb / 1e9
        );
    }
    Ok(())
}

fn key_dots(simd: bool, q: &[f32], hd: usize, keys: &[&[f16]], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is set only where the CPU has AVX2, FMA and F16C.
        return unsafe { attention::avx2::group_key_dots(q, hd, keys, hd, 0, 0, out) };
    }
    let _ = simd;
    attention::group_key_dots(q, hd, keys, hd, 0, 0, out)
}

fn weighted_values(simd: bool, values: &[&[f16]], heads: usize, w: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: as in `key_dots`.
        return unsafe { attention::avx2::group_weighted_values(values, 0, 0, heads, w, out) };
    }
    let _ = simd;
    attention::group_weighted_values(values, 0, 0, heads, w, out)
}
