#!/usr/bin/env python3
"""Grounded answers of Kiln's knowledge bases on PubMedQA (PQA-L): whether
`POST /api/kbs/{kb}/ask` answers when its passages hold the answer, abstains
when they do not, gets the yes/no/maybe right, and cites the passages it was
given. See bench/README.md for the method.

    cp $CARGO_TARGET_DIR/debug/kiln /tmp/kiln-answers-bin
    python3 bench/rag_answers.py --kiln-bin /tmp/kiln-answers-bin --limit 10 --tuning-limit 6
    python3 bench/rag_answers.py --kiln-bin /tmp/kiln-answers-bin --reuse-dir /tmp/rag_answers
    python3 bench/rag_answers.py --kiln-bin /tmp/kiln-answers-bin --reuse-dir /tmp/rag_answers \\
        --suffix " Answer yes, no or maybe."          # skip tuning, score with this suffix

Runs with plain python3 (standard library only). Every passage of a question
is its own document, uploaded with the metadata `q:<question id>`; each ask
restricts retrieval to one question's passages with that metadata filter.
"""

import argparse
import collections
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = Path("/work/shared/data/pubmedqa")
LISTENING = re.compile(r"kiln listening on http://([^\s/:]+):(\d+)")
ADMIN_KEY = re.compile(r"created the platform admin API key \(shown only now, keep it safe\): (kiln-sk-\w+)")
KB_NAME = "pubmedqa"
TERMINAL = {"ready", "failed", "stopped", "superseded"}
LABELS = ("yes", "no", "maybe")
# The prompt suffixes tried on the tuning questions, in order (the first wins a tie).
SUFFIXES = ["", " Answer yes, no or maybe."]
CITATION_MARK = re.compile(r"\[\s*\d+(?:\s*,\s*\d+)*\s*\]")
# A first sentence that says the sources lack the answer, in words Kiln's
# check for the exact refusal may not know.
SAYS_LACKING = re.compile(r"\b(?:do|does|did)\s+not\s+(?:contain|include|provide|mention|answer|address)\b"
                          r"|\bno\s+information\b|\bnot\s+(?:applicable|relevant)\b|\bcannot\s+(?:be\s+)?answer",
                          re.I)


# ---------------------------------------------------------------- the data

def read_pubmedqa(data: Path) -> tuple[dict, set[str]]:
    """The 1,000 expert-labelled questions by id, and the ids of the test split."""
    items = json.loads((data / "ori_pqal.json").read_text())
    test = set(json.loads((data / "test_ground_truth.json").read_text()))
    return items, test


def partners(ids: list[str]) -> dict[str, str]:
    """Each id's "other" question: the next id in the list, the last paired
    with the first. Its passages are about another study, so they do not
    answer the question."""
    return {q: ids[(i + 1) % len(ids)] for i, q in enumerate(ids)}


def nearest_partners(api, kb: str, items: dict, ids: list[str], owners: dict[str, set]) -> dict[str, str]:
    """Each id's nearest other question in the list: the one owning the
    passage the knowledge base's vector search ranks first for the question
    among the others' passages. This is what retrieval hands the model when
    the knowledge base lacks the answer, so it is the hard case for the
    relevance gate. Falls back to the next id when no other's passage is in
    the top 100."""
    wanted, out = set(ids), partners(ids)
    for q in ids:
        _, hits = api.call("POST", f"/api/kbs/{kb}/search",
                           {"query": items[q]["QUESTION"].strip(), "mode": "vector", "k": 100})
        for h in hits["data"]:
            others = sorted((owners.get(h["document_id"], set()) & wanted) - {q})
            if others and q not in owners.get(h["document_id"], set()):
                out[q] = others[0]
                break
    return out


def label_of(answer: str) -> tuple[str, str]:
    """yes / no / maybe read from an answer, and the rule that gave it: the
    first word; else a "yes" or "no" in the first sentence followed directly
    by punctuation or the sentence's end ("Yes, ...", "The answer is: No.");
    else maybe."""
    text = CITATION_MARK.sub(" ", answer).strip()
    words = text.split()
    first = re.sub(r"[^\w]", "", words[0]).lower() if words else ""
    if first in ("yes", "no"):
        return first, "first word"
    first_sentence = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
    m = re.search(r"\b(yes|no)\b\s*(?:[,.;:!?]|$)", first_sentence, re.I)
    if m:
        return m.group(1).lower(), "first sentence"
    return "maybe", "neither"


# ---------------------------------------------------------------- the server

class ApiError(Exception):
    def __init__(self, status: int, body):
        self.status = status
        self.body = body
        message = body.get("error", {}).get("message") if isinstance(body, dict) else body
        super().__init__(f"HTTP {status}: {message}")


class Api:
    """JSON over one kept-alive connection, reopened once after a failure."""

    def __init__(self, host: str, port: int, key: str):
        self.host, self.port = host, port
        self.headers = {"Authorization": f"Bearer {key}"}
        self.conn = None

    def call(self, method: str, path: str, body=None, raw: bytes | None = None):
        headers = dict(self.headers)
        payload = None
        if raw is not None:
            payload = raw
            headers["Content-Type"] = "text/plain; charset=utf-8"
        elif body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=900)
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


class KilnServer:
    """`kiln serve` on port 0 with SmolLM2 and the embedding model; its output
    goes to WORKDIR/kiln.log."""

    def __init__(self, binary: Path, home: Path, workdir: Path, threads: int):
        self.log_path = workdir / "kiln.log"
        self.log = open(self.log_path, "a")
        cmd = [str(binary), "serve", "--port", "0", "--threads", str(threads),
               "--model", "smollm2-135m", "--embedding-model", "all-minilm-l6-v2",
               "--database", str(workdir / "kiln.db"), "--kb-dir", str(workdir / "kb")]
        self.proc = subprocess.Popen(cmd, env=dict(os.environ, KILN_HOME=str(home)),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.address = None
        self.admin_key = None
        self.started = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        # Read everything, always, so the server never blocks on a full pipe.
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.write(line)
            self.log.flush()
            if m := ADMIN_KEY.search(line):
                self.admin_key = m.group(1)
            if self.address is None and (m := LISTENING.search(line)):
                self.address = (m.group(1), int(m.group(2)))
                self.started.set()
        self.started.set()

    def wait_listening(self, timeout: float = 300) -> tuple[str, int]:
        self.started.wait(timeout)
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
        target = Path(os.environ["CARGO_TARGET_DIR"])
        candidates += [target / "release" / "kiln", target / "debug" / "kiln"]
    candidates += [REPO / "target" / "release" / "kiln", REPO / "target" / "debug" / "kiln"]
    return next((c for c in candidates if c.exists()), candidates[0])


# ---------------------------------------------------------------- ingestion

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


def find_or_create_kb(api: Api) -> str:
    try:
        return api.call("GET", f"/api/kbs/{KB_NAME}")[1]["id"]
    except ApiError as e:
        if e.status != 404:
            raise
    return api.call("POST", "/api/kbs", {"name": KB_NAME})[1]["id"]


def ingest(api: Api, server: KilnServer, state: dict, passages: list[tuple[str, str, str]], save,
           timeout_s: float) -> list[dict]:
    """Uploads the passages (name, question id, text) not uploaded before and
    waits until every one is in a final state; returns the document records."""
    kb = state["kb"]
    uploaded = state.setdefault("uploads", {})
    todo = [p for p in passages if p[0] not in uploaded]
    print(f"{len(passages)} passages wanted, {len(passages) - len(todo)} uploaded before, "
          f"uploading {len(todo)}", flush=True)
    t0 = time.monotonic()
    for i, (name, qid, text) in enumerate(todo, 1):
        query = urllib.parse.urlencode({"name": name, "meta": f"q:{qid}"})
        status, body = api.call("POST", f"/api/kbs/{kb}/documents?{query}", raw=text.encode())
        # Saved at once: a rerun must not mistake its own earlier upload for
        # another question's identical passage.
        uploaded[name] = {"id": body["id"], "status": status, "duplicate": bool(body.get("duplicate"))}
        save()
        if i % 100 == 0 or i == len(todo):
            print(f"  uploaded {i}/{len(todo)} in {time.monotonic() - t0:.0f}s", flush=True)
    wanted = {uploaded[name]["id"] for name, _, _ in passages}
    last_print = 0.0
    while True:
        if not server.alive():
            raise SystemExit(f"kiln serve exited during ingestion; its output:\n{server.tail()}")
        docs = [d for d in all_documents(api, kb) if d["id"] in wanted]
        done = [d for d in docs if d["status"] in TERMINAL]
        now = time.monotonic()
        if len(done) == len(wanted) or now - last_print > 20:
            print(f"  ingested {sum(d['status'] == 'ready' for d in docs)}/{len(wanted)} documents "
                  f"({len(done) - sum(d['status'] == 'ready' for d in docs)} failed), "
                  f"{now - t0:.0f}s", flush=True)
            last_print = now
        if len(done) == len(wanted):
            return docs
        if now - t0 > timeout_s:
            raise SystemExit(f"ingestion not finished after {timeout_s:.0f}s")
        time.sleep(2)


# ---------------------------------------------------------------- asking

def ask(api: Api, kb: str, question: str, qid: str, sources: int, max_tokens: int,
        cosine: float | None) -> tuple[dict, float]:
    t0 = time.monotonic()
    body = {"question": question, "metadata": {"q": qid}, "sources": sources, "max_tokens": max_tokens}
    if cosine is not None:
        body["grounding"] = {"cosine": cosine}
    _, answer = api.call("POST", f"/api/kbs/{kb}/ask", body)
    return answer, time.monotonic() - t0


def run_asks(api: Api, server: KilnServer, kb: str, items: dict, ids: list[str], suffix: str,
             tag: str, args, owners: dict[str, set]) -> list[dict]:
    """Asks every question twice: with its own passages (answerable) and with
    its partner's (unanswerable). One record per ask."""
    other = nearest_partners(api, kb, items, ids, owners) if args.partner == "nearest" else partners(ids)
    records = []
    for n, qid in enumerate(ids, 1):
        question = items[qid]["QUESTION"].strip() + suffix
        for kind, passages_of in (("answerable", qid), ("unanswerable", other[qid])):
            try:
                a, secs = ask(api, kb, question, passages_of, args.sources, args.max_tokens, args.cosine)
            except ApiError as e:
                print(f"  [{tag}] {n}/{len(ids)} {qid} {kind}: {e}", flush=True)
                records.append({"id": qid, "kind": kind, "passages_of": passages_of, "error": str(e),
                                "status": e.status, "body": e.body})
                if not server.alive():
                    raise SystemExit(f"kiln serve exited; its output:\n{server.tail()}")
                continue
            label, rule = label_of(a["answer"]) if a["found"] else (None, None)
            records.append({
                "id": qid, "kind": kind, "passages_of": passages_of, "question": question,
                "gold": items[qid]["final_decision"], "found": a["found"], "label": label, "label_rule": rule,
                "gate_abstained": not a["found"] and not a["sources"],
                "answer": a["answer"], "sentences": a["sentences"], "citations": a["citations"],
                "sources": [{k: h.get(k) for k in ("document_id", "document_name", "chunk_id", "start",
                                                    "end", "score", "text")} for h in a["sources"]],
                "usage": a.get("usage"), "finish_reason": a.get("finish_reason"), "seconds": secs,
            })
            shown = f"answered {label} (gold {items[qid]['final_decision']})" if a["found"] else (
                "abstained" + (" at the gate" if not a["sources"] else " (model)"))
            print(f"  [{tag}] {n}/{len(ids)} {qid} {kind:12} {shown:32} {secs:5.1f}s", flush=True)
    return records


# ---------------------------------------------------------------- scoring

def share(num: int, den: int):
    return num / den if den else None


def hmean(a, b):
    if a is None or b is None:
        return None
    return 2 * a * b / (a + b) if a + b else 0.0


def summarize(records: list[dict], owners: dict[str, set[str]], texts: dict[str, str]) -> dict:
    """The figures of one set of asks. `owners`: document id -> the question
    ids whose passages have its bytes; `texts`: document id -> its text."""
    ok = [r for r in records if "error" not in r]
    ans = [r for r in ok if r["kind"] == "answerable"]
    una = [r for r in ok if r["kind"] == "unanswerable"]
    answered = [r for r in ans if r["found"]]
    correct = sum(r["label"] == r["gold"] for r in answered)
    answer_rate = share(len(answered), len(ans))
    abstention = share(sum(not r["found"] for r in una), len(una))
    accuracy_all = share(correct, len(ans))

    cites = [(r, c) for r in ok if r["found"] for c in r["citations"]]
    own_cites = [(r, c) for r, c in cites if r["kind"] == "answerable"]
    quote_in_source = quote_at_offsets = doc_matches = 0
    for r, c in cites:
        src = r["sources"][c["source"] - 1] if 1 <= c["source"] <= len(r["sources"]) else None
        quote_in_source += bool(src and c["quote"] and c["quote"] in src["text"])
        doc_matches += bool(src and src["document_id"] == c["document_id"])
        text = texts.get(c["document_id"])
        quote_at_offsets += bool(text is not None and text[c["start"]:c["end"]] == c["quote"])

    def sentence_figures(rs):
        sents = [s for r in rs for s in r["sentences"]]
        cited = [s for s in sents if s["cited"]]
        return {
            "sentences": len(sents),
            "supported": share(sum(s["supported"] for s in sents), len(sents)),
            "with_citation_marks": share(len(cited), len(sents)),
            # Of the sentences that cite [n]: the supporting source is among those cited.
            "cited_source_supports": share(sum(s["source"] in s["cited"] for s in cited), len(cited)),
            "answers_with_a_supported_sentence": share(sum(any(s["supported"] for s in r["sentences"])
                                                           for r in rs), len(rs)),
        }

    return {
        "questions": len({r["id"] for r in ok}),
        "errors": len(records) - len(ok),
        "answerable_asks": len(ans),
        "unanswerable_asks": len(una),
        "answer_rate": answer_rate,
        "correct_abstention": abstention,
        "answer_abstain_mean": None if answer_rate is None or abstention is None else (answer_rate + abstention) / 2,
        "answer_abstain_hmean": hmean(answer_rate, abstention),
        "accuracy_answered": share(correct, len(answered)),
        "accuracy_all": accuracy_all,
        "grounded_hmean": hmean(accuracy_all, abstention),
        "labels_answered": dict(collections.Counter(r["label"] for r in answered)),
        "label_rules": dict(collections.Counter(r["label_rule"] for r in answered)),
        "answers_cut_at_max_tokens": sum(r["finish_reason"] == "length" for r in ok if r["found"]),
        # Counted as answers, though their first sentence says the sources lack it.
        "answered_but_first_sentence_says_lacking": [
            {"id": r["id"], "kind": r["kind"], "answer": r["answer"][:200]} for r in ok
            if r["found"] and SAYS_LACKING.search(re.split(r"(?<=[.!?])\s", r["answer"].strip(), maxsplit=1)[0])],
        "gold_labels": dict(collections.Counter(r["gold"] for r in ans)),
        "abstentions": {
            "answerable_at_gate": sum(r["gate_abstained"] for r in ans),
            "answerable_by_model": sum(not r["found"] and not r["gate_abstained"] for r in ans),
            "unanswerable_at_gate": sum(r["gate_abstained"] for r in una),
            "unanswerable_by_model": sum(not r["found"] and not r["gate_abstained"] for r in una),
        },
        "citations": {
            "total": len(cites),
            "answerable": len(own_cites),
            "per_answered_answerable": share(len(own_cites), len(answered)),
            "precision_own_passages": share(sum(r["id"] in owners.get(c["document_id"], set())
                                                for r, c in own_cites), len(own_cites)),
            "quote_in_cited_source": share(quote_in_source, len(cites)),
            "quote_at_document_offsets": share(quote_at_offsets, len(cites)),
            "document_id_matches_source": share(doc_matches, len(cites)),
        },
        "sentences_answerable": sentence_figures(answered),
        "sentences_unanswerable_answered": sentence_figures([r for r in una if r["found"]]),
        "seconds_per_ask": {
            "answered": statistics.median([r["seconds"] for r in ok if r["found"]] or [0]),
            "abstained": statistics.median([r["seconds"] for r in ok if not r["found"]] or [0]),
        },
    }


def baselines(items: dict, ids: list[str], majority: str) -> dict:
    gold = [items[q]["final_decision"] for q in ids]
    hits = sum(g == majority for g in gold)
    return {
        "always abstain": {"answer_rate": 0.0, "correct_abstention": 1.0, "answer_abstain_mean": 0.5,
                           "answer_abstain_hmean": 0.0, "accuracy_answered": None, "accuracy_all": 0.0,
                           "grounded_hmean": 0.0},
        f"always answer '{majority}'": {"answer_rate": 1.0, "correct_abstention": 0.0,
                                        "answer_abstain_mean": 0.5, "answer_abstain_hmean": 0.0,
                                        "accuracy_answered": hits / len(gold),
                                        "accuracy_all": hits / len(gold), "grounded_hmean": 0.0},
    }


def fmt(x) -> str:
    return "   -  " if x is None else f"{x:6.3f}"


COLUMNS = [("answer_rate", "answer"), ("correct_abstention", "abstain"), ("answer_abstain_mean", "mean"),
           ("answer_abstain_hmean", "hmean"), ("accuracy_answered", "acc/ans"), ("accuracy_all", "acc/all"),
           ("grounded_hmean", "grounded")]


def print_table(rows: dict[str, dict]) -> None:
    width = max(len(n) for n in rows)
    print(f"{'':{width}}  " + " ".join(f"{h:>8}" for _, h in COLUMNS))
    for name, m in rows.items():
        print(f"{name:{width}}  " + " ".join(f"{fmt(m.get(k)):>8}" for k, _ in COLUMNS))


def suffix_label(s: str) -> str:
    return repr(s) if s else "(none)"


# ---------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kiln-bin", type=Path, default=default_binary(),
                    help="the kiln binary (copy it first if others rebuild it)")
    ap.add_argument("--kiln-home", type=Path,
                    default=Path(os.environ.get("KILN_TEST_HOME", Path.home() / ".cache" / "kiln" / "home")),
                    help="KILN_HOME with smollm2-135m and all-minilm-l6-v2")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--limit", type=int, default=60, help="scored questions: the first N test ids")
    ap.add_argument("--tuning-limit", type=int, default=40, help="tuning questions: the first N other ids")
    ap.add_argument("--suffix", help="use this prompt suffix and skip tuning")
    ap.add_argument("--sources", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reuse-dir", type=Path,
                    help="keep the database and knowledge base here; a later run uploads only the "
                         "passages it lacks (default: a temporary directory, removed)")
    ap.add_argument("--ingest-timeout", type=float, default=3600, help="seconds")
    ap.add_argument("--out", type=Path, default=Path("/tmp/rag_answers.json"))
    ap.add_argument("--partner", choices=("next", "nearest"), default="next",
                    help="whose passages an unanswerable ask gets: the next question's, or those of "
                         "the question whose passage vector search ranks first (the hard case)")
    ap.add_argument("--cosine", type=float,
                    help="the relevance gate's cosine threshold for every ask (default: the knowledge base's)")
    args = ap.parse_args()
    if not args.kiln_bin.exists():
        raise SystemExit(f"{args.kiln_bin} not found: build kiln-server or pass --kiln-bin")

    items, test = read_pubmedqa(args.data)
    by_number = lambda ids: sorted(ids, key=int)
    tuning_pool = by_number(q for q in items if q not in test)
    scoring_pool = by_number(q for q in items if q in test)
    tuning = tuning_pool[: args.tuning_limit] if args.suffix is None else []
    scoring = scoring_pool[: args.limit]
    # The majority class of the whole tuning split (labels cost nothing to read).
    tuning_labels = collections.Counter(items[q]["final_decision"] for q in tuning_pool)
    majority = tuning_labels.most_common(1)[0][0]
    print(f"scoring: the first {len(scoring)} of {len(scoring_pool)} test ids (by number); "
          f"tuning: the first {len(tuning)} of {len(tuning_pool)} other ids")
    print(f"majority class of the {len(tuning_pool)} tuning questions: {majority!r} ({dict(tuning_labels)})")
    load = {"start": os.getloadavg()[0]}
    if load["start"] > 1.5:
        print(f"note: load average {load['start']:.1f}; asks will be slower (quality figures are not affected)")

    # Passages of the questions asked; partners are in the same lists.
    passages = []
    for qid in tuning + scoring:
        for i, text in enumerate(items[qid]["CONTEXTS"], 1):
            passages.append((f"{qid}-{i}.txt", qid, text))
    owners: dict[str, set[str]] = {}

    workdir = args.reuse_dir or Path(tempfile.mkdtemp(prefix="rag-answers-"))
    workdir.mkdir(parents=True, exist_ok=True)
    state_path = workdir / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}

    def save():
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(state_path)

    server = KilnServer(args.kiln_bin, args.kiln_home, workdir, args.threads)
    try:
        host, port = server.wait_listening()
        if server.admin_key:
            state = {"admin_key": server.admin_key}
            save()
        elif "admin_key" not in state:
            raise SystemExit(f"{workdir} has a database but no state.json with its admin key; remove it")
        print(f"kiln serve at http://{host}:{port} ({args.kiln_bin}), log {server.log_path}")
        api = Api(host, port, state["admin_key"])
        state["kb"] = kb = find_or_create_kb(api)
        save()
        records = {d["id"]: d for d in ingest(api, server, state, passages, save, args.ingest_timeout)}
        up = state["uploads"]
        texts: dict[str, str] = {}
        for name, qid, text in passages:
            doc = up[name]["id"]
            owners.setdefault(doc, set()).add(qid)
            texts.setdefault(doc, text)
        dupes = [{"name": name, "question": qid, "document_id": up[name]["id"],
                  "document_name": records[up[name]["id"]]["name"],
                  "filter_value": records[up[name]["id"]]["metadata"].get("q")}
                 for name, qid, _ in passages if up[name]["duplicate"]]
        lost = [d for d in dupes if d["filter_value"] != d["question"]]
        failed = [{"name": d["name"], "status": d["status"], "error": d.get("error")}
                  for d in records.values() if d["status"] != "ready"]
        ingestion = {"passages": len(passages), "documents": len(records),
                     "chunks": sum(d["chunks"] for d in records.values()),
                     "multi_chunk_documents": sum(d["chunks"] > 1 for d in records.values()),
                     "duplicate_uploads": dupes, "duplicates_hidden_from_their_question": lost,
                     "failed": failed}
        print(f"ingestion: {len(passages)} passages -> {len(records)} documents, {ingestion['chunks']} chunks "
              f"({ingestion['multi_chunk_documents']} documents of several chunks); "
              f"{len(dupes)} duplicate uploads, {len(lost)} of them filed under another question's "
              f"metadata (so missing from their own question's filter); {len(failed)} not ready")

        tuning_results = {}
        if args.suffix is None:
            for suffix in SUFFIXES:
                print(f"tuning: {len(tuning)} questions, suffix {suffix_label(suffix)}", flush=True)
                recs = run_asks(api, server, kb, items, tuning, suffix, f"tune {SUFFIXES.index(suffix)}", args,
                                owners)
                tuning_results[suffix] = {"summary": summarize(recs, owners, texts), "records": recs}
            # Objective: harmonic mean of accuracy over all answerable asks and
            # correct abstention; either trivial policy scores 0.
            chosen = max(SUFFIXES, key=lambda s: tuning_results[s]["summary"]["grounded_hmean"] or 0.0)
            print()
            print_table({f"tuning, suffix {suffix_label(s)}": tuning_results[s]["summary"] for s in SUFFIXES})
            print(f"chosen suffix: {suffix_label(chosen)}\n")
        else:
            chosen = args.suffix
        print(f"scoring: {len(scoring)} questions, suffix {suffix_label(chosen)}", flush=True)
        load["scoring_start"] = os.getloadavg()[0]
        scored = run_asks(api, server, kb, items, scoring, chosen, "score", args, owners)
        load["end"] = os.getloadavg()[0]
    finally:
        server.stop()

    summary = summarize(scored, owners, texts)
    base = baselines(items, scoring, majority)
    rows = {"kiln": summary, **base}

    print()
    print(f"PubMedQA PQA-L, {summary['questions']} test questions (the first {len(scoring)} test ids), "
          f"each asked with its own passages and with the {args.partner} question's; "
          f"suffix {suffix_label(chosen)}, sources {args.sources}, max_tokens {args.max_tokens}, "
          f"cosine {args.cosine if args.cosine is not None else 'of the knowledge base'}")
    print_table(rows)
    print("answer = answer rate on answerable asks; abstain = correct abstention on unanswerable asks;\n"
          "mean/hmean of those two; acc/ans, acc/all = yes/no/maybe accuracy on answered / all answerable\n"
          "asks (an abstention counts wrong); grounded = harmonic mean of acc/all and abstain")
    ab = summary["abstentions"]
    print(f"abstentions: answerable {ab['answerable_at_gate']} at the relevance gate + "
          f"{ab['answerable_by_model']} by the model; unanswerable {ab['unanswerable_at_gate']} at the gate + "
          f"{ab['unanswerable_by_model']} by the model")
    print(f"labels answered: {summary['labels_answered']} (read from: {summary['label_rules']}); "
          f"gold: {summary['gold_labels']}; {summary['answers_cut_at_max_tokens']} answers cut at max_tokens")
    c = summary["citations"]
    sa = summary["sentences_answerable"]
    su = summary["sentences_unanswerable_answered"]
    print(f"citations: {c['total']} ({c['answerable']} on answerable asks, "
          f"{fmt(c['per_answered_answerable']).strip()} per answer); own-passage precision "
          f"{fmt(c['precision_own_passages']).strip()}; quote in the cited source "
          f"{fmt(c['quote_in_cited_source']).strip()}; quote at its document offsets "
          f"{fmt(c['quote_at_document_offsets']).strip()}; document id = source's "
          f"{fmt(c['document_id_matches_source']).strip()}")
    print(f"sentences of answers on answerable asks: {sa['sentences']}, supported {fmt(sa['supported']).strip()}, "
          f"with [n] marks {fmt(sa['with_citation_marks']).strip()}, supporting source among those cited "
          f"{fmt(sa['cited_source_supports']).strip()}")
    print(f"sentences of answers on unanswerable asks (should have abstained): {su['sentences']}, "
          f"supported {fmt(su['supported']).strip()}")
    sp = summary["seconds_per_ask"]
    print(f"median seconds per ask: {sp['answered']:.1f} answered, {sp['abstained']:.1f} abstained "
          f"(load average {load['start']:.1f} at start, {load['end']:.1f} at end)")
    lacking = summary["answered_but_first_sentence_says_lacking"]
    if lacking:
        print(f"{len(lacking)} answers count as found though their first sentence says the sources lack the "
              f"answer ({sum(x['kind'] == 'answerable' for x in lacking)} on answerable asks), e.g. "
              f"{lacking[0]['answer'][:100]!r}")
    if summary["errors"]:
        print(f"warning: {summary['errors']} asks failed; see the JSON")

    report = {
        "kiln_bin": str(args.kiln_bin),
        "kiln_bin_mtime": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(args.kiln_bin.stat().st_mtime)),
        "data": str(args.data),
        "settings": {"sources": args.sources, "max_tokens": args.max_tokens, "threads": args.threads,
                     "model": "smollm2-135m", "embedding_model": "all-minilm-l6-v2",
                     "partner": args.partner, "cosine": args.cosine},
        "questions": {"scoring": scoring, "tuning": tuning, "partner": "the next id in the same list, "
                      "the last paired with the first"},
        "majority_class": {"label": majority, "tuning_split_labels": dict(tuning_labels)},
        "ingestion": ingestion,
        "tuning": {"objective": "harmonic mean of accuracy over all answerable asks and correct abstention",
                   "note": "only the prompt suffix is tuned; the gate's thresholds are the knowledge "
                           "base's (or --cosine)",
                   "chosen_suffix": chosen,
                   "results": {s: r["summary"] for s, r in tuning_results.items()},
                   "records": {s: r["records"] for s, r in tuning_results.items()}},
        "scoring": {"summary": summary, "baselines": base, "records": scored},
        "load_average_1min": load,
        "reuse_dir": str(args.reuse_dir) if args.reuse_dir else None,
    }
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.out}")
    if not args.reuse_dir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
