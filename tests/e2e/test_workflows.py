"""Workflows through `/api/workflows` and `/api/runs` on the real `kiln
serve` with SmolLM2: a graph of a schema-held model call, a branch, tool
calls with typed arguments and a parallel map, journaled by path and
metered; graphs refused at registration with the step named; inputs
checked; human approval with its roles, racing decisions and decisions on
runs that are not waiting; and the CLI."""

import json
import os
import subprocess
import threading
import time

import pytest

from conftest import kiln_binary
from test_metering import api, new_key, new_tenant

MODEL = "smollm2-135m"

TRIAGE = {
    "name": "triage",
    "description": "Classify a ticket, then price it",
    "inputs": {
        "ticket": {"type": "string"},
        "hours": {"type": "array", "items": {"type": "integer"}, "default": [1, 2, 3]},
    },
    "steps": [
        {"id": "classify", "kind": "model", "model": MODEL, "temperature": 0, "max_tokens": 32,
         "system": "You sort support tickets by urgency.",
         "prompt": "Ticket: {{ inputs.ticket }}\nIs it urgent?",
         "output": {"type": "object", "properties": {"severity": {"enum": ["low", "high"]}},
                    "required": ["severity"]}},
        {"id": "route", "kind": "branch", "if": "steps.classify.output.severity == 'high'",
         "then": ["escalate"], "else": ["reply"]},
        {"id": "escalate", "kind": "tool", "tool": "calculator",
         "arguments": {"expression": "{{ length(inputs.hours) }} * 2"}},
        {"id": "reply", "kind": "tool", "tool": "calculator",
         "arguments": {"expression": "{{ length(inputs.hours) }} + 1"}},
        {"id": "costs", "kind": "map", "over": "{{ inputs.hours }}", "concurrency": 2,
         "step": {"kind": "tool", "tool": "calculator", "arguments": {"expression": "{{ item }} * 60"}}},
    ],
    "output": {
        "severity": "{{ steps.classify.output.severity }}",
        "result": "{{ coalesce(steps.escalate.output, steps.reply.output) }}",
        "costs": "{{ steps.costs.output }}",
    },
}


def payout(name="payout", **approval):
    step = {"id": "sign_off", "kind": "approval", "message": "Pay {{ inputs.amount }} to {{ inputs.to }}?",
            "group": "finance"}
    step.update(approval)
    return {
        "name": name,
        "inputs": {"amount": {"type": "number"}, "to": {"type": "string"}},
        "steps": [
            step,
            {"id": "pay", "kind": "tool", "tool": "calculator", "when": "{{ steps.sign_off.output.approved }}",
             "arguments": {"expression": "{{ inputs.amount }} * 100"}},
        ],
        "output": {"decision": "{{ steps.sign_off.output }}", "cents": "{{ steps.pay.output }}"},
    }


@pytest.fixture(scope="module")
def org(database):
    """A tenant with an admin, a member, a finance member and an outsider
    member; and a key of another tenant."""
    tenant = new_tenant(database)
    keys = {
        "admin": new_key(database, tenant, "--role", "tenant_admin"),
        "member": new_key(database, tenant),
        "finance": new_key(database, tenant, "--group", "finance"),
        "finance2": new_key(database, tenant, "--group", "finance"),
        "outsider": new_key(database, tenant, "--group", "sales"),
    }
    other = new_tenant(database)
    keys["stranger"] = new_key(database, other, "--role", "tenant_admin")
    return keys


def wait_for(url, key, run_id, until=("succeeded", "failed", "cancelled"), timeout=180):
    deadline = time.monotonic() + timeout
    while True:
        status, run = api(url, key, "GET", f"/api/runs/{run_id}")
        assert status == 200, run
        if run["status"] in until:
            return run
        assert time.monotonic() < deadline, run
        time.sleep(0.2)


def test_a_workflow_branches_maps_and_is_journaled_by_step(kiln_url, org):
    status, w = api(kiln_url, org["admin"], "POST", "/api/workflows", TRIAGE)
    assert status == 201, w
    assert (w["object"], w["name"], w["version"]) == ("workflow", "triage", 1)
    assert api(kiln_url, org["admin"], "POST", "/api/workflows", TRIAGE)[0] == 200, "same body, same version"

    status, run = api(kiln_url, org["member"], "POST", "/api/runs",
                      {"workflow": "triage", "input": {"ticket": "The server room is on fire!"}, "wait": True})
    assert status == 201, run
    assert run["status"] == "succeeded", run
    assert (run["kind"], run["workflow"]) == ("workflow", "triage")
    assert run["input"] == {"ticket": "The server room is on fire!", "hours": [1, 2, 3]}, "defaults filled in"
    out = run["result"]["output"]
    assert out["severity"] in ("low", "high"), out
    taken, skipped = ("escalate", "reply") if out["severity"] == "high" else ("reply", "escalate")
    assert out["result"] == ("6" if taken == "escalate" else "4"), out
    assert out["costs"] == ["60", "120", "180"], out
    assert run["result"]["skipped"] == [skipped], run["result"]

    status, shown = api(kiln_url, org["member"], "GET", f"/api/runs/{run['id']}")
    journal = shown["journal"]
    assert sorted(s["path"] for s in journal) == sorted(["classify", taken, "costs[0]", "costs[1]", "costs[2]"])
    assert all(s["state"] == "done" for s in journal), journal
    classify = next(s for s in journal if s["path"] == "classify")
    assert classify["seq"] == 0 and classify["kind"] == "model"
    assert "on fire" in classify["input"]["prompt"]
    assert json.loads(classify["output"]["content"]) == {"severity": out["severity"]}

    # The model call and the four tool calls are in the ledger, against the
    # member's key; the model call is named by its journal step.
    status, ledger = api(kiln_url, org["admin"], "GET", "/api/ledger?limit=200")
    rows = [r for r in ledger["data"] if str(r.get("request_id", "")).startswith(run["id"])]
    model_rows = [r for r in rows if r["model"] == MODEL]
    assert [r["request_id"] for r in model_rows] == [f"{run['id']}-m0"], rows
    assert model_rows[0]["prompt_tokens"] > 0 and model_rows[0]["completion_tokens"] > 0
    assert len([r for r in rows if r["model"] == "tool:calculator"]) == 4, rows

    status, listed = api(kiln_url, org["member"], "GET", "/api/runs?workflow=triage")
    assert [r["id"] for r in listed["data"]] == [run["id"]]
    assert api(kiln_url, org["stranger"], "GET", f"/api/runs/{run['id']}")[0] == 404
    assert api(kiln_url, org["stranger"], "GET", "/api/workflows/triage")[0] == 404


def refused(kiln_url, key, body):
    status, e = api(kiln_url, key, "POST", "/api/workflows", body)
    assert status == 400, e
    assert e["error"]["type"] == "invalid_request_error", e
    return e["error"]["message"]


def test_bad_graphs_are_refused_naming_the_step(kiln_url, org):
    admin = org["admin"]
    cyclic = json.loads(json.dumps(TRIAGE))
    cyclic["steps"][0]["needs"] = ["escalate"]
    message = refused(kiln_url, admin, cyclic)
    assert "cycle" in message and "classify" in message and "→" in message, message

    typo = json.loads(json.dumps(TRIAGE))
    typo["steps"][1]["if"] = "steps.classify.output.severty == 'high'"
    message = refused(kiln_url, admin, typo)
    assert "`route` (steps[1])" in message and "severty" in message and "severity" in message, message

    ill_typed = json.loads(json.dumps(TRIAGE))
    ill_typed["steps"][4]["over"] = "{{ inputs.ticket }}"
    message = refused(kiln_url, admin, ill_typed)
    assert "`costs`" in message and "must be a list" in message, message

    wrong_arg = json.loads(json.dumps(TRIAGE))
    wrong_arg["steps"][2]["arguments"] = {"expression": "{{ length(inputs.hours) }}"}
    message = refused(kiln_url, admin, wrong_arg)
    assert "`escalate`" in message and "an integer, not a string" in message, message

    for step, words in [
        ({"id": "x", "kind": "tool", "tool": "shell"}, "no tool `shell`"),
        ({"id": "x", "kind": "agent", "agent": "nobody", "input": "hi"}, "no agent `nobody`"),
        ({"id": "x", "kind": "model", "model": "gpt-9", "prompt": "hi"}, "`gpt-9` is not a chat model"),
        ({"id": "x", "kind": "teleport"}, "not a step kind"),
        ({"id": "x", "kind": "model", "model": MODEL, "prompt": "{{ inputs.nope }}"}, "no field `nope`"),
    ]:
        message = refused(kiln_url, admin, {"name": "bad", "steps": [step]})
        assert "`x` (steps[0])" in message and words in message, (step, message)

    assert "needs a tenant admin" in api(kiln_url, org["member"], "POST", "/api/workflows", TRIAGE)[1]["error"]["message"]
    assert api(kiln_url, admin, "GET", "/api/workflows/bad")[0] == 404, "nothing refused was saved"


def test_inputs_are_checked_when_a_run_starts(kiln_url, org):
    assert api(kiln_url, org["admin"], "POST", "/api/workflows", TRIAGE)[0] in (200, 201)
    for body, words in [
        ({"workflow": "triage", "input": {}}, "`ticket` is missing"),
        ({"workflow": "triage", "input": {"ticket": 7}}, "`ticket` is an integer, not a string"),
        ({"workflow": "triage", "input": {"ticket": "t", "hours": ["one"]}}, "`hours[0]` is a string"),
        ({"workflow": "triage", "input": {"ticket": "t", "urgent": True}}, "no input `urgent`"),
        ({"workflow": "nope", "input": {}}, "no workflow `nope`"),
        ({"agent": "a", "workflow": "triage", "input": {}}, "either an `agent` or a `workflow`"),
    ]:
        status, e = api(kiln_url, org["member"], "POST", "/api/runs", body)
        assert status in (400, 404), (body, e)
        assert words in e["error"]["message"], (body, e)


def test_an_approval_waits_for_someone_who_may_decide(kiln_url, org):
    assert api(kiln_url, org["admin"], "POST", "/api/workflows", payout())[0] == 201
    status, run = api(kiln_url, org["member"], "POST", "/api/runs",
                      {"workflow": "payout", "input": {"amount": 12.5, "to": "ACME"}, "wait": True})
    assert status == 201 and run["status"] == "waiting", run
    status, shown = api(kiln_url, org["member"], "GET", f"/api/runs/{run['id']}")
    assert shown["waiting_for"] == {"step": "sign_off", "message": "Pay 12.5 to ACME?", "group": "finance",
                                    "allow_self": False}, shown
    time.sleep(1.5)  # no timeout: still waiting
    assert api(kiln_url, org["member"], "GET", f"/api/runs/{run['id']}")[1]["status"] == "waiting"

    def decide(key, verb="approve", comment="", run_id=run["id"]):
        return api(kiln_url, key, "POST", f"/api/runs/{run_id}/{verb}", {"comment": comment})

    status, e = decide(org["outsider"])
    assert status == 403 and "group `finance`" in e["error"]["message"], e
    status, e = decide(org["member"])
    assert status == 403, e
    assert decide(org["stranger"])[0] == 404, "another tenant's run does not exist for it"
    status, decided = decide(org["finance"], comment="within budget")
    assert status == 200, decided
    done = wait_for(kiln_url, org["member"], run["id"])
    assert done["status"] == "succeeded", done
    output = done["result"]["output"]
    assert output["cents"] == "1250"
    assert output["decision"]["approved"] is True and output["decision"]["comment"] == "within budget"
    assert "key-" in output["decision"]["by"], output

    # Deciding a run that is not waiting (any more) is a conflict.
    status, e = decide(org["finance"])
    assert status == 409 and "not waiting" in e["error"]["message"], e
    assert decide(org["finance"], run_id="run-doesnotexist")[0] == 404

    # The key that started a run cannot decide it unless the step allows.
    status, own = api(kiln_url, org["finance"], "POST", "/api/runs",
                      {"workflow": "payout", "input": {"amount": 1, "to": "me"}, "wait": True})
    assert own["status"] == "waiting", own
    status, e = decide(org["finance"], run_id=own["id"])
    assert status == 403 and "started the run" in e["error"]["message"], e
    status, rejected = decide(org["admin"], "reject", "no self-payments", run_id=own["id"])
    assert status == 200, rejected
    ended = wait_for(kiln_url, org["member"], own["id"])
    assert ended["status"] == "failed" and "rejected by" in ended["error"] and "no self-payments" in ended["error"], ended


def test_racing_decisions_record_one_and_refuse_the_rest(kiln_url, org):
    api(kiln_url, org["admin"], "POST", "/api/workflows", payout("racing", on_reject="continue"))
    status, run = api(kiln_url, org["member"], "POST", "/api/runs",
                      {"workflow": "racing", "input": {"amount": 3, "to": "B"}, "wait": True})
    assert run["status"] == "waiting", run
    results = []
    barrier = threading.Barrier(8)

    def one(i):
        key = org["finance"] if i % 2 else org["finance2"]
        verb = "approve" if i % 2 else "reject"
        barrier.wait()
        results.append((verb, *api(kiln_url, key, "POST", f"/api/runs/{run['id']}/{verb}", {"comment": str(i)})))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(code for _, code, _ in results)
    assert codes == [200] + [409] * 7, results
    winner = next(verb for verb, code, _ in results if code == 200)
    done = wait_for(kiln_url, org["member"], run["id"])
    assert done["status"] == "succeeded", done
    decision = done["result"]["output"]["decision"]
    assert decision["approved"] is (winner == "approve"), (winner, decision)
    assert done["result"]["output"]["cents"] == ("300" if winner == "approve" else None)
    approvals = [s for s in done["journal"] if s["kind"] == "approval"]
    assert len(approvals) == 1 and approvals[0]["state"] == "done", approvals

    # Cancelling a waiting run ends it at once; deciding it then conflicts.
    status, run = api(kiln_url, org["member"], "POST", "/api/runs",
                      {"workflow": "racing", "input": {"amount": 3, "to": "C"}, "wait": True})
    status, cancelled = api(kiln_url, org["member"], "POST", f"/api/runs/{run['id']}/cancel")
    assert cancelled["status"] == "cancelled", cancelled
    assert api(kiln_url, org["finance"], "POST", f"/api/runs/{run['id']}/approve", {})[0] == 409


def test_the_cli_declares_runs_and_approves(kiln_url, org, tmp_path):
    spec = tmp_path / "cli-payout.yaml"
    spec.write_text(
        "name: cli-payout\n"
        "inputs:\n  amount: {type: number}\n  to: {type: string}\n"
        "steps:\n"
        "  - id: sign_off\n    kind: approval\n    message: \"Pay {{ inputs.amount }}?\"\n    group: finance\n"
        "  - id: pay\n    kind: tool\n    tool: calculator\n"
        "    arguments: {expression: \"{{ inputs.amount }} * 2\"}\n"
        "output: \"{{ steps.pay.output }}\"\n"
    )

    def kiln(key, *args):
        env = dict(os.environ, KILN_URL=kiln_url, KILN_API_KEY=key)
        return subprocess.run([str(kiln_binary()), *args], env=env, capture_output=True, text=True, timeout=300)

    made = kiln(org["admin"], "workflows", "create", str(spec))
    assert made.returncode == 0 and made.stdout.strip() == "cli-payout version 1", made
    listed = kiln(org["member"], "workflows", "ls")
    assert "cli-payout\t1\t2\t" in listed.stdout, listed.stdout
    started = kiln(org["member"], "runs", "start", "--workflow", "cli-payout", '{"amount": 21, "to": "X"}')
    assert started.returncode == 0, started.stderr
    assert "waiting at `sign_off` for an approval: Pay 21?" in started.stderr, started.stderr
    run_id = started.stderr.splitlines()[0].strip()
    waiting = kiln(org["member"], "runs", "ls", "--status", "waiting", "--workflow", "cli-payout")
    assert run_id in waiting.stdout and "\tworkflow\tcli-payout\t" in waiting.stdout, waiting.stdout
    approved = kiln(org["finance"], "runs", "approve", run_id, "--comment", "ok")
    assert approved.returncode == 0, approved.stderr
    assert approved.stdout.strip() == "42", approved
    assert "[sign_off] approved by e2e (key-" in approved.stderr, approved.stderr
    bad = kiln(org["member"], "runs", "start", "--workflow", "cli-payout", "not json")
    assert bad.returncode != 0 and "JSON object" in bad.stderr, bad.stderr


def test_a_retrieve_step_searches_as_the_runs_key_sees_the_knowledge_base(kiln_url, org):
    from test_knowledge import upload, wait_final

    admin = org["admin"]
    status, kb = api(kiln_url, admin, "POST", "/api/kbs", {"name": "wf-policies"})
    assert status == 201, kb
    for name, text, groups in [
        ("travel.md", "# Travel\n\nEmployees book economy class for flights under six hours.\n", ()),
        ("payroll.md", "# Payroll\n\nSalaries are paid on the 25th; bonuses are paid in March.\n", ("finance",)),
    ]:
        status, doc = upload(kiln_url, admin, "wf-policies", name, text.encode(), groups=groups)
        assert status == 202, doc
        assert wait_final(kiln_url, admin, "wf-policies", doc["id"])["status"] == "ready"
    workflow = {
        "name": "ask-policies",
        "inputs": {"question": {"type": "string"}},
        "steps": [
            {"id": "docs", "kind": "retrieve", "knowledge_base": "wf-policies",
             "query": "{{ inputs.question }}", "top_k": 5},
            {"id": "answer", "kind": "model", "model": MODEL, "temperature": 0, "max_tokens": 24,
             "prompt": "Sources:\n{{ join(steps.docs.output, '\\n') }}\n\nQuestion: {{ inputs.question }}"},
        ],
        "output": {"found": "{{ length(steps.docs.output) }}", "first": "{{ steps.docs.output[0].document }}",
                   "passages": "{{ steps.docs.output }}", "answer": "{{ steps.answer.output }}"},
    }
    status, made = api(kiln_url, admin, "POST", "/api/workflows", workflow)
    assert status == 201, made

    def ask(key):
        status, run = api(kiln_url, key, "POST", "/api/runs",
                          {"workflow": "ask-policies", "input": {"question": "When are salaries paid?"}, "wait": True})
        assert status == 201 and run["status"] == "succeeded", run
        return run

    member = ask(org["member"])["result"]["output"]
    documents = {p["document"] for p in member["passages"]}
    assert documents == {"travel.md"}, member
    assert member["found"] == 1 and member["first"] == "travel.md"
    finance = ask(org["finance"])
    output = finance["result"]["output"]
    assert "payroll.md" in {p["document"] for p in output["passages"]}, output
    assert any("25th" in p["text"] for p in output["passages"]), output
    assert all(isinstance(p["score"], (int, float)) for p in output["passages"])
    # The query embedding and the answer are metered to the run's key.
    status, ledger = api(kiln_url, admin, "GET", "/api/ledger?limit=200")
    rows = [r for r in ledger["data"] if str(r.get("request_id", "")).startswith(finance["id"])]
    assert f"{finance['id']}-m1" in [r["request_id"] for r in rows], rows
    status, shown = api(kiln_url, org["finance"], "GET", f"/api/runs/{finance['id']}")
    docs_step = shown["journal"][0]
    assert (docs_step["path"], docs_step["kind"], docs_step["name"]) == ("docs", "retrieve", "wf-policies")
    # A knowledge base that does not exist fails the step, naming it.
    workflow["name"] = "ask-nowhere"
    workflow["steps"][0]["knowledge_base"] = "nowhere"
    assert api(kiln_url, admin, "POST", "/api/workflows", workflow)[0] == 201
    status, run = api(kiln_url, org["member"], "POST", "/api/runs",
                      {"workflow": "ask-nowhere", "input": {"question": "x"}, "wait": True})
    assert run["status"] == "failed" and "step `docs`" in run["error"] and "nowhere" in run["error"], run


def test_the_event_stream_shows_the_wait_and_the_steps_after_it(kiln_url, org):
    import urllib.request

    api(kiln_url, org["admin"], "POST", "/api/workflows", payout("streamed"))
    status, run = api(kiln_url, org["member"], "POST", "/api/runs",
                      {"workflow": "streamed", "input": {"amount": 2, "to": "D"}})
    assert status == 201, run
    req = urllib.request.Request(f"{kiln_url}/api/runs/{run['id']}/events",
                                 headers={"Authorization": f"Bearer {org['member']}"})
    events = []
    with urllib.request.urlopen(req, timeout=120) as r:
        kind = None
        for raw in r:
            line = raw.decode().rstrip("\n")
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                data = json.loads(line.split(":", 1)[1])
                events.append((kind, data))
                if kind == "run" and data["status"] == "waiting":
                    status, _ = api(kiln_url, org["finance"], "POST", f"/api/runs/{run['id']}/approve", {})
                    assert status == 200
    runs = [e["status"] for k, e in events if k == "run"]
    assert runs == ["waiting", "succeeded"], events
    steps = [(e["path"], e["state"]) for k, e in events if k == "step"]
    assert steps == [("sign_off", "started"), ("sign_off", "done"), ("pay", "started"), ("pay", "done")] or \
        steps == [("sign_off", "started"), ("sign_off", "done"), ("pay", "done")], steps
