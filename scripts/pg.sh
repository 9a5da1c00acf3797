#!/usr/bin/env bash
# A throwaway PostgreSQL 15 cluster for Kiln's tests, from the machine's
# Debian packages (postgresql-15). Idempotent.
#
#   scripts/pg.sh start   create (once) and start it; prints KILN_TEST_PG_URL=...
#   scripts/pg.sh stop    stop it
#   scripts/pg.sh drop    stop and delete it
#
#   KILN_PG_PORT  its port on 127.0.0.1 (default 55432)
#   KILN_PG_DIR   its data directory (default /var/tmp/kiln-pg/15-kilntest;
#                 the postgres user must be able to reach it, so not under /root)
#
# Tests connect as role `kiln` (password `kiln`) to database `kiln` and make a
# fresh schema per test. Durability is off (fsync, synchronous_commit): it is
# a test cluster.
set -euo pipefail

version=15
cluster=kilntest
port="${KILN_PG_PORT:-55432}"
dir="${KILN_PG_DIR:-/var/tmp/kiln-pg/$version-$cluster}"
url="postgres://kiln:kiln@127.0.0.1:$port/kiln"

as_postgres() {
    if [[ "$(id -u)" == 0 ]]; then
        runuser -u postgres -- "$@"
    else
        sudo -n -u postgres -- "$@"
    fi
}

need() {
    if ! command -v pg_createcluster >/dev/null; then
        echo "pg.sh: PostgreSQL's Debian tools are missing: apt-get install postgresql-$version" >&2
        exit 1
    fi
}

exists() {
    pg_lsclusters -h 2>/dev/null | awk '{print $1" "$2}' | grep -qx "$version $cluster"
}

running() {
    pg_lsclusters -h 2>/dev/null | awk -v v="$version" -v c="$cluster" '$1==v && $2==c {print $4}' | grep -q online
}

start() {
    need
    if ! exists; then
        mkdir -p "$(dirname "$dir")"
        chmod 755 "$(dirname "$dir")"
        pg_createcluster "$version" "$cluster" -p "$port" -d "$dir" --start-conf=manual \
            -- --auth-local=trust --auth-host=scram-sha-256 >&2
        pg_conftool "$version" "$cluster" set fsync off >&2
        pg_conftool "$version" "$cluster" set synchronous_commit off >&2
        pg_conftool "$version" "$cluster" set full_page_writes off >&2
        pg_conftool "$version" "$cluster" set max_connections 200 >&2
    fi
    if ! running; then
        pg_ctlcluster "$version" "$cluster" start >&2
    fi
    for _ in $(seq 1 50); do
        if as_postgres psql -p "$port" -qAtc "SELECT 1" >/dev/null 2>&1; then break; fi
        sleep 0.2
    done
    as_postgres psql -p "$port" -qAtc "SELECT 1 FROM pg_roles WHERE rolname = 'kiln'" | grep -q 1 \
        || as_postgres psql -p "$port" -qc "CREATE ROLE kiln LOGIN PASSWORD 'kiln'" >&2
    as_postgres psql -p "$port" -qAtc "SELECT 1 FROM pg_database WHERE datname = 'kiln'" | grep -q 1 \
        || as_postgres psql -p "$port" -qc "CREATE DATABASE kiln OWNER kiln" >&2
    echo "KILN_TEST_PG_URL=$url"
}

case "${1:-}" in
    start) start ;;
    stop) if exists && running; then pg_ctlcluster "$version" "$cluster" stop >&2; fi ;;
    drop) if exists; then pg_dropcluster --stop "$version" "$cluster" >&2; fi ;;
    *) echo "usage: scripts/pg.sh start|stop|drop" >&2; exit 2 ;;
esac
