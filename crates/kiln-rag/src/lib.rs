//! Knowledge bases: an organisation's documents turned into indexes that
//! answers can be grounded in.
//!
//! The pipeline, one module per stage:
//! - [`extract`]: bytes of an uploaded file to plain text with its structure
//!   (headings, paragraphs) kept as Markdown-style lines; the format is
//!   detected from the content, not only the name;
//! - [`chunk`]: structure-aware, token-bounded chunks with overlap, each
//!   with its character offsets in the extracted text;
//! - [`analyzer`]: the full-text tokenisation (English words stemmed, Chinese,
//!   Japanese and Korean text as overlapping character bigrams);
//! - [`fulltext`]: a tantivy BM25 index on disk;
//! - [`vector`]: the embedding index;
//! - [`retrieve`]: hybrid retrieval with reciprocal rank fusion;
//! - [`ground`]: the relevance gate, the prompt with numbered sources, and
//!   the check of each answer sentence against them;
//! - [`kb`]: one knowledge base on disk, keeping its document list and both
//!   indexes consistent across crashes.
//!
//! The crate reaches models only through the [`Embedder`] trait, so it tests
//! without the engine and the server decides how each call is metered.

pub mod analyzer;
pub mod chunk;
pub mod extract;
pub mod fulltext;
pub mod ground;
pub mod kb;
pub mod retrieve;
pub mod vector;
