"""Durable runs under crashes: `kiln serve` kills itself with a real
SIGKILL at each journaling point of a run (`KILN_CRASH_AT`), is started
again, and must finish the run from its journal with every side effect
taken exactly once.

The run's model is a scripted OpenAI-compatible upstream (a stand-in for a
vLLM-style server, which cannot run here): its first reply calls the
`http_request` tool to POST to an effects server on loopback, which honours
`Idempotency-Key` and counts what it applied; its second reply answers.
So a run is three steps: model (seq 0), tool (seq 1), model (seq 2).

A workflow runs that agent as a sub-agent, waits for an approval, then
asks the model for a summary; it is killed at the journaling points of
its sub-agent's steps, of its approval and of the steps after it."""

import json
import os
import subprocess
import threading
import time
import urllib.error
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import kiln_cli, start_kiln
from test_metering import api

MODEL = "scripted"


class Effects:
    """What the effects server saw: every request's key, and the effects
    applied (one per distinct key)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = []
        self.applied = {}


def serve(handler_class):
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_class)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def effects():
    seen = Effects()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length).decode()
            key = self.headers.get("idempotency-key")
            with seen.lock:
                seen.requests.append(key)
                first = key not in seen.applied
                if first:
                    seen.applied[key] = body
                count = len(seen.applied)
            reply = json.dumps({"applied": first, "effects": count}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

    server = serve(Handler)
    yield seen, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def scripted_model(effects):
    _, effects_url = effects

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            length = int(self.headers.get("content-length") or 0)
            req = json.loads(self.rfile.read(length))
            messages = req["messages"]
            prompt = sum(len(str(m.get("content") or "").split()) for m in messages)
            tool_results = [m for m in messages if m["role"] == "tool"]
            if not req.get("tools"):
                # A workflow's model step: no tools offered, a plain answer.
                message = {"role": "assistant", "content": "summary: " + str(messages[-1]["content"])[:200]}
                finish, completion = "stop", 6
            elif not tool_results:
                args = {"url": f"{effects_url}/charge", "method": "POST", "body": "charge 10"}
                message = {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "http_request", "arguments": json.dumps(args)},
                    }],
                }
                finish, completion = "tool_calls", 12
            else:
                message = {"role": "assistant", "content": "done: " + str(tool_results[-1]["content"])[:200]}
                finish, completion = "stop", 8
            reply = json.dumps({
                "id": "chatcmpl-scripted",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": req["model"],
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                          "total_tokens": prompt + completion},
            }).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

    server = serve(Handler)
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


AGENT = {
    "name": "charger",
    "model": MODEL,
    "instructions": "Charge the customer, then confirm.",
    "tools": ["http_request"],
    "max_steps": 4,
}

# Every journaling point of each of the three steps, and the run's end.
CRASHES = [f"{point}:{n}" for point in ("begun", "worked", "finished") for n in (1, 2, 3)] + ["ending:1"]


def wait_for_end(url, key, run_id, timeout=60):
    """The run once it has ended."""
    deadline = time.monotonic() + timeout
    while True:
        status, run = api(url, key, "GET", f"/api/runs/{run_id}")
        assert status == 200, run
        if run["status"] not in ("running", "waiting"):
            return run
        assert time.monotonic() < deadline, run
        time.sleep(0.2)


def wait_for_exit(kiln, timeout=60):
    try:
        return kiln.proc.wait(timeout=timeout)
    except Exception:
        kiln.proc.kill()
        raise


@pytest.mark.parametrize("crash", CRASHES)
def test_a_run_killed_at_every_journaling_point_ends_once_with_one_effect(
    crash, tmp_path, monkeypatch, effects, scripted_model
):
    seen, _ = effects
    config = kiln_config(tmp_path, scripted_model)
    db = tmp_path / "kiln.db"
    args = ("--config", str(config), "--database", str(db))
    monkeypatch.setenv("KILN_LEASE_SECONDS", "2")
    monkeypatch.setenv("KILN_CRASH_AT", crash)
    kiln = start_kiln(*args)
    key = kiln.admin_key
    assert api(kiln.url, key, "POST", "/api/agents", AGENT)[0] == 201
    try:
        api(kiln.url, key, "POST", "/api/runs", {"agent": "charger", "input": "Charge 10 to account 7."})
    except (urllib.error.URLError, ConnectionError):
        pass  # killed before the answer went out: the run is in the store
    code = wait_for_exit(kiln)
    assert code == -9, f"the server was to SIGKILL itself at {crash}, but exited with {code}"
    assert f"killing this process at `{crash.split(':')[0]}`" in "".join(kiln.log)

    monkeypatch.delenv("KILN_CRASH_AT")
    kiln = start_kiln(*args, expect_admin_key=False)
    try:
        status, runs = api(kiln.url, key, "GET", "/api/runs")
        assert status == 200 and len(runs["data"]) == 1, runs
        run_id = runs["data"][0]["id"]
        run = wait_for_end(kiln.url, key, run_id)
        assert run["status"] == "succeeded", run
        journal = run["journal"]
        assert [(s["seq"], s["kind"], s["state"]) for s in journal] == [
            (0, "model", "done"), (1, "tool", "done"), (2, "model", "done")
        ], journal
        tool_key = f"{run_id}:1"
        assert journal[1]["idempotency_key"] == tool_key
        # Exactly one effect, whatever the crash; a step killed after it
        # began (or after its work, before its output was journaled) ran
        # again with the same key.
        with seen.lock:
            sent = [k for k in seen.requests if k == tool_key]
            applied = [k for k in seen.applied if k == tool_key]
        assert len(applied) == 1, seen.requests
        point, n = crash.split(":")
        interrupted_tool = n == "2" and point in ("begun", "worked")
        assert journal[1]["attempts"] == (2 if interrupted_tool else 1), journal[1]
        assert len(sent) == (2 if (point, n) == ("worked", "2") else 1), sent
        assert '"applied"' in journal[1]["output"]["text"], journal[1]
        assert run["result"]["answer"].startswith("done:"), run
        # The model steps that had begun were re-asked once at most.
        for step in (journal[0], journal[2]):
            assert step["attempts"] <= 2, step
    finally:
        kiln.stop()


def kiln_config(tmp_path, scripted_model):
    config = tmp_path / "kiln.toml"
    config.write_text(
        "[[upstreams]]\n"
        f'name = "scripted"\nbase_url = "{scripted_model}"\nmodels = ["{MODEL}"]\n'
        "[http_tool]\n"
        'allow = ["127.0.0.1"]\nallow_private = true\ntimeout_seconds = 10\n'
    )
    return config


@pytest.fixture
def pg_database():
    """A fresh schema in the PostgreSQL of KILN_TEST_PG_URL, as a Kiln
    database URL; dropped afterwards."""
    url = os.environ.get("KILN_TEST_PG_URL")
    if not url:
        if os.environ.get("KILN_SKIP_PG") == "1":
            pytest.skip("KILN_SKIP_PG=1")
        pytest.fail("KILN_TEST_PG_URL is not set: run `eval \"$(scripts/pg.sh start)\"` and export it")
    schema = f"t_{uuid.uuid4().hex}"
    subprocess.run(["psql", url, "-qc", f"CREATE SCHEMA {schema}"], check=True, capture_output=True)
    sep = "&" if "?" in url else "?"
    yield f"{url}{sep}options=-csearch_path%3D{schema}"
    subprocess.run(["psql", url, "-qc", f"DROP SCHEMA {schema} CASCADE"], capture_output=True)


def test_a_run_whose_replica_dies_is_taken_over_by_the_other(
    tmp_path, monkeypatch, effects, scripted_model, pg_database
):
    """Two replicas on one PostgreSQL: the one driving a run is killed with
    SIGKILL after its first step is journaled; once its lease lapses the
    other takes the run over and finishes it, running no step twice."""
    seen, _ = effects
    args = ("--config", str(kiln_config(tmp_path, scripted_model)), "--database", pg_database)
    monkeypatch.setenv("KILN_LEASE_SECONDS", "2")
    survivor = start_kiln(*args)
    key = survivor.admin_key
    try:
        assert api(survivor.url, key, "POST", "/api/agents", AGENT)[0] == 201
        monkeypatch.setenv("KILN_CRASH_AT", "finished:1")
        doomed = start_kiln(*args, expect_admin_key=False)
        monkeypatch.delenv("KILN_CRASH_AT")
        try:
            api(doomed.url, key, "POST", "/api/runs", {"agent": "charger", "input": "Charge 10."})
        except (urllib.error.URLError, ConnectionError):
            pass
        assert wait_for_exit(doomed) == -9
        status, runs = api(survivor.url, key, "GET", "/api/runs")
        assert status == 200 and len(runs["data"]) == 1, runs
        run_id = runs["data"][0]["id"]
        run = wait_for_end(survivor.url, key, run_id)
        assert run["status"] == "succeeded", run
        assert [s["attempts"] for s in run["journal"]] == [1, 1, 1], run["journal"]
        with seen.lock:
            assert len([k for k in seen.requests if k == f"{run_id}:1"]) == 1
        assert "resuming a run from its journal" in "".join(survivor.log)
    finally:
        survivor.stop()


WORKFLOW = {
    "name": "settle",
    "inputs": {"amount": {"type": "integer"}},
    "steps": [
        {"id": "charge", "kind": "agent", "agent": "charger", "input": "Charge {{ inputs.amount }} to account 7."},
        {"id": "sign_off", "kind": "approval", "message": "Charged: {{ steps.charge.output }}", "allow_self": True},
        {"id": "summary", "kind": "model", "model": MODEL, "prompt": "Summarise: {{ steps.charge.output }}"},
    ],
    "output": "{{ steps.summary.output }}",
}

# Per process, `begun` counts 1 charge/version, 2 charge/0 (model),
# 3 charge/1 (the tool), 4 charge/2, 5 sign_off, 6 summary; `worked` and
# `finished` count the same steps but the approval (decided by the API).
WORKFLOW_CRASHES = ["begun:3", "worked:3", "finished:3", "begun:5", "begun:6", "worked:5", "ending:1"]
AFTER_APPROVAL = {"begun:6", "worked:5", "ending:1"}


def wait_for_status(url, key, run_id, statuses, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        status, run = api(url, key, "GET", f"/api/runs/{run_id}")
        assert status == 200, run
        if run["status"] in statuses:
            return run
        assert time.monotonic() < deadline, run
        time.sleep(0.2)


@pytest.mark.parametrize("crash", WORKFLOW_CRASHES)
def test_a_workflow_killed_at_every_journaling_point_ends_once_with_one_effect(
    crash, tmp_path, monkeypatch, effects, scripted_model
):
    seen, _ = effects
    args = ("--config", str(kiln_config(tmp_path, scripted_model)), "--database", str(tmp_path / "kiln.db"))
    monkeypatch.setenv("KILN_LEASE_SECONDS", "2")
    monkeypatch.setenv("KILN_CRASH_AT", crash)
    kiln = start_kiln(*args)
    key = kiln.admin_key
    assert api(kiln.url, key, "POST", "/api/agents", AGENT)[0] == 201
    assert api(kiln.url, key, "POST", "/api/workflows", WORKFLOW)[0] == 201
    status, run = api(kiln.url, key, "POST", "/api/runs", {"workflow": "settle", "input": {"amount": 10}})
    assert status == 201, run
    run_id = run["id"]
    if crash in AFTER_APPROVAL:
        wait_for_status(kiln.url, key, run_id, ("waiting",))
        try:
            api(kiln.url, key, "POST", f"/api/runs/{run_id}/approve", {"comment": "first life"})
        except (urllib.error.URLError, ConnectionError):
            pass
    assert wait_for_exit(kiln) == -9, f"the server was to SIGKILL itself at {crash}"

    monkeypatch.delenv("KILN_CRASH_AT")
    kiln = start_kiln(*args, expect_admin_key=False)
    try:
        run = wait_for_status(kiln.url, key, run_id, ("waiting", "succeeded", "failed", "cancelled"))
        if run["status"] == "waiting":
            assert crash not in AFTER_APPROVAL, run
            status, decided = api(kiln.url, key, "POST", f"/api/runs/{run_id}/approve", {"comment": "second life"})
            assert status == 200, decided
        run = wait_for_end(kiln.url, key, run_id)
        assert run["status"] == "succeeded", run
        assert run["result"]["output"].startswith("summary: Summarise: done: "), run["result"]
        journal = run["journal"]
        assert [(s["seq"], s["path"], s["state"]) for s in journal] == [
            (0, "charge/version", "done"), (1, "charge/0", "done"), (2, "charge/1", "done"),
            (3, "charge/2", "done"), (4, "sign_off", "done"), (5, "summary", "done"),
        ], journal
        decision = journal[4]["output"]
        assert decision["approved"] is True
        assert decision["comment"] == ("first life" if crash in AFTER_APPROVAL else "second life")
        tool_key = f"{run_id}:2"
        with seen.lock:
            applied = [k for k in seen.applied if k == tool_key]
        assert len(applied) == 1, seen.requests
        assert journal[2]["attempts"] == (2 if crash in ("begun:3", "worked:3") else 1), journal[2]
        assert journal[4]["attempts"] == (2 if crash == "begun:5" else 1), journal[4]
    finally:
        kiln.stop()


def test_a_run_stops_cleanly_at_its_cost_budget(tmp_path, effects, scripted_model):
    """With the model priced at one unit per token, an agent and a workflow
    whose `max_cost` the first model call already spends start no model
    call after it; each call is charged in the ledger and the run says
    what it spent."""
    db = tmp_path / "kiln.db"
    kiln = start_kiln("--config", str(kiln_config(tmp_path, scripted_model)), "--database", str(db))
    key = kiln.admin_key
    try:
        kiln_cli(db, "prices", "set", MODEL, "--input", "1000000", "--output", "1000000")
        budget_agent = dict(AGENT, name="thrifty", max_cost=5)
        assert api(kiln.url, key, "POST", "/api/agents", budget_agent)[0] == 201
        status, run = api(kiln.url, key, "POST", "/api/runs", {"agent": "thrifty", "input": "Charge 1.", "wait": True})
        assert run["status"] == "failed", run
        assert "charged its budget of 5" in run["error"], run
        status, shown = api(kiln.url, key, "GET", f"/api/runs/{run['id']}")
        assert [s["kind"] for s in shown["journal"]] == ["model", "tool"], shown["journal"]
        first = shown["journal"][0]["output"]
        assert first["cost_nanos"] == (first["prompt_tokens"] + first["completion_tokens"]) * 10**9, first

        workflow = {
            "name": "thrifty-flow",
            "max_cost": 5,
            "steps": [
                {"id": "first", "kind": "model", "model": MODEL, "prompt": "one"},
                {"id": "count", "kind": "tool", "tool": "calculator", "arguments": {"expression": "1 + 1"}},
                {"id": "second", "kind": "model", "model": MODEL, "prompt": "{{ steps.count.output }}"},
            ],
        }
        assert api(kiln.url, key, "POST", "/api/workflows", workflow)[0] == 201
        status, run = api(kiln.url, key, "POST", "/api/runs", {"workflow": "thrifty-flow", "input": {}, "wait": True})
        assert run["status"] == "failed", run
        assert "step `second` was not started" in run["error"] and "budget of 5" in run["error"], run
        status, shown = api(kiln.url, key, "GET", f"/api/runs/{run['id']}")
        assert [s["path"] for s in shown["journal"]] == ["first", "count"], shown["journal"]
        status, ledger = api(kiln.url, key, "GET", "/api/ledger?limit=50")
        charged = [r for r in ledger["data"] if r["request_id"] == f"{run['id']}-m0"]
        assert len(charged) == 1 and float(charged[0]["cost"]) >= 5, charged
        bad = dict(workflow, name="bad-budget", max_cost=-1)
        status, e = api(kiln.url, key, "POST", "/api/workflows", bad)
        assert status == 400 and "max_cost" in e["error"]["message"], e
    finally:
        kiln.stop()
