#!/usr/bin/env bash
# A one-node SLURM cluster on localhost, for testing `snakemake --profile profiles/slurm` for real.
#
# Usage: scripts/slurm_cluster.sh {install|start|status|stop}
#
#   install  install Debian's slurm-wlm and munge with apt-get (needs root) when they are missing
#   start    install, write /etc/slurm/slurm.conf for this machine (its real CPUs and memory, taken from
#            `slurmd -C`), start munged, slurmctld and slurmd, record their pids and wait until the node
#            accepts jobs; does nothing for a daemon that is already running (idempotent)
#   status   print key=value lines: the partition, the directories, and each daemon's pid (or "none")
#   stop     stop exactly the daemons whose pids `start` recorded, and nothing else
#
# The daemons run in the foreground (-F/-D) in the background of this script, so the recorded pid is the
# daemon's own. There is no slurmdbd: accounting is off, so `sacct` does not work and Snakemake's SLURM
# executor must query job states with `squeue` (MinJobAge keeps finished jobs visible to it for 5 minutes).
#
# Environment:
#   UNDIFFUSE_SLURM_DIR        state, spool, logs and pid files [/var/lib/undiffuse-slurm]
#   UNDIFFUSE_SLURM_PARTITION  name of the one partition [local]
#   UNDIFFUSE_SLURM_TIMEOUT    seconds to wait for the node to become idle [60]

set -euo pipefail

SLURM_DIR=${UNDIFFUSE_SLURM_DIR:-/var/lib/undiffuse-slurm}
PARTITION=${UNDIFFUSE_SLURM_PARTITION:-local}
TIMEOUT=${UNDIFFUSE_SLURM_TIMEOUT:-60}
SLURM_CONF=/etc/slurm/slurm.conf
MARKER="# Written by undiffuse scripts/slurm_cluster.sh"
DAEMONS=(munged slurmctld slurmd)
PID_DIR=$SLURM_DIR/pids
LOG_DIR=$SLURM_DIR/log
MUNGE_SOCKET_DIR=/run/munge

die() {
    echo "slurm_cluster.sh: error: $*" >&2
    exit 1
}

require_root() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and starts system daemons)"
}

# Pid of a daemon we started and that is still alive, or nothing. A recorded pid that now belongs to
# another program (pid reuse after a reboot) does not count.
live_pid() {
    local name=$1 pid_file=$PID_DIR/$1.pid pid
    [[ -f $pid_file ]] || return 0
    pid=$(<"$pid_file")
    if [[ $pid =~ ^[0-9]+$ ]] && is_alive "$pid" && [[ $(</proc/"$pid"/comm) == "$name" ]]; then
        echo "$pid"
    fi
}

# True while the process exists and is not a zombie.
is_alive() {
    local stat
    stat=$(cat /proc/"$1"/stat 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat:0:1} != Z ]]
}

install_packages() {
    local missing=()
    command -v munged >/dev/null || missing+=(munge)
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    if ((${#missing[@]} == 0)); then
        return 0
    fi
    require_root
    command -v apt-get >/dev/null || die "apt-get not found: install munge and slurm-wlm by hand"
    missing=(slurm-wlm munge)
    echo "installing ${missing[*]} with apt-get" >&2
    # The packages' maintainer scripts would start the daemons through invoke-rc.d; we start our own.
    local policy=/usr/sbin/policy-rc.d own_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod +x "$policy"
        own_policy=1
    fi
    local status=0
    {
        apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    } >"${TMPDIR:-/tmp}/undiffuse-slurm-apt.log" 2>&1 || status=$?
    ((own_policy)) && rm -f "$policy"
    if ((status != 0)); then
        tail -n 20 "${TMPDIR:-/tmp}/undiffuse-slurm-apt.log" >&2
        die "apt-get failed (status $status)"
    fi
}

write_config() {
    if [[ -f $SLURM_CONF ]] && ! grep -qF "$MARKER" "$SLURM_CONF"; then
        die "$SLURM_CONF exists and was not written by this script; refusing to replace a real cluster's config"
    fi
    # `slurmd -C` reports this machine's hardware as a NodeName line: CPUs, sockets, cores, threads,
    # RealMemory (MB).
    local node_line host
    node_line=$(slurmd -C | head -n 1)
    [[ $node_line == NodeName=* ]] || die "unexpected output of 'slurmd -C': $node_line"
    host=${node_line%% *}
    host=${host#NodeName=}
    mkdir -p "$SLURM_DIR/state" "$SLURM_DIR/spool" "$PID_DIR" "$LOG_DIR" "$(dirname "$SLURM_CONF")"
    local tmp=$SLURM_CONF.tmp.$$
    cat >"$tmp" <<EOF
$MARKER: a one-node test cluster on localhost.
# Accounting is off (no slurmdbd): query job states with squeue, not sacct.
ClusterName=undiffuse
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$SLURM_DIR/state
SlurmdSpoolDir=$SLURM_DIR/spool
SlurmctldPidFile=$SLURM_DIR/state/slurmctld.pid
SlurmdPidFile=$SLURM_DIR/spool/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
# Snakemake's squeue status queries need finished jobs to stay visible for a while.
MinJobAge=300
SlurmdParameters=config_overrides
$node_line NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$tmp" "$SLURM_CONF"
    echo "$host" >"$SLURM_DIR/node"
}

ensure_munge_key() {
    local key=/etc/munge/munge.key
    if [[ ! -s $key ]]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge "$key"
    chmod 0700 /etc/munge
    chmod 0600 "$key"
}

# Start one daemon in the foreground, in the background of this shell, and record its pid. setsid (which
# execs, as the child is no process-group leader) moves it out of the caller's session, so that signals
# meant for the caller's process group (a test runner's Ctrl-C) do not reach it; only `stop` does.
launch() {
    local name=$1
    shift
    setsid "$@" >>"$LOG_DIR/$name.out" 2>&1 </dev/null &
    echo $! >"$PID_DIR/$name.pid"
    disown $! 2>/dev/null || true
    echo "started $name (pid $!)"
}

start() {
    require_root
    install_packages
    local running=1 name
    for name in "${DAEMONS[@]}"; do
        [[ -n $(live_pid "$name") ]] || running=0
    done
    if ((running)); then
        echo "already running"
        status
        return 0
    fi
    if [[ -z $(live_pid slurmctld) ]] && [[ -z $(live_pid slurmd) ]]; then
        write_config
    fi
    mkdir -p "$PID_DIR" "$LOG_DIR"
    if [[ -z $(live_pid munged) ]]; then
        ensure_munge_key
        install -d -o munge -g munge -m 0755 "$MUNGE_SOCKET_DIR" /var/lib/munge /var/log/munge
        touch "$LOG_DIR/munged.log"
        chown munge:munge "$LOG_DIR/munged.log"
        # setpriv execs munged as the munge user (the owner of the key) without an extra process.
        launch munged setpriv --reuid=munge --regid=munge --init-groups \
            munged --foreground --log-file="$LOG_DIR/munged.log"
        wait_for "munge socket" test -S "$MUNGE_SOCKET_DIR/munge.socket.2"
    fi
    [[ -n $(live_pid slurmctld) ]] || launch slurmctld slurmctld -D
    wait_for "slurmctld" scontrol ping
    [[ -n $(live_pid slurmd) ]] || launch slurmd slurmd -D
    wait_for "the node to be idle" node_idle
    status
}

node_idle() {
    local node state
    node=$(<"$SLURM_DIR/node")
    state=$(sinfo -h -n "$node" -o %T 2>/dev/null) || return 1
    [[ $state == idle* || $state == mixed* || $state == allocated* ]]
}

wait_for() {
    local what=$1 waited=0
    shift
    until "$@" >/dev/null 2>&1; do
        if ((waited >= TIMEOUT * 2)); then
            echo "timed out after ${TIMEOUT}s waiting for $what; last log lines:" >&2
            tail -n 15 "$LOG_DIR"/*.log "$LOG_DIR"/*.out >&2 2>/dev/null || true
            stop >&2
            die "the cluster did not start"
        fi
        sleep 0.5
        waited=$((waited + 1))
    done
}

status() {
    echo "partition=$PARTITION"
    echo "slurm_dir=$SLURM_DIR"
    echo "log_dir=$LOG_DIR"
    echo "slurm_conf=$SLURM_CONF"
    local name pid
    for name in "${DAEMONS[@]}"; do
        pid=$(live_pid "$name")
        echo "$name=${pid:-none}"
    done
}

stop() {
    local name pid waited
    # Stop in the reverse order of starting: slurmd, slurmctld, then munged (both need it to shut down).
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        name=${DAEMONS[i]}
        pid=$(live_pid "$name")
        rm -f "$PID_DIR/$name.pid"
        [[ -n $pid ]] || continue
        kill -TERM "$pid" 2>/dev/null || true
        waited=0
        while is_alive "$pid" && ((waited < 40)); do
            sleep 0.25
            waited=$((waited + 1))
        done
        if is_alive "$pid"; then
            kill -KILL "$pid" 2>/dev/null || true
        fi
        echo "stopped $name (pid $pid)"
    done
}

case ${1:-} in
    install) install_packages ;;
    start) start ;;
    status) status ;;
    stop) stop ;;
    *)
        sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//' >&2
        exit 2
        ;;
esac
