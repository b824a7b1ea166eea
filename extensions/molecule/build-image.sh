#!/usr/bin/env bash
# The Debian 12 systemd image the Molecule scenarios run (no registry is reachable):
# debootstrap minbase + systemd + what VIMS needs, imported into podman. Built once
# per machine; the tag is a hash of this script, so a change rebuilds it.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export CONTAINERS_CONF="$HERE/containers.conf"
TAG="$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-12)"
IMAGE="localhost/vims-debian12-systemd:$TAG"
MIRROR="${VIMS_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
if podman image exists "$IMAGE"; then
  echo "$IMAGE"
  exit 0
fi
PACKAGES=(
  systemd systemd-sysv dbus python3 python3-packaging ca-certificates iproute2 procps
  nginx swtpm swtpm-tools tpm2-tools libtss2-dev qemu-system-x86 busybox-static
  libglib2.0-0 zstd xz-utils
)
work="$(mktemp -d /var/tmp/vims-image.XXXXXX)"
trap 'rm -rf "$work"' EXIT
echo "building $IMAGE (debootstrap, a few minutes)" >&2
debootstrap --variant=minbase --include="$(IFS=,; echo "${PACKAGES[*]}")" bookworm "$work/rootfs" "$MIRROR" \
  >"$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
root="$work/rootfs"
# What a container does not need at boot (and what would fail without hardware).
for unit in nginx.service getty@tty1.service systemd-remount-fs.service \
            systemd-logind.service console-getty.service; do
  ln -sf /dev/null "$root/etc/systemd/system/$unit"
done
echo vims-molecule >"$root/etc/hostname"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | podman import --change 'CMD ["/sbin/init"]' \
  --change 'STOPSIGNAL SIGRTMIN+3' - "$IMAGE" >/dev/null
echo "$IMAGE"
