#!/usr/bin/env python3
"""Retrieval quality of Kiln's knowledge bases on the Vaswani (NPL) test
collection: BM25, vector and hybrid search through the HTTP API, fusion
settings tuned on half of the queries and scored on the other half, and
Kiln's BM25 cross-checked against the `bm25s` package on the same documents.
See bench/README.md for the method.

    cargo build --release -p kiln-server
    python3 bench/rag_eval.py --limit-docs 1500                 # quick: ~1/8 of the corpus
    python3 bench/rag_eval.py --reuse-dir /tmp/rag_eval_full    # all 11,429 documents
    python3 bench/rag_eval.py --reuse-dir /tmp/rag_eval_full    # again: searches only

Runs with plain python3. The bm25s side runs in a subprocess of
~/.cache/kiln/eval-venv/bin/python, which the script creates when missing
(`python3 -m venv ~/.cache/kiln/eval-venv` and `pip install bm25s PyStemmer
numpy`); `--no-bm25s` skips it.
"""

import argparse
import http.client
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = Path("/work/shared/data/vaswani")
EVAL_VENV = Path.home() / ".cache" / "kiln" / "eval-venv"
LISTENING = re.compile(r"kiln listening on http://([^\s/:]+):(\d+)")
ADMIN_KEY = re.compile(r"created the platform admin API key \(shown only now, keep it safe\): (kiln-sk-\w+)")
KB_NAME = "vaswani"
CHUNKING = {"max_tokens": 192, "overlap_tokens": 32}
DEFAULT_FUSION = {"k": 60, "bm25_weight": 1.0, "vector_weight": 1.0, "candidates": 100}
GRID_K = [10, 30, 60, 100]
GRID_VECTOR_WEIGHT = [0.5, 1.0, 1.5, 2.0]
DEPTH = 100  # hits asked for per search: the server's most
TERMINAL = {"ready", "failed", "stopped", "superseded"}
# Kiln's analyzer (crates/kiln-rag/src/analyzer.rs): split at anything that is
# not a letter or digit, drop terms of 48 bytes or more, lowercase, stem.
WORD = re.compile(r"[^\W_]+")
MAX_TERM_BYTES = 48


# ---------------------------------------------------------------- the data

def read_docs(data: Path) -> list[tuple[str, str]]:
    """(DOCNO, text) in file order."""
    text = (data / "doc-text.trec").read_text()
    docs = re.findall(r"<DOC>\s*<DOCNO>\s*(\S+?)\s*</DOCNO>(.*?)</DOC>", text, re.S)
    return [(no, body.strip()) for no, body in docs]


def read_queries(data: Path) -> list[tuple[str, str]]:
    """(query id, text) in file order."""
    text = (data / "query-text.trec").read_text()
    found = re.findall(r"<top>\s*<num>\s*(\S+?)\s*</num>\s*<title>(.*?)</title>", text, re.S | re.I)
    return [(qid, " ".join(title.split())) for qid, title in found]


def read_qrels(data: Path) -> dict[str, set[str]]:
    """Query id -> the DOCNOs judged relevant (binary: any grade above 0)."""
    qrels: dict[str, set[str]] = {}
    for line in (data / "qrels").read_text().splitlines():
        parts = line.split()
        if len(parts) == 4 and int(parts[3]) > 0:
            qrels.setdefault(parts[0], set()).add(parts[2])
    return qrels


# ---------------------------------------------------------------- metrics

def ndcg_at(ranking: list[str], relevant: set[str], k: int = 10) -> float:
    dcg = sum(1.0 / math.log2(i + 2) for i, d in enumerate(ranking[:k]) if d in relevant)
    ideal = sum(1.0 / math.log2(i + 2) for i in range(min(len(relevant), k)))
    return dcg / ideal


def recall_at(ranking: list[str], relevant: set[str], k: int) -> float:
    return len(relevant.intersection(ranking[:k])) / len(relevant)


def mrr_at(ranking: list[str], relevant: set[str], k: int = 10) -> float:
    for i, d in enumerate(ranking[:k]):
        if d in relevant:
            return 1.0 / (i + 1)
    return 0.0


METRICS = {
    "ndcg@10": lambda r, rel: ndcg_at(r, rel, 10),
    "recall@10": lambda r, rel: recall_at(r, rel, 10),
    "recall@100": lambda r, rel: recall_at(r, rel, 100),
    "mrr@10": lambda r, rel: mrr_at(r, rel, 10),
}


def evaluate(rankings: dict[str, list[str]], qrels: dict[str, set[str]]) -> dict:
    """Mean of each metric over the queries in `rankings`, and per query."""
    per_query = {q: {m: f(r, qrels[q]) for m, f in METRICS.items()} for q, r in rankings.items()}
    mean = {m: statistics.fmean(v[m] for v in per_query.values()) for m in METRICS}
    return {"mean": mean, "per_query": per_query}


def jaccard(a: list[str], b: list[str]) -> float:
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def spread(xs: list[float]) -> dict:
    return {"n": len(xs), "min": min(xs), "median": statistics.median(xs), "max": max(xs)}


# ---------------------------------------------------------------- the server

class ApiError(Exception):
    def __init__(self, status: int, body):
        self.status = status
        self.body = body
        message = body.get("error", {}).get("message") if isinstance(body, dict) else body
        super().__init__(f"HTTP {status}: {message}")


class Api:
    """JSON over one kept-alive HTTP connection, reopened after a failure."""

    def __init__(self, host: str, port: int, key: str):
        self.host, self.port = host, port
        self.headers = {"Authorization": f"Bearer {key}"}
        self.conn = None

    def call(self, method: str, path: str, body=None, raw: bytes | None = None):
        headers = dict(self.headers)
        payload = None
        if raw is not None:
            payload = raw
            headers["Content-Type"] = "application/octet-stream"
        elif body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=300)
            try:
                self.conn.request(method, path, body=payload, headers=headers)
                resp = self.conn.getresponse()
                data = resp.read()
                break
            except (OSError, http.client.HTTPException):
                self.conn.close()
                self.conn = None
                if attempt == 2:
                    raise
        try:
            parsed = json.loads(data) if data else None
        except ValueError:
            parsed = data.decode(errors="replace")
        if not 200 <= resp.status < 300:
            raise ApiError(resp.status, parsed)
        return resp.status, parsed


class Kiln:
    """`kiln serve` on port 0 with the embedding model, its output in a log."""

    def __init__(self, binary: Path, home: Path, workdir: Path, threads: int):
        self.log_path = workdir / "kiln.log"
        self.log = open(self.log_path, "a")
        cmd = [str(binary), "serve", "--port", "0", "--embedding-model", "all-minilm-l6-v2",
               "--database", str(workdir / "kiln.db"), "--kb-dir", str(workdir / "kb"),
               "--threads", str(threads)]
        self.proc = subprocess.Popen(cmd, env=dict(os.environ, KILN_HOME=str(home)),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.address = None
        self.admin_key = None
        self.ready = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        # Keep draining so the server never blocks on a full pipe.
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.write(line)
            self.log.flush()
            if m := ADMIN_KEY.search(line):
                self.admin_key = m.group(1)
            if self.address is None and (m := LISTENING.search(line)):
                self.address = (m.group(1), int(m.group(2)))
                self.ready.set()
        self.ready.set()

    def wait_listening(self, timeout: float = 180) -> tuple[str, int]:
        self.ready.wait(timeout)
        if self.address is None:
            self.stop()
            raise SystemExit(f"kiln serve did not start; its output:\n{self.tail()}")
        return self.address

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 30) -> str:
        return "".join(self.log_path.read_text(errors="replace").splitlines(True)[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def default_binary() -> Path:
    candidates = []
    if os.environ.get("CARGO_TARGET_DIR"):
        candidates.append(Path(os.environ["CARGO_TARGET_DIR"]) / "release" / "kiln")
    candidates += [REPO / "target" / "release" / "kiln", REPO / "target" / "debug" / "kiln"]
    return next((c for c in candidates if c.exists()), candidates[0])


# ---------------------------------------------------------------- ingestion

def find_or_create_kb(api: Api) -> str:
    try:
        return api.call("GET", f"/api/kbs/{KB_NAME}")[1]["id"]
    except ApiError as e:
        if e.status != 404:
            raise
    return api.call("POST", "/api/kbs", {"name": KB_NAME, "chunking": CHUNKING})[1]["id"]


def upload(api: Api, kb: str, docs: list[tuple[str, str]]) -> tuple[dict[str, str], list[dict]]:
    """Uploads every document; returns DOCNO -> document id and the refusals.
    A document whose bytes were already uploaded (a duplicate abstract, or a
    rerun after an interruption) gets the existing document's id."""
    ids: dict[str, str] = {}
    refused = []
    duplicates = 0
    t0 = time.monotonic()
    for i, (no, text) in enumerate(docs, 1):
        name = urllib.parse.quote(f"{no}.txt")
        try:
            status, body = api.call("POST", f"/api/kbs/{kb}/documents?name={name}", raw=text.encode())
        except ApiError as e:
            refused.append({"docno": no, "status": e.status, "error": e.body})
            continue
        ids[no] = body["id"]
        duplicates += bool(body.get("duplicate"))
        if i % 1000 == 0 or i == len(docs):
            print(f"  uploaded {i}/{len(docs)} ({duplicates} duplicates, {len(refused)} refused) "
                  f"in {time.monotonic() - t0:.0f}s", flush=True)
    return ids, refused


def all_documents(api, kb: str) -> list[dict]:
    """Every document of a knowledge base, through the paged listing."""
    docs, after = [], None
    while True:
        path = f"/api/kbs/{kb}/documents?limit=1000" + (f"&after={after}" if after else "")
        page = api.call("GET", path)[1]
        docs += page["data"]
        if not page.get("has_more"):
            return docs
        after = page["last_id"]


def wait_ingested(api: Api, kiln: Kiln, kb: str, expected: set[str], timeout_s: float) -> list[dict]:
    """Polls until every expected document is in a final state; returns their records."""
    t0 = time.monotonic()
    last_print = 0.0
    interval = 2.0 if len(expected) <= 2000 else 10.0
    while True:
        if not kiln.alive():
            raise SystemExit(f"kiln serve exited during ingestion; its output:\n{kiln.tail()}")
        docs = [d for d in all_documents(api, kb) if d["id"] in expected]
        done = [d for d in docs if d["status"] in TERMINAL]
        now = time.monotonic()
        if len(done) == len(expected) or now - last_print >= 30:
            ready = sum(d["status"] == "ready" for d in docs)
            chunks = sum(d["chunks"] for d in docs if d["status"] == "ready")
            elapsed = now - t0
            eta = ""
            if 0 < len(done) < len(expected) and elapsed > 20:
                eta = f", about {elapsed / len(done) * (len(expected) - len(done)) / 60:.0f} min left"
            print(f"  ingested {ready}/{len(expected)} documents ({len(done) - ready} failed), "
                  f"{chunks} chunks, {elapsed:.0f}s{eta}", flush=True)
            last_print = now
        if len(done) == len(expected):
            return docs
        if now - t0 > timeout_s:
            raise SystemExit(f"ingestion not finished after {timeout_s:.0f}s")
        time.sleep(interval)


def ingest(api: Api, kiln: Kiln, docs: list[tuple[str, str]], state: dict, timeout_s: float,
           save) -> dict:
    """Uploads and waits; fills `state` with the ids and the ingestion figures."""
    kb = state["kb"]
    if state.get("ingestion", {}).get("complete"):
        print(f"reusing knowledge base {kb}: {len(state['ids'])} documents ingested before")
        return state
    print(f"ingesting {len(docs)} documents into {kb} (chunking {CHUNKING})", flush=True)
    t0 = time.monotonic()
    load_start = os.getloadavg()[0]
    ids, refused = upload(api, kb, docs)
    upload_s = time.monotonic() - t0
    state["ids"] = ids
    save()
    records = wait_ingested(api, kiln, kb, set(ids.values()), timeout_s)
    wall_s = time.monotonic() - t0
    failed = [{"id": d["id"], "name": d["name"], "status": d["status"], "error_code": d.get("error_code"),
               "error": d.get("error")} for d in records if d["status"] != "ready"]
    chunks = sum(d["chunks"] for d in records if d["status"] == "ready")
    # The server's own clock: first document created to last one finished.
    server_s = (max(d["updated_ms"] for d in records) - min(d["created_ms"] for d in records)) / 1000
    state["ingestion"] = {
        "complete": True,
        "documents_uploaded": len(docs),
        "distinct_documents": len(set(ids.values())),
        "duplicates": len(ids) - len(set(ids.values())),
        "refused_uploads": refused,
        "failed": failed,
        "chunks": chunks,
        "multi_chunk_documents": sum(d["chunks"] > 1 for d in records),
        "upload_s": upload_s,
        "wall_s": wall_s,
        "server_s": server_s,
        "chunks_per_s": chunks / wall_s,
        "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
        "note": "wall_s is measured from the first upload to the poll that saw every document "
                "finished (upload included); server_s from the first document's created_ms to the "
                "last one's updated_ms",
    }
    save()
    return state


# ---------------------------------------------------------------- searching

def search_all(api: Api, kb: str, queries: list[tuple[str, str]], mode: str, fusion=None,
               docnos_of: dict[str, list[str]] | None = None):
    """Document rankings (DOCNOs, best first) per query and client-side
    latencies in ms. A document's place is that of its best chunk; a document
    that stands for several DOCNOs (identical abstracts) puts them all there."""
    rankings, latencies, distinct = {}, [], []
    for qid, text in queries:
        body = {"query": text, "k": DEPTH, "mode": mode}
        if fusion is not None:
            body["fusion"] = fusion
        t0 = time.perf_counter()
        hits = api.call("POST", f"/api/kbs/{kb}/search", body)[1]["data"]
        latencies.append((time.perf_counter() - t0) * 1000)
        seen, ranking = set(), []
        for h in hits:
            if h["document_id"] in seen:
                continue
            seen.add(h["document_id"])
            ranking.extend(docnos_of.get(h["document_id"], []))
        rankings[qid] = ranking[:DEPTH]
        distinct.append(len(seen))
    return rankings, latencies, distinct


# ---------------------------------------------------------------- bm25s

def analyze(text: str, stem) -> list[str]:
    words = [w for w in WORD.findall(text) if len(w.encode()) < MAX_TERM_BYTES]
    return stem([w.lower() for w in words])


def bm25s_worker(job_path: str) -> None:
    """Runs inside the eval venv: indexes the documents with bm25s (Lucene's
    BM25, k1 1.2, b 0.75, no stopwords, Kiln's analyzer) and prints each
    query's ranking as JSON."""
    import bm25s
    import numpy as np
    import Stemmer

    job = json.loads(Path(job_path).read_text())
    stemmer = Stemmer.Stemmer("english")
    t0 = time.perf_counter()
    docnos = [no for no, _ in job["docs"]]
    retriever = bm25s.BM25(method="lucene", k1=1.2, b=0.75)
    retriever.index([analyze(text, stemmer.stemWords) for _, text in job["docs"]], show_progress=False)
    index_s = time.perf_counter() - t0
    rankings = {}
    for qid, text in job["queries"]:
        terms = [t for t in analyze(text, stemmer.stemWords) if t in retriever.vocab_dict]
        if not terms:
            rankings[qid] = []
            continue
        scores = retriever.get_scores(terms)
        # Stable on ties (file order); only matching documents, as tantivy.
        order = np.argsort(-scores, kind="stable")[: job["k"]]
        rankings[qid] = [docnos[i] for i in order if scores[i] > 0]
    json.dump({"rankings": rankings, "index_s": index_s, "version": bm25s.__version__}, sys.stdout)


def ensure_venv(python: Path) -> None:
    if python.exists():
        return
    venv = python.parent.parent
    print(f"creating {venv} for the bm25s cross-check (python3 -m venv; pip install bm25s PyStemmer numpy)")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "bm25s", "PyStemmer", "numpy"], check=True)


def run_bm25s(python: Path, docs: list[tuple[str, str]], queries: list[tuple[str, str]], workdir: Path):
    ensure_venv(python)
    job = workdir / "bm25s-job.json"
    job.write_text(json.dumps({"docs": docs, "queries": queries, "k": DEPTH}))
    done = subprocess.run([str(python), __file__, "--bm25s-worker", str(job)],
                          capture_output=True, text=True)
    job.unlink()
    if done.returncode != 0:
        raise RuntimeError(f"bm25s worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def cross_check(python: Path, docs, scoring, qrels, workdir: Path, kiln_r: dict, kiln_ev: dict):
    """bm25s on the same documents and scoring queries, compared with Kiln's
    BM25: (system name, metrics, rankings, comparison)."""
    out = run_bm25s(python, docs, scoring, workdir)
    r = out["rankings"]
    ev = evaluate(r, qrels)
    jac = {q: jaccard(kiln_r[q][:10], r[q][:10]) for q, _ in scoring}
    diffs = [abs(kiln_ev["per_query"][q]["ndcg@10"] - ev["per_query"][q]["ndcg@10"]) for q, _ in scoring]
    cross = {
        "bm25s_version": out["version"],
        "bm25s_index_s": out["index_s"],
        "documents": len(docs),
        "ndcg@10_kiln": kiln_ev["mean"]["ndcg@10"],
        "ndcg@10_bm25s": ev["mean"]["ndcg@10"],
        "mean_top10_jaccard": statistics.fmean(jac.values()),
        "queries_with_identical_top10_set": sum(j == 1.0 for j in jac.values()),
        "queries_with_identical_top10_order": sum(kiln_r[q][:10] == r[q][:10] for q, _ in scoring),
        "mean_abs_ndcg@10_difference": statistics.fmean(diffs),
        "max_abs_ndcg@10_difference": max(diffs),
        "top10_jaccard_per_query": jac,
        "top10_only_in_kiln": {q: sorted(set(kiln_r[q][:10]) - set(r[q][:10]), key=int)
                               for q, _ in scoring if jac[q] < 1},
        "top10_only_in_bm25s": {q: sorted(set(r[q][:10]) - set(kiln_r[q][:10]), key=int)
                                for q, _ in scoring if jac[q] < 1},
    }
    return f"bm25s {out['version']} (lucene k1=1.2 b=0.75)", ev, r, cross


# ---------------------------------------------------------------- the run

def fusion_label(f: dict) -> str:
    return f"k={f['k']:g} w={f['bm25_weight']:g}/{f['vector_weight']:g} c={f['candidates']}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kiln-bin", type=Path, default=default_binary())
    ap.add_argument("--kiln-home", type=Path,
                    default=Path(os.environ.get("KILN_TEST_HOME", Path.home() / ".cache" / "kiln" / "home")),
                    help="KILN_HOME with the embedding model (default $KILN_TEST_HOME or ~/.cache/kiln/home)")
    ap.add_argument("--data", type=Path, default=DATA, help="the Vaswani collection in TREC format")
    ap.add_argument("--limit-docs", type=int, default=0,
                    help="index only the first N documents; relevance judgements are cut to them")
    ap.add_argument("--reuse-dir", type=Path,
                    help="keep the database and knowledge base here; a later run with the same "
                         "directory skips ingestion (default: a temporary directory, removed)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ingest-timeout", type=float, default=6 * 3600, help="seconds")
    ap.add_argument("--bm25s-python", type=Path, default=EVAL_VENV / "bin" / "python")
    ap.add_argument("--no-bm25s", action="store_true", help="skip the bm25s cross-check")
    ap.add_argument("--out", type=Path, default=Path("/tmp/rag_eval.json"))
    ap.add_argument("--bm25s-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bm25s_worker:
        bm25s_worker(args.bm25s_worker)
        return
    if not args.kiln_bin.exists():
        raise SystemExit(f"{args.kiln_bin} not found: `cargo build --release -p kiln-server` or pass --kiln-bin")

    all_docs = read_docs(args.data)
    docs = all_docs[: args.limit_docs] if args.limit_docs else all_docs
    included = {no for no, _ in docs}
    queries = read_queries(args.data)
    all_qrels = read_qrels(args.data)
    qrels = {q: rel & included for q, rel in all_qrels.items() if rel & included}
    judged = [(q, t) for q, t in queries if q in qrels]
    tuning = [(q, t) for q, t in judged if int(q) % 2 == 1]
    scoring = [(q, t) for q, t in judged if int(q) % 2 == 0]
    notes = [f"{len(docs)} of {len(all_docs)} documents indexed"
             + (f" (--limit-docs {args.limit_docs}: the first {args.limit_docs} in file order; relevance "
                f"judgements cut to them, {len(queries) - len(judged)} queries left without any are dropped)"
                if args.limit_docs else ""),
             f"queries split by id: odd ids tune ({len(tuning)}), even ids score ({len(scoring)})"]
    for n in notes:
        print(n)
    load = {"start": os.getloadavg()[0]}
    if load["start"] > 1.5:
        print(f"warning: load average {load['start']:.1f} at start; ingestion rate and latencies "
              "will be slower than on an idle machine (rankings are not affected)")

    if args.reuse_dir:
        workdir = args.reuse_dir
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        workdir = Path(tempfile.mkdtemp(prefix="rag-eval-"))
    state_path = workdir / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    if state and state.get("limit_docs") != args.limit_docs:
        held = f"--limit-docs {state['limit_docs']}" if state.get("limit_docs") else "all documents"
        raise SystemExit(f"{workdir} holds a run with {held}; use another --reuse-dir")

    def save():
        state_path.write_text(json.dumps(state, indent=1))

    kiln = Kiln(args.kiln_bin, args.kiln_home, workdir, args.threads)
    try:
        host, port = kiln.wait_listening()
        if kiln.admin_key:
            state = {"limit_docs": args.limit_docs, "admin_key": kiln.admin_key}
            save()
        elif "admin_key" not in state:
            raise SystemExit(f"{workdir} has a database but no state.json with its admin key; remove it")
        print(f"kiln serve at http://{host}:{port} ({args.kiln_bin}), log {kiln.log_path}")
        api = Api(host, port, state["admin_key"])
        state["kb"] = find_or_create_kb(api)
        save()
        ingest(api, kiln, docs, state, args.ingest_timeout, save)
        ing = state["ingestion"]
        print(f"ingestion: {ing['distinct_documents']} documents ({ing['duplicates']} duplicate uploads), "
              f"{ing['chunks']} chunks, {ing['wall_s']:.0f}s wall ({ing['upload_s']:.0f}s uploading), "
              f"{ing['chunks_per_s']:.1f} chunks/s; {len(ing['failed'])} failed, "
              f"{len(ing['refused_uploads'])} refused")
        kb = state["kb"]
        failed_ids = {f["id"] for f in ing["failed"]}
        docnos_of: dict[str, list[str]] = {}
        for no, doc_id in state["ids"].items():
            if doc_id not in failed_ids:
                docnos_of.setdefault(doc_id, []).append(no)
        for nos in docnos_of.values():
            nos.sort(key=int)
        indexed = {no for nos in docnos_of.values() for no in nos}

        load["searches_start"] = os.getloadavg()[0]
        api.call("POST", f"/api/kbs/{kb}/search", {"query": "warm up", "k": 10, "mode": "hybrid"})

        # Tuning: the hybrid grid on the odd queries.
        print(f"tuning hybrid fusion on {len(tuning)} queries ({len(GRID_K) * len(GRID_VECTOR_WEIGHT)} settings)")
        grid = []
        for k in GRID_K:
            for w in GRID_VECTOR_WEIGHT:
                f = {"k": k, "bm25_weight": 1.0, "vector_weight": w, "candidates": 100}
                r, _, _ = search_all(api, kb, tuning, "hybrid", f, docnos_of)
                grid.append({"fusion": f, "tuning": evaluate(r, qrels)["mean"]})
                print(f"  {fusion_label(f):28} nDCG@10 {grid[-1]['tuning']['ndcg@10']:.4f}", flush=True)
        best = max(grid, key=lambda g: g["tuning"]["ndcg@10"])  # first in grid order on a tie
        tuned = best["fusion"]
        tuning_sides = {}
        for mode in ("bm25", "vector"):
            r, _, _ = search_all(api, kb, tuning, mode, None, docnos_of)
            tuning_sides[mode] = evaluate(r, qrels)["mean"]
        print(f"chosen: {fusion_label(tuned)} (tuning nDCG@10 {best['tuning']['ndcg@10']:.4f}; "
              f"bm25 alone {tuning_sides['bm25']['ndcg@10']:.4f}, vector alone {tuning_sides['vector']['ndcg@10']:.4f})")

        # Scoring: the even queries.
        systems = {
            "kiln bm25": ("bm25", None),
            "kiln vector": ("vector", None),
            f"kiln hybrid default ({fusion_label(DEFAULT_FUSION)})": ("hybrid", DEFAULT_FUSION),
            f"kiln hybrid tuned ({fusion_label(tuned)})": ("hybrid", tuned),
        }
        results, rankings_of, latency = {}, {}, {}
        for name, (mode, f) in systems.items():
            r, lat, distinct = search_all(api, kb, scoring, mode, f, docnos_of)
            results[name] = evaluate(r, qrels)
            results[name]["mean_distinct_documents_in_100_hits"] = statistics.fmean(distinct)
            rankings_of[name] = r
            latency[name] = spread(lat)
        load["searches_end"] = os.getloadavg()[0]
        if not kiln.alive():
            raise SystemExit(f"kiln serve exited; its output:\n{kiln.tail()}")
    finally:
        kiln.stop()

    cross = None
    if not args.no_bm25s:
        same_docs = [(no, text) for no, text in docs if no in indexed]
        print(f"bm25s cross-check: indexing the same {len(same_docs)} documents")
        try:
            name, ev, r, cross = cross_check(args.bm25s_python, same_docs, scoring, qrels, workdir,
                                             rankings_of["kiln bm25"], results["kiln bm25"])
            results[name] = ev
            rankings_of[name] = r
        except (RuntimeError, OSError, subprocess.CalledProcessError, ValueError) as e:
            print(f"warning: the bm25s cross-check failed: {e}")
            cross = {"error": str(e)}

    print()
    print("\n".join(notes))
    print(f"scoring set: {len(scoring)} queries (even ids), "
          f"{sum(len(qrels[q]) for q, _ in scoring)} relevant documents")
    width = max(len(n) for n in results)
    print(f"{'system':{width}}  nDCG@10  R@10    R@100   MRR@10")
    for name, res in results.items():
        m = res["mean"]
        print(f"{name:{width}}  {m['ndcg@10']:.4f}   {m['recall@10']:.4f}  {m['recall@100']:.4f}  {m['mrr@10']:.4f}")
    print(f"\nsearch latency seen by the client, ms (scoring queries, k=100; load average "
          f"{load['searches_start']:.1f} before the searches, {load['searches_end']:.1f} after)")
    for name, s in latency.items():
        print(f"  {name:{width}}  min {s['min']:7.1f}  median {s['median']:7.1f}  max {s['max']:7.1f}")
    if cross and "error" not in cross:
        print(f"\nbm25s cross-check: nDCG@10 Kiln {cross['ndcg@10_kiln']:.4f} vs bm25s {cross['ndcg@10_bm25s']:.4f} "
              f"(difference {cross['ndcg@10_kiln'] - cross['ndcg@10_bm25s']:+.4f}); "
              f"mean top-10 Jaccard {cross['mean_top10_jaccard']:.3f}; identical top-10 sets in "
              f"{cross['queries_with_identical_top10_set']}/{len(scoring)} queries, identical order in "
              f"{cross['queries_with_identical_top10_order']}; mean |ΔnDCG@10| per query "
              f"{cross['mean_abs_ndcg@10_difference']:.4f} (max {cross['max_abs_ndcg@10_difference']:.4f})")

    report = {
        "kiln_bin": str(args.kiln_bin),
        "kiln_bin_mtime": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(args.kiln_bin.stat().st_mtime)),
        "data": str(args.data),
        "limit_docs": args.limit_docs or None,
        "notes": notes,
        "documents": len(docs),
        "documents_indexed": len(indexed),
        "queries": {"total": len(queries), "judged": len(judged),
                    "tuning": [q for q, _ in tuning], "scoring": [q for q, _ in scoring]},
        "chunking": CHUNKING,
        "depth": DEPTH,
        "ingestion": state["ingestion"],
        "tuning": {"objective": "mean nDCG@10 on the tuning queries", "grid": grid, "chosen": tuned,
                   "bm25_alone": tuning_sides["bm25"], "vector_alone": tuning_sides["vector"]},
        "scoring": results,
        "latency_ms": latency,
        "bm25s_cross_check": cross,
        "rankings": rankings_of,
        "reuse_dir": str(args.reuse_dir) if args.reuse_dir else None,
        "load_average_1min": load,
    }
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.out}")
    if not args.reuse_dir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
