"""The lab C-VM's kernel: the current Debian 12 kernel package, fetched once.

The package that ``linux-image-amd64`` depends on is downloaded with
``apt-get download`` and unpacked with ``dpkg -x``; only the bzImage, its
config and the few modules the lab guest loads are kept in the cache.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vims import ui
from vims.errors import LabError
from vims.paths import cache_dir

# Modules the guest's workload loads (network, VMCOREINFO via fw_cfg) plus a few
# harmless ones that tests load from inside the guest as "unexpected" modules.
GUEST_MODULES = ("e1000", "qemu_fw_cfg", "dummy", "veth", "bonding", "tun", "nls_utf8")
_PKG_RE = re.compile(r"^linux-image-[0-9][0-9a-z.+~-]*-amd64$")


@dataclass(frozen=True)
class GuestKernel:
    """A kernel unpacked in the cache."""

    package: str
    release: str
    root: Path

    @property
    def vmlinuz(self) -> Path:
        return self.root / "vmlinuz"

    @property
    def config(self) -> Path:
        return self.root / "config"

    @property
    def modules_dir(self) -> Path:
        return self.root / "modules"


def _run(cmd: list[str], what: str, cwd: Path | None = None, timeout: float = 600) -> str:
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError as exc:
        raise LabError(f"{what}: '{cmd[0]}' is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{what}: timed out after {timeout:.0f} s") from exc
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise LabError(f"{what} failed: {last}")
    return proc.stdout


def current_kernel_package(meta: str = "linux-image-amd64") -> str:
    """Name of the kernel image package a meta-package (``linux-image-amd64``,
    ``linux-image-6.12-amd64``) depends on."""

    def depends() -> str | None:
        out = _run(["apt-cache", "depends", meta], "apt-cache depends")
        for line in out.splitlines():
            name = line.split(":", 1)[-1].strip()
            if line.strip().startswith("Depends:") and _PKG_RE.match(name):
                return name
        return None

    name = depends()
    if name is None and os.geteuid() == 0:
        _run(["apt-get", "update", "-qq"], "apt-get update")
        name = depends()
    if name is None:
        raise LabError(f"cannot resolve the kernel package of {meta} (run apt-get update)")
    return name


def unpack_kernel_deb(deb: Path, dest: Path) -> GuestKernel:
    """Unpack a linux-image .deb into ``dest`` keeping only what the lab needs."""
    with tempfile.TemporaryDirectory(prefix="vims-kernel-") as tmp:
        _run(["dpkg-deb", "-x", str(deb), tmp], f"unpacking {deb.name}")
        boot = Path(tmp, "boot")
        images = sorted(boot.glob("vmlinuz-*"))
        if not images:
            raise LabError(f"{deb.name} holds no /boot/vmlinuz-*")
        release = images[0].name.removeprefix("vmlinuz-")
        staging = dest.with_name(dest.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "modules").mkdir(parents=True)
        shutil.copy2(images[0], staging / "vmlinuz")
        config = boot / f"config-{release}"
        if config.exists():
            shutil.copy2(config, staging / "config")
        moddir = Path(tmp, "lib/modules", release)
        for name in GUEST_MODULES:
            found = list(moddir.rglob(f"{name}.ko*"))
            if found:
                shutil.copy2(found[0], staging / "modules" / found[0].name)
        package = deb.name.split("_", 1)[0]
        meta = {"package": package, "release": release, "deb": deb.name}
        (staging / "kernel.json").write_text(json.dumps(meta, indent=2) + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        staging.rename(dest)  # atomic: a half-unpacked kernel is never used
    return GuestKernel(package=package, release=release, root=dest)


def load_cached(root: Path) -> GuestKernel | None:
    meta_path = root / "kernel.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    return GuestKernel(package=meta["package"], release=meta["release"], root=root)


def ensure_kernel(package: str | None = None) -> GuestKernel:
    """Return the cached guest kernel, downloading the Debian package on first use.

    ``$VIMS_KERNEL_DEB`` may point at a local linux-image .deb (offline hosts).
    """
    local_deb = os.environ.get("VIMS_KERNEL_DEB")
    if local_deb:
        deb = Path(local_deb)
        if not deb.is_file():
            raise LabError(f"VIMS_KERNEL_DEB={local_deb}: no such file")
        package = deb.name.split("_", 1)[0]
    kernels = cache_dir() / "kernels"
    if package is None:
        try:
            package = current_kernel_package()
        except LabError:
            # Offline, no package lists: the newest cached kernel will do.
            cached = sorted(p for p in kernels.glob("linux-image-*") if load_cached(p))
            if not cached:
                raise
            found = load_cached(cached[-1])
            assert found is not None
            return found
    if not _PKG_RE.match(package) or re.match(r"^linux-image-[0-9]+\.[0-9]+-amd64$", package):
        package = current_kernel_package(package)  # a meta-package: its image package
    root = kernels / package
    found = load_cached(root)
    if found is not None:
        return found
    kernels.mkdir(parents=True, exist_ok=True)
    if local_deb:
        with ui.step(f"unpacking {package}"):
            return unpack_kernel_deb(Path(local_deb), root)
    with tempfile.TemporaryDirectory(prefix="vims-deb-") as tmp:
        with ui.step(f"downloading Debian kernel {package}"):
            _run(["apt-get", "download", package], f"apt-get download {package}", cwd=Path(tmp))
        debs = list(Path(tmp).glob(f"{package}_*.deb"))
        if not debs:
            raise LabError(f"apt-get download {package} produced no .deb")
        with ui.step(f"unpacking {package}"):
            return unpack_kernel_deb(debs[0], root)
