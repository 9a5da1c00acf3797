//! The full-text side: a tantivy index on disk, scored with BM25.
//!
//! One tantivy document per chunk: its id (a fast field, how hits are read
//! back), the document version it belongs to (`doc@version`, how a version's
//! chunks are deleted together), the groups allowed to see it and its
//! metadata (`key=value` terms, for filters), and its text analysed by
//! [`crate::analyzer`]. The chunk text itself is not stored here: the
//! knowledge base's database holds it.

use std::path::Path;

use tantivy::collector::TopDocs;
use tantivy::query::{BooleanQuery, Occur, Query, TermQuery};
use tantivy::schema::{
    Field, IndexRecordOption, Schema, TextFieldIndexing, TextOptions, FAST, INDEXED, STRING,
};
use tantivy::tokenizer::TokenStream;
use tantivy::{Index, IndexReader, IndexWriter, ReloadPolicy, TantivyDocument, Term};

use crate::analyzer;

/// Memory tantivy may use for indexing before it flushes a segment.
const WRITER_MEMORY: usize = 32 << 20;

/// The group every caller belongs to; a chunk of an unrestricted document
/// carries it.
pub const PUBLIC_GROUP: &str = "*";

#[derive(Debug, thiserror::Error)]
#[error("full-text index: {0}")]
pub struct FullTextError(String);

impl From<tantivy::TantivyError> for FullTextError {
    fn from(e: tantivy::TantivyError) -> Self {
        FullTextError(e.to_string())
    }
}

impl From<std::io::Error> for FullTextError {
    fn from(e: std::io::Error) -> Self {
        FullTextError(e.to_string())
    }
}

impl From<tantivy::directory::error::OpenDirectoryError> for FullTextError {
    fn from(e: tantivy::directory::error::OpenDirectoryError) -> Self {
        FullTextError(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, FullTextError>;

/// A chunk as the full-text index sees it.
pub struct IndexedChunk<'a> {
    pub id: u64,
    pub doc_version: &'a str,
    pub groups: &'a [String],
    pub metadata: &'a [(String, String)],
    pub text: &'a str,
}

/// Who is asking and what they filter on.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Groups the caller belongs to (besides the public group). `None`: the
    /// caller sees everything (a tenant admin).
    pub groups: Option<Vec<String>>,
    /// Metadata that must match exactly, all of it.
    pub metadata: Vec<(String, String)>,
}

struct Fields {
    id: Field,
    doc_version: Field,
    groups: Field,
    meta: Field,
    text: Field,
}

pub struct FullText {
    index: Index,
    reader: IndexReader,
    writer: std::sync::Mutex<IndexWriter>,
    fields: Fields,
}

fn schema() -> (Schema, Fields) {
    let mut b = Schema::builder();
    let id = b.add_u64_field("chunk_id", INDEXED | FAST);
    let doc_version = b.add_text_field("doc_version", STRING);
    let groups = b.add_text_field("groups", STRING);
    let meta = b.add_text_field("meta", STRING);
    let text = b.add_text_field(
        "text",
        TextOptions::default().set_indexing_options(
            TextFieldIndexing::default()
                .set_tokenizer(analyzer::NAME)
                .set_index_option(IndexRecordOption::WithFreqs),
        ),
    );
    (
        b.build(),
        Fields {
            id,
            doc_version,
            groups,
            meta,
            text,
        },
    )
}

fn meta_term(key: &str, value: &str) -> String {
    format!("{key}={value}")
}

impl FullText {
    /// Opens the index in `dir`, creating it when the directory is empty.
    pub fn open(dir: &Path) -> Result<FullText> {
        std::fs::create_dir_all(dir).map_err(|e| FullTextError(e.to_string()))?;
        let (schema, fields) = schema();
        let directory = tantivy::directory::MmapDirectory::open(dir)?;
        let index = Index::open_or_create(directory, schema)?;
        index
            .tokenizers()
            .register(analyzer::NAME, analyzer::analyzer());
        let writer = index.writer_with_num_threads(1, WRITER_MEMORY)?;
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()?;
        Ok(FullText {
            index,
            reader,
            writer: std::sync::Mutex::new(writer),
            fields,
        })
    }

    fn writer(&self) -> std::sync::MutexGuard<'_, IndexWriter> {
        self.writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Replaces the chunks of the versions in `remove` with `add`, all in
    /// one commit: a reader sees either none of it or all of it.
    pub fn replace(&self, remove: &[&str], add: &[IndexedChunk<'_>]) -> Result<()> {
        let mut w = self.writer();
        for dv in remove {
            w.delete_term(Term::from_field_text(self.fields.doc_version, dv));
        }
        for c in add {
            let mut d = TantivyDocument::default();
            d.add_u64(self.fields.id, c.id);
            d.add_text(self.fields.doc_version, c.doc_version);
            if c.groups.is_empty() {
                d.add_text(self.fields.groups, PUBLIC_GROUP);
            }
            for g in c.groups {
                d.add_text(self.fields.groups, g);
            }
            for (k, v) in c.metadata {
                d.add_text(self.fields.meta, meta_term(k, v));
            }
            d.add_text(self.fields.text, c.text);
            w.add_document(d)?;
        }
        w.commit()?;
        drop(w);
        self.reader.reload()?;
        Ok(())
    }

    /// Deletes everything (used when rebuilding from the database).
    pub fn clear(&self) -> Result<()> {
        let mut w = self.writer();
        w.delete_all_documents()?;
        w.commit()?;
        drop(w);
        self.reader.reload()?;
        Ok(())
    }

    /// Chunks in the index.
    pub fn len(&self) -> u64 {
        self.reader.searcher().num_docs()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `doc@version` values present, with their chunk counts.
    pub fn doc_versions(&self) -> Result<std::collections::HashMap<String, u64>> {
        let searcher = self.reader.searcher();
        let mut out = std::collections::HashMap::new();
        for segment in searcher.segment_readers() {
            let inverted = segment.inverted_index(self.fields.doc_version)?;
            let mut terms = inverted.terms().stream()?;
            while terms.advance() {
                let key = String::from_utf8_lossy(terms.key()).into_owned();
                let term = Term::from_field_text(self.fields.doc_version, &key);
                let mut live = 0u64;
                if let Some(mut postings) =
                    inverted.read_postings(&term, IndexRecordOption::Basic)?
                {
                    use tantivy::DocSet;
                    let alive = segment.alive_bitset();
                    let mut doc = postings.doc();
                    while doc != tantivy::TERMINATED {
                        if alive.is_none_or(|a| a.is_alive(doc)) {
                            live += 1;
                        }
                        doc = postings.advance();
                    }
                }
                if live > 0 {
                    *out.entry(key).or_insert(0) += live;
                }
            }
        }
        Ok(out)
    }

    /// The best `k` chunks for `query` under `filter`, as (chunk id, BM25
    /// score), best first.
    pub fn search(&self, query: &str, filter: &Filter, k: usize) -> Result<Vec<(u64, f32)>> {
        let mut should: Vec<(Occur, Box<dyn Query>)> = Vec::new();
        let mut analyzer = analyzer::analyzer();
        let mut stream = analyzer.token_stream(query);
        while stream.advance() {
            let term = Term::from_field_text(self.fields.text, &stream.token().text);
            should.push((
                Occur::Should,
                Box::new(TermQuery::new(term, IndexRecordOption::WithFreqs)),
            ));
        }
        if should.is_empty() || k == 0 {
            return Ok(Vec::new());
        }
        let mut clauses: Vec<(Occur, Box<dyn Query>)> =
            vec![(Occur::Must, Box::new(BooleanQuery::new(should)))];
        if let Some(groups) = &filter.groups {
            let allowed = std::iter::once(PUBLIC_GROUP)
                .chain(groups.iter().map(String::as_str))
                .map(|g| {
                    let q: Box<dyn Query> = Box::new(TermQuery::new(
                        Term::from_field_text(self.fields.groups, g),
                        IndexRecordOption::Basic,
                    ));
                    (Occur::Should, q)
                })
                .collect();
            clauses.push((Occur::Must, Box::new(BooleanQuery::new(allowed))));
        }
        for (key, value) in &filter.metadata {
            clauses.push((
                Occur::Must,
                Box::new(TermQuery::new(
                    Term::from_field_text(self.fields.meta, &meta_term(key, value)),
                    IndexRecordOption::Basic,
                )),
            ));
        }
        let query = BooleanQuery::new(clauses);
        let searcher = self.reader.searcher();
        let top = searcher.search(&query, &TopDocs::with_limit(k).order_by_score())?;
        let mut out = Vec::with_capacity(top.len());
        for (score, addr) in top {
            let ids = searcher
                .segment_reader(addr.segment_ord)
                .fast_fields()
                .u64("chunk_id")?;
            if let Some(id) = ids.first(addr.doc_id) {
                out.push((id, score));
            }
        }
        Ok(out)
    }

    pub fn index(&self) -> &Index {
        &self.index
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn chunk<'a>(id: u64, dv: &'a str, groups: &'a [String], text: &'a str) -> IndexedChunk<'a> {
        IndexedChunk {
            id,
            doc_version: dv,
            groups,
            metadata: &[],
            text,
        }
    }

    #[test]
    fn search_replace_and_filter() {
        let dir = tempfile::tempdir().unwrap();
        let ft = FullText::open(dir.path()).unwrap();
        let secret = vec!["finance".to_string()];
        ft.replace(
            &[],
            &[
                chunk(1, "a@1", &[], "The cat sat on the mat."),
                chunk(2, "a@1", &[], "Dogs chase cats in the garden."),
                chunk(3, "b@1", &secret, "Quarterly revenue of the cat food unit."),
                chunk(4, "c@1", &[], "机器学习是人工智能的一个分支。"),
            ],
        )
        .unwrap();
        let all = Filter::default();
        let hits = ft.search("cats", &all, 10).unwrap();
        let ids: Vec<u64> = hits.iter().map(|h| h.0).collect();
        assert_eq!(ids.len(), 3);
        let public = Filter {
            groups: Some(vec![]),
            metadata: vec![],
        };
        let ids: Vec<u64> = ft
            .search("cat", &public, 10)
            .unwrap()
            .iter()
            .map(|h| h.0)
            .collect();
        assert!(!ids.contains(&3), "{ids:?}");
        let finance = Filter {
            groups: Some(secret.clone()),
            metadata: vec![],
        };
        assert!(ft
            .search("revenue", &finance, 10)
            .unwrap()
            .iter()
            .any(|h| h.0 == 3));
        assert_eq!(ft.search("学习", &all, 10).unwrap()[0].0, 4);
        assert_eq!(ft.doc_versions().unwrap().get("a@1"), Some(&2));

        ft.replace(&["a@1"], &[chunk(5, "a@2", &[], "A bird.")])
            .unwrap();
        assert!(ft.search("cat", &all, 10).unwrap().iter().all(|h| h.0 == 3));
        let dvs = ft.doc_versions().unwrap();
        assert_eq!(dvs.get("a@1"), None);
        assert_eq!(dvs.get("a@2"), Some(&1));
        assert!(ft.search("", &all, 10).unwrap().is_empty());
        assert!(ft.search(":::\"(", &all, 10).unwrap().is_empty());
    }

    #[test]
    fn reopens_with_its_contents() {
        let dir = tempfile::tempdir().unwrap();
        {
            let ft = FullText::open(dir.path()).unwrap();
            ft.replace(&[], &[chunk(7, "d@1", &[], "persistent words")])
                .unwrap();
        }
        let ft = FullText::open(dir.path()).unwrap();
        assert_eq!(ft.len(), 1);
        assert_eq!(
            ft.search("persistent", &Filter::default(), 5).unwrap()[0].0,
            7
        );
    }
}
