//! A knowledge base end to end on disk: upload, ingest, search, replace,
//! delete, access control, reopen and crash recovery. The embedder here is
//! a feature-hashing bag of words (deterministic, no weights); the server's
//! tests use the real embedding model.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use kiln_rag::chunk::ChunkOptions;
use kiln_rag::fulltext::Filter;
use kiln_rag::kb::{EmbedError, KnowledgeBase, Query, Settings, Status, Upload};
use kiln_rag::retrieve::{Fusion, Mode};

mod common;

use common::{HashEmbedder, DIMS};

fn settings(id: &str) -> Settings {
    Settings {
        id: id.into(),
        tenant: "t1".into(),
        name: "handbook".into(),
        description: String::new(),
        embedding_model: "hash-64".into(),
        dimensions: DIMS,
        chunking: ChunkOptions {
            max_tokens: 40,
            overlap_tokens: 8,
        },
        grounding: Default::default(),
        created_ms: 0,
    }
}

fn upload(name: &str, text: &str) -> Upload {
    Upload {
        name: name.into(),
        bytes: text.as_bytes().to_vec(),
        ..Default::default()
    }
}

fn query(text: &str, mode: Mode, filter: Filter) -> Query {
    Query {
        text: text.into(),
        k: 5,
        mode,
        fusion: Fusion::default(),
        filter,
    }
}

fn names(hits: &[kiln_rag::kb::Hit]) -> Vec<String> {
    hits.iter().map(|h| h.document_name.clone()).collect()
}

#[test]
fn ingest_search_replace_delete() {
    let dir = tempfile::tempdir().unwrap();
    let kb = KnowledgeBase::create(dir.path(), settings("kb1")).unwrap();
    let e = HashEmbedder::new(10_000);
    let a = kb
        .add(upload(
            "vacation.md",
            "# Leave\nEmployees get 25 days of paid vacation per year.\n\n## Carry over\nUp to five days carry over to the next year.",
        ))
        .unwrap();
    assert!(!a.duplicate);
    assert_eq!(a.document.status, Status::Queued);
    let b = kb
        .add(upload(
            "expenses.txt",
            "Travel expenses are reimbursed within 30 days of the claim.",
        ))
        .unwrap();
    assert_eq!(kb.pending().unwrap().len(), 2);
    for p in kb.pending().unwrap() {
        assert_eq!(kb.ingest(&p.doc, p.version, &e).unwrap(), Status::Ready);
    }
    let doc = kb.document(&a.document.id).unwrap();
    assert_eq!(doc.live_version, Some(1));
    assert_eq!(doc.format.as_deref(), Some("markdown"));
    assert!(doc.chunks >= 2);

    for mode in [Mode::Bm25, Mode::Vector, Mode::Hybrid] {
        let hits = kb
            .search(
                &query("paid vacation days", mode, Filter::default()),
                Some(&e),
            )
            .unwrap();
        assert_eq!(hits[0].document_name, "vacation.md", "{mode:?}");
        let text = &hits[0].text;
        assert!(text.contains("vacation"), "{text}");
        assert_eq!(hits[0].heading, "Leave");
    }

    // The same upload again is not added twice.
    let dup = kb
        .add(upload(
            "expenses.txt",
            "Travel expenses are reimbursed within 30 days of the claim.",
        ))
        .unwrap();
    assert!(dup.duplicate);
    assert_eq!(dup.document.id, b.document.id);
    // The same bytes under another name are another document, ingested
    // without embedding anything again.
    let copy = kb
        .add(upload(
            "copy.txt",
            "Travel expenses are reimbursed within 30 days of the claim.",
        ))
        .unwrap();
    assert!(!copy.duplicate);
    let left = e.budget.load(Ordering::SeqCst);
    assert_eq!(kb.ingest(&copy.document.id, 1, &e).unwrap(), Status::Ready);
    assert_eq!(
        e.budget.load(Ordering::SeqCst),
        left,
        "nothing embedded again"
    );
    let hits = kb
        .search(
            &query("reimbursed claim", Mode::Bm25, Filter::default()),
            None,
        )
        .unwrap();
    let mut found = names(&hits);
    found.sort();
    assert_eq!(found, ["copy.txt", "expenses.txt"]);
    kb.delete(&copy.document.id).unwrap();

    // A new version replaces the old one in every index.
    let r = kb
        .replace(
            &b.document.id,
            b"Mileage is paid at 30 cents per kilometre.".to_vec(),
            "",
        )
        .unwrap();
    assert_eq!(r.document.version, 2);
    assert_eq!(
        r.document.live_version,
        Some(1),
        "old version live until the new is ready"
    );
    assert_eq!(kb.ingest(&b.document.id, 2, &e).unwrap(), Status::Ready);
    for mode in [Mode::Bm25, Mode::Vector] {
        let hits = kb
            .search(
                &query("reimbursed travel claim", mode, Filter::default()),
                Some(&e),
            )
            .unwrap();
        assert!(
            hits.iter().all(|h| !h.text.contains("reimbursed")),
            "{mode:?}"
        );
    }
    let hits = kb
        .search(
            &query("mileage kilometre", Mode::Bm25, Filter::default()),
            None,
        )
        .unwrap();
    assert_eq!(hits[0].version, 2);

    // Deleting takes it out of everything at once.
    kb.delete(&a.document.id).unwrap();
    for mode in [Mode::Bm25, Mode::Vector, Mode::Hybrid] {
        let hits = kb
            .search(&query("vacation", mode, Filter::default()), Some(&e))
            .unwrap();
        assert!(
            !names(&hits).contains(&"vacation.md".to_string()),
            "{mode:?}"
        );
    }
    assert!(kb.document(&a.document.id).is_err());
    assert!(kb.delete(&a.document.id).is_err());
    drop(kb);

    // Reopened, it holds exactly the same.
    let kb = KnowledgeBase::open(dir.path()).unwrap();
    assert_eq!(kb.stats().documents, 1);
    let hits = kb
        .search(&query("mileage", Mode::Hybrid, Filter::default()), Some(&e))
        .unwrap();
    assert_eq!(hits[0].document_id, b.document.id);
}

#[test]
fn groups_and_metadata_restrict_what_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let kb = KnowledgeBase::create(dir.path(), settings("kb2")).unwrap();
    let e = HashEmbedder::new(10_000);
    let mut secret = upload(
        "salaries.txt",
        "The salary budget for engineering is confidential.",
    );
    secret.groups = vec!["hr".into()];
    secret.metadata = HashMap::from([("dept".into(), "hr".into())]);
    let mut public = upload(
        "lunch.txt",
        "The canteen serves lunch; the budget for snacks is small.",
    );
    public.metadata = HashMap::from([("dept".into(), "facilities".into())]);
    for u in [secret, public] {
        let d = kb.add(u).unwrap().document;
        kb.ingest(&d.id, 1, &e).unwrap();
    }
    // Counts show a caller only what it may see.
    let all = kb.count_visible(None).unwrap();
    assert_eq!(all.documents, 2);
    assert_eq!(all.chunks, kb.stats().chunks);
    let sales = kb.count_visible(Some(&["sales".to_string()])).unwrap();
    assert_eq!(sales.documents, 1);
    assert!(
        sales.chunks >= 1 && sales.chunks < all.chunks,
        "{sales:?} of {all:?}"
    );
    let hr_counts = kb.count_visible(Some(&["hr".to_string()])).unwrap();
    assert_eq!(hr_counts, all);
    let outsider = Filter {
        groups: Some(vec!["sales".into()]),
        metadata: vec![],
    };
    let hr = Filter {
        groups: Some(vec!["hr".into()]),
        metadata: vec![],
    };
    for mode in [Mode::Bm25, Mode::Vector, Mode::Hybrid] {
        let hits = kb
            .search(
                &query("salary budget engineering", mode, outsider.clone()),
                Some(&e),
            )
            .unwrap();
        assert_eq!(names(&hits), ["lunch.txt"], "{mode:?}");
        let hits = kb
            .search(
                &query("salary budget engineering", mode, hr.clone()),
                Some(&e),
            )
            .unwrap();
        assert_eq!(hits[0].document_name, "salaries.txt", "{mode:?}");
        let only_facilities = Filter {
            groups: None,
            metadata: vec![("dept".into(), "facilities".into())],
        };
        let hits = kb
            .search(&query("budget", mode, only_facilities), Some(&e))
            .unwrap();
        assert_eq!(names(&hits), ["lunch.txt"], "{mode:?}");
    }
}

#[test]
fn failures_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let kb = KnowledgeBase::create(dir.path(), settings("kb3")).unwrap();
    // Binary junk is refused at upload, with a clear reason.
    let junk = kb.add(Upload {
        name: "junk.txt".into(),
        bytes: vec![0, 159, 146, 150, 0, 0, 1, 2, 3, 0xff, 0xfe, 0],
        ..Default::default()
    });
    assert!(
        matches!(junk, Err(kiln_rag::kb::KbError::Extract(_))),
        "{junk:?}"
    );
    // Damage found only while reading fails the version, with a code.
    let e = HashEmbedder::new(10_000);
    let broken = kb
        .add(Upload {
            name: "broken.pdf".into(),
            bytes: b"%PDF-1.4\n1 0 obj << /Type /Catalog >> garbage".to_vec(),
            ..Default::default()
        })
        .unwrap()
        .document;
    assert_eq!(kb.ingest(&broken.id, 1, &e).unwrap(), Status::Failed);
    let d = kb.document(&broken.id).unwrap();
    assert!(d.error_code.is_some() && d.error.is_some(), "{d:?}");
    assert_eq!(d.live_version, None);

    // A budget that runs out mid-document stops it cleanly.
    let long: String = (0..200)
        .map(|i| format!("Sentence number {i} talks about topic {i}. "))
        .collect();
    let doc = kb.add(upload("long.txt", &long)).unwrap().document;
    let poor = HashEmbedder::new(40);
    assert_eq!(kb.ingest(&doc.id, 1, &poor).unwrap(), Status::Stopped);
    let d = kb.document(&doc.id).unwrap();
    assert_eq!(d.status, Status::Stopped);
    assert_eq!(d.live_version, None);
    assert_eq!(kb.stats().chunks, 0);
    assert!(kb
        .search(
            &query("sentence topic", Mode::Bm25, Filter::default()),
            None
        )
        .unwrap()
        .is_empty());
    // With credit again, a new upload of the same bytes is accepted.
    let again = kb.add(upload("long.txt", &long)).unwrap();
    assert!(!again.duplicate);
    // A document deleted before its ingestion ran is simply gone.
    kb.delete(&again.document.id).unwrap();
    assert!(kb.ingest(&again.document.id, 1, &e).is_ok());
    assert!(kb.document(&again.document.id).is_err());
    assert_eq!(kb.stats().chunks, 0);
    // Bad input is refused before anything is stored.
    assert!(kb.add(upload("", "text")).is_err());
    assert!(kb.add(upload("empty.txt", "")).is_err());
    let mut bad_group = upload("g.txt", "text");
    bad_group.groups = vec!["*".into()];
    assert!(kb.add(bad_group).is_err());
}

#[test]
fn reopening_repairs_a_stale_fulltext_index() {
    let dir = tempfile::tempdir().unwrap();
    let e = HashEmbedder::new(10_000);
    let doc = {
        let kb = KnowledgeBase::create(dir.path(), settings("kb4")).unwrap();
        let d = kb
            .add(upload(
                "a.txt",
                "Quantum chromodynamics describes the strong force.",
            ))
            .unwrap()
            .document;
        kb.ingest(&d.id, 1, &e).unwrap();
        d.id
    };
    // Simulate a crash between the database commit and the full-text
    // commit: wipe the full-text index behind the knowledge base's back,
    // and add an orphan version the database never made live.
    {
        let ft = kiln_rag::fulltext::FullText::open(&dir.path().join("fulltext")).unwrap();
        ft.clear().unwrap();
        ft.replace(
            &[],
            &[kiln_rag::fulltext::IndexedChunk {
                id: 999,
                doc_version: "doc_ghost@1",
                groups: &[],
                metadata: &[],
                text: "quantum ghost",
            }],
        )
        .unwrap();
    }
    // ... and the crash came before the version was marked ready.
    {
        let db = rusqlite::Connection::open(dir.path().join("kb.sqlite")).unwrap();
        let n = db
            .execute("UPDATE versions SET status = 'ingesting'", [])
            .unwrap();
        assert_eq!(n, 1);
    }
    let kb = KnowledgeBase::open(dir.path()).unwrap();
    let hits = kb
        .search(&query("quantum", Mode::Bm25, Filter::default()), None)
        .unwrap();
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].document_id, doc);
    assert_eq!(kb.document(&doc).unwrap().status, Status::Ready);
    assert!(
        kb.pending().unwrap().is_empty(),
        "a live version is not ingested again"
    );
}

#[test]
fn a_ready_document_is_found_by_full_text_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let kb = KnowledgeBase::create(dir.path(), settings("kb7")).unwrap();
    let e = HashEmbedder::new(100_000);
    let words: Vec<String> = (0..40).map(|i| format!("zebrafinch{i}")).collect();
    let docs: Vec<String> = words
        .iter()
        .map(|w| {
            kb.add(upload(
                &format!("{w}.txt"),
                &format!("The {w} sings at dawn."),
            ))
            .unwrap()
            .document
            .id
        })
        .collect();
    std::thread::scope(|s| {
        s.spawn(|| {
            for d in &docs {
                kb.ingest(d, 1, &e).unwrap();
            }
        });
        // Whenever a document says it is ready, full-text search finds it.
        let mut seen = vec![false; docs.len()];
        while seen.iter().any(|s| !s) {
            for (i, d) in docs.iter().enumerate() {
                if seen[i] || kb.document(d).unwrap().status != Status::Ready {
                    continue;
                }
                seen[i] = true;
                let hits = kb
                    .search(&query(&words[i], Mode::Bm25, Filter::default()), None)
                    .unwrap();
                assert_eq!(names(&hits), [format!("{}.txt", words[i])], "{d}");
            }
        }
    });
}

#[test]
fn many_documents_ingest_together_and_fail_alone() {
    let dir = tempfile::tempdir().unwrap();
    let kb = KnowledgeBase::create(dir.path(), settings("kb5")).unwrap();
    let mut jobs = Vec::new();
    for i in 0..20 {
        let d = kb
            .add(upload(
                &format!("note{i}.txt"),
                &format!("Note {i} is about subject{i}."),
            ))
            .unwrap()
            .document;
        jobs.push((d.id, 1));
    }
    let broken = kb
        .add(Upload {
            name: "broken.pdf".into(),
            bytes: b"%PDF-1.4\nnot really".to_vec(),
            ..Default::default()
        })
        .unwrap()
        .document;
    jobs.insert(7, (broken.id.clone(), 1));
    let e = HashEmbedder::new(10_000);
    let statuses = kb.ingest_many(&jobs, &e).unwrap();
    assert_eq!(statuses[7], Status::Failed);
    assert_eq!(statuses.iter().filter(|s| **s == Status::Ready).count(), 20);
    assert_eq!(
        e.calls.load(Ordering::SeqCst),
        1,
        "20 one-chunk notes embed in one batch"
    );
    assert_eq!(kb.stats().chunks, 20);
    let hits = kb
        .search(&query("subject13", Mode::Bm25, Filter::default()), None)
        .unwrap();
    assert_eq!(hits[0].document_name, "note13.txt");

    // When credit runs out part-way, what was fully embedded goes live and
    // the rest stops, each whole.
    let long: String = (0..300)
        .map(|i| format!("Line {i} of the long file. "))
        .collect();
    let short = kb
        .add(upload("short.txt", "A short memo about lunch."))
        .unwrap()
        .document;
    let big = kb.add(upload("big.txt", &long)).unwrap().document;
    let poor = HashEmbedder::new(33);
    let statuses = kb
        .ingest_many(&[(short.id.clone(), 1), (big.id.clone(), 1)], &poor)
        .unwrap();
    assert_eq!(statuses, [Status::Ready, Status::Stopped]);
    assert_eq!(kb.document(&big.id).unwrap().live_version, None);
    assert_eq!(kb.stats().chunks, 21);
}

/// Scores passages by how many of the query's words they contain, reversed
/// for the test: the passage with the fewest shared words first.
struct ContrarianReranker;

impl kiln_rag::retrieve::Reranker for ContrarianReranker {
    fn model(&self) -> &str {
        "contrarian"
    }
    fn rerank(&self, query: &str, passages: &[&str]) -> Result<Vec<f32>, EmbedError> {
        let q: Vec<String> = query.split_whitespace().map(str::to_lowercase).collect();
        Ok(passages
            .iter()
            .map(|p| {
                let p = p.to_lowercase();
                -(q.iter().filter(|w| p.contains(w.as_str())).count() as f32)
            })
            .collect())
    }
}

#[test]
fn a_reranker_orders_the_fused_candidates() {
    let dir = tempfile::tempdir().unwrap();
    let kb = KnowledgeBase::create(dir.path(), settings("kb6")).unwrap();
    let e = HashEmbedder::new(10_000);
    for (name, text) in [
        ("a.txt", "red apples and green apples"),
        ("b.txt", "red cars"),
        ("c.txt", "red apples"),
    ] {
        let d = kb.add(upload(name, text)).unwrap().document;
        kb.ingest(&d.id, 1, &e).unwrap();
    }
    let q = Query {
        k: 2,
        ..query("red apples", Mode::Bm25, Filter::default())
    };
    let plain = kb.search(&q, None).unwrap();
    assert_eq!(plain.len(), 2);
    assert!(plain.iter().all(|h| h.rerank.is_none()));
    let reranked = kb
        .search_reranked(&q, None, Some(&ContrarianReranker))
        .unwrap();
    assert_eq!(reranked.len(), 2);
    assert_eq!(reranked[0].document_name, "b.txt", "{reranked:?}");
    assert_eq!(reranked[0].rerank, Some(-1.0));
}

#[test]
fn a_new_version_embeds_only_what_changed() {
    let dir = tempfile::tempdir().unwrap();
    let kb = KnowledgeBase::create(dir.path(), settings("kb8")).unwrap();
    let e = HashEmbedder::new(100_000);
    let paragraphs: Vec<String> = (0..12)
        .map(|i| format!("Section {i}. Valve {i} is inspected every {} months by the plant engineer on duty.", i + 1))
        .collect();
    let v1 = paragraphs.join("\n\n");
    let d = kb.add(upload("valves.txt", &v1)).unwrap().document;
    let before = e.budget.load(Ordering::SeqCst);
    kb.ingest(&d.id, 1, &e).unwrap();
    let first = before - e.budget.load(Ordering::SeqCst);
    let chunks = kb.document(&d.id).unwrap().chunks as usize;
    assert!(
        chunks >= 4 && first == chunks,
        "{first} inputs for {chunks} chunks"
    );
    // Change the last paragraph only.
    let mut changed = paragraphs.clone();
    changed[11] = "Section 11. Valve 11 is replaced every ten years.".into();
    kb.replace(&d.id, changed.join("\n\n").into_bytes(), "")
        .unwrap();
    let before = e.budget.load(Ordering::SeqCst);
    assert_eq!(kb.ingest(&d.id, 2, &e).unwrap(), Status::Ready);
    let second = before - e.budget.load(Ordering::SeqCst);
    assert!(
        second >= 1 && second < chunks / 2,
        "{second} of {chunks} chunks embedded again"
    );
    let hits = kb
        .search(
            &query("replaced every ten years", Mode::Bm25, Filter::default()),
            None,
        )
        .unwrap();
    assert_eq!(names(&hits)[0], "valves.txt");
    assert_eq!(
        kb.document(&d.id).unwrap().progress.done,
        kb.document(&d.id).unwrap().chunks
    );
}

/// Deletes a document from inside its own ingestion, after the first
/// embedding batch, as a user's DELETE racing the ingestion would.
struct DeletingEmbedder<'a> {
    inner: HashEmbedder,
    kb: &'a KnowledgeBase,
    doc: std::sync::Mutex<Option<String>>,
}

impl kiln_rag::kb::Embedder for DeletingEmbedder<'_> {
    fn model(&self) -> &str {
        self.inner.model()
    }
    fn dimensions(&self) -> usize {
        self.inner.dimensions()
    }
    fn max_tokens(&self) -> usize {
        self.inner.max_tokens()
    }
    fn count_tokens(&self, text: &str) -> usize {
        self.inner.count_tokens(text)
    }
    fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let out = self.inner.embed(texts);
        if let Some(doc) = self.doc.lock().unwrap().take() {
            self.kb.delete(&doc).unwrap();
        }
        out
    }
}

#[test]
fn a_document_deleted_while_it_is_embedded_is_embedded_no_further() {
    let dir = tempfile::tempdir().unwrap();
    let kb = KnowledgeBase::create(dir.path(), settings("kb-del")).unwrap();
    let text: String = (0..400)
        .map(|i| format!("Paragraph {i} talks about topic number {i} at some length.\n\n"))
        .collect();
    let d = kb.add(upload("long.txt", &text)).unwrap().document;
    let e = DeletingEmbedder {
        inner: HashEmbedder::new(1_000_000),
        kb: &kb,
        doc: std::sync::Mutex::new(Some(d.id.clone())),
    };
    let status = kb.ingest(&d.id, 1, &e).unwrap();
    assert_eq!(status, Status::Superseded);
    assert_eq!(
        e.inner.calls.load(Ordering::SeqCst),
        1,
        "batches after the delete were embedded"
    );
    assert!(kb.documents().unwrap().is_empty());
    assert_eq!(kb.stats().chunks, 0);
    let hits = kb
        .search(
            &query("topic number", Mode::Hybrid, Filter::default()),
            Some(&e.inner),
        )
        .unwrap();
    assert!(hits.is_empty(), "{hits:?}");
}

/// A knowledge base stays with the embedding model it was built with:
/// another model neither ingests into it nor searches its vectors, and
/// nothing is embedded or changed when it tries.
#[test]
fn a_knowledge_base_is_pinned_to_its_embedding_model() {
    let dir = tempfile::tempdir().unwrap();
    let mut pinned = settings("kb-pin");
    pinned.embedding_model = "all-minilm-l6-v2".into();
    let kb = KnowledgeBase::create(dir.path(), pinned).unwrap();
    let d = kb
        .add(upload("a.txt", "Vacation days are twenty-five per year."))
        .unwrap()
        .document;
    let other = HashEmbedder::new(1_000);
    let err = kb.ingest(&d.id, 1, &other).unwrap_err();
    assert!(
        matches!(&err, kiln_rag::kb::KbError::WrongModel { built, given }
            if built == "all-minilm-l6-v2" && given == "hash-64"),
        "{err:?}"
    );
    assert!(err.to_string().contains("all-minilm-l6-v2"), "{err}");
    assert_eq!(other.calls.load(Ordering::SeqCst), 0);
    assert_eq!(kb.stats().chunks, 0);
    for mode in [Mode::Vector, Mode::Hybrid] {
        let err = kb
            .search(&query("vacation", mode, Filter::default()), Some(&other))
            .unwrap_err();
        assert!(
            matches!(err, kiln_rag::kb::KbError::WrongModel { .. }),
            "{mode:?}: {err:?}"
        );
    }
}
