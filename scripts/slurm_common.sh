# Shared by scripts/slurm_cluster.sh (one node) and scripts/cluster.sh (emulated nodes):
# packages, munge, pid checks and the job-id counter. Source it after setting PROG and STATE_DIR.

MUNGE_KEY=/etc/munge/munge.key
MUNGE_DIR=/run/munge
MUNGE_PID=$MUNGE_DIR/munged.pid
SLURM_CONF=/etc/slurm/slurm.conf

log() { echo "$PROG: $*"; }
die() { echo "$PROG: ERROR: $*" >&2; exit 1; }

need_root() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and starts daemons); HINT: sudo $0 $*"
}

# A pid is alive if its process exists and is not a zombie (PID 1 may reap late here).
alive() {
    local pid=${1:-} stat
    [[ -n $pid ]] || return 1
    stat=$(ps -o stat= -p "$pid" 2>/dev/null) || return 1
    [[ $stat != Z* ]]
}

pid_of() { [[ -s $1 ]] && cat "$1" || true; }

# Install the Debian packages given as arguments that are missing, without starting their daemons.
install_packages() {
    local missing=() p
    for p in "$@"; do
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

start_munged() {
    write_munge_key
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

# Refuse to start beside a slurmctld that is not ours (the other test cluster, or the site's).
refuse_other_slurmctld() {
    local own=$1 pid
    for pid in $(pgrep -x slurmctld || true); do
        [[ $pid == "$own" ]] || ! alive "$pid" ||
            die "another slurmctld runs (pid $pid, $(grep -m1 '^# written by' "$SLURM_CONF" 2>/dev/null || echo 'not ours')); HINT: stop that cluster first (scripts/slurm_cluster.sh stop or scripts/cluster.sh stop)"
    done
}

# The settings both test clusters share: root daemons, munge, CPUs as configured (even more than
# the machine has), no cgroups, pmi2, jobs that can never run rejected, no accounting.
slurm_conf_common() {
    cat <<CONF
ClusterName=distbp
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldDebug=info
SlurmdDebug=info
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=pmi2
EnforcePartLimits=ALL
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
FirstJobId=$(first_job_id)
CONF
}

# Write slurm.conf; refuse to overwrite one the site wrote.
write_slurm_conf() {
    if [[ -e $SLURM_CONF ]] && ! grep -q '^# written by distbp' "$SLURM_CONF"; then
        die "$SLURM_CONF exists and was not written by distbp's scripts; move it away to use a test cluster"
    fi
    mkdir -p /etc/slurm
    printf '%s\n' "$1" > "$SLURM_CONF.tmp"
    mv "$SLURM_CONF.tmp" "$SLURM_CONF"
}

# slurmctld starts clean (-c), which would restart job ids at 1 and make run
# directories named by job id collide with older ones: continue the numbering.
first_job_id() {
    local next
    next=$(cat "$STATE_DIR/next_job_id" 2>/dev/null || true)
    [[ $next =~ ^[0-9]+$ ]] && echo "$next" || echo 1
}

save_next_job_id() {
    local next
    next=$(timeout 10 scontrol show config 2>/dev/null | awk '$1 == "NEXT_JOB_ID" {print $3}') || true
    [[ $next =~ ^[0-9]+$ ]] && echo "$next" > "$STATE_DIR/next_job_id" || true
}

# Cancel every job and wait up to 10 s for them to go, so slurmd can clean up their steps.
cancel_all_jobs() {
    local jobs i
    jobs=$(timeout 10 squeue -h -o %i 2>/dev/null) || return 0
    [[ -n $jobs ]] || return 0
    scancel $jobs 2>/dev/null || true
    for i in $(seq 50); do
        [[ -z $(timeout 10 squeue -h -o %i 2>/dev/null) ]] && return 0
        sleep 0.2
    done
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

# Run "$@" under an exclusive lock on $STATE_DIR/.lock (one command at a time per cluster).
with_lock() {
    mkdir -p "$STATE_DIR"
    exec 9> "$STATE_DIR/.lock"
    flock 9
    "$@"
}
