#!/usr/bin/env bash
# The identities of a multi-node local SLURM cluster on one machine: one network namespace per node
# (slurm-node1, slurm-node2, ...), each with its own address on a private bridge, so that one slurmd per
# node can listen on the same port and a job's processes on different "nodes" reach each other only
# through the network, as on a real cluster. Used by start_local_slurm.sh and stop_local_slurm.sh.
#   bash scripts/slurm/local_nodes.sh up N      # idempotent; prints nothing
#   bash scripts/slurm/local_nodes.sh exec node1 CMD...   # CMD as a process of node1 (hostname node1)
#   bash scripts/slurm/local_nodes.sh down      # removes every namespace, link and file that `up` made
# The addresses exist only on this machine: 10.213.0.254 on the host end of the bridge (slurmctld), and
# 10.213.0.I in namespace slurm-nodeI, which has no route elsewhere. A process of node I sees the hostname
# nodeI and an /etc/hosts naming every node, so torchrun and gloo pick the node's own address, as on a
# real node.
set -euo pipefail

NET=10.213.0
BRIDGE=slurmbr0

up() {
  local n=$1 i ns hosts
  ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
  # tests of command output, not `| grep -q`: under pipefail grep's early exit can fail the pipe
  [[ $(ip -4 addr show dev "$BRIDGE") == *"inet $NET.254/"* ]] || ip addr add "$NET.254/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  hosts=$(printf '127.0.0.1 localhost\n'; for i in $(seq "$n"); do printf '%s.%s node%s\n' "$NET" "$i" "$i"; done)
  for i in $(seq "$n"); do
    ns=slurm-node$i
    if [ ! -e "/run/netns/$ns" ]; then
      ip netns add "$ns"
      # host end named after the node, node end eth0 inside the namespace
      ip link add "$ns" type veth peer name eth0 netns "$ns"
      ip link set "$ns" master "$BRIDGE" up
      ip -n "$ns" addr add "$NET.$i/24" dev eth0
      ip -n "$ns" link set eth0 up
      ip -n "$ns" link set lo up
    fi
    mkdir -p "/etc/netns/$ns"
    printf '%s\n' "$hosts" > "/etc/netns/$ns/hosts"
  done
}

run_on() {  # run_on NODE CMD...: in the node's network namespace, with its hostname and /etc/hosts
  local node=$1
  shift
  # not `ip netns exec`: it remounts /sys, which hides /sys/fs/cgroup, and slurmd then refuses to start
  # shellcheck disable=SC2016  # expanded by the inner sh
  exec nsenter --net="/run/netns/slurm-$node" unshare --mount --uts --propagation slave \
    sh -c 'mount --bind "/etc/netns/slurm-$0/hosts" /etc/hosts && hostname "$0" && exec "$@"' "$node" "$@"
}

down() {
  local ns
  for ns in /run/netns/slurm-node*; do
    [ -e "$ns" ] && ip netns del "${ns##*/}"  # also deletes its veth pair and unmounts /run/netns/NAME
  done
  rm -rf /etc/netns/slurm-node*
  if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link del "$BRIDGE"; fi
  # the first `ip netns add` makes /run/netns a mount point; undo that once no namespace is left in it
  if [ -d /run/netns ] && [ -z "$(ls -A /run/netns)" ]; then
    umount /run/netns 2>/dev/null || true
    rmdir /run/netns
  fi
  rmdir /etc/netns 2>/dev/null || true
}

case "${1:-}" in
  up) up "${2:?usage: local_nodes.sh up N}" ;;
  exec) shift; run_on "${1:?usage: local_nodes.sh exec NODE CMD...}" "${@:2}" ;;
  down) down ;;
  *) echo "usage: local_nodes.sh up N | exec NODE CMD... | down" >&2; exit 2 ;;
esac
