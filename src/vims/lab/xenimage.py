"""Build (once) what the Xen lab boots: the hypervisor, a dom0 disk image and its initrd.

* Xen: Debian's ``xen-hypervisor-4.17-amd64``, gunzipped to the multiboot ELF
  that QEMU's ``-kernel`` loads.
* dom0: ``debootstrap --variant=minbase bookworm`` with the Xen tools, Python
  3.11 and sshd; the lab kernel's modules (dom0 runs the same Debian kernel as
  the C-VMs); a venv at /opt/vims holding the runtime's dependencies, installed
  offline from wheels fetched on the host (pip inside the image would not trust
  this machine's TLS proxy); busybox init with the scripts in ``lab/dom0``.
* An initrd that loads virtio/ext4 (modules in the Debian kernel) and
  switches to the disk.

Everything is content-addressed in ``$VIMS_CACHE/xen``: the same inputs give
the same files, so the ~2 minute build happens once per kernel and recipe.
The vims package itself is not in the image (it changes far more often): each
lab unpacks the wheel the host builds onto its share.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from vims import ui
from vims.errors import LabError
from vims.lab.initramfs import find_static_busybox, pack_cpio
from vims.lab.kernel import GuestKernel
from vims.paths import cache_dir

RECIPE = "vims-dom0-v2"
MIRROR = os.environ.get("VIMS_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"
HYPERVISOR_PACKAGE = "xen-hypervisor-4.17-amd64"
DOM0_PACKAGES = (
    "xen-utils-4.17", "xenstore-utils", "python3", "python3-venv", "kmod", "iproute2",
    "busybox-static", "libglib2.0-0", "openssh-server", "socat", "procps",
    # What the collection's xen_host role installs on a real dom0, present here so that
    # its Molecule scenario converges the role for real without a mirror inside nested
    # TCG (apt there works but took minutes and once failed to unpack): the hypervisor
    # package, tboot, update-grub, the apt module's python3-apt, xen-tools and swtpm.
    "xen-system-amd64", "xen-tools", "tboot", "grub2-common", "python3-apt",
    "swtpm", "swtpm-tools",
    # The TPM software stack that tpm2-pytss links (the A-VM agent quotes in dom0).
    "libtss2-esys-3.0.2-0", "libtss2-fapi1", "libtss2-mu0", "libtss2-rc0", "libtss2-sys1",
    "libtss2-tctildr0", "libtss2-tcti-swtpm0", "libtss2-tcti-device0",
    "libtss2-tcti-cmd0",
)
# What the A-VM needs in dom0: the runtime's dependencies without the test and
# lint tools of requirements/runtime.txt.
_NOT_IN_DOM0 = {
    "hypothesis", "pytest", "pytest-timeout", "pytest-rerunfailures", "mypy",
    "mypy_extensions", "ruff",
    "volatility3", "pefile", "jsonschema", "jsonschema-specifications", "referencing",
    "rpds-py", "librt", "ast_serialize", "iniconfig", "pluggy", "pathspec",
    "sortedcontainers", "opentelemetry-api", "joserfc",
}
# Modules the dom0 initrd loads to reach its root disk, in dependency order.
# ext4 asks the crypto API for crc32c at mount time: not in modules.dep.
INITRD_ROOTS = ("virtio_pci", "virtio_blk", "crc32c_generic", "ext4")
IMAGE_SLACK = 768 << 20  # free space in dom0's root: logs, xenstored, domU state


@dataclass(frozen=True)
class XenImages:
    """The cached files a Xen lab boots."""

    hypervisor: Path
    dom0_image: Path
    dom0_initrd: Path
    kernel: GuestKernel


def _run(cmd: list[str], what: str, timeout: float = 900, **kw: object) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              check=False, **kw)  # type: ignore[call-overload]
    except FileNotFoundError as exc:
        raise LabError(f"{what}: '{cmd[0]}' is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{what}: timed out after {timeout:.0f} s") from exc
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines()
                or ["no output"])[-1]
        raise LabError(f"{what} failed: {last}")
    out: str = proc.stdout
    return out


def _tree(name: str) -> Path:
    return Path(str(resources.files("vims.lab") / name))


def dom0_requirements() -> list[str]:
    """Pinned requirements for dom0's venv, from the runtime lock file."""
    lock = Path(__file__).resolve().parents[3] / "requirements" / "runtime.txt"
    if not lock.is_file():
        raise LabError(f"{lock} not found: the Xen lab needs a source checkout of vims")
    reqs = []
    for raw in lock.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and line.split("==", 1)[0] not in _NOT_IN_DOM0:
            reqs.append(line)
    return reqs


def _digest(kernel: GuestKernel, reqs: list[str]) -> str:
    h = hashlib.sha256(RECIPE.encode() + b"\0" + kernel.release.encode() + b"\0")
    h.update(" ".join((SUITE, *DOM0_PACKAGES, *reqs, *INITRD_ROOTS)).encode())
    h.update(_INITRD_INIT.encode())
    tree = _tree("dom0")
    for path in sorted(p for p in tree.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(tree)).encode() + b"\0")
        h.update(oct(path.stat().st_mode & 0o777).encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]


def _download_debs(packages: list[str], dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    _run(["apt-get", "download", *packages], "apt-get download", cwd=dest)
    found = []
    for pkg in packages:
        debs = sorted(dest.glob(f"{pkg}_*.deb"))
        if not debs:
            raise LabError(f"apt-get download {pkg} produced no .deb")
        found.append(debs[-1])
    return found


def ensure_hypervisor(root: Path) -> Path:
    """Xen's multiboot ELF (gunzipped /boot/xen-4.17-amd64.gz of Debian's package)."""
    out = root / "xen-4.17.elf"
    if out.is_file():
        return out
    with tempfile.TemporaryDirectory(prefix="vims-xen-") as tmp:
        with ui.step(f"downloading {HYPERVISOR_PACKAGE}"):
            (deb,) = _download_debs([HYPERVISOR_PACKAGE], Path(tmp))
        _run(["dpkg-deb", "-x", str(deb), tmp + "/x"], f"unpacking {deb.name}")
        gz = sorted(Path(tmp, "x/boot").glob("xen-4.17*-amd64.gz"))
        if not gz:
            raise LabError(f"{deb.name} holds no /boot/xen-4.17*-amd64.gz")
        part = out.with_suffix(".partial")
        part.write_bytes(gzip.decompress(gz[0].read_bytes()))
        part.replace(out)
    return out


# Published as a source distribution only: built on the host (same Debian, same
# libtss2 ABI as dom0's packages) by a Python 3.11 like dom0's.
BUILT_ON_HOST = ("tpm2-pytss",)


def fetch_wheels(reqs: list[str], dest: Path) -> None:
    """cp311 wheels for dom0's Python (Debian's 3.11): manylinux ones downloaded on
    the host, the few without one built here."""
    dest.mkdir(parents=True, exist_ok=True)
    build = [r for r in reqs if r.split("==", 1)[0] in BUILT_ON_HOST]
    reqs = [r for r in reqs if r not in build]
    if build:
        if sys.version_info[:2] != (3, 11):
            raise LabError(f"building {', '.join(build)} for dom0's Python 3.11 needs the "
                           f"host runtime on 3.11, not {sys.version.split()[0]}")
        _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest),
              *build], f"pip wheel ({', '.join(build)} for dom0)", timeout=900)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:",
           "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
           "--platform", "manylinux_2_36_x86_64", "--platform", "manylinux_2_28_x86_64",
           "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
           "--platform", "manylinux1_x86_64", "-d", str(dest), *reqs]
    _run(cmd, "pip download (wheels for dom0)", timeout=900)


def _module_order(rootfs: Path, release: str, wanted: tuple[str, ...]) -> list[Path]:
    """Module files for ``wanted`` and their dependencies, dependencies first."""
    moddir = rootfs / "lib/modules" / release
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
    by_name = {Path(m).name.split(".ko")[0].replace("-", "_"): m for m in deps}
    order: list[str] = []

    def visit(mod: str) -> None:
        if mod in order:
            return
        for dep in deps.get(mod, []):
            visit(dep)
        order.append(mod)

    for name in wanted:
        if name not in by_name:
            raise LabError(f"module {name} not found in {moddir} (built in? then drop it)")
        visit(by_name[name])
    return [moddir / m for m in order]


_INITRD_INIT = """#!/bin/busybox sh
# dom0's initrd: load virtio and ext4 (modules in the Debian kernel), mount the
# root disk, hand over to busybox init on it.
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /newroot
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules.order); do insmod /modules/$m 2>/dev/null; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done
if ! mount -t ext4 /dev/vda /newroot; then
  echo "vims dom0 initrd: cannot mount /dev/vda" > /dev/hvc0
  exec sh
fi
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /bin/busybox init
"""


def _build_initrd(rootfs: Path, release: str, out: Path) -> None:
    busybox = find_static_busybox()
    with tempfile.TemporaryDirectory(prefix="vims-dom0-initrd-") as tmp:
        root = Path(tmp)
        (root / "bin").mkdir()
        (root / "modules").mkdir()
        shutil.copy2(busybox, root / "bin/busybox")
        names = []
        for mod in _module_order(rootfs, release, INITRD_ROOTS):
            shutil.copy2(mod, root / "modules" / mod.name)
            names.append(mod.name)
        (root / "modules.order").write_text("\n".join(names) + "\n")
        (root / "init").write_text(_INITRD_INIT)
        (root / "init").chmod(0o755)
        pack_cpio(root, out)


def _chroot(rootfs: Path, cmd: list[str], what: str, timeout: float = 600) -> str:
    return _run(["chroot", str(rootfs), *cmd], what, timeout=timeout,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LC_ALL": "C"})


def _populate(rootfs: Path, kernel: GuestKernel, wheels: Path, reqs: list[str],
              debs: Path) -> None:
    with ui.step("dom0 image: the kernel's modules"):
        (kdeb,) = _download_debs([kernel.package], debs)
        with tempfile.TemporaryDirectory(prefix="vims-kdeb-") as tmp:
            _run(["dpkg-deb", "-x", str(kdeb), tmp], f"unpacking {kdeb.name}")
            src = Path(tmp, "lib/modules", kernel.release)
            dst = rootfs / "lib/modules" / kernel.release
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst, symlinks=True)
        _chroot(rootfs, ["depmod", "-a", kernel.release], "depmod")
    # The kernel and its config in /boot, as on an installed dom0: update-grub's
    # 20_linux_xen makes Xen entries only for kernels whose config has XEN_DOM0=y.
    boot = rootfs / "boot"
    (boot / "grub").mkdir(parents=True, exist_ok=True)
    shutil.copy2(kernel.vmlinuz, boot / f"vmlinuz-{kernel.release}")
    shutil.copy2(kernel.config, boot / f"config-{kernel.release}")
    # LibVMI dlopen()s the unversioned names (libxen-dev would pull in a compiler).
    libdir = rootfs / "usr/lib/x86_64-linux-gnu"
    for lib, real in (("libxenctrl.so", "libxenctrl.so.4.17"),
                      ("libxenstore.so", "libxenstore.so.4"),
                      ("libxenforeignmemory.so", "libxenforeignmemory.so.1"),
                      ("libxenevtchn.so", "libxenevtchn.so.1"),
                      ("libxentoollog.so", "libxentoollog.so.1"),
                      ("libxenlight.so", "libxenlight.so.4.17")):
        if (libdir / real).exists() and not (libdir / lib).exists():
            (libdir / lib).symlink_to(real)
    shutil.copytree(_tree("dom0"), rootfs, dirs_exist_ok=True, symlinks=True)
    (rootfs / "etc/hostname").write_text("dom0\n")
    sshd = rootfs / "etc/ssh/sshd_config.d/vims.conf"
    sshd.write_text("PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
                    "UseDNS no\n")
    # Host keys are made once per image: acceptable for a lab whose dom0 is
    # reached only through a loopback port; labs get their own client key.
    _chroot(rootfs, ["ssh-keygen", "-A"], "ssh-keygen -A")
    with ui.step(f"dom0 image: venv with {len(reqs)} wheels (offline)"):
        shutil.copytree(wheels, rootfs / "tmp/wheels")
        _chroot(rootfs, ["python3", "-m", "venv", "/opt/vims"], "python3 -m venv")
        _chroot(rootfs, ["/opt/vims/bin/pip", "install", "-q", "--no-index",
                         "--find-links", "/tmp/wheels", *reqs], "pip install (dom0 venv)")
        shutil.rmtree(rootfs / "tmp/wheels")
        site = next((rootfs / "opt/vims/lib").glob("python3*/site-packages"))
        # The lab's share carries the vims package unpacked from its wheel.
        (site / "vims-lab-share.pth").write_text("/vims/site\n")
    shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)
    (rootfs / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)


def _dir_size(root: Path) -> int:
    out = _run(["du", "-sb", str(root)], "du")
    return int(out.split()[0])


def ensure_xen_images(kernel: GuestKernel) -> XenImages:
    """The hypervisor, dom0 image and initrd for ``kernel``, built on first use."""
    if os.geteuid() != 0:
        raise LabError("building the dom0 image needs root (debootstrap, chroot)")
    root = cache_dir() / "xen"
    root.mkdir(parents=True, exist_ok=True)
    hypervisor = ensure_hypervisor(root)
    reqs = dom0_requirements()
    digest = _digest(kernel, reqs)
    image = root / f"dom0-{kernel.release}-{digest}.img"
    initrd = root / f"dom0-initrd-{kernel.release}-{digest}.cpio.gz"
    if image.is_file() and initrd.is_file():
        return XenImages(hypervisor, image, initrd, kernel)
    for tool in ("debootstrap", "mkfs.ext4", "chroot"):
        if shutil.which(tool) is None:
            raise LabError(f"'{tool}' not found (scripts/setup.sh installs what the Xen lab needs)")
    with tempfile.TemporaryDirectory(prefix="vims-dom0-", dir=root) as tmp:
        rootfs = Path(tmp, "rootfs")
        with ui.step("dom0 image: wheels for dom0's Python 3.11"):
            fetch_wheels(reqs, root / "wheels")
        debs = root / "debs"
        with ui.step(f"dom0 image: debootstrap {SUITE} (minbase + Xen 4.17 tools)"):
            debs.mkdir(exist_ok=True)  # debootstrap will not create its cache
            _run(["debootstrap", "--variant=minbase", f"--cache-dir={debs}",
                  "--include=" + ",".join(DOM0_PACKAGES), SUITE, str(rootfs), MIRROR],
                 "debootstrap", timeout=1200)
        _populate(rootfs, kernel, root / "wheels", reqs, debs)
        with ui.step("dom0 image: initrd and ext4 file system"):
            _build_initrd(rootfs, kernel.release, initrd)
            size = (_dir_size(rootfs) + IMAGE_SLACK + (1 << 20) - 1) & ~((1 << 20) - 1)
            part = image.with_suffix(".partial")
            part.unlink(missing_ok=True)
            with part.open("wb") as f:
                f.truncate(size)  # sparse: the image costs only what it holds
            _run(["mkfs.ext4", "-q", "-F", "-L", "dom0", "-d", str(rootfs), str(part)],
                 "mkfs.ext4")
            part.replace(image)
    for old in root.glob("dom0-*"):
        if old not in (image, initrd) and old.is_file():
            old.unlink()  # superseded recipes: a 1-2 GB image each
    return XenImages(hypervisor, image, initrd, kernel)
