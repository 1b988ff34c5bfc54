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

# The ports config.yaml and the backends use. Anything already listening
# there (an earlier demo still running, another server) would make lb or a
# backend fail to start, or answer in their place: stop before the prompt.
ports=(8080 9001 9002 9003)
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
taken=()
for port in "${ports[@]}"; do
    if port_in_use "$port"; then taken+=("$port"); fi
done
if ((${#taken[@]})); then
    echo "demo: port(s) ${taken[*]} already in use on 127.0.0.1 (an earlier demo still running?);" >&2
    echo "demo: free them (e.g. \`ss -ltnp | grep -E ':(8080|900[123]) '\` shows who holds them) and run it again." >&2
    exit 1
fi

# Two builds that share their artefacts with the ones a newcomer runs next:
# lb exactly as a plain `cargo build --release` builds it, and the backend
# in the dev profile, where `cargo test` builds the examples too. Building
# them in one release command would unify the dev-dependencies' features
# (tokio "full", futures-util…) into lb's, and the next plain release build
# would recompile tokio, hyper and lb.
echo "building lb and the example backend (the first build takes a few minutes)..."
cargo build --release --quiet
cargo build --quiet --example backend

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

# Wait until lb listens (or has exited), for at most about 10 s.
for _ in $(seq 100); do
    if ! kill -0 "$lb_pid" 2>/dev/null || port_in_use 8080; then break; fi
    sleep 0.1
done
if ! kill -0 "$lb_pid" 2>/dev/null || ! port_in_use 8080; then
    echo "lb failed to start; its log ($log):" >&2
    cat "$log" >&2
    exit 1
fi

echo
echo "lb is listening on http://127.0.0.1:8080 — try: curl localhost:8080 (in another terminal)."
echo "Type help for backend commands. lb's log: $log"
echo

target/debug/examples/backend 9001 9002 9003
