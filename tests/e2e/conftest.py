"""Starts the real `kiln serve` (debug build) once per session on port 0,
on a fresh database, and reads the platform admin key its first start prints.

Models come from $KILN_TEST_HOME (default ~/.cache/kiln/home), pulled by
scripts/test.sh. Set KILN_BIN to test another binary.
"""

import os
import pathlib
import queue
import re
import subprocess
import threading
import time

import openai
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
LISTENING = re.compile(r"kiln listening on (http://[^\s]+)")
ADMIN_KEY = re.compile(r"created the platform admin API key \(shown only now, keep it safe\): (kiln-sk-\w+)")
START_TIMEOUT_S = 180


def _test_home() -> pathlib.Path:
    default = pathlib.Path.home() / ".cache" / "kiln" / "home"
    return pathlib.Path(os.environ.get("KILN_TEST_HOME", default))


def kiln_binary() -> pathlib.Path:
    binary = pathlib.Path(os.environ.get("KILN_BIN", ROOT / "target" / "debug" / "kiln"))
    if not binary.exists():
        pytest.fail(f"{binary} not found: run `cargo build --workspace` first")
    return binary


@pytest.fixture(scope="session")
def database(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("kiln-db") / "kiln.db"


def kiln_cli(database: pathlib.Path, *args: str) -> str:
    """Runs `kiln ARGS --database DATABASE`; returns stdout."""
    done = subprocess.run(
        [str(kiln_binary()), *args, "--database", str(database)],
        env=dict(os.environ, KILN_HOME=str(_test_home())),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"kiln {' '.join(args)} failed:\n{done.stderr}"
    return done.stdout


class Kiln:
    """A running `kiln serve`: its process, address, admin key (when its
    first start printed one) and output so far."""

    def __init__(self, proc, url, admin_key, log):
        self.proc = proc
        self.url = url
        self.admin_key = admin_key
        self.log = log

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_kiln(*args: str, expect_admin_key: bool = True) -> Kiln:
    """Starts `kiln serve --port 0 ARGS` and waits until it listens."""
    binary = kiln_binary()
    env = dict(os.environ, KILN_HOME=str(_test_home()))
    proc = subprocess.Popen(
        [str(binary), "serve", "--port", "0", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: "queue.Queue[str | None]" = queue.Queue()
    log: list[str] = []

    def pump():
        # Keep draining so the server never blocks on a full pipe.
        assert proc.stdout is not None
        for line in proc.stdout:
            log.append(line)
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    url = None
    admin_key = None
    deadline = time.monotonic() + START_TIMEOUT_S
    while url is None and time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        if line is None:
            break
        k = ADMIN_KEY.search(line)
        if k:
            admin_key = k.group(1)
        m = LISTENING.search(line)
        if m:
            url = m.group(1).rstrip("/")
    if url is None or (expect_admin_key and admin_key is None):
        proc.kill()
        proc.wait()
        pytest.fail("kiln serve did not start:\n" + "".join(log[-50:]))
    return Kiln(proc, url, admin_key, log)


@pytest.fixture(scope="session")
def kb_dir(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("kiln-kb")


@pytest.fixture(scope="session")
def server(database, kb_dir):
    """(url, admin key) of the running server."""
    kiln = start_kiln(
        "--model",
        "smollm2-135m",
        "--model",
        "gemma3-270m",
        "--embedding-model",
        "all-minilm-l6-v2",
        "--database",
        str(database),
        "--kb-dir",
        str(kb_dir),
    )
    try:
        yield kiln.url, kiln.admin_key
    finally:
        kiln.stop()


@pytest.fixture(scope="session")
def kiln_url(server):
    return server[0]


@pytest.fixture(scope="session")
def admin_key(server):
    return server[1]


@pytest.fixture(scope="session")
def client(kiln_url, admin_key):
    return openai.OpenAI(base_url=kiln_url + "/v1", api_key=admin_key, max_retries=0, timeout=120)
