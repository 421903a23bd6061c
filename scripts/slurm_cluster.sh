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
# scripts/cluster.sh runs several emulated nodes instead; only one of the two can run.
set -euo pipefail

PROG=slurm_cluster
STATE_DIR=${DISTBP_SLURM_DIR:-/var/tmp/distbp-slurm}
CPUS=${DISTBP_SLURM_CPUS:-8}
TIMEOUT=${DISTBP_SLURM_TIMEOUT:-60}
MARKER="# written by distbp scripts/slurm_cluster.sh"
PACKAGES=(munge slurmctld slurmd slurm-client)
NODE=$(hostname -s)
CTLD_PID=$STATE_DIR/slurmctld.pid
SLURMD_PID=$STATE_DIR/slurmd.pid
source "$(dirname "$0")/slurm_common.sh"

slurm_conf() {
    echo "$MARKER"
    slurm_conf_common
    cat <<CONF
SlurmctldHost=$NODE(127.0.0.1)
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd.log
# one node that claims $CPUS CPUs whatever the real core count
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=7-00:00:00 State=UP
CONF
}

node_state() { timeout 5 sinfo -h -o %T 2>/dev/null | head -n 1 || true; }

cmd_start() {
    refuse_other_slurmctld "$(pid_of "$CTLD_PID")"
    install_packages "${PACKAGES[@]}"
    local state=""
    if alive "$(pid_of "$CTLD_PID")" && alive "$(pid_of "$SLURMD_PID")"; then
        state=$(node_state)
        case $state in idle* | mix* | alloc*) log "already running (node $state)"; return 0 ;; esac
    fi
    stop_daemons    # leftovers of a half-started or crashed cluster
    mkdir -p "$STATE_DIR/ctld" "$STATE_DIR/slurmd"
    write_slurm_conf "$(slurm_conf)"
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

stop_daemons() {
    stop_pid slurmd "$(pid_of "$SLURMD_PID")"
    stop_pid slurmctld "$(pid_of "$CTLD_PID")"
    stop_pid munged "$(pid_of "$MUNGE_PID")"
    rm -f "$SLURMD_PID" "$CTLD_PID"
}

cmd_stop() {
    if alive "$(pid_of "$CTLD_PID")"; then
        save_next_job_id
        cancel_all_jobs
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
    install) need_root "$1"; with_lock install_packages "${PACKAGES[@]}" ;;
    start) need_root "$1"; with_lock cmd_start ;;
    stop) need_root "$1"; with_lock cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 {install|start|stop|status}" >&2; exit 2 ;;
esac
