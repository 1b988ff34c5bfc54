#!/usr/bin/env bash
# What the metrics cost per request: one lb binary measured with and without
# the admin listener (scraped once a second, as Prometheus would), and
# optionally a BASELINE lb binary built without metrics, interleaved in one
# run on loopback. Prints the median req/s of each and the ratios.
#
#   bash bench/metrics_cost.sh
#   BASELINE=/tmp/lb-main ROUNDS=5 DURATION=5s bash bench/metrics_cost.sh
#
# Environment: DURATION (wrk -d, default 5s), ROUNDS (default 3), WARMUP
# (default 1s), CONNECTIONS (default 64), THREADS (default 2), BASELINE (an
# lb binary to compare with, e.g. one built from a commit before metrics).
set -euo pipefail

DURATION=${DURATION:-5s}
ROUNDS=${ROUNDS:-3}
WARMUP=${WARMUP:-1s}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
BACKEND_PORTS=(19101 19102 19103)
PLAIN_PORT=18180
ADMIN_PORT=18181
BASE_PORT=18182
METRICS_PORT=19901

NAME=metrics-cost
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"

command -v wrk >/dev/null || die "wrk is missing (apt-get install -y wrk)"
log "building lb and the example backend (release)"
(cd "$ROOT" && cargo build --release --quiet --bin lb --example backend) || die "cargo build failed"
LB="$ROOT/target/release/lb"
BACKEND="$ROOT/target/release/examples/backend"

"$BACKEND" "${BACKEND_PORTS[@]}" </dev/null >"$TMP/backend.log" 2>&1 &
BACKEND_PID=$!
PIDS+=("$BACKEND_PID")
for port in "${BACKEND_PORTS[@]}"; do wait_port "$port" "$BACKEND_PID" backend; done

config() { # listen-port [admin-port]
    echo "listen: 127.0.0.1:$1"
    [[ -n ${2:-} ]] && echo "admin: 127.0.0.1:$2"
    echo "backends:"
    for port in "${BACKEND_PORTS[@]}"; do echo "  - address: 127.0.0.1:$port"; done
}

start_lb() { # name binary port [admin-port]
    config "$3" "${4:-}" >"$TMP/$1.yaml"
    "$2" --config "$TMP/$1.yaml" --no-watch </dev/null >"$TMP/$1.out" 2>"$TMP/$1.log" &
    PIDS+=($!)
    wait_port "$3" $! "lb ($1)"
}

TARGETS=(plain admin)
start_lb plain "$LB" $PLAIN_PORT
start_lb admin "$LB" $ADMIN_PORT $METRICS_PORT
declare -A PORT=([plain]=$PLAIN_PORT [admin]=$ADMIN_PORT [baseline]=$BASE_PORT)
if [[ -n ${BASELINE:-} ]]; then
    start_lb baseline "$BASELINE" $BASE_PORT
    TARGETS+=(baseline)
fi

# A Prometheus-like scraper of the admin listener for the whole run.
(while true; do curl -fsS -o /dev/null "http://127.0.0.1:$METRICS_PORT/metrics" || true; sleep 1; done) &
PIDS+=($!)

rps() { # port duration
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$2" "http://127.0.0.1:$1/" | awk '/^Requests\/sec/ { print $2 }'
}

declare -A RESULTS
for t in "${TARGETS[@]}"; do rps "${PORT[$t]}" "$WARMUP" >/dev/null; done
log "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
for ((r = 1; r <= ROUNDS; r++)); do
    for t in "${TARGETS[@]}"; do
        v=$(rps "${PORT[$t]}" "$DURATION")
        RESULTS[$t]="${RESULTS[$t]:-} $v"
        log "round $r: $t $v req/s"
    done
done
log "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"

median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
printf '%-10s %12s %8s\n' target "req/s (med)" "vs plain"
plain=$(echo "${RESULTS[plain]}" | median)
for t in "${TARGETS[@]}"; do
    m=$(echo "${RESULTS[$t]}" | median)
    printf '%-10s %12.0f %8.3f\n' "$t" "$m" "$(awk -v a="$m" -v b="$plain" 'BEGIN { print a / b }')"
done
curl -fsS "http://127.0.0.1:$METRICS_PORT/metrics" | grep -E '^lb_requests_total' | head -5 >&2 || true
