"""Build the lab C-VM's initramfs: busybox-static, the guest modules, the workload.

The archive is content-addressed in the cache: the same inputs give the same
file, so it is built once per kernel and workload version.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

from vims import ui
from vims.errors import LabError
from vims.lab.kernel import GuestKernel
from vims.paths import cache_dir

BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
_DIRS = ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "run", "tmp", "root",
         "home/alice", "var/log", "www/cgi-bin", "etc/crontabs")


def find_static_busybox() -> Path:
    for cand in BUSYBOX_CANDIDATES:
        path = Path(cand)
        if path.is_file():
            with path.open("rb") as f:
                head = f.read(1 << 16)
            # A dynamically linked ELF names its interpreter in PT_INTERP.
            if b"/lib64/ld-linux" not in head and b"/lib/ld-linux" not in head:
                return path
    raise LabError("no static busybox found (install the Debian package busybox-static)")


def _guest_tree() -> Path:
    return Path(str(resources.files("vims.lab") / "guest"))


def _inputs_digest(kernel: GuestKernel, busybox: Path) -> str:
    h = hashlib.sha256(b"vims-initramfs-v1\0")
    h.update(kernel.release.encode())
    files = [busybox, *sorted(kernel.modules_dir.iterdir())]
    guest = _guest_tree()
    files += sorted(p for p in guest.rglob("*") if p.is_file())
    for path in files:
        rel = str(path.relative_to(guest)) if path.is_relative_to(guest) else path.name
        h.update(rel.encode() + b"\0" + oct(path.stat().st_mode & 0o777).encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]


def _stage(root: Path, kernel: GuestKernel, busybox: Path) -> None:
    for d in _DIRS:
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, root / "bin/busybox")
    for applet in _applets(busybox):
        link = root / "bin" / applet
        if not link.exists():
            link.symlink_to("busybox")
    # busybox init as PID 1: the kernel runs /init from an initramfs.
    (root / "init").symlink_to("bin/busybox")
    moddir = root / "lib/modules" / kernel.release
    moddir.mkdir(parents=True)
    for mod in sorted(kernel.modules_dir.iterdir()):
        shutil.copy2(mod, moddir / mod.name)
    shutil.copytree(_guest_tree(), root, dirs_exist_ok=True)
    (root / "www").chmod(0o755)
    os.chmod(root / "tmp", 0o1777)


def _applets(busybox: Path) -> list[str]:
    out = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True)
    return [a for a in out.stdout.split() if a and "/" not in a and a != "busybox"]


def pack_cpio(root: Path, out: Path) -> None:
    """Pack ``root`` (which holds bin/busybox) as a gzipped newc cpio at ``out``."""
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    busybox = root / "bin/busybox"
    proc = subprocess.run(
        [str(busybox), "cpio", "-o", "-H", "newc"],
        cwd=root, input=("\n".join(names) + "\n").encode(), capture_output=True, check=False,
    )
    if proc.returncode != 0:
        raise LabError(f"cpio failed: {proc.stderr.decode(errors='replace').strip()}")
    tmp = out.with_suffix(".partial")
    with gzip.open(tmp, "wb", compresslevel=6) as f:
        f.write(proc.stdout)
    tmp.rename(out)


def ensure_initramfs(kernel: GuestKernel) -> Path:
    """Return the cached initramfs for ``kernel``, building it when inputs changed."""
    busybox = find_static_busybox()
    out_dir = cache_dir() / "initramfs"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"cvm-{kernel.release}-{_inputs_digest(kernel, busybox)}.cpio.gz"
    if out.is_file():
        return out
    with ui.step("building the C-VM initramfs"), tempfile.TemporaryDirectory(
        prefix="vims-initramfs-"
    ) as tmp:
        _stage(Path(tmp), kernel, busybox)
        pack_cpio(Path(tmp), out)
    return out
