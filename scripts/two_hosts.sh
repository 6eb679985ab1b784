#!/usr/bin/env bash
# Two simulated hosts on this machine, for multi-node tests (tests/two_host_test.cpp).
#
#   two_hosts.sh up [--no-names]   create the two hosts (runs `down` first)
#   two_hosts.sh down              remove everything `up` made; safe to repeat
#   two_hosts.sh run [--] ARGS...  mpirun ARGS on host A, able to start ranks on B
#   two_hosts.sh launch [--] CMD...  CMD on host A, where a launcher that calls
#                                  mpirun itself (fabric-run --hosts) reaches B
#   two_hosts.sh exec A|B CMD...   a command on one host
#   two_hosts.sh agent HOST CMD... (what mpirun calls to "log in" to HOST)
#
# Each host is a network namespace (${ID}A, ${ID}B) with its own loopback; a veth
# pair joins them on 10.231.0.0/24 (A is 10.231.0.1, B is 10.231.0.2): the subnet
# exists only inside the two namespaces, nothing is added to this machine's own
# interfaces. Every command runs in its own UTS namespace with hostname hostA or
# hostB. With names, each host's /etc/hosts (/etc/netns/NS/hosts, which
# `ip netns exec` bind-mounts) lists both hosts; with --no-names it lists only the
# host itself, so the names do not resolve across hosts. DNS goes nowhere
# (/etc/netns/NS/resolv.conf points at an unused loopback port).
#
# `run` starts mpirun on host A with an rsh agent (this script) that enters the
# namespace of the host mpirun names (hostB or 10.231.0.2 -> B); Open MPI's own
# traffic is kept on the veth subnet. Pass the hosts as usual, e.g.
#   two_hosts.sh run -H hostA:2,hostB:2 -np 4 PROGRAM   (names need `up` with names)
#   two_hosts.sh run -H 10.231.0.1:1,10.231.0.2:1 -np 2 PROGRAM
#
# Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN), iproute2 and util-linux's unshare.
# Exit status 77 from `up` means this machine does not allow it (the tests skip).
# TWO_HOSTS_ID (default tfh, at most 10 characters) names the namespaces, so
# several test beds can exist at once; `run`, `exec` and `agent` read it too.
set -uo pipefail
export PATH=$PATH:/usr/sbin:/sbin  # ip, for callers with a minimal PATH (bazel test)

ID=${TWO_HOSTS_ID:-tfh}
NS_A=${ID}A
NS_B=${ID}B
VETH_A=${ID}a
VETH_B=${ID}b
SUBNET=10.231.0
ADDR_A=$SUBNET.1
ADDR_B=$SUBNET.2
SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")

die() { echo "two_hosts.sh: $*" >&2; exit 1; }

down() {
  local ns
  for ns in "$NS_A" "$NS_B"; do
    if ip netns list 2>/dev/null | grep -qw "^$ns"; then
      # Processes still inside (a job that was interrupted) would keep it alive.
      local pids
      pids=$(ip netns pids "$ns" 2>/dev/null)
      [ -n "$pids" ] && kill -KILL $pids 2>/dev/null
      ip netns del "$ns" 2>/dev/null
    fi
    rm -rf "/etc/netns/$ns"
  done
  # A veth left in this namespace by an `up` that failed half-way.
  ip link show "$VETH_A" > /dev/null 2>&1 && ip link del "$VETH_A" 2>/dev/null
  ip link show "$VETH_B" > /dev/null 2>&1 && ip link del "$VETH_B" 2>/dev/null
  rmdir /etc/netns 2>/dev/null
  return 0
}

up() {
  local names=1
  [ "${1:-}" = "--no-names" ] && names=0
  [ "${#ID}" -le 10 ] || die "TWO_HOSTS_ID '$ID' is longer than 10 characters"
  if [ "$(id -u)" != 0 ]; then
    echo "two_hosts.sh: needs root (network namespaces), running as uid $(id -u)" >&2
    exit 77
  fi
  for tool in ip unshare mpirun; do
    if ! command -v "$tool" > /dev/null; then
      echo "two_hosts.sh: '$tool' is not installed" >&2
      exit 77
    fi
  done
  down
  local error
  if ! error=$(ip netns add "$NS_A" 2>&1); then
    down
    echo "two_hosts.sh: cannot create a network namespace (ip netns add: $error); needs CAP_SYS_ADMIN" >&2
    exit 77
  fi
  trap 'status=$?; down; die "up failed (status $status) at: $BASH_COMMAND"' ERR
  set -E
  ip netns add "$NS_B"
  ip link add "$VETH_A" type veth peer name "$VETH_B"
  ip link set "$VETH_A" netns "$NS_A"
  ip link set "$VETH_B" netns "$NS_B"
  ip -n "$NS_A" addr add "$ADDR_A/24" dev "$VETH_A"
  ip -n "$NS_B" addr add "$ADDR_B/24" dev "$VETH_B"
  ip -n "$NS_A" link set lo up
  ip -n "$NS_B" link set lo up
  ip -n "$NS_A" link set "$VETH_A" up
  ip -n "$NS_B" link set "$VETH_B" up
  local ns addr name
  for ns in "$NS_A" "$NS_B"; do
    mkdir -p "/etc/netns/$ns"
    if [ "$ns" = "$NS_A" ]; then addr=$ADDR_A name=hostA; else addr=$ADDR_B name=hostB; fi
    {
      echo "127.0.0.1 localhost"
      if [ $names = 1 ]; then
        echo "$ADDR_A hostA"
        echo "$ADDR_B hostB"
      else
        echo "$addr $name"
      fi
    } > "/etc/netns/$ns/hosts"
    printf 'nameserver 127.0.0.1\noptions timeout:1 attempts:1\n' > "/etc/netns/$ns/resolv.conf"
  done
  trap - ERR
  echo "two_hosts.sh: hostA ($NS_A, $ADDR_A) and hostB ($NS_B, $ADDR_B) are up$([ $names = 0 ] && echo ', names not shared')"
}

# Runs CMD... on host A or B (a UTS namespace with that hostname inside the
# network namespace).
on_host() {
  local host=$1
  shift
  local ns name
  case $host in
    A | hostA | "$ADDR_A" | "$NS_A") ns=$NS_A name=hostA ;;
    B | hostB | "$ADDR_B" | "$NS_B") ns=$NS_B name=hostB ;;
    *) die "unknown host '$host' (hostA, hostB, $ADDR_A, $ADDR_B)" ;;
  esac
  exec ip netns exec "$ns" unshare -u sh -c "hostname $name && exec \"\$@\"" sh "$@"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case $cmd in
  up) up "$@" ;;
  down) down ;;
  exec)
    [ $# -ge 2 ] || die "usage: two_hosts.sh exec A|B CMD..."
    on_host "$@"
    ;;
  agent)
    # mpirun calls `AGENT HOST CMD...` with CMD one shell command line (as ssh).
    [ $# -ge 2 ] || die "usage: two_hosts.sh agent HOST CMD..."
    host=$1
    shift
    on_host "$host" sh -c "$*"
    ;;
  launch)
    # The settings `run` passes as flags, as the variables Open MPI reads instead.
    [ "${1:-}" = "--" ] && shift
    [ $# -ge 1 ] || die "usage: two_hosts.sh launch [--] CMD..."
    export TWO_HOSTS_ID=$ID OMPI_MCA_plm_rsh_agent="$SELF agent"
    export OMPI_MCA_oob_tcp_if_include=$SUBNET.0/24 OMPI_MCA_btl_tcp_if_include=$SUBNET.0/24
    on_host A "$@"
    ;;
  run)
    [ "${1:-}" = "--" ] && shift
    export TWO_HOSTS_ID=$ID
    flags=(--mca plm_rsh_agent "$SELF agent"
      --mca oob_tcp_if_include "$SUBNET.0/24" --mca btl_tcp_if_include "$SUBNET.0/24"
      --bind-to none)
    [ "$(id -u)" = 0 ] && flags+=(--allow-run-as-root)
    on_host A mpirun "${flags[@]}" "$@"
    ;;
  *)
    sed -n '2,/^set -uo/p' "$SELF" | sed '$d' | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
