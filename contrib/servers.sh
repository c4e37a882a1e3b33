# Sourced by demo.sh and contrib/relays-on-redis.sh: what both need to run
# servers in the background and stop them all on the way out.
#
#   servers_in NAME "MESSAGE"   makes $work (a new temporary folder named
#                               after NAME), an empty $pids, and a trap that
#                               kills every pid in it and prints MESSAGE
#                               followed by $work
#   first_line FILE             the first line of FILE once a server wrote
#                               it (each prints its bound address first)

servers_in() {
    work=$(mktemp -d "${TMPDIR:-/tmp}/relay-p2p-$1.XXXXXX")
    pids=()
    stopped_message=$2
    trap stop_servers EXIT
}

stop_servers() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    echo "$stopped_message $work" >&2
}

first_line() {
    for _ in $(seq 100); do
        [ -s "$1" ] && { head -n 1 "$1"; return; }
        sleep 0.05
    done
    echo "server did not start; see $work" >&2
    exit 1
}
