#!/usr/bin/env bash
# One-shot, idempotent set-up of everything VIMS needs on a Debian 12 host:
# Debian packages, the runtime venv (Python 3.11, for the cp311-only libvmi
# wheel) and the controller venv (Python 3.12, for ansible-core >= 2.20).
# A second run only checks stamps and returns in about a second.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUNTIME_VENV="${VIMS_RUNTIME_VENV:-$ROOT/.venv}"
CONTROLLER_VENV="${VIMS_CONTROLLER_VENV:-$ROOT/.venv-ctl}"
WHAT="${1:-all}"   # all | runtime | controller | packages

log() { printf '[setup] %s\n' "$*" >&2; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 2; }

DEBIAN_PACKAGES=(
  qemu-system-x86 busybox-static swtpm swtpm-tools tpm2-tools libtss2-dev
  pkg-config xz-utils zstd cpio gcc make ca-certificates nginx
  postgresql httperf curl
  # Molecule (podman with runc, name resolution between containers; the image is
  # debootstrapped) and the xl config syntax check of the xen_host role (libxlutil).
  podman runc debootstrap golang-github-containernetworking-plugin-dnsname libxenmisc4.17
  # The Xen lab (vims lab up --hypervisor xen): dom0 image build and QEMU overlay disks.
  qemu-utils openssh-client e2fsprogs
)

install_packages() {
  local missing=()
  for pkg in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  if ((${#missing[@]} == 0)); then
    log "Debian packages present"
    return
  fi
  [[ $(id -u) -eq 0 ]] || die "missing Debian packages (${missing[*]}); run as root or install them"
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# find_python VERSION: prints an interpreter path for that minor version.
find_python() {
  local want="$1" cand
  for cand in "python$want" "$(command -v pyenv >/dev/null 2>&1 && pyenv root 2>/dev/null)/versions/$want"*/bin/python3 \
              "$HOME/.pyenv/versions/$want"*/bin/python3 "/usr/local/bin/python$want" "/usr/bin/python$want"; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import sys; assert sys.version_info[:2] == tuple(map(int, '$want'.split('.')))" 2>/dev/null; then
      command -v "$cand"
      return 0
    fi
  done
  return 1
}

# make_venv DIR PYVER LOCKFILE EXTRA_ARGS...: (re)creates DIR when the lock changed.
make_venv() {
  local dir="$1" pyver="$2" lock="$3"; shift 3
  local stamp="$dir/.vims-stamp" want
  want="$(cat "$lock" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16) $*"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    log "venv $dir up to date"
    return
  fi
  local py
  py="$(find_python "$pyver")" || die "Python $pyver not found (looked for python$pyver on PATH and in pyenv versions); install it, e.g. 'pyenv install $pyver'"
  log "building venv $dir with $py"
  [[ -d "$dir" ]] || "$py" -m venv "$dir"
  "$dir/bin/python" -m pip install -q --upgrade pip 2>&1 | { grep -v "is ignored: it is neither" || true; } >&2
  "$dir/bin/python" -m pip install -q -r "$lock" "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; } >&2
  echo "$want" >"$stamp"
}

# The checkout is the collection vims.attestation: ansible.cfg finds it through this link.
link_collection() {
  local dir="$CONTROLLER_VENV/collections/ansible_collections/vims"
  mkdir -p "$dir"
  [[ "$(readlink "$dir/attestation" 2>/dev/null)" == "$ROOT" ]] || ln -sfn "$ROOT" "$dir/attestation"
}

case "$WHAT" in
  packages) install_packages ;;
  runtime) make_venv "$RUNTIME_VENV" 3.11 "$ROOT/requirements/runtime.txt" -e "$ROOT" ;;
  controller) make_venv "$CONTROLLER_VENV" 3.12 "$ROOT/requirements/controller.txt"; link_collection ;;
  all)
    install_packages
    make_venv "$RUNTIME_VENV" 3.11 "$ROOT/requirements/runtime.txt" -e "$ROOT"
    make_venv "$CONTROLLER_VENV" 3.12 "$ROOT/requirements/controller.txt"
    link_collection
    ;;
  *) die "unknown target '$WHAT' (all|packages|runtime|controller)" ;;
esac
