//! Kiln's embedded inference engine.
//!
//! Owns everything between a GGUF (or safetensors) file on disk and a stream
//! of generated tokens: file loading and validation ([`gguf`]), tokenizers
//! built from model metadata ([`tokenizer`]), chat templates ([`template`]),
//! the transformer forward pass ([`model`]), sampling ([`sampler`]), the
//! sentence-embedding model ([`bert`]), the model catalogue ([`catalog`]) and
//! the request loop behind a bounded queue ([`engine`]), and constrained
//! decoding for JSON and tool calls ([`constrain`]).
//!
//! Nothing here knows about HTTP: the server crate turns wire requests into
//! [`engine::GenerateRequest`]s and engine events into wire responses.

pub mod bert;
pub mod catalog;
pub mod constrain;
pub mod engine;
pub mod error;
pub mod gguf;
pub mod kernels;
pub mod model;
pub mod sampler;
pub mod template;
pub mod tokenizer;
pub mod tools;

pub use error::{EngineError, Result};
