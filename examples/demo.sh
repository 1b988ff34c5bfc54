#!/usr/bin/env bash
# The quick-start demo: lb on :8080 (using ./config.yaml) in front of three
# example backends on :9001-9003, with the backends' prompt in this terminal.
#
#   bash examples/demo.sh
#
# Then run `curl localhost:8080` in another terminal, and type commands such as
# `stop 9002`, `slow 9001 500ms`, `sick 9003` or `ok all` here (`help` lists
# them). lb's log goes to target/demo-lb.log. Ctrl-C or `quit` stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "building lb and the example backend (the first build takes a while)..."
cargo build --release --quiet --bin lb --example backend

log=target/demo-lb.log
target/release/lb --config config.yaml >"$log" 2>&1 &
lb_pid=$!

stop_lb() {
    kill "$lb_pid" 2>/dev/null || true
    wait "$lb_pid" 2>/dev/null || true
}
trap stop_lb EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

sleep 0.5
if ! kill -0 "$lb_pid" 2>/dev/null; then
    echo "lb failed to start; its log ($log):" >&2
    cat "$log" >&2
    exit 1
fi

echo
echo "lb is listening on http://127.0.0.1:8080 — try: curl localhost:8080 (in another terminal)."
echo "Type help for backend commands. lb's log: $log"
echo

target/release/examples/backend 9001 9002 9003
