# The tcp scenario of compare.sh (`bash bench/compare.sh tcp`), sourced by it
# after its tools, helpers (start_proxies, …) and port checks: lb `mode: tcp` vs nginx `stream`
# vs HAProxy `mode tcp`, round robin over 3 echo backends (examples/tcp_bench).
#
# Per target, ROUNDS times interleaved (medians reported):
# * connections per second: CONCURRENCY loops of connect, 1 KiB echo, close,
#   for DURATION after a WARMUP;
# * one TRANSFER-byte (default 1 GiB) echo on a single connection, in MiB/s
#   (the same bytes flow back at the same time).
# shellcheck shell=bash

CONCURRENCY=${CONCURRENCY:-32}
TRANSFER=${TRANSFER:-1GiB}

log "building lb and examples/tcp_bench (release)"
(cd "$ROOT" && cargo build --release --quiet --bin lb --example tcp_bench) ||
    die "cargo build failed"
LB="$ROOT/target/release/lb"
BENCH="$ROOT/target/release/examples/tcp_bench"

# nginx's stream module is a separate, dynamically loaded module on Debian.
NGINX_STREAM_MODULE=
if nginx -V 2>&1 | grep -q -- '--with-stream=dynamic'; then
    NGINX_STREAM_MODULE=$(ls /usr/lib/nginx/modules/ngx_stream_module.so 2>/dev/null || true)
    if [[ -z $NGINX_STREAM_MODULE ]]; then
        log "installing libnginx-mod-stream"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libnginx-mod-stream >/dev/null
        NGINX_STREAM_MODULE=/usr/lib/nginx/modules/ngx_stream_module.so
    fi
fi

"$BENCH" echo "${BACKEND_PORTS[@]}" </dev/null >"$TMP/echo.log" 2>&1 &
ECHO_PID=$!
PIDS+=("$ECHO_PID")
for port in "${BACKEND_PORTS[@]}"; do
    wait_port "$port" "$ECHO_PID" "echo backend"
done

{
    echo "listen: 127.0.0.1:$LB_PORT"
    echo "mode: tcp"
    echo "strategy: round_robin"
    echo "backends:"
    for port in "${BACKEND_PORTS[@]}"; do echo "  - address: 127.0.0.1:$port"; done
    echo "health_check: {interval: 2s, timeout: 1s}"
} >"$TMP/lb.yaml"

{
    [[ -n $NGINX_STREAM_MODULE ]] && echo "load_module $NGINX_STREAM_MODULE;"
    nginx_main
    echo "stream {"
    echo "  upstream backends {"
    for port in "${BACKEND_PORTS[@]}"; do echo "    server 127.0.0.1:$port;"; done
    echo "  }"
    echo "  server {"
    echo "    listen 127.0.0.1:$NGINX_PORT;"
    echo "    proxy_pass backends;"
    echo "    proxy_connect_timeout 1s;"
    echo "    proxy_half_close on;  # like lb and HAProxy: pass a FIN on, keep the other way open"
    echo "  }"
    echo "}"
} >"$TMP/nginx.conf"

{
    haproxy_global
    echo "  mode tcp"
    echo "  timeout connect 1s"
    echo "  timeout client 1h"
    echo "  timeout server 1h"
    echo "frontend fe"
    echo "  bind 127.0.0.1:$HAPROXY_PORT"
    echo "  default_backend be"
    echo "backend be"
    echo "  balance roundrobin"
    haproxy_servers
} >"$TMP/haproxy.cfg"

start_proxies
for port in "${BACKEND_PORTS[0]}" $LB_PORT $NGINX_PORT $HAPROXY_PORT; do
    "$BENCH" transfer "127.0.0.1:$port" --bytes 1KiB >/dev/null || die "127.0.0.1:$port does not echo"
done

check_busy

# measure NAME PORT [PID]: append "name conns/s errors MiB/s proxy_cpu_ticks" to $RUNS.
RUNS="$TMP/runs"
: >"$RUNS"
HZ=$(getconf CLK_TCK)
measure_tcp() {
    local name=$1 port=$2 pid=${3:-} pids=() out cps errors mibs cpu0 cpu1
    log "round $ROUND/$ROUNDS, $name: warm-up $WARMUP, rate for $DURATION, then $TRANSFER transfer"
    "$BENCH" rate "127.0.0.1:$port" --duration "$WARMUP" --concurrency "$CONCURRENCY" >/dev/null
    if [[ -n $pid ]]; then mapfile -t pids < <(family "$pid"); fi
    cpu0=$(cpu_ticks "${pids[@]}")
    out=$("$BENCH" rate "127.0.0.1:$port" --duration "$DURATION" --concurrency "$CONCURRENCY")
    cpu1=$(cpu_ticks "${pids[@]}")
    cps=$(sed -n 's/.*conns_per_sec=\([0-9.]*\).*/\1/p' <<<"$out")
    errors=$(sed -n 's/.*errors=\([0-9]*\).*/\1/p' <<<"$out")
    out=$("$BENCH" transfer "127.0.0.1:$port" --bytes "$TRANSFER") || die "$name: transfer failed"
    mibs=$(sed -n 's/.*mib_per_sec=\([0-9.]*\).*/\1/p' <<<"$out")
    echo "$name $cps $errors $mibs $((cpu1 - cpu0))" >>"$RUNS"
}

run_rounds measure_tcp

RESULTS="$TMP/results"
: >"$RESULTS"
duration_s=$(secs "$DURATION")
for target in direct:"" lb:$LB_PID nginx:$NGINX_PID haproxy:$HAPROXY_PID; do
    name=${target%%:*}
    pid=${target#*:}
    awk -v n="$name" -v hz="$HZ" -v d="$duration_s" -v proxy="$pid" '
        '"$AWK_MEDIAN"'
        $1 == n { k++; c[k] = $2; err += $3; m[k] = $4; ticks += $5 }
        END {
            cpu = proxy == "" ? "-" : sprintf("%.0f", 100 * ticks / hz / (d * k))
            print n, median(c, k), err, median(m, k), cpu
        }' "$RUNS" >>"$RESULTS"
done

echo
echo "lb mode: tcp vs nginx stream vs HAProxy mode tcp, loopback, round robin over 3 echo backends"
echo "conns/s: $CONCURRENCY loops of connect, 1 KiB echo, close for $DURATION (after a $WARMUP warm-up);"
echo "MiB/s: one connection echoing $TRANSFER (the same bytes flow back meanwhile)."
echo "$ROUNDS round(s); with more than one, each figure is the median over the rounds."
echo "$NCPU CPUs shared by the load generator, the echo backends and the proxy;"
echo "proxy CPU% (of one core) is measured over the conns/s run."
echo "Proxies: lb (tokio, $NCPU worker threads, TCP health checks every 2s),"
echo "nginx $(nginx -v 2>&1 | sed 's/.*nginx\///') (worker_processes $PROXY_THREADS, stream module, proxy_half_close on),"
echo "HAProxy $(haproxy -v | awk 'NR == 1 { print $3 }') (nbthread $PROXY_THREADS, mode tcp, checks every 2s)."
echo "CPUs busy with other work just before the runs: ${BUSY_BEFORE}%."
echo
printf "| %-8s | %10s | %6s | %10s | %10s |\n" target "conns/s" errors "MiB/s" "proxy CPU%"
printf "|%s|%s|%s|%s|%s|\n" ---------- ------------ -------- ------------ ------------
while read -r name cps errors mibs cpu; do
    printf "| %-8s | %10.0f | %6s | %10.0f | %10s |\n" "$name" "$cps" "$errors" "$mibs" "$cpu"
done <"$RESULTS"
echo
printf "| %-12s | %8s | %8s | %8s |\n" ratio "conns/s" "MiB/s" "CPU"
printf "|%s|%s|%s|%s|\n" -------------- ---------- ---------- ----------
for other in nginx haproxy; do
    awk -v o="$other" '
        $1 == "lb" { for (i = 2; i <= 5; i++) lb[i] = $i }
        $1 == o    { for (i = 2; i <= 5; i++) ot[i] = $i }
        function r(i) { return ot[i] > 0 ? sprintf("%.2f", lb[i] / ot[i]) : "-" }
        END { printf "| %-12s | %8s | %8s | %8s |\n", "lb/" o, r(2), r(4), r(5) }
    ' "$RESULTS"
done
echo
echo "conns/s and MiB/s above 1 favour lb; CPU below 1 favours lb (at the conns/s it reached)."
