#!/usr/bin/env bash
# lab.sh — a keel failover lab in network namespaces on one machine (needs root and iproute2).
#
#   deploy/lab.sh up [N]   build it: N keel node namespaces (default 3, at most 9)
#   deploy/lab.sh status   what exists, and which node holds the VIP
#   deploy/lab.sh down     remove everything `up` made; idempotent, also after a failed `up`
#
# Layout (all addresses private, all inside namespaces this script creates):
#
#   keel-sw      bridge keelbr0, one port per namespace below
#   keel-n1..N   eth0 10.77.0.1X/24 (n1 = .11)   keel nodes; the VIP 10.77.0.100 moves between them
#   keel-b1..3   eth0 10.77.0.10X/24 (b1 = .101) backends: HTTP on :8080 answering "backend bX"
#   keel-client  eth0 10.77.0.200/24             curl the VIP from here
#
# Try:  ip netns exec keel-client curl -s http://10.77.0.101:8080/
#       ip netns exec keel-n1 target/debug/examples/vipctl claim eth0 10.77.0.100
#       ip netns exec keel-client curl -s --max-time 1 http://10.77.0.100:8080/   (through the VIP)
#       ip netns exec keel-n1 target/debug/keel cluster status --admin 10.77.0.11:9090 --token "$(cat /run/keel-lab/token)"
set -euo pipefail

PREFIX=keel
SW=$PREFIX-sw
BRIDGE=keelbr0
SUBNET=10.77.0
VIP=$SUBNET.100
CLIENT=$PREFIX-client
BACKENDS=3
BACKEND_PORT=8080
STATE_DIR=${KEEL_LAB_DIR:-/run/keel-lab}
READY_DEADLINE_S=5

say() { printf 'lab: %s\n' "$*"; }
die() { printf 'lab: error: %s\n' "$*" >&2; exit 1; }

# Every namespace this script may have made, whatever N was: keel-sw, keel-client, keel-nK, keel-bK.
lab_namespaces() {
  ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$PREFIX-(sw|client|n[0-9]+|b[0-9]+)$" || true
}

# Creates namespace $1 with eth0 (address $2/24) plugged into the bridge as port $3.
plug() {
  local ns=$1 addr=$2 port=$3
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  ip -n "$ns" link add eth0 type veth peer name "$port" netns "$SW"
  ip -n "$SW" link set "$port" master "$BRIDGE" up
  ip -n "$ns" link set eth0 up
  ip -n "$ns" addr add "$addr/24" dev eth0
}

start_backend() {
  local i=$1 ns=$PREFIX-b$1 addr=$SUBNET.$((100 + $1))
  local dir=$STATE_DIR/b$i
  mkdir -p "$dir/www"
  printf 'backend b%s (%s)\n' "$i" "$addr" >"$dir/www/index.html"
  ip netns exec "$ns" "$PYTHON" -m http.server "$BACKEND_PORT" --bind "$addr" --directory "$dir/www" \
    >"$dir/http.log" 2>&1 &
  echo $! >"$dir/pid"
}

wait_backend() {
  local i=$1 addr=$SUBNET.$((100 + $1)) tries=$((READY_DEADLINE_S * 10))
  while ((tries-- > 0)); do
    if ip netns exec "$CLIENT" bash -c "exec 3<>/dev/tcp/$addr/$BACKEND_PORT" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  die "backend b$i did not listen on $addr:$BACKEND_PORT within ${READY_DEADLINE_S}s (see $STATE_DIR/b$i/http.log)"
}

# ---------------------------------------------------------------------------------------------
# start_nodes N: one `keel run` per node namespace, then `keel cluster init` on n1 and
# `keel cluster join` for the others. Each node's config is written to $STATE_DIR/nK/keel.toml
# (see deploy/lab/node.toml.example for the shape): raft on 10.77.0.1K:7000, admin on
# 10.77.0.1K:9090 with the token in $STATE_DIR/token, listener web on 0.0.0.0:8080, VIP
# 10.77.0.100 on eth0, backends 10.77.0.101-103:8080. Skipped (with a message) when keel is not
# built; set KEEL_BIN to use another binary. `down` kills every process left in the namespaces.
# ---------------------------------------------------------------------------------------------
KEEL=${KEEL_BIN:-$(cd "$(dirname "$0")/.." && pwd)/target/debug/keel}
ADMIN_PORT=9090
RAFT_PORT=7000

node_config() {
  local k=$1 addr=$SUBNET.$((10 + $1)) dir=$STATE_DIR/n$1 b
  mkdir -p "$dir/data"
  {
    printf '[node]\nadmin = "%s:%s"\nadmin_token_file = "%s"\ndrain_timeout = "2s"\nworkers = 2\n\n' \
      "$addr" "$ADMIN_PORT" "$STATE_DIR/token"
    printf '[cluster]\nnode_id = %s\nraft = "%s:%s"\ndata_dir = "%s"\n\n' "$k" "$addr" "$RAFT_PORT" "$dir/data"
    printf '[vip]\naddress = "%s"\ninterface = "eth0"\n\n' "$VIP"
    printf '[listeners.web]\nbind = "0.0.0.0:%s"\ndefault_pool = "app"\n\n' "$BACKEND_PORT"
    printf '[pools.app]\nalgorithm = "round_robin"\nconnect_timeout = "200ms"\n\n'
    printf '[pools.app.health]\ntype = "http"\npath = "/"\ninterval = "500ms"\ntimeout = "200ms"\n'
    for ((b = 1; b <= BACKENDS; b++)); do
      printf '\n[[pools.app.servers]]\nname = "b%s"\naddress = "%s.%s:%s"\n' "$b" "$SUBNET" $((100 + b)) "$BACKEND_PORT"
    done
  } >"$dir/keel.toml"
}

wait_admin() {
  local k=$1 tries=$((READY_DEADLINE_S * 10 * 4))
  while ((tries-- > 0)); do
    if ip netns exec "$PREFIX-n$k" bash -c "exec 3<>/dev/tcp/$SUBNET.$((10 + k))/$ADMIN_PORT" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  die "keel node n$k did not open its admin API within $((READY_DEADLINE_S * 4))s (see $STATE_DIR/n$k/keel.log)"
}

start_nodes() {
  local n=$1 k
  if [[ ! -x $KEEL ]]; then
    say "keel is not built ($KEEL): $n node namespaces are ready, no node started (cargo build -p keel-node)"
    return 0
  fi
  printf 'lab-token-%s\n' "$(od -An -N8 -tx8 /dev/urandom | tr -d ' ')" >"$STATE_DIR/token"
  chmod 600 "$STATE_DIR/token"
  for ((k = 1; k <= n; k++)); do
    node_config "$k"
    ip netns exec "$PREFIX-n$k" "$KEEL" run --config "$STATE_DIR/n$k/keel.toml" >"$STATE_DIR/n$k/keel.log" 2>&1 &
    echo $! >"$STATE_DIR/n$k/pid"
  done
  for ((k = 1; k <= n; k++)); do wait_admin "$k"; done
  ip netns exec "$PREFIX-n1" timeout 30 "$KEEL" cluster init --config "$STATE_DIR/n1/keel.toml" | sed 's/^/lab: /'
  for ((k = 2; k <= n; k++)); do
    ip netns exec "$PREFIX-n$k" timeout 60 "$KEEL" cluster join --via "$SUBNET.11:$ADMIN_PORT" \
      --config "$STATE_DIR/n$k/keel.toml" | sed 's/^/lab: /'
  done
  say "keel nodes started; admin token in $STATE_DIR/token, logs in $STATE_DIR/nK/keel.log"
}

up() {
  local n=${1:-3}
  [[ $n =~ ^[1-9]$ ]] || die "N must be 1-9 (node addresses are $SUBNET.1N), got '$n'"
  [[ $(id -u) == 0 ]] || die "must run as root (network namespaces)"
  command -v ip >/dev/null || die "iproute2 (ip) is not installed"
  PYTHON=$(command -v python3) || die "python3 is needed for the demo backends (python3 -m http.server)"
  if [[ -n $(lab_namespaces) ]]; then
    say "leftovers from an earlier lab found; removing them first"
    down
  fi
  trap 'say "up failed; cleaning up"; down' ERR
  mkdir -p "$STATE_DIR"

  ip netns add "$SW"
  ip -n "$SW" link set lo up
  ip -n "$SW" link add "$BRIDGE" type bridge
  ip -n "$SW" link set "$BRIDGE" up

  local k
  for ((k = 1; k <= n; k++)); do
    plug "$PREFIX-n$k" "$SUBNET.$((10 + k))" "n$k"
    # Never use the VIP as the sender of our own ARP requests (see vrrp/LIFECYCLE.md).
    ip netns exec "$PREFIX-n$k" sysctl -qw net.ipv4.conf.all.arp_announce=2
  done
  plug "$CLIENT" "$SUBNET.200" client
  for ((k = 1; k <= BACKENDS; k++)); do
    plug "$PREFIX-b$k" "$SUBNET.$((100 + k))" "b$k"
    start_backend "$k"
  done
  for ((k = 1; k <= BACKENDS; k++)); do wait_backend "$k"; done
  echo "$n" >"$STATE_DIR/nodes"
  start_nodes "$n"
  trap - ERR

  say "built in namespaces (bridge $BRIDGE in $SW):"
  for ((k = 1; k <= n; k++)); do say "  $PREFIX-n$k      eth0 $SUBNET.$((10 + k))/24   keel node"; done
  for ((k = 1; k <= BACKENDS; k++)); do
    say "  $PREFIX-b$k      eth0 $SUBNET.$((100 + k))/24  http://$SUBNET.$((100 + k)):$BACKEND_PORT/"
  done
  say "  $CLIENT  eth0 $SUBNET.200/24  client"
  say "VIP $VIP (claimed by whichever keel node leads)"
  say "try: ip netns exec $CLIENT curl -s http://$SUBNET.101:$BACKEND_PORT/"
}

status() {
  local namespaces ns
  namespaces=$(lab_namespaces)
  if [[ -z $namespaces ]]; then say "no lab"; return 0; fi
  for ns in $namespaces; do
    local addrs
    addrs=$(ip -n "$ns" -o -4 addr show dev eth0 2>/dev/null | awk '{print $4}' | paste -sd' ' || true)
    printf 'lab: %-12s %-30s pids: %s\n' "$ns" "${addrs:-(bridge)}" "$(ip netns pids "$ns" | paste -sd' ')"
  done
  local holders
  holders=$(for ns in $namespaces; do
    ip -n "$ns" -o -4 addr show 2>/dev/null | grep -q " $VIP/" && echo "$ns"
  done | paste -sd' ' || true)
  say "VIP $VIP held by: ${holders:-nobody}"
}

down() {
  local ns pid
  for ns in $(lab_namespaces); do
    # A namespace lives on while processes are in it: end ours (backends, later keel nodes) first.
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill "$pid" 2>/dev/null || true; done
  done
  sleep 0.2
  for ns in $(lab_namespaces); do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
  rm -rf "$STATE_DIR"
  say "down: no lab namespaces left"
}

case ${1:-} in
  up) up "${2:-3}" ;;
  down) [[ $(id -u) == 0 ]] || die "must run as root"; down ;;
  status) status ;;
  *) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
