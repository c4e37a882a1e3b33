#!/usr/bin/env bash
# The whole relay-p2p demo on this machine: a relay, three peers serving
# files/peer1..3, and the interactive client. Everything stops when the
# client exits (quit, Ctrl-D or Ctrl-C).
set -euo pipefail
cd "$(dirname "$0")"

cargo build --release --quiet --workspace
bin=target/release
logs=$(mktemp -d "${TMPDIR:-/tmp}/relay-p2p-demo.XXXXXX")
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    echo "demo stopped; server logs are in $logs" >&2
}
trap cleanup EXIT

# Each server prints the address it bound as its first line of stdout.
first_line() {
    for _ in $(seq 100); do
        [ -s "$1" ] && { head -n 1 "$1"; return; }
        sleep 0.05
    done
    echo "server did not start; see $logs" >&2
    exit 1
}

"$bin/relay-server" 0 --bind 127.0.0.1 >"$logs/relay.out" 2>"$logs/relay.log" &
pids+=($!)
relay=$(first_line "$logs/relay.out")
port=${relay##*:}
echo "relay listening on $relay" >&2

for i in 1 2 3; do
    "$bin/peer-node" 127.0.0.1 "$port" --dir "files/peer$i" --bind 127.0.0.1 \
        >"$logs/peer$i.out" 2>"$logs/peer$i.log" &
    pids+=($!)
    echo "peer $i serving files/peer$i on $(first_line "$logs/peer$i.out")" >&2
done
for _ in $(seq 100); do
    [ "$("$bin/peer-client" 127.0.0.1 "$port" peers | wc -l)" -ge 3 ] && break
    sleep 0.05
done

echo "files on the peers: $(ls files/peer1 files/peer2 files/peer3 | grep -v -e '^$' -e ':$' | tr '\n' ' ')" >&2
"$bin/peer-client" 127.0.0.1 "$port"
