//! Ingestion: extraction, chunking, embedding in shared batches, and the
//! one commit that makes versions live.

use super::*;

/// Inputs embedded per model call during ingestion.
const EMBED_BATCH: usize = 32;

impl KnowledgeBase {
    /// Runs ingestion of one document version to its end; see
    /// [`KnowledgeBase::ingest_many`].
    pub fn ingest(&self, doc: &str, version: i64, embedder: &dyn Embedder) -> Result<Status> {
        let mut out = self.ingest_many(&[(doc.to_string(), version)], embedder)?;
        Ok(out.pop().unwrap_or(Status::Superseded))
    }

    /// Ingests several document versions together: each is extracted and
    /// chunked, all their chunks are embedded in shared batches through
    /// `embedder`, and every version that got all its vectors goes live in
    /// one commit (one transaction, one full-text commit), which is what
    /// makes many small documents fast. Returns each version's final
    /// status, in order; a failure is recorded on its version and never
    /// leaves part of it in an index.
    pub fn ingest_many(
        &self,
        jobs: &[(String, i64)],
        embedder: &dyn Embedder,
    ) -> Result<Vec<Status>> {
        if embedder.model() != self.settings.embedding_model {
            return Err(KbError::WrongModel {
                built: self.settings.embedding_model.clone(),
                given: embedder.model().to_string(),
            });
        }
        let mut statuses = vec![Status::Superseded; jobs.len()];
        let mut prepared: Vec<Prepared> = Vec::new();
        for (i, (doc, version)) in jobs.iter().enumerate() {
            if !self.is_current(doc, *version)? {
                statuses[i] = self
                    .document(doc)
                    .map(|d| d.status)
                    .unwrap_or(Status::Superseded);
                continue;
            }
            self.set_status(doc, *version, Status::Ingesting, None)?;
            match self.prepare(doc, *version, embedder) {
                Ok(p) => prepared.push(Prepared { job: i, ..p }),
                Err(e) => statuses[i] = self.record_failure(doc, *version, &e)?,
            }
        }
        // Embed every chunk not embedded before, batch by batch, across
        // documents.
        let inputs: Vec<(usize, usize)> = prepared
            .iter()
            .enumerate()
            .flat_map(|(p, d)| {
                (0..d.inputs.len())
                    .filter(|&i| d.vectors[i].is_none())
                    .map(move |i| (p, i))
            })
            .collect();
        let mut failure: Option<KbError> = None;
        // Versions deleted or replaced since their embedding began.
        let mut gone = vec![false; prepared.len()];
        for batch in inputs.chunks(EMBED_BATCH) {
            // A version no longer current is embedded, and charged for, no
            // further: each batch first asks whether its documents still are.
            let mut docs: Vec<usize> = batch.iter().map(|&(p, _)| p).collect();
            docs.dedup();
            for p in docs {
                let (doc, version) = &jobs[prepared[p].job];
                if !gone[p] && !self.is_current(doc, *version)? {
                    gone[p] = true;
                }
            }
            let batch: Vec<(usize, usize)> =
                batch.iter().copied().filter(|&(p, _)| !gone[p]).collect();
            if batch.is_empty() {
                continue;
            }
            let texts: Vec<String> = batch
                .iter()
                .map(|&(p, i)| prepared[p].inputs[i].clone())
                .collect();
            let out = match embedder.embed(&texts) {
                Ok(v)
                    if v.len() == texts.len()
                        && v.iter().all(|x| x.len() == self.settings.dimensions) =>
                {
                    v
                }
                Ok(v) => {
                    failure = Some(KbError::Embed(EmbedError::Failed(format!(
                        "the embedding model returned {} vectors for {} inputs, or vectors of the wrong size",
                        v.len(),
                        texts.len()
                    ))));
                    break;
                }
                Err(e) => {
                    failure = Some(KbError::Embed(e));
                    break;
                }
            };
            let mut touched = Vec::new();
            for (&(p, i), v) in batch.iter().zip(out) {
                prepared[p].vectors[i] = Some(v);
                touched.push(p);
            }
            touched.dedup();
            for p in touched {
                let d = &prepared[p];
                let (doc, version) = &jobs[d.job];
                self.set_progress(doc, *version, d.progress())?;
            }
        }
        let (complete, incomplete): (Vec<Prepared>, Vec<Prepared>) =
            prepared.into_iter().partition(Prepared::is_complete);
        if let Some(e) = &failure {
            for d in &incomplete {
                let (doc, version) = &jobs[d.job];
                statuses[d.job] = self.record_failure(doc, *version, e)?;
            }
        }
        for (job, status) in self.go_live(jobs, &complete)? {
            statuses[job] = status;
        }
        Ok(statuses)
    }

    /// Records why a version did not complete; returns its final status.
    fn record_failure(&self, doc: &str, version: i64, e: &KbError) -> Result<Status> {
        let (status, code) = match e {
            KbError::Extract(x) => (Status::Failed, x.code()),
            KbError::Embed(EmbedError::Refused(_)) => (Status::Stopped, "refused"),
            KbError::Embed(_) => (Status::Failed, "embedding_failed"),
            _ => (Status::Failed, "internal"),
        };
        let message = e.to_string();
        if !self.is_current(doc, version)? {
            return Ok(Status::Superseded);
        }
        self.set_status(doc, version, status, Some((code, &message)))?;
        tracing::warn!(kb = %self.settings.id, doc, version, error = %message, "ingestion did not complete");
        Ok(status)
    }

    /// Extracts and chunks one version.
    fn prepare(&self, doc: &str, version: i64, embedder: &dyn Embedder) -> Result<Prepared> {
        let bytes = std::fs::read(self.file_path(doc, version))?;
        let name = self.document(doc)?.name;
        let extracted = extract::extract(&bytes, &name, &self.limits)?;
        drop(bytes);
        self.db().execute(
            "UPDATE versions SET format = ?3 WHERE doc_id = ?1 AND version = ?2",
            params![doc, version, extracted.format.as_str()],
        )?;
        let count = |s: &str| embedder.count_tokens(s);
        let chunks = chunk::chunk(&extracted.text, &self.settings.chunking, &count);
        if chunks.is_empty() {
            return Err(KbError::Extract(ExtractError::NoText {
                format: extracted.format,
            }));
        }
        let max = embedder.max_tokens();
        let inputs: Vec<String> = chunks
            .iter()
            .map(|c| embedding_input(&c.heading, &c.text, c.tokens, max, &count))
            .collect();
        let vectors = self.known_vectors(&inputs)?;
        let prepared = Prepared {
            job: 0,
            chunks,
            inputs,
            vectors,
        };
        self.set_progress(doc, version, prepared.progress())?;
        Ok(prepared)
    }

    /// The vectors of inputs embedded before (by a live chunk of any
    /// document, with this knowledge base's model), so a new version that
    /// changes a few passages, or the same text under another name, is
    /// embedded (and charged) only for what is new.
    fn known_vectors(&self, inputs: &[String]) -> Result<Vec<Option<Vec<f32>>>> {
        let db = self.db();
        let mut stmt =
            db.prepare_cached("SELECT vector FROM chunks WHERE input_hash = ?1 LIMIT 1")?;
        let mut out = Vec::with_capacity(inputs.len());
        for input in inputs {
            let found = stmt
                .query_row(params![input_hash(input)], |r| r.get::<_, Vec<u8>>(0))
                .optional()?
                .map(|b| vector_from_bytes(&b))
                .filter(|v| v.len() == self.settings.dimensions);
            out.push(found);
        }
        Ok(out)
    }

    /// Makes fully embedded versions their documents' searchable ones, all
    /// in one commit. Versions superseded or deleted meanwhile are skipped.
    fn go_live(&self, jobs: &[(String, i64)], ready: &[Prepared]) -> Result<Vec<(usize, Status)>> {
        let _commit = self.commit.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = Vec::new();
        let mut live_now = Vec::new();
        for d in ready {
            let (doc, version) = &jobs[d.job];
            if self.is_current(doc, *version)? {
                live_now.push((d, self.document(doc)?));
            } else {
                out.push((d.job, Status::Superseded));
            }
        }
        if live_now.is_empty() {
            return Ok(out);
        }
        let mut ids: Vec<Vec<u64>> = Vec::with_capacity(live_now.len());
        {
            let mut db = self.db();
            let tx = db.transaction()?;
            let now = now_ms();
            {
                let mut insert = tx.prepare(
                    "INSERT INTO chunks (doc_id, version, ord, start_char, end_char, heading, text, tokens, vector, input_hash)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                )?;
                for (d, _) in &live_now {
                    let (doc, version) = &jobs[d.job];
                    tx.execute("DELETE FROM chunks WHERE doc_id = ?1", params![doc])?;
                    let mut these = Vec::with_capacity(d.chunks.len());
                    for (i, ((c, v), input)) in
                        d.chunks.iter().zip(d.vectors()).zip(&d.inputs).enumerate()
                    {
                        insert.execute(params![
                            doc,
                            version,
                            i as i64,
                            c.start as i64,
                            c.end as i64,
                            c.heading,
                            c.text,
                            c.tokens as i64,
                            vector_bytes(v),
                            input_hash(input)
                        ])?;
                        these.push(tx.last_insert_rowid() as u64);
                    }
                    ids.push(these);
                    let tokens: i64 = d.chunks.iter().map(|c| c.tokens as i64).sum();
                    // The version stays `ingesting` until the full-text
                    // index has it too; a crash in between is finished by
                    // the next open.
                    tx.execute(
                        "UPDATE versions SET chunks = ?3, tokens = ?4, error_code = NULL, error = NULL
                         WHERE doc_id = ?1 AND version = ?2",
                        params![doc, version, d.chunks.len() as i64, tokens],
                    )?;
                    tx.execute(
                        "UPDATE documents SET live_version = ?2, updated_ms = ?3 WHERE id = ?1",
                        params![doc, version, now],
                    )?;
                }
            }
            tx.commit()?;
        }
        // The full-text index and the live map follow the database.
        let versions: Vec<String> = live_now
            .iter()
            .map(|(d, _)| doc_version(&jobs[d.job].0, jobs[d.job].1))
            .collect();
        let metadata: Vec<Vec<(String, String)>> = live_now
            .iter()
            .map(|(_, info)| sorted_metadata(&info.metadata))
            .collect();
        let old: Vec<String> = live_now
            .iter()
            .filter_map(|(d, info)| info.live_version.map(|v| doc_version(&jobs[d.job].0, v)))
            .collect();
        let mut indexed = Vec::new();
        for (n, (d, info)) in live_now.iter().enumerate() {
            for (&id, text) in ids[n].iter().zip(&d.inputs) {
                indexed.push(IndexedChunk {
                    id,
                    doc_version: &versions[n],
                    groups: &info.groups,
                    metadata: &metadata[n],
                    text,
                });
            }
        }
        {
            let mut live = self.live.write().unwrap_or_else(PoisonError::into_inner);
            for (n, (d, info)) in live_now.iter().enumerate() {
                let doc = &jobs[d.job].0;
                live.remove_doc(doc);
                for (&id, v) in ids[n].iter().zip(d.vectors()) {
                    live.vectors.insert(id, v).map_err(KbError::Storage)?;
                    live.chunk_doc.insert(id, doc.clone());
                }
                live.docs.insert(
                    doc.clone(),
                    Access {
                        version: jobs[d.job].1,
                        groups: info.groups.clone(),
                        metadata: metadata[n].clone(),
                        chunk_ids: ids[n].clone(),
                    },
                );
            }
        }
        let remove: Vec<&str> = old
            .iter()
            .chain(versions.iter())
            .map(String::as_str)
            .collect();
        // If this fails the database already says the versions are live; the
        // next open re-adds them to the full-text index. Until then they are
        // found by vector search only.
        if let Err(e) = self.fulltext.replace(&remove, &indexed) {
            tracing::error!(kb = %self.settings.id, error = %e, "full-text update failed; it is redone when the knowledge base next opens");
        }
        self.save_vector_graph();
        let live_versions: Vec<(&str, i64)> = live_now
            .iter()
            .map(|(d, _)| (jobs[d.job].0.as_str(), jobs[d.job].1))
            .collect();
        self.mark_ready(&live_versions)?;
        for (d, info) in &live_now {
            if let Some(v) = info.live_version {
                let _ = std::fs::remove_file(self.file_path(&jobs[d.job].0, v));
            }
            out.push((d.job, Status::Ready));
        }
        Ok(out)
    }
}

/// What is embedded and full-text indexed for a chunk: its heading path and
/// its text, the heading dropped when both do not fit the model.
fn embedding_input(
    heading: &str,
    text: &str,
    text_tokens: usize,
    max: usize,
    count: &dyn Fn(&str) -> usize,
) -> String {
    if heading.is_empty() {
        return text.to_string();
    }
    let with = format!("{heading}\n{text}");
    if text_tokens + count(heading) <= max {
        with
    } else {
        text.to_string()
    }
}

/// A version between extraction and going live.
struct Prepared {
    /// Index into the jobs being ingested.
    job: usize,
    chunks: Vec<chunk::Chunk>,
    /// What is embedded and full-text indexed per chunk.
    inputs: Vec<String>,
    /// Per chunk, once known (reused, or embedded now).
    vectors: Vec<Option<Vec<f32>>>,
}

impl Prepared {
    fn is_complete(&self) -> bool {
        self.vectors.iter().all(Option::is_some)
    }

    fn progress(&self) -> Progress {
        Progress {
            done: self.vectors.iter().filter(|v| v.is_some()).count() as i64,
            total: self.chunks.len() as i64,
        }
    }

    /// The vectors of a complete version.
    fn vectors(&self) -> impl Iterator<Item = &Vec<f32>> {
        self.vectors.iter().flatten()
    }
}
