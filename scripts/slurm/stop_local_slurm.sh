#!/usr/bin/env bash
# Stop the daemons that scripts/slurm/start_local_slurm.sh started (every slurmd, slurmctld, munged), by
# their pid files only, and remove the nodes' network namespaces (scripts/slurm/local_nodes.sh). Safe when
# nothing runs. Jobs still running keep running (slurmstepd outlives slurmd): scancel them first. Job
# state is kept unless --purge, which also clears the logs.
set -uo pipefail

stop() {  # stop PIDFILE NAME: SIGTERM, up to 15 s to exit, then SIGKILL
  local pid
  [ -f "$1" ] || return 0
  pid=$(cat "$1")
  # a stale pid file may name an unrelated process by now: check the name first
  if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]; then
    kill -TERM "$pid"
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    echo "stopped $2 (pid $pid)"
  fi
  rm -f "$1"
}

# /run/slurmd.pid: a cluster started before slurmd's pid files were named after the node
for pidfile in /run/slurmd.pid /run/slurmd-*.pid; do stop "$pidfile" slurmd & done
wait
stop /run/slurmctld.pid slurmctld
stop /run/munge/munged.pid munged
bash "$(dirname "$0")/local_nodes.sh" down

if [ "${1:-}" = --purge ]; then
  rm -rf /var/spool/slurmctld/* /var/spool/slurmd/* /var/log/slurm/*.log
  echo "purged the job state and logs"
fi
