#!/usr/bin/env bash
# lb's idle cost of active health checks: 1,000 backends probed every 1 s,
# no client traffic. Prints lb's CPU use (% of one core) over a window after
# a warm-up, its memory, and the probe connections it keeps open.
# See bench/README.md.
#
#   bash bench/health_cpu.sh               # 10 s warm-up + 10 s window
#   BACKENDS=2000 WINDOW=30 bash bench/health_cpu.sh
#
# Environment: BACKENDS (default 1000), INTERVAL (default 1s), TIMEOUT
# (default 500ms), WARMUP and WINDOW in seconds (default 10 each),
# BACKEND=/path/to/server uses another upstream binary (same CLI as
# examples/backend: the ports to serve) instead of building it,
# KEEP_TMP=1 keeps the generated config and logs.
set -euo pipefail

BACKENDS=${BACKENDS:-1000}
INTERVAL=${INTERVAL:-1s}
TIMEOUT=${TIMEOUT:-500ms}
WARMUP=${WARMUP:-10}
WINDOW=${WINDOW:-10}
FIRST_PORT=20000
LB_PORT=18090

NAME=health-cpu
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"


# Health checks answered so far, over all ports (empty if the backend
# does not print examples/backend's `status` lines).
probes_answered() {
    local from
    from=$(($(stat -c %s "$TMP/backend.log") + 1))
    echo status >&4
    sleep 0.5
    tail -c "+$from" "$TMP/backend.log" |
        awk '/ health checks$/ { n += $(NF - 2); seen = 1 } END { if (seen) print n }'
}


ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
status() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }

# One listening socket per backend plus one accepted probe connection each.
need=$((2 * BACKENDS + 256))
if (($(ulimit -n) < need)); then
    ulimit -n "$need" 2>/dev/null || die "ulimit -n is $(ulimit -n); $need file descriptors are needed"
fi

LAST_PORT=$((FIRST_PORT + BACKENDS - 1))
port_open "$LB_PORT" && die "127.0.0.1:$LB_PORT is already in use"
for port in $FIRST_PORT $((FIRST_PORT + BACKENDS / 2)) $LAST_PORT; do
    port_open "$port" && die "127.0.0.1:$port is already in use"
done

if [[ -n ${BACKEND:-} ]]; then
    log "building lb (release); backends: $BACKEND"
    (cd "$ROOT" && cargo build --release --quiet --bin lb) || die "cargo build failed"
else
    log "building lb and the example backend (release)"
    (cd "$ROOT" && cargo build --release --quiet --bin lb --example backend) ||
        die "cargo build failed"
    BACKEND="$ROOT/target/release/examples/backend"
fi
LB="$ROOT/target/release/lb"

log "starting $BACKENDS backends on 127.0.0.1:$FIRST_PORT-$LAST_PORT"
# Its stdin is a FIFO held open here, so that `status` can be asked for:
# examples/backend counts the health checks each port has answered.
mkfifo "$TMP/backend.in"
"$BACKEND" $(seq "$FIRST_PORT" "$LAST_PORT") <"$TMP/backend.in" >"$TMP/backend.log" 2>&1 &
BACKEND_PID=$!
PIDS+=("$BACKEND_PID")
exec 4>"$TMP/backend.in"
wait_port "$LAST_PORT" "$BACKEND_PID" backend
curl -fsS -o /dev/null "http://127.0.0.1:$FIRST_PORT/health" || die "backend does not answer /health with 2xx"

{
    echo "listen: 127.0.0.1:$LB_PORT"
    echo "strategy: round_robin"
    echo "health_check: {path: /health, interval: $INTERVAL, timeout: $TIMEOUT}"
    echo "backends:"
    for ((port = FIRST_PORT; port <= LAST_PORT; port++)); do
        echo "  - address: 127.0.0.1:$port"
    done
} >"$TMP/lb.yaml"
"$LB" --config "$TMP/lb.yaml" --check >/dev/null || die "lb rejects $TMP/lb.yaml"

log "starting lb; warm-up ${WARMUP}s, then measuring for ${WINDOW}s"
"$LB" --config "$TMP/lb.yaml" --log-level warn >"$TMP/lb.log" 2>&1 &
LB_PID=$!
PIDS+=("$LB_PID")
wait_port "$LB_PORT" "$LB_PID" lb
sleep "$WARMUP"

hz=$(getconf CLK_TCK)
probes0=$(probes_answered)
lb0=$(ticks "$LB_PID")
be0=$(ticks "$BACKEND_PID")
box0=$(cpu_stat)
t0=$(date +%s.%N)
sleep "$WINDOW"
lb1=$(ticks "$LB_PID")
be1=$(ticks "$BACKEND_PID")
box1=$(cpu_stat)
t1=$(date +%s.%N)
probes1=$(probes_answered)

kill -0 "$LB_PID" 2>/dev/null || die "lb exited (see $TMP/lb.log)"
rss=$(status "$LB_PID" VmRSS)
hwm=$(status "$LB_PID" VmHWM)
threads=$(status "$LB_PID" Threads)
fds=$(find "/proc/$LB_PID/fd" -mindepth 1 -maxdepth 1 | wc -l)
probe_conns=$(ss -Htn state established "( dport >= :$FIRST_PORT and dport <= :$LAST_PORT )" |
    wc -l)
down=$(grep -c "is down" "$TMP/lb.log" || true)
# Traffic through lb still works with every backend probed.
through=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$LB_PORT/" || echo none)

awk -v lt=$((lb1 - lb0)) -v bt=$((be1 - be0)) -v hz="$hz" -v t0="$t0" -v t1="$t1" \
    -v n="$BACKENDS" -v iv="$INTERVAL" -v ivs="$(secs "$INTERVAL")" -v to="$TIMEOUT" -v w="$WARMUP" \
    -v rss="$rss" -v hwm="$hwm" -v th="$threads" -v fds="$fds" -v pc="$probe_conns" \
    -v down="$down" -v through="$through" -v p0="$probes0" -v p1="$probes1" \
    -v box0="$box0" -v box1="$box1" -v ncpu="$(nproc)" 'BEGIN {
    d = t1 - t0
    printf "\nlb health-check cost: %d backends, GET /health every %s (timeout %s), no client traffic\n", n, iv, to
    split(box0, a, " "); split(box1, b, " ")
    busy = b[1] > a[1] ? 100 * (1 - (b[2] - a[2]) / (b[1] - a[1])) : 0
    printf "measured over %.1f s after a %d s warm-up on %d CPUs, %.0f%% busy meanwhile\n", d, w, ncpu, busy
    printf "(lb, the backends and any other work: above a few %% other work can inflate lb%s figure)\n\n", "\047s"
    printf "| %-36s | %14s |\n", "metric", "value"
    printf "|%s|%s|\n", "--------------------------------------", "----------------"
    printf "| %-36s | %13.1f%% |\n", "lb CPU (utime+stime, % of one core)", 100 * lt / hz / d
    printf "| %-36s | %14.1f |\n", "lb CPU ms per second", 1000 * lt / hz / d
    # Probes counted by the backend over the window (status asked 0.5 s
    # outside it on each side, so the rate is over d + 0.5 s), else the
    # configured rate.
    if (p0 != "" && p1 != "") {
        rate = (p1 - p0) / (d + 0.5)
        printf "| %-36s | %14.0f |\n", "probes/s answered by the backends", rate
    } else {
        rate = n / ivs
        printf "| %-36s | %14s |\n", "probes/s answered by the backends", "n/a"
    }
    printf "| %-36s | %14.1f |\n", "lb CPU us per probe", (rate > 0 ? 1e6 * lt / hz / d / rate : 0)
    printf "| %-36s | %13.1f%% |\n", "backend process CPU (serving probes)", 100 * bt / hz / d
    printf "| %-36s | %14.1f |\n", "lb RSS MiB", rss / 1024
    printf "| %-36s | %14.1f |\n", "lb peak RSS (VmHWM) MiB", hwm / 1024
    printf "| %-36s | %14d |\n", "lb threads", th
    printf "| %-36s | %14d |\n", "lb open file descriptors", fds
    printf "| %-36s | %14d |\n", "established conns to backends", pc
    printf "| %-36s | %14d |\n", "\"backend ... is down\" log lines", down
    printf "| %-36s | %14s |\n", "GET / through lb", through
}'
