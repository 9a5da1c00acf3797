#!/usr/bin/env python3
"""The gateway alone: Kiln (SQLite store; auth, metering, rate limits on)
proxying to a fast mock upstream, against LiteLLM's proxy on the same mock,
in the same run, driven by wrk. See bench/README.md for the method.

    cargo build --release -p kiln-server -p kiln-mock-upstream
    apt-get install wrk ; pip install 'litellm[proxy]==1.74.15'   # in a venv is fine
    python3 bench/bench_gateway.py                      # mock, kiln, litellm
    python3 bench/bench_gateway.py --runs 5 --rates 100,500,1000 --json /tmp/gw.json
    python3 bench/bench_gateway.py --litellm ~/.cache/kiln/litellm-venv/bin/litellm

Targets, each measured `--runs` times:
- mock:    wrk -> mock upstream directly: the generator's and mock's own ceiling
           and latency, the baseline added latency is measured against;
- kiln:    wrk -> kiln serve -> mock, with a member key that has a price, a
           prepaid balance and rate limits, so every request is authenticated,
           rate-limited, reserved and settled in the SQLite ledger;
- nginx:   wrk -> nginx (Debian's package) -> mock, a plain reverse proxy with
           upstream keep-alive and nothing else: what one proxy hop costs on
           this machine, the floor under any gateway's added latency;
- litellm: wrk -> litellm proxy -> mock, in master-key mode: LiteLLM's per-key
           budgets and spend tracking need a database engine it downloads from
           outside the package registries, which this machine cannot reach.

mock, nginx and kiln run side by side and take turns, run by run, so a
change in the machine's load falls on all three alike; litellm runs after
them, alone.
"""

import argparse
import json
import os
import re
import shutil
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
BODY = {"model": "mock", "messages": [{"role": "user", "content": "Say hello to the gateway benchmark."}],
        "max_tokens": 16}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, headers=None) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            req = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status < 500:
                    return
        except urllib.error.HTTPError as e:
            if e.code < 500:
                return
            last = e
        except OSError as e:
            last = e
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout}s: {last}")


class Proc:
    def __init__(self, name: str, cmd: list[str], env=None):
        self.name = name
        self.log_path = Path(tempfile.gettempdir()) / f"bench-gateway-{name}.log"
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


def start_mock(binary: Path) -> tuple[Proc, str]:
    port = free_port()
    p = Proc("mock", [str(binary), "--port", str(port), "--threads", "1"])
    wait_http(f"http://127.0.0.1:{port}/v1/models", 30)
    return p, f"http://127.0.0.1:{port}"


def kiln_cli(binary: Path, db: Path, *args: str) -> str:
    done = subprocess.run([str(binary), *args, "--database", str(db)], capture_output=True, text=True,
                          timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"kiln {' '.join(args)}: {done.stderr}")
    return done.stdout


def start_kiln(binary: Path, mock_url: str, workdir: Path) -> tuple[Proc, str, str, Path]:
    """kiln serve on a fresh SQLite database, with the mock as upstream;
    returns (process, url, member key, database)."""
    db = workdir / "kiln.db"
    config = workdir / "kiln.toml"
    config.write_text(f'[[upstreams]]\nname = "mock"\nbase_url = "{mock_url}/v1"\nmodels = ["mock"]\n')
    kiln_cli(binary, db, "tenants", "create", "bench", "--rpm", "100000000", "--tpm", "1000000000")
    kiln_cli(binary, db, "tenants", "credit", "bench", "1000000")
    kiln_cli(binary, db, "prices", "set", "mock", "--input", "0.15", "--output", "0.6")
    key = kiln_cli(binary, db, "keys", "create", "--tenant", "bench", "--name", "wrk",
                   "--rpm", "100000000", "--tpm", "1000000000").strip()
    port = free_port()
    home = workdir / "home"
    home.mkdir(exist_ok=True)
    env = dict(os.environ, KILN_HOME=str(home), KILN_LOG="warn")
    p = Proc("kiln", [str(binary), "serve", "--config", str(config), "--database", str(db),
                      "--port", str(port)], env=env)
    wait_http(f"http://127.0.0.1:{port}/healthz", 60)
    return p, f"http://127.0.0.1:{port}", key, db


def start_nginx(binary: str, mock_url: str, workdir: Path) -> tuple[Proc, str]:
    """nginx as a bare reverse proxy to the mock: two worker processes (one
    per core, as `worker_processes auto` gives here), HTTP/1.1 keep-alive
    to the upstream, no logging, no buffering of answers."""
    root = workdir / "nginx"
    root.mkdir(exist_ok=True)
    port = free_port()
    upstream = mock_url.removeprefix("http://")
    conf = root / "nginx.conf"
    conf.write_text(
        "daemon off;\n"
        "worker_processes 2;\n"
        f"pid {root}/nginx.pid;\n"
        f"error_log {root}/error.log warn;\n"
        "events { worker_connections 4096; }\n"
        "http {\n"
        "  access_log off;\n"
        + "".join(f"  {kind}_temp_path {root}/{kind};\n"
                  for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        + f"  upstream mock {{ server {upstream}; keepalive 128; }}\n"
        f"  server {{\n"
        f"    listen 127.0.0.1:{port};\n"
        "    location / {\n"
        "      proxy_pass http://mock;\n"
        "      proxy_http_version 1.1;\n"
        '      proxy_set_header Connection "";\n'
        "      proxy_buffering off;\n"
        "    }\n"
        "  }\n"
        "}\n")
    p = Proc("nginx", [binary, "-p", str(root), "-c", str(conf), "-e", str(root / "error.log")])
    wait_http(f"http://127.0.0.1:{port}/v1/models", 30)
    return p, f"http://127.0.0.1:{port}"


def start_litellm(binary: str, mock_url: str, workdir: Path) -> tuple[Proc, str, str]:
    master = "sk-bench-master-key"
    config = workdir / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        "  - model_name: mock\n"
        "    litellm_params:\n"
        "      model: openai/mock\n"
        f"      api_base: {mock_url}/v1\n"
        "      api_key: sk-mock\n"
        "general_settings:\n"
        f"  master_key: {master}\n"
        "litellm_settings:\n"
        "  drop_params: true\n"
        "  set_verbose: false\n"
    )
    port = free_port()
    env = dict(os.environ, LITELLM_LOG="ERROR")
    p = Proc("litellm", [binary, "--config", str(config), "--port", str(port), "--host", "127.0.0.1"], env=env)
    try:
        wait_http(f"http://127.0.0.1:{port}/health/liveliness", 180)
    except RuntimeError:
        p.stop()
        raise RuntimeError("litellm did not start:\n" + p.text()[-3000:])
    return p, f"http://127.0.0.1:{port}", master


LUA = """
wrk.method = "POST"
wrk.body = [[{body}]]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
local pause = {delay}
function delay()
  return pause
end
local threads = {{}}
function setup(thread)
  table.insert(threads, thread)
end
ok = 0
function response(status, headers, body)
  if status == 200 then ok = ok + 1 end
end
function done(summary, latency, requests)
  local total = 0
  for _, t in ipairs(threads) do total = total + t:get("ok") end
  io.write(string.format("OK_RESPONSES %d\\n", total))
end
"""


def run_wrk(url: str, key: str, connections: int, seconds: int, delay_ms: int, workdir: Path) -> dict:
    script = workdir / f"wrk-{connections}-{delay_ms}.lua"
    script.write_text(LUA.format(body=json.dumps(BODY), key=key, delay=delay_ms))
    threads = min(2, connections)
    cmd = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s", "--latency",
           "-s", str(script), url + "/v1/chat/completions"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    return parse_wrk(out)


def to_ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        return float("nan")
    v, unit = float(m.group(1)), m.group(2)
    return {"us": v / 1000, "ms": v, "s": v * 1000, "m": v * 60000}[unit]


def parse_wrk(out: str) -> dict:
    r = {"raw": out}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    r["rps"] = float(m.group(1)) if m else 0.0
    m = re.search(r"(\d+) requests in", out)
    r["requests"] = int(m.group(1)) if m else 0
    m = re.search(r"OK_RESPONSES (\d+)", out)
    r["ok"] = int(m.group(1)) if m else 0
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        r[f"p{pct}"] = to_ms(m.group(1)) if m else float("nan")
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    r["non2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    r["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    r["errors"] = r["non2xx"] + r["socket_errors"]
    return r


def pacing(rate: int) -> tuple[int, int]:
    """(connections, delay per request in ms) for about `rate` req/s: each
    connection waits `delay` between a response and its next request."""
    connections = max(4, min(128, rate // 100))
    delay = max(1, round(connections * 1000 / rate))
    return connections, delay


def measure(side: dict, rates: list[int], args, workdir: Path) -> dict:
    """Each target's warm-up, then `args.runs` rounds in which every target
    has its closed-loop run and its paced runs in turn."""
    out = {name: {"max": [], "rates": {str(rate): [] for rate in rates}} for name in side}
    for name, (url, key) in side.items():
        out[name]["warmup"] = run_wrk(url, key, 8, 2, 0, workdir)
    for _ in range(args.runs):
        for name, (url, key) in side.items():
            out[name]["max"].append(run_wrk(url, key, args.max_connections, args.duration, 0, workdir))
        for rate in rates:
            c, d = pacing(rate)
            for name, (url, key) in side.items():
                out[name]["rates"][str(rate)].append(run_wrk(url, key, c, args.duration, d, workdir))
    return out


def mmm(values: list[float]) -> str:
    vals = [v for v in values if v == v]
    if not vals:
        return "-"
    return f"{min(vals):.3f}/{statistics.median(vals):.3f}/{max(vals):.3f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--duration", type=int, default=8, help="seconds per wrk run")
    ap.add_argument("--rates", default="100,300,1000", help="fixed offered rates, req/s")
    ap.add_argument("--max-connections", type=int, default=32, help="connections for the throughput runs")
    ap.add_argument("--kiln-bin", type=Path, default=REPO / "target" / "release" / "kiln")
    ap.add_argument("--mock-bin", type=Path, default=REPO / "target" / "release" / "kiln-mock-upstream")
    ap.add_argument("--litellm", default=shutil.which("litellm"), help="litellm executable (skipped if none)")
    ap.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx",
                    help="nginx executable (apt-get install nginx; skipped if none)")
    ap.add_argument("--targets", default="mock,nginx,kiln,litellm")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk not found: apt-get install wrk")
    for b in (args.kiln_bin, args.mock_bin):
        if not b.exists():
            sys.exit(f"{b} not found: cargo build --release -p kiln-server -p kiln-mock-upstream")
    rates = [int(r) for r in args.rates.split(",") if r]
    targets = [t for t in args.targets.split(",") if t]
    if "litellm" in targets and not args.litellm:
        print("litellm not found (pip install 'litellm[proxy]==1.74.15'): skipping it", file=sys.stderr)
        targets.remove("litellm")
    if "nginx" in targets and not Path(args.nginx).exists():
        print("nginx not found (apt-get install nginx): skipping it", file=sys.stderr)
        targets.remove("nginx")
    unknown = set(targets) - {"mock", "nginx", "kiln", "litellm"}
    if unknown:
        sys.exit(f"unknown targets: {', '.join(sorted(unknown))}")
    print(f"load average at start: {os.getloadavg()}", file=sys.stderr)
    workdir = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    mock, mock_url = start_mock(args.mock_bin)
    results: dict = {"settings": {k: str(v) for k, v in vars(args).items()}, "targets": {}}
    kiln_db = None
    procs: list[Proc] = []
    try:
        # The light targets side by side, taking turns run by run.
        side = {}
        for target in [t for t in targets if t != "litellm"]:
            if target == "mock":
                side[target] = (mock_url, "unused")
            elif target == "nginx":
                proc, url = start_nginx(args.nginx, mock_url, workdir)
                procs.append(proc)
                side[target] = (url, "unused")
            else:
                proc, url, key, kiln_db = start_kiln(args.kiln_bin, mock_url, workdir)
                procs.append(proc)
                side[target] = (url, key)
        results["targets"].update(measure(side, rates, args, workdir))
        for proc in procs:
            proc.stop()
        procs.clear()
        if "litellm" in targets:
            proc, url, key = start_litellm(args.litellm, mock_url, workdir)
            procs.append(proc)
            results["targets"].update(measure({"litellm": (url, key)}, rates, args, workdir))
    finally:
        for proc in procs:
            proc.stop()
        mock.stop()
    print(f"load average at end: {os.getloadavg()}", file=sys.stderr)

    t = results["targets"]
    print(f"\nGateway benchmark: {args.runs} runs x {args.duration}s, wrk 2 threads, body {len(json.dumps(BODY))} bytes, "
          f"non-streamed chat, 16 completion tokens. min/median/max.")
    print("\nthroughput (closed loop, %d connections): req/s, errors" % args.max_connections)
    for name, r in t.items():
        errs = sum(x["errors"] for x in r["max"])
        print(f"  {name:8} {mmm([x['rps'] for x in r['max']]):>28}   errors {errs}")
    if "kiln" in t and "litellm" in t:
        k = statistics.median(x["rps"] for x in t["kiln"]["max"])
        l = statistics.median(x["rps"] for x in t["litellm"]["max"])
        print(f"  kiln / litellm (medians) = {k / l:.1f}x" if l else "  litellm served nothing")
    print("\nlatency at fixed offered rates (ms p50 | p99), achieved req/s, errors")
    for rate in rates:
        for name, r in t.items():
            runs = r["rates"][str(rate)]
            print(f"  {rate:>6}/s {name:8} p50 {mmm([x['p50'] for x in runs]):>22} | p99 {mmm([x['p99'] for x in runs]):>22}"
                  f"   achieved {mmm([x['rps'] for x in runs])}   errors {sum(x['errors'] for x in runs)}")
        if "mock" in t:
            base = t["mock"]["rates"][str(rate)]
            for name in [n for n in t if n != "mock"]:
                runs = t[name]["rates"][str(rate)]
                add50 = statistics.median(x["p50"] for x in runs) - statistics.median(x["p50"] for x in base)
                add99 = statistics.median(x["p99"] for x in runs) - statistics.median(x["p99"] for x in base)
                print(f"  {rate:>6}/s {name:8} added latency (median of runs vs mock): p50 {add50:.3f} ms, p99 {add99:.3f} ms")
    if kiln_db is not None:
        kr = t["kiln"]
        runs = [kr["warmup"]] + kr["max"] + [x for rs in kr["rates"].values() for x in rs]
        ok = sum(x["ok"] for x in runs)
        # At most one call per connection is in flight when a run stops: the
        # server finishes and records it, the client no longer counts it.
        in_flight = 8 + args.runs * (args.max_connections + sum(pacing(rate)[0] for rate in rates))
        time.sleep(1)
        report = kiln_cli(args.kiln_bin, kiln_db, "usage", "--by", "model", "--csv")
        rows = {line.split(",")[0]: line.split(",") for line in report.splitlines()[1:]}
        ledger = int(rows["mock"][1]) if "mock" in rows else 0
        verdict = "ok" if ok <= ledger <= ok + in_flight else "MISMATCH"
        print(f"\nkiln ledger: {ledger} calls recorded; clients received {ok} 200 responses; "
              f"at most {in_flight} calls were in flight at the cuts: {verdict}")
        results["kiln_ledger_calls"] = ledger
        results["kiln_ok_responses"] = ok
    if args.json:
        for r in t.values():
            for x in [r["warmup"]] + r["max"] + [x for runs in r["rates"].values() for x in runs]:
                x.pop("raw", None)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
