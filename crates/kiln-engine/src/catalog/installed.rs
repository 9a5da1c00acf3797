//! What is installed under `<home>/models`, and turning what a user typed
//! (a catalogue name, a directory name, a path) into a [`ModelLocation`].

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{
    catalog_names, find_entry, models_dir, CatalogError, CatalogResult, ModelKind, PackageVersion,
    GGUF_FILE, MANIFEST_FILE,
};

/// `<home>/models/<name>/manifest.json`, written after the weights were
/// verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub name: String,
    pub kind: ModelKind,
    pub packages: Vec<PackageVersion>,
    /// sha256 of the verified file (see [`super::CatalogEntry::verified_file`]).
    pub sha256: String,
    /// Size in bytes of the verified file.
    pub size: u64,
    /// Unix time in seconds.
    pub pulled_at: u64,
}

impl Manifest {
    /// Reads `<dir>/manifest.json`.
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

/// Turns what a user typed into a model location, first rule that applies:
/// - a catalogue name → its installed file or directory (an error naming
///   `kiln pull` if it is not installed);
/// - a plain name of a directory under `<home>/models` holding `model.gguf`
///   or an embedding model → that;
/// - an existing `.gguf` file path (any case) → that file;
/// - a directory with `config.json` and `model.safetensors` → an embedding model;
/// - another existing file or directory → [`CatalogError::UnrecognisedPath`];
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
    if super::validate_name(name_or_path).is_ok() {
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
