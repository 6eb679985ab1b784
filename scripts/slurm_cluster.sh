#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the SLURM tests (tests/slurm_test.cpp).
#
#   slurm_cluster.sh up DIR      start munged, slurmctld and slurmd, configured in DIR
#   slurm_cluster.sh up DIR --two-hosts
#                                two nodes instead, one slurmd in each simulated host
#                                of scripts/two_hosts.sh (which must be `up`): tfnode1
#                                on hostA (10.231.0.1, with slurmctld), tfnode2 on hostB
#                                (10.231.0.2); clients then run on hostA
#                                (two_hosts.sh exec A srun ...)
#   slurm_cluster.sh down DIR    stop them (by the process ids in DIR); safe to repeat
#   slurm_cluster.sh env DIR     print the variables a client needs (SLURM_CONF=...)
#
# Everything lives in DIR: the munge key and socket, slurm.conf, the controller's
# state, slurmd's spool, the logs and the pid files. Nothing is read from or
# written to /etc: clients find the cluster through SLURM_CONF=DIR/slurm.conf, and
# the munge socket is named in slurm.conf (AuthInfo=socket=...). The ports are
# free ones chosen at `up`, so that two clusters (two test runs) can exist at once.
#
# The node, "tfnode1", has NodeAddr 127.0.0.1: its name does not resolve, as on
# clusters whose node names are not host names, so nothing may depend on it.
# It declares 8 CPUs whatever the machine has (SlurmdParameters=config_overrides)
# and the partition oversubscribes, so a 2-core machine runs 4-rank steps.
# MpiDefault=none, as on clusters that do not set it: `srun --mpi=pmix` asks for PMIx.
#
# Needs Debian's slurmd, slurmctld, slurm-client, munge and the mpi/pmix plugin
# (slurm-wlm-basic-plugins), and root (slurmd starts tasks as any user). Exit
# status 77 from `up` means this machine cannot run it (the tests skip, with the
# reason printed).
set -uo pipefail
export PATH=$PATH:/usr/sbin:/sbin

die() { echo "slurm_cluster.sh: $*" >&2; exit 1; }
skip() { echo "slurm_cluster.sh: $*" >&2; exit 77; }

cmd=${1:-}
dir=${2:-}
two_hosts=""
if [ "${3:-}" = "--two-hosts" ]; then
  two_hosts=${TWO_HOSTS_SH:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/two_hosts.sh}
  [ -x "$two_hosts" ] || die "--two-hosts needs scripts/two_hosts.sh beside this script (or TWO_HOSTS_SH)"
fi
# A daemon on a node: in its simulated host with --two-hosts, else here. `ip netns
# exec` gives the host a fresh /sys without cgroups, which slurmd needs: the
# machine's cgroup mounts are made again there (same types and options). Each
# runs in its own mount namespace (ip netns exec's).
on_node() {
  local node=$1
  shift
  if [ -n "$two_hosts" ]; then
    local mounts
    mounts=$(awk '$2 ~ "^/sys/fs/cgroup" && ($3 == "cgroup" || $3 == "cgroup2" || $3 == "tmpfs") {print $3, $2, $4}' /proc/mounts)
    "$two_hosts" exec "$([ "$node" = tfnode1 ] && echo A || echo B)" sh -c '
      printf "%s\n" "$1" | while read -r type path options; do
        [ -n "$type" ] || continue
        mkdir -p "$path" 2> /dev/null
        mount -t "$type" -o "$options" "$type" "$path" 2> /dev/null
      done
      # Both hosts share the file system: each node gets its own PMIx client
      # folder (the plugin names them by job and step only).
      mkdir -p "$2.$3" && mount --bind "$2.$3" "$2"
      shift 3
      exec "$@"' sh "$mounts" "$dir/pmix" "$node" "$@"
  else
    "$@"
  fi
}
[ -n "$cmd" ] && [ -n "$dir" ] || die "usage: slurm_cluster.sh up|down|env DIR"

free_port() {  # a port in 17000-19999 nobody listens on
  local port
  for _ in $(seq 1 200); do
    port=$((17000 + RANDOM % 3000))
    if ! ss -Htln "sport = :$port" 2>/dev/null | grep -q .; then echo "$port"; return; fi
  done
  die "no free port in 17000-19999"
}

stop_pid_file() {
  local file=$1 pid
  [ -f "$file" ] || return 0
  pid=$(cat "$file" 2>/dev/null)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
  fi
  rm -f "$file"
}

down() {
  [ -d "$dir" ] || return 0
  # Jobs still running (a test that failed half-way) are cancelled first, then
  # whatever is left of their steps: the tasks (their environment names this
  # cluster's SLURM_CONF) and the slurmstepd above them.
  local conf=$dir/slurm.conf pid
  if [ -f "$conf" ] && [ -f "$dir/slurmctld.pid" ]; then
    local jobs
    jobs=$(SLURM_CONF=$conf timeout 10 squeue -h -o %i 2>/dev/null)
    if [ -n "$jobs" ]; then
      SLURM_CONF=$conf timeout 10 scancel $jobs 2>/dev/null
      for _ in $(seq 1 50); do
        [ -z "$(SLURM_CONF=$conf timeout 10 squeue -h -o %i 2>/dev/null)" ] && break
        sleep 0.2
      done
    fi
  fi
  # (a job's processes have SLURM_JOB_ID; the caller of this script does not)
  for pid in $(grep -lsa "SLURM_CONF=$conf" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3); do
    tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep -q '^SLURM_JOB_ID=' && kill -KILL "$pid" 2>/dev/null
  done
  local file
  for file in "$dir"/slurmd.*.pid; do stop_pid_file "$file"; done
  stop_pid_file "$dir/slurmctld.pid"
  stop_pid_file "$dir/munged.pid"
  # slurmstepd processes left without their slurmd (their parent is init)
  for pid in $(pgrep -x slurmstepd 2>/dev/null); do
    [ "$(ps -o ppid= -p "$pid" 2>/dev/null | tr -d ' ')" = 1 ] && kill -KILL "$pid" 2>/dev/null
  done
  return 0
}

up() {
  [ "$(id -u)" -eq 0 ] || skip "needs root (slurmd starts the tasks), running as uid $(id -u)"
  local bin
  for bin in munged slurmctld slurmd srun sbatch scancel; do
    command -v "$bin" > /dev/null 2>&1 || skip "$bin is not installed (scripts/setup.sh installs slurmd, slurmctld, slurm-client and munge)"
  done
  local plugins
  plugins=$(dirname "$(dpkg -L slurm-wlm-basic-plugins 2>/dev/null | grep '/mpi_pmix.so$' | head -1)" 2>/dev/null)
  [ -n "$plugins" ] && [ -f "$plugins/mpi_pmix.so" ] || skip "SLURM's mpi/pmix plugin is not installed (slurm-wlm-basic-plugins)"
  down
  rm -rf "$dir" && mkdir -p "$dir"/{state,spool,log} || die "cannot create $dir"
  dir=$(cd "$dir" && pwd)
  head -c 1024 /dev/urandom > "$dir/munge.key" && chmod 400 "$dir/munge.key"
  munged --key-file="$dir/munge.key" --socket="$dir/munge.sock" --pid-file="$dir/munged.pid" \
         --log-file="$dir/log/munged.log" --seed-file="$dir/munge.seed" --force \
    > "$dir/log/munged.out" 2>&1 || skip "munged did not start: $(tail -3 "$dir/log/munged.out" "$dir/log/munged.log" 2>/dev/null)"
  local host ctld_port slurmd_port ctld_addr=127.0.0.1 nodes
  host=$(hostname -s)
  if [ -n "$two_hosts" ]; then
    "$two_hosts" exec A true 2> /dev/null || die "--two-hosts: the simulated hosts are not up (two_hosts.sh up)"
    host=hostA ctld_addr=10.231.0.1
    nodes="NodeName=tfnode1 NodeAddr=10.231.0.1 NodeHostname=hostA CPUs=8 State=UNKNOWN
NodeName=tfnode2 NodeAddr=10.231.0.2 NodeHostname=hostB CPUs=8 State=UNKNOWN"
  else
    nodes="NodeName=tfnode1 NodeAddr=127.0.0.1 NodeHostname=$host CPUs=8 State=UNKNOWN"
  fi
  ctld_port=$(free_port)
  slurmd_port=$(free_port)
  [ "$ctld_port" != "$slurmd_port" ] || slurmd_port=$((ctld_port + 1))
  cat > "$dir/slurm.conf" <<EOF
# Written by scripts/slurm_cluster.sh for a test cluster; removed with its folder.
ClusterName=torchfabric
# Job ids differ from the last cluster's: SLURM's PMIx plugin names per-step
# folders by job id, and a killed step's folder would refuse the next same id.
FirstJobId=$(( ($(date +%s) % 60000) * 1000 + 1 ))
SlurmctldHost=$host($ctld_addr)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge.sock
CredType=cred/munge
PluginDir=$plugins
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
$nodes
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
  # mpi.conf, beside slurm.conf: the PMIx plugin's client folders go in DIR too.
  mkdir -p "$dir/pmix"
  echo "PMIxCliTmpDirBase=$dir/pmix" > "$dir/mpi.conf"
  on_node tfnode1 slurmctld -f "$dir/slurm.conf" > "$dir/log/slurmctld.out" 2>&1 ||
    { local why; why=$(tail -3 "$dir/log/slurmctld.out" "$dir/log/slurmctld.log" 2>/dev/null); down; skip "slurmctld did not start: $why"; }
  local node
  for node in $(sed -n 's/^NodeName=\([^ ]*\).*/\1/p' "$dir/slurm.conf"); do
    mkdir -p "$dir/spool/$node"
    on_node "$node" slurmd -f "$dir/slurm.conf" -N "$node" > "$dir/log/slurmd.$node.out" 2>&1 ||
      { local why; why=$(tail -3 "$dir/log/slurmd.$node.out" "$dir/log/slurmd.$node.log" 2>/dev/null); down; skip "slurmd ($node) did not start: $why"; }
  done
  # Ready when every node is idle.
  local count
  count=$(grep -c '^NodeName=' "$dir/slurm.conf")
  for _ in $(seq 1 100); do
    if [ "$(on_node tfnode1 env SLURM_CONF="$dir/slurm.conf" sinfo -h -N -o %t 2>/dev/null | grep -c '^idle')" = "$count" ]; then
      echo "SLURM_CONF=$dir/slurm.conf"
      return 0
    fi
    sleep 0.2
  done
  local why
  why=$(on_node tfnode1 env SLURM_CONF="$dir/slurm.conf" sinfo -h -N -o '%N %t %E' 2>&1; tail -3 "$dir"/log/*.log)
  down
  skip "the nodes did not become idle within 20 s: $why"
}

case "$cmd" in
  up) up ;;
  down) down ;;
  env) echo "SLURM_CONF=$(cd "$dir" && pwd)/slurm.conf" ;;
  *) die "unknown command '$cmd' (valid: up, down, env)" ;;
esac
