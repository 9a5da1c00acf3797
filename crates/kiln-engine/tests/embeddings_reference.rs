//! Checks Kiln's all-MiniLM-L6-v2 embedder against sentence-transformers.
//!
//! The reference (token ids and embeddings per sentence) is
//! tests/fixtures/embeddings/all-minilm-l6-v2.json, written by
//! scripts/make_embedding_fixtures.py. The model itself is read from
//! `$KILN_TEST_HOME/models/all-minilm-l6-v2/` (KILN_TEST_HOME defaults to
//! `$HOME/.cache/kiln/home`); without it these tests fail, saying how to get it.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use anyhow::{bail, ensure, Context};
use kiln_engine::bert::BertEmbedder;
use kiln_engine::kernels::KernelVariant;
use kiln_engine::EngineError;
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Cosine similarity every embedding must reach against the reference.
const MIN_COSINE: f64 = 1.0 - 1e-3;

#[derive(Deserialize)]
struct Fixture {
    model_safetensors_sha256: String,
    max_seq_length: usize,
    dimensions: usize,
    sentences: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    token_ids: Vec<u32>,
    embedding: Vec<f32>,
}

fn model_dir() -> PathBuf {
    let home = std::env::var_os("KILN_TEST_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let user_home = std::env::var_os("HOME").unwrap_or_default();
            Path::new(&user_home).join(".cache/kiln/home")
        });
    let dir = home.join("models/all-minilm-l6-v2");
    assert!(
        dir.join("model.safetensors").is_file(),
        "the all-minilm-l6-v2 model is not at {}: run `kiln pull all-minilm-l6-v2` \
         (or set KILN_TEST_HOME to the Kiln home that has it)",
        dir.display()
    );
    dir
}

fn embedder() -> &'static BertEmbedder {
    static EMBEDDER: OnceLock<BertEmbedder> = OnceLock::new();
    EMBEDDER.get_or_init(|| {
        let dir = model_dir();
        match BertEmbedder::load(&dir) {
            Ok(e) => e,
            Err(e) => panic!("loading {}: {e}", dir.display()),
        }
    })
}

fn fixture() -> anyhow::Result<Fixture> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/embeddings/all-minilm-l6-v2.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let fixture: Fixture = serde_json::from_str(&text)?;
    ensure!(
        fixture.sentences.len() >= 12,
        "fixture has too few sentences"
    );
    Ok(fixture)
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn fixture_was_made_from_this_model_file() -> anyhow::Result<()> {
    let fixture = fixture()?;
    let path = model_dir().join("model.safetensors");
    let mut hasher = Sha256::new();
    let mut file = std::fs::File::open(&path)?;
    std::io::copy(&mut file, &mut hasher)?;
    let sha = hex::encode(hasher.finalize());
    ensure!(
        sha == fixture.model_safetensors_sha256,
        "{} has sha256 {sha}, but the fixture was made from {}; re-pull the model or \
         regenerate the fixture with scripts/make_embedding_fixtures.py",
        path.display(),
        fixture.model_safetensors_sha256
    );
    Ok(())
}

#[test]
fn shape_of_the_model() -> anyhow::Result<()> {
    let fixture = fixture()?;
    let e = embedder();
    assert_eq!(e.dimensions(), fixture.dimensions);
    assert_eq!(e.max_tokens(), fixture.max_seq_length);
    assert_eq!(e.max_tokens(), 256);
    assert_eq!(e.dimensions(), 384);
    assert_eq!(e.vocab_size(), 30522);
    Ok(())
}

#[test]
fn token_ids_match_huggingface() -> anyhow::Result<()> {
    let e = embedder();
    let mut mismatches = Vec::new();
    for case in fixture()?.sentences {
        let ids = e.tokenize(&case.text);
        if ids != case.token_ids {
            mismatches.push(format!(
                "{:?}\n  kiln: {ids:?}\n  hf:   {:?}",
                case.text, case.token_ids
            ));
        }
    }
    if !mismatches.is_empty() {
        bail!("token ids differ:\n{}", mismatches.join("\n"));
    }
    Ok(())
}

#[derive(Deserialize)]
struct TokenizerFixture {
    cases: Vec<TokenizerCase>,
}

#[derive(Deserialize)]
struct TokenizerCase {
    text: String,
    token_ids: Vec<u32>,
}

/// Generated text over many Unicode classes (controls, format characters,
/// combining marks, CJK, unassigned points, special-token literals, ...).
#[test]
fn token_ids_match_huggingface_on_generated_text() -> anyhow::Result<()> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/embeddings/all-minilm-l6-v2-tokenizer.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let fixture: TokenizerFixture = serde_json::from_str(&text)?;
    ensure!(fixture.cases.len() >= 1000, "too few generated cases");
    let e = embedder();
    let mismatches: Vec<String> = fixture
        .cases
        .iter()
        .filter(|case| e.tokenize(&case.text) != case.token_ids)
        .map(|case| {
            format!(
                "{:?}\n  kiln: {:?}\n  hf:   {:?}",
                case.text,
                e.tokenize(&case.text),
                case.token_ids
            )
        })
        .collect();
    if !mismatches.is_empty() {
        bail!(
            "{} of {} generated texts tokenize differently:\n{}",
            mismatches.len(),
            fixture.cases.len(),
            mismatches.join("\n")
        );
    }
    Ok(())
}

#[test]
fn embeddings_match_sentence_transformers_singly_and_batched() -> anyhow::Result<()> {
    let fixture = fixture()?;
    let e = embedder();
    let inputs: Vec<Vec<u32>> = fixture
        .sentences
        .iter()
        .map(|c| c.token_ids.clone())
        .collect();
    let lengths: Vec<usize> = inputs.iter().map(Vec::len).collect();
    assert!(
        lengths.iter().min() != lengths.iter().max() && lengths.contains(&e.max_tokens()),
        "the batch must mix lengths (so it is padded) and include one of exactly max_tokens"
    );

    let batched = e.embed(&inputs)?;
    assert_eq!(batched.len(), inputs.len());
    let (mut worst_single, mut worst_batched, mut worst_batch_vs_single) = (1.0f64, 1.0f64, 1.0f64);
    let mut worst_abs = 0.0f32;
    for ((case, input), from_batch) in fixture.sentences.iter().zip(&inputs).zip(&batched) {
        let single = e.embed(std::slice::from_ref(input))?;
        let [single] = single.as_slice() else {
            bail!("one input gave {} vectors", single.len());
        };
        assert_eq!(single.len(), fixture.dimensions);
        let norm: f64 = single
            .iter()
            .map(|x| f64::from(*x).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{:?}: norm {norm}", case.text);

        let cos_single = cosine(single, &case.embedding);
        let cos_batched = cosine(from_batch, &case.embedding);
        let cos_pair = cosine(single, from_batch);
        eprintln!(
            "{:>3} tokens  1-cos single {:.2e}  batched {:.2e}  batch-vs-single {:.2e}  {:?}",
            input.len(),
            1.0 - cos_single,
            1.0 - cos_batched,
            1.0 - cos_pair,
            case.text.chars().take(40).collect::<String>()
        );
        assert!(
            cos_single >= MIN_COSINE,
            "{:?}: cosine {cos_single}",
            case.text
        );
        assert!(
            cos_batched >= MIN_COSINE,
            "{:?}: cosine {cos_batched}",
            case.text
        );
        // Padding must not change a vector beyond float rounding.
        assert!(
            cos_pair >= 1.0 - 1e-5,
            "{:?}: batch vs single {cos_pair}",
            case.text
        );
        assert!(max_abs_diff(single, from_batch) < 1e-4, "{:?}", case.text);
        worst_single = worst_single.min(cos_single);
        worst_batched = worst_batched.min(cos_batched);
        worst_batch_vs_single = worst_batch_vs_single.min(cos_pair);
        worst_abs = worst_abs.max(max_abs_diff(single, &case.embedding));
    }
    eprintln!(
        "worst 1-cosine vs sentence-transformers: single {:.3e}, batched {:.3e}; \
         batch vs single {:.3e}; worst |diff| single vs reference {worst_abs:.3e}",
        1.0 - worst_single,
        1.0 - worst_batched,
        1.0 - worst_batch_vs_single
    );
    Ok(())
}

/// Each kernel variant this CPU runs (scalar, AVX2, AVX-512), forced in
/// turn: the SIMD variants give the same bits as each other, every variant
/// stays within float noise of the portable one and matches
/// sentence-transformers. A variant the CPU lacks is refused, not faked.
#[test]
fn every_kernel_variant_gives_the_same_vectors() -> anyhow::Result<()> {
    let fixture = fixture()?;
    let inputs: Vec<Vec<u32>> = fixture
        .sentences
        .iter()
        .map(|c| c.token_ids.clone())
        .collect();
    let dir = model_dir();
    let portable = BertEmbedder::load_with_kernels(&dir, KernelVariant::Scalar)?.embed(&inputs)?;
    let mut simd: Option<(KernelVariant, Vec<Vec<f32>>)> = None;
    for variant in KernelVariant::ALL {
        let embedder = match BertEmbedder::load_with_kernels(&dir, variant) {
            Ok(e) => e,
            Err(EngineError::InvalidRequest(_)) if !variant.is_available() => {
                eprintln!("{}: not available on this CPU", variant.name());
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let vectors = embedder.embed(&inputs)?;
        let mut worst = 0f32;
        for ((v, p), case) in vectors.iter().zip(&portable).zip(&fixture.sentences) {
            worst = worst.max(max_abs_diff(v, p));
            let cos = cosine(v, &case.embedding);
            ensure!(
                cos >= MIN_COSINE,
                "{}: {:?} cosine {cos}",
                variant.name(),
                case.text
            );
        }
        eprintln!("{}: worst |diff| vs scalar {worst:.2e}", variant.name());
        ensure!(
            worst < 1e-5,
            "{} differs from scalar by {worst}",
            variant.name()
        );
        if variant != KernelVariant::Scalar {
            match &simd {
                Some((first, expected)) => ensure!(
                    &vectors == expected,
                    "{} and {} give different bits",
                    variant.name(),
                    first.name()
                ),
                None => simd = Some((variant, vectors)),
            }
        }
    }
    Ok(())
}

#[test]
fn similar_sentences_are_closer() -> anyhow::Result<()> {
    let e = embedder();
    let texts = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The new movie is awful.",
    ];
    let v = e.embed(&texts.map(|t| e.tokenize(t)))?;
    assert!(cosine(&v[0], &v[1]) > cosine(&v[0], &v[2]) + 0.2);
    Ok(())
}

fn expect_invalid(result: kiln_engine::Result<Vec<Vec<f32>>>, needle: &str) {
    match result {
        Err(EngineError::InvalidRequest(message)) => {
            assert!(
                message.contains(needle),
                "`{message}` should mention `{needle}`"
            )
        }
        Err(other) => panic!("expected InvalidRequest, got {other:?}"),
        Ok(_) => panic!("expected InvalidRequest mentioning `{needle}`, got vectors"),
    }
}

#[test]
fn too_many_tokens_are_refused() -> anyhow::Result<()> {
    let e = embedder();
    let mut ids = vec![101u32];
    ids.resize(256, 1996);
    ids[255] = 102;
    assert_eq!(
        e.embed(std::slice::from_ref(&ids))?.len(),
        1,
        "256 tokens fit"
    );
    ids.insert(1, 1996);
    assert_eq!(ids.len(), 257);
    expect_invalid(e.embed(&[vec![101, 102], ids]), "256");
    Ok(())
}

#[test]
fn token_ids_outside_the_vocabulary_are_refused() {
    let e = embedder();
    let vocab = e.vocab_size() as u32;
    expect_invalid(e.embed(&[vec![101, vocab, 102]]), "30521");
    expect_invalid(
        e.embed(&[vec![101, u32::MAX, 102]]),
        &vocab.saturating_sub(1).to_string(),
    );
    assert!(e.embed(&[vec![101, vocab - 1, 102]]).is_ok());
}

#[test]
fn empty_inputs() -> anyhow::Result<()> {
    let e = embedder();
    assert!(e.embed(&[])?.is_empty());
    expect_invalid(e.embed(&[vec![101, 102], vec![]]), "input 1");
    Ok(())
}

#[test]
fn raw_token_arrays_are_used_as_given() -> anyhow::Result<()> {
    let e = embedder();
    let with_specials = e.tokenize("A man is eating food.");
    let bare = with_specials[1..with_specials.len() - 1].to_vec();
    let v = e.embed(&[with_specials.clone(), bare, vec![0, 0, 0]])?;
    // No [CLS]/[SEP] is added: the bare array gives a different vector...
    let cos = cosine(&v[0], &v[1]);
    assert!(cos < 0.9999 && cos > 0.5, "cosine {cos}");
    // ...and even [PAD] ids are real tokens when the caller sends them.
    let norm: f32 = v[2].iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5);
    Ok(())
}

/// A copy of the model directory (symlinks) with one file replaced or removed.
fn broken_copy(replace: &str, contents: Option<&[u8]>) -> anyhow::Result<tempfile::TempDir> {
    let src = model_dir();
    let dst = tempfile::tempdir()?;
    std::fs::create_dir(dst.path().join("1_Pooling"))?;
    for name in [
        "config.json",
        "tokenizer.json",
        "model.safetensors",
        "sentence_bert_config.json",
        "1_Pooling/config.json",
    ] {
        if name == replace {
            if let Some(bytes) = contents {
                std::fs::write(dst.path().join(name), bytes)?;
            }
        } else {
            std::os::unix::fs::symlink(src.join(name), dst.path().join(name))?;
        }
    }
    Ok(dst)
}

fn expect_bad_file(dir: &Path, file: &str, needle: &str) {
    match BertEmbedder::load(dir) {
        Err(EngineError::BadModelFile { path, reason }) => {
            assert!(
                path.ends_with(file),
                "error names {} not {file}",
                path.display()
            );
            assert!(
                reason.contains(needle),
                "`{reason}` should mention `{needle}`"
            );
        }
        Err(other) => panic!("expected BadModelFile for {file}, got {other:?}"),
        Ok(_) => panic!("loaded a model with a broken {file}"),
    }
}

#[test]
fn missing_or_corrupt_files_are_bad_model_files() -> anyhow::Result<()> {
    let dir = broken_copy("tokenizer.json", None)?;
    expect_bad_file(dir.path(), "tokenizer.json", "missing");
    let dir = broken_copy("model.safetensors", None)?;
    expect_bad_file(dir.path(), "model.safetensors", "missing");
    let dir = broken_copy("model.safetensors", Some(b"\x10\0\0\0\0\0\0\0{\"a\":"))?;
    expect_bad_file(dir.path(), "model.safetensors", "safetensors");
    let dir = broken_copy("config.json", Some(b"{\"hidden_size\": 384}"))?;
    expect_bad_file(dir.path(), "config.json", "vocab_size");
    let dir = broken_copy(
        "1_Pooling/config.json",
        Some(br#"{"word_embedding_dimension": 384, "pooling_mode_max_tokens": true}"#),
    )?;
    expect_bad_file(dir.path(), "config.json", "pooling");
    let dir = broken_copy(
        "sentence_bert_config.json",
        Some(br#"{"max_seq_length": 4096}"#),
    )?;
    expect_bad_file(
        dir.path(),
        "sentence_bert_config.json",
        "max_position_embeddings",
    );
    Ok(())
}

/// Reports throughput for a batch of 32 short sentences (no assertion: it
/// depends on the machine). For a meaningful figure run it alone:
/// `cargo test -p kiln-engine --test embeddings_reference throughput -- --nocapture`.
#[test]
fn throughput_of_short_sentences() -> anyhow::Result<()> {
    let e = embedder();
    let base = [
        "The quick brown fox jumps over the lazy dog.",
        "Hello, world! How are you doing today?",
        "A man is eating a piece of bread.",
        "Kiln runs language models on your own hardware.",
    ];
    let batch: Vec<Vec<u32>> = (0..32)
        .map(|i| e.tokenize(&format!("{} ({i})", base[i % base.len()])))
        .collect();
    e.embed(&batch)?; // warm-up
    let rounds = 5;
    let start = Instant::now();
    for _ in 0..rounds {
        e.embed(&batch)?;
    }
    let seconds = start.elapsed().as_secs_f64();
    let tokens: usize = batch.iter().map(Vec::len).sum();
    eprintln!(
        "throughput: {:.0} sentences/s ({} sentences of ~{} tokens per batch, {rounds} batches in {seconds:.2} s)",
        (rounds * batch.len()) as f64 / seconds,
        batch.len(),
        tokens / batch.len()
    );
    Ok(())
}
