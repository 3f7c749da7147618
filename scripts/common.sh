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
# (`nft`) for the agent's egress masquerade.
DEB_PACKAGES=(gcc libc6-dev pkg-config ca-certificates
    iproute2 iputils-ping wireguard-tools wireguard-go iperf3 jq procps util-linux tcpdump
    nftables)

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
