"""Keys, metering, budgets and rate limits through the official `openai`
client, with tenants and keys made by the `kiln` command line on the
server's own database while it runs."""

import json
import time
import urllib.request
import uuid

import openai
import pytest

from conftest import kiln_cli

MODEL = "smollm2-135m"
QUESTION = [{"role": "user", "content": "Name a colour."}]


def api(url, key, method, path, body=None):
    req = urllib.request.Request(
        url + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def new_tenant(database, *flags):
    name = f"t-{uuid.uuid4().hex[:8]}"
    kiln_cli(database, "tenants", "create", name, *flags)
    return name


def new_key(database, tenant, *flags):
    return kiln_cli(database, "keys", "create", "--tenant", tenant, "--name", "e2e", *flags).strip()


def client_for(kiln_url, key):
    return openai.OpenAI(base_url=kiln_url + "/v1", api_key=key, max_retries=0, timeout=120)


def test_a_key_is_required(kiln_url):
    with pytest.raises(openai.AuthenticationError) as e:
        client_for(kiln_url, "kiln-sk-not-a-real-key").models.list()
    assert e.value.code == "invalid_api_key"
    no_key = urllib.request.Request(kiln_url + "/v1/models")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(no_key, timeout=30)
    assert e.value.code == 401
    assert json.loads(e.value.read())["error"]["code"] == "missing_api_key"


def test_usage_is_metered_and_priced(kiln_url, admin_key, database):
    kiln_cli(database, "prices", "set", MODEL, "--input", "1", "--output", "2")
    tenant = new_tenant(database)
    key = new_key(database, tenant)
    r = client_for(kiln_url, key).chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=8, temperature=0
    )
    status, report = api(kiln_url, admin_key, "GET", "/api/usage?group_by=tenant,model")
    assert status == 200, report
    rows = [
        row for row in report["data"]
        if row["model"] == MODEL and row["calls"] == 1
        and row["prompt_tokens"] == r.usage.prompt_tokens
        and row["completion_tokens"] == r.usage.completion_tokens
    ]
    assert rows, report
    expected_nanos = r.usage.prompt_tokens * 1000 + r.usage.completion_tokens * 2000
    cost = rows[0]["cost"]
    whole, _, frac = cost.partition(".")
    assert int(whole) * 10**9 + int((frac + "0" * 9)[:9]) == expected_nanos, cost
    # The tenant's own admin sees only its tenant.
    tenant_admin = new_key(database, tenant, "--role", "tenant_admin")
    status, mine = api(kiln_url, tenant_admin, "GET", "/api/usage")
    assert status == 200
    assert mine["totals"]["calls"] == 1


def test_revocation_takes_effect_within_a_second(kiln_url, database):
    tenant = new_tenant(database)
    key = new_key(database, tenant)
    c = client_for(kiln_url, key)
    assert c.models.list().data
    key_id = next(
        line.split()[0]
        for line in kiln_cli(database, "keys", "list", "--tenant", tenant).splitlines()[1:]
    )
    kiln_cli(database, "keys", "revoke", key_id)
    revoked_at = time.monotonic()
    while True:
        try:
            c.models.list()
        except openai.AuthenticationError as e:
            assert "revoked" in str(e)
            break
        assert time.monotonic() - revoked_at < 1.0, "the revoked key still worked after 1 s"
        time.sleep(0.05)


def test_rate_limits_answer_429_with_headers(kiln_url, database):
    tenant = new_tenant(database)
    c = client_for(kiln_url, new_key(database, tenant, "--rpm", "2"))
    for _ in range(2):
        raw = c.chat.completions.with_raw_response.create(
            model=MODEL, messages=QUESTION, max_tokens=2, temperature=0
        )
        assert raw.headers["x-ratelimit-limit-requests"] == "2"
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2)
    assert e.value.code == "rate_limit_exceeded"
    assert int(e.value.response.headers["retry-after"]) >= 1
    assert e.value.response.headers["x-ratelimit-remaining-requests"] == "0"


def test_a_budget_refuses_what_it_cannot_cover(kiln_url, database):
    kiln_cli(database, "prices", "set", MODEL, "--input", "1", "--output", "2")
    tenant = new_tenant(database)
    # 0.0001 units = 100_000 nano-units: 40 prompt tokens and 30 completion
    # tokens fit (40_000 + 60_000), 64 completion tokens do not.
    kiln_cli(database, "tenants", "credit", tenant, "0.0001")
    c = client_for(kiln_url, new_key(database, tenant))
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=1000)
    assert e.value.code == "insufficient_quota"
    assert "max_tokens" in str(e.value)
    r = c.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4, temperature=0)
    assert r.usage.completion_tokens <= 4
    budget = kiln_cli(database, "tenants", "budget", tenant)
    spent = r.usage.prompt_tokens * 1000 + r.usage.completion_tokens * 2000
    assert f"balance          {(100_000 - spent) / 1e9:.9f}".rstrip("0") in budget, budget


def test_a_key_limited_to_models(kiln_url, database):
    tenant = new_tenant(database)
    c = client_for(kiln_url, new_key(database, tenant, "--models", "gemma3-270m"))
    assert [m.id for m in c.models.list().data] == ["gemma3-270m"]
    with pytest.raises(openai.PermissionDeniedError) as e:
        c.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2)
    assert e.value.code == "permission_denied"


def test_an_abandoned_stream_is_charged_for_what_was_generated(kiln_url, admin_key, database):
    """Charged for the tokens generated before the client left, with the
    prompt's cached prefix still priced as cached."""
    tenant = new_tenant(database)
    c = client_for(kiln_url, new_key(database, tenant))
    prompt = "Once upon a time, in a harbour town of grey stone and salt, " * 12
    # A first call fills the tenant's prefix cache.
    c.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0)
    request_id = f"abandoned-{uuid.uuid4().hex[:8]}"
    stream = c.completions.create(
        model=MODEL, prompt=prompt, max_tokens=300, temperature=0, stream=True,
        extra_headers={"X-Request-Id": request_id},
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    deadline = time.monotonic() + 30
    while True:
        status, ledger = api(kiln_url, admin_key, "GET", "/api/ledger?limit=50")
        assert status == 200
        rows = [r for r in ledger["data"] if r["request_id"] == request_id]
        if rows:
            break
        assert time.monotonic() < deadline, ledger
        time.sleep(0.2)
    row = rows[0]
    assert row["outcome"] == "cancelled", row
    assert 4 <= row["completion_tokens"] < 300, row
    assert row["prompt_tokens"] > 100, row
    assert row["cached_tokens"] == (row["prompt_tokens"] - 1) // 16 * 16, row


def test_a_cached_prefix_is_reported_and_charged_at_the_cached_price(kiln_url, admin_key, database):
    """The second identical call reuses the first one's KV blocks: the
    response reports them in usage.prompt_tokens_details.cached_tokens and
    the ledger charges them at the cached-input price. Another tenant with
    the same messages gets no hit."""
    model = "gemma3-270m"
    kiln_cli(database, "prices", "set", model, "--input", "1", "--cached-input", "0.1", "--output", "2")
    system = "You answer questions about the harbour accounts. " * 20
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Name a colour."}]
    tenant = new_tenant(database)
    client = client_for(kiln_url, new_key(database, tenant))

    def ask(c):
        return c.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0)

    first, second = ask(client), ask(client)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached == (second.usage.prompt_tokens - 1) // 16 * 16 > 100
    assert second.choices[0].message.content == first.choices[0].message.content

    other = client_for(kiln_url, new_key(database, new_tenant(database)))
    assert ask(other).usage.prompt_tokens_details.cached_tokens == 0

    tenant_admin = new_key(database, tenant, "--role", "tenant_admin")
    status, mine = api(kiln_url, tenant_admin, "GET", "/api/usage")
    assert status == 200, mine
    totals = mine["totals"]
    assert totals["calls"] == 2 and totals["cached_tokens"] == cached
    p, c = first.usage.prompt_tokens, first.usage.completion_tokens
    expected = p * 1000 + c * 2000 + (p - cached) * 1000 + cached * 100 + second.usage.completion_tokens * 2000
    whole, _, frac = totals["cost"].partition(".")
    assert int(whole) * 10**9 + int((frac + "0" * 9)[:9]) == expected, totals
