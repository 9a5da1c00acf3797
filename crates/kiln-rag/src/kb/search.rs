//! Search: BM25 and vector candidates, checked against the live map and
//! fused.

use super::*;

impl KnowledgeBase {
    /// Searches the knowledge base. Vector and hybrid modes embed the query
    /// through `embedder`.
    pub fn search(&self, q: &Query, embedder: Option<&dyn Embedder>) -> Result<Vec<Hit>> {
        self.search_reranked(q, embedder, None)
    }

    /// [`KnowledgeBase::search`], then, with a reranker, the best
    /// [`retrieve::RERANK_CANDIDATES`] fused hits reordered by its scores.
    pub fn search_reranked(
        &self,
        q: &Query,
        embedder: Option<&dyn Embedder>,
        reranker: Option<&dyn retrieve::Reranker>,
    ) -> Result<Vec<Hit>> {
        if q.k == 0 || q.text.trim().is_empty() {
            return Ok(Vec::new());
        }
        let candidates = q.fusion.candidates.max(q.k);
        let bm25 = if q.mode != Mode::Vector {
            let raw = self.fulltext.search(&q.text, &q.filter, candidates)?;
            let live = self.live.read().unwrap_or_else(PoisonError::into_inner);
            raw.into_iter()
                .filter(|(id, _)| live.allows(*id, &q.filter))
                .collect()
        } else {
            Vec::new()
        };
        let vector = if q.mode != Mode::Bm25 {
            let embedder = embedder.ok_or_else(|| {
                KbError::Invalid("vector search needs the knowledge base's embedding model".into())
            })?;
            if embedder.model() != self.settings.embedding_model {
                return Err(KbError::WrongModel {
                    built: self.settings.embedding_model.clone(),
                    given: embedder.model().to_string(),
                });
            }
            let max = embedder.max_tokens();
            if embedder.count_tokens(&q.text) > max {
                return Err(KbError::Invalid(format!(
                    "the query is longer than the embedding model's limit of {max} tokens"
                )));
            }
            let v = embedder
                .embed(std::slice::from_ref(&q.text))?
                .pop()
                .ok_or_else(|| KbError::Embed(EmbedError::Failed("no vector returned".into())))?;
            let live = self.live.read().unwrap_or_else(PoisonError::into_inner);
            live.vectors
                .search(&v, candidates, &|id| live.allows(id, &q.filter))
        } else {
            Vec::new()
        };
        let limit = match reranker {
            Some(_) => q.k.max(retrieve::RERANK_CANDIDATES),
            None => q.k,
        };
        let fused = retrieve::fuse(&bm25, &vector, &q.fusion, limit);
        let mut hits = Vec::with_capacity(fused.len());
        let db = self.db();
        let mut stmt = db.prepare(
            "SELECT c.doc_id, d.name, c.version, c.heading, c.text, c.start_char, c.end_char
             FROM chunks c JOIN documents d ON d.id = c.doc_id AND d.live_version = c.version
             WHERE c.id = ?1",
        )?;
        for f in fused {
            let row = stmt
                .query_row(params![f.id as i64], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, String>(4)?,
                        r.get::<_, i64>(5)?,
                        r.get::<_, i64>(6)?,
                    ))
                })
                .optional()?;
            let Some((document_id, document_name, version, heading, text, start, end)) = row else {
                continue;
            };
            let score = match q.mode {
                Mode::Hybrid => f.score,
                Mode::Bm25 => f.bm25.map_or(0.0, |b| b.1),
                Mode::Vector => f.vector.map_or(0.0, |v| v.1),
            };
            hits.push(Hit {
                chunk_id: f.id,
                document_id,
                document_name,
                version,
                heading,
                text,
                start: start as usize,
                end: end as usize,
                score,
                bm25: f.bm25,
                vector: f.vector,
                rerank: None,
            });
        }
        if let Some(r) = reranker.filter(|_| !hits.is_empty()) {
            let passages: Vec<&str> = hits.iter().map(|h| h.text.as_str()).collect();
            let scores = r.rerank(&q.text, &passages)?;
            if scores.len() != hits.len() || scores.iter().any(|s| !s.is_finite()) {
                return Err(KbError::Embed(EmbedError::Failed(format!(
                    "the reranker `{}` returned {} scores for {} passages",
                    r.model(),
                    scores.len(),
                    hits.len()
                ))));
            }
            for (h, s) in hits.iter_mut().zip(scores) {
                h.rerank = Some(s);
                h.score = s;
            }
            hits.sort_by(|a, b| {
                b.score
                    .total_cmp(&a.score)
                    .then(a.chunk_id.cmp(&b.chunk_id))
            });
        }
        hits.truncate(q.k);
        Ok(hits)
    }

    /// Live documents and chunks, and the bytes the indexes take.
    pub fn stats(&self) -> Stats {
        let live = self.live.read().unwrap_or_else(PoisonError::into_inner);
        Stats {
            documents: live.docs.len(),
            chunks: live.vectors.len(),
            vector_memory_bytes: live.vectors.memory_bytes(),
            disk_bytes: dir_size(&self.dir),
        }
    }
}
