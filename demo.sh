#!/usr/bin/env bash
# The whole relay-p2p demo on this machine: a relay, three peers serving
# files/peer1..3, and the interactive client. Everything stops when the
# client exits (quit, Ctrl-D or Ctrl-C).
set -euo pipefail
cd "$(dirname "$0")"

cargo build --release --quiet --workspace
bin=target/release
. contrib/servers.sh
servers_in demo "demo stopped; server logs are in"

"$bin/relay-server" 0 --bind 127.0.0.1 >"$work/relay.out" 2>"$work/relay.log" &
pids+=($!)
relay=$(first_line "$work/relay.out")
port=${relay##*:}
echo "relay listening on $relay" >&2

for i in 1 2 3; do
    "$bin/peer-node" 127.0.0.1 "$port" --dir "files/peer$i" --bind 127.0.0.1 \
        >"$work/peer$i.out" 2>"$work/peer$i.log" &
    pids+=($!)
    echo "peer $i serving files/peer$i on $(first_line "$work/peer$i.out")" >&2
done
for _ in $(seq 100); do
    [ "$("$bin/peer-client" 127.0.0.1 "$port" peers | wc -l)" -ge 3 ] && break
    sleep 0.05
done

echo "files on the peers: $(ls files/peer1 files/peer2 files/peer3 | grep -v -e '^$' -e ':$' | tr '\n' ' ')" >&2
"$bin/peer-client" 127.0.0.1 "$port"
