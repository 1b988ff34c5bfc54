# The h2 scenario of compare.sh (`bash bench/compare.sh h2`), sourced by it
# after the build and the backends: HTTP/2 cleartext with prior knowledge
# ("h2c") on both sides of the proxy, h2load as the client.
#
# Targets, each in front of the same 3 backends (examples/backend: hyper-util's
# auto builder, which answers HTTP/1.1 and, on seeing the HTTP/2 preface, h2c):
# * direct: h2load straight to the first backend, no proxy (the box's ceiling);
# * lb (18092): its plain listener, which serves h2c prior knowledge beside
#   HTTP/1.1, and one pool with `protocol: h2c` (round robin, HTTP/2 to the
#   backends);
# * haproxy (18093): `bind ... proto h2`, `server ... proto h2` (round robin,
#   http-reuse always: streams multiplexed over its backend connections).
# nginx is left out: it has no h2c upstream except grpc_pass, which needs
# gRPC framing; its proxy_pass speaks HTTP/1.x to backends only.
#
# Before measuring, curl --http2-prior-knowledge checks that each target
# answers HTTP/2 and that GET /protocol through each proxy reaches a backend
# as HTTP/2.0 (examples/backend answers /protocol with the version it got).
#
# Per target and connection count (CONNECTIONS, default "16 64"), ROUNDS
# times interleaved, medians reported: h2load -t$THREADS -cN -m$STREAMS
# -D$DURATION (after a WARMUP run) GET /, a ~20-byte body. Reported: req/s;
# the latency line h2load prints ("time for request": mean and max); p50 and
# p99 from h2load's --log-file (one line per request; LATENCY_LOG=0 skips it
# and prints "-"); failed (h2load: every request not answered 2xx, errors
# included) and errored (transport errors, timeouts) summed over the rounds;
# the proxy's CPU µs per request (utime+stime of its processes over the
# measured run, divided by the requests done; for direct, the backend's: one
# hyper HTTP/2 server, the floor of each of lb's two hops); box busy; other CPU (busy
# time none of h2load, the backends or the proxy used: other work on the
# box, roughly, interrupts included).
# Then lb/haproxy ratios against issue 18's target: lb at least 1.2× HAProxy's
# req/s and at most 0.8× its CPU per request.
# shellcheck shell=bash

STREAMS=${STREAMS:-10}
LATENCY_LOG=${LATENCY_LOG:-1}
H2="$TMP/h2"
mkdir -p "$H2"
# h2load's per-request logs (tens of MB a run) go to tmpfs when there is one:
# on a disk the kernel's writeback threads write them out during later runs,
# CPU taken from the box (read as `other CPU`) in the middle of a measurement.
LOGDIR=$H2
if [[ -d /dev/shm && -w /dev/shm ]]; then
    LOGDIR=$(mktemp -d /dev/shm/lb-h2load.XXXXXX)
    trap 'rm -rf "$LOGDIR"; cleanup' EXIT
fi
command -v h2load >/dev/null || die "needs h2load: apt-get install -y nghttp2-client"

# --- configs -----------------------------------------------------------------
{
    echo "listen: 127.0.0.1:$LB_H2_PORT"
    echo "strategy: round_robin"
    echo "protocol: h2c"
    echo "backends:"
    for port in "${BACKEND_PORTS[@]}"; do echo "  - address: 127.0.0.1:$port"; done
    echo "health_check: {path: /health, interval: 2s, timeout: 1s}"
    echo "limits: {max_connections: 30000}"
} >"$H2/lb.yaml"

{
    haproxy_global
    echo "  mode http"
    echo "  timeout connect 1s"
    echo "  timeout client 30s"
    echo "  timeout server 30s"
    echo "frontend fe"
    echo "  bind 127.0.0.1:$HAPROXY_H2_PORT proto h2"
    echo "  default_backend be"
    echo "backend be"
    echo "  balance roundrobin"
    echo "  http-reuse always"
    echo "  option httpchk GET /health"
    haproxy_servers | sed 's/ check / proto h2 check /'
} >"$H2/haproxy.cfg"

# --- start and check ---------------------------------------------------------
"$LB" --config "$H2/lb.yaml" --check >/dev/null || die "lb rejects $H2/lb.yaml"
haproxy -c -q -f "$H2/haproxy.cfg" || die "haproxy rejects $H2/haproxy.cfg"
RUST_LOG=warn "$LB" --config "$H2/lb.yaml" --workers "$PROXY_THREADS" --log-level warn >"$H2/lb.log" 2>&1 &
LB_PID=$!
PIDS+=("$LB_PID")
haproxy -db -f "$H2/haproxy.cfg" >"$H2/haproxy.log" 2>&1 &
HAPROXY_PID=$!
PIDS+=("$HAPROXY_PID")
wait_port "$LB_H2_PORT" "$LB_PID" lb
wait_port "$HAPROXY_H2_PORT" "$HAPROXY_PID" haproxy
sleep 2.5 # the first health checks (every 2 s) mark the backends up

TARGETS=("direct:${BACKEND_PORTS[0]}:$BACKEND_PID" "lb:$LB_H2_PORT:$LB_PID" "haproxy:$HAPROXY_H2_PORT:$HAPROXY_PID")
for t in "${TARGETS[@]}"; do
    IFS=: read -r name port _ <<<"$t"
    got=$(curl -sS -o /dev/null -w '%{http_code} %{http_version}' --http2-prior-knowledge "http://127.0.0.1:$port/") ||
        die "$name (127.0.0.1:$port) does not answer h2c prior knowledge"
    [[ $got == "200 2" ]] || die "$name (127.0.0.1:$port): expected 200 over HTTP/2, got '$got'"
    upstream=$(curl -sS --http2-prior-knowledge "http://127.0.0.1:$port/protocol") ||
        die "$name: GET /protocol failed"
    [[ $upstream == HTTP/2.0 ]] || die "$name: the backend got '$upstream', not HTTP/2.0"
done
log "h2c checked: direct, lb and haproxy answer HTTP/2 and reach the backends over HTTP/2.0"

check_busy
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)

# --- runs --------------------------------------------------------------------
RUNS="$H2/runs"
: >"$RUNS"
HZ=$(getconf CLK_TCK)

# h2load's "1.23ms", "850us", "1.02s" → milliseconds (to_ms, compare.sh,
# knows wrk's units, which are the same but for a bare "us").
h2_ms() { to_ms "$1"; }

# percentiles LOG: "p50_ms p99_ms" of the third column (µs) of h2load's
# --log-file; "- -" without one.
percentiles() {
    if [[ ! -s $1 ]]; then
        echo "- -"
        return
    fi
    cut -f3 "$1" | sort -n | awk '{ v[NR] = $1 }
        END {
            i50 = int(NR * 0.50); if (i50 < 1) i50 = 1
            i99 = int(NR * 0.99); if (i99 < 1) i99 = 1
            printf "%.3f %.3f\n", v[i50] / 1000, v[i99] / 1000 }'
}

# This shell's children's CPU (cutime+cstime) in ticks: h2load's, once a
# command substitution running it has been reaped.
child_ticks() { awk '{ sub(/^.*\) /, ""); print $14 + $15 }' "/proc/$$/stat"; }

# "busy total" ticks of all CPUs; busy: user, nice, system, irq and softirq
# (a process's stime includes the irq and softirq ticks taken while it ran,
# which /proc/stat files under irq and softirq), not idle, iowait, steal.
cpu_task_stat() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat; }

# measure_h2 NAME PORT CONNS [PID]: warm up, measure, append one line to $RUNS:
# name conns req/s mean_ms max_ms p50_ms p99_ms failed errored proxy_cpu_ticks box_busy_% requests_done other_%
# other_%: CPU busy time not spent by h2load, the backends or the proxy
# measured, % of all CPUs: other work on a shared box (and interrupts that
# land outside those processes), which skews the figures when it is more
# than a few %.
# shellcheck disable=SC2153 # ROUNDS is compare.sh's
measure_h2() {
    local name=$1 port=$2 conns=$3 pid=${4:-} pids=() out rps mean max p50 p99 failed errored cpu0 cpu1 box0 box ndone
    local own0 own1 task0 task1 other
    local url="http://127.0.0.1:$port/" logfile="$LOGDIR/log-$name-$conns-$ROUND.tsv" logarg=()
    [[ $LATENCY_LOG == 1 ]] && logarg=(--log-file="$logfile")
    log "round $ROUND/$ROUNDS, $name, c=$conns: warm-up $WARMUP, then h2load -t$THREADS -c$conns -m$STREAMS -D$DURATION $url"
    h2load -t"$THREADS" -c"$conns" -m"$STREAMS" -D"$WARMUP" "$url" >"$H2/warmup-$name-$conns-$ROUND.txt" 2>&1 ||
        log "$name: the warm-up h2load exited $?"
    if [[ -n $pid ]]; then mapfile -t pids < <(family "$pid"); fi
    cpu0=$(cpu_ticks "${pids[@]}")
    # direct's measured process is the backends' own: not counted twice.
    own0=$(($(cpu_ticks "$BACKEND_PID") + $(child_ticks)))
    [[ $pid == "$BACKEND_PID" ]] && own0=$(child_ticks)
    task0=$(cpu_task_stat)
    box0=$(cpu_stat)
    out=$(h2load -t"$THREADS" -c"$conns" -m"$STREAMS" -D"$DURATION" "${logarg[@]}" "$url" 2>&1) ||
        log "$name: h2load exited $?"
    box=$(busy_between "$box0" "$(cpu_stat)")
    task1=$(cpu_task_stat)
    cpu1=$(cpu_ticks "${pids[@]}")
    own1=$(($(cpu_ticks "$BACKEND_PID") + $(child_ticks)))
    [[ $pid == "$BACKEND_PID" ]] && own1=$(child_ticks)
    other=$(awk -v a="$task0" -v b="$task1" -v own=$((own1 - own0 + cpu1 - cpu0)) 'BEGIN {
        split(a, x, " "); split(b, y, " "); t = y[2] - x[2]
        printf "%.0f", (t > 0 ? 100 * (y[1] - x[1] - own) / t : 0) }')
    echo "$out" >"$H2/h2load-$name-$conns-$ROUND.txt"
    rps=$(awk '/^finished in/ { print $4 }' <<<"$out")
    # requests: N total, N started, N done, N succeeded, N failed, N errored, N timeout
    read -r ndone failed errored < <(awk '/^requests:/ {
            for (i = 2; i < NF; i++) { w = $(i + 1); sub(/,$/, "", w); n[w] = $i }
            print n["done"] + 0, n["failed"] + 0, n["errored"] + 0 }' <<<"$out")
    # time for request: min max mean sd +/-sd
    mean=$(h2_ms "$(awk '/^time for request:/ { print $6 }' <<<"$out")")
    max=$(h2_ms "$(awk '/^time for request:/ { print $5 }' <<<"$out")")
    read -r p50 p99 < <(percentiles "$logfile")
    rm -f "$logfile"
    echo "$name $conns ${rps:-0} $mean $max $p50 $p99 ${failed:-0} ${errored:-0} $((cpu1 - cpu0)) $box ${ndone:-0} $other" >>"$RUNS"
}

for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
    for conns in $CONNECTIONS; do
        for t in "${TARGETS[@]}"; do
            IFS=: read -r name port pid <<<"$t"
            measure_h2 "$name" "$port" "$conns" "$pid"
        done
    done
done

# Medians over the rounds; failed and errored summed; CPU µs per request over
# all requests done. $RESULTS: name conns req/s mean max p50 p99 failed errored cpu_us box other
RESULTS="$H2/results"
: >"$RESULTS"
for conns in $CONNECTIONS; do
    for t in "${TARGETS[@]}"; do
        awk -v n="${t%%:*}" -v c="$conns" -v hz="$HZ" '
            '"$AWK_MEDIAN"'
            function med(a, k) { return (a[1] == "-") ? "-" : median(a, k) }
            $1 == n && $2 == c { k++; r[k] = $3; mean[k] = $4; mx[k] = $5; p50[k] = $6; p99[k] = $7
                failed += $8; errored += $9; ticks += $10; box[k] = $11; reqs += $12; other[k] = $13 }
            END {
                us = (reqs == 0) ? "-" : sprintf("%.1f", ticks / hz * 1e6 / reqs)
                print n, c, median(r, k), median(mean, k), median(mx, k), med(p50, k), med(p99, k), failed, errored, us, median(box, k), median(other, k)
            }' "$RUNS" >>"$RESULTS"
    done
done

# --- report ------------------------------------------------------------------
h2_table() {
    local conns=$1 name rps mean max p50 p99 failed errored us box other
    printf "| %-8s | %10s | %8s | %8s | %8s | %8s | %7s | %7s | %10s | %9s | %9s |\n" \
        target "req/s" "mean ms" "p50 ms" "p99 ms" "max ms" failed errored "CPU µs/req" "box busy" "other CPU"
    printf "|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|\n" ---------- ------------ ---------- ---------- ---------- ---------- --------- --------- ------------ ----------- -----------
    awk -v c="$conns" '$2 == c' "$RESULTS" |
        while read -r name _ rps mean max p50 p99 failed errored us box other; do
            printf "| %-8s | %10.0f | %8.3f | %8s | %8s | %8.2f | %7s | %7s | %10s | %8s%% | %8s%% |\n" \
                "$name" "$rps" "$mean" "$p50" "$p99" "$max" "$failed" "$errored" "$us" "$box" "$other"
        done
}

# ratio TARGET OTHER CONNS FIELD: TARGET's figure over OTHER's in $RESULTS.
ratio() {
    awk -v t="$1" -v o="$2" -v c="$3" -v f="$4" '
        $2 == c && $1 == t { a = $f } $2 == c && $1 == o { b = $f }
        END { print (b > 0 && a != "" && a != "-") ? sprintf("%.2f", a / b) : "-" }' "$RESULTS"
}

echo
echo "lb vs HAProxy, loopback, HTTP/2 cleartext (h2c, prior knowledge) from the client and to the"
echo "backends, GET / (a ~20-byte body), round robin over 3 backends. nginx is not in it: it has no"
echo "h2c upstream but grpc_pass, which needs gRPC framing."
echo "h2load -t$THREADS -c{$CONNECTIONS} -m$STREAMS -D$DURATION (after a $WARMUP warm-up), each target in turn;"
echo "$ROUNDS round(s); with more than one, each figure is the median over the rounds (failed and"
echo "errored: summed). mean/max ms: h2load's \"time for request\"; p50/p99: from its --log-file"
echo "(\"-\" with LATENCY_LOG=0). failed: requests not answered 2xx (errored ones included);"
echo "errored: transport errors and timeouts."
echo "$NCPU CPUs: h2load, the backends and the proxy share them, so req/s measures the whole box,"
echo "not the proxy alone; CPU µs/req is the proxy's own CPU time (user+sys) per request done"
echo "(direct: the backend's, one hyper HTTP/2 server: what each of lb's two HTTP/2 hops is built on)."
echo "Proxies: lb (--workers $PROXY_THREADS; its listener serves h2c by hyper; pool protocol: h2c),"
echo "HAProxy $(haproxy -v | awk 'NR == 1 { print $3 }') (nbthread $PROXY_THREADS, bind proto h2, server proto h2, http-reuse always, checks every 2s)."
echo "direct: h2load to the first backend alone (examples/backend, hyper-util auto: h2c), no proxy."
echo "box busy: all CPUs together during the run (100% = every CPU busy; below it, something waited);"
echo "other CPU: CPU busy time not spent by h2load, the backends or the proxy measured, % of all CPUs:"
echo "other work on the box, which skews the run when above a few %."
echo "Before the runs: CPUs ${BUSY_BEFORE}% busy with other work, load average $LOAD_BEFORE."
for conns in $CONNECTIONS; do
    echo
    echo "c=$conns, m=$STREAMS ($((conns * STREAMS)) streams in flight at most)"
    echo
    h2_table "$conns"
done

echo
echo "lb/HAProxy (same run) against issue 18's target: req/s at least 1.20, CPU µs/req at most 0.80."
echo
printf "| %-6s | %11s | %14s | %-28s |\n" conns "req/s ratio" "CPU/req ratio" "target"
printf "|%s|%s|%s|%s|\n" -------- ------------- ---------------- ------------------------------
for conns in $CONNECTIONS; do
    r=$(ratio lb haproxy "$conns" 3)
    u=$(ratio lb haproxy "$conns" 10)
    verdict=$(awk -v r="$r" -v u="$u" 'BEGIN {
        if (r == "-" || u == "-") { print "no figure"; exit }
        a = (r + 0 >= 1.2) ? "req/s met" : "req/s NOT met"
        b = (u + 0 <= 0.8) ? "CPU met" : "CPU NOT met"
        print a ", " b }')
    printf "| %-6s | %11s | %14s | %-28s |\n" "c=$conns" "$r" "$u" "$verdict"
done
if awk '($8 > 0 || $9 > 0) { bad = 1 } END { exit !bad }' "$RESULTS"; then
    echo
    echo "Failures (summed over the rounds; h2load's outputs: KEEP_TMP=1 keeps them in $H2):"
    awk '($8 > 0 || $9 > 0) { printf "  %s c=%s: %d failed, %d errored\n", $1, $2, $8, $9 }' "$RESULTS"
fi
