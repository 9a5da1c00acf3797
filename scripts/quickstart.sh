#!/usr/bin/env bash
# Kiln in one go: build, pull a chat model and an embedding model, start the
# server on a free port, ask it one question, print the answer, stop it.
#
#   KILN_HOME  where models are kept (default ~/.kiln)
#   KILN_BIN   use this kiln binary instead of building target/release/kiln
set -euo pipefail
cd "$(dirname "$0")/.."

export KILN_HOME="${KILN_HOME:-$HOME/.kiln}"
kiln="${KILN_BIN:-target/release/kiln}"

if [[ -z "${KILN_BIN:-}" ]]; then
    echo "==> building Kiln (release; a few minutes the first time)"
    cargo build --release -p kiln-server
fi

echo "==> pulling models into $KILN_HOME/models"
"$kiln" pull smollm2-135m
"$kiln" pull all-minilm-l6-v2

log="$(mktemp)"
server_pid=""
key_id=""
cleanup() {
    if [[ -n "$key_id" ]]; then
        "$kiln" keys revoke "$key_id" >/dev/null || true
    fi
    if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -f "$log"
}
trap cleanup EXIT

echo "==> making an API key for this run (tenant quickstart)"
"$kiln" tenants create quickstart >/dev/null 2>&1 || true  # exists after the first run
secret="$("$kiln" keys create --tenant quickstart --name quickstart 2>"$log")"
key_id="$(sed -n 's/^created key \(key-[0-9a-f]*\).*/\1/p' "$log")"

echo "==> starting kiln serve"
"$kiln" serve --port 0 --model smollm2-135m --embedding-model all-minilm-l6-v2 >"$log" 2>&1 &
server_pid=$!

url=""
for _ in $(seq 1 300); do
    url="$(sed -n 's/.*kiln listening on \(http:\/\/[^ ]*\).*/\1/p' "$log" | head -n 1)"
    if [[ -n "$url" ]]; then break; fi
    if ! kill -0 "$server_pid" 2>/dev/null; then
        echo "kiln serve exited early:" >&2
        cat "$log" >&2
        exit 1
    fi
    sleep 0.2
done
if [[ -z "$url" ]]; then
    echo "kiln serve did not report its address within 60s:" >&2
    cat "$log" >&2
    exit 1
fi
echo "    $url"
# The very first start makes the platform admin key and prints it once.
admin_line="$(grep -m1 'created the platform admin API key' "$log" || true)"
if [[ -n "$admin_line" ]]; then
    echo "    ${admin_line#*: } is the platform admin key: keep it, it is not shown again"
fi

question="In one sentence, what is a kiln?"
echo "==> POST $url/v1/chat/completions: $question"
response="$(curl -sS --fail-with-body "$url/v1/chat/completions" \
    -H 'Content-Type: application/json' \
    -H "Authorization: Bearer $secret" \
    -d "{\"model\": \"smollm2-135m\", \"max_tokens\": 64, \"temperature\": 0,
         \"messages\": [{\"role\": \"user\", \"content\": \"$question\"}]}")"

echo "==> answer:"
printf '%s' "$response" | python3 -c '
import json, sys
body = json.load(sys.stdin)
print(body["choices"][0]["message"]["content"].strip())
u = body.get("usage", {})
print("(%s prompt + %s completion tokens)" % (u.get("prompt_tokens"), u.get("completion_tokens")))
'
echo "==> stopping the server"
