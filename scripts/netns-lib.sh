# shellcheck shell=bash disable=SC2034  # NL_* variables are this library's outputs
# Network-namespace helpers for wgmesh's data-plane tests and benchmarks.
# Sourced, not run:   source scripts/netns-lib.sh
#
# A two-node topology: namespaces A and B joined by a veth pair (MTU 1500) with
# underlay addresses from TEST-NET-1 (192.0.2.0/24) or fd00:99::/64, and one
# userspace WireGuard device per node (tunnel MTU 1420 = 1500 - 80, the IPv6
# worst case) with tunnel addresses 10.99.0.1|2/24 and fd99::1|2/64.
#
# Implementations (argument IMPL):
#   wgmesh        $WGMESH_BIN dataplane --interface NAME  (default target/release/wgmesh)
#   wireguard-go  WG_PROCESS_FOREGROUND=1 wireguard-go -f NAME
#   boringtun     boringtun-cli --foreground --disable-drop-privileges --threads N NAME
#   wireguard-go-new  the same as wireguard-go, with $NL_WGGO_NEW_BIN (a current
#                 wireguard-go with TUN/UDP offloads; common.sh's
#                 ensure_wireguard_go_new builds it)
#   gotatun       $NL_GOTATUN_BIN --foreground --disable-drop-privileges NAME
#                 (default: gotatun on PATH or in cargo's bin dir)
# All of them serve the WireGuard UAPI on /var/run/wireguard/NAME.sock. That
# directory is shared by every network namespace, so tunnel interface names are
# unique per node and per run.
#
# Hygiene (shared/DESIGN.md, "Network-namespace hygiene"): everything is named
# from a per-run prefix holding the caller's PID — namespaces wgnl-<pid>-<n>-a|b,
# interfaces wb<hexpid>x<n>a|b (tunnel) and wb<hexpid>x<n>va|vb (veth, created
# directly inside the namespaces, so nothing is left in the root namespace).
# nl_teardown kills every process started here and deletes every namespace; it
# is idempotent and installed on EXIT/INT/TERM by nl_trap. A guardian process
# (nl_guard) outside the caller's process group reaps the run if the caller dies
# without cleaning up (SIGKILL), and nl_init reaps leftovers of dead runs.
# tests/netns_interop.rs uses the same scheme with the "wgrt-"/"wr" prefixes and
# this file's nl_guard.
#
# Typical use:
#   source scripts/netns-lib.sh
#   nl_init; nl_trap
#   nl_tunnel wgmesh boringtun v6 || exit 1     # sets NL_NS_A, NL_IF_A, ...
#   nl_exec "$NL_NS_A" ping -c 3 "$NL_TUN4_B"
#   nl_pair_down                                  # or let the trap do it

NL_LIB_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NL_ROOT="$(cd "$NL_LIB_DIR/.." && pwd)"

: "${WGMESH_BIN:=$NL_ROOT/target/release/wgmesh}"
: "${NL_UAPI_DIR:=/var/run/wireguard}"   # where wg(8) looks; fixed for wireguard-go and boringtun
: "${NL_UNDERLAY_MTU:=1500}"
: "${NL_TUN_MTU:=$((NL_UNDERLAY_MTU - 80))}"
: "${NL_PORT:=51820}"
: "${NL_START_TIMEOUT:=10}"             # seconds to wait for a UAPI socket
: "${NL_BORINGTUN_THREADS:=1}"
: "${NL_VERBOSE_DAEMONS:=1}"            # 1: daemons log at debug/verbose level; 0: errors only
: "${NL_WGGO_NEW_BIN:=}"                 # wireguard-go-new: path of the current wireguard-go
: "${NL_GOTATUN_BIN:=}"                  # gotatun: path of the binary (default: PATH, cargo's bin)

NL_TUN4_A=10.99.0.1 NL_TUN4_B=10.99.0.2 NL_TUN4_PLEN=24
NL_TUN6_A=fd99::1 NL_TUN6_B=fd99::2 NL_TUN6_PLEN=64

NL_RUN_PID=""        # set by nl_init
NL_DIR=""            # scratch dir of this run: keys, logs
NL_SEQ=0             # topology counter
NL_NAMESPACES=()     # every namespace this run created (still existing or not)
NL_PIDS=()           # every background process this run started
NL_PAIR_PIDS=()      # processes of the current pair only
NL_GUARD_PID=""

nl_log() { printf '[netns] %s\n' "$*" >&2; }
nl_err() { printf '\n[netns] ERROR: %s\n' "$*" >&2; }

# nl_init: per-run prefix and scratch dir; reaps leftovers of dead runs; starts
# the guardian. Idempotent.
nl_init() {
    [[ -n $NL_RUN_PID ]] && return 0
    if [[ $(id -u) -ne 0 ]]; then
        nl_err "network namespaces need root"
        return 1
    fi
    NL_RUN_PID=$$
    NL_HEX=$(printf '%x' "$NL_RUN_PID")
    NL_DIR=$(mktemp -d /tmp/wgmesh-netns.XXXXXX)
    mkdir -p "$NL_UAPI_DIR"
    nl_reap_stale
    nl_guard_start "$NL_RUN_PID"
}

# nl_trap: tear everything down on exit, Ctrl-C and SIGTERM.
nl_trap() {
    trap 'nl_teardown' EXIT
    trap 'nl_teardown; trap - EXIT; exit 130' INT
    trap 'nl_teardown; trap - EXIT; exit 143' TERM
}

# nl_missing IMPL...: prints what is missing to run these implementations
# (commands, /dev/net/tun, netns support), one item a line; nothing if complete.
nl_missing() {
    local c impl
    [[ $(id -u) -eq 0 ]] || echo "root"
    for c in ip wg ping; do command -v "$c" >/dev/null || echo "$c"; done
    [[ -c /dev/net/tun ]] || echo "/dev/net/tun"
    for impl in "$@"; do
        case $impl in
            wgmesh) [[ -x $WGMESH_BIN ]] || echo "wgmesh binary ($WGMESH_BIN; build with cargo build --release)" ;;
            wireguard-go) command -v wireguard-go >/dev/null || echo "wireguard-go" ;;
            boringtun) nl_boringtun_bin >/dev/null || echo "boringtun-cli (cargo install boringtun-cli --locked)" ;;
            wireguard-go-new) [[ -n $NL_WGGO_NEW_BIN && -x $NL_WGGO_NEW_BIN ]] || echo "current wireguard-go (NL_WGGO_NEW_BIN; common.sh ensure_wireguard_go_new)" ;;
            gotatun) nl_gotatun_bin >/dev/null || echo "gotatun (cargo install gotatun-cli --locked)" ;;
            raw) ;;
            *) echo "unknown implementation '$impl'" ;;
        esac
    done
}

nl_boringtun_bin() {
    local b
    b=$(command -v boringtun-cli) || b="${CARGO_HOME:-$HOME/.cargo}/bin/boringtun-cli"
    [[ -x $b ]] && echo "$b"
}

nl_gotatun_bin() {
    local b=$NL_GOTATUN_BIN
    [[ -n $b ]] || b=$(command -v gotatun) || b="${CARGO_HOME:-$HOME/.cargo}/bin/gotatun"
    [[ -x $b ]] && echo "$b"
}

nl_exec() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

# nl_new_pair [v4|v6]: a fresh pair of namespaces joined by a veth pair.
# Sets NL_NS_A/B, NL_IF_A/B (tunnel interface names to use), NL_VETH_A/B,
# NL_UNDER_A/B (underlay addresses), NL_EP_A/B (UDP endpoints, bracketed for v6).
nl_new_pair() {
    local fam=${1:-v4}
    nl_init || return 1
    NL_SEQ=$((NL_SEQ + 1))
    NL_NS_A="wgnl-$NL_RUN_PID-$NL_SEQ-a" NL_NS_B="wgnl-$NL_RUN_PID-$NL_SEQ-b"
    NL_IF_A="wb${NL_HEX}x${NL_SEQ}a" NL_IF_B="wb${NL_HEX}x${NL_SEQ}b"
    NL_VETH_A="wb${NL_HEX}x${NL_SEQ}va" NL_VETH_B="wb${NL_HEX}x${NL_SEQ}vb"
    if ((${#NL_VETH_A} > 15)); then
        nl_err "interface name $NL_VETH_A is longer than 15 characters (too many topologies in one run)"
        return 1
    fi
    NL_PAIR_PIDS=()
    local ns
    for ns in "$NL_NS_A" "$NL_NS_B"; do
        ip netns add "$ns" || { nl_err "ip netns add $ns failed"; return 1; }
        NL_NAMESPACES+=("$ns")
        ip -n "$ns" link set lo up
    done
    ip link add "$NL_VETH_A" netns "$NL_NS_A" mtu "$NL_UNDERLAY_MTU" type veth \
        peer name "$NL_VETH_B" netns "$NL_NS_B" mtu "$NL_UNDERLAY_MTU" ||
        { nl_err "creating the veth pair failed"; return 1; }
    case $fam in
        v4)
            NL_UNDER_A=192.0.2.1 NL_UNDER_B=192.0.2.2
            NL_EP_A="$NL_UNDER_A:$NL_PORT" NL_EP_B="$NL_UNDER_B:$NL_PORT"
            ip -n "$NL_NS_A" addr add "$NL_UNDER_A/24" dev "$NL_VETH_A"
            ip -n "$NL_NS_B" addr add "$NL_UNDER_B/24" dev "$NL_VETH_B"
            ;;
        v6)
            NL_UNDER_A=fd00:99::1 NL_UNDER_B=fd00:99::2
            NL_EP_A="[$NL_UNDER_A]:$NL_PORT" NL_EP_B="[$NL_UNDER_B]:$NL_PORT"
            # nodad: no 1-2 s of "tentative" address the daemons could not bind to.
            ip -n "$NL_NS_A" addr add "$NL_UNDER_A/64" dev "$NL_VETH_A" nodad
            ip -n "$NL_NS_B" addr add "$NL_UNDER_B/64" dev "$NL_VETH_B" nodad
            ;;
        *) nl_err "nl_new_pair: family must be v4 or v6, not '$fam'"; return 1 ;;
    esac
    ip -n "$NL_NS_A" link set "$NL_VETH_A" up && ip -n "$NL_NS_B" link set "$NL_VETH_B" up
}

# nl_start IMPL NS IFACE: starts the implementation in NS creating IFACE, waits
# for its UAPI socket. Sets NL_LAST_PID and NL_LAST_LOG. On failure prints the
# daemon's log and returns 1.
nl_start() {
    local impl=$1 ns=$2 ifc=$3 log pid
    log="$NL_DIR/$ifc.$impl.log"
    local sock="$NL_UAPI_DIR/$ifc.sock"
    rm -f "$sock"
    case $impl in
        wgmesh)
            [[ -x $WGMESH_BIN ]] || { nl_err "wgmesh binary not found at $WGMESH_BIN (set WGMESH_BIN or cargo build --release)"; return 1; }
            local level=warn
            [[ $NL_VERBOSE_DAEMONS == 1 ]] && level=debug
            RUST_LOG="${RUST_LOG:-$level}" RUST_BACKTRACE=1 \
                ip netns exec "$ns" "$WGMESH_BIN" dataplane --interface "$ifc" >"$log" 2>&1 &
            ;;
        wireguard-go | wireguard-go-new)
            local level=error bin=wireguard-go
            [[ $NL_VERBOSE_DAEMONS == 1 ]] && level=verbose
            if [[ $impl == wireguard-go-new ]]; then
                bin=$NL_WGGO_NEW_BIN
                [[ -n $bin && -x $bin ]] || { nl_err "current wireguard-go not found (set NL_WGGO_NEW_BIN; common.sh ensure_wireguard_go_new builds it)"; return 1; }
            fi
            WG_PROCESS_FOREGROUND=1 LOG_LEVEL=$level \
                ip netns exec "$ns" "$bin" -f "$ifc" >"$log" 2>&1 &
            ;;
        boringtun)
            local bin level=error
            bin=$(nl_boringtun_bin) || { nl_err "boringtun-cli not installed (cargo install boringtun-cli --locked)"; return 1; }
            [[ $NL_VERBOSE_DAEMONS == 1 ]] && level=debug
            ip netns exec "$ns" "$bin" --foreground --disable-drop-privileges \
                --threads "$NL_BORINGTUN_THREADS" --verbosity "$level" --log "$log.file" "$ifc" >"$log" 2>&1 &
            ;;
        gotatun)
            local bin level=error
            bin=$(nl_gotatun_bin) || { nl_err "gotatun not installed (cargo install gotatun-cli --locked)"; return 1; }
            [[ $NL_VERBOSE_DAEMONS == 1 ]] && level=debug
            # --foreground logs to the console; NO_COLOR keeps the log readable.
            NO_COLOR=1 ip netns exec "$ns" "$bin" --foreground --disable-drop-privileges \
                --verbosity "$level" "$ifc" >"$log" 2>&1 &
            ;;
        *) nl_err "unknown implementation '$impl' (wgmesh, wireguard-go, wireguard-go-new, boringtun, gotatun)"; return 1 ;;
    esac
    # `ip netns exec` execs the daemon, so $! is the daemon itself.
    pid=$!
    NL_PIDS+=("$pid") NL_PAIR_PIDS+=("$pid")
    NL_LAST_PID=$pid NL_LAST_LOG=$log
    local deadline=$((SECONDS + NL_START_TIMEOUT))
    while :; do
        if ! nl_alive "$pid"; then
            local rc=0
            wait "$pid" 2>/dev/null || rc=$?
            nl_err "$impl exited (status $rc) before serving $sock in $ns"
            nl_show_log "$log"
            return 1
        fi
        if [[ -S $sock ]] && ip -n "$ns" link show "$ifc" >/dev/null 2>&1; then
            return 0
        fi
        if ((SECONDS >= deadline)); then
            nl_err "$impl (pid $pid) did not create $ifc and $sock in $ns within ${NL_START_TIMEOUT}s"
            nl_show_log "$log"
            return 1
        fi
        sleep 0.05
    done
}

nl_show_log() {
    local f
    for f in "$1" "$1.file"; do
        [[ -s $f ]] || continue
        printf -- '----- %s (last 40 lines) -----\n' "$f" >&2
        tail -n 40 "$f" >&2
    done
    printf -- '----- end of log -----\n' >&2
}

# nl_alive PID: running and not a zombie.
nl_alive() {
    local st
    st=$(awk '{ sub(/.*\) /, ""); print $1 }' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $st && $st != Z && $st != X ]]
}

# nl_keys NAME: writes $NL_DIR/NAME.key (0600) and prints the public key.
nl_keys() {
    (umask 077 && wg genkey >"$NL_DIR/$1.key") && wg pubkey <"$NL_DIR/$1.key"
}

# nl_wg_set NS IFACE KEYFILE PEER_PUBKEY PEER_ENDPOINT ALLOWED_IPS
nl_wg_set() {
    local ns=$1 ifc=$2 key=$3 peer=$4 ep=$5 allowed=$6
    ip netns exec "$ns" wg set "$ifc" private-key "$key" listen-port "$NL_PORT" \
        peer "$peer" endpoint "$ep" allowed-ips "$allowed" ||
        { nl_err "wg set $ifc in $ns failed"; return 1; }
}

# nl_tunnel_addrs NS IFACE ADDR4 ADDR6: addresses, MTU, link up.
nl_tunnel_addrs() {
    local ns=$1 ifc=$2
    ip -n "$ns" link set "$ifc" mtu "$NL_TUN_MTU" &&
        ip -n "$ns" addr add "$3/$NL_TUN4_PLEN" dev "$ifc" &&
        ip -n "$ns" addr add "$4/$NL_TUN6_PLEN" dev "$ifc" nodad &&
        ip -n "$ns" link set "$ifc" up ||
        { nl_err "configuring $ifc in $ns failed"; return 1; }
}

# nl_tunnel IMPL_A IMPL_B [v4|v6]: a fresh pair with IMPL_A in A and IMPL_B in
# B, keyed and addressed, no traffic sent yet (no persistent keepalive, so the
# first packet decides who initiates). Sets what nl_new_pair sets plus
# NL_PID_A/B, NL_LOG_A/B, NL_PUB_A/B.
nl_tunnel() {
    local impl_a=$1 impl_b=$2 fam=${3:-v4}
    nl_new_pair "$fam" || return 1
    nl_start "$impl_a" "$NL_NS_A" "$NL_IF_A" || return 1
    NL_PID_A=$NL_LAST_PID NL_LOG_A=$NL_LAST_LOG
    nl_start "$impl_b" "$NL_NS_B" "$NL_IF_B" || return 1
    NL_PID_B=$NL_LAST_PID NL_LOG_B=$NL_LAST_LOG
    NL_PUB_A=$(nl_keys "$NL_IF_A") && NL_PUB_B=$(nl_keys "$NL_IF_B") || { nl_err "wg genkey failed"; return 1; }
    nl_wg_set "$NL_NS_A" "$NL_IF_A" "$NL_DIR/$NL_IF_A.key" "$NL_PUB_B" "$NL_EP_B" "$NL_TUN4_B/32,$NL_TUN6_B/128" || return 1
    nl_wg_set "$NL_NS_B" "$NL_IF_B" "$NL_DIR/$NL_IF_B.key" "$NL_PUB_A" "$NL_EP_A" "$NL_TUN4_A/32,$NL_TUN6_A/128" || return 1
    nl_tunnel_addrs "$NL_NS_A" "$NL_IF_A" "$NL_TUN4_A" "$NL_TUN6_A" || return 1
    nl_tunnel_addrs "$NL_NS_B" "$NL_IF_B" "$NL_TUN4_B" "$NL_TUN6_B" || return 1
}

# nl_spawn NS CMD...: runs CMD in the background inside NS, registered for
# teardown with the current pair. Sets NL_LAST_PID.
nl_spawn() {
    local ns=$1; shift
    ip netns exec "$ns" "$@" &
    NL_LAST_PID=$!
    NL_PIDS+=("$NL_LAST_PID") NL_PAIR_PIDS+=("$NL_LAST_PID")
}

# nl_run NS OUT CMD...: runs CMD inside NS, stdout and stderr to file OUT, and
# returns its status. It runs as a background job reaped by `wait` because bash
# defers a trap while a foreground child runs, and skips it altogether when the
# child handles SIGINT itself (iperf3 and ping do): with `wait`, Ctrl-C reaches
# the caller's trap at once.
nl_run() {
    local ns=$1 out=$2 pid rc=0; shift 2
    ip netns exec "$ns" "$@" >"$out" 2>&1 &
    pid=$!
    NL_PIDS+=("$pid") NL_PAIR_PIDS+=("$pid")
    wait "$pid" || rc=$?
    nl_forget "$pid"
    return "$rc"
}

# nl_forget PID: drops a finished process from the teardown lists.
nl_forget() {
    local p keep=()
    for p in "${NL_PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
    NL_PIDS=("${keep[@]}")
    keep=()
    for p in "${NL_PAIR_PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
    NL_PAIR_PIDS=("${keep[@]}")
}

# nl_kill PID...: SIGTERM, up to 5 s grace, then SIGKILL; reaps. Only PIDs this
# run started are ever passed here.
nl_kill() {
    local pid i
    for pid in "$@"; do nl_alive "$pid" && kill -TERM "$pid" 2>/dev/null; done
    for pid in "$@"; do
        for ((i = 0; i < 100; i++)); do nl_alive "$pid" || break; sleep 0.05; done
        nl_alive "$pid" && kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null || true
    done
    return 0
}

# nl_pair_down: stops the current pair's processes and deletes its namespaces.
nl_pair_down() {
    ((${#NL_PAIR_PIDS[@]})) && nl_kill "${NL_PAIR_PIDS[@]}"
    NL_PAIR_PIDS=()
    local ns
    for ns in "${NL_NS_A:-}" "${NL_NS_B:-}"; do
        [[ -n $ns ]] && nl_del_ns "$ns"
    done
    rm -f "$NL_UAPI_DIR/${NL_IF_A:-none}.sock" "$NL_UAPI_DIR/${NL_IF_B:-none}.sock"
    return 0
}

nl_del_ns() {
    ip netns list 2>/dev/null | awk '{print $1}' | grep -qxF "$1" || return 0
    local pids
    pids=$(ip netns pids "$1" 2>/dev/null || true)
    # shellcheck disable=SC2086
    [[ -n $pids ]] && kill -KILL $pids 2>/dev/null
    ip netns del "$1" 2>/dev/null || true
}

# nl_teardown: everything this run started; idempotent, safe to call twice.
nl_teardown() {
    [[ -n $NL_RUN_PID && $NL_RUN_PID == "$$" ]] || return 0
    ((${#NL_PIDS[@]})) && nl_kill "${NL_PIDS[@]}"
    NL_PIDS=() NL_PAIR_PIDS=()
    local ns
    for ns in "${NL_NAMESPACES[@]}"; do nl_del_ns "$ns"; done
    NL_NAMESPACES=()
    rm -f "$NL_UAPI_DIR/wb${NL_HEX}x"*.sock
    if [[ -n $NL_GUARD_PID ]]; then
        kill -TERM "$NL_GUARD_PID" 2>/dev/null || true
        NL_GUARD_PID=""
    fi
    if [[ -n $NL_DIR && -d $NL_DIR && ${NL_KEEP_DIR:-0} != 1 ]]; then
        rm -rf "$NL_DIR"
    fi
    return 0
}

# nl_reap_run PID: deletes what a run of PID left behind: namespaces
# wgnl-PID-* / wgrt-PID-* (killing the processes inside) and UAPI sockets
# wb<hex>x* / wr<hex>x*. Only for runs whose process is gone.
nl_reap_run() {
    local pid=$1 hex ns
    hex=$(printf '%x' "$pid")
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^wg(nl|rt)-$pid-" || true); do
        nl_del_ns "$ns"
    done
    rm -f "$NL_UAPI_DIR/wb${hex}x"*.sock "$NL_UAPI_DIR/wr${hex}x"*.sock
}

# nl_reap_stale: reaps every earlier run (of this script or the Rust tests)
# whose process no longer exists.
nl_reap_stale() {
    local pid ns f
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^wg(nl|rt)-[0-9]+-' || true); do
        pid=${ns#wg??-}; pid=${pid%%-*}
        if ! kill -0 "$pid" 2>/dev/null; then
            nl_log "reaping namespace $ns left by dead run $pid"
            nl_del_ns "$ns"
        fi
    done
    for f in "$NL_UAPI_DIR"/w[br]*x*.sock; do
        [[ -e $f ]] || continue
        local base=${f##*/}
        local hex=${base:2}; hex=${hex%%x*}
        [[ $hex =~ ^[0-9a-f]+$ ]] || continue
        kill -0 "$((16#$hex))" 2>/dev/null || rm -f "$f"
    done
    return 0
}

# nl_guard PID [DIR]: blocks until PID is gone, then reaps its run (and
# removes its scratch DIR). Meant to run detached (setsid) so the Ctrl-C that
# kills PID does not kill the guardian.
nl_guard() {
    local pid=$1 dir=${2:-}
    while kill -0 "$pid" 2>/dev/null; do sleep 1; done
    nl_reap_run "$pid"
    [[ -n $dir && $dir == /tmp/wgmesh-netns.* ]] && rm -rf "$dir"
    return 0
}

nl_guard_start() {
    command -v setsid >/dev/null || return 0
    # shellcheck disable=SC2016  # expanded by the inner bash
    setsid bash -c 'source "$1" && nl_guard "$2" "$3"' nl-guard "$NL_LIB_DIR/netns-lib.sh" "$1" \
        "$([[ ${NL_KEEP_DIR:-0} == 1 ]] || echo "$NL_DIR")" </dev/null >/dev/null 2>&1 &
    NL_GUARD_PID=$!
}

# nl_cpu_seconds PID: user+system CPU time of the whole process (all threads);
# prints nothing, and succeeds, when the process is gone (callers under set -e
# report a dead daemon themselves).
nl_cpu_seconds() {
    awk -v hz="$(getconf CLK_TCK)" '{ sub(/.*\) /, ""); printf "%.2f\n", ($12 + $13) / hz }' "/proc/$1/stat" 2>/dev/null || true
}

# nl_max_rss_mb PID: peak resident set size (VmHWM) in MiB.
nl_max_rss_mb() {
    awk '/^VmHWM:/ { printf "%.1f\n", $2 / 1024 }' "/proc/$1/status" 2>/dev/null
}
