#!/usr/bin/env bash
# Start a local SLURM cluster on this machine (munged + slurmctld + slurmd, node "localhost",
# partition "debug"), so the tests can submit the real scripts/train_*.sh with sbatch.
#   bash scripts/slurm/start_local_slurm.sh          # idempotent; prints sinfo when the node is up
#   NODES=2 bash scripts/slurm/start_local_slurm.sh  # nodes node1, node2: one slurmd each, in its own
#                                                    # network namespace (scripts/slurm/local_nodes.sh)
#   bash scripts/slurm/stop_local_slurm.sh [--purge]
# Needs root and, the first time, apt (Debian/Ubuntu: slurmctld slurmd slurm-client munge; iproute2 for
# NODES > 1). Works without systemd. Writes /etc/slurm/slurm.conf; restarts the daemons only when that
# file changes.
# Env: SLURM_START_TIMEOUT, seconds to wait for the nodes to accept jobs (default 60); NODES (default 1;
# at most 8), each node with all of this machine's CPUs and memory. Another NODES restarts the daemons.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
CONF=/etc/slurm/slurm.conf
TIMEOUT=${SLURM_START_TIMEOUT:-60}
NODES=${NODES:-1}

show_logs() {
  sinfo -R >&2 || true
  tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd*.log >&2 2>/dev/null || true
}
trap 'echo "start_local_slurm: failed at line $LINENO" >&2; show_logs' ERR

if [ "$(id -u)" != 0 ]; then
  echo "start_local_slurm: run as root (it installs packages, writes /etc/slurm and starts daemons)" >&2
  exit 1
fi
if ! [[ $NODES =~ ^[1-8]$ ]]; then
  echo "error: NODES=$NODES: give a number of nodes from 1 to 8" >&2
  exit 2
fi

PACKAGES=()
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
    || ! command -v munged >/dev/null; then
  PACKAGES+=(slurmctld slurmd slurm-client munge)
fi
# local_nodes.sh makes the nodes of a multi-node cluster with ip
[ "$NODES" = 1 ] || command -v ip >/dev/null || PACKAGES+=(iproute2)
if [ ${#PACKAGES[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
fi

# The node's hardware as slurmd itself detects it, so RealMemory and CPUs never disagree with it.
HARDWARE=$(slurmd -C | head -n1 | sed 's/^NodeName=[^ ]* //')
if [ "$NODES" = 1 ]; then
  NODE_NAMES=(localhost)
  CONTROLLER=localhost
  NODE_LINES="NodeName=localhost $HARDWARE State=UNKNOWN"
else
  # the addresses of scripts/slurm/local_nodes.sh: the nodes reach slurmctld on the bridge's host end
  mapfile -t NODE_NAMES < <(seq -f 'node%g' "$NODES")
  CONTROLLER="localhost(10.213.0.254)"
  NODE_LINES=$(for i in $(seq "$NODES"); do echo "NodeName=node$i NodeAddr=10.213.0.$i $HARDWARE State=UNKNOWN"; done)
fi
CONFIG=$(cat <<EOF_CONF
# Written by scripts/slurm/start_local_slurm.sh: a $NODES-node cluster for tests.
ClusterName=local
SlurmctldHost=$CONTROLLER
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again only after cred_expire + 1 s (default 121 s): keep requeue tests short.
AuthInfo=cred_expire=10
# Look at pending jobs every 2 s (defaults 60/30 s), so a requeued job restarts once it may.
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# No cgroups, accounting or MPI: nothing here depends on the host's init system or a database.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
# Forget finished jobs after 4 s; at <= 4 s "sbatch --wait" also polls every 2 s instead of backing off.
MinJobAge=4
KillWait=10
ReturnToService=2
MailProg=/bin/true
StateSaveLocation=/var/spool/slurmctld
# %n: the node name, so that several slurmd on this machine keep apart
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
$NODE_LINES
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF_CONF
)

running() {  # running PIDFILE NAME: the pid in the file is alive and is that daemon
  [ -f "$1" ] && [ "$(cat "/proc/$(cat "$1")/comm" 2>/dev/null)" = "$2" ]
}

mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
chown slurm:slurm /var/spool/slurmctld /var/log/slurm
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$CONFIG" ]; then
  # settings such as AuthInfo and the node line are read only at daemon start
  bash "$HERE/stop_local_slurm.sh" >/dev/null
  printf '%s\n' "$CONFIG" > "$CONF"
fi
# slurmctld refuses to start on state saved under another ClusterName (e.g. by another recipe);
# this cluster's job state is disposable
if [ "$(cat /var/spool/slurmctld/clustername 2>/dev/null || echo local)" != local ]; then
  rm -f /var/spool/slurmctld/clustername
fi

if [ ! -s /etc/munge/munge.key ]; then  # the Debian package normally creates it
  install -d -o munge -g munge -m 0700 /etc/munge
  head -c 1024 /dev/urandom > /etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
fi
install -d -o munge -g munge -m 0755 /run/munge
running /run/munge/munged.pid munged || runuser -u munge -- /usr/sbin/munged
[ "$NODES" = 1 ] || bash "$HERE/local_nodes.sh" up "$NODES"
running /run/slurmctld.pid slurmctld || /usr/sbin/slurmctld
for node in "${NODE_NAMES[@]}"; do
  mkdir -p "/var/spool/slurmd/$node"
  if ! running "/run/slurmd-$node.pid" slurmd; then
    if [ "$node" = localhost ]; then /usr/sbin/slurmd -N localhost
    else bash "$HERE/local_nodes.sh" exec "$node" /usr/sbin/slurmd -N "$node"; fi
  fi
done

# A node that was up before a restart comes back DOWN or DRAINED: resume it, then wait for all.
ready() {  # every node accepts jobs
  [ "$(sinfo -h -N -o %t 2>/dev/null | grep -cx 'idle\|mix\|alloc')" = "$NODES" ]
}
deadline=$((SECONDS + TIMEOUT))
until ready; do
  for node in "${NODE_NAMES[@]}"; do
    if sinfo -h -n "$node" -o %t 2>/dev/null | grep -q 'down\|drain'; then
      scontrol update NodeName="$node" State=RESUME 2>/dev/null || true
    fi
  done
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "start_local_slurm: the nodes did not become idle within ${TIMEOUT}s" >&2
    show_logs
    exit 1
  fi
  sleep 0.5
done
sinfo
