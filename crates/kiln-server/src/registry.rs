//! Which models the server runs, and finding them on disk.
//!
//! Layout under `$KILN_HOME/models/`: a text model is `<name>/model.gguf`; an
//! embedding model is a sentence-transformers directory `<name>/` holding
//! `config.json` and `model.safetensors`. A `--model` value that is an
//! existing path is used as that file; `ALIAS=PATH` names it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use kiln_engine::bert::BertEmbedder;
use kiln_engine::catalog::{self, ModelLocation};
use kiln_engine::engine::{EngineHandle, EngineOptions};
use kiln_engine::model::TextModel;
use tokio::sync::Semaphore;

use crate::config::ServeConfig;
use crate::upstream::{TokenizerFile, Upstream};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    Text,
    Embedding,
}

impl ModelKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelKind::Text => "chat",
            ModelKind::Embedding => "embedding",
        }
    }
}

/// A model found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstalledModel {
    pub name: String,
    pub kind: ModelKind,
    /// The GGUF file, or the embedding model's directory.
    pub path: PathBuf,
}

/// Every model under `models_dir`, sorted by name.
pub fn installed(models_dir: &Path) -> Vec<InstalledModel> {
    let Ok(entries) = std::fs::read_dir(models_dir) else {
        return Vec::new();
    };
    let mut found: Vec<InstalledModel> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let dir = e.path();
            let name = e.file_name().to_str()?.to_string();
            if dir.join("model.gguf").is_file() {
                Some(InstalledModel {
                    name,
                    kind: ModelKind::Text,
                    path: dir.join("model.gguf"),
                })
            } else if dir.join("config.json").is_file() && dir.join("model.safetensors").is_file() {
                Some(InstalledModel {
                    name,
                    kind: ModelKind::Embedding,
                    path: dir,
                })
            } else {
                None
            }
        })
        .collect();
    found.sort_by(|a, b| a.name.cmp(&b.name));
    found
}

/// Resolves a `--model` value to `(name, gguf path)`: `ALIAS=PATH` names a
/// file; anything else goes through the catalogue's resolution (catalogue
/// name, installed directory name, or a `.gguf` path).
pub fn resolve_text_model(home: &Path, spec: &str) -> anyhow::Result<(String, PathBuf)> {
    if let Some((alias, path)) = spec.split_once('=') {
        return Ok((alias.trim().to_string(), PathBuf::from(path.trim())));
    }
    match catalog::resolve(home, spec)? {
        ModelLocation::Gguf { path, name } => {
            let name = name.unwrap_or_else(|| name_from_path(&path));
            Ok((name, path))
        }
        ModelLocation::SentenceEmbedding { .. } => {
            bail!("`{spec}` is an embedding model; serve it with --embedding-model")
        }
    }
}

/// Resolves an upstream's `tokenizer`: a text model (its GGUF) or an
/// embedding model (its sentence-transformers directory), by catalogue
/// name, installed name or path; `ALIAS=PATH` names a GGUF file.
fn resolve_tokenizer(home: &Path, spec: &str) -> anyhow::Result<TokenizerFile> {
    if spec.contains('=') {
        return Ok(TokenizerFile::Gguf(resolve_text_model(home, spec)?.1));
    }
    Ok(match catalog::resolve(home, spec)? {
        ModelLocation::Gguf { path, .. } => TokenizerFile::Gguf(path),
        ModelLocation::SentenceEmbedding { dir, .. } => TokenizerFile::SentenceTransformers(dir),
    })
}

/// `<dir>/model.gguf` is named after its directory, any other file after its stem.
fn name_from_path(path: &Path) -> String {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
    let name = if stem == "model" {
        path.parent()
            .and_then(|p| p.file_name())
            .and_then(|s| s.to_str())
            .unwrap_or(stem)
    } else {
        stem
    };
    name.to_string()
}

/// Resolves `--embedding-model` to `(name, directory)`.
pub fn resolve_embedding_model(home: &Path, spec: &str) -> anyhow::Result<(String, PathBuf)> {
    match catalog::resolve(home, spec)? {
        ModelLocation::SentenceEmbedding { dir, name } => {
            let name = name.unwrap_or_else(|| {
                dir.file_name()
                    .and_then(|s| s.to_str())
                    .unwrap_or("embedding")
                    .to_string()
            });
            Ok((name, dir))
        }
        ModelLocation::Gguf { .. } => {
            bail!("`{spec}` is a text model; serve it with --model")
        }
    }
}

pub struct EmbeddingModel {
    pub name: String,
    pub embedder: Arc<BertEmbedder>,
    /// Bounds concurrent (blocking) embedding batches.
    pub permits: Arc<Semaphore>,
}

/// The models a running server answers for.
pub struct ServedModels {
    pub text: BTreeMap<String, EngineHandle>,
    pub embedding: Option<EmbeddingModel>,
    /// Models served by upstream backends, by model name.
    pub upstream: BTreeMap<String, Arc<Upstream>>,
}

/// Loads a GGUF text model, naming the file in any error.
pub fn load_text_model(name: &str, path: &Path) -> anyhow::Result<TextModel> {
    TextModel::load(path, name)
        .with_context(|| format!("cannot load model `{name}` from {}", path.display()))
}

/// Loads every model the configuration asks for. Blocking: call before the
/// runtime serves requests.
pub fn load(cfg: &ServeConfig) -> anyhow::Result<ServedModels> {
    let installed = installed(&cfg.models_dir());
    // With upstreams configured, only the local models named are loaded (a
    // gateway need not load whatever happens to be installed).
    let gateway = !cfg.upstreams.is_empty();
    let text_specs: Vec<(String, PathBuf)> = if gateway && cfg.models.is_empty() {
        Vec::new()
    } else if cfg.models.is_empty() {
        installed
            .iter()
            .filter(|m| m.kind == ModelKind::Text)
            .map(|m| (m.name.clone(), m.path.clone()))
            .collect()
    } else {
        cfg.models
            .iter()
            .map(|s| resolve_text_model(&cfg.home, s))
            .collect::<anyhow::Result<_>>()?
    };
    let mut text = BTreeMap::new();
    for (name, path) in text_specs {
        if text.contains_key(&name) {
            bail!("two models are named `{name}`; give one an alias with ALIAS=PATH");
        }
        let model = load_text_model(&name, &path)?;
        let handle = EngineHandle::start(
            model,
            EngineOptions {
                queue_capacity: cfg.queue_capacity,
                max_batch: cfg.max_batch,
                kv_cache_bytes: cfg.kv_cache_mb << 20,
                ..Default::default()
            },
        )
        .with_context(|| format!("cannot start model `{name}`"))?;
        text.insert(name, handle);
    }
    let embedding_spec = match &cfg.embedding_model {
        Some(spec) => Some(resolve_embedding_model(&cfg.home, spec)?),
        None if gateway => None,
        None => installed
            .iter()
            .find(|m| m.kind == ModelKind::Embedding)
            .map(|m| (m.name.clone(), m.path.clone())),
    };
    let embedding = match embedding_spec {
        Some((name, dir)) => {
            let embedder = BertEmbedder::load(&dir).with_context(|| {
                format!(
                    "cannot load embedding model `{name}` from {}",
                    dir.display()
                )
            })?;
            tracing::info!(model = %name, dims = embedder.dimensions(), "embedding model loaded");
            Some(EmbeddingModel {
                name,
                embedder: Arc::new(embedder),
                permits: Arc::new(Semaphore::new(cfg.embedding_concurrency)),
            })
        }
        None => None,
    };
    let mut upstream = BTreeMap::new();
    for u in &cfg.upstreams {
        let tokenizer = match &u.tokenizer {
            None => None,
            Some(spec) => Some(
                resolve_tokenizer(&cfg.home, spec)
                    .with_context(|| format!("upstream `{}`: tokenizer `{spec}`", u.name))?,
            ),
        };
        let up = Arc::new(Upstream::new(u, tokenizer)?);
        for m in &u.models {
            if text.contains_key(m) || embedding.as_ref().is_some_and(|e| &e.name == m) {
                bail!(
                    "the model `{m}` is served here and by upstream `{}`; rename one",
                    u.name
                );
            }
            upstream.insert(m.clone(), up.clone());
        }
        tracing::info!(upstream = %u.name, url = %u.base_url, models = ?u.models, "upstream backend");
    }
    if text.is_empty() && embedding.is_none() && upstream.is_empty() {
        bail!(
            "no models to serve: none installed under {} and none given with --model; run `kiln pull smollm2-135m`",
            cfg.models_dir().display()
        );
    }
    Ok(ServedModels {
        text,
        embedding,
        upstream,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_alias_path_and_installed_names() -> anyhow::Result<()> {
        let home = tempfile::tempdir()?;
        let models = home.path().join("models");
        std::fs::create_dir_all(models.join("tiny"))?;
        std::fs::write(models.join("tiny").join("model.gguf"), b"x")?;
        assert_eq!(resolve_text_model(home.path(), "tiny")?.0, "tiny");
        assert_eq!(resolve_text_model(home.path(), "a=/x/y.gguf")?.0, "a");
        let file = models.join("tiny").join("model.gguf");
        assert_eq!(
            resolve_text_model(home.path(), file.to_str().unwrap_or(""))?.0,
            "tiny"
        );
        assert!(resolve_text_model(home.path(), "missing").is_err());
        assert_eq!(installed(&models).len(), 1);
        Ok(())
    }
}
