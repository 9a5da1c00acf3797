#!/usr/bin/env python3
"""Concurrent serving: aggregate throughput and time to first token of
Kiln's server against llama.cpp's server (through xllamacpp), on the same GGUF
file, thread count, prompts and lengths, in the same run. Prints min / median /
max over runs and the Kiln / llama.cpp ratios. See bench/README.md.

    python3 bench/bench_serving.py --llamacpp-python ~/.cache/kiln/peers-venv/bin/python
    python3 bench/bench_serving.py --concurrency 8,16 --runs 3 --json out.json

Needs a release build (`cargo build --release -p kiln-server`) and a Python
with `xllamacpp` built natively (see bench/README.md).
"""

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Distinct openings so that no engine can reuse one request's prompt for another.
TOPICS = [
    "the harbour accounts", "a winter storm", "the village school", "an old lighthouse",
    "the fish market", "a choir's new piano", "measuring the fog", "the price of coal",
    "a letter from abroad", "the railway timetable", "a bakery at dawn", "the town clock",
    "a lost umbrella", "the river ferry", "an orchard in spring", "the night watchman",
    "a broken bridge", "the museum's basement", "a chess tournament", "the summer fair",
]


def prompt_for(i: int, run: int, words: int) -> str:
    head = f"Story {run}.{i}: a report on {TOPICS[i % len(TOPICS)]}. "
    body = ("The committee met again and discussed the matter at length, "
            "taking notes on every detail that seemed to matter. ") * (words // 18 + 1)
    return head + " ".join(body.split()[:words])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    host, port = url.removeprefix("http://").split(":")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}; see {log}")
        try:
            c = http.client.HTTPConnection(host, int(port), timeout=2)
            c.request("GET", "/v1/models")
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    sys.exit(f"server not ready after {timeout}s; see {log}")


LLAMACPP_SERVER = textwrap.dedent("""
    import sys, time, xllamacpp as xlc
    model, port, threads, parallel, ctx = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    p = xlc.CommonParams()
    p.model.path = model
    p.port = port
    p.n_parallel = parallel
    p.n_ctx = ctx
    p.cpuparams.n_threads = threads
    p.cpuparams_batch.n_threads = threads
    print("SYSTEM_INFO", xlc.get_system_info(), flush=True)
    s = xlc.Server(p)
    print("LISTENING", s.listening_address, flush=True)
    while True:
        time.sleep(3600)
""")


class Server:
    def __init__(self, name: str, cmd: list[str], port: int, log: Path, model: str):
        self.name, self.port, self.model = name, port, model
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.logf = open(log, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.logf, stderr=subprocess.STDOUT)
        wait_ready(self.url, self.proc, log)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.logf.close()

    def stream(self, prompt: str, max_tokens: int) -> dict:
        """One streamed completion: time to first token, end time, tokens."""
        body = json.dumps({"model": self.model, "prompt": prompt, "max_tokens": max_tokens,
                           "temperature": 0, "ignore_eos": True, "stream": True,
                           "stream_options": {"include_usage": True}})
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        t0 = time.perf_counter()
        c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status != 200:
            raise RuntimeError(f"{self.name}: HTTP {r.status}: {r.read()[:300]!r}")
        ttft, tokens, chunks = None, None, 0
        for raw in r:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            ev = json.loads(data)
            if ev.get("choices") and ev["choices"][0].get("text"):
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
            if ev.get("usage"):
                tokens = ev["usage"].get("completion_tokens")
        end = time.perf_counter()
        return {"start": t0, "ttft": ttft, "end": end, "tokens": tokens or chunks}


def burst(server: Server, n: int, run: int, words: int, max_tokens: int) -> dict:
    """n requests at once; aggregate throughput = generated tokens / wall time
    (prompt processing included)."""
    results: list = [None] * n
    errors: list = []

    def one(i: int) -> None:
        try:
            results[i] = server.stream(prompt_for(i, run, words), max_tokens)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    wall = max(r["end"] for r in results) - t0
    tokens = sum(r["tokens"] for r in results)
    ttfts = sorted(r["ttft"] for r in results)
    p95 = ttfts[min(len(ttfts) - 1, int(round(0.95 * (len(ttfts) - 1))))]
    return {"tok_s": tokens / wall, "tokens": tokens, "wall_s": wall, "ttft_p95_s": p95,
            "ttft_median_s": statistics.median(ttfts)}


def prefix_ttft(server: Server, run: int, words: int) -> dict:
    """TTFT of a ~`words`-word prompt sent fresh, then of another request
    that starts with the same text and ends differently."""
    shared = prompt_for(run, 1000 + run, words)
    fresh = server.stream(shared + " First question: what was decided?", 1)["ttft"]
    cached = server.stream(shared + " Second question: who objected?", 1)["ttft"]
    return {"uncached_s": fresh, "cached_s": cached, "ratio": cached / fresh}


def summary(xs: list[float]) -> dict:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs), "runs": xs}


def peak_rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def loadavg() -> str:
    try:
        return open("/proc/loadavg").read().split()[0]
    except OSError:
        return "?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    home = Path(os.environ.get("KILN_TEST_HOME", Path.home() / ".cache" / "kiln" / "home"))
    ap.add_argument("--model", type=Path, action="append",
                    help="GGUF file (repeatable); default: both test models")
    ap.add_argument("--concurrency", default="1,8,16")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompt-words", type=int, default=100, help="prompt length in words (~130 tokens)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prefix-words", type=int, default=750, help="shared prefix for the cached-TTFT test (~1000 tokens)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv-cache-mb", type=int, default=512, help="Kiln's KV budget")
    ap.add_argument("--kiln-bin", type=Path,
                    default=Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target")) / "release" / "kiln")
    ap.add_argument("--llamacpp-python", default=sys.executable,
                    help="a Python with xllamacpp installed (built natively)")
    ap.add_argument("--engines", default="llama.cpp,kiln")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    models = args.model or [home / "models" / "smollm2-135m" / "model.gguf",
                            home / "models" / "gemma3-270m" / "model.gguf"]
    levels = [int(c) for c in args.concurrency.split(",")]
    top = max(levels)
    engines = args.engines.split(",")
    print(f"load average at start: {loadavg()}")
    report: dict = {}
    for model in models:
        per_seq_ctx = max(64 + 2 * args.prompt_words + args.max_tokens, 2 * args.prefix_words + 64)
        report[str(model)] = {}
        for engine in engines:
            port = free_port()
            log = Path(tempfile.gettempdir()) / f"bench-serving-{engine}-{model.parent.name}.log"
            if engine == "kiln":
                db = Path(tempfile.mkdtemp(prefix="kiln-bench-db-")) / "kiln.db"
                cmd = [str(args.kiln_bin), "serve", "--model", str(model), "--port", str(port),
                       "--no-auth", "--database", str(db), "--threads", str(args.threads),
                       "--max-batch", str(top), "--queue-capacity", str(4 * top),
                       "--kv-cache-mb", str(args.kv_cache_mb)]
                server = Server("kiln", cmd, port, log, model.parent.name)
            else:
                cmd = [args.llamacpp_python, "-c", LLAMACPP_SERVER, str(model), str(port),
                       str(args.threads), str(top), str(top * per_seq_ctx)]
                server = Server("llama.cpp", cmd, port, log, model.parent.name)
                info = [ln for ln in log.read_text(errors="replace").splitlines() if "SYSTEM_INFO" in ln]
                print(f"llama.cpp system info: {info[0] if info else '(not printed)'}")
            try:
                server.stream(prompt_for(0, -1, args.prompt_words), 8)  # warm-up
                rows = {}
                for n in levels:
                    runs = [burst(server, n, run, args.prompt_words, args.max_tokens) for run in range(args.runs)]
                    rows[n] = {"tok_s": summary([r["tok_s"] for r in runs]),
                               "ttft_p95_s": summary([r["ttft_p95_s"] for r in runs]),
                               "runs": runs}
                    t, f = rows[n]["tok_s"], rows[n]["ttft_p95_s"]
                    print(f"{model.parent.name:14} {engine:9} c={n:<3} throughput tok/s "
                          f"{t['min']:7.1f} / {t['median']:7.1f} / {t['max']:7.1f}   "
                          f"p95 TTFT s {f['min']:6.3f} / {f['median']:6.3f} / {f['max']:6.3f}", flush=True)
                prefix = [prefix_ttft(server, run, args.prefix_words) for run in range(args.runs)]
                rows["prefix"] = {"ratio": summary([p["ratio"] for p in prefix]), "runs": prefix}
                q = rows["prefix"]["ratio"]
                print(f"{model.parent.name:14} {engine:9} TTFT with a cached ~{args.prefix_words}-word prefix / "
                      f"uncached: {q['min']:.3f} / {q['median']:.3f} / {q['max']:.3f}", flush=True)
                if engine == "kiln":
                    peak = peak_rss_mib(server.proc.pid)
                    weights = model.stat().st_size / 2**20
                    rows["peak_rss_mib"] = peak
                    print(f"{model.parent.name:14} kiln      peak RSS {peak:.0f} MiB: weights file {weights:.0f} MiB, "
                          f"KV budget {args.kv_cache_mb} MiB, the rest {peak - weights:.0f} MiB is KV in use "
                          f"plus fixed overhead", flush=True)
                report[str(model)][engine] = rows
            finally:
                server.close()
        if {"kiln", "llama.cpp"} <= set(report[str(model)]):
            k, l = report[str(model)]["kiln"], report[str(model)]["llama.cpp"]
            for n in levels:
                ratio = k[n]["tok_s"]["median"] / l[n]["tok_s"]["median"]
                ttft = k[n]["ttft_p95_s"]["median"] / l[n]["ttft_p95_s"]["median"]
                print(f"{model.parent.name:14} c={n:<3} Kiln/llama.cpp aggregate throughput {ratio:5.2f}x, "
                      f"p95 TTFT ratio {ttft:5.2f} (lower is better)")
    print(f"load average at end: {loadavg()}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
