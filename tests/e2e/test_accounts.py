"""Accounts from the command line against the running server: key rotation
and expiry, `kiln usage` (table and CSV) against `/api/usage`, `kiln tenants
list` and `update` (suspension), tokens-per-minute and tenant-wide rate
limits, monthly spending limits, and the refusal, admission and cost metrics
of `/metrics`."""

import csv
import io
import json
import re
import sqlite3
import time
import urllib.error
import urllib.request

from conftest import kiln_cli
from test_metering import MODEL, QUESTION, api, new_key, new_tenant

# Every change to a key or tenant reaches the server within a second (it
# polls the database every 250 ms); `test_metering`'s revocation test holds
# it to that. Here the bound is looser, so a loaded CI machine's scheduling
# cannot fail a test about something else.
PROPAGATION_S = 3.0
CHAT = "/v1/chat/completions"


def chat(kiln_url, key, max_tokens=4, model=MODEL):
    """Posts a small chat completion; returns (status, headers, body)."""
    req = urllib.request.Request(
        kiln_url + CHAT,
        method="POST",
        data=json.dumps(
            {"model": model, "messages": QUESTION, "max_tokens": max_tokens, "temperature": 0}
        ).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def assert_error(status, body, want_status, want_code, want_type):
    """OpenAI's error body: {"error": {message, type, param, code}}."""
    assert status == want_status, body
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) >= {"message", "type", "param", "code"}, err
    assert err["code"] == want_code, err
    assert err["type"] == want_type, err
    assert isinstance(err["message"], str) and err["message"], err
    return err["message"]


def until(check, what, limit_s=PROPAGATION_S):
    """Calls `check` until it returns a truthy value (which it returns),
    failing after `limit_s` seconds."""
    started = time.monotonic()
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() - started < limit_s, f"{what}: not within {limit_s} s"
        time.sleep(0.05)


def me(kiln_url, key):
    """The caller of `key` as /api/me reports it (tenant and key)."""
    status, body = api(kiln_url, key, "GET", "/api/me")
    assert status == 200, body
    return body


def table_rows(text):
    """A table printed by the CLI: its header cells and its rows' cells."""
    lines = [line.split() for line in text.splitlines() if line.strip()]
    return lines[0], lines[1:]


def tenant_row(database, name):
    """`kiln tenants list`'s row for the tenant `name`, by column."""
    header, rows = table_rows(kiln_cli(database, "tenants", "list"))
    # Headers with spaces ("MONTHLY LIMIT", "BALANCE (X)") span two words.
    columns = ["NAME", "ID", "STATE", "BALANCE", "RESERVED", "MONTHLY_LIMIT", "RPM", "TPM"]
    assert header[:3] == columns[:3] and header[-2:] == ["RPM", "TPM"], header
    found = [r for r in rows if r[0] == name]
    assert len(found) == 1, (name, rows)
    return dict(zip(columns, found[0]))


def metrics(kiln_url):
    """/metrics as {"name{labels}": value}."""
    with urllib.request.urlopen(kiln_url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def nanos(money):
    """A money string ("0.000123") as integer nano-units."""
    whole, _, frac = money.partition(".")
    return int(whole) * 10**9 + int((frac + "0" * 9)[:9])


def test_a_rotated_key_gets_a_new_secret_and_the_old_one_stops_within_a_second(kiln_url, database):
    tenant = new_tenant(database)
    old = new_key(database, tenant)
    key_id = me(kiln_url, old)["key"]["id"]  # also caches the old secret on the server
    new = kiln_cli(database, "keys", "rotate", key_id).strip()
    assert new.startswith("kiln-sk-") and new != old

    def old_refused():
        status, body = api(kiln_url, old, "GET", "/v1/models")
        return (status, body) if status != 200 else None

    status, body = until(old_refused, "the old secret still worked", limit_s=1.0)
    assert_error(status, body, 401, "invalid_api_key", "authentication_error")
    # The same key, with the new secret: same id, usable for calls.
    assert me(kiln_url, new)["key"]["id"] == key_id
    status, _, r = chat(kiln_url, new, max_tokens=2)
    assert status == 200, r
    listed = kiln_cli(database, "keys", "list", "--tenant", tenant)
    _, rows = table_rows(listed)
    assert [row[0] for row in rows] == [key_id]
    assert rows[0][5] == "active"
    assert rows[0][4] == new[: len(rows[0][4]) - 1] + "…"


def test_kiln_usage_table_and_csv_match_the_api(kiln_url, admin_key, database):
    tenant = new_tenant(database)
    key_a, key_b = new_key(database, tenant), new_key(database, tenant)
    tenant_id = me(kiln_url, key_a)["tenant"]["id"]
    ids = {me(kiln_url, k)["key"]["id"] for k in (key_a, key_b)}
    answers = []
    for key, model in [(key_a, MODEL), (key_a, MODEL), (key_b, MODEL), (key_b, "gemma3-270m")]:
        status, _, r = chat(kiln_url, key, model=model)
        assert status == 200, r
        answers.append(r["usage"])

    status, report = api(
        kiln_url, admin_key, "GET", f"/api/usage?group_by=key,model&tenant_id={tenant_id}"
    )
    assert status == 200, report
    assert report["totals"]["calls"] == 4
    assert report["totals"]["prompt_tokens"] == sum(u["prompt_tokens"] for u in answers)
    assert report["totals"]["completion_tokens"] == sum(u["completion_tokens"] for u in answers)
    api_rows = {
        (r["key_id"], r["model"]): (r["calls"], r["prompt_tokens"], r["completion_tokens"], nanos(r["cost"]))
        for r in report["data"]
    }
    assert len(api_rows) == 3 and {k for k, _ in api_rows} == ids, report

    out = kiln_cli(database, "usage", "--tenant", tenant, "--by", "key,model", "--csv")
    parsed = list(csv.DictReader(io.StringIO(out)))
    assert list(parsed[0]) == [
        "key_id", "model", "calls", "errors", "prompt_tokens", "cached_tokens",
        "completion_tokens", "cost", "currency",
    ], out
    csv_rows = {
        (r["key_id"], r["model"]): (
            int(r["calls"]), int(r["prompt_tokens"]), int(r["completion_tokens"]), nanos(r["cost"])
        )
        for r in parsed
    }
    assert csv_rows == api_rows, out
    assert sum(c for c, *_ in csv_rows.values()) == 4
    assert sum(n for *_, n in csv_rows.values()) == nanos(report["totals"]["cost"])

    table = kiln_cli(database, "usage", "--tenant", tenant, "--by", "key,model")
    header, rows = table_rows(table)
    assert header[:7] == ["KEY", "MODEL", "CALLS", "ERRORS", "PROMPT", "CACHED", "COMPLETION"], table
    assert header[7] == "COST", table
    by_row = {(r[0], r[1]): (int(r[2]), int(r[4]), int(r[6]), nanos(r[7])) for r in rows[:-1]}
    assert by_row == api_rows, table
    total = rows[-1]
    assert total[0] == "TOTAL", table
    t = report["totals"]
    assert (int(total[1]), int(total[3]), int(total[5]), nanos(total[6])) == (
        4, t["prompt_tokens"], t["completion_tokens"], nanos(t["cost"])
    ), table


def test_tenants_list_and_update_suspend_and_restore_a_tenant(kiln_url, database):
    tenant = new_tenant(database, "--monthly-limit", "5", "--rpm", "700", "--tpm", "90000")
    key = new_key(database, tenant)
    row = tenant_row(database, tenant)
    assert row["ID"] == me(kiln_url, key)["tenant"]["id"]
    assert (row["STATE"], row["MONTHLY_LIMIT"], row["RPM"], row["TPM"]) == ("active", "5", "700", "90000"), row

    out = kiln_cli(database, "tenants", "update", tenant, "--disable")
    assert "disabled" in out
    assert tenant_row(database, tenant)["STATE"] == "disabled"

    def refused():
        status, _, body = chat(kiln_url, key, max_tokens=2)
        return (status, body) if status != 200 else None

    status, body = until(refused, "the disabled tenant's key still worked")
    message = assert_error(status, body, 403, "account_disabled", "permission_error")
    # Refused at authentication ("the tenant `NAME` is disabled") or, while
    # the server's key cache is not yet refreshed, at admission ("the tenant
    # is disabled").
    assert re.fullmatch(rf"the tenant (`{tenant}` )?is disabled", message), message
    # Once the key cache knows, authentication refuses (the message names
    # the tenant); those refusals are counted like admission's.
    def refused_at_authentication():
        status, _, body = chat(kiln_url, key, max_tokens=2)
        named = status == 403 and f"`{tenant}`" in body["error"]["message"]
        return (status, body) if named else None

    until(refused_at_authentication, "authentication never refused the disabled tenant")
    counted = 'kiln_refusals_total{reason="account_disabled"}'
    before = metrics(kiln_url).get(counted, 0)
    assert refused_at_authentication() is not None
    assert metrics(kiln_url).get(counted, 0) - before == 1

    kiln_cli(database, "tenants", "update", tenant, "--enable")
    assert tenant_row(database, tenant)["STATE"] == "active"
    until(lambda: chat(kiln_url, key, max_tokens=2)[0] == 200, "the re-enabled tenant's key was refused")

    # Limits change, and `none` removes one.
    kiln_cli(database, "tenants", "update", tenant, "--monthly-limit", "7.5", "--rpm", "5", "--tpm", "none")
    row = tenant_row(database, tenant)
    assert (row["MONTHLY_LIMIT"], row["RPM"], row["TPM"]) == ("7.5", "5", "-"), row
    kiln_cli(database, "tenants", "update", tenant, "--monthly-limit", "none", "--rpm", "none")
    row = tenant_row(database, tenant)
    assert (row["MONTHLY_LIMIT"], row["RPM"], row["TPM"]) == ("-", "-", "-"), row

    renamed = tenant + "-renamed"
    kiln_cli(database, "tenants", "update", tenant, "--name", renamed)
    assert tenant_row(database, renamed)["ID"] == row["ID"]
    until(lambda: me(kiln_url, key)["tenant"]["name"] == renamed, "the server kept the old name")


def test_an_expired_key_is_refused_with_401(kiln_url, database):
    """The CLI and the API accept expiries of 1 to 3650 days, so the test
    moves this key's expiry to 1.5 s from now in the database directly.
    The server caches the key when it first sees it and still checks the
    expiry against the clock on every request."""
    tenant = new_tenant(database)
    key = new_key(database, tenant, "--expires-in-days", "1")
    _, rows = table_rows(kiln_cli(database, "keys", "list", "--tenant", tenant))
    key_id = rows[0][0]
    expires_at_ms = int(time.time() * 1000) + 1500
    with sqlite3.connect(database, timeout=30) as db:
        assert db.execute(
            "UPDATE api_keys SET expires_at = ? WHERE id = ?", (expires_at_ms, key_id)
        ).rowcount == 1
    status, _, r = chat(kiln_url, key, max_tokens=2)
    assert status == 200, r
    time.sleep(max(0.0, expires_at_ms / 1000 - time.time()) + 0.1)
    status, _, body = chat(kiln_url, key, max_tokens=2)
    message = assert_error(status, body, 401, "invalid_api_key", "authentication_error")
    assert "expired" in message, message
    _, rows = table_rows(kiln_cli(database, "keys", "list", "--tenant", tenant))
    assert rows[0][5] == "expired", rows


def test_a_tokens_per_minute_limit_answers_429_with_retry_after(kiln_url, database):
    tpm = 120
    key = new_key(database, new_tenant(database), "--tpm", str(tpm))
    status, headers, r = chat(kiln_url, key, max_tokens=4)
    assert status == 200, r
    assert headers["x-ratelimit-limit-tokens"] == str(tpm)
    prompt = r["usage"]["prompt_tokens"]
    assert int(headers["x-ratelimit-remaining-tokens"]) <= tpm - prompt - 4
    # Exactly a minute's allowance: admissible once the bucket refills
    # (2 tokens a second), not now.
    status, headers, body = chat(kiln_url, key, max_tokens=tpm - prompt)
    message = assert_error(status, body, 429, "rate_limit_exceeded", "rate_limit_error")
    assert f"{tpm} tokens per minute for this key" in message, message
    assert 1 <= int(headers["retry-after"]) <= 60, dict(headers)
    assert int(headers["retry-after-ms"]) >= 1
    assert headers["x-ratelimit-limit-tokens"] == str(tpm)
    assert int(headers["x-ratelimit-remaining-tokens"]) < tpm
    assert headers["x-ratelimit-reset-tokens"].endswith("s")
    # More than a minute's allowance can never pass: the message says so.
    status, _, body = chat(kiln_url, key, max_tokens=tpm)
    message = assert_error(status, body, 429, "rate_limit_exceeded", "rate_limit_error")
    assert "lower max_tokens" in message, message


def test_a_tenant_requests_limit_applies_across_its_keys(kiln_url, database):
    tenant = new_tenant(database, "--rpm", "1")
    first, second = new_key(database, tenant), new_key(database, tenant)
    status, headers, r = chat(kiln_url, first, max_tokens=2)
    assert status == 200, r
    assert headers["x-ratelimit-limit-requests"] == "1"
    status, headers, body = chat(kiln_url, second, max_tokens=2)
    message = assert_error(status, body, 429, "rate_limit_exceeded", "rate_limit_error")
    assert "1 requests per minute for this tenant" in message, message
    assert int(headers["retry-after"]) >= 1
    assert headers["x-ratelimit-remaining-requests"] == "0"


def test_a_monthly_limit_refuses_what_it_cannot_cover(kiln_url, database):
    kiln_cli(database, "prices", "set", MODEL, "--input", "1", "--output", "2")
    # 0.0001 units = 100_000 nano-units: a few dozen tokens fit, 1000
    # completion tokens (2_000_000 nano-units) do not.
    tenant = new_tenant(database, "--monthly-limit", "0.0001")
    key = new_key(database, tenant)
    status, _, body = chat(kiln_url, key, max_tokens=1000)
    message = assert_error(status, body, 429, "insufficient_quota", "insufficient_quota")
    assert "monthly spending limit" in message, message
    status, _, r = chat(kiln_url, key, max_tokens=4)
    assert status == 200, r
    budget = kiln_cli(database, "tenants", "budget", tenant)
    assert re.search(r"monthly limit\s+0\.0001\b", budget), budget
    spent = r["usage"]["prompt_tokens"] * 1000 + r["usage"]["completion_tokens"] * 2000
    shown = f"{spent / 1e9:.9f}".rstrip("0")
    assert re.search(rf"spent in \S+\s+{re.escape(shown)} ", budget), budget
    # A key's own monthly limit, inside an unlimited tenant, refuses the same way.
    limited = new_key(database, new_tenant(database), "--monthly-limit", "0.0001")
    status, _, body = chat(kiln_url, limited, max_tokens=1000)
    message = assert_error(status, body, 429, "insufficient_quota", "insufficient_quota")
    assert "key's monthly spending limit" in message, message


def test_metrics_count_refusals_admissions_and_cost(kiln_url, database):
    kiln_cli(database, "prices", "set", MODEL, "--input", "1", "--output", "2")
    refused = 'kiln_refusals_total{reason="rate_limit"}'
    admissions = 'kiln_phase_seconds_count{phase="admission"}'
    cost = f'kiln_cost_nanos_total{{model="{MODEL}"}}'
    key = new_key(database, new_tenant(database), "--rpm", "1")
    before = metrics(kiln_url)
    status, _, r = chat(kiln_url, key, max_tokens=4)
    assert status == 200, r
    status, _, body = chat(kiln_url, key, max_tokens=4)
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded", body
    after = metrics(kiln_url)
    assert after[refused] - before.get(refused, 0) == 1
    assert after[admissions] - before.get(admissions, 0) == 2
    charged = r["usage"]["prompt_tokens"] * 1000 + r["usage"]["completion_tokens"] * 2000
    assert after[cost] - before.get(cost, 0) == charged
