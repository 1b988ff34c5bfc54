# The routed scenario of compare.sh (`bash bench/compare.sh routed`), sourced
# by it after the build, the backends, the http scenario's configs and its
# measure/summarize helpers: lb, nginx and HAProxy each measured on that
# single-pool config and on one with ROUTES path-prefix routes over POOLS
# pools, in one run, wrk cycling the path over /r0 ... /r19 on both.
#
# Route N (/rN) goes to pool pN%5; a catch-all goes to p0, so no path 404s
# in any proxy (wrk only asks for /r0 ... /r19). Every pool round-robins over
# the same 3 backends, so the backends see the same load as with one pool:
# what differs is the route choice and the state kept per pool (5 round-robin
# cursors, 5 sets of idle upstream connections, 5 times the health checks).
# shellcheck shell=bash

ROUTES=20
POOLS=5
ROUTED="$TMP/routed"
mkdir -p "$ROUTED"

# One Lua state per wrk thread; the requests are formatted once, in init
# (wrk sets the Host header just before calling it), then sent in turn.
WRK_SCRIPT="$TMP/routes.lua"
cat >"$WRK_SCRIPT" <<EOF
local requests, n = {}, 0
function init(args)
    for i = 0, $((ROUTES - 1)) do requests[i + 1] = wrk.format(nil, "/r" .. i) end
end
function request()
    n = n % #requests + 1
    return requests[n]
end
EOF

# --- routed configs (the single-pool ones are the http scenario's) ---------
{
    echo "listen: 127.0.0.1:$LB_ROUTED_PORT"
    echo "strategy: round_robin"
    echo "health_check: {path: /health, interval: 2s, timeout: 1s}"
    echo "limits: {max_connections: 30000}"
    echo "pools:"
    for ((p = 0; p < POOLS; p++)); do
        echo "  p$p:"
        echo "    backends:"
        for port in "${BACKEND_PORTS[@]}"; do echo "      - address: 127.0.0.1:$port"; done
    done
    echo "routes:"
    for ((r = 0; r < ROUTES; r++)); do echo "  - {path_prefix: /r$r, pool: p$((r % POOLS))}"; done
    echo "  - {pool: p0}"
} >"$ROUTED/lb.yaml"

{
    nginx_main "$ROUTED"
    echo "http {"
    echo "  access_log off;"
    for d in client_body proxy fastcgi uwsgi scgi; do echo "  ${d}_temp_path $ROUTED/nginx-$d;"; done
    for ((p = 0; p < POOLS; p++)); do
        echo "  upstream p$p {"
        for port in "${BACKEND_PORTS[@]}"; do echo "    server 127.0.0.1:$port;"; done
        echo "    keepalive 64;"
        echo "  }"
    done
    echo "  server {"
    echo "    listen 127.0.0.1:$NGINX_ROUTED_PORT;"
    echo "    proxy_http_version 1.1;"
    echo "    proxy_set_header Connection \"\";"
    for ((r = 0; r < ROUTES; r++)); do echo "    location /r$r { proxy_pass http://p$((r % POOLS)); }"; done
    echo "    location / { proxy_pass http://p0; }"
    echo "  }"
    echo "}"
} >"$ROUTED/nginx.conf"

{
    haproxy_global
    echo "  mode http"
    echo "  timeout connect 1s"
    echo "  timeout client 30s"
    echo "  timeout server 30s"
    echo "frontend fe"
    echo "  bind 127.0.0.1:$HAPROXY_ROUTED_PORT"
    # path_beg is a plain string prefix (/r1 would take /r10): longest first.
    for ((r = ROUTES - 1; r >= 0; r--)); do
        echo "  acl r$r path_beg /r$r"
        echo "  use_backend p$((r % POOLS)) if r$r"
    done
    echo "  default_backend p0"
    for ((p = 0; p < POOLS; p++)); do
        echo "backend p$p"
        echo "  balance roundrobin"
        echo "  http-reuse always"
        echo "  option httpchk GET /health"
        haproxy_servers
    done
} >"$ROUTED/haproxy.cfg"

# --- runs ------------------------------------------------------------------
start_proxies
SINGLE=("lb:$LB_PORT:$LB_PID" "nginx:$NGINX_PORT:$NGINX_PID" "haproxy:$HAPROXY_PORT:$HAPROXY_PID")
start_proxies "$ROUTED" "$LB_ROUTED_PORT" "$NGINX_ROUTED_PORT" "$HAPROXY_ROUTED_PORT"
ROUTED_TARGETS=("lb-routed:$LB_ROUTED_PORT:$LB_PID" "nginx-routed:$NGINX_ROUTED_PORT:$NGINX_PID"
    "haproxy-routed:$HAPROXY_ROUTED_PORT:$HAPROXY_PID")
# Each proxy's single-pool and routed runs back to back: the two figures
# compared are the closest in time.
TARGETS=()
for i in 0 1 2; do TARGETS+=("${SINGLE[i]}" "${ROUTED_TARGETS[i]}"); done
for port in "${BACKEND_PORTS[0]}" $LB_PORT $NGINX_PORT $HAPROXY_PORT \
    $LB_ROUTED_PORT $NGINX_ROUTED_PORT $HAPROXY_ROUTED_PORT; do
    for path in /r0 "/r$((ROUTES - 1))" /r99 /; do
        curl -fsS -o /dev/null "http://127.0.0.1:$port$path" || die "127.0.0.1:$port$path does not answer 200"
    done
done

check_busy
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
measure_all
summarize

# --- report ----------------------------------------------------------------
echo
echo "lb vs nginx vs HAProxy, loopback, HTTP/1.1 keep-alive, GET /r0 ... /r$((ROUTES - 1)) in turn (wrk -s),"
echo "on one pool (the http scenario's configs) and on $ROUTES path-prefix routes over $POOLS pools,"
echo "every pool round robin over the same 3 backends: /rN -> pool pN%$POOLS, a catch-all to p0"
echo "(lb path_prefix routes, nginx location /rN blocks, HAProxy use_backend if path_beg /rN)."
echo "wrk -t$THREADS -c{$CONNECTIONS} -d$DURATION --latency (after a $WARMUP warm-up), each target in turn,"
echo "single pool and routed back to back; $ROUNDS round(s), with more than one each figure is the median."
echo "$NCPU CPUs: wrk, the backends and the proxy share them, so req/s measures the whole box,"
echo "not the proxy alone; CPU µs/req is the proxy's own CPU time (user+sys) per request."
echo "Proxies: lb (--workers $PROXY_THREADS, HTTP/1 fast path),"
echo "nginx $(nginx -v 2>&1 | sed 's/.*nginx\///') (worker_processes $PROXY_THREADS, upstream keepalive 64 in each),"
echo "HAProxy $(haproxy -v | awk 'NR == 1 { print $3 }') (nbthread $PROXY_THREADS, http-reuse always, checks every 2s)."
echo "box busy: all CPUs together during the run (100% = every CPU busy; below it, something waited)."
echo "Before the runs: CPUs ${BUSY_BEFORE}% busy with other work, load average $LOAD_BEFORE."
for conns in $CONNECTIONS; do
    echo
    echo "c=$conns, single pool"
    echo
    throughput_table "$conns" direct lb nginx haproxy
    echo
    echo "c=$conns, routed ($ROUTES routes over $POOLS pools)"
    echo
    throughput_table "$conns" lb-routed nginx-routed haproxy-routed
done

echo
echo "Routed over single pool, per target (same run): req/s below 1 and CPU above 1 are what routing costs."
echo
printf "| %-8s |" target
for conns in $CONNECTIONS; do printf " %11s | %11s |" "req/s c=$conns" "CPU c=$conns"; done
echo
printf "|%s|" ----------
for conns in $CONNECTIONS; do printf "%s|%s|" ------------- -------------; done
echo
for name in lb nginx haproxy; do
    printf "| %-8s |" "$name"
    for conns in $CONNECTIONS; do
        awk -v t="$name" -v c="$conns" '
            $2 == c && $1 == t { r = $3; u = $7 }
            $2 == c && $1 == t "-routed" { rr = $3; ru = $7 }
            function q(a, b) { return (b > 0 && a != "-") ? sprintf("%.2f", a / b) : "-" }
            END { printf " %11s | %11s |", q(rr, r), q(ru, u) }' "$RESULTS"
    done
    echo
done

echo
echo "lb/nginx (and lb/HAProxy) routed vs single pool; issue target: lb/nginx req/s routed within 5% of single pool."
echo
for conns in $CONNECTIONS; do
    for other in nginx haproxy; do
        awk -v o="$other" -v c="$conns" '
            $2 != c { next }
            $1 == "lb" { r["lb"] = $3; u["lb"] = $7 }
            $1 == "lb-routed" { r["lbr"] = $3; u["lbr"] = $7 }
            $1 == o { r["o"] = $3; u["o"] = $7 }
            $1 == o "-routed" { r["or"] = $3; u["or"] = $7 }
            function ok(x) { return x != "" && x != "-" && x > 0 }
            END {
                if (!ok(r["lb"]) || !ok(r["lbr"]) || !ok(r["o"]) || !ok(r["or"])) { printf "lb/%s, c=%s: -\n", o, c; exit }
                s = r["lb"] / r["o"]; t = r["lbr"] / r["or"]; d = 100 * (t / s - 1)
                line = sprintf("lb/%s req/s, c=%s: single pool %.3f, routed %.3f: %+.1f%%", o, c, s, t, d)
                if (o == "nginx") line = line sprintf(" (%s 5%%)", (d >= -5 && d <= 5) ? "within" : "NOT within")
                if (ok(u["lb"]) && ok(u["lbr"]) && ok(u["o"]) && ok(u["or"])) {
                    s = u["lb"] / u["o"]; t = u["lbr"] / u["or"]
                    line = line sprintf("; CPU µs/req: single pool %.3f, routed %.3f: %+.1f%%", s, t, 100 * (t / s - 1))
                }
                print line
            }' "$RESULTS"
    done
done
