#!/usr/bin/env bash
# lb vs nginx vs HAProxy on loopback: same 3 backends, same load, one run,
# reported side by side and as ratios. See bench/README.md.
#
#   bash bench/compare.sh                 # 10 s per target and concurrency (~4 min)
#   DURATION=30s CONNECTIONS="64 256" IDLE="2000 10000" bash bench/compare.sh
#   BASELINE=/path/to/older/lb bash bench/compare.sh   # before/after in one run
#   FLOOR=1 bash bench/compare.sh         # also the floor (bench/floor.rs)
#   bash bench/compare.sh tcp             # mode: tcp vs nginx stream vs HAProxy mode tcp
#   bash bench/compare.sh routed          # 20 routes over 5 pools vs one pool (~1.5 min)
#   bash bench/compare.sh tls             # HTTPS: TLS 1.3 handshakes/s, keep-alive, idle RSS (~4 min)
#   bash bench/compare.sh h2              # h2c both sides, h2load -m10 at c=16 and c=64, lb vs HAProxy (~1.5 min)
#
# The tcp scenario measures connections per second (connect, 1 KiB echo,
# close; examples/tcp_bench rate) and the throughput of one 1 GiB echo
# transfer through each proxy. Its knobs: DURATION (default 5s there),
# CONCURRENCY (default 32 loops), TRANSFER (default 1GiB), ROUNDS, WARMUP.
#
# The routed scenario (bench/compare_routed.sh) measures lb, nginx and
# HAProxy twice in one run: on the single-pool configs above and with 20
# path-prefix routes (/r0 ... /r19, route N to pool N % 5) over 5 pools of the
# same 3 backends, wrk cycling the path over /r0 ... /r19 in both; it prints
# the lb/nginx ratio routed next to single-pool. CONNECTIONS defaults to
# "64" there; DURATION, WARMUP, ROUNDS, THREADS, PROXY_THREADS, BACKEND,
# KEEP_TMP as below; IDLE, BASELINE and FLOOR do not apply.
#
# The tls scenario (bench/compare_tls.sh) puts lb, nginx and HAProxy behind
# TLS 1.3 with the same ECDSA P-256 certificate (made with openssl in the
# temp dir), each with its default session resumption, and measures: full
# handshakes per second (wrk -H 'Connection: close', a new connection per
# request, wrk's session reuse turned off by a small LD_PRELOAD shim that
# also counts full and resumed handshakes), the same with wrk resuming
# sessions as it does by itself, HTTPS keep-alive req/s at CONNECTIONS
# (default "64 256"), and RSS per idle TLS connection at IDLE (default
# "2000" there). HANDSHAKE_CONNECTIONS (wrk -c of the handshake runs,
# default 32); DURATION, WARMUP, ROUNDS, THREADS, PROXY_THREADS, BACKEND,
# KEEP_TMP as below; BASELINE and FLOOR do not apply.
#
# The h2 scenario (bench/compare_h2.sh) speaks HTTP/2 cleartext with prior
# knowledge (h2c) from client to proxy and from proxy to backends: h2load
# (apt-get install -y nghttp2-client) drives the first backend directly, lb
# (its listener serves h2c; a pool with `protocol: h2c`) and HAProxy (`bind
# ... proto h2`, `server ... proto h2`) with STREAMS (default 10, h2load -m)
# streams per connection at CONNECTIONS (default "16 64" there); reported:
# req/s, mean/p50/p99/max latency, h2load's failed and errored counts, the
# proxy's CPU µs per request, box busy, and lb/HAProxy ratios against issue
# 18's target. nginx is left out: it has no h2c upstream but grpc_pass (gRPC
# framing only). LATENCY_LOG=0 skips h2load's per-request log (p50/p99);
# DURATION, WARMUP, ROUNDS, THREADS, PROXY_THREADS, BACKEND, KEEP_TMP as
# below; IDLE, BASELINE and FLOOR do not apply.
#
# Environment: DURATION (wrk -d, default 10s), WARMUP (default 2s),
# ROUNDS (default 1: each target is measured ROUNDS times, interleaved, and
# the median is reported; on a noisy machine try ROUNDS=3 DURATION=5s),
# CONNECTIONS (wrk -c values, default "64 256"), THREADS (wrk -t, default 2),
# IDLE (idle keep-alive connections held to measure RSS per connection,
# default "2000 10000"; empty skips it), BASELINE (another lb binary,
# reported as lb-base: e.g. main's, for a before/after table in one run),
# FLOOR=1 (also measures bench/floor.rs, the least a tokio thread-per-core
# HTTP/1 proxy does per request: what this machine allows before any proxy
# logic; it holds a 16 KiB buffer per connection, so it skips the RSS runs),
# PROXY_THREADS (nginx workers, haproxy nbthread; default: the number of
# CPUs, which is what lb's tokio runtime uses), KEEP_TMP=1 keeps the
# generated configs, BACKEND=/path/to/server uses another upstream binary
# (same CLI as examples/backend: the ports to serve) instead of building it.
set -euo pipefail

DURATION_SET=${DURATION:-}
DURATION=${DURATION:-10s}
CONNECTIONS_SET=${CONNECTIONS:-}
ROUNDS=${ROUNDS:-1}
WARMUP=${WARMUP:-2s}
CONNECTIONS=${CONNECTIONS:-64 256}
IDLE_SET=${IDLE+set}
IDLE=${IDLE-2000 10000}
BASELINE=${BASELINE:-}
THREADS=${THREADS:-2}
NCPU=$(nproc)
PROXY_THREADS=${PROXY_THREADS:-$NCPU}
BACKEND_PORTS=(19001 19002 19003)
LB_PORT=18080
NGINX_PORT=18081
HAPROXY_PORT=18082
LB_HYPER_PORT=18083
LB_BASE_PORT=18084
FLOOR_PORT=18085
LB_ROUTED_PORT=18086
NGINX_ROUTED_PORT=18087
HAPROXY_ROUTED_PORT=18088
LB_TLS_PORT=18443
NGINX_TLS_PORT=18444
HAPROXY_TLS_PORT=18445
LB_H2_PORT=18092
HAPROXY_H2_PORT=18093
FLOOR=${FLOOR:-}

SCENARIO=${1:-http}
case $SCENARIO in
http) ;;
tcp) DURATION=${DURATION_SET:-5s} ;;
routed)
    CONNECTIONS=${CONNECTIONS_SET:-64}
    FLOOR=
    ;;
tls)
    [[ -n $IDLE_SET ]] || IDLE=2000
    FLOOR=
    BASELINE=
    ;;
h2)
    CONNECTIONS=${CONNECTIONS_SET:-16 64}
    IDLE=
    FLOOR=
    BASELINE=
    ;;
*)
    echo "usage: compare.sh [http|tcp|routed|tls|h2]" >&2
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
if [[ $SCENARIO == h2 ]] && ! command -v h2load >/dev/null; then
    die "the h2 scenario needs h2load: apt-get install -y nghttp2-client"
fi
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

# wrk's connections, the idle connections, the proxies' upstream
# connections and listeners.
if (($(ulimit -n) < 20000)); then ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true; fi

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

# A /proc/PID/status field in KiB (VmRSS: current RSS, VmHWM: peak RSS),
# summed over the given pids.
status_kib() {
    local field=$1 pid total=0 k
    shift
    for pid in "$@"; do
        k=$(awk -v f="$field:" '$1 == f { print $2 }' "/proc/$pid/status" 2>/dev/null || echo 0)
        total=$((total + ${k:-0}))
    done
    echo "$total"
}

# Peak RSS (VmHWM) in KiB, summed over the given pids.
peak_rss_kib() { status_kib VmHWM "$@"; }

# wrk latency like "1.23ms", "850.00us", "1.02s" → milliseconds.
to_ms() {
    awk -v v="$1" 'BEGIN {
        if (v ~ /us$/) { sub(/us$/, "", v); printf "%.3f", v / 1000 }
        else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.3f", v }
        else if (v ~ /m$/) { sub(/m$/, "", v); printf "%.3f", v * 60000 }
        else if (v ~ /s$/) { sub(/s$/, "", v); printf "%.3f", v * 1000 }
        else printf "nan" }'
}


for port in "${BACKEND_PORTS[@]}" $LB_PORT $NGINX_PORT $HAPROXY_PORT $LB_HYPER_PORT $LB_BASE_PORT $FLOOR_PORT \
    $LB_ROUTED_PORT $NGINX_ROUTED_PORT $HAPROXY_ROUTED_PORT $LB_TLS_PORT $NGINX_TLS_PORT $HAPROXY_TLS_PORT \
    $LB_H2_PORT $HAPROXY_H2_PORT; do
    port_open "$port" && die "127.0.0.1:$port is already in use"
done

# nginx_main [DIR]: the main context of every nginx config (processes, pid
# and log in DIR, default $TMP; events).
nginx_main() {
    local dir=${1:-$TMP}
    echo "worker_processes $PROXY_THREADS;"
    echo "pid $dir/nginx.pid;"
    echo "error_log $dir/nginx-error.log warn;"
    echo "worker_rlimit_nofile 20000;"
    echo "events { worker_connections 20000; }"
}

# The global section of every HAProxy config, up to `defaults`.
haproxy_global() {
    echo "global"
    echo "  nbthread $PROXY_THREADS"
    echo "  maxconn 9980" # the most this box's fd limit (20000) allows it
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

# start_proxies [DIR LB_PORT NGINX_PORT HAPROXY_PORT]: checks the generated
# configs in DIR (default $TMP: lb.yaml, nginx.conf, haproxy.cfg), then starts
# lb ($LB), nginx and HAProxy on them and waits for their ports (default
# $LB_PORT, $NGINX_PORT, $HAPROXY_PORT); sets LB_PID, NGINX_PID, HAPROXY_PID.
# All three run for the whole benchmark (idle ones cost nothing measurable)
# so that rounds can interleave them.
start_proxies() {
    local dir=${1:-$TMP} lb_port=${2:-$LB_PORT} nginx_port=${3:-$NGINX_PORT} haproxy_port=${4:-$HAPROXY_PORT}
    "$LB" --config "$dir/lb.yaml" --check >/dev/null || die "lb rejects $dir/lb.yaml"
    nginx -t -q -p "$dir" -e "$dir/nginx-error.log" -c "$dir/nginx.conf" || die "nginx rejects $dir/nginx.conf"
    haproxy -c -q -f "$dir/haproxy.cfg" || die "haproxy rejects $dir/haproxy.cfg"
    RUST_LOG=warn "$LB" --config "$dir/lb.yaml" --workers "$PROXY_THREADS" --log-level warn >"$dir/lb.log" 2>&1 &
    LB_PID=$!
    PIDS+=("$LB_PID")
    nginx -p "$dir" -e "$dir/nginx-error.log" -c "$dir/nginx.conf" -g "daemon off;" &
    NGINX_PID=$!
    PIDS+=("$NGINX_PID")
    haproxy -db -f "$dir/haproxy.cfg" >"$dir/haproxy.log" 2>&1 &
    HAPROXY_PID=$!
    PIDS+=("$HAPROXY_PID")
    wait_port "$lb_port" "$LB_PID" lb
    wait_port "$nginx_port" "$NGINX_PID" nginx
    wait_port "$haproxy_port" "$HAPROXY_PID" haproxy
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
    (cd "$ROOT" && cargo build --release --quiet --bin lb --example idle_clients ${FLOOR:+--example floor}) ||
        die "cargo build failed"
else
    log "building lb and the example backend (release)"
    (cd "$ROOT" && cargo build --release --quiet --bin lb --example backend --example idle_clients \
        ${FLOOR:+--example floor}) ||
        die "cargo build failed"
    BACKEND="$ROOT/target/release/examples/backend"
fi
LB="$ROOT/target/release/lb"
IDLE_CLIENTS="$ROOT/target/release/examples/idle_clients"

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
    echo "limits: {max_connections: 30000}"
} >"$TMP/lb.yaml"
sed "s/^listen: .*/listen: 127.0.0.1:$LB_HYPER_PORT/" "$TMP/lb.yaml" >"$TMP/lb-hyper.yaml"
# An older lb may not know newer keys: its config has only the common ones.
grep -v '^limits:' "$TMP/lb.yaml" | sed "s/^listen: .*/listen: 127.0.0.1:$LB_BASE_PORT/" >"$TMP/lb-base.yaml"

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

# measure NAME PORT CONNS [PID]: warm up, measure, append one line to $RUNS:
# name conns req/s p50_ms p99_ms errors proxy_cpu_ticks box_busy_% requests
# With WRK_SCRIPT set, wrk runs that Lua script (-s), warm-up included.
# WRK_SCHEME=https drives the proxies over TLS (direct, a plain backend,
# stays http); WRK_ARGS are more wrk options (-H 'Connection: close'),
# WRK_ENV variables for wrk's environment (LD_PRELOAD=...), both for the
# warm-up too; MEASURE_AFTER, a function called with NAME CONNS right after
# the measured run.
WRK_SCRIPT=
WRK_SCHEME=http
WRK_ARGS=()
WRK_ENV=()
MEASURE_AFTER=
measure() {
    local name=$1 port=$2 conns=$3 pid=${4:-} pids=() out rps p50 p99 errors cpu0 cpu1 box0 box requests
    local scheme=$WRK_SCHEME script=()
    [[ $name == direct ]] && scheme=http
    local url="$scheme://127.0.0.1:$port/"
    if [[ -n $WRK_SCRIPT ]]; then script=(-s "$WRK_SCRIPT"); fi
    log "round $ROUND/$ROUNDS, $name, c=$conns: warm-up $WARMUP, then wrk -t$THREADS -c$conns -d$DURATION${WRK_SCRIPT:+ -s ${WRK_SCRIPT##*/}}${WRK_ARGS[*]:+ ${WRK_ARGS[*]}} $url"
    env "${WRK_ENV[@]}" wrk -t"$THREADS" -c"$conns" -d"$WARMUP" "${script[@]}" "${WRK_ARGS[@]}" "$url" >/dev/null
    if [[ -n $pid ]]; then mapfile -t pids < <(family "$pid"); fi
    cpu0=$(cpu_ticks "${pids[@]}")
    box0=$(cpu_stat)
    out=$(env "${WRK_ENV[@]}" wrk -t"$THREADS" -c"$conns" -d"$DURATION" --latency "${script[@]}" "${WRK_ARGS[@]}" "$url")
    box=$(busy_between "$box0" "$(cpu_stat)")
    cpu1=$(cpu_ticks "${pids[@]}")
    if [[ -n $MEASURE_AFTER ]]; then "$MEASURE_AFTER" "$name" "$conns"; fi
    echo "$out" >"$TMP/wrk-$name-$conns-$ROUND.txt"
    rps=$(awk '/^Requests\/sec:/ { print $2 }' <<<"$out")
    requests=$(awk '/requests in/ { print $1 }' <<<"$out")
    p50=$(to_ms "$(awk '$1 == "50%" { print $2 }' <<<"$out")")
    p99=$(to_ms "$(awk '$1 == "99%" { print $2 }' <<<"$out")")
    errors=$(awk '/Non-2xx or 3xx responses:/ { n += $NF }
        /Socket errors:/ { for (i = 3; i <= NF; i++) { v = $i; gsub(/,/, "", v); if (v ~ /^[0-9]+$/) n += v } }
        END { print n + 0 }' <<<"$out")
    echo "$name $conns $rps $p50 $p99 $errors $((cpu1 - cpu0)) $box $requests" >>"$RUNS"
}

# Drives every target in TARGETS (name:port:pid) at every concurrency,
# ROUNDS times, interleaved; each concurrency starts with the first backend
# alone, no proxy (one backend port, not three), as the reference.
measure_all() {
    local conns t name port pid
    for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
        for conns in $CONNECTIONS; do
            measure direct "${BACKEND_PORTS[0]}" "$conns"
            for t in "${TARGETS[@]}"; do
                IFS=: read -r name port pid <<<"$t"
                measure "$name" "$port" "$conns" "$pid"
            done
        done
    done
}

# Per target and concurrency: medians over the rounds, errors summed,
# CPU µs per request over all measured requests, into $RESULTS:
# name conns req/s p50_ms p99_ms errors cpu_us_per_request box_busy_%
RESULTS="$TMP/results"
summarize() {
    local conns name
    : >"$RESULTS"
    for conns in $CONNECTIONS; do
        for name in direct $(for t in "${TARGETS[@]}"; do echo "${t%%:*}"; done); do
            awk -v n="$name" -v c="$conns" -v hz="$HZ" '
                '"$AWK_MEDIAN"'
                $1 == n && $2 == c { k++; r[k] = $3; p50[k] = $4; p99[k] = $5; err += $6; ticks += $7; box[k] = $8; reqs += $9 }
                END {
                    us = (n == "direct" || reqs == 0) ? "-" : sprintf("%.1f", ticks / hz * 1e6 / reqs)
                    print n, c, median(r, k), median(p50, k), median(p99, k), err, us, median(box, k)
                }' "$RUNS" >>"$RESULTS"
        done
    done
}

# throughput_table CONNS [NAME...]: the $RESULTS rows at CONNS as a table,
# for the targets named (default: all, in order); a "-routed" suffix is not
# shown (the routed scenario prints its routed targets in a table of their own).
throughput_table() {
    local conns=$1 name rps p50 p99 errors us box
    shift
    printf "| %-8s | %10s | %8s | %8s | %6s | %10s | %9s |\n" \
        target "req/s" "p50 ms" "p99 ms" errors "CPU µs/req" "box busy"
    printf "|%s|%s|%s|%s|%s|%s|%s|\n" ---------- ------------ ---------- ---------- -------- ------------ -----------
    awk -v c="$conns" -v names="$*" '
        BEGIN { k = split(names, order, " ") }
        $2 == c { row[$1] = $0; if (!k) print }
        END { for (i = 1; i <= k; i++) if (order[i] in row) print row[order[i]] }' "$RESULTS" |
        while read -r name _ rps p50 p99 errors us box; do
            printf "| %-8s | %10.0f | %8.3f | %8.3f | %6s | %10s | %8s%% |\n" \
                "${name%-routed}" "$rps" "$p50" "$p99" "$errors" "$us" "$box"
        done
}

# idle_rss NAME PORT PID N: RSS added by N idle keep-alive connections
# (each served one request first), in KiB per connection. IDLE_CLIENTS_ARGS
# are more idle_clients arguments (--tls ROOTS: HTTPS).
IDLE_CLIENTS_ARGS=()
idle_rss() {
    local name=$1 port=$2 pid=$3 n=$4 pids=() before after helper i
    mapfile -t pids < <(family "$pid")
    before=$(status_kib VmRSS "${pids[@]}")
    "$IDLE_CLIENTS" "127.0.0.1:$port" "$n" "${IDLE_CLIENTS_ARGS[@]}" >"$TMP/idle-$name-$n.out" 2>&1 &
    helper=$!
    for ((i = 0; i < 600; i++)); do
        grep -q '^ready' "$TMP/idle-$name-$n.out" 2>/dev/null && break
        kill -0 "$helper" 2>/dev/null || break
        sleep 0.1
    done
    if ! grep -q '^ready' "$TMP/idle-$name-$n.out"; then
        log "$name: $n idle connections failed: $(tail -1 "$TMP/idle-$name-$n.out")"
        kill "$helper" 2>/dev/null || true
        wait "$helper" 2>/dev/null || true
        echo "-"
        return
    fi
    sleep 1 # let the proxy settle into idleness
    mapfile -t pids < <(family "$pid")
    after=$(status_kib VmRSS "${pids[@]}")
    kill "$helper" 2>/dev/null || true
    wait "$helper" 2>/dev/null || true
    sleep 2 # the proxy closes them
    awk -v a="$after" -v b="$before" -v n="$n" 'BEGIN { printf "%.2f", (a - b) / n }'
}

if [[ $SCENARIO == routed ]]; then
    # shellcheck source=bench/compare_routed.sh
    source "$(dirname "$0")/compare_routed.sh"
    exit 0
fi
if [[ $SCENARIO == tls ]]; then
    # shellcheck source=bench/compare_tls.sh
    source "$(dirname "$0")/compare_tls.sh"
    exit 0
fi
if [[ $SCENARIO == h2 ]]; then
    # shellcheck source=bench/compare_h2.sh
    source "$(dirname "$0")/compare_h2.sh"
    exit 0
fi

start_proxies
# The same binary on hyper alone, and the baseline, next to them.
RUST_LOG=warn "$LB" --config "$TMP/lb-hyper.yaml" --workers "$PROXY_THREADS" --http1 hyper \
    --log-level warn >"$TMP/lb-hyper.log" 2>&1 &
LB_HYPER_PID=$!
PIDS+=("$LB_HYPER_PID")
TARGETS=("lb:$LB_PORT:$LB_PID" "lb-hyper:$LB_HYPER_PORT:$LB_HYPER_PID")
if [[ -n $BASELINE ]]; then
    RUST_LOG=warn "$BASELINE" --config "$TMP/lb-base.yaml" --log-level warn >"$TMP/lb-base.log" 2>&1 &
    LB_BASE_PID=$!
    PIDS+=("$LB_BASE_PID")
    TARGETS+=("lb-base:$LB_BASE_PORT:$LB_BASE_PID")
fi
if [[ -n $FLOOR ]]; then
    floor_backends=()
    for port in "${BACKEND_PORTS[@]}"; do floor_backends+=("127.0.0.1:$port"); done
    "$ROOT/target/release/examples/floor" "127.0.0.1:$FLOOR_PORT" "${floor_backends[@]}" >"$TMP/floor.log" 2>&1 &
    FLOOR_PID=$!
    PIDS+=("$FLOOR_PID")
    TARGETS+=("floor:$FLOOR_PORT:$FLOOR_PID")
fi
TARGETS+=("nginx:$NGINX_PORT:$NGINX_PID" "haproxy:$HAPROXY_PORT:$HAPROXY_PID")
for t in "${TARGETS[@]}"; do
    IFS=: read -r name port pid <<<"$t"
    wait_port "$port" "$pid" "$name"
done
for port in "${BACKEND_PORTS[0]}" $LB_PORT $LB_HYPER_PORT ${LB_BASE_PID:+$LB_BASE_PORT} ${FLOOR_PID:+$FLOOR_PORT} $NGINX_PORT $HAPROXY_PORT; do
    curl -fsS -o /dev/null "http://127.0.0.1:$port/" || die "127.0.0.1:$port does not answer 200"
done

check_busy
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
# Memory first, on proxies that have not yet served a load test.
IDLE_RESULTS="$TMP/idle"
: >"$IDLE_RESULTS"
for n in $IDLE; do
    for t in "${TARGETS[@]}"; do
        IFS=: read -r name port pid <<<"$t"
        if [[ $name == haproxy ]] && ((n > 9980)); then
            echo "$name $n -" >>"$IDLE_RESULTS" # beyond its maxconn (fd limit)
            continue
        fi
        if [[ $name == floor ]]; then
            echo "$name $n -" >>"$IDLE_RESULTS" # a 16 KiB buffer per connection by design
            continue
        fi
        log "$name: RSS with $n idle keep-alive connections"
        echo "$name $n $(idle_rss "$name" "$port" "$pid" "$n")" >>"$IDLE_RESULTS"
    done
done

measure_all
summarize

# --- report ----------------------------------------------------------------
echo
echo "lb vs nginx vs HAProxy, loopback, HTTP/1.1 keep-alive, GET /, round robin over 3 backends"
echo "wrk -t$THREADS -c{$CONNECTIONS} -d$DURATION --latency (after a $WARMUP warm-up), each target in turn,"
echo "$ROUNDS round(s); with more than one, each figure is the median over the rounds."
echo "$NCPU CPUs: wrk, the backends and the proxy share them, so req/s measures the whole box,"
echo "not the proxy alone; CPU µs/req is the proxy's own CPU time (user+sys) per request."
echo "Proxies: lb (--workers $PROXY_THREADS, HTTP/1 fast path), lb-hyper (same binary, --http1 hyper),"
[[ -n $BASELINE ]] && echo "lb-base ($BASELINE, its defaults),"
[[ -n $FLOOR ]] && echo "floor (bench/floor.rs: one thread-per-core tokio worker per CPU, heads relayed unchanged),"
echo "nginx $(nginx -v 2>&1 | sed 's/.*nginx\///') (worker_processes $PROXY_THREADS, upstream keepalive 64),"
echo "HAProxy $(haproxy -v | awk 'NR == 1 { print $3 }') (nbthread $PROXY_THREADS, http-reuse always, checks every 2s)."
echo "box busy: all CPUs together during the run (100% = every CPU busy; below it, something waited)."
echo "Before the runs: CPUs ${BUSY_BEFORE}% busy with other work, load average $LOAD_BEFORE."
for conns in $CONNECTIONS; do
    echo
    echo "c=$conns"
    echo
    throughput_table "$conns"
done

if [[ -n $IDLE ]]; then
    echo
    echo "RSS added per idle keep-alive connection (KiB; VmRSS summed over the proxy's processes,"
    echo "measured before the load runs, each connection having served one request)"
    echo
    printf "| %-8s |" target
    for n in $IDLE; do printf " %10s |" "$n conns"; done
    echo
    printf "|%s|" ----------
    for n in $IDLE; do printf "%s|" ------------; done
    echo
    for t in "${TARGETS[@]}"; do
        name=${t%%:*}
        printf "| %-8s |" "$name"
        for n in $IDLE; do printf " %10s |" "$(awk -v t="$name" -v n="$n" '$1 == t && $2 == n { print $3 }' "$IDLE_RESULTS")"; done
        echo
    done
fi

echo
echo "Ratios to nginx (same run): req/s above 1 favours the target; p99, CPU and RSS below 1 do."
echo
printf "| %-8s |" target
for conns in $CONNECTIONS; do printf " %9s | %9s | %9s |" "req/s c=$conns" "p99 c=$conns" "CPU c=$conns"; done
for n in $IDLE; do printf " %9s |" "RSS/conn $n"; done
echo
printf "|%s|" ----------
for conns in $CONNECTIONS; do printf "%s|%s|%s|" ----------- ----------- -----------; done
for n in $IDLE; do printf "%s|" -----------; done
echo
for t in "${TARGETS[@]}"; do
    name=${t%%:*}
    [[ $name == nginx ]] && continue
    printf "| %-8s |" "$name"
    for conns in $CONNECTIONS; do
        awk -v t="$name" -v c="$conns" '
            $2 == c && $1 == t { r = $3; p = $5; u = $7 }
            $2 == c && $1 == "nginx" { nr = $3; np = $5; nu = $7 }
            function q(a, b) { return (b > 0 && a != "-") ? sprintf("%.2f", a / b) : "-" }
            END { printf " %9s | %9s | %9s |", q(r, nr), q(p, np), q(u, nu) }' "$RESULTS"
    done
    for n in $IDLE; do
        awk -v t="$name" -v n="$n" '
            $2 == n && $1 == t { a = $3 } $2 == n && $1 == "nginx" { b = $3 }
            END { printf " %9s |", (b > 0 && a != "-") ? sprintf("%.2f", a / b) : "-" }' "$IDLE_RESULTS"
    done
    echo
done
