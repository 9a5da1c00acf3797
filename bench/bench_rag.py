#!/usr/bin/env python3
"""Knowledge-base performance: ingestion throughput (chunks/s, end to end) and
search latency p50/p95 of Kiln's knowledge bases against a peer pipeline
(tantivy BM25 + hnswlib HNSW + reciprocal rank fusion in Python) on the same
passages and queries, in the same run, at 10k and 100k chunks. Prints
min / median / max over rounds, the Kiln / peer ratios, and memory and disk
per 100k chunks. See bench/README.md.

    python3 bench/bench_rag.py                          # 10k and 100k chunks
    python3 bench/bench_rag.py --scales 10000 --rounds 3 --out /tmp/bench_rag.json
    python3 bench/bench_rag.py --reuse /tmp/bench_rag   # keep Kiln's KBs; later runs skip its ingestion

Needs a release build (`cargo build --release -p kiln-server`). The peer runs
in `~/.cache/kiln/bench-venv` (`--venv`), which the script creates when it is
missing (tantivy, hnswlib, numpy, tokenizers); it re-runs itself there.
"""

import argparse
import base64
import collections
import gc
import hashlib
import http.client
import json
import math
import os
import queue
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PEER_PACKAGES = ["tantivy", "hnswlib", "numpy", "tokenizers"]
MODEL = "all-minilm-l6-v2"
# Chunks of at most the model's limit (256 with [CLS] and [SEP]), so every
# passage that fits the model is one chunk; longer passages are left out.
CHUNK_MAX_TOKENS = 254
EMBED_BATCH = 32  # what Kiln's own ingestion sends per model call
CANDIDATES = 100  # per side before fusion, Kiln's default
RRF_K = 60.0
HNSW = {"M": 16, "ef_construction": 100, "ef": 100}  # Kiln's graph: m 16, ef_construction 100, ef_search 96
MODES = ["hybrid", "bm25", "vector"]
LISTENING = re.compile(r"kiln listening on (http://[^\s]+)")
ADMIN_KEY = re.compile(r"created the platform admin API key \(shown only now, keep it safe\): (kiln-sk-\w+)")


# ---------------------------------------------------------------- utilities

def log(msg: str) -> None:
    print(msg, flush=True)


def loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def proc_kib(pid: int, field: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def disk_bytes(path: Path) -> int:
    """Allocated size of everything under `path` (what `du` counts)."""
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_blocks * 512
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def percentile(xs: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(xs)
    return s[max(0, math.ceil(p * len(s)) - 1)]


def summary(xs: list[float]) -> dict:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs), "rounds": xs}


def mib(b: float) -> float:
    return b / 2**20


class Http:
    """One keep-alive HTTP/1.1 connection per thread to one server."""

    def __init__(self, url: str, key: str):
        host, port = url.removeprefix("http://").rstrip("/").split(":")
        self.host, self.port, self.key = host, int(port), key
        self.local = threading.local()

    def _conn(self) -> http.client.HTTPConnection:
        c = getattr(self.local, "conn", None)
        if c is None:
            c = http.client.HTTPConnection(self.host, self.port, timeout=600)
            self.local.conn = c
        return c

    def call(self, method: str, path: str, body=None, raw: bool = False) -> tuple[int, dict]:
        data = body if raw else (json.dumps(body).encode() if body is not None else None)
        headers = {"Authorization": f"Bearer {self.key}"}
        if data is not None:
            headers["Content-Type"] = "application/octet-stream" if raw else "application/json"
        for attempt in range(2):
            c = self._conn()
            try:
                c.request(method, path, data, headers)
                r = c.getresponse()
                payload = r.read()
                break
            except (http.client.HTTPException, ConnectionError):
                c.close()
                self.local.conn = None
                if attempt:
                    raise
        try:
            return r.status, json.loads(payload) if payload else {}
        except ValueError:
            return r.status, {"raw": payload[:300].decode(errors="replace")}

    def embed(self, texts: list[str]):
        """Kiln's /v1/embeddings, base64 float32 (the cheapest form to parse)."""
        import numpy as np
        status, body = self.call("POST", "/v1/embeddings",
                                 {"model": MODEL, "input": texts, "encoding_format": "base64"})
        if status != 200:
            raise RuntimeError(f"/v1/embeddings: HTTP {status}: {str(body)[:300]}")
        rows = sorted(body["data"], key=lambda d: d["index"])
        return np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in rows])


# ------------------------------------------------------------------- data

def normalize(text: str) -> str:
    return " ".join(text.split())


def real_passages(data: Path) -> tuple[list[str], int]:
    """Vaswani abstracts in file order, then PubMedQA contexts; exact
    duplicates once. Returns (passages, count of Vaswani ones)."""
    trec = (data / "vaswani" / "doc-text.trec").read_text()
    vaswani = [normalize(t) for t in re.findall(r"<DOC>\s*<DOCNO>\s*\d+\s*</DOCNO>(.*?)</DOC>", trec, re.S)]
    pubmed = json.loads((data / "pubmedqa" / "ori_pqal.json").read_text())
    contexts = [normalize(c) for item in pubmed.values() for c in item["CONTEXTS"]]
    seen: set[str] = set()
    out: list[str] = []
    n_vaswani = 0
    for i, t in enumerate(vaswani + contexts):
        if t and t not in seen:
            seen.add(t)
            out.append(t)
            n_vaswani += i < len(vaswani)
    return out, n_vaswani


def queries(data: Path, n_pubmed: int) -> list[str]:
    trec = (data / "vaswani" / "query-text.trec").read_text()
    vaswani = [normalize(t) for t in re.findall(r"<title>(.*?)</title>", trec, re.S)]
    pubmed = json.loads((data / "pubmedqa" / "ori_pqal.json").read_text())
    return vaswani + [normalize(item["QUESTION"]) for item in list(pubmed.values())[:n_pubmed]]


class TokenCounter:
    """Tokens of the embedding model without [CLS]/[SEP], as Kiln's chunker counts."""

    def __init__(self, model_dir: Path):
        from tokenizers import Tokenizer
        self.tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tok.no_truncation()
        self.tok.no_padding()

    def counts(self, texts: list[str]) -> list[int]:
        return [len(e.ids) for e in self.tok.encode_batch(texts, add_special_tokens=False)]


def corpus(real: list[str], n: int, counter: TokenCounter) -> tuple[list[str], int]:
    """The first `n` real passages; past the real ones, copies "with light
    changes": a numbered prefix and one word dropped, kept only when the
    copy is new and still one chunk. Returns (passages, how many are real)."""
    if n <= len(real):
        return real[:n], n
    out = list(real)
    seen = set(out)
    copy = 0
    while len(out) < n:
        copy += 1
        cands = []
        for i, t in enumerate(real):
            words = t.split()
            if len(words) > 3:
                del words[(i * 31 + copy * 17) % len(words)]
            c = f"(copy {copy}) " + " ".join(words)
            if c not in seen:
                cands.append(c)
        for c, k in zip(cands, counter.counts(cands)):
            if k <= CHUNK_MAX_TOKENS and len(out) < n:
                seen.add(c)
                out.append(c)
    return out, len(real)


# -------------------------------------------------------------- peer worker

def peer_worker() -> int:
    """The peer pipeline, in its own process so its memory is its own.
    Reads one JSON command per line on stdin, answers one line on stdout."""
    import numpy as np
    import hnswlib
    import tantivy

    state: dict = {}
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing but answers on the protocol stream

    def answer(obj: dict) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    def new_index(path: Path):
        sb = tantivy.SchemaBuilder()
        sb.add_text_field("text", stored=False, tokenizer_name="en_stem")
        sb.add_unsigned_field("id", stored=False, indexed=False, fast=True)
        path.mkdir(parents=True)
        return tantivy.Index(sb.build(), path=str(path))

    def new_hnsw(n: int):
        h = hnswlib.Index(space="cosine", dim=state["dims"])
        h.init_index(max_elements=n, ef_construction=HNSW["ef_construction"], M=HNSW["M"], random_seed=100)
        h.set_ef(HNSW["ef"])
        return h

    def tantivy_doc(i: int, text: str):
        d = tantivy.Document()
        d.add_text("text", text)
        d.add_unsigned("id", i)
        return d

    def pipelined_embed(http_, batches):
        """Vectors per batch, in order, with two requests in flight."""
        with ThreadPoolExecutor(2) as ex:
            pending = collections.deque(ex.submit(http_.embed, b) for _, b in batches[:2])
            for j in range(len(batches)):
                v = pending.popleft().result()
                if j + 2 < len(batches):
                    pending.append(ex.submit(http_.embed, batches[j + 2][1]))
                yield v

    def kiln_vectors(db: str, n: int):
        """The vectors Kiln stored for the same passages (document `i.txt`)."""
        import sqlite3
        vecs = np.zeros((n, state["dims"]), dtype=np.float32)
        seen = 0
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        for name, blob in con.execute(
                "SELECT d.name, c.vector FROM chunks c JOIN documents d "
                "ON d.id = c.doc_id AND d.live_version = c.version"):
            vecs[int(name.removesuffix(".txt"))] = np.frombuffer(blob, dtype="<f4")
            seen += 1
        con.close()
        if seen != n:
            raise RuntimeError(f"{db} has {seen} live chunks, expected {n}")
        return vecs

    def ingest(cmd: dict) -> dict:
        work = Path(cmd["workdir"])
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        http_ = Http(cmd["url"], cmd["key"])
        state["http"] = http_
        state["dims"] = http_.embed(["warm-up"]).shape[1]
        gc.collect()
        rss0 = proc_kib(os.getpid(), "VmRSS")
        anon0 = proc_kib(os.getpid(), "RssAnon")
        texts: list[str] = []
        with open(cmd["passages"]) as f:
            for line in f:
                texts.append(json.loads(line))
        n = len(texts)
        batches = [(s, texts[s:s + EMBED_BATCH]) for s in range(0, n, EMBED_BATCH)]
        sample = None
        if cmd.get("kiln_db"):
            # Embedding every passage again would double an hour-long run:
            # time the same pipeline's embedding on a sample, and index the
            # vectors Kiln computed for the same texts with the same model.
            # The sample's batches are spread evenly over the corpus, so its
            # mix of passage lengths is the corpus's.
            want = max(1, min(len(batches), cmd["embed_sample"] // EMBED_BATCH))
            sb = [batches[i * len(batches) // want] for i in range(want)]
            ts = time.perf_counter()
            for _ in pipelined_embed(http_, sb):
                pass
            sample = {"passages": sum(len(b) for _, b in sb), "s": time.perf_counter() - ts}
            vectors = kiln_vectors(cmd["kiln_db"], n)
            source = (vectors[s:s + len(b)] for s, b in batches)
        else:
            vectors = np.zeros((n, state["dims"]), dtype=np.float32)
            source = pipelined_embed(http_, batches)
        t0 = time.perf_counter()
        index = new_index(work / "tantivy")
        writer = index.writer()
        hnsw = new_hnsw(n)
        t_index = 0.0
        for (start, batch), v in zip(batches, source):
            ti = time.perf_counter()
            for k, t in enumerate(batch):
                writer.add_document(tantivy_doc(start + k, t))
            hnsw.add_items(v, np.arange(start, start + len(batch)), num_threads=1)
            t_index += time.perf_counter() - ti
            vectors[start:start + len(batch)] = v
        ti = time.perf_counter()
        writer.commit()
        writer.wait_merging_threads()
        hnsw.save_index(str(work / "hnsw.bin"))
        index.reload()
        t_index += time.perf_counter() - ti
        wall = time.perf_counter() - t0
        out = {"chunks": n, "index_in_pipeline_s": t_index}
        if sample:
            rate = sample["passages"] / sample["s"]
            out.update(wall_s=wall + n / rate, measured="derived", embed_sample=sample,
                       embed_rate_per_s=rate, index_pipeline_s=wall)
        else:
            out.update(wall_s=wall, measured="end to end")
        np.save(work / "vectors.npy", vectors)  # for the exact-recall check, not part of the pipeline
        del vectors, writer, source
        gc.collect()
        rss1 = proc_kib(os.getpid(), "VmRSS")
        anon1 = proc_kib(os.getpid(), "RssAnon")
        state.update(index=index, searcher=index.searcher(), hnsw=hnsw, texts=texts, work=work)
        disk = {"tantivy": disk_bytes(work / "tantivy"), "hnsw": disk_bytes(work / "hnsw.bin")}

        # Index alone, from the vectors already computed: bulk tantivy load
        # and one hnswlib add_items on both cores.
        v_all = np.load(work / "vectors.npy")
        ta = time.perf_counter()
        idx2 = new_index(work / "tantivy-rebuild")
        w2 = idx2.writer()
        for i, t in enumerate(texts):
            w2.add_document(tantivy_doc(i, t))
        w2.commit()
        w2.wait_merging_threads()
        tb = time.perf_counter()
        h2 = new_hnsw(n)
        h2.add_items(v_all, np.arange(n), num_threads=2)
        tc = time.perf_counter()
        del idx2, w2, h2, v_all
        shutil.rmtree(work / "tantivy-rebuild", ignore_errors=True)
        gc.collect()
        out.update(index_only_s=tc - ta, index_only_tantivy_s=tb - ta, index_only_hnsw_s=tc - tb,
                   rss_before_kib=rss0, rss_after_kib=rss1, anon_before_kib=anon0, anon_after_kib=anon1,
                   text_bytes=sum(len(t.encode()) for t in texts), disk_bytes=disk)
        return out

    def clean(q: str) -> str:
        # Plain words: tantivy's query language would read AND, OR, :, ( ...
        return re.sub(r"[\W_]+", " ", q).strip().lower()

    def bm25(q: str, k: int) -> list[int]:
        query, _errors = state["index"].parse_query_lenient(clean(q), ["text"])
        s = state["searcher"]
        hits = s.search(query, k, count=False).hits
        return s.fast_field_values("id", [a for _, a in hits])

    def vector(v, k: int) -> list[int]:
        labels, _ = state["hnsw"].knn_query(v, k=k)
        return [int(x) for x in labels[0]]

    def search(cmd: dict) -> dict:
        k = cmd["k"]
        http_ = state["http"]
        texts = state["texts"]
        total, no_embed, ids = [], [], []
        for q in cmd["queries"]:
            t0 = time.perf_counter()
            te = 0.0
            if cmd["mode"] == "bm25":
                top = bm25(q, k)
            else:
                v = http_.embed([q])
                te = time.perf_counter() - t0
                if cmd["mode"] == "vector":
                    top = vector(v, k)
                else:
                    fused: dict[int, float] = collections.defaultdict(float)
                    for rank, i in enumerate(bm25(q, CANDIDATES)):
                        fused[i] += 1.0 / (RRF_K + rank + 1)
                    for rank, i in enumerate(vector(v, CANDIDATES)):
                        fused[i] += 1.0 / (RRF_K + rank + 1)
                    top = sorted(fused, key=lambda i: (-fused[i], i))[:k]
            _hits = [(i, texts[i]) for i in top]  # the passages, as Kiln returns them
            t1 = time.perf_counter()
            total.append(t1 - t0)
            no_embed.append(t1 - t0 - te)
            ids.append(top)
        return {"total_s": total, "no_embed_s": no_embed, "ids": ids}

    def recall(cmd: dict) -> dict:
        """Exact top-k (numpy, all vectors) and hnswlib's top-k per query."""
        qv = state["http"].embed(cmd["queries"])
        vecs = np.load(state["work"] / "vectors.npy")
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        qv = qv / np.linalg.norm(qv, axis=1, keepdims=True)
        exact = []
        for s in range(0, len(qv), 64):
            scores = vecs @ qv[s:s + 64].T
            for col in range(scores.shape[1]):
                c = scores[:, col]
                top = np.argpartition(-c, cmd["k"])[:cmd["k"]]
                exact.append([int(i) for i in top[np.argsort(-c[top])]])
        approx = [vector(qv[i:i + 1], cmd["k"]) for i in range(len(qv))]
        return {"exact": exact, "hnswlib": approx}

    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["cmd"] == "ingest":
                answer(ingest(cmd))
            elif cmd["cmd"] == "search":
                answer(search(cmd))
            elif cmd["cmd"] == "recall":
                answer(recall(cmd))
            elif cmd["cmd"] == "rss":
                answer({"rss_kib": proc_kib(os.getpid(), "VmRSS"), "hwm_kib": proc_kib(os.getpid(), "VmHWM")})
            elif cmd["cmd"] == "stop":
                answer({})
                return 0
        except Exception as e:  # noqa: BLE001 (sent back to the harness)
            answer({"error": f"{type(e).__name__}: {e}"})
    return 0


class Peer:
    def __init__(self, python: str):
        self.proc = subprocess.Popen([python, str(Path(__file__).resolve()), "--peer-worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, **cmd) -> dict:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"peer worker exited ({self.proc.poll()})")
        out = json.loads(line)
        if "error" in out:
            raise RuntimeError(f"peer worker: {out['error']}")
        return out

    def close(self) -> None:
        try:
            self.ask(cmd="stop")
        except (RuntimeError, OSError):
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# ------------------------------------------------------------------- Kiln

class Kiln:
    """`kiln serve --port 0` on its own database and kb dir in `work`."""

    def __init__(self, binary: Path, work: Path, home: Path, threads: int, timeout: float = 900):
        work.mkdir(parents=True, exist_ok=True)
        self.log_path = work / "kiln.log"
        logf = open(self.log_path, "a")
        cmd = [str(binary), "serve", "--port", "0", "--threads", str(threads),
               "--embedding-model", MODEL, "--database", str(work / "kiln.db"),
               "--kb-dir", str(work / "kb"), "--kb-max-upload-mb", "64"]
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, env=dict(os.environ, KILN_HOME=str(home)),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: "queue.Queue[str | None]" = queue.Queue()

        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                logf.write(line)
                logf.flush()
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        self.url, self.admin_key = None, None
        deadline = time.monotonic() + timeout
        while self.url is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                break
            if m := ADMIN_KEY.search(line):
                self.admin_key = m.group(1)
            if m := LISTENING.search(line):
                self.url = m.group(1).rstrip("/")
        if self.url is None:
            self.stop()
            sys.exit(f"kiln serve did not start; see {self.log_path}")
        self.start_s = time.perf_counter() - t0

    def rss_kib(self) -> int:
        return proc_kib(self.proc.pid, "VmRSS")

    def anon_kib(self) -> int:
        """Resident anonymous memory: VmRSS less the mapped binary and model file."""
        return proc_kib(self.proc.pid, "RssAnon")

    def hwm_kib(self) -> int:
        return proc_kib(self.proc.pid, "VmHWM")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def kiln_create_kb(api: Http, name: str) -> str:
    status, kb = api.call("POST", "/api/kbs", {"name": name, "chunking": {
        "max_tokens": CHUNK_MAX_TOKENS, "overlap_tokens": 32}})
    if status != 201:
        sys.exit(f"creating the knowledge base: HTTP {status}: {kb}")
    return kb["id"]


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


def kiln_ingest(kiln: Kiln, api: Http, kb_id: str, passages: list[str], upload_threads: int) -> dict:
    """Uploads every passage and waits until all are chunks. On a resumed
    knowledge base the earlier uploads answer `duplicate` and Kiln finishes
    its queue; the times then cover only this run's part."""
    rss0, hwm0, anon0 = kiln.rss_kib(), kiln.hwm_kib(), kiln.anon_kib()
    problems: collections.Counter = collections.Counter()
    t0_wall = time.time()
    t0 = time.perf_counter()

    def upload(i: int) -> None:
        for attempt in range(20):
            status, body = api.call("POST", f"/api/kbs/{kb_id}/documents?name={i}.txt",
                                    passages[i].encode(), raw=True)
            if status == 202:
                return
            if status == 200 and body.get("duplicate"):
                problems["duplicate"] += 1
                return
            if status in (429, 503):
                problems[f"retried HTTP {status}"] += 1
                time.sleep(0.2 * (attempt + 1))
                continue
            problems[f"HTTP {status}: {str(body)[:120]}"] += 1
            return
        problems["gave up after retries"] += 1

    with ThreadPoolExecutor(upload_threads) as ex:
        list(ex.map(upload, range(len(passages))))
    upload_s = time.perf_counter() - t0
    log(f"  kiln: {len(passages)} uploads in {upload_s:.1f} s ({len(passages) / upload_s:.0f}/s); "
        f"waiting for ingestion")
    last, last_change, chunks, polls = -1, time.perf_counter(), 0, []
    while True:
        tp = time.perf_counter()
        status, body = api.call("GET", f"/api/kbs/{kb_id}")
        polls.append(time.perf_counter() - tp)
        chunks = body.get("chunks", 0) if status == 200 else chunks
        if chunks >= len(passages):
            break
        if chunks != last:
            last, last_change = chunks, time.perf_counter()
        elif time.perf_counter() - last_change > 300:
            break  # stalled: the document statuses below say why
        # The call lists every document: keep polling under ~5% of a core.
        time.sleep(max(0.5, 20 * polls[-1]))
    poll_end = time.perf_counter()
    docs = all_documents(api, kb_id)
    statuses = collections.Counter(d["status"] for d in docs)
    errors = collections.Counter(f"{d.get('error_code')}: {d.get('error')}" for d in docs if d.get("error"))
    # Kiln's own clock: the last document's move to ready (same machine clock).
    last_ms = max((d["updated_ms"] for d in docs), default=0)
    server_s = last_ms / 1000 - t0_wall
    wall = server_s if 0 < server_s <= poll_end - t0 else poll_end - t0
    _, kb = api.call("GET", f"/api/kbs/{kb_id}")
    chunks = kb.get("chunks", chunks)
    return {"kb_id": kb_id, "documents": len(docs), "chunks": chunks, "statuses": dict(statuses),
            "errors": dict(errors.most_common(5)), "problems": dict(problems),
            "upload_s": upload_s, "wall_s": wall, "poll_wall_s": poll_end - t0,
            "chunks_per_s": chunks / wall, "poll_ms_median": 1000 * statistics.median(polls),
            "poll_ms_max": 1000 * max(polls),
            "rss_before_kib": rss0, "rss_after_kib": kiln.rss_kib(), "hwm_before_kib": hwm0,
            "anon_before_kib": anon0, "anon_after_kib": kiln.anon_kib(),
            "hwm_after_kib": kiln.hwm_kib()}


def kiln_search(api: Http, kb_id: str, mode: str, qs: list[str], k: int) -> dict:
    total, ids, failures = [], [], collections.Counter()
    for q in qs:
        t0 = time.perf_counter()
        status, body = api.call("POST", f"/api/kbs/{kb_id}/search", {"query": q, "k": k, "mode": mode})
        total.append(time.perf_counter() - t0)
        if status != 200:
            failures[f"HTTP {status}: {str(body)[:120]}"] += 1
            ids.append([])
            continue
        ids.append([int(h["document_name"].removesuffix(".txt")) for h in body["data"]])
    return {"total_s": total, "ids": ids, "failures": dict(failures)}


# --------------------------------------------------------------- the bench

def latency_stats(rounds: list[list[float]]) -> dict:
    return {"p50_ms": summary([1000 * percentile(r, 0.50) for r in rounds]),
            "p95_ms": summary([1000 * percentile(r, 0.95) for r in rounds])}


def overlap(a: list[list[int]], b: list[list[int]], k: int) -> float:
    """Mean |top-k(a) ∩ top-k(b)| / k over queries."""
    return statistics.mean(len(set(x[:k]) & set(y[:k])) / k for x, y in zip(a, b))


def run_scale(args, n: int, passages: list[str], real: int, qs: list[str], root: Path, peer_python: str) -> dict:
    log(f"\n== {n:,} passages ({real:,} real, {n - real:,} lightly changed copies); "
        f"{len(qs)} queries; load average {loadavg()} ==")
    digest = hashlib.sha256("\n".join(passages).encode()).hexdigest()[:16]
    work = root / f"kiln-{n}"
    state_file = work / "state.json"
    saved = json.loads(state_file.read_text()) if state_file.exists() else None
    if saved and saved.get("corpus") != digest:
        log(f"  {work} holds another corpus; starting it afresh")
        saved = None
    # A saved state without ingestion figures is an ingestion that was
    # interrupted: resume it (the times are then not end to end).
    resumed = bool(saved) and "ingest" not in saved
    if saved is None and work.exists():
        shutil.rmtree(work)
    kiln = Kiln(args.kiln_bin, work, args.kiln_home, args.threads)
    peer = None
    try:
        key = kiln.admin_key or (saved or {}).get("admin_key")
        if not key:
            sys.exit(f"no admin key for {work}; delete it and run again")
        api = Http(kiln.url, key)
        if saved and not resumed:
            ingest = saved["ingest"]
            log(f"  kiln: reusing {work} (started and loaded in {kiln.start_s:.1f} s), "
                f"{ingest['chunks']:,} chunks")
        else:
            if resumed:
                kb_id = saved["kb_id"]
                log(f"  kiln: resuming the interrupted ingestion in {work}; its time will not be end to end")
            else:
                kb_id = kiln_create_kb(api, f"bench-{n}")
                state_file.write_text(json.dumps({"admin_key": key, "corpus": digest, "kb_id": kb_id,
                                                  "rss_empty_kib": kiln.rss_kib(),
                                                  "anon_empty_kib": kiln.anon_kib()}))
            ingest = kiln_ingest(kiln, api, kb_id, passages, args.upload_threads)
            ingest["resumed"] = resumed
            if resumed:
                ingest["rss_before_kib"] = saved.get("rss_empty_kib", ingest["rss_before_kib"])
                ingest["anon_before_kib"] = saved.get("anon_empty_kib", ingest["anon_before_kib"])
            if ingest["statuses"] != {"ready": n}:
                log(f"  kiln: WARNING document statuses {ingest['statuses']}, errors {ingest['errors']}")
            state_file.write_text(json.dumps({"admin_key": key, "corpus": digest, "kb_id": kb_id,
                                              "ingest": ingest}))
            # Memory of the loaded knowledge base, without what the embedding
            # model's forward passes left in the allocator: a fresh start on
            # the same database, against the fresh start before ingestion.
            kiln.stop()
            kiln = Kiln(args.kiln_bin, work, args.kiln_home, args.threads)
            api = Http(kiln.url, key)
        ingest["open_s"] = kiln.start_s
        ingest["rss_loaded_kib"] = kiln.rss_kib()
        ingest["anon_loaded_kib"] = kiln.anon_kib()
        kb_id = ingest["kb_id"]
        ingest["disk_kb_bytes"] = disk_bytes(work / "kb")
        ingest["disk_db_bytes"] = sum(disk_bytes(p) for p in work.glob("kiln.db*"))
        log(f"  kiln: {ingest['chunks']:,} chunks in {ingest['documents']:,} documents, "
            f"{ingest['wall_s']:.1f} s, {ingest['chunks_per_s']:.1f} chunks/s; problems {ingest['problems'] or 'none'}")

        # The peer's ingestion: embeddings from Kiln's /v1/embeddings, then tantivy + hnswlib.
        pfile = root / f"passages-{n}.jsonl"
        pfile.write_text("".join(json.dumps(p) + "\n" for p in passages))
        peer = Peer(peer_python)
        log(f"  peer: ingesting (load average {loadavg()})")
        kiln_db = None
        if n > args.peer_embed_max:
            kiln_db = str(next((work / "kb").glob("*/kb.sqlite")))
        pin = peer.ask(cmd="ingest", workdir=str(root / f"peer-{n}"), passages=str(pfile),
                       url=kiln.url, key=key, kiln_db=kiln_db, embed_sample=args.peer_embed_sample)
        pin["chunks_per_s"] = pin["chunks"] / pin["wall_s"]
        pin["index_only_chunks_per_s"] = pin["chunks"] / pin["index_only_s"]
        if kiln_db:
            log(f"  peer: embedded {pin['embed_sample']['passages']} passages at {pin['embed_rate_per_s']:.1f}/s "
                f"and indexed Kiln's vectors of all {n:,} in {pin['index_pipeline_s']:.1f} s")
        log(f"  peer: {pin['chunks']:,} chunks in {pin['wall_s']:.1f} s ({pin['measured']}), "
            f"{pin['chunks_per_s']:.1f} chunks/s; "
            f"index only {pin['index_only_s']:.1f} s (tantivy {pin['index_only_tantivy_s']:.1f}, "
            f"hnswlib {pin['index_only_hnsw_s']:.1f})")

        # Searches: a warm-up, then per round each mode on Kiln, then on the peer.
        for mode in MODES:
            kiln_search(api, kb_id, mode, qs[:10], args.k)
            peer.ask(cmd="search", mode=mode, queries=qs[:10], k=args.k)
        rss_q0 = kiln.rss_kib()
        rounds: dict = {s: {m: [] for m in MODES} for s in ("kiln", "peer", "peer_no_embed")}
        ids: dict = {"kiln": {}, "peer": {}}
        failures: collections.Counter = collections.Counter()
        for r in range(args.rounds):
            for mode in MODES:
                kres = kiln_search(api, kb_id, mode, qs, args.k)
                pres = peer.ask(cmd="search", mode=mode, queries=qs, k=args.k)
                failures.update(kres["failures"])
                rounds["kiln"][mode].append(kres["total_s"])
                rounds["peer"][mode].append(pres["total_s"])
                rounds["peer_no_embed"][mode].append(pres["no_embed_s"])
                if r == 0:
                    ids["kiln"][mode], ids["peer"][mode] = kres["ids"], pres["ids"]
            log(f"  round {r + 1}/{args.rounds} done (load average {loadavg()})")
        lat = {s: {m: latency_stats(rounds[s][m]) for m in MODES} for s in rounds}
        rec = peer.ask(cmd="recall", queries=qs, k=args.k)
        quality = {
            "kiln_vector_recall_at_k": overlap(ids["kiln"]["vector"], rec["exact"], args.k),
            "hnswlib_recall_at_k": overlap(rec["hnswlib"], rec["exact"], args.k),
            "hybrid_overlap_kiln_peer": overlap(ids["kiln"]["hybrid"], ids["peer"]["hybrid"], args.k),
            "bm25_overlap_kiln_peer": overlap(ids["kiln"]["bm25"], ids["peer"]["bm25"], args.k),
        }
        prss = peer.ask(cmd="rss")
        result = {
            "passages": n, "real_passages": real, "queries": len(qs), "corpus_sha256_16": digest,
            "kiln": {"ingest": ingest, "latency": lat["kiln"], "search_failures": dict(failures),
                     "rss_after_queries_kib": kiln.rss_kib(), "rss_before_queries_kib": rss_q0,
                     "anon_after_queries_kib": kiln.anon_kib(),
                     "hwm_kib": kiln.hwm_kib(), "start_s": kiln.start_s},
            "peer": {"ingest": pin, "latency": lat["peer"], "latency_no_embed": lat["peer_no_embed"],
                     "rss_after_queries_kib": prss["rss_kib"], "hwm_kib": prss["hwm_kib"]},
            "quality": quality, "load_average_end": loadavg(),
        }
        print_scale(result, args.k)
        return result
    finally:
        if peer:
            peer.close()
        kiln.stop()


def print_scale(res: dict, k: int) -> None:
    n, ki, pi = res["kiln"]["ingest"]["chunks"], res["kiln"]["ingest"], res["peer"]["ingest"]
    per = 100_000 / n
    log(f"\n-- {res['passages']:,} passages: results (min / median / max over rounds) --")
    if ki.get("resumed"):
        log("NOTE: Kiln's ingestion was resumed after an interruption; its rate covers only the last part")
    log(f"ingestion, chunks/s end to end: Kiln {ki['chunks_per_s']:.1f}  peer {pi['chunks_per_s']:.1f} "
        f"({pi['measured']})  Kiln/peer {ki['chunks_per_s'] / pi['chunks_per_s']:.2f}x (above 1: Kiln faster)")
    log(f"  Kiln: {ki['chunks']:,} chunks, {ki['documents']:,} documents, {ki['wall_s']:.1f} s "
        f"(uploads alone {ki['upload_s']:.1f} s); peer index alone {pi['index_only_chunks_per_s']:.0f} chunks/s "
        f"({pi['index_only_s']:.1f} s: tantivy {pi['index_only_tantivy_s']:.1f} s, hnswlib {pi['index_only_hnsw_s']:.1f} s)")
    hdr = f"{'mode':7} {'':4} {'Kiln ms':>22} {'peer ms':>22} {'peer ms w/o embed':>22} {'Kiln/peer':>9}"
    log(hdr)
    for mode in MODES:
        for p in ("p50_ms", "p95_ms"):
            kk = res["kiln"]["latency"][mode][p]
            pp = res["peer"]["latency"][mode][p]
            pn = res["peer"]["latency_no_embed"][mode][p]
            fmt = lambda s: f"{s['min']:6.2f} /{s['median']:6.2f} /{s['max']:6.2f}"  # noqa: E731
            log(f"{mode:7} {p[:3]:4} {fmt(kk):>22} {fmt(pp):>22} {fmt(pn):>22} "
                f"{kk['median'] / pp['median']:8.2f}x")
    q = res["quality"]
    log(f"recall@{k} against exact cosine: Kiln vector {q['kiln_vector_recall_at_k']:.3f}, "
        f"hnswlib {q['hnswlib_recall_at_k']:.3f}; top-{k} overlap Kiln vs peer: hybrid "
        f"{q['hybrid_overlap_kiln_peer']:.3f}, bm25 {q['bm25_overlap_kiln_peer']:.3f}")
    grow = ki["anon_loaded_kib"] - ki["anon_before_kib"]
    log(f"Kiln memory: RSS {ki['rss_before_kib'] / 1024:.0f} MiB ({ki['anon_before_kib'] / 1024:.0f} MiB anonymous) "
        f"at start with an empty knowledge base, {ki['rss_loaded_kib'] / 1024:.0f} MiB "
        f"({ki['anon_loaded_kib'] / 1024:.0f} MiB anonymous) at a restart with it loaded ({ki['open_s']:.1f} s "
        f"to start): {grow / 1024 * per:.0f} MiB anonymous per 100k chunks; {ki['rss_after_kib'] / 1024:.0f} MiB right after "
        f"ingesting (peak {ki['hwm_after_kib'] / 1024:.0f} MiB), {res['kiln']['rss_after_queries_kib'] / 1024:.0f} MiB "
        f"after the searches")
    log(f"Kiln disk: kb dir {mib(ki['disk_kb_bytes']):.1f} MiB ({mib(ki['disk_kb_bytes']) * per:.0f} MiB per 100k chunks), "
        f"server database {mib(ki['disk_db_bytes']):.1f} MiB")
    pgrow = pi["anon_after_kib"] - pi["anon_before_kib"]
    pdisk = sum(pi["disk_bytes"].values())
    log(f"peer memory: anonymous RSS +{pgrow / 1024:.0f} MiB after loading ({pgrow / 1024 * per:.0f} MiB per 100k chunks, "
        f"of which the passages' text {mib(pi['text_bytes']):.0f} MiB as UTF-8); peer disk: tantivy "
        f"{mib(pi['disk_bytes']['tantivy']):.1f} MiB + hnswlib {mib(pi['disk_bytes']['hnsw']):.1f} MiB = "
        f"{mib(pdisk) * per:.0f} MiB per 100k chunks (texts not stored)")
    hp95 = res["kiln"]["latency"]["hybrid"]["p95_ms"]["median"]
    log(f"Kiln hybrid p95 {hp95:.1f} ms (median of rounds); the issue's target is under 50 ms at 100k chunks")
    if res["kiln"]["search_failures"]:
        log(f"Kiln search failures: {res['kiln']['search_failures']}")


def ensure_venv(venv: Path) -> str:
    """The Python that has the peer's packages: this one, or the venv's
    (created when missing). Re-runs the script there."""
    try:
        import hnswlib  # noqa: F401
        import numpy  # noqa: F401
        import tantivy  # noqa: F401
        import tokenizers  # noqa: F401
        return sys.executable
    except ImportError:
        pass
    py = venv / "bin" / "python"
    if not py.exists():
        log(f"creating {venv} with {' '.join(PEER_PACKAGES)} (hnswlib builds from source, a few minutes)")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
    if Path(sys.prefix).resolve() == venv.resolve():
        sys.exit(f"{py} lacks one of {PEER_PACKAGES}; install them there")
    os.execv(str(py), [str(py), str(Path(__file__).resolve()), *sys.argv[1:]])
    return ""  # not reached


def main() -> int:
    if "--peer-worker" in sys.argv:
        return peer_worker()
    # Stop Kiln and the peer on a plain `kill` too (the `finally` blocks).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    home = Path(os.environ.get("KILN_TEST_HOME", Path.home() / ".cache" / "kiln" / "home"))
    ap.add_argument("--scales", default="10000,100000", help="passages (= chunks) per run, comma-separated")
    ap.add_argument("--rounds", type=int, default=3, help="timed passes over the query set")
    ap.add_argument("--reuse", type=Path, help="keep Kiln's databases here; skip ingestion where done")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_rag.json"))
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data"
                    if (REPO.parent / "shared" / "data").exists() else Path("/work/shared/data"))
    ap.add_argument("--pubmed-queries", type=int, default=200)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2, help="Kiln's --threads")
    ap.add_argument("--upload-threads", type=int, default=4)
    ap.add_argument("--peer-embed-max", type=int, default=20_000,
                    help="past this many passages the peer embeds only a sample and indexes Kiln's vectors")
    ap.add_argument("--peer-embed-sample", type=int, default=3200)
    ap.add_argument("--kiln-bin", type=Path,
                    default=Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target")) / "release" / "kiln")
    ap.add_argument("--kiln-home", type=Path, default=home)
    ap.add_argument("--venv", type=Path, default=Path.home() / ".cache" / "kiln" / "bench-venv")
    args = ap.parse_args()
    peer_python = ensure_venv(args.venv)
    if not args.kiln_bin.exists():
        sys.exit(f"{args.kiln_bin} not found: cargo build --release -p kiln-server")
    scales = [int(s) for s in args.scales.split(",")]
    log(f"load average at start: {loadavg()} on {os.cpu_count()} CPUs")
    if float(loadavg().split()[0] if loadavg() != "?" else 0) > 1.0:
        log("WARNING: the machine is busy; latencies and rates will be lower and noisier")

    real, n_vaswani = real_passages(args.data)
    counter = TokenCounter(args.kiln_home / "models" / MODEL)
    fits = [t for t, c in zip(real, counter.counts(real)) if c <= CHUNK_MAX_TOKENS]
    n_vaswani_fit = sum(1 for t, c in zip(real[:n_vaswani], counter.counts(real[:n_vaswani])) if c <= CHUNK_MAX_TOKENS)
    log(f"{len(real):,} distinct real passages ({n_vaswani:,} Vaswani, {len(real) - n_vaswani:,} PubMedQA); "
        f"{len(real) - len(fits)} over {CHUNK_MAX_TOKENS} tokens left out; Vaswani first, {n_vaswani_fit:,} of them")
    qs = queries(args.data, args.pubmed_queries)

    root = args.reuse or Path(tempfile.mkdtemp(prefix="bench-rag-"))
    root.mkdir(parents=True, exist_ok=True)
    report = {"load_average_start": loadavg(), "kiln_bin": str(args.kiln_bin), "rounds": args.rounds,
              "k": args.k, "hnswlib": HNSW, "chunk_max_tokens": CHUNK_MAX_TOKENS, "scales": {}}
    try:
        for n in scales:
            passages, n_real = corpus(fits, n, counter)
            report["scales"][str(n)] = run_scale(args, n, passages, n_real, qs, root, peer_python)
            args.out.write_text(json.dumps(report, indent=1))
    finally:
        if args.reuse is None:
            shutil.rmtree(root, ignore_errors=True)
    report["load_average_end"] = loadavg()
    args.out.write_text(json.dumps(report, indent=1))
    log(f"\nload average at end: {loadavg()}; JSON in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
