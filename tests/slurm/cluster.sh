#!/usr/bin/env bash
# A real two-node SLURM cluster on this one machine, for the tests marked `slurm` and for trying
# slurm/train.sbatch by hand. Debian's Slurm 22.05 runs one controller and two slurmd "nodes"
# (n1, n2, 2 CPUs each) as root, without systemd.
#
#   tests/slurm/cluster.sh start    # installs slurm-wlm and munge if missing, starts, waits for idle nodes
#   export SLURM_CONF=${CLIP_PL_SLURM_DIR:-/tmp/clip_pl_slurm}/slurm.conf   # for sbatch, squeue, ...
#   tests/slurm/cluster.sh stop     # cancels its jobs, stops the daemons it started
#
# State, spool and logs live under $CLIP_PL_SLURM_DIR (default /tmp/clip_pl_slurm); `start`
# begins from an empty state (no jobs left over from an earlier run). Exit status: 0 ready,
# 1 failed (the reason is the last line on stderr).
set -euo pipefail

DIR=${CLIP_PL_SLURM_DIR:-/tmp/clip_pl_slurm}
CTLD_PORT=${CLIP_PL_SLURM_PORT:-6817}
export SLURM_CONF=$DIR/slurm.conf

die() { echo "cluster.sh: $*" >&2; exit 1; }

pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

is_up() {
    # Both nodes registered and usable (idle, or running jobs of an earlier `start`).
    # No controller process, no cluster: do not let sinfo wait for one.
    [[ -f $SLURM_CONF ]] && pid_alive "$DIR/slurmctld.pid" || return 1
    local states
    states=$(timeout 10 sinfo -h -N -o '%N %t' 2>/dev/null) || return 1
    [[ $(grep -cE '^n[12] (idle|mix|alloc)$' <<<"$states") == 2 ]]
}

install_slurm() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null && return 0
    [[ $(id -u) == 0 ]] || die "slurm-wlm/munge are not installed and installing them needs root"
    command -v apt-get >/dev/null || die "slurm-wlm/munge are not installed and there is no apt-get"
    echo "cluster.sh: installing slurm-wlm and munge" >&2
    apt-get update -qq >&2 || die "apt-get update failed"
    # The packages try to start their services; without systemd that is refused, which is harmless.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >&2 \
        || die "apt-get install slurm-wlm munge failed"
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0   # a munged is already running (ours from an earlier start, or the system's)
    fi
    [[ -f /etc/munge/munge.key ]] || {
        # The package creates the key on install; recreate it if someone removed it.
        mungekey --create --keyfile=/etc/munge/munge.key && chown munge:munge /etc/munge/munge.key
    }
    mkdir -p /run/munge && chown munge:munge /run/munge
    runuser -u munge -- /usr/sbin/munged || die "munged did not start"
    for _ in $(seq 50); do
        [[ -s /run/munge/munged.pid ]] && break
        sleep 0.1
    done
    # Remember that this script started it, so that `stop` ends it and nothing else.
    cp /run/munge/munged.pid "$DIR/munged.pid"
    munge -n | unmunge >/dev/null || die "munge does not authenticate (munge -n | unmunge fails)"
}

write_conf() {
    local host
    host=$(hostname -s)
    # SlurmctldHost must be this machine's short name; both nodes listen on 127.0.0.1, on their
    # own ports. Requeue is allowed (JobRequeue=1); accounting is off, so use `scontrol show job`.
    cat >"$SLURM_CONF" <<CONF
ClusterName=clippl
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
# After SIGTERM (e.g. the one that follows a requeue) SIGKILL comes this many seconds later; shorter
# than the default 30 s so that the requeue test does not wait long for a rank stuck in a collective.
KillWait=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldPort=$CTLD_PORT
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((CTLD_PORT + 10184)) CPUs=2 RealMemory=4000
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((CTLD_PORT + 10185)) CPUs=2 RealMemory=4000
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
CONF
}

start() {
    if is_up; then
        echo "cluster.sh: already running (SLURM_CONF=$SLURM_CONF)" >&2
        return 0
    fi
    install_slurm
    stop_daemons   # leftovers of a start that did not finish
    if (exec 3<>"/dev/tcp/127.0.0.1/$CTLD_PORT") 2>/dev/null; then
        die "port $CTLD_PORT is taken (a cluster with another CLIP_PL_SLURM_DIR?); stop it or set CLIP_PL_SLURM_PORT"
    fi
    rm -rf "$DIR/state" "$DIR/spool" "$DIR/log"
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    start_munge
    write_conf
    slurmctld -f "$SLURM_CONF" || die "slurmctld did not start: $(tail -n 3 "$DIR/log/slurmctld.log" 2>/dev/null)"
    for node in n1 n2; do
        slurmd -f "$SLURM_CONF" -N "$node" || die "slurmd $node did not start: $(tail -n 3 "$DIR/log/slurmd-$node.log" 2>/dev/null)"
    done
    for _ in $(seq 60); do
        if is_up; then
            echo "cluster.sh: 2 nodes idle; export SLURM_CONF=$SLURM_CONF" >&2
            return 0
        fi
        sleep 1
    done
    die "nodes not idle after 60 s: $(sinfo -h -N -o '%N %t %E' 2>&1 | tr '\n' ' ') $(tail -n 3 "$DIR/log/slurmctld.log" 2>/dev/null)"
}

stop_daemons() {
    # Only what this script started: the daemons named by the pid files under $DIR.
    local pidfiles=("$DIR/slurmctld.pid" "$DIR/slurmd-n1.pid" "$DIR/slurmd-n2.pid")
    if pid_alive "$DIR/slurmctld.pid"; then
        timeout 20 scancel --user="$(id -un)" 2>/dev/null || true
        timeout 20 scontrol shutdown 2>/dev/null || true
    fi
    for _ in $(seq 30); do
        local alive=0
        for f in "${pidfiles[@]}"; do pid_alive "$f" && alive=1; done
        ((alive)) || break
        sleep 0.5
    done
    for f in "${pidfiles[@]}"; do
        if pid_alive "$f"; then kill "$(cat "$f")" 2>/dev/null || true; fi
        rm -f "$f"
    done
}

stop() {
    stop_daemons
    if pid_alive "$DIR/munged.pid"; then
        kill "$(cat "$DIR/munged.pid")" 2>/dev/null || true
    fi
    rm -f "$DIR/munged.pid"
    echo "cluster.sh: stopped" >&2
}

mkdir -p "$DIR"
case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) is_up && echo up || { echo down; exit 1; } ;;
    *) die "usage: $0 start|stop|status" ;;
esac
