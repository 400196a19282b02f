#!/usr/bin/env bash
# An emulated multi-host cluster on one Linux machine: K network namespaces ("hosts"), each
# joined by a veth link to a bridge that lives in its own switch namespace, each host's
# link shaped with tc (tbf rate + netem delay).  Addresses come from the benchmarking range
# 198.18.0.0/15 only; no default route and no link to the host's own network, so the
# traffic stays inside these namespaces.  Ranks run one per namespace under Open MPI with
# an rsh agent that enters the namespace (and its own UTS namespace, so each "host" has its
# own hostname); the shared-memory transport is disabled so every byte crosses the links.
#
# Needs root (ip netns, tc).  Usage:
#   launch/netns_cluster.sh up K RATE DELAY      e.g. up 4 1gbit 0.1ms (DELAY 0: none;
#                                                  needs the sch_netem kernel module)
#   launch/netns_cluster.sh run K -- CMD...      mpirun one rank per namespace
#   launch/netns_cluster.sh session K RATE DELAY -- CMD...   up, run, always down
#   launch/netns_cluster.sh status | down
#   launch/netns_cluster.sh rsh HOST CMD...      (the rsh agent mpirun calls)
# PREFIX (default dqrmc) names the namespaces: ${PREFIX}sw, ${PREFIX}0 .. ${PREFIX}K-1;
# host i has address 198.18.0.(i+1)/24.
set -euo pipefail
PREFIX="${PREFIX:-dqrmc}"
SUBNET="198.18.0"
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"

need_root() {
    if [ "$(id -u)" != 0 ]; then
        echo "netns_cluster: needs root (ip netns, veth and tc); run it as root or under sudo" >&2
        exit 1
    fi
    for tool in ip tc; do
        command -v "$tool" >/dev/null || { echo "netns_cluster: '$tool' not found (apt-get install iproute2)" >&2; exit 1; }
    done
}

namespaces() { ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${PREFIX}(sw|[0-9]+)\$" || true; }

down() {
    need_root
    local ns
    for ns in $(namespaces); do ip netns del "$ns"; done
    echo "netns_cluster: removed namespaces with prefix ${PREFIX}"
}

up() {
    need_root
    local k="$1" rate="$2" delay="$3" i
    [[ "$k" =~ ^[0-9]+$ ]] && [ "$k" -ge 1 ] && [ "$k" -le 200 ] || { echo "K must be 1..200, got '$k'" >&2; exit 2; }
    if [ -n "$(namespaces)" ]; then echo "netns_cluster: namespaces ${PREFIX}* exist: run '$0 down' first" >&2; exit 1; fi
    ip netns add "${PREFIX}sw"
    ip -n "${PREFIX}sw" link set lo up
    ip -n "${PREFIX}sw" link add br0 type bridge
    ip -n "${PREFIX}sw" link set br0 up
    for ((i = 0; i < k; i++)); do
        local ns="${PREFIX}$i"
        ip netns add "$ns"
        ip -n "$ns" link set lo up
        # both ends are created inside the namespaces: nothing touches the host's interfaces
        ip -n "$ns" link add eth0 type veth peer name "p$i" netns "${PREFIX}sw"
        ip -n "${PREFIX}sw" link set "p$i" master br0 up
        ip -n "$ns" addr add "${SUBNET}.$((i + 1))/24" dev eth0
        ip -n "$ns" link set eth0 up
        # the host's NIC: rate limit, then latency
        ip netns exec "$ns" tc qdisc add dev eth0 root handle 1: tbf rate "$rate" burst 1mbit latency 100ms
        if [ "$delay" != 0 ] && ! ip netns exec "$ns" tc qdisc add dev eth0 parent 1:1 handle 10: \
                netem delay "$delay" limit 100000 2>/dev/null; then
            [ "$i" -gt 0 ] || echo "netns_cluster: tc netem is not available in this kernel: no added latency" >&2
        fi
    done
    echo "netns_cluster: $k hosts ${SUBNET}.1-${SUBNET}.$k, ${rate} per host, ${delay} one way, prefix ${PREFIX}"
}

status() {
    local ns
    for ns in $(namespaces); do
        echo "== $ns"; ip -n "$ns" -brief addr 2>/dev/null | grep -v '^lo' || true
        ip netns exec "$ns" tc qdisc show dev eth0 2>/dev/null || true
    done
}

# mpirun's rsh agent: "rsh HOST CMD..." -> run CMD in that host's namespace
rsh() {
    local host="$1"; shift
    while [[ "$host" == -* ]]; do host="$1"; shift; done  # ssh-style options, if any
    local i="${host##*.}"
    [[ "$host" == "${SUBNET}."* ]] || { echo "netns_cluster rsh: unknown host $host" >&2; exit 1; }
    i=$((i - 1))
    exec ip netns exec "${PREFIX}$i" unshare --uts sh -c "hostname ${PREFIX}host$i; $*"
}

run() {
    need_root
    local k="$1"; shift
    [ "${1:-}" = "--" ] && shift
    [ -n "$(namespaces)" ] || { echo "netns_cluster: no cluster: '$0 up K RATE DELAY' first" >&2; exit 1; }
    local hosts="" i
    for ((i = 0; i < k; i++)); do hosts="${hosts:+$hosts,}${SUBNET}.$((i + 1)):1"; done
    source "$(dirname "$SELF")/common.sh"
    export PREFIX
    # every emulated host sees all of this machine's cores: share them out unless told
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / k > 1 ? $(nproc) / k : 1 ))}"
    local envx; mapfile -t envx < <(mpirun_env_args)
    ip netns exec "${PREFIX}0" unshare --uts sh -c "hostname ${PREFIX}host0; exec \"\$@\"" sh \
        mpirun -np "$k" -H "$hosts" -bind-to none -map-by slot \
        -mca plm_rsh_agent "$SELF rsh" -mca btl self,tcp \
        -mca btl_tcp_if_include "${SUBNET}.0/24" -mca oob_tcp_if_include "${SUBNET}.0/24" \
        -x PREFIX "${envx[@]}" \
        "$@"
}

session() {
    need_root
    local k="$1" rate="$2" delay="$3"; shift 3
    trap down EXIT
    up "$k" "$rate" "$delay"
    run "$k" "$@"
}

cmd="${1:-}"; shift || true
case "$cmd" in
    up) [ $# -eq 3 ] || { echo "usage: $0 up K RATE DELAY" >&2; exit 2; }; up "$@" ;;
    down) down ;;
    status) status ;;
    run) run "$@" ;;
    session) session "$@" ;;
    rsh) rsh "$@" ;;
    *) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
