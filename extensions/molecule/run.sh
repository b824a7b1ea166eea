#!/usr/bin/env bash
# Run a Molecule scenario (default: `default`) with the locally built image.
#   extensions/molecule/run.sh [scenario] [molecule command, default: test]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
SCENARIO="${1:-default}"
COMMAND="${2:-test}"
export VIMS_ROOT="$ROOT" PATH="$ROOT/.venv-ctl/bin:$PATH" ANSIBLE_NOCOLOR=1 PY_COLORS=0
cd "$ROOT"
# `xen`: the delegated driver boots the nested Xen lab itself (create.yml); no image.
# Molecule still validates every scenario's molecule.yml, so default's image variable
# must be set to something.
if [[ "$SCENARIO" == xen ]]; then
  VIMS_MOLECULE_IMAGE="unused-by-the-xen-scenario" \
    exec molecule "$COMMAND" -s xen
fi
export CONTAINERS_CONF="$HERE/containers.conf"
command -v podman >/dev/null || { echo "molecule: podman is not installed (scripts/setup.sh packages)" >&2; exit 2; }
VIMS_MOLECULE_IMAGE="$(bash "$HERE/build-image.sh")"
export VIMS_MOLECULE_IMAGE
VIMS_PYENV_ROOT="$(dirname "$(dirname "$(dirname "$(readlink -f "$ROOT/.venv/bin/python")")")")"
export VIMS_PYENV_ROOT="${VIMS_PYENV_ROOT%/versions}"
export VIMS_CACHE="${VIMS_CACHE:-$HOME/.cache/vims}"
# The lab C-VM's kernel and initramfs, fetched and built on the host, are mounted
# into the avm container (the image has no apt lists to fetch them itself).
"$ROOT/.venv/bin/python" -c 'from vims.lab.kernel import ensure_kernel
from vims.lab.initramfs import ensure_initramfs
ensure_initramfs(ensure_kernel())'
# One user network (containers resolve each other by name), away from 192.0.2.0/24.
podman network exists vims-molecule ||
  podman network create --subnet 10.213.7.0/24 vims-molecule >/dev/null
exec molecule "$COMMAND" -s "$SCENARIO"
