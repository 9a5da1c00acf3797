#!/usr/bin/env python3
"""The relevance gate's cosine side on PubMedQA (PQA-L), through a running
`kiln serve` and its all-MiniLM-L6-v2 `/v1/embeddings`.

The knowledge-base answer path calls retrieval relevant when a hit holds
enough of the question's terms (coverage, scored by the `grounding_eval`
example) or when its vector's cosine similarity to the question reaches
`Thresholds::cosine` (0.63 since this script tuned it; 0.45 before, set by
hand). This scores that cosine
side the way `grounding_eval` scores the term side: each question against
its own abstract's passages (relevant) and against another question's
(irrelevant), the best passage counting; passages are cut at sentence ends
into pieces of at most 60 words (biomedical words run to 2 or 3 tokens
each), about the knowledge bases' chunks. "Another question" is the next one
in id order (the easy case) and the one of the same split whose passages are
nearest the question in embedding space (the hard case: the closest topic
the collection holds). The threshold is tuned on the 500 questions outside
the official test split and scored on the 500 test questions.

    cargo build --release -p kiln-server ; pip install numpy
    python3 bench/gate_eval.py --kiln-bin target/release/kiln   # ~3 min on 2 cores

Another embedding model (one a knowledge base is built on through an
upstream) is scored through a server that serves it:

    python3 bench/gate_eval.py --url http://HOST:PORT --api-key KEY --model bge-small-en-v1.5
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
# `Thresholds::default().cosine` in crates/kiln-rag/src/ground.rs.
SHIPPED = 0.63


def start_kiln(binary: Path, home: Path) -> tuple[subprocess.Popen, str]:
    work = Path(tempfile.mkdtemp(prefix="gate-eval-"))
    proc = subprocess.Popen(
        [str(binary), "serve", "--no-auth", "--port", "0", "--database", str(work / "kiln.db"),
         "--embedding-model", "all-minilm-l6-v2", "--kb-dir", str(work / "kb")],
        env=dict(os.environ, KILN_HOME=str(home)), stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if "kiln listening on " in line:
            return proc, line.split("kiln listening on ")[1].strip()
    raise RuntimeError("kiln did not start")


def embed(url: str, texts: list[str], model: str, key: str | None, batch: int = 32) -> list[list[float]]:
    out = []
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    for i in range(0, len(texts), batch):
        body = json.dumps({"model": model, "input": texts[i:i + batch]}).encode()
        req = urllib.request.Request(url + "/v1/embeddings", body, headers)
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                data = json.load(r)["data"]
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"/v1/embeddings: {e.code} {e.read().decode(errors='replace')}") from None
        out.extend(d["embedding"] for d in sorted(data, key=lambda d: d["index"]))
    return out


def chunks(text: str, max_words: int = 60) -> list[str]:
    """Sentences packed into pieces of at most `max_words` words: about the
    knowledge bases' 192-token chunks (the model takes at most 256)."""
    out, piece = [], []
    for sentence in re.split(r"(?<=[.!?])\s+", text.strip()):
        words = sentence.split()
        if piece and len(piece) + len(words) > max_words:
            out.append(" ".join(piece))
            piece = []
        piece.extend(words[:max_words])
    if piece:
        out.append(" ".join(piece))
    return out


def metrics(scored: list[tuple[float, bool]], t: float) -> dict:
    tp = sum(1 for s, l in scored if s >= t and l)
    fp = sum(1 for s, l in scored if s >= t and not l)
    tn = sum(1 for s, l in scored if s < t and not l)
    fn = sum(1 for s, l in scored if s < t and l)
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return {"threshold": round(t, 2), "accuracy": (tp + tn) / len(scored), "precision": p, "recall": r,
            "f1": 2 * p * r / (p + r) if p + r else 0.0}


def tune(scored: list[tuple[float, bool]]) -> float:
    grid = [i / 100 for i in range(5, 96)]
    return max(grid, key=lambda t: (metrics(scored, t)["accuracy"], -abs(t - SHIPPED)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kiln-bin", type=Path, default=REPO / "target" / "release" / "kiln")
    ap.add_argument("--home", type=Path, default=Path(os.environ.get("KILN_TEST_HOME", Path.home() / ".cache/kiln/home")))
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "pubmedqa")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--url", help="a running server to embed with, instead of starting one")
    ap.add_argument("--api-key", help="its key")
    ap.add_argument("--model", default="all-minilm-l6-v2")
    args = ap.parse_args()
    items = json.loads((args.data / "ori_pqal.json").read_text())
    test = json.loads((args.data / "test_ground_truth.json").read_text())
    ids = sorted(items)
    proc, url = (None, args.url) if args.url else start_kiln(args.kiln_bin, args.home)
    try:
        started = time.monotonic()
        q_vec = dict(zip(ids, embed(url, [items[i]["QUESTION"] for i in ids], args.model, args.api_key)))
        flat = [(i, piece) for i in ids for c in items[i]["CONTEXTS"] for piece in chunks(c)]
        p_vecs: dict[str, list[list[float]]] = {i: [] for i in ids}
        for (i, _), v in zip(flat, embed(url, [c for _, c in flat], args.model, args.api_key)):
            p_vecs[i].append(v)
        took = time.monotonic() - started
    finally:
        if proc:
            proc.terminate()
            proc.wait(timeout=30)

    def unit(m):
        m = np.asarray(m, dtype=np.float64)
        return m / np.linalg.norm(m, axis=-1, keepdims=True)

    qs = {i: unit(v) for i, v in q_vec.items()}
    ps = {i: unit(v) for i, v in p_vecs.items()}

    report = {"embedded": {"questions": len(ids), "passages": len(flat), "seconds": round(took, 1)}}
    for split_name, split in (("tuning", [i for i in ids if i not in test]), ("test", [i for i in ids if i in test])):
        for pick in ("next", "nearest"):
            # best[a][b]: question a's cosine with b's nearest passage.
            passages = np.concatenate([ps[b] for b in split])
            starts = np.cumsum([0] + [len(ps[b]) for b in split[:-1]])
            sims = np.stack([qs[a] for a in split]) @ passages.T
            best = np.maximum.reduceat(sims, starts, axis=1)
            scored = []
            for k in range(len(split)):
                if pick == "next":
                    other = (k + 1) % len(split)
                else:
                    row = best[k].copy()
                    row[k] = -2.0
                    other = int(row.argmax())
                scored.append((float(best[k][k]), True))
                scored.append((float(best[k][other]), False))
            report[f"{split_name}/{pick}"] = scored
    print(f"embedded {len(ids)} questions and {len(flat)} passages in {took:.0f} s\n")
    print(f"{'other side':<9} {'threshold':<24} accuracy precision recall   F1")
    summary = {}
    for pick in ("next", "nearest"):
        t = tune(report[f"tuning/{pick}"])
        for name, thr in (("tuned on the tuning split", t), ("shipped default", SHIPPED)):
            m = metrics(report[f"test/{pick}"], thr)
            summary[f"{pick}/{name}"] = m
            print(f"{pick:<9} {name:<18} {thr:.2f}   {m['accuracy']:.3f}    {m['precision']:.3f}  "
                  f"{m['recall']:.3f}  {m['f1']:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "embedded": report["embedded"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
