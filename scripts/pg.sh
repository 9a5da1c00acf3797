#!/usr/bin/env bash
# A throwaway PostgreSQL 15 cluster for Kiln's tests, from the machine's
# Debian packages (postgresql-15). Idempotent: `start` on a running cluster
# only prints its URL.
#
#   scripts/pg.sh start   create (once) and start it; prints KILN_TEST_PG_URL=...
#                         on stdout (everything else goes to stderr), so
#                         `eval "$(scripts/pg.sh start)"` works
#   scripts/pg.sh stop    stop it
#   scripts/pg.sh drop    stop and delete it
#
# As root it is a Debian cluster (pg_createcluster, pg_ctlcluster) owned by
# the `postgres` user, with its data under /var/tmp/kiln-pg (the postgres
# user cannot reach /root). As any other user it is a private cluster made
# with initdb/pg_ctl, owned by that user, under ~/.cache/kiln/pg, with its
# Unix socket in the data directory.
#
#   KILN_PG_CLUSTER  its name (default kilntest)
#   KILN_PG_PORT     its port on 127.0.0.1 when it is created (default: the
#                    first free one from 55432); later starts keep the port
#   KILN_PG_DIR      its data directory (defaults above)
#
# Tests connect over TCP as role `kiln` (password `kiln`, scram-sha-256; not a
# superuser) to database `kiln` and make a fresh schema per test. Durability
# is off (fsync, synchronous_commit): it is a test cluster.
set -euo pipefail

version=15
bindir="/usr/lib/postgresql/$version/bin"
cluster="${KILN_PG_CLUSTER:-kilntest}"
if [[ "$(id -u)" == 0 ]]; then
    mode=debian
    dir="${KILN_PG_DIR:-/var/tmp/kiln-pg/$version-$cluster}"
else
    mode=user
    dir="${KILN_PG_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln/pg/$version-$cluster}"
fi

die() {
    echo "pg.sh: $*" >&2
    exit 1
}

need() {
    [[ -x "$bindir/postgres" ]] \
        || die "PostgreSQL $version is not installed ($bindir/postgres is missing): apt-get install postgresql-$version"
    if [[ "$mode" == debian ]]; then
        command -v pg_createcluster >/dev/null \
            || die "PostgreSQL's Debian tools are missing: apt-get install postgresql-common"
        id postgres >/dev/null 2>&1 || die "there is no postgres user: apt-get install postgresql-$version"
    fi
}

# psql as the cluster's superuser, over the Unix socket.
admin_psql() {
    if [[ "$mode" == debian ]]; then
        runuser -u postgres -- "$bindir/psql" -X -p "$port" -d postgres "$@"
    else
        "$bindir/psql" -X -h "$dir" -p "$port" -U postgres -d postgres "$@"
    fi
}

# Debian mode: the cluster's line in pg_lsclusters (ver name port status ...).
lscluster() {
    pg_lsclusters -h 2>/dev/null | awk -v v="$version" -v c="$cluster" '$1==v && $2==c'
}

exists() {
    if [[ "$mode" == debian ]]; then
        [[ -n "$(lscluster)" ]]
    else
        [[ -f "$dir/PG_VERSION" ]]
    fi
}

running() {
    if [[ "$mode" == debian ]]; then
        lscluster | awk '{print $4}' | grep -q online
    else
        "$bindir/pg_ctl" -D "$dir" status >/dev/null 2>&1
    fi
}

# The port of an existing cluster.
cluster_port() {
    if [[ "$mode" == debian ]]; then
        lscluster | awk '{print $3}'
    else
        sed -n 's/^port = \([0-9]*\).*/\1/p' "$dir/postgresql.conf" | tail -n 1
    fi
}

port_in_use() {
    # Something listening, or (Debian) another cluster registered on it.
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    if [[ "$mode" == debian ]] && pg_lsclusters -h 2>/dev/null | awk '{print $3}' | grep -qx "$1"; then
        return 0
    fi
    return 1
}

pick_port() {
    if [[ -n "${KILN_PG_PORT:-}" ]]; then
        echo "$KILN_PG_PORT"
        return
    fi
    local p
    for p in $(seq 55432 55531); do
        if ! port_in_use "$p"; then
            echo "$p"
            return
        fi
    done
    die "no free port in 55432-55531 on 127.0.0.1: set KILN_PG_PORT"
}

create() {
    port="$(pick_port)"
    if [[ -f "$dir/PG_VERSION" ]]; then
        # Left behind by a test cluster that is no longer registered.
        echo "pg.sh: removing the stale data directory $dir" >&2
        rm -rf "$dir"
    elif [[ -n "$(ls -A "$dir" 2>/dev/null)" ]]; then
        die "$dir is not empty and not a PostgreSQL data directory: set KILN_PG_DIR"
    fi
    echo "pg.sh: creating PostgreSQL $version cluster $cluster on 127.0.0.1:$port in $dir" >&2
    local settings=(
        "listen_addresses = '127.0.0.1'"
        "fsync = off"
        "synchronous_commit = off"
        "full_page_writes = off"
        "max_connections = 200"
    )
    if [[ "$mode" == debian ]]; then
        mkdir -p "$(dirname "$dir")"
        chmod 755 "$(dirname "$dir")"
        pg_createcluster "$version" "$cluster" -p "$port" -d "$dir" --start-conf=manual \
            -- --auth-local=peer --auth-host=scram-sha-256 >&2
        local conf="/etc/postgresql/$version/$cluster/conf.d/kiln-test.conf"
        printf '%s\n' "${settings[@]}" >"$conf"
    else
        mkdir -p "$dir"
        chmod 700 "$dir"
        "$bindir/initdb" -D "$dir" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
            -E UTF8 --locale=C.UTF-8 >&2
        printf '%s\n' "${settings[@]}" "port = $port" "unix_socket_directories = '$dir'" \
            >>"$dir/postgresql.conf"
    fi
}

start() {
    need
    if ! exists; then create; fi
    port="$(cluster_port)"
    [[ -n "$port" ]] || die "cannot tell the port of cluster $cluster"
    if ! running; then
        if [[ "$mode" == debian ]]; then
            pg_ctlcluster "$version" "$cluster" start >&2 \
                || die "cluster $cluster did not start; see /var/log/postgresql/postgresql-$version-$cluster.log"
        else
            "$bindir/pg_ctl" -D "$dir" -l "$dir/log" -w start >&2 \
                || die "cluster $cluster did not start; see $dir/log"
        fi
    fi
    local ready=
    for _ in $(seq 1 100); do
        if "$bindir/pg_isready" -q -h 127.0.0.1 -p "$port"; then
            ready=1
            break
        fi
        sleep 0.2
    done
    [[ -n "$ready" ]] || die "cluster $cluster is not accepting connections on 127.0.0.1:$port"
    if ! admin_psql -qAtc "SELECT 1 FROM pg_roles WHERE rolname = 'kiln'" | grep -q 1; then
        admin_psql -qc "CREATE ROLE kiln LOGIN PASSWORD 'kiln'" >&2
    fi
    if ! admin_psql -qAtc "SELECT 1 FROM pg_database WHERE datname = 'kiln'" | grep -q 1; then
        admin_psql -qc "CREATE DATABASE kiln OWNER kiln" >&2
    fi
    echo "KILN_TEST_PG_URL=postgres://kiln:kiln@127.0.0.1:$port/kiln"
}

stop() {
    if ! exists || ! running; then return; fi
    if [[ "$mode" == debian ]]; then
        pg_ctlcluster "$version" "$cluster" stop >&2
    else
        "$bindir/pg_ctl" -D "$dir" -m fast -w stop >&2
    fi
}

drop() {
    if [[ "$mode" == debian ]]; then
        if exists; then pg_dropcluster --stop "$version" "$cluster" >&2; fi
    else
        stop
        rm -rf "$dir"
    fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    drop) drop ;;
    *)
        echo "usage: scripts/pg.sh start|stop|drop" >&2
        exit 2
        ;;
esac
