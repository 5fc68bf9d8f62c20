#!/usr/bin/env bash
# A one-node SLURM on this machine for tests/test_slurm.py: installs Debian's slurmctld, slurmd,
# slurm-client and munge if missing, writes /etc/slurm/slurm.conf, starts munged, slurmctld and
# slurmd unless they run, and waits until the node takes jobs. Idempotent; run as root.
#
# No cgroups here (a container), hence ProctrackType=proctrack/linuxproc (the step's processes
# are found through their parents) and TaskPlugin=task/none.
set -euo pipefail

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
        || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurmctld slurmd slurm-client munge
fi

node=$(slurmd -C | head -n 1)   # NodeName=... CPUs=... RealMemory=..., as slurmd detects them
host=$(hostname -s)
mkdir -p /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm /run/munge
chown munge:munge /run/munge
config=$(cat <<CONF
# Written by tests/slurm/start_slurm.sh: one node, jobs run as the submitting user.
ClusterName=densenet-test
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
KillWait=30
$node
PartitionName=test Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
)
if [ ! -f /etc/slurm/slurm.conf ] || [ "$(cat /etc/slurm/slurm.conf)" != "$config" ]; then
    printf '%s\n' "$config" > /etc/slurm/slurm.conf
    changed=1
fi

if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
fi
if ! scontrol ping 2>/dev/null | grep -q "is UP"; then
    /usr/sbin/slurmctld
elif [ -n "${changed:-}" ]; then
    scontrol reconfigure
fi
if ! [ -f /run/slurmd.pid ] || ! kill -0 "$(cat /run/slurmd.pid)" 2>/dev/null; then
    /usr/sbin/slurmd
fi

for _ in $(seq 120); do
    state=$(sinfo -h -n "$host" -o %T 2>/dev/null || true)
    case "$state" in
        idle*|mixed*|allocated*|completing*) echo "slurm: node $host is $state"; exit 0 ;;
        down*|drain*) scontrol update nodename="$host" state=resume 2>/dev/null || true ;;
    esac
    sleep 1
done
echo "slurm: node $host did not become ready (state: ${state:-unknown}); see /var/log/slurm" >&2
exit 1
