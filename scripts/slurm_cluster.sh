#!/usr/bin/env bash
# A real single-node SLURM cluster (munge + slurmctld + slurmd) for distbp's tests.
#
#   scripts/slurm_cluster.sh install   Debian packages munge, slurmctld, slurmd, slurm-client
#   scripts/slurm_cluster.sh start     install if needed, write configs, start daemons, wait for idle
#   scripts/slurm_cluster.sh stop      cancel jobs, stop the daemons this script started
#   scripts/slurm_cluster.sh status    print daemon pids and sinfo; exit 0 only if the node is usable
#
# Needs root and apt (Debian 12 / slurm 22.05 measured). Runs without systemd.
# State, logs and pid files live in $DISTBP_SLURM_DIR (default /var/tmp/distbp-slurm);
# the config goes to /etc/slurm/slurm.conf, where the slurm clients look for it.
# Environment: DISTBP_SLURM_CPUS (default 8, may exceed the real cores),
# DISTBP_SLURM_TIMEOUT (seconds to wait for the node to become idle, default 60).
set -euo pipefail

STATE_DIR=${DISTBP_SLURM_DIR:-/var/tmp/distbp-slurm}
CPUS=${DISTBP_SLURM_CPUS:-8}
TIMEOUT=${DISTBP_SLURM_TIMEOUT:-60}
CONF=/etc/slurm/slurm.conf
MARKER="# written by distbp scripts/slurm_cluster.sh"
MUNGE_KEY=/etc/munge/munge.key
MUNGE_DIR=/run/munge
PACKAGES=(munge slurmctld slurmd slurm-client)
NODE=$(hostname -s)

log() { echo "slurm_cluster: $*"; }
die() { echo "slurm_cluster: ERROR: $*" >&2; exit 1; }

need_root() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and starts daemons); HINT: sudo $0 $*"
}

# A pid is alive if its process exists and is not a zombie (PID 1 may reap late here).
alive() {
    local pid=$1 stat
    [[ -n $pid ]] || return 1
    stat=$(ps -o stat= -p "$pid" 2>/dev/null) || return 1
    [[ $stat != Z* ]]
}

pid_of() { [[ -s $1 ]] && cat "$1" || true; }

MUNGE_PID=$MUNGE_DIR/munged.pid
CTLD_PID=$STATE_DIR/slurmctld.pid
SLURMD_PID=$STATE_DIR/slurmd.pid

cmd_install() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        log "packages already installed"
        return 0
    fi
    command -v apt-get >/dev/null || die "apt-get not found; install ${missing[*]} by hand"
    log "installing ${missing[*]}"
    # Keep the packages' init scripts from starting daemons we have not configured yet.
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && made_policy=1
    fi
    local rc=0
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" > "$STATE_DIR/apt.log" 2>&1; then
        # A fresh machine may have no package lists yet.
        apt-get update -qq >> "$STATE_DIR/apt.log" 2>&1 &&
            apt-get install -y -qq --no-install-recommends "${missing[@]}" >> "$STATE_DIR/apt.log" 2>&1 || rc=$?
    fi
    [[ $made_policy -eq 1 ]] && rm -f "$policy"
    [[ $rc -eq 0 ]] || { tail -n 20 "$STATE_DIR/apt.log" >&2; die "apt-get install ${missing[*]} failed (log: $STATE_DIR/apt.log)"; }
    log "installed"
}

write_munge_key() {
    if [[ ! -s $MUNGE_KEY ]]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge "$MUNGE_KEY"
    chmod 700 /etc/munge
    chmod 400 "$MUNGE_KEY"
}

slurm_conf() {
    cat <<EOF
$MARKER
ClusterName=distbp
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# One node that claims $CPUS CPUs whatever the real core count.
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=pmi2
# Reject jobs that can never run instead of leaving them pending forever.
EnforcePartLimits=ALL
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
FirstJobId=$(first_job_id)
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=7-00:00:00 State=UP
EOF
}

# slurmctld starts clean (-c), which would restart job ids at 1 and make run
# directories named by job id collide with older ones: continue the numbering.
first_job_id() {
    local next
    next=$(cat "$STATE_DIR/next_job_id" 2>/dev/null || true)
    [[ $next =~ ^[0-9]+$ ]] && echo "$next" || echo 1
}

write_slurm_conf() {
    if [[ -e $CONF ]] && ! grep -qxF "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script; move it away to use the test cluster"
    fi
    mkdir -p /etc/slurm
    slurm_conf > "$CONF.tmp"
    mv "$CONF.tmp" "$CONF"
}

start_munged() {
    if alive "$(pid_of "$MUNGE_PID")" && munge -n </dev/null | unmunge >/dev/null 2>&1; then
        return 0
    fi
    mkdir -p "$MUNGE_DIR" /var/lib/munge /var/log/munge
    chown munge:munge "$MUNGE_DIR" /var/lib/munge /var/log/munge
    chmod 755 "$MUNGE_DIR"
    # munged refuses to run as root with this key, so run it as its own user.
    runuser -u munge -- /usr/sbin/munged 9>&-
    local i
    for i in $(seq 50); do
        munge -n </dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "munged did not start; see /var/log/munge/munged.log"
}

save_next_job_id() {
    local next
    next=$(scontrol show config 2>/dev/null | awk '$1 == "NEXT_JOB_ID" {print $3}') || true
    [[ $next =~ ^[0-9]+$ ]] && echo "$next" > "$STATE_DIR/next_job_id" || true
}

node_state() { timeout 5 sinfo -h -o %T 2>/dev/null | head -n 1 || true; }

cmd_start() {
    cmd_install
    local state=""
    if alive "$(pid_of "$CTLD_PID")" && alive "$(pid_of "$SLURMD_PID")"; then
        state=$(node_state)
        case $state in idle* | mix* | alloc*) log "already running (node $state)"; return 0 ;; esac
    fi
    stop_daemons    # leftovers of a half-started or crashed cluster
    mkdir -p "$STATE_DIR/ctld" "$STATE_DIR/slurmd"
    write_munge_key
    write_slurm_conf
    start_munged
    local t0=$SECONDS
    # 9>&-: the daemons must not inherit (and so hold forever) the command lock.
    slurmctld -c 9>&-
    slurmd 9>&-
    while (( SECONDS - t0 < TIMEOUT )); do
        state=$(node_state)
        if [[ $state == idle* ]]; then
            log "cluster up in $((SECONDS - t0)) s: node $NODE, $CPUS CPUs, partition debug (state in $STATE_DIR)"
            return 0
        fi
        sleep 0.5
    done
    echo "--- slurmctld.log (tail)" >&2; tail -n 20 "$STATE_DIR/slurmctld.log" >&2 || true
    echo "--- slurmd.log (tail)" >&2; tail -n 20 "$STATE_DIR/slurmd.log" >&2 || true
    die "node not idle after $TIMEOUT s (state '${state:-no answer}'); logs in $STATE_DIR"
}

# Send TERM, wait up to 10 s for the process to go, then KILL.
stop_pid() {
    local name=$1 pid=$2 i
    alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 100); do
        alive "$pid" || { log "stopped $name ($pid)"; return 0; }
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    log "killed $name ($pid)"
}

stop_daemons() {
    stop_pid slurmd "$(pid_of "$SLURMD_PID")"
    stop_pid slurmctld "$(pid_of "$CTLD_PID")"
    stop_pid munged "$(pid_of "$MUNGE_PID")"
    rm -f "$SLURMD_PID" "$CTLD_PID"
}

cmd_stop() {
    if alive "$(pid_of "$CTLD_PID")"; then
        save_next_job_id
        # Cancel jobs first so slurmd can clean up their steps before it goes.
        if [[ -n $(squeue -h -o %i 2>/dev/null) ]]; then
            scancel $(squeue -h -o %i) 2>/dev/null || true
            local i
            for i in $(seq 50); do
                [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
                sleep 0.2
            done
        fi
    fi
    stop_daemons
}

cmd_status() {
    local rc=0 name pid
    for name in munged slurmctld slurmd; do
        case $name in
            munged) pid=$(pid_of "$MUNGE_PID") ;;
            slurmctld) pid=$(pid_of "$CTLD_PID") ;;
            slurmd) pid=$(pid_of "$SLURMD_PID") ;;
        esac
        if alive "$pid"; then echo "$name: running (pid $pid)"; else echo "$name: not running"; rc=1; fi
    done
    if [[ $rc -eq 0 ]]; then
        timeout 5 sinfo || rc=1
        timeout 5 squeue || true
    fi
    return $rc
}

# One command at a time per state directory (tests in several shells share the cluster).
case ${1:-} in
    install | start | stop)
        need_root "$1"
        mkdir -p "$STATE_DIR"
        exec 9> "$STATE_DIR/.lock"
        flock 9 ;;
esac

case ${1:-} in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 {install|start|stop|status}" >&2; exit 2 ;;
esac
