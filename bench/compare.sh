#!/usr/bin/env bash
# lb vs nginx vs HAProxy on loopback: same 3 backends, same load, one run,
# reported side by side and as ratios. See bench/README.md.
#
#   bash bench/compare.sh                 # 10 s per target (~1 min in all)
#   DURATION=30s CONNECTIONS=128 bash bench/compare.sh
#   bash bench/compare.sh tcp             # mode: tcp vs nginx stream vs HAProxy mode tcp
#
# The tcp scenario measures connections per second (connect, 1 KiB echo,
# close; examples/tcp_bench rate) and the throughput of one 1 GiB echo
# transfer through each proxy. Its knobs: DURATION (default 5s there),
# CONCURRENCY (default 32 loops), TRANSFER (default 1GiB), ROUNDS, WARMUP.
#
# Environment: DURATION (wrk -d, default 10s), WARMUP (default 2s),
# ROUNDS (default 1: each target is measured ROUNDS times, interleaved, and
# the median is reported; on a noisy machine try ROUNDS=3 DURATION=5s),
# CONNECTIONS (wrk -c, default 64), THREADS (wrk -t, default 2),
# PROXY_THREADS (nginx workers, haproxy nbthread; default: the number of
# CPUs, which is what lb's tokio runtime uses), KEEP_TMP=1 keeps the
# generated configs, BACKEND=/path/to/server uses another upstream binary
# (same CLI as examples/backend: the ports to serve) instead of building it.
set -euo pipefail

DURATION_SET=${DURATION:-}
DURATION=${DURATION:-10s}
ROUNDS=${ROUNDS:-1}
WARMUP=${WARMUP:-2s}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
NCPU=$(nproc)
PROXY_THREADS=${PROXY_THREADS:-$NCPU}
BACKEND_PORTS=(19001 19002 19003)
LB_PORT=18080
NGINX_PORT=18081
HAPROXY_PORT=18082

SCENARIO=${1:-http}
case $SCENARIO in
http) ;;
tcp) DURATION=${DURATION_SET:-5s} ;;
*)
    echo "usage: compare.sh [http|tcp]" >&2
    exit 2
    ;;
esac

NAME=compare
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"

# --- tools -----------------------------------------------------------------
missing=()
command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || missing+=(nginx)
command -v haproxy >/dev/null || [[ -x /usr/sbin/haproxy ]] || missing+=(haproxy)
command -v wrk >/dev/null || missing+=(wrk)
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    # policy-rc.d keeps the packages from starting system services.
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
export PATH="$PATH:/usr/sbin:/sbin"

# --- helpers (more in lib.sh) ----------------------------------------------

# Share of all CPUs busy between two cpu_stat readings, in %.
busy_between() {
    awk -v a="$1" -v b="$2" 'BEGIN { split(a, x, " "); split(b, y, " ");
        t = y[1] - x[1]; printf "%.0f", (t > 0 ? 100 * (1 - (y[2] - x[2]) / t) : 0) }'
}

# Share of all CPUs busy over one second (other work skews the figures).
busy_pct() {
    local a
    a=$(cpu_stat)
    sleep 1
    busy_between "$a" "$(cpu_stat)"
}

# wrk's 64 connections, the proxies' upstream connections and listeners.
if (($(ulimit -n) < 4096)); then ulimit -n 4096 2>/dev/null || true; fi

# Direct children of a process (no /proc/PID/task/*/children on every kernel).
children() {
    local stat
    for stat in /proc/[0-9]*/stat; do
        awk -v p="$1" '{ sub(/^.*\) /, ""); if ($2 == p) { split(FILENAME, f, "/"); print f[3] } }' \
            "$stat" 2>/dev/null || true
    done
}

# The process and its children (nginx: master + workers).
family() { echo "$1"; children "$1"; }

# utime+stime in clock ticks, summed over the given pids.
cpu_ticks() {
    local pid total=0 t
    for pid in "$@"; do
        t=$(awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$pid/stat" 2>/dev/null || echo 0)
        total=$((total + t))
    done
    echo "$total"
}

# Peak RSS (VmHWM) in KiB, summed over the given pids.
peak_rss_kib() {
    local pid total=0 k
    for pid in "$@"; do
        k=$(awk '/^VmHWM:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || echo 0)
        total=$((total + ${k:-0}))
    done
    echo "$total"
}

# wrk latency like "1.23ms", "850.00us", "1.02s" → milliseconds.
to_ms() {
    awk -v v="$1" 'BEGIN {
        if (v ~ /us$/) { sub(/us$/, "", v); printf "%.3f", v / 1000 }
        else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.3f", v }
        else if (v ~ /m$/) { sub(/m$/, "", v); printf "%.3f", v * 60000 }
        else if (v ~ /s$/) { sub(/s$/, "", v); printf "%.3f", v * 1000 }
        else printf "nan" }'
}


for port in "${BACKEND_PORTS[@]}" $LB_PORT $NGINX_PORT $HAPROXY_PORT; do
    port_open "$port" && die "127.0.0.1:$port is already in use"
done

# The main context of both nginx configs (processes, pid, log, events).
nginx_main() {
    echo "worker_processes $PROXY_THREADS;"
    echo "pid $TMP/nginx.pid;"
    echo "error_log $TMP/nginx-error.log warn;"
    echo "events { worker_connections 4096; }"
}

# The global section of both HAProxy configs, up to `defaults`.
haproxy_global() {
    echo "global"
    echo "  nbthread $PROXY_THREADS"
    echo "  maxconn 4096"
    echo "defaults"
}

# HAProxy `server` lines for the backends, health-checked every 2 s.
haproxy_servers() {
    local i=0 port
    for port in "${BACKEND_PORTS[@]}"; do
        i=$((i + 1))
        echo "  server b$i 127.0.0.1:$port check inter 2s"
    done
}

# Checks the generated configs, then starts lb ($LB), nginx and HAProxy and
# waits for their ports; sets LB_PID, NGINX_PID, HAPROXY_PID. All three run
# for the whole benchmark (idle ones cost nothing measurable) so that
# rounds can interleave them.
start_proxies() {
    "$LB" --config "$TMP/lb.yaml" --check >/dev/null || die "lb rejects $TMP/lb.yaml"
    nginx -t -q -p "$TMP" -e "$TMP/nginx-error.log" -c "$TMP/nginx.conf" || die "nginx rejects its config"
    haproxy -c -q -f "$TMP/haproxy.cfg" || die "haproxy rejects its config"
    RUST_LOG=warn "$LB" --config "$TMP/lb.yaml" --log-level warn >"$TMP/lb.log" 2>&1 &
    LB_PID=$!
    PIDS+=("$LB_PID")
    nginx -p "$TMP" -e "$TMP/nginx-error.log" -c "$TMP/nginx.conf" -g "daemon off;" &
    NGINX_PID=$!
    PIDS+=("$NGINX_PID")
    haproxy -db -f "$TMP/haproxy.cfg" >"$TMP/haproxy.log" 2>&1 &
    HAPROXY_PID=$!
    PIDS+=("$HAPROXY_PID")
    wait_port "$LB_PORT" "$LB_PID" lb
    wait_port "$NGINX_PORT" "$NGINX_PID" nginx
    wait_port "$HAPROXY_PORT" "$HAPROXY_PID" haproxy
}

# Sets BUSY_BEFORE, and warns when other work already keeps the CPUs busy.
check_busy() {
    BUSY_BEFORE=$(busy_pct)
    if ((BUSY_BEFORE > 10)); then
        log "the CPUs are already ${BUSY_BEFORE}% busy with other work: the figures will be skewed"
    fi
}

# Runs MEASURE (a function taking: name port [proxy pid]) on each target,
# ROUNDS times, interleaved; each round starts with the first backend alone,
# no proxy, as the reference.
run_rounds() {
    local measure=$1
    for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
        "$measure" direct "${BACKEND_PORTS[0]}"
        "$measure" lb "$LB_PORT" "$LB_PID"
        "$measure" nginx "$NGINX_PORT" "$NGINX_PID"
        "$measure" haproxy "$HAPROXY_PORT" "$HAPROXY_PID"
    done
}

# awk function for the median of a[1..k], for the per-target summaries.
# shellcheck disable=SC2016
AWK_MEDIAN='function median(a, k,   i, j, t) {
            for (i = 2; i <= k; i++) for (j = i; j > 1 && a[j - 1] > a[j]; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
            return k % 2 ? a[(k + 1) / 2] : (a[k / 2] + a[k / 2 + 1]) / 2
        }'

if [[ $SCENARIO == tcp ]]; then
    # shellcheck source=bench/compare_tcp.sh
    source "$(dirname "$0")/compare_tcp.sh"
    exit 0
fi

# --- build -----------------------------------------------------------------
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

# --- backends --------------------------------------------------------------
"$BACKEND" "${BACKEND_PORTS[@]}" </dev/null >"$TMP/backend.log" 2>&1 &
BACKEND_PID=$!
PIDS+=("$BACKEND_PID")
for port in "${BACKEND_PORTS[@]}"; do
    wait_port "$port" "$BACKEND_PID" backend
done
curl -fsS -o /dev/null "http://127.0.0.1:${BACKEND_PORTS[0]}/" || die "backend does not answer 200"

# --- configs ---------------------------------------------------------------
{
    echo "listen: 127.0.0.1:$LB_PORT"
    echo "strategy: round_robin"
    echo "backends:"
    for port in "${BACKEND_PORTS[@]}"; do echo "  - address: 127.0.0.1:$port"; done
    echo "health_check: {path: /health, interval: 2s, timeout: 1s}"
} >"$TMP/lb.yaml"

{
    nginx_main
    echo "http {"
    echo "  access_log off;"
    for d in client_body proxy fastcgi uwsgi scgi; do echo "  ${d}_temp_path $TMP/nginx-$d;"; done
    echo "  upstream backends {"
    for port in "${BACKEND_PORTS[@]}"; do echo "    server 127.0.0.1:$port;"; done
    echo "    keepalive 64;"
    echo "  }"
    echo "  server {"
    echo "    listen 127.0.0.1:$NGINX_PORT;"
    echo "    location / {"
    echo "      proxy_pass http://backends;"
    echo "      proxy_http_version 1.1;"
    echo "      proxy_set_header Connection \"\";"
    echo "    }"
    echo "  }"
    echo "}"
} >"$TMP/nginx.conf"

{
    haproxy_global
    echo "  mode http"
    echo "  timeout connect 1s"
    echo "  timeout client 30s"
    echo "  timeout server 30s"
    echo "frontend fe"
    echo "  bind 127.0.0.1:$HAPROXY_PORT"
    echo "  default_backend be"
    echo "backend be"
    echo "  balance roundrobin"
    echo "  http-reuse always"
    echo "  option httpchk GET /health"
    haproxy_servers
} >"$TMP/haproxy.cfg"

# --- runs ------------------------------------------------------------------
RUNS="$TMP/runs"
: >"$RUNS"
HZ=$(getconf CLK_TCK)

# measure NAME PORT [PID]: warm up, measure, append one line to $RUNS:
# name req/s p50_ms p99_ms errors proxy_cpu_ticks box_busy_%
measure() {
    local name=$1 port=$2 pid=${3:-} pids=() out rps p50 p99 errors cpu0 cpu1 box0 box
    local url="http://127.0.0.1:$port/"
    log "round $ROUND/$ROUNDS, $name: warm-up $WARMUP, then wrk -t$THREADS -c$CONNECTIONS -d$DURATION"
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$WARMUP" "$url" >/dev/null
    if [[ -n $pid ]]; then mapfile -t pids < <(family "$pid"); fi
    cpu0=$(cpu_ticks "${pids[@]}")
    box0=$(cpu_stat)
    out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency "$url")
    box=$(busy_between "$box0" "$(cpu_stat)")
    cpu1=$(cpu_ticks "${pids[@]}")
    echo "$out" >"$TMP/wrk-$name-$ROUND.txt"
    rps=$(awk '/^Requests\/sec:/ { print $2 }' <<<"$out")
    p50=$(to_ms "$(awk '$1 == "50%" { print $2 }' <<<"$out")")
    p99=$(to_ms "$(awk '$1 == "99%" { print $2 }' <<<"$out")")
    errors=$(awk '/Non-2xx or 3xx responses:/ { n += $NF }
        /Socket errors:/ { for (i = 3; i <= NF; i++) { v = $i; gsub(/,/, "", v); if (v ~ /^[0-9]+$/) n += v } }
        END { print n + 0 }' <<<"$out")
    echo "$name $rps $p50 $p99 $errors $((cpu1 - cpu0)) $box" >>"$RUNS"
}

start_proxies
for port in "${BACKEND_PORTS[0]}" $LB_PORT $NGINX_PORT $HAPROXY_PORT; do
    curl -fsS -o /dev/null "http://127.0.0.1:$port/" || die "127.0.0.1:$port does not answer 200"
done

check_busy

run_rounds measure

# Per target: median req/s and latencies over the rounds, errors summed,
# proxy CPU over all measured time, peak RSS at the end.
RESULTS="$TMP/results"
: >"$RESULTS"
duration_s=$(secs "$DURATION")
for target in direct:"" lb:$LB_PID nginx:$NGINX_PID haproxy:$HAPROXY_PID; do
    name=${target%%:*}
    pid=${target#*:}
    rss=-
    if [[ -n $pid ]]; then
        mapfile -t pids < <(family "$pid")
        rss=$(awk -v k="$(peak_rss_kib "${pids[@]}")" 'BEGIN { printf "%.1f", k / 1024 }')
    fi
    awk -v n="$name" -v rss="$rss" -v hz="$HZ" -v d="$duration_s" -v proxy="$pid" '
        '"$AWK_MEDIAN"'
        $1 == n { k++; r[k] = $2; p50[k] = $3; p99[k] = $4; err += $5; ticks += $6; box[k] = $7 }
        END {
            cpu = proxy == "" ? "-" : sprintf("%.0f", 100 * ticks / hz / (d * k))
            print n, median(r, k), median(p50, k), median(p99, k), err, rss, cpu, median(box, k)
        }' "$RUNS" >>"$RESULTS"
done

# --- report ----------------------------------------------------------------
echo
echo "lb vs nginx vs HAProxy, loopback, HTTP/1.1 keep-alive, GET /, round robin over 3 backends"
echo "wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency (after a $WARMUP warm-up), each target in turn,"
echo "$ROUNDS round(s); with more than one, each figure is the median over the rounds."
echo "$NCPU CPUs: wrk, the backends and the proxy share them, so req/s measures the whole box,"
echo "not the proxy alone; proxy CPU% (of one core, over the measured run) says what the proxy took."
echo "Proxies: lb (tokio, $NCPU worker threads, health checks every 2s),"
echo "nginx $(nginx -v 2>&1 | sed 's/.*nginx\///') (worker_processes $PROXY_THREADS, upstream keepalive 64),"
echo "HAProxy $(haproxy -v | awk 'NR == 1 { print $3 }') (nbthread $PROXY_THREADS, http-reuse always, checks every 2s)."
echo "box busy: all CPUs together during the run (100% = every CPU busy; below it, something waited)."
echo "CPUs busy with other work just before the runs: ${BUSY_BEFORE}% (anything above a few % skews every row)."
echo "Peak RSS is VmHWM summed over the proxy's processes (nginx: master + workers)."
echo
printf "| %-8s | %10s | %8s | %8s | %6s | %13s | %10s | %9s |\n" \
    target "req/s" "p50 ms" "p99 ms" errors "peak RSS MiB" "proxy CPU%" "box busy"
printf "|%s|%s|%s|%s|%s|%s|%s|%s|\n" ---------- ------------ ---------- ---------- -------- --------------- ------------ -----------
while read -r name rps p50 p99 errors rss cpu box; do
    printf "| %-8s | %10.0f | %8.3f | %8.3f | %6s | %13s | %10s | %8s%% |\n" \
        "$name" "$rps" "$p50" "$p99" "$errors" "$rss" "$cpu" "$box"
done <"$RESULTS"

echo
printf "| %-12s | %8s | %8s | %8s | %8s | %8s |\n" ratio "req/s" "p50" "p99" "RSS" "CPU"
printf "|%s|%s|%s|%s|%s|%s|\n" -------------- ---------- ---------- ---------- ---------- ----------
for other in nginx haproxy; do
    awk -v o="$other" '
        $1 == "lb" { for (i = 2; i <= 7; i++) lb[i] = $i }
        $1 == o    { for (i = 2; i <= 7; i++) ot[i] = $i }
        function r(i) { return ot[i] > 0 ? sprintf("%.2f", lb[i] / ot[i]) : "-" }
        END { printf "| %-12s | %8s | %8s | %8s | %8s | %8s |\n", "lb/" o, r(2), r(3), r(4), r(6), r(7) }
    ' "$RESULTS"
done
echo
echo "req/s above 1 favours lb; latency, RSS and CPU below 1 favour lb."
