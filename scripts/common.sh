# Shared set-up for scripts/test and scripts/demo: installs what is missing on a
# fresh Debian machine (as root) and builds once. Sourced, not run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

log() { printf '\n==> %s\n' "$*" >&2; }

# Debian packages the build and tests need: a C compiler for ring, pkg-config.
# (The network-namespace tests will add iproute2, wireguard-tools, ... here.)
DEB_PACKAGES=(gcc libc6-dev pkg-config ca-certificates)

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

setup() {
    ensure_packages
    ensure_rust
}
