# Shared set-up for scripts/test and scripts/demo: installs what is missing on a
# fresh Debian machine (as root) and builds once. Sourced, not run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# Each step's line says how long the previous step took and the total so far,
# so a CI log shows the time of every tier.
LOG_LAST=$SECONDS
log() {
    printf '\n==> [%ds, previous step %ds] %s\n' "$SECONDS" "$((SECONDS - LOG_LAST))" "$*" >&2
    LOG_LAST=$SECONDS
}

# Debian packages the build and tests need: a C compiler for ring, pkg-config;
# for the network-namespace tests and scripts/bench-dataplane: ip (iproute2),
# ping, wg, wireguard-go (the reference peer), iperf3, jq, ps/procfs tools;
# tcpdump for the testbed's underlay capture (wgmesh-testbed check); nftables
# (`nft`) for the agent's egress masquerade; BIRD 2 (the agent's BGP engine),
# FRR and GoBGP (fabric routers of the BGP interop tests, tests/bgp_interop.rs).
DEB_PACKAGES=(gcc libc6-dev pkg-config ca-certificates
    iproute2 iputils-ping wireguard-tools wireguard-go iperf3 jq procps util-linux tcpdump
    nftables bird2 frr gobgpd)

ensure_packages() {
    local missing=()
    for p in "${DEB_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if ((${#missing[@]})); then
        if [[ $(id -u) -ne 0 ]]; then
            echo "missing Debian packages: ${missing[*]}; run as root or install them" >&2
            exit 1
        fi
        log "installing Debian packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

ensure_rust() {
    if ! command -v cargo >/dev/null; then
        for d in "$HOME/.cargo/bin" /root/.cargo/bin /usr/local/cargo/bin; do
            [[ -x $d/cargo ]] && export PATH="$d:$PATH" && break
        done
    fi
    if ! command -v cargo >/dev/null; then
        echo "cargo not found: install a stable Rust toolchain (rustup) first" >&2
        exit 1
    fi
}

# boringtun-cli, the other reference peer of the network-namespace tests, is not
# packaged by Debian: cargo install it (a few minutes) unless it is on PATH or in
# cargo's bin dir already.
ensure_boringtun() {
    command -v boringtun-cli >/dev/null && return 0
    local bin="${CARGO_HOME:-$HOME/.cargo}/bin"
    if [[ ! -x $bin/boringtun-cli ]]; then
        ensure_rust
        log "installing boringtun-cli (cargo install boringtun-cli --locked; takes a few minutes)"
        cargo install boringtun-cli --locked
    fi
    [[ ":$PATH:" == *":$bin:"* ]] || export PATH="$PATH:$bin"
}

# kubectl drives the test API in testbed/tests/api_kubectl.rs; some images ship
# it (package kubectl), Debian has it as kubernetes-client.
ensure_kubectl() {
    command -v kubectl >/dev/null && return
    log "installing kubectl (Debian package kubernetes-client)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubernetes-client >/dev/null
}

setup() {
    ensure_packages
    ensure_kubectl
    ensure_rust
}

# The VM tier (scripts/test-vm): qemu, a Debian kernel that ships wireguard.ko,
# busybox-static (virtme-ng's initramfs) and virtme-ng, pinned, in a venv of its
# own under target/. Sets VM_KERNEL (the /boot/vmlinuz-* to boot: the newest one
# whose modules include WireGuard; linux-image-amd64 is installed if none does)
# and VNG (the vng executable).
VNG_VERSION=1.42
ensure_vm() {
    local missing=() p
    for p in qemu-system-x86 busybox-static python3; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [[ -z $(vm_kernel) ]]; then
        missing+=(linux-image-amd64)
    fi
    if ((${#missing[@]})); then
        log "installing Debian packages for the VM tier: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    VM_KERNEL="$(vm_kernel)"
    if [[ -z $VM_KERNEL ]]; then
        echo "no /boot/vmlinuz-* with a wireguard module under /lib/modules" >&2
        return 1
    fi
    local venv="$ROOT/target/vm-tools/venv"
    VNG="$venv/bin/vng"
    if ! "$VNG" --version 2>/dev/null | grep -qF "$VNG_VERSION"; then
        log "installing virtme-ng $VNG_VERSION (pip, in $venv)"
        rm -rf "$venv"
        if ! python3 -m venv "$venv" 2>/dev/null; then
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
            python3 -m venv "$venv"
        fi
        "$venv/bin/pip" install --quiet --disable-pip-version-check "virtme-ng==$VNG_VERSION"
    fi
}

# The newest installed kernel image whose modules include WireGuard.
vm_kernel() {
    local image version
    for image in $(ls -1 /boot/vmlinuz-* 2>/dev/null | sort -V -r); do
        version="${image#/boot/vmlinuz-}"
        if compgen -G "/lib/modules/$version/kernel/drivers/net/wireguard/wireguard.ko*" >/dev/null; then
            echo "$image"
            return
        fi
    done
}

# machine_summary: one line naming the machine benchmark figures belong to:
# CPU model and cores (lscpu), kernel, and the load average when measured
# (figures taken while other work loads the machine are smoke figures).
machine_summary() {
    local cpu cores
    cpu=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -n 1)
    cores=$(lscpu 2>/dev/null | awk -F: '/^CPU\(s\):/ { gsub(/ /, "", $2); print $2 }')
    printf '%s, %s CPUs (nproc %s), kernel %s, load average %s\n' "${cpu:-unknown CPU}" \
        "${cores:-?}" "$(nproc)" "$(uname -r)" "$(cut -d' ' -f1-3 /proc/loadavg)"
}

# Current wireguard-go (with the TUN TSO/GRO and UDP GSO/GRO offloads derived
# from Tailscale's work; Debian's 0.0.20220316 predates them), for
# scripts/bench-dataplane. The module has no tagged release, so it is pinned by
# pseudo-version and built once per machine, with the Go module proxy, into
# $WGGO_NEW_CACHE/<version>/wireguard-go. Sets WGGO_NEW_BIN to the binary;
# returns 1 with the reason in ENSURE_ERROR when it cannot be had.
WGGO_NEW_MODULE=golang.zx2c4.com/wireguard
WGGO_NEW_VERSION=v0.0.0-20260522210424-ecfc5a8d5446
: "${WGGO_NEW_CACHE:=/var/cache/wgmesh/wireguard-go}"
ensure_wireguard_go_new() {
    local dir="$WGGO_NEW_CACHE/$WGGO_NEW_VERSION" tmp
    WGGO_NEW_BIN="$dir/wireguard-go" ENSURE_ERROR=""
    [[ -x $WGGO_NEW_BIN ]] && return 0
    if ! command -v go >/dev/null; then
        ENSURE_ERROR="go is not installed (needed to build $WGGO_NEW_MODULE@$WGGO_NEW_VERSION)"
        return 1
    fi
    log "building $WGGO_NEW_MODULE@$WGGO_NEW_VERSION into $dir (go install, once per machine)"
    if ! mkdir -p "$dir" || ! tmp=$(mktemp -d "$dir/.build.XXXXXX"); then
        ENSURE_ERROR="cannot create $dir"
        return 1
    fi
    # GOTOOLCHAIN=local: build with the Go on this machine, never fetch another.
    if ! GOBIN="$tmp" GOTOOLCHAIN=local GOFLAGS=-buildvcs=false timeout 900 \
        go install "$WGGO_NEW_MODULE@$WGGO_NEW_VERSION" || ! mv "$tmp/wireguard" "$WGGO_NEW_BIN"; then
        rm -rf "$tmp"
        ENSURE_ERROR="go install $WGGO_NEW_MODULE@$WGGO_NEW_VERSION failed (output above)"
        return 1
    fi
    rm -rf "$tmp"
}

# GotaTun (Mullvad's fork of boringtun; binary `gotatun`), pinned, installed
# with cargo like boringtun-cli. Sets GOTATUN_BIN to the binary; returns 1 with
# the reason in ENSURE_ERROR when it cannot be had.
GOTATUN_VERSION=0.10.2
ensure_gotatun() {
    GOTATUN_BIN="${CARGO_HOME:-$HOME/.cargo}/bin/gotatun" ENSURE_ERROR=""
    if [[ -x $GOTATUN_BIN ]] && "$GOTATUN_BIN" --version 2>/dev/null | grep -qF "$GOTATUN_VERSION"; then
        return 0
    fi
    if ! command -v cargo >/dev/null && ! (ensure_rust); then
        ENSURE_ERROR="cargo not found (needed to install gotatun-cli $GOTATUN_VERSION)"
        return 1
    fi
    ensure_rust
    log "installing gotatun-cli $GOTATUN_VERSION (cargo install --locked; takes a few minutes)"
    if ! timeout 1800 cargo install gotatun-cli --version "$GOTATUN_VERSION" --locked; then
        ENSURE_ERROR="cargo install gotatun-cli --version $GOTATUN_VERSION --locked failed (output above)"
        return 1
    fi
    [[ -x $GOTATUN_BIN ]] || { ENSURE_ERROR="cargo install gotatun-cli left no $GOTATUN_BIN"; return 1; }
}
