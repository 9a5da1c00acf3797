"""Starts the real `kiln serve` (debug build) once per session on port 0.

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
START_TIMEOUT_S = 180


def _test_home() -> pathlib.Path:
    default = pathlib.Path.home() / ".cache" / "kiln" / "home"
    return pathlib.Path(os.environ.get("KILN_TEST_HOME", default))


@pytest.fixture(scope="session")
def kiln_url():
    binary = pathlib.Path(os.environ.get("KILN_BIN", ROOT / "target" / "debug" / "kiln"))
    if not binary.exists():
        pytest.fail(f"{binary} not found: run `cargo build --workspace` first")
    env = dict(os.environ, KILN_HOME=str(_test_home()))
    proc = subprocess.Popen(
        [
            str(binary),
            "serve",
            "--port",
            "0",
            "--model",
            "smollm2-135m",
            "--model",
            "gemma3-270m",
            "--embedding-model",
            "all-minilm-l6-v2",
        ],
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
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    url = None
    deadline = time.monotonic() + START_TIMEOUT_S
    while url is None and time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        if line is None:
            break
        log.append(line)
        m = LISTENING.search(line)
        if m:
            url = m.group(1).rstrip("/")
    if url is None:
        proc.kill()
        proc.wait()
        pytest.fail("kiln serve did not report `kiln listening on`:\n" + "".join(log[-50:]))
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def client(kiln_url):
    return openai.OpenAI(base_url=kiln_url + "/v1", api_key="kiln-e2e", max_retries=0, timeout=120)
