#!/usr/bin/env python3
"""Batch-1 decode and prefill throughput: Kiln's engine against llama.cpp on
the same GGUF file, in the same run, reporting min/median/max and the
Kiln / llama.cpp ratio. See bench/README.md for the method.

    python3 bench/bench_engine.py                       # both engines, both models
    python3 bench/bench_engine.py --engines llama.cpp   # the peer only
    python3 bench/bench_engine.py --model PATH --runs 5 --json out.json

Needs `pip install llama-cpp-python` (built natively) and, for Kiln, a release
build: `cargo build --release -p kiln-server` (the `kiln` binary).
"""

import argparse
import ctypes
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Varied prose, repeated as needed and cut to exactly --prefill-tokens tokens.
PASSAGE = (
    "The committee met on a grey Tuesday to review the harbour accounts. Revenue from "
    "the fish market had risen by eleven percent, while the cost of dredging the "
    "channel had nearly doubled after the winter storms. Several members argued that "
    "the lighthouse should be automated; others pointed out that the keeper also ran "
    "the weather station, repaired nets and, in practice, knew more about the tides "
    "than any instrument. A compromise was proposed: buy the new lamp, keep the keeper, "
    "and publish the tide tables every week in the town newspaper. In the afternoon the "
    "discussion turned to the school roof, the price of coal, a request from the choir "
    "for a new piano, and a letter from a professor who wished to measure the fog. "
)
DECODE_PROMPT = "Once upon a time, in a small village at the edge of a dark forest, there lived"


def default_models() -> list[Path]:
    home = Path(os.environ.get("KILN_TEST_HOME", Path.home() / ".cache" / "kiln" / "home"))
    return [home / "models" / "smollm2-135m" / "model.gguf", home / "models" / "gemma3-270m" / "model.gguf"]


def summary(rates: list[float]) -> dict:
    return {"min": min(rates), "median": statistics.median(rates), "max": max(rates), "runs": rates}


# ---------------------------------------------------------------------------
# llama.cpp (llama-cpp-python's low-level API: no Python-side sampling chain)
# ---------------------------------------------------------------------------


class LlamaCpp:
    name = "llama.cpp"

    def __init__(self, path: Path, threads: int, n_ctx: int, n_batch: int):
        import llama_cpp as L

        self.L = L
        self._quiet = L.llama_log_callback(lambda level, text, data: None)
        L.llama_log_set(self._quiet, ctypes.c_void_p(0))
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(str(path).encode(), L.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        p = L.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch = n_ctx, n_batch, n_batch
        p.n_threads = p.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, p)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.version = f"llama-cpp-python {L.__version__} (libllama {L.llama_version().decode()})"

    def tokenize(self, text: str) -> list[int]:
        L = self.L
        raw = text.encode()
        buf = (L.llama_token * (len(raw) + 16))()
        add_bos = L.llama_vocab_get_add_bos(self.vocab)
        n = L.llama_tokenize(self.vocab, raw, len(raw), buf, len(buf), add_bos, True)
        return list(buf[:n])

    def detokenize(self, tokens: list[int]) -> str:
        L = self.L
        out = b""
        for t in tokens:
            if L.llama_vocab_get_add_bos(self.vocab) and t == L.llama_vocab_bos(self.vocab):
                continue
            buf = ctypes.create_string_buffer(256)
            n = L.llama_token_to_piece(self.vocab, t, buf, len(buf), 0, False)
            out += buf.raw[:n]
        return out.decode("utf-8", errors="ignore")

    def _eval(self, tokens: list[int]) -> int:
        L = self.L
        arr = (L.llama_token * len(tokens))(*tokens)
        if L.llama_decode(self.ctx, L.llama_batch_get_one(arr, len(tokens))) != 0:
            raise RuntimeError("llama_decode failed")
        ptr = L.llama_get_logits_ith(self.ctx, -1)
        # argmax in C-speed-ish Python: numpy is imported lazily to keep deps small
        import numpy as np

        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))))

    def _reset(self):
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)

    def completion(self, prompt: str, max_tokens: int) -> tuple[float, int, int]:
        """Tokenize, prefill, greedy-decode max_tokens tokens ignoring EOS.
        Returns (seconds, prompt tokens, completion tokens), timed like an
        HTTP request: everything after the prompt text is known."""
        self._reset()
        t0 = time.perf_counter()
        tokens = self.tokenize(prompt)
        tok = self._eval(tokens)
        for _ in range(max_tokens - 1):
            tok = self._eval([tok])
        return time.perf_counter() - t0, len(tokens), max_tokens

    def close(self):
        self.L.llama_free(self.ctx)
        self.L.llama_model_free(self.model)


# ---------------------------------------------------------------------------
# Kiln, through its OpenAI-compatible HTTP server
# ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class KilnServer:
    name = "kiln"

    def __init__(self, path: Path, binary: Path, url: str | None, api_key: str | None, model_name: str | None,
                 log_path: Path):
        self.proc = None
        self.api_key = api_key
        if url is None:
            if not binary.exists():
                raise RuntimeError(f"{binary} not found: run `cargo build --release -p kiln-server` first")
            port = free_port()
            self.url = f"http://127.0.0.1:{port}"
            self.log = open(log_path, "wb")
            # Keyless (charged to the `local` tenant) on a throwaway database.
            self.db_dir = tempfile.mkdtemp(prefix="kiln-bench-db-")
            cmd = [str(binary), "serve", "--model", str(path), "--port", str(port), "--no-auth",
                   "--database", str(Path(self.db_dir) / "kiln.db")]
            self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
            self._wait_ready(timeout=180)
        else:
            self.url = url.rstrip("/")
        self.model = model_name or self._model_id() or path.parent.name
        self.version = f"kiln ({binary if url is None else self.url}, model {self.model!r})"

    def _request(self, method: str, route: str, body: dict | None = None, timeout: float = 600):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + route, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read() or b"null")

    def _wait_ready(self, timeout: float):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kiln serve exited with {self.proc.returncode}; see {self.log.name}")
            for route in ("/health", "/healthz", "/v1/models"):
                try:
                    self._request("GET", route, timeout=2)
                    return
                except (urllib.error.URLError, ConnectionError, OSError, json.JSONDecodeError):
                    continue
            time.sleep(0.5)
        raise RuntimeError(f"kiln serve not ready after {timeout}s; see {self.log.name}")

    def _model_id(self) -> str | None:
        try:
            models = self._request("GET", "/v1/models", timeout=5)
            return models["data"][0]["id"]
        except Exception:  # noqa: BLE001 (the id is a convenience; --kiln-model overrides)
            return None

    def completion(self, prompt: str, max_tokens: int) -> tuple[float, int, int]:
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True}
        t0 = time.perf_counter()
        resp = self._request("POST", "/v1/completions", body)
        dt = time.perf_counter() - t0
        usage = resp.get("usage") or {}
        return dt, int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))

    def close(self):
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.log.close()


# ---------------------------------------------------------------------------
# The measurements
# ---------------------------------------------------------------------------


def prefill_prompts(peer_tokenizer, n_tokens: int, runs: int) -> list[str]:
    """One prompt per run (warm-up included), each exactly n_tokens long for
    llama.cpp's tokenizer, each with a different start so no engine can reuse a
    cached prefix from the previous run."""
    prompts = []
    for i in range(runs + 1):
        text = f"Meeting {i + 1}, minutes. " + PASSAGE * (1 + 2 * n_tokens // max(1, len(PASSAGE) // 6))
        toks = peer_tokenizer.tokenize(text)[:n_tokens]
        prompts.append(peer_tokenizer.detokenize(toks))
    return prompts


def measure(engine, args, prefill_texts: list[str]) -> dict:
    out = {"engine": engine.name, "version": engine.version}
    # Decode: a short prompt, then N tokens ignoring EOS; rate = completion tokens / request time.
    engine.completion(DECODE_PROMPT, args.decode_tokens)  # warm-up
    rates = []
    for _ in range(args.runs):
        dt, _, n = engine.completion(DECODE_PROMPT, args.decode_tokens)
        if n != args.decode_tokens:
            raise RuntimeError(f"{engine.name}: asked for {args.decode_tokens} tokens, got {n}")
        rates.append(n / dt)
    out["decode"] = summary(rates)
    # Prefill: a fresh ~512-token prompt each run, max_tokens=1; rate = prompt tokens / request time.
    engine.completion(prefill_texts[0], 1)  # warm-up
    rates, counts = [], []
    for text in prefill_texts[1:]:
        dt, n_prompt, _ = engine.completion(text, 1)
        rates.append(n_prompt / dt)
        counts.append(n_prompt)
    out["prefill"] = summary(rates)
    out["prefill_prompt_tokens"] = counts
    return out


def print_table(model: Path, results: list[dict], args) -> None:
    print(f"\n{model}  (threads {args.threads}, batch 1, {args.runs} runs, decode {args.decode_tokens} tokens, "
          f"prefill {args.prefill_tokens} tokens)")
    print(f"  {'metric':<8} {'engine':<10} {'min':>8} {'median':>8} {'max':>8}  tok/s")
    for metric in ("decode", "prefill"):
        for r in results:
            s = r[metric]
            print(f"  {metric:<8} {r['engine']:<10} {s['min']:8.1f} {s['median']:8.1f} {s['max']:8.1f}")
        by = {r["engine"]: r[metric]["median"] for r in results}
        if "kiln" in by and "llama.cpp" in by:
            print(f"  {metric:<8} {'ratio':<10} kiln / llama.cpp (medians) = {by['kiln'] / by['llama.cpp']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, action="append", help="GGUF file (repeatable); default: both test models")
    ap.add_argument("--engines", default="llama.cpp,kiln", help="comma-separated: llama.cpp, kiln")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads (Kiln uses its own setting)")
    ap.add_argument("--kiln-bin", type=Path, default=REPO / "target" / "release" / "kiln")
    ap.add_argument("--kiln-url", help="use an already running Kiln server instead of starting one")
    ap.add_argument("--kiln-model", help="model name for the request (default: first id of GET /v1/models)")
    ap.add_argument("--api-key", default=os.environ.get("KILN_API_KEY"), help="bearer token (default $KILN_API_KEY)")
    ap.add_argument("--json", type=Path, help="also write all results here")
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - {"llama.cpp", "kiln"}
    if unknown:
        ap.error(f"unknown engine(s) {sorted(unknown)}: use llama.cpp and/or kiln")

    load1 = os.getloadavg()[0]
    if load1 > 0.5:
        print(f"warning: 1-minute load average is {load1:.2f}; with {os.cpu_count()} cores, another busy process "
              "makes llama.cpp's spinning threads (and Kiln's) far slower. Benchmark on an idle machine.",
              file=sys.stderr)
    report = {
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()},
        "settings": vars(args) | {"model": None, "json": None, "kiln_bin": str(args.kiln_bin), "api_key": None},
        "models": {},
    }
    for model in args.model or default_models():
        if not model.exists():
            sys.exit(f"missing model {model}")
        # llama.cpp always cuts the prefill prompts, so both engines get the same text.
        peer = LlamaCpp(model, args.threads, n_ctx=2048, n_batch=max(512, args.prefill_tokens))
        texts = prefill_prompts(peer, args.prefill_tokens, args.runs)
        results = []
        try:
            if "llama.cpp" in engines:
                results.append(measure(peer, args, texts))
        finally:
            peer.close()  # frees its memory before Kiln runs; never both at once
        if "kiln" in engines:
            kiln = KilnServer(model, args.kiln_bin, args.kiln_url, args.api_key, args.kiln_model,
                              log_path=Path(f"/tmp/kiln-bench-{model.parent.name}.log"))
            try:
                results.append(measure(kiln, args, texts))
            finally:
                kiln.close()
        print_table(model, results, args)
        report["models"][str(model)] = results
    report["host"]["loadavg_end"] = os.getloadavg()
    print(f"\nload average start {report['host']['loadavg_start']}, end {report['host']['loadavg_end']} "
          "(other work on the machine skews the figures)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
