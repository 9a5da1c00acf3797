#!/usr/bin/env python3
"""Durable runs: what the journal adds to each step, and runs per second,
on SQLite and on PostgreSQL, with a mock model that answers at once, for
an agent and for a 10-step workflow; then one real SmolLM2-135M call for
scale. See bench/README.md for the method.

    cargo build --release -p kiln-server -p kiln-mock-upstream    # nothing is built here
    python3 bench/bench_agents.py                                  # both shapes, SQLite then PostgreSQL
    python3 bench/bench_agents.py --shapes workflow --stores sqlite --rounds 5 --out /tmp/b.json
    python3 bench/bench_agents.py --pg-url postgres://kiln:kiln@127.0.0.1:55432/kiln

The workflow (`WORKFLOW` below) is 5 model steps and 5 calculator steps,
alternating, each taking the one before it through a template; its
baseline is its 5 model calls sent straight to /v1.

The agent's mock (`kiln-mock-upstream --tool-rounds 5`) calls the calculator five
times and then answers, so one run is 6 model steps and 5 calculator steps,
11 journaled steps. Kiln proxies each model step to the mock as an upstream
model, metered to the run's key. The baseline is the same six chat requests
sent straight to Kiln's `/v1/chat/completions` (same key, same upstream, same
metering, no run and no journal): run time minus that, over 11 steps, is the
orchestration overhead per step.

A run's time is taken from the client's send to the last step's
`finished_at_ms` in its journal (same machine, same clock; milliseconds),
and as the client's wall time with `wait: true`. Throughput is measured
both ways: clients that wait, and a batch of runs started at once without
waiting, timed by the journal.

PostgreSQL: without `--pg-url`, `scripts/pg.sh start` starts (or finds) the
test cluster; each store run gets a fresh schema, dropped afterwards.
"""

import argparse
import http.client
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
INSTRUCTIONS = "You are a careful assistant. Use the calculator for arithmetic."
INPUT = "What is 1+1, then 1+2, then 1+3, then 1+4, then 1+5?"
# The calculator's definition as an agent's model is offered it (close to
# Kiln's own; the mock reads only the name).
CALCULATOR = {"type": "function", "function": {
    "name": "calculator",
    "description": "Evaluates an arithmetic expression: + - * / % ^, parentheses, decimals.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                   "required": ["expression"], "additionalProperties": False}}}

# The 10-step workflow: model and calculator steps alternating, each fed
# by the step before it through a template.
WORKFLOW_ROUNDS = 5
WORKFLOW_QUESTION = "Count the words of each answer and add the round number."


def workflow_definition() -> dict:
    steps = []
    for k in range(1, WORKFLOW_ROUNDS + 1):
        prompt = "{{ inputs.question }}" if k == 1 else \
            f"{{{{ steps.m{k - 1}.output }}}} has {{{{ steps.c{k - 1}.output }}}} characters. Go on."
        steps.append({"id": f"m{k}", "kind": "model", "model": "mock", "prompt": prompt,
                      "max_tokens": 16, "temperature": 0})
        steps.append({"id": f"c{k}", "kind": "tool", "tool": "calculator",
                      "arguments": {"expression": f"{{{{ length(steps.m{k}.output) }}}} + {k}"}})
    return {"name": "bench", "inputs": {"question": {"type": "string"}}, "steps": steps,
            "output": {"answer": f"{{{{ steps.m{WORKFLOW_ROUNDS}.output }}}}",
                       "total": f"{{{{ steps.c{WORKFLOW_ROUNDS}.output }}}}"}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    def __init__(self, name: str, cmd: list[str], env=None):
        self.log_path = Path(tempfile.gettempdir()) / f"bench-agents-{name}.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Client:
    """One keep-alive HTTP connection (one per thread)."""

    def __init__(self, url: str, key: str | None):
        u = urllib.parse.urlparse(url)
        self.host, self.port, self.key = u.hostname, u.port, key
        self.conn = None

    def call(self, method: str, path: str, body=None, timeout=300) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
            try:
                self.conn.request(method, path, body=data, headers=headers)
                r = self.conn.getresponse()
                raw = r.read()
                return r.status, (json.loads(raw) if raw else {})
            except (http.client.HTTPException, ConnectionError):
                self.conn.close()
                self.conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


def wait_http(url: str, timeout: float) -> None:
    u = urllib.parse.urlparse(url)
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            c = http.client.HTTPConnection(u.hostname, u.port, timeout=2)
            c.request("GET", u.path or "/")
            if c.getresponse().status < 500:
                return
        except OSError as e:
            last = e
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout}s: {last}")


def kiln_cli(binary: Path, database: str, *args: str) -> str:
    done = subprocess.run([str(binary), *args, "--database", database], capture_output=True, text=True,
                          timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"kiln {' '.join(args)}: {done.stderr}")
    return done.stdout


def pg_url(given: str | None) -> str:
    if given:
        return given
    out = subprocess.run([str(REPO / "scripts" / "pg.sh"), "start"], capture_output=True, text=True,
                         timeout=300)
    m = re.search(r"KILN_TEST_PG_URL=(\S+)", out.stdout)
    if out.returncode != 0 or not m:
        raise RuntimeError(f"scripts/pg.sh start failed: {out.stderr[-2000:]}")
    return m.group(1)


def psql(url: str, sql: str) -> None:
    subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", url, "-c", sql], check=True,
                   capture_output=True, timeout=60)


def chat_body(tool_results: int) -> dict:
    """The chat request an agent run sends after `tool_results` calculator
    results (what the baseline sends straight to /v1)."""
    messages = [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": INPUT}]
    for k in range(1, tool_results + 1):
        messages.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": f"call_{k}", "type": "function",
             "function": {"name": "calculator", "arguments": f'{{"expression": "1+{k}"}}'}}]})
        messages.append({"role": "tool", "tool_call_id": f"call_{k}", "content": str(1 + k)})
    return {"model": "mock", "messages": messages, "tools": [CALCULATOR], "max_tokens": 16,
            "temperature": 0, "stream": False}


class Store:
    """A kiln server on a fresh database, with a tenant, its keys and the agent."""

    def __init__(self, kind: str, args, mock_url: str, workdir: Path):
        self.kind, self.args, self.schema, self.base_url = kind, args, None, None
        if kind == "sqlite":
            self.database = str(workdir / f"kiln-{kind}.db")
        else:
            self.base_url = pg_url(args.pg_url)
            self.schema = f"bench_agents_{uuid.uuid4().hex[:12]}"
            psql(self.base_url, f"CREATE SCHEMA {self.schema}")
            sep = "&" if "?" in self.base_url else "?"
            self.database = f"{self.base_url}{sep}options=-csearch_path%3D{self.schema}"
        self.proc = None
        try:
            self._start(args, mock_url, workdir)
        except BaseException:
            self.stop()
            raise

    def _start(self, args, mock_url: str, workdir: Path) -> None:
        kind, b, db = self.kind, args.kiln_bin, self.database
        config = workdir / f"kiln-{kind}.toml"
        config.write_text(f'[[upstreams]]\nname = "mock"\nbase_url = "{mock_url}/v1"\nmodels = ["mock"]\n')
        kiln_cli(b, db, "tenants", "create", "bench", "--rpm", "100000000", "--tpm", "1000000000")
        kiln_cli(b, db, "tenants", "credit", "bench", "1000000")
        kiln_cli(b, db, "prices", "set", "mock", "--input", "0.15", "--output", "0.6")
        self.admin = kiln_cli(b, db, "keys", "create", "--tenant", "bench", "--name", "admin", "--role",
                              "tenant_admin").strip()
        self.member = kiln_cli(b, db, "keys", "create", "--tenant", "bench", "--name", "runner",
                               "--rpm", "100000000", "--tpm", "1000000000").strip()
        port = free_port()
        home = workdir / f"home-{kind}"
        home.mkdir(exist_ok=True)
        env = dict(os.environ, KILN_HOME=str(home), KILN_LOG="warn")
        self.url = f"http://127.0.0.1:{port}"
        self.proc = Proc(f"kiln-{kind}", [str(b), "serve", "--config", str(config), "--database", db,
                                          "--port", str(port)], env=env)
        try:
            wait_http(f"{self.url}/healthz", 60)
        except RuntimeError:
            raise RuntimeError(f"kiln serve ({kind}) did not start:\n{self.proc.text()[-3000:]}") from None
        agent = {"name": "bench", "model": "mock", "instructions": INSTRUCTIONS, "tools": ["calculator"],
                 "max_steps": args.tool_rounds + 2, "step_tokens": 16, "temperature": 0}
        status, body = Client(self.url, self.admin).call("POST", "/api/agents", agent)
        if status not in (200, 201):
            raise RuntimeError(f"declaring the agent: {status} {body}")
        status, body = Client(self.url, self.admin).call("POST", "/api/workflows", workflow_definition())
        if status not in (200, 201):
            raise RuntimeError(f"declaring the workflow: {status} {body}")

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()
        if self.schema:
            try:
                psql(self.base_url, f"DROP SCHEMA {self.schema} CASCADE")
            except subprocess.CalledProcessError as e:
                print(f"could not drop schema {self.schema}: {e.stderr!r}", file=sys.stderr)


class AgentShape:
    """An agent that calls the calculator `tool_rounds` times, then answers."""

    name = "agent"

    def __init__(self, tool_rounds: int):
        self.tool_rounds = tool_rounds
        self.steps = 2 * tool_rounds + 1
        self.model_calls = tool_rounds + 1
        self.listing = "agent=bench"
        self.label = f"agent: {self.model_calls} model steps + {tool_rounds} calculator steps"

    def start(self, wait: bool) -> dict:
        return {"agent": "bench", "input": INPUT, "wait": wait}

    def direct_run(self, client: Client) -> list[float]:
        """The model calls of one run, straight to /v1: seconds per call."""
        times = []
        for k in range(self.tool_rounds + 1):
            t = time.perf_counter()
            status, body = client.call("POST", "/v1/chat/completions", chat_body(k))
            times.append(time.perf_counter() - t)
            if status != 200:
                raise RuntimeError(f"direct call: {status} {body}")
            want_call = k < self.tool_rounds
            if bool(body["choices"][0]["message"].get("tool_calls")) != want_call:
                raise RuntimeError(f"the mock did not answer as --tool-rounds says: {body}")
        return times


class WorkflowShape:
    """`workflow_definition()`: 5 model steps and 5 calculator steps."""

    name = "workflow"

    def __init__(self):
        self.steps = 2 * WORKFLOW_ROUNDS
        self.model_calls = WORKFLOW_ROUNDS
        self.listing = "workflow=bench"
        self.label = f"workflow: {WORKFLOW_ROUNDS} model steps + {WORKFLOW_ROUNDS} calculator steps"

    def start(self, wait: bool) -> dict:
        return {"workflow": "bench", "input": {"question": WORKFLOW_QUESTION}, "wait": wait}

    def direct_run(self, client: Client) -> list[float]:
        """The run's model calls straight to /v1, each prompt built as the
        workflow builds it."""
        times = []
        prompt = WORKFLOW_QUESTION
        for k in range(1, WORKFLOW_ROUNDS + 1):
            body = {"model": "mock", "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": 16, "temperature": 0, "stream": False}
            t = time.perf_counter()
            status, reply = client.call("POST", "/v1/chat/completions", body)
            times.append(time.perf_counter() - t)
            if status != 200:
                raise RuntimeError(f"direct call: {status} {reply}")
            text = reply["choices"][0]["message"]["content"]
            prompt = f"{text} has {len(text) + k} characters. Go on."
        return times


def one_run(client: Client, shape, expect_steps: int) -> dict:
    """One run with wait: true, and its journal."""
    sent_ms = time.time() * 1000
    t = time.perf_counter()
    status, run = client.call("POST", "/api/runs", shape.start(True))
    wall = time.perf_counter() - t
    if status != 201 or run.get("status") != "succeeded":
        raise RuntimeError(f"run: {status} {json.dumps(run)[:2000]}")
    status, shown = client.call("GET", f"/api/runs/{run['id']}")
    journal = shown["journal"]
    if len(journal) != expect_steps or any(s["state"] != "done" for s in journal):
        raise RuntimeError(f"run {run['id']}: unexpected journal {json.dumps(journal)[:2000]}")
    first, last = journal[0]["started_at_ms"], journal[-1]["finished_at_ms"]
    model = [s["finished_at_ms"] - s["started_at_ms"] for s in journal if s["kind"] == "model"]
    tool = [s["finished_at_ms"] - s["started_at_ms"] for s in journal if s["kind"] == "tool"]
    gaps = [b["started_at_ms"] - a["finished_at_ms"] for a, b in zip(journal, journal[1:])]
    return {
        "wall_s": wall,
        # From the client's send to the last step's output in the journal
        # (same machine, same clock): the run's own time, without the
        # waiting request's 200 ms polling.
        "span_s": (last - sent_ms) / 1000,
        "to_first_step_s": (first - sent_ms) / 1000,
        "model_steps_ms": sum(model),
        "tool_steps_ms": sum(tool),
        "gaps_ms": sum(gaps),
    }


def batch(store: Store, shape, clients: list, total: int, steps: int) -> dict:
    """`total` runs started at once (wait: false) by the clients; the
    server's throughput from the journal's timestamps: runs / (last step
    of any run journaled - first send). Waiting is by polling the run
    list, so no waiting request's poll interval is measured."""
    per = [total // len(clients) + (i < total % len(clients)) for i in range(len(clients))]

    def start(i):
        out = []
        for _ in range(per[i]):
            sent = time.time() * 1000
            status, run = clients[i].call("POST", "/api/runs", shape.start(False))
            if status != 201:
                raise RuntimeError(f"run: {status} {run}")
            out.append((sent, run["id"]))
        return out

    _, started = parallel(len(clients), start)
    started = [x for xs in started for x in xs]
    watcher = Client(store.url, store.member)
    deadline = time.monotonic() + 600
    while True:
        status, listed = watcher.call("GET", f"/api/runs?{shape.listing}&status=running&limit=1000")
        if status != 200:
            raise RuntimeError(f"listing runs: {status} {listed}")
        if not listed["data"]:
            break
        if time.monotonic() > deadline:
            raise RuntimeError("runs did not end within 600 s")
        time.sleep(0.05)
    last = 0
    for _, run_id in started:
        status, shown = watcher.call("GET", f"/api/runs/{run_id}")
        journal = shown["journal"]
        if shown["status"] != "succeeded" or len(journal) != steps:
            raise RuntimeError(f"run {run_id}: {json.dumps(shown)[:2000]}")
        last = max(last, journal[-1]["finished_at_ms"])
    first = min(sent for sent, _ in started)
    seconds = (last - first) / 1000
    return {"runs": total, "seconds": seconds, "runs_per_s": total / seconds}


def parallel(n: int, work) -> tuple[float, list]:
    """Runs work(i) on n threads at once; (wall seconds, results)."""
    results: list = [None] * n
    errors: list = []
    start = threading.Barrier(n + 1)

    def go(i):
        try:
            start.wait()
            results[i] = work(i)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    start.wait()
    t = time.perf_counter()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    if errors:
        raise errors[0]
    return wall, results


def measure(store: Store, shape, args) -> dict:
    steps, model_calls = shape.steps, shape.model_calls
    one = Client(store.url, store.member)
    for _ in range(2):  # warm-up: connections, caches, the first runs
        shape.direct_run(one)
        one_run(one, shape, steps)
    rounds = []
    for r in range(args.rounds):
        base, runs = [], []
        # Interleaved, so both see the same noise, and each after the same
        # idle pause (a waiting run's answer comes up to 200 ms after its
        # end): the first call after a pause is slower than the next ones.
        for _ in range(args.runs):
            base.append(shape.direct_run(one))
            time.sleep(0.2)
            runs.append(one_run(one, shape, steps))
        per_run_model = statistics.median(sum(b) for b in base)
        span = statistics.median(x["span_s"] for x in runs)
        wall = statistics.median(x["wall_s"] for x in runs)
        clients = [Client(store.url, store.member) for _ in range(args.concurrency)]
        conc_wall, conc = parallel(args.concurrency, lambda i: [
            one_run(clients[i], shape, steps) for _ in range(args.concurrent_runs)])
        total_runs = args.concurrency * args.concurrent_runs
        direct_wall, _ = parallel(args.concurrency, lambda i: [
            shape.direct_run(clients[i]) for _ in range(args.concurrent_runs)])
        spans = [x["span_s"] for xs in conc for x in xs]
        burst = batch(store, shape, clients, args.batch, steps)
        rounds.append({
            "direct_call_ms": statistics.median(t for b in base for t in b) * 1000,
            "direct_per_run_ms": per_run_model * 1000,
            "run_span_ms": span * 1000,
            "run_wall_ms": wall * 1000,
            "overhead_per_step_ms": (span - per_run_model) / steps * 1000,
            "overhead_per_step_wall_ms": (wall - per_run_model) / steps * 1000,
            "steps_per_s": steps / span,
            "to_first_step_ms": statistics.median(x["to_first_step_s"] for x in runs) * 1000,
            "model_steps_ms": statistics.median(x["model_steps_ms"] for x in runs),
            "tool_steps_ms": statistics.median(x["tool_steps_ms"] for x in runs),
            "gaps_ms": statistics.median(x["gaps_ms"] for x in runs),
            "concurrent_runs_per_s": total_runs / conc_wall,
            "concurrent_span_ms": statistics.median(spans) * 1000,
            "concurrent_wall_ms": statistics.median(x["wall_s"] for xs in conc for x in xs) * 1000,
            "batch_runs_per_s": burst["runs_per_s"],
            "batch_steps_per_s": burst["runs_per_s"] * steps,
            "concurrent_direct_runs_per_s": total_runs / direct_wall,
            "concurrent_direct_calls_per_s": total_runs * model_calls / direct_wall,
            "sequential": runs,
            "concurrent": [x for xs in conc for x in xs],
        })
        print(f"  {shape.name} on {store.kind} round {r + 1}: run {span * 1000:.1f} ms (wall {wall * 1000:.1f}), "
              f"direct {per_run_model * 1000:.1f} ms, overhead/step "
              f"{rounds[-1]['overhead_per_step_ms']:.2f} ms, {total_runs / conc_wall:.1f} runs/s "
              f"at {args.concurrency} (wait), {burst['runs_per_s']:.1f} runs/s for {args.batch} at once",
              file=sys.stderr)
    return {"rounds": rounds}


def real_call(args, workdir: Path) -> dict:
    """One chat call to a real model on Kiln's embedded engine (SmolLM2-135M
    by default): what a model step costs when the model is not a mock.
    A separate server, so its engine never shares the journal's measured
    runs."""
    port = free_port()
    env = dict(os.environ, KILN_HOME=str(args.models_home), KILN_LOG="warn", KILN_MODELS=args.real_model)
    proc = Proc("kiln-real", [str(args.kiln_bin), "serve", "--no-auth", "--port", str(port),
                              "--database", str(workdir / "real.db")], env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        try:
            wait_http(f"{url}/healthz", 120)
        except RuntimeError:
            raise RuntimeError(f"kiln serve with {args.real_model} did not start:\n{proc.text()[-3000:]}") \
                from None
        client = Client(url, None)
        body = {"model": args.real_model, "messages": [{"role": "user", "content": WORKFLOW_QUESTION}],
                "max_tokens": 16, "temperature": 0, "stream": False}
        times = []
        for i in range(2 + args.real_calls):
            t = time.perf_counter()
            status, reply = client.call("POST", "/v1/chat/completions", body)
            if status != 200:
                raise RuntimeError(f"{args.real_model}: {status} {reply}")
            if i >= 2:  # two warm-up calls
                times.append((time.perf_counter() - t) * 1000)
        tokens = reply["usage"]["completion_tokens"]
        return {"model": args.real_model, "max_tokens": 16, "completion_tokens": tokens, "ms": times}
    finally:
        proc.stop()


def mmm(values, fmt="{:.1f}") -> str:
    return "/".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def report(shape, results: dict, args) -> None:
    stores = results["shapes"][shape.name]
    kinds = list(stores)
    print(f"\n{shape.label} = {shape.steps} steps per run; {args.rounds} rounds of {args.runs} sequential "
          f"runs and {args.concurrency}x{args.concurrent_runs} concurrent runs. min/median/max over rounds "
          f"of each round's median.\n")
    rows = [
        ("direct: one chat call through Kiln, ms", "direct_call_ms", "{:.2f}"),
        (f"direct: the run's {shape.model_calls} calls in sequence, ms", "direct_per_run_ms", "{:.1f}"),
        ("run: send to last step journaled, ms", "run_span_ms", "{:.1f}"),
        ("run: client wall time (wait: true), ms", "run_wall_ms", "{:.1f}"),
        ("  of which send to first step, ms", "to_first_step_ms", "{:.1f}"),
        ("  model steps (journaled span), ms", "model_steps_ms", "{:.0f}"),
        ("  tool steps (journaled span), ms", "tool_steps_ms", "{:.0f}"),
        ("  between steps, ms", "gaps_ms", "{:.0f}"),
        ("steps per second (one run at a time)", "steps_per_s", "{:.0f}"),
        ("orchestration overhead per step, ms", "overhead_per_step_ms", "{:.2f}"),
        ("  the same from client wall time, ms", "overhead_per_step_wall_ms", "{:.2f}"),
        (f"runs/s, {args.concurrency} clients (wait: true)", "concurrent_runs_per_s", "{:.1f}"),
        (f"  run span at {args.concurrency} clients, ms", "concurrent_span_ms", "{:.1f}"),
        (f"  client wall at {args.concurrency} clients, ms", "concurrent_wall_ms", "{:.1f}"),
        (f"runs/s, {args.batch} started at once (journal clock)", "batch_runs_per_s", "{:.1f}"),
        (f"  steps/s, {args.batch} started at once", "batch_steps_per_s", "{:.0f}"),
        (f"direct run-equivalents/s, {args.concurrency} clients", "concurrent_direct_runs_per_s", "{:.1f}"),
    ]
    print("| | " + " | ".join(kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    for label, key, fmt in rows:
        cells = [mmm([r[key] for r in stores[k]["rounds"]], fmt) for k in kinds]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print()
    real = results.get("real_call")
    for k in kinds:
        rs = stores[k]["rounds"]
        med = lambda key: statistics.median(r[key] for r in rs)  # noqa: E731
        summary = {"run_vs_direct": med("run_span_ms") / med("direct_per_run_ms"),
                   "overhead_per_step_vs_direct_call": med("overhead_per_step_ms") / med("direct_call_ms"),
                   "concurrent_runs_vs_direct": med("concurrent_runs_per_s") / med("concurrent_direct_runs_per_s"),
                   "batch_runs_vs_direct": med("batch_runs_per_s") / med("concurrent_direct_runs_per_s")}
        line = (f"{shape.name} on {k}: a run takes {summary['run_vs_direct']:.2f}x its model calls made "
                f"directly; the overhead per step is {summary['overhead_per_step_vs_direct_call']:.2f}x one "
                f"direct call to the mock; runs/s is {summary['concurrent_runs_vs_direct']:.2f}x the direct "
                f"run-equivalents/s at {args.concurrency} clients with wait: true, "
                f"{summary['batch_runs_vs_direct']:.2f}x with {args.batch} started at once")
        if real:
            per_step = [r["overhead_per_step_ms"] for r in rs]
            call = statistics.median(real["ms"])
            summary["overhead_per_step_vs_real_call"] = [x / call for x in per_step]
            line += (f"; overhead per step / one {real['model']} call ({call:.0f} ms, "
                     f"{real['completion_tokens']} tokens): {mmm([x / call for x in per_step], '{:.4f}')}")
        stores[k]["summary"] = summary
        print(line)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="agent,workflow")
    ap.add_argument("--stores", default="sqlite,postgres")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=20, help="sequential runs per round (and direct run-equivalents)")
    ap.add_argument("--concurrency", type=int, default=8, help="clients in the concurrent part")
    ap.add_argument("--concurrent-runs", type=int, default=5, help="runs per client per round")
    ap.add_argument("--batch", type=int, default=40, help="runs started at once (wait: false) per round")
    ap.add_argument("--tool-rounds", type=int, default=5, help="calculator calls per agent run")
    ap.add_argument("--pg-url", help="PostgreSQL URL (default: scripts/pg.sh start)")
    ap.add_argument("--kiln-bin", type=Path, default=TARGET / "release" / "kiln")
    ap.add_argument("--mock-bin", type=Path, default=TARGET / "release" / "kiln-mock-upstream")
    ap.add_argument("--real-model", default="smollm2-135m",
                    help="a model installed under --models-home, for one real call ('' skips it)")
    ap.add_argument("--models-home", type=Path,
                    default=Path(os.environ.get("KILN_TEST_HOME", Path.home() / ".cache" / "kiln" / "home")))
    ap.add_argument("--real-calls", type=int, default=9)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    for b in (args.kiln_bin, args.mock_bin):
        if not b.exists():
            sys.exit(f"{b} not found: cargo build --release -p kiln-server -p kiln-mock-upstream")
    stores = [s for s in args.stores.split(",") if s]
    for s in stores:
        if s not in ("sqlite", "postgres"):
            sys.exit(f"unknown store {s} (sqlite, postgres)")
    known = {"agent": AgentShape(args.tool_rounds), "workflow": WorkflowShape()}
    shapes = []
    for name in (x for x in args.shapes.split(",") if x):
        if name not in known:
            sys.exit(f"unknown shape {name} (agent, workflow)")
        shapes.append(known[name])
    load_start = os.getloadavg()
    print(f"load average at start: {load_start}", file=sys.stderr)
    if load_start[0] > 1.5:
        print("warning: the machine is busy; the figures will be noisy", file=sys.stderr)
    workdir = Path(tempfile.mkdtemp(prefix="bench-agents-"))
    port = free_port()
    mock = Proc("mock", [str(args.mock_bin), "--port", str(port), "--threads", "1",
                         "--tool-rounds", str(args.tool_rounds)])
    mock_url = f"http://127.0.0.1:{port}"
    results: dict = {"settings": {k: str(v) for k, v in vars(args).items()},
                     "shapes": {shape.name: {} for shape in shapes}}
    try:
        wait_http(f"{mock_url}/v1/models", 30)
        for kind in stores:
            store = Store(kind, args, mock_url, workdir)
            try:
                for shape in shapes:
                    results["shapes"][shape.name][kind] = measure(store, shape, args)
            finally:
                store.stop()
        if args.real_model:
            results["real_call"] = real_call(args, workdir)
    finally:
        mock.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    load_end = os.getloadavg()
    print(f"load average at end: {load_end}", file=sys.stderr)
    results["load_average"] = {"start": load_start, "end": load_end}
    real = results.get("real_call")
    if real:
        print(f"\nOne {real['model']} chat call on the embedded engine, {real['completion_tokens']} tokens "
              f"(max_tokens 16), ms: {mmm(real['ms'])} over {len(real['ms'])} calls")
    for shape in shapes:
        report(shape, results, args)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
        print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
