#!/usr/bin/env bash
# What hammering /metrics costs lb at many backends: lb runs with BACKENDS
# backends (addresses nothing listens on: no traffic, no health checks, so
# the only work is the admin listener), SCRAPERS concurrent loops of
# `curl /metrics` run for DURATION seconds, and the CPU time lb used
# (utime + stime from /proc) is reported with the number of scrapes served.
#
#   bash bench/metrics_scrape.sh
#   LB=/tmp/lb-old BACKENDS=10000 SCRAPERS=4 DURATION=10 bash bench/metrics_scrape.sh
#
# Environment: LB (the binary; default: build and use target/release/lb),
# BACKENDS (default 10000), SCRAPERS (default 4), DURATION (seconds,
# default 10).
set -euo pipefail

BACKENDS=${BACKENDS:-10000}
SCRAPERS=${SCRAPERS:-4}
DURATION=${DURATION:-10}
LISTEN_PORT=18190
ADMIN_PORT=19910

NAME=metrics-scrape
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"

if [[ -z ${LB:-} ]]; then
    log "building lb (release)"
    (cd "$ROOT" && cargo build --release --quiet --bin lb) || die "cargo build failed"
    LB="$ROOT/target/release/lb"
fi

{
    echo "listen: 127.0.0.1:$LISTEN_PORT"
    echo "admin: 127.0.0.1:$ADMIN_PORT"
    echo "backends:"
    for ((i = 0; i < BACKENDS; i++)); do
        echo "  - address: 127.0.$((i / 250 + 1)).$((i % 250 + 1)):9"
    done
} >"$TMP/lb.yaml"
"$LB" --config "$TMP/lb.yaml" --no-watch </dev/null >"$TMP/lb.out" 2>"$TMP/lb.log" &
LB_PID=$!
PIDS+=("$LB_PID")
wait_port "$ADMIN_PORT" "$LB_PID" "lb admin"

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$LB_PID/stat"; }
hz=$(getconf CLK_TCK)
first=$(cpu_ticks)
series=$(curl -fsS "http://127.0.0.1:$ADMIN_PORT/metrics" | grep -vc '^#')
log "lb: $BACKENDS backends, $series series per scrape; the first scrape (one encoding) took $(((($(cpu_ticks) - first) * 1000) / hz)) ms of CPU"

before=$(cpu_ticks)
for ((s = 0; s < SCRAPERS; s++)); do
    (
        n=0
        end=$((SECONDS + DURATION))
        while ((SECONDS < end)); do
            curl -fsS -o /dev/null "http://127.0.0.1:$ADMIN_PORT/metrics" && n=$((n + 1))
        done
        echo "$n" >"$TMP/scrapes.$s"
    ) &
    PIDS+=($!)
done
wait "${PIDS[@]:1}" 2>/dev/null || true
after=$(cpu_ticks)
scrapes=$(cat "$TMP"/scrapes.* | awk '{ n += $1 } END { print n }')
awk -v t=$((after - before)) -v hz="$hz" -v d="$DURATION" -v n="$scrapes" -v s="$SCRAPERS" 'BEGIN {
    cpu = t / hz
    printf "%d scrapers, %d s: %d scrapes served, lb used %.2f s of CPU (%.0f%% of one core), %.2f ms of CPU per scrape\n",
        s, d, n, cpu, 100 * cpu / d, n ? 1000 * cpu / n : 0
}'
