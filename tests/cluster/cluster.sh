#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for tests/cluster/test_slurm.py and for trying
# `snakemake --profile profiles/slurm` without a cluster:
#
#   tests/cluster/cluster.sh start    # idempotent: starts only what is not running
#   tests/cluster/cluster.sh status   # sinfo, or exit 1 when the cluster does not answer
#   tests/cluster/cluster.sh stop     # stops the daemons this script started, nothing else
#
# Needs root and Debian's packages: apt-get install -y slurm-wlm munge
# One node (this host, with the CPUs and memory `slurmd -C` finds, and two pretend GPUs) in one
# partition, `main`.
# No accounting database: `sacct` is answered by slurmctld, which keeps finished jobs for
# MinJobAge (1 hour here), and every finished job is also appended to $STATE/jobcomp.log.
# Writes /etc/slurm/slurm.conf and gres.conf (removed by `stop`); logs and state go to $STATE.
set -euo pipefail

STATE=${IMGEMBED_SLURM_STATE:-/var/tmp/imgembed-slurm}
# Where every Slurm command looks (srun inside a job ignores the submitter's SLURM_CONF). A
# slurm.conf there that this script did not write is never replaced: start then refuses.
CONF=/etc/slurm/slurm.conf
MARK="# Written by tests/cluster/cluster.sh"
PARTITION=main

say() { echo "cluster.sh: $*" >&2; }

running() {  # running PIDFILE: the process it names is alive
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

write_conf() {
    local node
    node=$(slurmd -C | head -n 1)  # NodeName=<host> CPUs=... RealMemory=...
    cat >"$CONF" <<EOF
$MARK: a one-node test cluster.
ClusterName=imgembed-test
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
# No cgroups in containers: track processes through /proc, bind no tasks.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# Cores and memory are consumable, so --cpus-per-task and --mem are enforced at scheduling.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
MinJobAge=3600
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/jobcomp.log
# Two pretend GPUs (see gres.conf): jobs asking --gpus=N are scheduled and recorded as on a GPU
# node, so the profile's GPU requests are checked; the work itself runs on the CPU.
GresTypes=gpu
$node Gres=gpu:2 NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    # Slurm drops GPUs without a device file; these two stand in (nothing opens them).
    printf 'NodeName=%s Name=gpu File=%s\n' "$(hostname -s)" /dev/null "$(hostname -s)" /dev/zero >/etc/slurm/gres.conf
}

start_munge() {
    if [[ -S /run/munge/munge.socket.2 ]] && munge -n </dev/null | unmunge >/dev/null 2>&1; then
        return  # a munged is already serving (ours from an earlier start, or the system's)
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        chown munge:munge /etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged
    cp /run/munge/munged.pid "$STATE/munged.pid"  # started by us: `stop` stops it
}

wait_for_node() {
    local state
    for _ in $(seq 1 60); do
        state=$(sinfo -h -N -o '%T' 2>/dev/null || true)
        case $state in
            idle | mixed | allocated) return 0 ;;  # not idle* (not responding yet)
            drain* | down*) scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true ;;  # left by an unclean stop
        esac
        sleep 0.5
    done
    say "the node did not become idle; see $STATE/slurmctld.log and $STATE/slurmd.log"
    return 1
}

start() {
    for tool in slurmctld slurmd munged sinfo; do
        command -v "$tool" >/dev/null || { say "$tool not found: apt-get install -y slurm-wlm munge"; exit 1; }
    done
    [[ $(id -u) == 0 ]] || { say "needs root (the daemons run as root)"; exit 1; }
    if [[ -e $CONF ]] && ! head -n 1 "$CONF" | grep -qF "$MARK"; then
        say "$CONF exists and was not written by this script: not touching a real cluster's config"
        exit 1
    fi
    mkdir -p "$STATE/ctld" "$STATE/d" /etc/slurm
    if ! running "$STATE/slurmctld.pid" && ! running "$STATE/slurmd.pid"; then
        write_conf  # only while nothing reads it
    fi
    start_munge
    running "$STATE/slurmctld.pid" || slurmctld -f "$CONF"
    running "$STATE/slurmd.pid" || slurmd -f "$CONF"
    wait_for_node
    say "cluster up: partition $PARTITION on $(hostname -s)"
}

stop() {
    for name in slurmd slurmctld munged; do
        if running "$STATE/$name.pid"; then
            kill "$(cat "$STATE/$name.pid")"
            for _ in $(seq 1 40); do running "$STATE/$name.pid" || break; sleep 0.25; done
            say "stopped $name"
        fi
        rm -f "$STATE/$name.pid"
    done
    if [[ -e $CONF ]] && head -n 1 "$CONF" | grep -qF "$MARK"; then
        rm -f "$CONF" /etc/slurm/gres.conf
    fi
}

status() {
    sinfo
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
