# The tls scenario of compare.sh (`bash bench/compare.sh tls`), sourced by
# it after the build, the backends and its measure/summarize/idle_rss
# helpers: lb, nginx and HAProxy terminating TLS 1.3 with the same ECDSA
# P-256 certificate, made here with the openssl CLI, in front of the same 3
# backends as the http scenario, each with its default session resumption.
#
# Per target, ROUNDS times interleaved (medians reported):
# * RSS per idle TLS connection (examples/idle_clients --tls, full
#   handshakes), at IDLE (default 2000 here), on proxies that served nothing;
# * full handshakes per second: wrk -H 'Connection: close' at
#   HANDSHAKE_CONNECTIONS, one request per connection. wrk keeps one SSL
#   object per connection slot and SSL_clear()s it on reconnecting, which
#   keeps the session: by itself it resumes every handshake after the first.
#   A small LD_PRELOAD shim (tls_shim.c, built here with cc) drops the
#   session in SSL_clear, so every handshake is full, and counts full and
#   resumed handshakes from SSL_connect, so the table shows what was done;
# * the same with wrk resuming as it does by itself (the shim only counts);
# * HTTPS keep-alive req/s at CONNECTIONS (default "64 256").
# shellcheck shell=bash

HANDSHAKE_CONNECTIONS=${HANDSHAKE_CONNECTIONS:-32}
KEEPALIVE_CONNECTIONS=$CONNECTIONS
TLS="$TMP/tls"
mkdir -p "$TLS"
command -v openssl >/dev/null || die "needs the openssl CLI (apt-get install openssl)"
command -v cc >/dev/null || die "needs a C compiler (cc) for the wrk shim"

# --- certificate: ECDSA P-256, self-signed, for 127.0.0.1 and localhost ----
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -addext "basicConstraints=critical,CA:FALSE" \
    -keyout "$TLS/server.key" -out "$TLS/server.crt" 2>"$TLS/openssl.log" ||
    die "openssl req failed: $(cat "$TLS/openssl.log")"
cat "$TLS/server.crt" "$TLS/server.key" >"$TLS/combined.pem" # HAProxy's crt: both in one file

# --- the wrk shim ------------------------------------------------------------
# TLS_NO_RESUME=1: no session carried over from a connection slot's previous
# connection. TLS_HANDSHAKES=FILE: at exit, append "full resumed" (handshakes
# completed by SSL_connect) to FILE.
cat >"$TLS/tls_shim.c" <<'EOF'
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

typedef struct ssl_st SSL;
typedef struct ssl_session_st SSL_SESSION;
int SSL_set_session(SSL *s, SSL_SESSION *session);
int SSL_session_reused(const SSL *s);

static int (*real_connect)(SSL *);
static int (*real_clear)(SSL *);
static int no_resume;
static unsigned long full, resumed;

__attribute__((constructor)) static void init(void) {
    real_connect = (int (*)(SSL *))dlsym(RTLD_NEXT, "SSL_connect");
    real_clear = (int (*)(SSL *))dlsym(RTLD_NEXT, "SSL_clear");
    const char *v = getenv("TLS_NO_RESUME");
    no_resume = v && *v == '1';
}

int SSL_connect(SSL *s) {
    int r = real_connect(s);
    if (r == 1)
        __atomic_add_fetch(SSL_session_reused(s) ? &resumed : &full, 1, __ATOMIC_RELAXED);
    return r;
}

int SSL_clear(SSL *s) {
    int r = real_clear(s);
    if (no_resume)
        SSL_set_session(s, NULL);
    return r;
}

__attribute__((destructor)) static void report(void) {
    const char *path = getenv("TLS_HANDSHAKES");
    FILE *f = path ? fopen(path, "a") : NULL;
    if (f) {
        fprintf(f, "%lu %lu\n", full, resumed);
        fclose(f);
    }
}
EOF
cc -O2 -shared -fPIC -o "$TLS/tls_shim.so" "$TLS/tls_shim.c" -ldl || die "cannot build the wrk shim"
HANDSHAKE_COUNTS="$TLS/handshake-counts"

# --- configs -----------------------------------------------------------------
{
    echo "listen: 127.0.0.1:$LB_TLS_PORT"
    echo "tls:"
    echo "  certificates:"
    echo "    - {cert: $TLS/server.crt, key: $TLS/server.key}"
    echo "  min_version: \"1.3\""
    echo "strategy: round_robin"
    echo "backends:"
    for port in "${BACKEND_PORTS[@]}"; do echo "  - address: 127.0.0.1:$port"; done
    echo "health_check: {path: /health, interval: 2s, timeout: 1s}"
    echo "limits: {max_connections: 30000}"
} >"$TLS/lb.yaml"

{
    nginx_main "$TLS"
    echo "http {"
    echo "  access_log off;"
    for d in client_body proxy fastcgi uwsgi scgi; do echo "  ${d}_temp_path $TLS/nginx-$d;"; done
    echo "  upstream backends {"
    for port in "${BACKEND_PORTS[@]}"; do echo "    server 127.0.0.1:$port;"; done
    echo "    keepalive 64;"
    echo "  }"
    echo "  server {"
    echo "    listen 127.0.0.1:$NGINX_TLS_PORT ssl;  # no http2: HTTP/1.1 only"
    echo "    ssl_certificate $TLS/server.crt;"
    echo "    ssl_certificate_key $TLS/server.key;"
    echo "    ssl_protocols TLSv1.3;"
    echo "    location / {"
    echo "      proxy_pass http://backends;"
    echo "      proxy_http_version 1.1;"
    echo "      proxy_set_header Connection \"\";"
    echo "    }"
    echo "  }"
    echo "}"
} >"$TLS/nginx.conf"

{
    haproxy_global
    echo "  mode http"
    echo "  timeout connect 1s"
    echo "  timeout client 30s"
    echo "  timeout server 30s"
    echo "frontend fe"
    echo "  bind 127.0.0.1:$HAPROXY_TLS_PORT ssl crt $TLS/combined.pem ssl-min-ver TLSv1.3"
    echo "  default_backend be"
    echo "backend be"
    echo "  balance roundrobin"
    echo "  http-reuse always"
    echo "  option httpchk GET /health"
    haproxy_servers
} >"$TLS/haproxy.cfg"

# --- start and check: TLS 1.3 answers, plain HTTP and TLS 1.2 do not ---------
start_proxies "$TLS" "$LB_TLS_PORT" "$NGINX_TLS_PORT" "$HAPROXY_TLS_PORT"
TARGETS=("lb:$LB_TLS_PORT:$LB_PID" "nginx:$NGINX_TLS_PORT:$NGINX_PID" "haproxy:$HAPROXY_TLS_PORT:$HAPROXY_PID")
curl -fsS -o /dev/null "http://127.0.0.1:${BACKEND_PORTS[0]}/" || die "backend does not answer 200"
NEGOTIATED="$TLS/negotiated"
: >"$NEGOTIATED"
for t in "${TARGETS[@]}"; do
    IFS=: read -r name port _ <<<"$t"
    curl -fsS -o /dev/null --cacert "$TLS/server.crt" "https://127.0.0.1:$port/" ||
        die "$name (127.0.0.1:$port) does not answer 200 over TLS"
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "http://127.0.0.1:$port/" || true)
    [[ $code == 200 ]] && die "$name (127.0.0.1:$port) answers plain HTTP"
    if curl -s -o /dev/null --cacert "$TLS/server.crt" --tlsv1.2 --tls-max 1.2 "https://127.0.0.1:$port/"; then
        die "$name (127.0.0.1:$port) accepts TLS 1.2"
    fi
    # What wrk's libssl negotiates with its defaults (s_client shares them).
    openssl s_client -connect "127.0.0.1:$port" </dev/null 2>/dev/null | awk -v n="$name" '
        /^(New|Reused), / { sub(/,$/, "", $2); proto = $2; cipher = $NF }
        /^Server Temp Key:/ { group = $4; sub(/,$/, "", group) }
        /^Peer signature type:/ { sig = $4 }
        END { print n, proto, cipher, group, sig }' >>"$NEGOTIATED"
done

check_busy
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)

# --- memory first, on proxies that have not served a load test --------------
IDLE_RESULTS="$TMP/idle"
: >"$IDLE_RESULTS"
# shellcheck disable=SC2034 # idle_rss's (compare.sh)
IDLE_CLIENTS_ARGS=(--tls "$TLS/server.crt")
for n in $IDLE; do
    for t in "${TARGETS[@]}"; do
        IFS=: read -r name port pid <<<"$t"
        if [[ $name == haproxy ]] && ((n > 9980)); then
            echo "$name $n -" >>"$IDLE_RESULTS" # beyond its maxconn (fd limit)
            continue
        fi
        log "$name: RSS with $n idle TLS keep-alive connections"
        echo "$name $n $(idle_rss "$name" "$port" "$pid" "$n")" >>"$IDLE_RESULTS"
    done
done

# --- handshakes: one request per connection ---------------------------------
# record_handshakes NAME CONNS (MEASURE_AFTER): the measured wrk's counts,
# the last line its shim wrote, into $HANDSHAKES: name conns full resumed.
record_handshakes() {
    local full resumed
    read -r full resumed < <(tail -n 1 "$HANDSHAKE_COUNTS")
    echo "$1 $2 $full $resumed" >>"$HANDSHAKES"
}

# handshakes KIND NO_RESUME: measures every target with Connection: close,
# into $TMP/runs-KIND, $TMP/results-KIND and $TMP/handshakes-KIND.
handshakes() {
    local kind=$1
    RUNS="$TMP/runs-$kind"
    RESULTS="$TMP/results-$kind"
    HANDSHAKES="$TMP/handshakes-$kind"
    : >"$RUNS"
    : >"$HANDSHAKES"
    : >"$HANDSHAKE_COUNTS"
    CONNECTIONS=$HANDSHAKE_CONNECTIONS
    WRK_SCHEME=https
    WRK_ARGS=(-H "Connection: close")
    WRK_ENV=(LD_PRELOAD="$TLS/tls_shim.so" TLS_HANDSHAKES="$HANDSHAKE_COUNTS" TLS_NO_RESUME="$2")
    MEASURE_AFTER=record_handshakes
    log "handshakes, $kind (TLS_NO_RESUME=$2)"
    measure_all
    summarize
    local f
    for f in "$TMP"/wrk-*-"$HANDSHAKE_CONNECTIONS"-*.txt; do # wrk's outputs, for KEEP_TMP=1
        [[ $f == *-full.txt || $f == *-resumed.txt ]] || mv "$f" "${f%.txt}-$kind.txt"
    done
    # The shim counts only if wrk calls libssl's SSL_connect through the
    # dynamic linker; a full run must show no resumed handshake.
    awk -v kind="$kind" '$1 != "direct" { f[$1] += $3; r[$1] += $4 }
        END { for (n in f) if (f[n] + r[n] == 0 || (kind == "full" && r[n] > 0))
            printf "%s: %d full, %d resumed handshakes counted\n", n, f[n], r[n] }' "$HANDSHAKES" |
        while read -r line; do log "WARNING, $kind handshakes: $line"; done
}
handshakes full 1
handshakes resumed 0

# --- keep-alive --------------------------------------------------------------
RUNS="$TMP/runs-keepalive"
RESULTS="$TMP/results-keepalive"
: >"$RUNS"
CONNECTIONS=$KEEPALIVE_CONNECTIONS
# shellcheck disable=SC2034 # measure's (compare.sh)
{
    WRK_SCHEME=https
    WRK_ARGS=()
    WRK_ENV=()
    MEASURE_AFTER=
}
measure_all
summarize

# --- report ------------------------------------------------------------------
# handshake_table KIND: conn/s, errors, CPU µs per connection, the
# handshakes the shim counted (summed over the rounds) and per request.
handshake_table() {
    local kind=$1 name rps errors us box full resumed reqs
    printf "| %-8s | %10s | %6s | %11s | %10s | %10s | %6s | %9s |\n" \
        target "conn/s" errors "CPU µs/conn" "full hs" "resumed hs" "hs/req" "box busy"
    printf "|%s|%s|%s|%s|%s|%s|%s|%s|\n" ---------- ------------ -------- ------------- ------------ ------------ -------- -----------
    for name in direct lb nginx haproxy; do
        read -r _ _ rps _ _ errors us box < <(awk -v n="$name" -v c="$HANDSHAKE_CONNECTIONS" '$1 == n && $2 == c' "$TMP/results-$kind") || true
        read -r full resumed < <(awk -v n="$name" '$1 == n { f += $3; r += $4 } END { print f + 0, r + 0 }' "$TMP/handshakes-$kind")
        reqs=$(awk -v n="$name" '$1 == n { s += $9 } END { print s + 0 }' "$TMP/runs-$kind")
        if [[ $name == direct ]]; then
            full=- resumed=- hs=-
        else
            hs=$(awk -v h=$((full + resumed)) -v r="$reqs" 'BEGIN { if (r > 0) printf "%.3f", h / r; else printf "-" }')
        fi
        printf "| %-8s | %10.0f | %6s | %11s | %10s | %10s | %6s | %8s%% |\n" \
            "$name" "$rps" "$errors" "$us" "$full" "$resumed" "$hs" "$box"
    done
}

# ratio FILE TARGET OTHER CONNS FIELD: TARGET's figure over OTHER's.
ratio() {
    awk -v t="$2" -v o="$3" -v c="$4" -v f="$5" '
        $2 == c && $1 == t { a = $f } $2 == c && $1 == o { b = $f }
        END { print (b > 0 && a != "" && a != "-") ? sprintf("%.2f", a / b) : "-" }' "$1"
}

echo
echo "lb vs nginx vs HAProxy, loopback, HTTPS (TLS 1.3 only, HTTP/1.1), GET /, round robin over 3 backends;"
echo "the same ECDSA P-256 certificate (self-signed, openssl req) on all three, each proxy's default"
echo "session resumption. Negotiated with wrk's libssl defaults (openssl s_client):"
while read -r name proto cipher group sig; do
    echo "  $name: $proto $cipher, key exchange ${group:-?}, signature ${sig:-?}"
done <"$NEGOTIATED"
echo "Handshakes: wrk -t$THREADS -c$HANDSHAKE_CONNECTIONS -d$DURATION -H 'Connection: close' (after a $WARMUP warm-up): one request"
echo "per connection, so conn/s = req/s; CPU µs/conn is the proxy's CPU time (user+sys) per connection;"
echo "full/resumed hs: TLS handshakes wrk completed in the measured runs (counted in SSL_connect by the shim),"
echo "hs/req: handshakes per request (1 = a new connection per request). direct: the first backend,"
echo "plain HTTP, no proxy, the same new connection per request: what TCP and HTTP alone cost here."
echo "Keep-alive: wrk -t$THREADS -c{$KEEPALIVE_CONNECTIONS} -d$DURATION --latency over https, each target in turn."
echo "$ROUNDS round(s); with more than one, each figure is the median over the rounds."
echo "$NCPU CPUs: wrk, the backends and the proxy share them, so conn/s and req/s measure the whole box."
echo "Proxies: lb (--workers $PROXY_THREADS; HTTP/1 over TLS on its fast path; rustls with ring),"
echo "nginx $(nginx -v 2>&1 | sed 's/.*nginx\///') (worker_processes $PROXY_THREADS, upstream keepalive 64; OpenSSL $(openssl version | awk '{ print $2 }')),"
echo "HAProxy $(haproxy -v | awk 'NR == 1 { print $3 }') (nbthread $PROXY_THREADS, http-reuse always, checks every 2s)."
echo "box busy: all CPUs together during the run (100% = every CPU busy; below it, something waited)."
echo "Before the runs: CPUs ${BUSY_BEFORE}% busy with other work, load average $LOAD_BEFORE."
echo
echo "Full TLS handshakes (wrk's session reuse dropped by the shim), c=$HANDSHAKE_CONNECTIONS"
echo
handshake_table full
echo
echo "Resumed TLS handshakes (wrk reusing its last session per connection slot, as it does by itself), c=$HANDSHAKE_CONNECTIONS"
echo
handshake_table resumed
# shellcheck disable=SC2034 # throughput_table's (compare.sh)
RESULTS="$TMP/results-keepalive"
for conns in $KEEPALIVE_CONNECTIONS; do
    echo
    echo "HTTPS keep-alive, c=$conns (direct: plain HTTP to one backend)"
    echo
    throughput_table "$conns" direct lb nginx haproxy
done

if [[ -n $IDLE ]]; then
    echo
    echo "RSS added per idle TLS keep-alive connection (KiB; VmRSS summed over the proxy's processes,"
    echo "measured before the load runs, each connection a full handshake and one request)"
    echo
    printf "| %-8s |" target
    for n in $IDLE; do printf " %10s |" "$n conns"; done
    echo
    printf "|%s|" ----------
    for n in $IDLE; do printf "%s|" ------------; done
    echo
    for name in lb nginx haproxy; do
        printf "| %-8s |" "$name"
        for n in $IDLE; do printf " %10s |" "$(awk -v t="$name" -v n="$n" '$1 == t && $2 == n { print $3 }' "$IDLE_RESULTS")"; done
        echo
    done
fi

echo
echo "Ratios (same run): conn/s and req/s above 1 favour lb; CPU and RSS below 1 do."
echo
for other in nginx haproxy; do
    c=$HANDSHAKE_CONNECTIONS
    for kind in full resumed; do
        echo "lb/$other $kind handshakes, c=$c: conn/s $(ratio "$TMP/results-$kind" lb "$other" "$c" 3)," \
            "CPU µs/conn $(ratio "$TMP/results-$kind" lb "$other" "$c" 7)"
    done
    for conns in $KEEPALIVE_CONNECTIONS; do
        echo "lb/$other keep-alive, c=$conns: req/s $(ratio "$TMP/results-keepalive" lb "$other" "$conns" 3)," \
            "p99 $(ratio "$TMP/results-keepalive" lb "$other" "$conns" 5)," \
            "CPU µs/req $(ratio "$TMP/results-keepalive" lb "$other" "$conns" 7)"
    done
    for n in $IDLE; do
        echo "lb/$other RSS per idle TLS connection, $n: $(ratio "$IDLE_RESULTS" lb "$other" "$n" 3)"
    done
done
