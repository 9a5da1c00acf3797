//! The engine's error type. Every failure a caller can act on has its own
//! variant; the server maps each one to an HTTP status exhaustively.

use std::path::PathBuf;

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The model file is missing, truncated, corrupt or of an unsupported kind.
    #[error("model file {path}: {reason}")]
    BadModelFile { path: PathBuf, reason: String },
    /// The model's architecture (GGUF `general.architecture`) is not implemented.
    #[error("unsupported architecture `{0}` (supported: llama, gemma3, qwen2, qwen3)")]
    UnsupportedArchitecture(String),
    /// Metadata needed to build the model or tokenizer is missing or malformed.
    #[error("model metadata: {0}")]
    Metadata(String),
    /// The chat template failed to render for these messages.
    #[error("chat template: {0}")]
    Template(String),
    /// The request itself is invalid (bad sampling value, prompt too long, ...).
    #[error("{0}")]
    InvalidRequest(String),
    /// The prompt (plus at least one generated token) does not fit the context.
    #[error("prompt is {prompt_tokens} tokens but the model's context is {context_length} tokens")]
    ContextOverflow {
        prompt_tokens: usize,
        context_length: usize,
    },
    /// The request needs more KV cache than the engine's whole budget holds.
    #[error("the request needs {needed} positions of KV cache but the budget holds {capacity}")]
    KvCacheFull { needed: usize, capacity: usize },
    /// The request queue is full; the caller should retry later.
    #[error("the engine queue is full")]
    Busy,
    /// The engine's worker has stopped (shutdown or a fatal error).
    #[error("the engine has stopped")]
    Stopped,
    /// A tensor operation failed. Never shown to clients verbatim.
    #[error("tensor operation failed: {0}")]
    Tensor(#[from] candle_core::Error),
    /// Reading a file failed.
    #[error("i/o error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Fetching a model for the catalogue failed.
    #[error("pulling model: {0}")]
    Pull(String),
}

impl EngineError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        EngineError::Io {
            path: path.into(),
            source,
        }
    }

    pub fn bad_file(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        EngineError::BadModelFile {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
