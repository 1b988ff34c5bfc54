# Shared by the bench scripts: a temp dir cleaned on exit, background
# processes killed on exit, logging, and small /proc and port helpers.
# Source it after setting NAME (used for the temp dir and messages).
# shellcheck shell=bash

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TMP=$(mktemp -d /tmp/lb-$NAME.XXXXXX)
PIDS=()

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [[ ${KEEP_TMP:-0} == 1 ]]; then
        echo "configs and logs kept in $TMP"
    else
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "== $*" >&2; }
die() {
    echo "$NAME: $*" >&2
    exit 1
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # port pid what
    local i
    for ((i = 0; i < 100; i++)); do
        port_open "$1" && return 0
        kill -0 "$2" 2>/dev/null || die "$3 exited before listening on $1 (see $TMP)"
        sleep 0.1
    done
    die "$3 is not listening on 127.0.0.1:$1 after 10 s"
}

secs() { # "1s" / "500ms" / "2m" → seconds
    awk -v v="$1" 'BEGIN {
        if (v ~ /ms$/) { sub(/ms$/, "", v); print v / 1000 }
        else if (v ~ /m$/) { sub(/m$/, "", v); print v * 60 }
        else { sub(/s$/, "", v); print v } }'
}

# Machine-wide "total idle" CPU ticks, for how busy the box was meanwhile.
cpu_stat() { awk '/^cpu / { print $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9, $5 + $6 }' /proc/stat; }
