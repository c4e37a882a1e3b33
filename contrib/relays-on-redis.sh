#!/usr/bin/env bash
# Two relays on one Redis, on this machine: a redis-server of its own (in a
# temporary folder, on a free port, append-only), two relays sharing it, a
# peer that registers with both, and a client that is given both. Relay A
# is killed half way: the client goes on through B, which knows everything
# A was told. Needs redis-server (apt-get install redis-server).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --quiet --bins
bin=target/release
. contrib/servers.sh
servers_in redis "stopped; logs are in"

redis_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
redis-server --port "$redis_port" --bind 127.0.0.1 --dir "$work" \
    --appendonly yes --save "" --logfile redis.log &
pids+=($!)
for _ in $(seq 100); do
    redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break
    sleep 0.05
done
store="redis://127.0.0.1:$redis_port/0"
echo "redis on $store" >&2

for name in a b; do
    "$bin/relay-server" 0 --bind 127.0.0.1 --store "$store" \
        >"$work/relay-$name.out" 2>"$work/relay-$name.log" &
    pids+=($!)
    declare "relay_$name=$(first_line "$work/relay-$name.out")"
    declare "pid_$name=$!"
done
echo "relay A on $relay_a, relay B on $relay_b" >&2

"$bin/peer-node" --relay "$relay_a" --relay "$relay_b" --dir files/peer1 --bind 127.0.0.1 \
    >"$work/peer.out" 2>"$work/peer.log" &
pids+=($!)
echo "peer serving files/peer1 on $(first_line "$work/peer.out")" >&2

client() { "$bin/peer-client" --relay "$relay_a" --relay "$relay_b" --timeout 2 "$@"; }
for _ in $(seq 100); do
    [ -n "$(client ls 2>/dev/null)" ] && break
    sleep 0.1
done

echo "--- ls, through A" >&2
client ls
echo "--- relay A killed; ls again, through B" >&2
kill -KILL "$pid_a"
client ls
echo "--- the network's counters, from B" >&2
client stats | grep -E '^(peers_live|registrations|holdings) '
