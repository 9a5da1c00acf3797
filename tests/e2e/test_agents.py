"""Agents and their durable runs through `/api/agents` and `/api/runs`, on
the real `kiln serve` with SmolLM2: tool calls journaled step by step,
every model step metered to the run's key, versions, tenants, cancel, a
revoked key, the event stream, and a run that survives SIGKILL."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import kiln_binary, kiln_cli, start_kiln
from test_metering import api, new_key, new_tenant

MODEL = "smollm2-135m"


def maths_agent(name="maths", **extra):
    spec = {
        "name": name,
        "model": MODEL,
        "instructions": "You are a careful assistant. Use the calculator for arithmetic.",
        "tools": ["calculator"],
        "tool_choice": "required",
        "max_steps": 4,
        "step_tokens": 48,
        "temperature": 0,
    }
    spec.update(extra)
    return spec


@pytest.fixture(scope="module")
def team(database):
    """A tenant with an admin key and a member key."""
    tenant = new_tenant(database)
    admin = new_key(database, tenant, "--role", "tenant_admin")
    member = new_key(database, tenant)
    return tenant, admin, member


def wait_for(kiln_url, key, run_id, timeout=180):
    deadline = time.monotonic() + timeout
    while True:
        status, run = api(kiln_url, key, "GET", f"/api/runs/{run_id}")
        assert status == 200, run
        if run["status"] in ("succeeded", "failed", "cancelled"):
            return run
        assert time.monotonic() < deadline, run
        time.sleep(0.3)


def test_an_agent_calls_its_tool_and_every_step_is_journaled_and_metered(kiln_url, team):
    _, admin, member = team
    status, agent = api(kiln_url, admin, "POST", "/api/agents", maths_agent())
    assert status == 201, agent
    assert agent["version"] == 1

    status, run = api(
        kiln_url, member, "POST", "/api/runs",
        {"agent": "maths", "input": "What is 17 times 23?", "wait": True},
    )
    assert status == 201, run
    assert run["status"] in ("succeeded", "failed"), run
    status, shown = api(kiln_url, member, "GET", f"/api/runs/{run['id']}")
    assert status == 200
    journal = shown["journal"]
    assert [s["seq"] for s in journal] == list(range(len(journal)))
    assert journal[0]["kind"] == "model" and journal[0]["state"] == "done"
    # The first step was made to call a tool: the calculator ran, and its
    # result (or its error, fed back) is in the journal.
    calls = journal[0]["output"]["tool_calls"]
    assert calls and calls[0]["name"] == "calculator", journal[0]
    assert journal[1]["kind"] == "tool" and journal[1]["name"] == "calculator"
    assert journal[1]["state"] in ("done", "failed")
    assert journal[1]["idempotency_key"] == f"{run['id']}:1"
    assert all(s["attempts"] == 1 for s in journal)
    # The run's times in milliseconds bracket its journal (and agree with
    # the seconds OpenAI-style fields).
    assert shown["created_at_ms"] <= journal[0]["started_at_ms"], shown
    assert journal[-1]["finished_at_ms"] <= shown["finished_at_ms"] <= shown["updated_at_ms"], shown
    assert shown["finished_at"] == shown["finished_at_ms"] // 1000
    if run["status"] == "succeeded":
        assert journal[-1]["kind"] == "model"
        assert run["result"]["answer"] == journal[-1]["output"]["content"]

    # Each model step and each tool step is one ledger row, charged to the
    # member's key; tool calls cost nothing.
    status, ledger = api(kiln_url, admin, "GET", "/api/ledger?limit=200")
    assert status == 200
    rows = [r for r in ledger["data"] if str(r.get("request_id", "")).startswith(run["id"])]
    assert all(r["endpoint"] == "/api/runs" for r in rows), rows
    assert len({r["key_id"] for r in rows}) == 1, rows
    model_rows = [r for r in rows if r["model"] == MODEL]
    tool_rows = [r for r in rows if r["model"] == "tool:calculator"]
    model_steps = [s for s in journal if s["kind"] == "model"]
    assert len(model_rows) == len(model_steps), rows
    assert len(tool_rows) == len([s for s in journal if s["kind"] == "tool"]), rows
    assert all(r["prompt_tokens"] == 0 and r["backend"] == "tool" for r in tool_rows), tool_rows
    tokens = sum(s["output"]["prompt_tokens"] + s["output"]["completion_tokens"] for s in model_steps)
    assert sum(r["prompt_tokens"] + r["completion_tokens"] for r in model_rows) == tokens


def test_declarations_are_versioned_checked_and_owned(kiln_url, database, team):
    _, admin, member = team
    spec = maths_agent("versions")
    assert api(kiln_url, admin, "POST", "/api/agents", spec)[0] == 201
    status, same = api(kiln_url, admin, "POST", "/api/agents", spec)
    assert (status, same["version"]) == (200, 1), "the same body is not a new version"
    status, changed = api(kiln_url, admin, "POST", "/api/agents", dict(spec, max_steps=3))
    assert (status, changed["version"]) == (201, 2)
    status, old = api(kiln_url, member, "GET", "/api/agents/versions?version=1")
    assert (status, old["spec"]["max_steps"]) == (200, 4)

    bad = [
        (dict(spec, tools=["shell"]), "tools[0]"),
        (dict(spec, model="no-such-model"), "model"),
        (dict(spec, tool_choice={"type": "function", "function": {"name": "current_time"}}), "tool_choice"),
        (dict(spec, max_steps=0), "max_steps"),
        (dict(spec, surprise=1), "surprise"),
    ]
    for body, field in bad:
        status, err = api(kiln_url, admin, "POST", "/api/agents", body)
        assert status == 400, (body, err)
        assert field in err["error"]["message"], err

    status, err = api(kiln_url, member, "POST", "/api/agents", maths_agent("mine"))
    assert status == 403, err
    status, err = api(kiln_url, member, "POST", "/api/runs", {"agent": "nobody", "input": "x"})
    assert status == 404, err
    status, err = api(kiln_url, member, "POST", "/api/runs", {"agent": "versions"})
    assert status == 400, err

    # Another tenant sees none of it.
    other = new_key(database, new_tenant(database), "--role", "tenant_admin")
    assert api(kiln_url, other, "GET", "/api/agents/versions")[0] == 404
    status, run = api(kiln_url, member, "POST", "/api/runs", {"agent": "versions", "input": "1+1"})
    assert status == 201, run
    assert api(kiln_url, other, "GET", f"/api/runs/{run['id']}")[0] == 404
    assert api(kiln_url, other, "POST", f"/api/runs/{run['id']}/cancel")[0] == 404
    status, listed = api(kiln_url, other, "GET", "/api/runs")
    assert status == 200 and all(r["id"] != run["id"] for r in listed["data"])
    assert wait_for(kiln_url, member, run["id"])["version"] == 2

    # Retired: no new runs; the runs it had keep their version.
    assert api(kiln_url, admin, "DELETE", "/api/agents/versions")[0] == 200
    assert api(kiln_url, member, "POST", "/api/runs", {"agent": "versions", "input": "x"})[0] == 404
    assert api(kiln_url, member, "GET", f"/api/runs/{run['id']}")[0] == 200


def test_a_cancelled_run_stops_before_its_next_step(kiln_url, team):
    _, admin, member = team
    api(kiln_url, admin, "POST", "/api/agents", maths_agent("slow", max_steps=8))
    status, run = api(kiln_url, member, "POST", "/api/runs", {"agent": "slow", "input": "What is 2 + 2?"})
    assert status == 201, run
    status, cancelled = api(kiln_url, member, "POST", f"/api/runs/{run['id']}/cancel")
    assert status == 200, cancelled
    done = wait_for(kiln_url, member, run["id"])
    assert done["status"] == "cancelled", done
    status, shown = api(kiln_url, member, "GET", f"/api/runs/{run['id']}")
    # Steps may have ended, but none is left begun and unfinished.
    assert all(s["state"] != "started" for s in shown["journal"]), shown["journal"]
    # Cancelling what has ended changes nothing.
    status, again = api(kiln_url, member, "POST", f"/api/runs/{run['id']}/cancel")
    assert (status, again["status"]) == (200, "cancelled")


def test_the_event_stream_follows_a_run_to_its_end(kiln_url, team):
    _, admin, member = team
    api(kiln_url, admin, "POST", "/api/agents", maths_agent("events"))
    status, run = api(kiln_url, member, "POST", "/api/runs", {"agent": "events", "input": "What is 3 + 4?"})
    assert status == 201
    req = urllib.request.Request(
        f"{kiln_url}/api/runs/{run['id']}/events",
        headers={"Authorization": f"Bearer {member}"},
    )
    events = []
    with urllib.request.urlopen(req, timeout=180) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        kind = None
        for raw in r:
            line = raw.decode().rstrip("\n")
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                events.append((kind, json.loads(line.split(":", 1)[1])))
    assert events[-1][0] == "run" and events[-1][1]["status"] in ("succeeded", "failed"), events
    steps = [e for k, e in events if k == "step"]
    ended = [s["seq"] for s in steps if s["state"] != "started"]
    assert ended == sorted(set(ended)), "each step ends once, in order"
    status, shown = api(kiln_url, member, "GET", f"/api/runs/{run['id']}")
    assert ended == [s["seq"] for s in shown["journal"]]


def killed_mid_run(db, keys=None):
    """Starts a server on `db` (2 s lease), declares a maths agent and starts
    a run of it with the keys `keys(db)` gives (default: the admin key the
    first start prints), and kills the server with SIGKILL once the run's
    first step is journaled. Returns (admin key, run, the journal's finished
    steps then)."""
    kiln = start_kiln("--model", MODEL, "--database", str(db))
    key = kiln.admin_key
    try:
        declarer, runner = keys(db) if keys else (key, key)
        status, _ = api(kiln.url, declarer, "POST", "/api/agents", maths_agent("durable", max_steps=6))
        assert status == 201
        status, run = api(kiln.url, runner, "POST", "/api/runs", {"agent": "durable", "input": "What is 12 * 12?"})
        assert status == 201, run
        deadline = time.monotonic() + 120
        while True:
            status, shown = api(kiln.url, key, "GET", f"/api/runs/{run['id']}")
            if any(s["state"] == "done" for s in shown["journal"]):
                break
            assert shown["status"] == "running", shown
            assert time.monotonic() < deadline, shown
            time.sleep(0.02)
    finally:
        kiln.proc.kill()
        kiln.proc.wait()
    return key, run, {s["seq"]: s for s in shown["journal"] if s["state"] == "done"}


def test_a_run_survives_sigkill_and_resumes_from_its_journal(tmp_path, monkeypatch):
    """Killed with SIGKILL once the run's first step is journaled and
    started again, the server takes the run over (its old lease lapsed) and
    finishes it without running a journaled step again."""
    monkeypatch.setenv("KILN_LEASE_SECONDS", "2")
    db = tmp_path / "kiln.db"
    key, run, before = killed_mid_run(db)
    kiln = start_kiln("--model", MODEL, "--database", str(db), expect_admin_key=False)
    try:
        done = wait_for(kiln.url, key, run["id"])
        assert done["status"] in ("succeeded", "failed"), done
        status, after = api(kiln.url, key, "GET", f"/api/runs/{run['id']}")
        journal = after["journal"]
        assert [s["seq"] for s in journal] == list(range(len(journal)))
        for seq, step in before.items():
            # Replayed from the journal, not run again.
            assert journal[seq]["output"] == step["output"]
            assert journal[seq]["finished_at_ms"] == step["finished_at_ms"]
            assert journal[seq]["attempts"] == 1
        assert all(s["state"] != "started" for s in journal)
        log = "".join(kiln.log)
        assert "resuming a run from its journal" in log, log[-3000:]
    finally:
        kiln.stop()


def test_a_key_revoked_mid_run_stops_the_run(tmp_path, monkeypatch):
    """The run's key is revoked while its server is down; the resumed run
    checks the key before its next step and ends as failed, saying why."""
    monkeypatch.setenv("KILN_LEASE_SECONDS", "2")
    db = tmp_path / "kiln.db"
    made = {}

    def keys(db):
        made["tenant"] = new_tenant(db)
        admin = new_key(db, made["tenant"], "--role", "tenant_admin")
        return admin, new_key(db, made["tenant"])

    admin, run, _ = killed_mid_run(db, keys)
    listed = kiln_cli(db, "keys", "list", "--tenant", made["tenant"]).splitlines()[1:]
    member = [line for line in listed if "member" in line]
    assert len(member) == 1, listed
    kiln_cli(db, "keys", "revoke", member[0].split()[0])
    kiln = start_kiln("--model", MODEL, "--database", str(db), expect_admin_key=False)
    try:
        done = wait_for(kiln.url, admin, run["id"])
        assert done["status"] == "failed", done
        assert "revoked" in done["error"], done
    finally:
        kiln.stop()


def test_the_cli_declares_from_yaml_and_follows_a_run(kiln_url, team, tmp_path):
    _, admin, member = team
    spec = tmp_path / "cli-maths.yaml"
    spec.write_text(
        "name: cli-maths\n"
        f"model: {MODEL}\n"
        "instructions: Use the calculator for arithmetic.\n"
        "tools: [calculator]\n"
        "tool_choice: required\n"
        "max_steps: 4\n"
        "step_tokens: 48\n"
        "temperature: 0\n"
    )

    def kiln(key, *args):
        env = dict(os.environ, KILN_URL=kiln_url, KILN_API_KEY=key)
        return subprocess.run([str(kiln_binary()), *args], env=env, capture_output=True, text=True, timeout=300)

    made = kiln(admin, "agents", "create", str(spec))
    assert made.returncode == 0, made.stderr
    assert made.stdout.strip() == "cli-maths version 1"
    listed = kiln(member, "agents", "ls")
    assert "cli-maths\t1\t" + MODEL + "\tcalculator" in listed.stdout, listed.stdout
    ran = kiln(member, "runs", "start", "cli-maths", "What is 5 * 8?")
    # Each finished step is narrated on stderr; the tool step comes first.
    assert "model calls calculator(" in ran.stderr, ran.stderr
    assert "] calculator -> " in ran.stderr, ran.stderr
    if ran.returncode == 0:
        assert ran.stdout.strip(), "a succeeded run prints its answer"
    else:
        assert "failed" in ran.stderr, ran.stderr
    runs = kiln(member, "runs", "ls", "--agent", "cli-maths")
    assert runs.returncode == 0 and "cli-maths" in runs.stdout, runs.stdout

    # YAML straight to the API, and a body that is neither.
    req = urllib.request.Request(
        kiln_url + "/api/agents",
        method="POST",
        data=spec.read_text().replace("max_steps: 4", "max_steps: 5").encode(),
        headers={"Authorization": f"Bearer {admin}", "Content-Type": "application/yaml"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 201 and json.loads(r.read())["version"] == 2
    req = urllib.request.Request(
        kiln_url + "/api/agents",
        method="POST",
        data=b"name: [unclosed",
        headers={"Authorization": f"Bearer {admin}", "Content-Type": "application/yaml"},
    )
    try:
        urllib.request.urlopen(req, timeout=60)
        raise AssertionError("an unreadable declaration was accepted")
    except urllib.error.HTTPError as e:
        assert e.code == 400
        assert "not valid YAML" in json.loads(e.read())["error"]["message"]


def test_an_agent_searches_a_knowledge_base_as_its_key_sees_it(kiln_url, team):
    from test_knowledge import upload, wait_final

    _, admin, member = team
    status, kb = api(kiln_url, admin, "POST", "/api/kbs", {"name": "policies"})
    assert status == 201, kb
    text = (
        "# Travel policy\n\nEmployees book economy class for flights under six hours.\n\n"
        "# Expenses\n\nMeals are reimbursed up to 40 euros a day with receipts.\n"
    ).encode()
    status, doc = upload(kiln_url, admin, "policies", "travel.md", text)
    assert status in (200, 201, 202), doc
    assert wait_final(kiln_url, admin, "policies", doc["id"])["status"] == "ready"
    agent = {
        "name": "librarian",
        "model": MODEL,
        "instructions": "Answer from the knowledge base `policies`.",
        "tools": ["kb_search"],
        "tool_choice": {"type": "function", "function": {"name": "kb_search"}},
        "max_steps": 3,
        "step_tokens": 64,
        "temperature": 0,
    }
    assert api(kiln_url, admin, "POST", "/api/agents", agent)[0] == 201
    status, run = api(
        kiln_url, member, "POST", "/api/runs",
        {"agent": "librarian", "input": "How much are meals reimbursed?", "wait": True},
    )
    assert status == 201, run
    status, shown = api(kiln_url, member, "GET", f"/api/runs/{run['id']}")
    step = shown["journal"][1]
    assert (step["kind"], step["name"], step["state"]) == ("tool", "kb_search", "done"), shown["journal"]
    # The schema offered the tenant's knowledge bases by name, so the forced
    # call named this one, and the passages came back with their document.
    assert json.loads(step["input"]["arguments"])["knowledge_base"] == "policies"
    assert "travel.md" in step["output"]["text"], step
    status, ledger = api(kiln_url, admin, "GET", "/api/ledger?limit=200")
    searched = [r for r in ledger["data"] if r["model"] == "tool:kb_search" and r["request_id"].startswith(run["id"])]
    assert len(searched) == 1, searched


def test_an_operators_mcp_server_gives_agents_its_tools(tmp_path):
    """An MCP server from the official Python SDK, started over stdio by
    `kiln serve` from its configuration: its `add` tool is `fixture__add`,
    and a run calls it through the real model."""
    fixture = pathlib.Path(__file__).resolve().parents[2] / "crates/kiln-agents/tests/fixtures/mcp_server.py"
    config = tmp_path / "kiln.toml"
    config.write_text(
        "[[mcp_servers]]\n"
        'name = "fixture"\n'
        f'command = "{sys.executable}"\n'
        f'args = ["{fixture}", "stdio"]\n'
    )
    kiln = start_kiln("--model", MODEL, "--config", str(config), "--database", str(tmp_path / "kiln.db"))
    key = kiln.admin_key
    try:
        agent = maths_agent(
            "mcp-maths",
            tools=["fixture__add"],
            tool_choice={"type": "function", "function": {"name": "fixture__add"}},
        )
        status, made = api(kiln.url, key, "POST", "/api/agents", agent)
        assert status == 201, made
        status, run = api(kiln.url, key, "POST", "/api/runs", {"agent": "mcp-maths", "input": "Add 2 and 3.", "wait": True})
        assert status == 201, run
        status, shown = api(kiln.url, key, "GET", f"/api/runs/{run['id']}")
        step = shown["journal"][1]
        assert (step["kind"], step["name"], step["state"]) == ("tool", "fixture__add", "done"), shown["journal"]
        args = json.loads(step["input"]["arguments"])
        assert step["output"]["text"].strip() == str(args["a"] + args["b"]), step
        # A tool the configuration does not provide is refused by name.
        status, err = api(kiln.url, key, "POST", "/api/agents", maths_agent("nope", tools=["fixture__nothing"]))
        assert status == 400 and "fixture__nothing" in err["error"]["message"], err
    finally:
        kiln.stop()


def test_an_mcp_server_down_at_the_start_gives_its_tools_once_it_answers(tmp_path):
    """An HTTP MCP server that is not up when `kiln serve` starts: its
    tools are refused by name at first, then offered once it answers,
    without a restart, and a run calls one."""
    fixture = pathlib.Path(__file__).resolve().parents[2] / "crates/kiln-agents/tests/fixtures/mcp_server.py"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "kiln.toml"
    config.write_text(f'[[mcp_servers]]\nname = "late"\nurl = "http://127.0.0.1:{port}/mcp"\n')
    kiln = start_kiln("--model", MODEL, "--config", str(config), "--database", str(tmp_path / "kiln.db"))
    mcp = None
    try:
        key = kiln.admin_key
        agent = maths_agent("late-maths", tools=["late__add"],
                            tool_choice={"type": "function", "function": {"name": "late__add"}})
        status, err = api(kiln.url, key, "POST", "/api/agents", agent)
        assert status == 400 and "late__add" in err["error"]["message"], err
        mcp = subprocess.Popen([sys.executable, str(fixture), "http", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 90
        while True:
            status, made = api(kiln.url, key, "POST", "/api/agents", agent)
            if status == 201:
                break
            assert status == 400 and "late__add" in made["error"]["message"], made
            assert time.monotonic() < deadline, "the late MCP server's tools never appeared"
            time.sleep(0.5)
        status, run = api(kiln.url, key, "POST", "/api/runs", {"agent": "late-maths", "input": "Add 2 and 3.", "wait": True})
        assert status == 201, run
        status, shown = api(kiln.url, key, "GET", f"/api/runs/{run['id']}")
        step = shown["journal"][1]
        assert (step["kind"], step["name"], step["state"]) == ("tool", "late__add", "done"), shown["journal"]
    finally:
        if mcp:
            mcp.terminate()
            mcp.wait(timeout=20)
        kiln.stop()
