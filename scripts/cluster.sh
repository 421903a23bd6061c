#!/usr/bin/env bash
# An emulated cluster of K nodes on this machine, with SLURM across them, for distbp's tests.
#
#   scripts/cluster.sh start [--nodes K] [--link RATE[,DELAY]]
#                                          build the nodes (default 2), start munge, slurmctld, one
#                                          slurmd per node; wait until every node is idle. --link shapes
#                                          every node's link: RATE out of each node (tc tbf, e.g. 1gbit,
#                                          500mbit) and DELAY added to each packet it sends (tc netem,
#                                          e.g. 100us, 1ms; a round trip pays it twice). Without --link
#                                          the links are unshaped (a running cluster's shaping is removed)
#   scripts/cluster.sh stop                cancel jobs, stop daemons, remove everything start made
#   scripts/cluster.sh status              each node's state, link shaping and sinfo; exit 0 only if all
#                                          are usable
#   scripts/cluster.sh exec NODE [CMD...]  run CMD (default: a shell) on NODE, as ssh NODE would
#
# A node nI is what makes a machine a separate host to MPI and SLURM:
#   - its own network namespace distbp-nI whose eth0 (10.200.16.I/24) is a veth pair plugged into
#     a bridge in the namespace distbp-sw; no address or route outside these namespaces, so all
#     traffic stays between the nodes; `ip -n distbp-nI link set eth0 down` unplugs a node.
#   - its own UTS namespace (hostname nI), IPC namespace and mount namespace with a private
#     /dev/shm (without them MPI would talk between "nodes" through shared memory) and a
#     node-local /tmp (on disk in $STATE_DIR/nI/tmp); everything else, /work or /home, is shared.
#   - /etc/hosts naming every node and the controller `head` (/etc/netns/NAME/hosts bound
#     over /etc/hosts, as `ip netns exec` does), and the sysfs of its network namespace.
# A "holder" process (sleep) keeps each node's namespaces alive; `exec` enters them with nsenter.
# The controller runs in the same way on the node `head` (10.200.16.254); clients on this host
# (sbatch, squeue, scontrol, scancel) reach it through 127.0.0.1:6817, relayed by socat over a
# unix socket into head's namespace ("head" resolves to 127.0.0.1 in this host's /etc/hosts).
# Interactive srun and salloc need call-backs from the nodes: run them on a node (exec n1 srun ...).
#
# Needs root, apt (Debian 12, slurm 22.05 measured) and no running slurmctld (scripts/slurm_cluster.sh
# stop first). Environment: DISTBP_CLUSTER_DIR (state, logs; default /var/tmp/distbp-cluster),
# DISTBP_CLUSTER_CPUS (CPUs per node, default: this machine's), DISTBP_CLUSTER_TIMEOUT (default 60 s).
set -euo pipefail

PROG=cluster
STATE_DIR=${DISTBP_CLUSTER_DIR:-/var/tmp/distbp-cluster}
# (nproc alone would answer OMP_NUM_THREADS)
CPUS=${DISTBP_CLUSTER_CPUS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}
TIMEOUT=${DISTBP_CLUSTER_TIMEOUT:-60}
NET=10.200.16          # a /24 the host does not use; nodes .1 to .K, head .254
HEAD=head
SWITCH=distbp-sw
MARKER="# written by distbp scripts/cluster.sh"
PACKAGES=(munge slurmctld slurmd slurm-client socat)
CTLD_PORT=6817
SCRIPTS=$(cd "$(dirname "$0")" && pwd)
# /tmp is node-local on the emulated nodes: a checkout there is bind-mounted into each node
TMP_CHECKOUT=$([[ $SCRIPTS/ == /tmp/* ]] && dirname "$SCRIPTS" || true)
source "$SCRIPTS/slurm_common.sh"

netns() { echo "distbp-$1"; }
addr_of() { [[ $1 == "$HEAD" ]] && echo "$NET.254" || echo "$NET.${1#n}"; }
holder_of() { pid_of "$STATE_DIR/$1/holder.pid"; }
node_count() { cat "$STATE_DIR/nodes" 2>/dev/null || echo 0; }
link_spec() { cat "$STATE_DIR/link" 2>/dev/null || true; }
nodes() { local i; for ((i = 1; i <= $1; i++)); do echo "n$i"; done; }

# Run a command inside NODE's namespaces, in the current directory if the node has it.
enter() {
    local node=$1 pid
    shift
    [[ $node == "$HEAD" || $node =~ ^n[1-9][0-9]*$ ]] || die "no node '$node': the nodes are n1 to nK, and $HEAD"
    pid=$(holder_of "$node")
    alive "$pid" || die "node $node is not running; HINT: $0 start"
    nsenter -t "$pid" --net --uts --ipc --mount -- \
        sh -c 'cd "$1" 2>/dev/null || cd /; shift; exec "$@"' sh "$PWD" "$@"
}

hosts_file() {
    local k=$1 n
    echo "127.0.0.1 localhost"
    echo "$(addr_of $HEAD) $HEAD"
    for n in $(nodes "$k"); do echo "$(addr_of "$n") $n"; done
}

# The namespace with the bridge every node's veth plugs into.
make_switch() {
    [[ -e /run/netns/$SWITCH ]] && return 0
    ip netns add "$SWITCH"
    ip -n "$SWITCH" link add br0 type bridge
    ip -n "$SWITCH" link set br0 up
}

# The node's network namespace, plugged into the switch, its address up; then its holder.
make_node() {
    local node=$1 k=$2 ns
    ns=$(netns "$node")
    mkdir -p "$STATE_DIR/$node/tmp" "/etc/netns/$ns"
    hosts_file "$k" > "/etc/netns/$ns/hosts"
    if [[ ! -e /run/netns/$ns ]]; then
        ip netns add "$ns"
        ip -n "$SWITCH" link add "v$node" type veth peer name eth0 netns "$ns"
        ip -n "$SWITCH" link set "v$node" master br0 up
        # IPv4 only: one address per node for MPI to pick (no IPv6 link-local address, which
        # stays "tentative" for a moment after the link comes up)
        ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1
        ip -n "$ns" addr add "$(addr_of "$node")/24" dev eth0
        ip -n "$ns" link set lo up
        ip -n "$ns" link set eth0 up
    fi
    alive "$(holder_of "$node")" && return 0
    rm -f "$STATE_DIR/$node/holder.pid"
    # 9>&-: long-lived processes must not hold the command lock.
    setsid nsenter --net="/run/netns/$ns" unshare --uts --ipc --mount --propagation private sh -c '
        hostname "$1"
        mount --bind "/etc/netns/$3/hosts" /etc/hosts
        mount -t tmpfs -o mode=1777 shm /dev/shm
        # a checkout under /tmp stays visible at its path (CI may clone there)
        if [ -n "$4" ]; then mkdir -p "$2/checkout" && mount --bind "$4" "$2/checkout"; fi
        mount --bind "$2/tmp" /tmp
        if [ -n "$4" ]; then mkdir -p "$4" && mount --move "$2/checkout" "$4"; fi
        # the sysfs of this network namespace, keeping the cgroup tree slurmd needs
        mkdir -p "$2/cgroup"
        mount --rbind /sys/fs/cgroup "$2/cgroup"
        mount -t sysfs sysfs /sys
        mount --move "$2/cgroup" /sys/fs/cgroup
        echo $$ > "$2/holder.pid"
        exec sleep infinity' sh "$node" "$STATE_DIR/$node" "$ns" "$TMP_CHECKOUT" </dev/null >"$STATE_DIR/$node/holder.log" 2>&1 9>&- &
    local i
    for i in $(seq 50); do alive "$(holder_of "$node")" && return 0; sleep 0.1; done
    die "node $node did not come up"
}

# Wait until every node's link has carrier: MPI over UCX failed to start on a link not yet up.
wait_links() {
    local n
    for n in "$@"; do
        local i
        for i in $(seq 50); do
            ip -n "$(netns "$n")" link show eth0 | grep -q "state UP" && break
            sleep 0.1
        done
    done
}

# RATE[,DELAY] checked: tc's units (bit, kbit, mbit, gbit; us, ms, s); "" is no shaping.
check_link() {
    local spec=$1
    [[ -z $spec ]] && return 0
    [[ $spec =~ ^[0-9]+(\.[0-9]+)?(bit|kbit|mbit|gbit)(,[0-9]+(\.[0-9]+)?(us|ms|s))?$ ]] ||
        die "--link '$spec': give RATE[,DELAY] in tc's units, e.g. --link 1gbit,100us or --link 500mbit"
}

# Bytes per second of a tc rate (1gbit -> 125000000).
rate_bytes() {
    awk -v r="$1" 'BEGIN { n = r + 0; u = substr(r, length(n "") + 1)
        m = (u == "gbit") ? 1e9 : (u == "mbit") ? 1e6 : (u == "kbit") ? 1e3 : 1; printf "%d", n * m / 8 }'
}

# Shape NODE's eth0 as spec says (egress: what the node sends), or remove any shaping.
shape_link() {
    local node=$1 spec=$2 ns rate delay burst
    ns=$(netns "$node")
    tc -n "$ns" qdisc del dev eth0 root 2>/dev/null || true
    [[ -z $spec ]] && return 0
    rate=${spec%%,*}
    delay=$([[ $spec == *,* ]] && echo "${spec#*,}" || true)
    # The bucket holds 1 ms at the rate (at least 64 KiB: one TSO segment of veth) so the rate holds
    # without the shaper waking per packet; a queue of 100 ms before tbf drops.
    burst=$(( $(rate_bytes "$rate") / 1000 ))
    (( burst < 65536 )) && burst=65536
    tc -n "$ns" qdisc add dev eth0 root handle 1: tbf rate "$rate" burst "$burst" latency 100ms
    # netem below tbf: every packet the node sends waits DELAY (limit: packets it may hold meanwhile)
    if [[ -n $delay ]] && ! tc -n "$ns" qdisc add dev eth0 parent 1:1 handle 10: netem delay "$delay" limit 100000; then
        tc -n "$ns" qdisc del dev eth0 root
        rm -f "$STATE_DIR/link"
        die "--link $spec: tc could not add netem for the delay (this kernel may lack CONFIG_NET_SCH_NETEM: see
    /proc/config.gz); the links are left unshaped; HINT: --link $rate shapes the rate alone"
    fi
}

slurm_conf() {
    local k=$1 n list
    list=$(nodes "$k" | paste -sd,)
    echo "$MARKER"
    slurm_conf_common
    cat <<CONF
SlurmctldHost=$HEAD
SlurmctldPort=$CTLD_PORT
StateSaveLocation=$STATE_DIR/$HEAD/state
SlurmctldPidFile=$STATE_DIR/$HEAD/slurmctld.pid
SlurmctldLogFile=$STATE_DIR/$HEAD/slurmctld.log
# %n: each node's slurmd has its own spool, pid and log file
SlurmdSpoolDir=$STATE_DIR/%n/spool
SlurmdPidFile=$STATE_DIR/%n/slurmd.pid
SlurmdLogFile=$STATE_DIR/%n/slurmd.log
# a node that stops answering is DOWN after 10 s (default 300): a job on a dead node ends soon
SlurmdTimeout=10
# srun waits KillWait + 2 s for the tasks of an aborted step (those of a dead node never answer)
KillWait=10
CONF
    for n in $(nodes "$k"); do
        echo "NodeName=$n NodeAddr=$(addr_of "$n") CPUs=$CPUS State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=$list Default=YES MaxTime=7-00:00:00 State=UP"
}

# This host's clients reach the controller at 127.0.0.1 through a unix socket into head.
start_relay() {
    local sock=$STATE_DIR/$HEAD/ctld.sock
    alive "$(pid_of "$STATE_DIR/relay-head.pid")" && alive "$(pid_of "$STATE_DIR/relay-host.pid")" && return 0
    stop_relay
    rm -f "$sock"
    local run='echo $$ > "$0"; exec setsid "$@"'
    enter "$HEAD" sh -c "$run" "$STATE_DIR/relay-head.pid" \
        socat "UNIX-LISTEN:$sock,fork" "TCP:127.0.0.1:$CTLD_PORT" </dev/null >/dev/null 2>&1 9>&- &
    sh -c "$run" "$STATE_DIR/relay-host.pid" \
        socat "TCP-LISTEN:$CTLD_PORT,bind=127.0.0.1,reuseaddr,fork" "UNIX-CONNECT:$sock" </dev/null >/dev/null 2>&1 9>&- &
    local i
    for i in $(seq 50); do [[ -S $sock ]] && return 0; sleep 0.1; done
    die "the relay to slurmctld did not start"
}

stop_relay() {
    stop_pid "relay on this host" "$(pid_of "$STATE_DIR/relay-host.pid")"
    stop_pid "relay in $HEAD" "$(pid_of "$STATE_DIR/relay-head.pid")"
    rm -f "$STATE_DIR/relay-host.pid" "$STATE_DIR/relay-head.pid"
}

host_entry() {
    grep -qF "$MARKER" /etc/hosts && return 0
    echo "127.0.0.1 $HEAD $MARKER" >> /etc/hosts
}

# Node states as "name state" lines, from the controller.
node_states() { timeout 5 sinfo -h -N -o "%N %T" 2>/dev/null || true; }

cmd_start() {
    local k=$1 link=$2 n
    [[ $k =~ ^[1-9][0-9]*$ && $k -le 200 ]] || die "--nodes $k: give a node count from 1 to 200"
    check_link "$link"
    refuse_other_slurmctld "$(pid_of "$STATE_DIR/$HEAD/slurmctld.pid")"
    if [[ $(node_count) != 0 && $(node_count) != "$k" ]]; then
        log "running with $(node_count) nodes, $k asked: restarting"
        cmd_stop
    fi
    install_packages "${PACKAGES[@]}"
    mkdir -p "$STATE_DIR/$HEAD/state"
    echo "$k" > "$STATE_DIR/nodes"
    make_switch
    make_node "$HEAD" "$k"
    for n in $(nodes "$k"); do make_node "$n" "$k"; done
    wait_links "$HEAD" $(nodes "$k")
    for n in $(nodes "$k"); do shape_link "$n" "$link"; done
    echo "$link" > "$STATE_DIR/link"
    host_entry
    start_munged
    if ! alive "$(pid_of "$STATE_DIR/$HEAD/slurmctld.pid")"; then
        write_slurm_conf "$(slurm_conf "$k")"
        enter "$HEAD" slurmctld -c 9>&-
    fi
    start_relay
    for n in $(nodes "$k"); do
        mkdir -p "$STATE_DIR/$n/spool"
        alive "$(pid_of "$STATE_DIR/$n/slurmd.pid")" || enter "$n" slurmd -N "$n" 9>&-
    done
    local t0=$SECONDS states
    while (( SECONDS - t0 < TIMEOUT )); do
        states=$(node_states)
        if [[ $(grep -cE ' (idle|mixed|allocated)' <<< "$states") == "$k" ]]; then
            log "cluster up: $k nodes ($(nodes "$k" | paste -sd' ')), $CPUS CPUs each, links ${link:-unshaped}, controller $HEAD; state in $STATE_DIR"
            return 0
        fi
        sleep 0.5
    done
    echo "--- slurmctld.log (tail)" >&2; tail -n 20 "$STATE_DIR/$HEAD/slurmctld.log" >&2 || true
    die "nodes not idle after $TIMEOUT s (sinfo: ${states:-no answer}); logs in $STATE_DIR"
}

cmd_stop() {
    local k n ns pid
    k=$(node_count)
    if alive "$(pid_of "$STATE_DIR/$HEAD/slurmctld.pid")"; then
        save_next_job_id
        cancel_all_jobs
    fi
    for n in $(nodes "$k"); do stop_pid "slurmd on $n" "$(pid_of "$STATE_DIR/$n/slurmd.pid")"; done
    stop_pid slurmctld "$(pid_of "$STATE_DIR/$HEAD/slurmctld.pid")"
    stop_relay
    stop_pid munged "$(pid_of "$MUNGE_PID")"
    # Whatever still runs on a node (a job's ranks, the holder) ends with it.
    for n in $HEAD $(nodes "$k"); do
        ns=$(netns "$n")
        if [[ -e /run/netns/$ns ]]; then
            for pid in $(ip netns pids "$ns"); do kill -KILL "$pid" 2>/dev/null || true; done
            ip netns del "$ns"
        fi
        rm -rf "/etc/netns/$ns" "${STATE_DIR:?}/$n"
    done
    [[ -e /run/netns/$SWITCH ]] && ip netns del "$SWITCH"
    rmdir /etc/netns 2>/dev/null || true  # if start made it
    if grep -qF "$MARKER" /etc/hosts; then
        # rewritten in place: /etc/hosts may be a mount point that cannot be replaced
        local kept
        kept=$(grep -vF "$MARKER" /etc/hosts)
        printf '%s\n' "$kept" > /etc/hosts
    fi
    grep -qxF "$MARKER" "$SLURM_CONF" 2>/dev/null && rm -f "$SLURM_CONF"
    rm -f "$STATE_DIR/nodes" "$STATE_DIR/link"
    log "stopped; kept $STATE_DIR/next_job_id so job ids continue"
}

cmd_status() {
    local k n ns rc=0 states
    k=$(node_count)
    [[ $k != 0 ]] || { echo "no cluster (scripts/cluster.sh start)"; return 1; }
    states=$(node_states)
    alive "$(pid_of "$STATE_DIR/$HEAD/slurmctld.pid")" && echo "$HEAD: slurmctld running" ||
        { echo "$HEAD: slurmctld not running"; rc=1; }
    echo "links: $(link_spec | sed 's/^$/unshaped/')"
    for n in $(nodes "$k"); do
        ns=$(netns "$n")
        local link slurmd state shaping
        link=$(ip -n "$ns" -br link show eth0 2>/dev/null | awk '{print $2}') || true
        # what tc applies, as it says it: "tbf rate 1Gbit burst 125000b lat 100ms, netem delay 100us"
        shaping=$(tc -n "$ns" qdisc show dev eth0 2>/dev/null | awk '$2 == "tbf" || $2 == "netem" {
            s = $2; for (i = 7; i <= NF; i++) s = s " " $i; out = out (out ? ", " : "") s } END { print out }') || true
        alive "$(pid_of "$STATE_DIR/$n/slurmd.pid")" && slurmd=running || slurmd="not running"
        state=$(awk -v n="$n" '$1 == n {print $2}' <<< "$states")
        echo "$n: $(addr_of "$n") link ${link:-missing} (${shaping:-unshaped}), slurmd $slurmd, state ${state:-unknown}"
        [[ $link == UP && $slurmd == running && $state =~ ^(idle|mixed|allocated) ]] || rc=1
    done
    return $rc
}

k=2
link=""
case ${1:-} in
    start)
        shift
        while [[ $# -gt 0 ]]; do
            case $1 in
                --nodes) k=${2:-}; shift 2 || die "--nodes needs a number" ;;
                --nodes=*) k=${1#--nodes=}; shift ;;
                --link) link=${2:-}; shift 2 || die "--link needs RATE[,DELAY], e.g. 1gbit,100us" ;;
                --link=*) link=${1#--link=}; shift ;;
                *) die "start: unknown argument '$1'; usage: $0 start [--nodes K] [--link RATE[,DELAY]]" ;;
            esac
        done
        need_root start; with_lock cmd_start "$k" "$link" ;;
    stop) need_root stop; with_lock cmd_stop ;;
    status) cmd_status ;;
    exec)
        [[ $# -ge 2 ]] || die "usage: $0 exec NODE [CMD...]"
        node=$2; shift 2
        [[ $# -gt 0 ]] || set -- "${SHELL:-/bin/sh}"
        enter "$node" "$@" ;;
    *) echo "usage: $0 {start [--nodes K] [--link RATE[,DELAY]]|stop|status|exec NODE [CMD...]}" >&2; exit 2 ;;
esac
