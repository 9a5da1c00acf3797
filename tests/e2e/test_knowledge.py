"""Knowledge bases through `/api/kbs` on the real server with the real
embedding model (all-MiniLM-L6-v2): ingestion of real formats, hybrid
search, who may see what, metering of every embedding, bad input, and a
SIGKILL during ingestion."""

import http.client
import io
import json
import os
import signal
import time
import urllib.parse
import urllib.request
import uuid
import zipfile

import pytest

from conftest import kiln_binary, kiln_cli, start_kiln
from test_metering import api, new_key, new_tenant

VACATION = """# Employee handbook

## Vacation
Full-time employees receive 25 days of paid vacation per calendar year.
Unused vacation days may be carried over until the end of March.

## Remote work
Staff may work from home up to three days per week with their manager's approval.
"""

SALARIES_HTML = """<!doctype html><html><head><title>Salary bands</title>
<style>body { color: red }</style></head><body>
<h1>Salary bands 2026</h1>
<p>The engineering salary budget grows by 4 percent; senior engineers are in band E5.</p>
<script>alert('not text')</script>
</body></html>"""

CHINESE = "# 报销制度\n\n差旅费用在提交申请后三十天内报销。住宿标准为每晚五百元。\n"


def docx_bytes(paragraphs):
    """A minimal Word document with a heading and paragraphs."""
    body = "".join(
        f'<w:p><w:pPr><w:pStyle w:val="{style}"/></w:pPr><w:r><w:t>{text}</w:t></w:r></w:p>'
        if style
        else f"<w:p><w:r><w:t>{text}</w:t></w:r></w:p>"
        for style, text in paragraphs
    )
    document = (
        '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
        '<w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main">'
        f"<w:body>{body}</w:body></w:document>"
    )
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(
            "[Content_Types].xml",
            '<?xml version="1.0"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
            '<Override PartName="/word/document.xml" ContentType="application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/></Types>',
        )
        z.writestr("word/document.xml", document)
    return buf.getvalue()


def upload(url, key, kb, name, data, groups=(), meta=(), method="POST", doc=None):
    query = [("name", name)] + [("group", g) for g in groups] + [("meta", m) for m in meta]
    path = f"/api/kbs/{kb}/documents" + (f"/{doc}" if doc else "?" + urllib.parse.urlencode(query))
    req = urllib.request.Request(
        url + path,
        method=method,
        data=data,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/octet-stream"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def wait_final(url, key, kb, doc, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, d = api(url, key, "GET", f"/api/kbs/{kb}/documents/{doc}")
        assert status == 200, d
        if d["status"] not in ("queued", "ingesting"):
            return d
        time.sleep(0.2)
    pytest.fail(f"document {doc} still ingesting after {timeout}s")


def search(url, key, kb, query, mode="hybrid", k=5, **extra):
    return api(url, key, "POST", f"/api/kbs/{kb}/search", {"query": query, "mode": mode, "k": k, **extra})


@pytest.fixture(scope="module")
def org(kiln_url, database):
    """A tenant with an admin key, a member key, a member of group `hr`,
    and another tenant's admin."""
    tenant = new_tenant(database)
    other = new_tenant(database)
    return {
        "admin": new_key(database, tenant, "--role", "tenant_admin"),
        "member": new_key(database, tenant),
        "hr": new_key(database, tenant, "--group", "hr"),
        "outsider": new_key(database, other, "--role", "tenant_admin"),
    }


@pytest.fixture(scope="module")
def handbook(kiln_url, org):
    """A knowledge base with a Markdown, an HTML (hr only), a Word and a
    Chinese document, all ingested."""
    admin = org["admin"]
    status, kb = api(kiln_url, admin, "POST", "/api/kbs", {"name": f"handbook-{uuid.uuid4().hex[:6]}"})
    assert status == 201, kb
    docs = {}
    for name, data, groups in [
        ("handbook.md", VACATION.encode(), ()),
        ("salaries.html", SALARIES_HTML.encode(), ("hr",)),
        ("security.docx", docx_bytes([("Heading1", "Security policy"), (None, "Laptops must use full-disk encryption and a screen lock after five minutes.")]), ()),
        ("报销.md", CHINESE.encode(), ()),
    ]:
        status, d = upload(kiln_url, admin, kb["id"], name, data, groups=groups, meta=["dept:" + name.split(".")[0]])
        assert status == 202, d
        docs[name] = d["id"]
    for name, doc in docs.items():
        d = wait_final(kiln_url, admin, kb["id"], doc)
        assert d["status"] == "ready", d
        assert d["chunks"] >= 1
    return kb["id"], docs


def test_ingested_formats_are_searchable_in_every_mode(kiln_url, org, handbook):
    kb, docs = handbook
    admin = org["admin"]
    for mode in ("bm25", "vector", "hybrid"):
        status, hits = search(kiln_url, admin, kb, "how many paid vacation days do employees get", mode)
        assert status == 200, hits
        top = hits["data"][0]
        assert top["document_id"] == docs["handbook.md"], (mode, hits)
        assert "25 days of paid vacation" in top["text"]
        assert top["heading"] == "Employee handbook > Vacation"
        assert 0 <= top["start"] < top["end"]
    status, hits = search(kiln_url, admin, kb, "disk encryption on laptops")
    assert hits["data"][0]["document_name"] == "security.docx"
    assert hits["data"][0]["heading"] == "Security policy"
    # Chinese is carried by the full-text side (the embedding model is English-only).
    status, hits = search(kiln_url, admin, kb, "差旅费用报销", "bm25")
    assert hits["data"][0]["document_name"] == "报销.md", hits
    assert "三十天内" in hits["data"][0]["text"]
    # The HTML's script and style never reach the index.
    status, hits = search(kiln_url, admin, kb, "alert color red", "bm25")
    assert all("alert" not in h["text"] for h in hits["data"])
    # Metadata filters.
    status, hits = search(kiln_url, admin, kb, "policy", metadata={"dept": "security"})
    assert {h["document_name"] for h in hits["data"]} == {"security.docx"}


def test_groups_and_tenants_see_only_what_they_may(kiln_url, org, handbook):
    kb, docs = handbook
    secret = docs["salaries.html"]
    for mode in ("bm25", "vector", "hybrid"):
        status, hits = search(kiln_url, org["member"], kb, "engineering salary budget band", mode)
        assert status == 200
        assert all(h["document_id"] != secret for h in hits["data"]), mode
        status, hits = search(kiln_url, org["hr"], kb, "engineering salary budget band", mode)
        assert hits["data"][0]["document_id"] == secret, mode
    # Lists, counts and direct reads do not betray the restricted document.
    status, listing = api(kiln_url, org["member"], "GET", f"/api/kbs/{kb}/documents")
    assert secret not in {d["id"] for d in listing["data"]}
    assert len(listing["data"]) == 3
    status, info = api(kiln_url, org["member"], "GET", f"/api/kbs/{kb}")
    assert info["documents"] == 3
    # The chunk count is of the visible documents only.
    assert info["chunks"] == sum(d["chunks"] for d in listing["data"]), (info, listing)
    status, hr_info = api(kiln_url, org["hr"], "GET", f"/api/kbs/{kb}")
    status, hr_listing = api(kiln_url, org["hr"], "GET", f"/api/kbs/{kb}/documents")
    assert hr_info["chunks"] == sum(d["chunks"] for d in hr_listing["data"]) > info["chunks"], hr_info
    status, listed = api(kiln_url, org["member"], "GET", "/api/kbs")
    assert [k["chunks"] for k in listed["data"] if k["id"] == kb] == [info["chunks"]]
    # Paging, newest first, shows each visible document once and no other.
    for who, expect in (("member", 3), ("hr", 4)):
        seen, after = [], None
        while True:
            path = f"/api/kbs/{kb}/documents?limit=1" + (f"&after={after}" if after else "")
            status, page = api(kiln_url, org[who], "GET", path)
            assert status == 200, page
            assert len(page["data"]) == 1 and page["last_id"] == page["data"][0]["id"]
            seen.append(page["last_id"])
            if not page["has_more"]:
                break
            after = page["last_id"]
        assert len(seen) == len(set(seen)) == expect, who
        _, full = api(kiln_url, org[who], "GET", f"/api/kbs/{kb}/documents")
        assert [d["id"] for d in full["data"]] == seen and full["has_more"] is False
    # Continuing after a hidden document reads as continuing after none.
    status, hidden = api(kiln_url, org["member"], "GET", f"/api/kbs/{kb}/documents?after={secret}")
    status_missing, missing = api(kiln_url, org["member"], "GET", f"/api/kbs/{kb}/documents?after=doc_nope")
    assert status == status_missing == 400
    assert hidden["error"]["message"].replace(secret, "X") == missing["error"]["message"].replace("doc_nope", "X")
    status, ready = api(kiln_url, org["hr"], "GET", f"/api/kbs/{kb}/documents?status=failed")
    assert status == 200 and ready["data"] == []
    for bad in ("limit=0", "limit=1001", "status=done", "colour=red"):
        status, body = api(kiln_url, org["member"], "GET", f"/api/kbs/{kb}/documents?{bad}")
        assert status == 400 and body["error"]["type"] == "invalid_request_error", (bad, body)
    status, hidden = api(kiln_url, org["member"], "GET", f"/api/kbs/{kb}/documents/{secret}")
    status_missing, missing = api(kiln_url, org["member"], "GET", f"/api/kbs/{kb}/documents/doc_nope")
    assert status == status_missing == 404
    assert hidden["error"]["message"].replace(secret, "X") == missing["error"]["message"].replace("doc_nope", "X")
    # Another tenant cannot tell the knowledge base exists.
    for path, method, body in [
        (f"/api/kbs/{kb}", "GET", None),
        (f"/api/kbs/{kb}/documents", "GET", None),
        (f"/api/kbs/{kb}/search", "POST", {"query": "vacation"}),
        (f"/api/kbs/{kb}/ask", "POST", {"question": "How many vacation days?"}),
        (f"/api/kbs/{kb}/documents/{secret}", "GET", None),
        (f"/api/kbs/{kb}/documents/{secret}", "DELETE", None),
        (f"/api/kbs/{kb}", "DELETE", None),
    ]:
        status, body = api(kiln_url, org["outsider"], method, path, body)
        assert status == 404, (path, body)
    for method, doc in (("POST", None), ("PUT", secret)):
        status, body = upload(kiln_url, org["outsider"], kb, "x.txt", b"outsider upload", method=method, doc=doc)
        assert status == 404, (method, body)
    status, body = api(kiln_url, org["outsider"], "POST", "/v1/chat/completions",
                       {"model": "kb:" + info["name"], "messages": [{"role": "user", "content": "vacation?"}]})
    assert status == 404, body
    assert kb not in json.dumps(body) and info["name"] in body["error"]["message"], body
    status, listing = api(kiln_url, org["outsider"], "GET", "/api/kbs")
    assert kb not in {k["id"] for k in listing["data"]}
    # Members read but do not change.
    status, body = upload(kiln_url, org["member"], kb, "x.txt", b"member upload")
    assert status == 403, body


def ledger(url, admin_key, key_id):
    status, rows = api(url, admin_key, "GET", "/api/ledger?limit=1000")
    assert status == 200, rows
    return [r for r in rows["data"] if r.get("key_id") == key_id]


def test_every_embedding_is_metered_to_the_key_that_caused_it(kiln_url, admin_key, org, handbook):
    kb, docs = handbook
    status, me = api(kiln_url, org["admin"], "GET", "/api/me")
    admin_key_id = me["key"]["id"]
    rows = ledger(kiln_url, admin_key, admin_key_id)
    ingest = [r for r in rows if r["endpoint"] == "/api/kbs/ingest"]
    assert ingest, rows
    assert all(r["model"] == "all-minilm-l6-v2" and r["prompt_tokens"] > 0 for r in ingest)
    status, me = api(kiln_url, org["member"], "GET", "/api/me")
    before = [r for r in ledger(kiln_url, admin_key, me["key"]["id"]) if r["endpoint"] == "/api/kbs/search"]
    search(kiln_url, org["member"], kb, "remote work days", "vector")
    search(kiln_url, org["member"], kb, "remote work days", "bm25")
    after = [r for r in ledger(kiln_url, admin_key, me["key"]["id"]) if r["endpoint"] == "/api/kbs/search"]
    assert len(after) == len(before) + 1, "one query embedding for the vector search, none for BM25"


def raw_upload(url, key, kb, name, headers, parts):
    """Sends an upload by hand (`headers` and the body `parts` as given; the
    server may close before all are sent) and returns the status and the
    error code."""
    parsed = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
    try:
        conn.putrequest("POST", f"/api/kbs/{kb}/documents?name={name}")
        conn.putheader("Authorization", f"Bearer {key}")
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders()
        try:
            for part in parts:
                conn.send(part)
        except (BrokenPipeError, ConnectionResetError):
            pass
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())["error"]["code"]
    finally:
        conn.close()


def pdf_bytes(text, encrypt=False):
    """A one-page PDF showing `text`; with `encrypt`, protected by a
    password (standard security handler, RC4) that is not the empty one."""
    content = f"BT /F1 24 Tf 72 700 Td ({text}) Tj ET"
    objects = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        "/Resources << /Font << /F1 5 0 R >> >> >>",
        f"<< /Length {len(content)} >>\nstream\n{content}\nendstream",
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    trailer = f"/Size {len(objects) + 1} /Root 1 0 R"
    if encrypt:
        objects.append(f"<< /Filter /Standard /V 1 /R 2 /Length 40 /O <{'0' * 64}> /U <{'1' * 64}> /P -44 >>")
        file_id = "<00112233445566778899AABBCCDDEEFF>"
        trailer = f"/Size {len(objects) + 1} /Root 1 0 R /Encrypt {len(objects)} 0 R /ID [{file_id} {file_id}]"
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for i, body in enumerate(objects):
        offsets.append(len(out))
        out += f"{i + 1} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    for off in offsets:
        out += f"{off:010} 00000 n \n".encode()
    out += f"trailer\n<< {trailer} >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def test_bad_uploads_get_clear_outcomes(kiln_url, admin_key, org, handbook):
    kb, docs = handbook
    admin = org["admin"]
    status, body = upload(kiln_url, admin, kb, "empty.txt", b"")
    assert status == 400 and "empty" in body["error"]["message"], body
    status, body = upload(kiln_url, admin, kb, "junk.txt", os.urandom(4096) + b"\0\0\0")
    assert status == 400 and "unsupported" in body["error"]["message"].lower(), body
    status, body = upload(kiln_url, admin, kb, "image.pdf", b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    assert status == 400, body
    # The same upload again is recognised; the same bytes under another
    # name are another document, ready without embedding anything again.
    status, body = upload(kiln_url, admin, kb, "handbook.md", VACATION.encode(), meta=["dept:handbook"])
    assert status == 200 and body["duplicate"] and body["id"] == docs["handbook.md"], body
    admin_id = api(kiln_url, admin, "GET", "/api/me")[1]["key"]["id"]

    def ingest_rows():
        return sum(r["endpoint"] == "/api/kbs/ingest" for r in ledger(kiln_url, admin_key, admin_id))

    before = ingest_rows()
    status, body = upload(kiln_url, admin, kb, "again.md", VACATION.encode())
    assert status == 202 and not body["duplicate"] and body["id"] != docs["handbook.md"], body
    assert wait_final(kiln_url, admin, kb, body["id"])["status"] == "ready"
    assert ingest_rows() == before, "the copy's vectors were reused, not embedded (and charged) again"
    assert api(kiln_url, admin, "DELETE", f"/api/kbs/{kb}/documents/{body['id']}")[0] == 200
    # A corrupt PDF fails in the background with a code, indexing nothing.
    status, body = upload(kiln_url, admin, kb, "broken.pdf", b"%PDF-1.7\n%garbage without objects\n")
    assert status == 202, body
    d = wait_final(kiln_url, admin, kb, body["id"])
    assert d["status"] == "failed" and d["error_code"] == "corrupt", d
    # A password-protected PDF fails as such, and so does nothing else: the
    # same PDF without the password is read.
    status, body = upload(kiln_url, admin, kb, "locked.pdf", pdf_bytes("Quarterly figures", encrypt=True))
    assert status == 202, body
    d = wait_final(kiln_url, admin, kb, body["id"])
    assert d["status"] == "failed" and d["error_code"] == "encrypted", d
    assert "password" in d["error"].lower() or "encrypted" in d["error"].lower(), d
    status, body = upload(kiln_url, admin, kb, "open.pdf", pdf_bytes("Quarterly figures"))
    assert status == 202, body
    d = wait_final(kiln_url, admin, kb, body["id"])
    assert d["status"] == "ready", d
    assert api(kiln_url, admin, "DELETE", f"/api/kbs/{kb}/documents/{body['id']}")[0] == 200
    # A zip bomb disguised as a Word document.
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("[Content_Types].xml", "<Types/>")
        z.writestr("word/document.xml", b"<w:document>" + b" " * (300 << 20) + b"</w:document>")
    status, body = upload(kiln_url, admin, kb, "bomb.docx", bomb.getvalue())
    if status == 202:
        d = wait_final(kiln_url, admin, kb, body["id"])
        assert d["status"] == "failed" and d["error_code"] == "too_large", d
    else:
        assert status in (400, 413), body
    # A 500 MB upload is refused from its Content-Length, before it is read.
    status, code = raw_upload(kiln_url, admin, kb, "huge.txt", {"Content-Length": str(500 << 20)}, [b"a" * 65536])
    assert (status, code) == (413, "payload_too_large")
    # Without a Content-Length (chunked), it is refused once it passes the
    # limit (64 MiB by default), and nothing of it is kept.
    piece = b"b" * (1 << 20)
    chunks = [b"%x\r\n%s\r\n" % (len(piece), piece)] * 80 + [b"0\r\n\r\n"]
    status, code = raw_upload(kiln_url, admin, kb, "chunked.txt", {"Transfer-Encoding": "chunked"}, chunks)
    assert (status, code) == (413, "payload_too_large")
    status, listing = api(kiln_url, admin, "GET", f"/api/kbs/{kb}/documents")
    assert status == 200 and "chunked.txt" not in json.dumps(listing), listing
    # Search input is checked.
    assert search(kiln_url, admin, kb, "", "bm25")[0] == 400
    assert search(kiln_url, admin, kb, "x", "fuzzy")[0] == 400
    assert search(kiln_url, admin, kb, "x", k=0)[0] == 400


def test_replace_and_delete_reach_every_index(kiln_url, org):
    admin = org["admin"]
    status, kb = api(kiln_url, admin, "POST", "/api/kbs", {"name": f"versions-{uuid.uuid4().hex[:6]}"})
    kb = kb["id"]
    status, d = upload(kiln_url, admin, kb, "parking.txt", b"Parking permits cost forty euros per month.")
    assert wait_final(kiln_url, admin, kb, d["id"])["status"] == "ready"
    status, v2 = upload(kiln_url, admin, kb, "parking.txt", b"Parking is free for cyclists and costs nothing.", method="PUT", doc=d["id"])
    assert status == 202 and v2["version"] == 2, v2
    assert wait_final(kiln_url, admin, kb, d["id"])["live_version"] == 2
    for mode in ("bm25", "vector"):
        status, hits = search(kiln_url, admin, kb, "parking permits forty euros", mode)
        assert all("forty" not in h["text"] for h in hits["data"]), mode
    # Deleting a document while it is being ingested: it is gone, and stays gone.
    long_text = " ".join(f"Clause {i} describes obligation number {i} of the tenant." for i in range(3000))
    status, big = upload(kiln_url, admin, kb, "lease.txt", long_text.encode())
    assert status == 202
    status, _ = api(kiln_url, admin, "DELETE", f"/api/kbs/{kb}/documents/{big['id']}")
    assert status == 200
    time.sleep(1.0)
    status, _ = api(kiln_url, admin, "GET", f"/api/kbs/{kb}/documents/{big['id']}")
    assert status == 404
    for mode in ("bm25", "vector"):
        status, hits = search(kiln_url, admin, kb, "clause obligation tenant", mode)
        assert all(h["document_id"] != big["id"] for h in hits["data"])
    status, info = api(kiln_url, admin, "GET", f"/api/kbs/{kb}")
    assert info["documents"] == 1
    status, _ = api(kiln_url, admin, "DELETE", f"/api/kbs/{kb}")
    assert status == 200
    assert api(kiln_url, admin, "GET", f"/api/kbs/{kb}")[0] == 404


def test_a_knowledge_base_whose_files_were_removed_frees_its_name(tmp_path):
    import shutil
    args = ("--embedding-model", "all-minilm-l6-v2", "--database", str(tmp_path / "kiln.db"),
            "--kb-dir", str(tmp_path / "kb"))
    kiln = start_kiln(*args)
    admin = kiln.admin_key
    try:
        status, kb = api(kiln.url, admin, "POST", "/api/kbs", {"name": "notes"})
        assert status == 201, kb
        assert api(kiln.url, admin, "POST", "/api/kbs", {"name": "notes"})[0] == 409
    finally:
        kiln.stop()
    shutil.rmtree(tmp_path / "kb" / kb["id"])
    kiln = start_kiln(*args, expect_admin_key=False)
    try:
        status, listing = api(kiln.url, admin, "GET", "/api/kbs")
        assert listing["data"] == [], listing
        status, again = api(kiln.url, admin, "POST", "/api/kbs", {"name": "notes"})
        assert status == 201, again
    finally:
        kiln.stop()


def test_sigkill_during_ingestion_leaves_consistent_indexes(tmp_path):
    db = tmp_path / "kiln.db"
    kb_dir = tmp_path / "kb"
    args = ("--embedding-model", "all-minilm-l6-v2", "--database", str(db), "--kb-dir", str(kb_dir))
    kiln = start_kiln(*args)
    admin = kiln.admin_key
    try:
        status, kb = api(kiln.url, admin, "POST", "/api/kbs", {"name": "crash"})
        kb = kb["id"]
        status, small = upload(kiln.url, admin, kb, "small.txt", b"The boiler room is on the lower level.")
        assert wait_final(kiln.url, admin, kb, small["id"])["status"] == "ready"
        text = "\n\n".join(
            f"Section {i}. Valve {i} must be inspected every {i % 12 + 1} months by a certified engineer."
            for i in range(1500)
        )
        status, big = upload(kiln.url, admin, kb, "maintenance.txt", text.encode())
        assert status == 202
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            d = api(kiln.url, admin, "GET", f"/api/kbs/{kb}/documents/{big['id']}")[1]
            if d["progress"]["done"] > 0:
                break
            time.sleep(0.05)
        assert d["status"] == "ingesting", d
        kiln.proc.send_signal(signal.SIGKILL)
        kiln.proc.wait()
    finally:
        kiln.stop()
    kiln = start_kiln(*args, expect_admin_key=False)
    try:
        # Before the resumed ingestion finishes, nothing of it is searchable.
        status, hits = search(kiln.url, admin, kb, "valve inspected certified engineer", "bm25")
        assert status == 200
        if api(kiln.url, admin, "GET", f"/api/kbs/{kb}/documents/{big['id']}")[1]["status"] != "ready":
            assert all(h["document_id"] != big["id"] for h in hits["data"])
        d = wait_final(kiln.url, admin, kb, big["id"], timeout=600)
        assert d["status"] == "ready" and d["version"] == 1, d
        status, info = api(kiln.url, admin, "GET", f"/api/kbs/{kb}")
        small_chunks = api(kiln.url, admin, "GET", f"/api/kbs/{kb}/documents/{small['id']}")[1]["chunks"]
        assert info["chunks"] == d["chunks"] + small_chunks, (info, d)
        for mode in ("bm25", "vector"):
            status, hits = search(kiln.url, admin, kb, "Valve 777 must be inspected", mode, k=3)
            assert hits["data"][0]["document_id"] == big["id"], (mode, hits)
        status, hits = search(kiln.url, admin, kb, "boiler room lower level", "bm25", k=1)
        assert hits["data"][0]["document_id"] == small["id"]
    finally:
        kiln.stop()


def test_grounded_answers_cite_their_sources_or_say_not_found(kiln_url, admin_key, org, handbook):
    kb, docs = handbook
    member = org["member"]
    status, a = api(kiln_url, member, "POST", f"/api/kbs/{kb}/ask", {"question": "How many days of paid vacation do full-time employees receive?"})
    assert status == 200, a
    assert a["found"] is True and a["model"] == "smollm2-135m"
    assert "25" in a["answer"], a
    assert a["sentences"] and any(s["supported"] for s in a["sentences"]), a
    assert a["citations"], a
    for c in a["citations"]:
        source = a["sources"][c["source"] - 1]
        assert c["document_id"] == source["document_id"]
        assert c["quote"] in source["text"]
        assert c["end"] - c["start"] == len(c["quote"])
        # The quote sits at its offsets inside the chunk.
        offset = c["start"] - source["start"]
        assert source["text"][offset : offset + len(c["quote"])] == c["quote"]
    assert any(c["document_id"] == docs["handbook.md"] for c in a["citations"])
    assert a["usage"]["completion_tokens"] > 0
    generations = 1
    # Not in the knowledge base, or not in its language: no guess. (When
    # retrieval finds nothing relevant the model is not even asked.)
    for q in ["What is the boiling point of mercury?", "员工每年有多少天带薪假期？"]:
        status, a = api(kiln_url, member, "POST", f"/api/kbs/{kb}/ask", {"question": q})
        assert status == 200, a
        assert a["found"] is False and a["citations"] == [] and a["sentences"] == [], a
        assert "does not contain" in a["answer"]
        generations += a["usage"]["total_tokens"] > 0
    # A member never gets an answer from a document it may not see.
    status, a = api(kiln_url, member, "POST", f"/api/kbs/{kb}/ask", {"question": "Which salary band are senior engineers in?"})
    assert status == 200
    assert all(s["document_id"] != docs["salaries.html"] for s in a["sources"]), a
    generations += a["usage"]["total_tokens"] > 0
    # The generation is charged to the asking key.
    status, me = api(kiln_url, member, "GET", "/api/me")
    rows = ledger(kiln_url, admin_key, me["key"]["id"])
    asked = [r for r in rows if r["endpoint"] == "/api/kbs/ask"]
    assert asked and all(r["model"] == "smollm2-135m" and r["prompt_tokens"] > 0 for r in asked), rows
    assert len(asked) == generations, "one ledger row per generation, none when the gate refused"


def test_a_knowledge_base_through_the_openai_chat_api(kiln_url, org, handbook):
    import openai

    kb, docs = handbook
    client = openai.OpenAI(base_url=kiln_url + "/v1", api_key=org["member"], max_retries=0, timeout=120)
    status, info = api(kiln_url, org["member"], "GET", f"/api/kbs/{kb}")
    r = client.chat.completions.create(
        model="kb:" + info["name"],
        messages=[{"role": "user", "content": "How many days of paid vacation do full-time employees receive?"}],
    )
    assert r.choices[0].message.content
    extra = r.model_extra["knowledge_base"]
    assert extra["found"] is True
    assert any(c["document_id"] == docs["handbook.md"] for c in extra["citations"]), extra
    stream = client.chat.completions.create(
        model="kb:" + kb,
        messages=[{"role": "user", "content": "What is the boiling point of mercury?"}],
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream)
    assert "does not contain" in text
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="kb:no-such-kb", messages=[{"role": "user", "content": "hi"}])


def test_ingestion_stops_cleanly_when_the_budget_runs_out(kiln_url, database):
    kiln_cli(database, "prices", "set", "all-minilm-l6-v2", "--input", "1", "--output", "0")
    tenant = new_tenant(database)
    # 0.0001 units at 1 per million tokens: 100 tokens of embeddings.
    kiln_cli(database, "tenants", "credit", tenant, "0.0001")
    admin = new_key(database, tenant, "--role", "tenant_admin")
    status, kb = api(kiln_url, admin, "POST", "/api/kbs", {"name": "budget"})
    kb = kb["id"]
    status, small = upload(kiln_url, admin, kb, "memo.txt", b"Lunch is at noon.")
    assert wait_final(kiln_url, admin, kb, small["id"])["status"] == "ready"
    text = "\n\n".join(f"Paragraph {i} explains rule {i} of the cafeteria in some detail." for i in range(200))
    status, big = upload(kiln_url, admin, kb, "rules.txt", text.encode())
    assert status == 202
    d = wait_final(kiln_url, admin, kb, big["id"])
    assert d["status"] == "stopped" and d["error_code"] == "refused", d
    assert "credit" in d["error"] or "budget" in d["error"], d
    assert d["live_version"] is None and d["chunks"] == 0
    status, info = api(kiln_url, admin, "GET", f"/api/kbs/{kb}")
    assert info["chunks"] == 1, info
    status, hits = search(kiln_url, admin, kb, "cafeteria rule paragraph", "bm25")
    assert all(h["document_id"] != big["id"] for h in hits["data"])


def test_revoking_the_uploaders_key_stops_its_ingestion(kiln_url, admin_key, database):
    tenant = new_tenant(database)
    uploader = new_key(database, tenant, "--role", "tenant_admin")
    status, me = api(kiln_url, uploader, "GET", "/api/me")
    status, kb = api(kiln_url, uploader, "POST", "/api/kbs", {"name": "revoke"})
    kb = kb["id"]
    text = "\n\n".join(f"Article {i} sets out duty {i} of the contractor in plain words." for i in range(3000))
    status, big = upload(kiln_url, uploader, kb, "contract.txt", text.encode())
    assert status == 202
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        d = api(kiln_url, admin_key, "GET", f"/api/kbs/{kb}/documents/{big['id']}")[1]
        if d["progress"]["done"] > 0:
            break
        time.sleep(0.05)
    kiln_cli(database, "keys", "revoke", me["key"]["id"])
    d = wait_final(kiln_url, admin_key, kb, big["id"])
    assert d["status"] == "stopped" and "revoked" in d["error"], d
    assert d["live_version"] is None


def test_the_kiln_kb_command_line(kiln_url, org, tmp_path):
    import subprocess

    from conftest import kiln_binary

    env = dict(os.environ, KILN_URL=kiln_url, KILN_API_KEY=org["admin"])

    def kb(*args):
        done = subprocess.run([str(kiln_binary()), "kb", *args], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout

    name = f"cli-{uuid.uuid4().hex[:6]}"
    kb("create", name)
    (tmp_path / "guide.md").write_text(VACATION)
    (tmp_path / "empty.txt").write_text("")
    kb("add", name, str(tmp_path / "guide.md"), "--group", "staff", "--meta", "kind:guide")
    listing = kb("ls", name)
    assert "guide.md" in listing and "ready" in listing
    assert name in kb("ls")
    assert "25 days of paid vacation" in kb("search", name, "paid vacation days", "--k", "1")
    answer = kb("ask", name, "How many days of paid vacation do full-time employees receive?")
    assert "guide.md (chars" in answer, answer
    refused = subprocess.run(
        [str(kiln_binary()), "kb", "add", name, str(tmp_path / "empty.txt")], env=env, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode != 0 and "empty" in refused.stderr
    kb("rm", name)
    assert name not in kb("ls")


def test_an_upstream_reranker_orders_results_and_is_metered(tmp_path):
    import subprocess

    mock_bin = kiln_binary().parent / "kiln-mock-upstream"
    mock = subprocess.Popen([str(mock_bin), "--port", "0"], stderr=subprocess.PIPE, text=True)
    try:
        line = mock.stderr.readline()
        mock_url = line.strip().rsplit(" ", 1)[-1]
        config = tmp_path / "kiln.toml"
        config.write_text(f'[rerank]\nurl = "{mock_url}/v1/rerank"\nmodel = "mock-rerank"\n')
        kiln = start_kiln(
            "--config", str(config), "--embedding-model", "all-minilm-l6-v2",
            "--database", str(tmp_path / "kiln.db"), "--kb-dir", str(tmp_path / "kb"),
        )
        try:
            admin = kiln.admin_key
            status, kb = api(kiln.url, admin, "POST", "/api/kbs", {"name": "rr"})
            kb = kb["id"]
            for name, text in [
                ("a.txt", b"Solar panels convert sunlight into electricity on the roof."),
                ("b.txt", b"Wind turbines convert wind into electricity offshore."),
                ("c.txt", b"The canteen serves soup on Fridays."),
            ]:
                status, d = upload(kiln.url, admin, kb, name, text)
                assert wait_final(kiln.url, admin, kb, d["id"])["status"] == "ready"
            status, hits = search(kiln.url, admin, kb, "wind electricity offshore", "hybrid", k=3)
            assert status == 200, hits
            scores = [h["rerank"] for h in hits["data"]]
            assert scores == sorted(scores, reverse=True) and scores[0] == 1.0, hits
            assert hits["data"][0]["document_name"] == "b.txt"
            status, rows = api(kiln.url, admin, "GET", "/api/ledger?limit=100")
            reranks = [r for r in rows["data"] if r["endpoint"] == "/api/kbs/rerank"]
            assert len(reranks) == 1 and reranks[0]["model"] == "mock-rerank" and reranks[0]["prompt_tokens"] > 0, reranks
        finally:
            kiln.stop()
    finally:
        mock.terminate()
        mock.wait()


def test_a_knowledge_base_on_an_upstream_embedding_model(kiln_url, admin_key, database, org, handbook, tmp_path, monkeypatch):
    """A gateway with no embedding model of its own builds a knowledge base
    on the session server's all-MiniLM-L6-v2 as an upstream: the same chunks
    and the same similarities as the session server's own knowledge base,
    every embedding metered on both sides, and an upstream that stops
    accepting the gateway's key fails the next document with its reason."""
    up_tenant = new_tenant(database)
    up_key = new_key(database, up_tenant)
    status, up_me = api(kiln_url, up_key, "GET", "/api/me")
    config = tmp_path / "kiln.toml"
    config.write_text(
        "[[upstreams]]\n"
        'name = "kiln-a"\n'
        f'base_url = "{kiln_url}/v1"\n'
        'models = ["all-minilm-l6-v2", "smollm2-135m"]\n'
        'api_key_env = "KILN_A_KEY"\n'
        'tokenizer = "all-minilm-l6-v2"\n'
    )
    monkeypatch.setenv("KILN_A_KEY", up_key)
    gw = start_kiln("--config", str(config), "--database", str(tmp_path / "gw.db"), "--kb-dir", str(tmp_path / "kb"))
    try:
        admin = gw.admin_key
        status, e = api(gw.url, admin, "POST", "/api/kbs", {"name": "x"})
        assert status == 400 and e["error"]["param"] == "embedding_model", e
        status, e = api(gw.url, admin, "POST", "/api/kbs", {"name": "x", "embedding_model": "nope"})
        assert status == 400 and "not served here" in e["error"]["message"], e
        # A chat model the upstream serves does not embed: refused, with the upstream's reason.
        status, e = api(gw.url, admin, "POST", "/api/kbs", {"name": "x", "embedding_model": "smollm2-135m"})
        assert status == 400 and "kiln-a" in e["error"]["message"] and "smollm2-135m" in e["error"]["message"], e

        status, kb = api(gw.url, admin, "POST", "/api/kbs", {"name": "remote", "embedding_model": "all-minilm-l6-v2"})
        assert status == 201, kb
        assert kb["embedding_model"] == "all-minilm-l6-v2" and kb["dimensions"] == 384, kb
        kb = kb["id"]
        status, d = upload(gw.url, admin, kb, "handbook.md", VACATION.encode())
        assert status == 202, d
        d = wait_final(gw.url, admin, kb, d["id"])
        assert d["status"] == "ready", d

        # The same text, chunked with the same tokenizer and embedded by the same model.
        local_kb, docs = handbook
        local_doc = api(kiln_url, org["admin"], "GET", f"/api/kbs/{local_kb}/documents/{docs['handbook.md']}")[1]
        assert d["chunks"] == local_doc["chunks"], (d, local_doc)
        query = "can staff work from home"
        status, remote_hits = search(gw.url, admin, kb, query, "vector", k=10)
        assert status == 200, remote_hits
        status, local_hits = search(kiln_url, org["admin"], local_kb, query, "vector", k=10)
        local = {h["text"]: h["score"] for h in local_hits["data"] if h["document_name"] == "handbook.md"}
        assert "three days per week" in remote_hits["data"][0]["text"], remote_hits
        for h in remote_hits["data"]:
            assert abs(h["score"] - local[h["text"]]) < 1e-4, (h, local)

        # The command line names the model too; its vector length is known by now.
        import subprocess
        done = subprocess.run([str(kiln_binary()), "kb", "create", "cli-remote", "--embedding-model", "all-minilm-l6-v2"],
                              env=dict(os.environ, KILN_URL=gw.url, KILN_API_KEY=admin), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        status, cli_kb = api(gw.url, admin, "GET", "/api/kbs/cli-remote")
        assert cli_kb["embedding_model"] == "all-minilm-l6-v2" and cli_kb["dimensions"] == 384, cli_kb

        # Metered here to the gateway's key, at the tokens the upstream reported,
        # and at the upstream to the key the gateway uses there.
        status, me = api(gw.url, admin, "GET", "/api/me")
        rows = ledger(gw.url, admin, me["key"]["id"])
        ok = [r for r in rows if r["outcome"] == "ok"]
        assert {r["endpoint"] for r in ok} == {"/api/kbs", "/api/kbs/ingest", "/api/kbs/search"}, rows
        assert sum(r["endpoint"] == "/api/kbs" for r in ok) == 1, "the model's vector length is learnt once"
        assert all(r["model"] == "all-minilm-l6-v2" and r["backend"] == "kiln-a" and r["prompt_tokens"] > 0 for r in ok), ok
        upstream_rows = [r for r in ledger(kiln_url, admin_key, up_me["key"]["id"]) if r["outcome"] == "ok"]
        assert all(r["endpoint"] == "/v1/embeddings" for r in upstream_rows), upstream_rows
        assert len(upstream_rows) == len(ok)
        assert sum(r["prompt_tokens"] for r in upstream_rows) == sum(r["prompt_tokens"] for r in ok)

        # The upstream stops accepting the gateway's key: the next document fails, saying why.
        kiln_cli(database, "keys", "revoke", up_me["key"]["id"])
        time.sleep(1.5)
        status, d2 = upload(gw.url, admin, kb, "later.md", b"# Later\n\nThe canteen serves soup on Fridays.\n")
        assert status == 202, d2
        d2 = wait_final(gw.url, admin, kb, d2["id"])
        assert d2["status"] == "failed" and d2["error_code"] == "embedding_failed", d2
        assert "kiln-a" in d2["error"] and "401" in d2["error"], d2
        status, listed = api(gw.url, admin, "GET", f"/api/kbs/{kb}")
        assert listed["documents"] == 2 and listed["chunks"] == d["chunks"], listed
    finally:
        gw.stop()


def test_the_relevance_gate_is_set_per_knowledge_base_and_per_ask(kiln_url, org):
    """A knowledge base keeps the gate's thresholds it was created with (a
    cosine belongs to its embedding model); one ask may use others."""
    admin = org["admin"]
    status, e = api(kiln_url, admin, "POST", "/api/kbs", {"name": "strict", "grounding": {"cosine": 1.5}})
    assert status == 400 and e["error"]["param"] == "grounding", e
    status, e = api(kiln_url, admin, "POST", "/api/kbs", {"name": "strict", "grounding": {"cosin": 0.5}})
    assert status == 400, e
    status, kb = api(kiln_url, admin, "POST", "/api/kbs",
                     {"name": f"strict-{uuid.uuid4().hex[:6]}", "grounding": {"coverage": 1.0, "cosine": 1.0}})
    assert status == 201, kb
    assert kb["grounding"] == {"coverage": 1.0, "cosine": 1.0, "support": 0.15}, kb
    status, d = upload(kiln_url, admin, kb["id"], "handbook.md", VACATION.encode())
    assert wait_final(kiln_url, admin, kb["id"], d["id"])["status"] == "ready"
    question = "How many days of paid vacation do full-time employees receive?"
    path = f"/api/kbs/{kb['id']}/ask"
    status, a = api(kiln_url, admin, "POST", path, {"question": question})
    assert status == 200 and a["found"] is False and a["usage"]["total_tokens"] == 0, a
    status, a = api(kiln_url, admin, "POST", path, {"question": question, "grounding": {"coverage": 0.3, "cosine": 0.45}})
    assert status == 200 and a["found"] is True and "25" in a["answer"], a
    status, e = api(kiln_url, admin, "POST", path, {"question": question, "grounding": {"support": -1}})
    assert status == 400 and e["error"]["param"] == "grounding", e
