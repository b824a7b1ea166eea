"""The Xen lab: Xen 4.17 and a Debian dom0 nested in QEMU TCG, C-VMs as domUs.

QEMU boots Xen's multiboot ELF with dom0's kernel and initrd as modules
(``-cpu max,-smap,-smep``: with SMAP on, dom0 dies at its first instruction).
dom0 is the A-VM here: Debian's Xen has no XSM/FLASK, so only dom0 may map a
domU's memory.

Channels from the host:

* dom0's console is Xen's ``com1`` (QEMU's first serial port, a unix socket):
  ``vims lab exec N --dom0 -- CMD`` runs the framed exec of ``lab/console.py``
  on it, as on the QEMU lab.
* SSH to dom0 through a QEMU host-forwarded loopback port with a key made for
  the lab (``vims lab status --format json`` gives port and key): for Ansible.
* Each C-VM's Xen console (a pty of xenconsoled in dom0) is bridged by socat to
  a PCI serial port of the QEMU machine, which is a unix socket on the host: so
  ``vims lab exec N -- CMD`` drives the C-VM's own console shell exactly as on
  the QEMU lab, and its ready line lands in a host-side log.
* A 9p share (``<lab dir>/share`` at /vims in dom0) carries the C-VM kernel and
  initramfs, the vims package (dom0's venv points at /vims/site), profiles,
  baselines and reports.
"""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vims import ui
from vims.errors import LabError
from vims.lab.console import GuestResult, run_in_guest
from vims.lab.initramfs import ensure_initramfs, find_static_busybox
from vims.lab.kernel import GuestKernel, ensure_kernel
from vims.lab.xenimage import XenImages, ensure_xen_images
from vims.net import free_port

if TYPE_CHECKING:
    from vims.lab.manager import Lab, LabSpec

DOM0_READY = "VIMS-DOM0-READY"
CVM_READY = "VIMS-LAB-READY"
DOM0_MEMORY_MB = 1024
MAX_CVMS = 4
DOMU_TYPES = ("pv", "pvh")
# PCI serial ports come after the four legacy ttyS0-3 (Linux numbers them so).
FIRST_PCI_TTY = 4
SHARE_MOUNT = "/vims"
DOM0_PACE = 0.015  # seconds between 16-byte pieces of a dom0 console command


@dataclass(frozen=True)
class Domain:
    """A C-VM domain of a Xen lab, as recorded in lab.json."""

    name: str
    type: str
    memory_mb: int
    domid: int
    console_socket: str
    console_log: str
    dom0_tty: str
    ready_seconds: float

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Domain:
        return cls(**data)


def domu_types(text: str) -> list[str]:
    """``pv``, ``pvh`` or a comma list (``pv,pvh``: domain i takes the i-th, cycling)."""
    types = [t.strip() for t in text.split(",")]
    bad = [t for t in types if t not in DOMU_TYPES]
    if bad or not types:
        raise LabError(f"bad domU type '{text}' (pv, pvh, or a list such as pv,pvh)")
    return types


def domu_config(name: str, domu_type: str, memory_mb: int) -> str:
    """xl configuration of a C-VM: the QEMU lab's kernel and workload, console on hvc0."""
    lines = [
        f'name = "{name}"',
        f'type = "{domu_type}"',
        f'kernel = "{SHARE_MOUNT}/vmlinuz"',
        f'ramdisk = "{SHARE_MOUNT}/cvm-initrd.gz"',
        'extra = "console=hvc0 quiet loglevel=1 panic=-1"',
        f"memory = {memory_mb}",
        "vcpus = 1",
        'on_crash = "preserve"',
        'on_reboot = "destroy"',
    ]
    if domu_type == "pvh":
        # Measured: without these a PVH domU hangs early under nested TCG.
        lines += ['tsc_mode = "native"', 'cpuid = "host,rdtscp=0"']
    return "\n".join(lines) + "\n"


def _cpio_overlay(files: dict[str, bytes]) -> bytes:
    """A newc archive of ``files``; appended to an initramfs it replaces them."""
    busybox = find_static_busybox()
    with tempfile.TemporaryDirectory(prefix="vims-overlay-") as tmp:
        names = []
        for rel, data in files.items():
            path = Path(tmp, rel)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            names += [str(p) for p in reversed(Path(rel).parents) if str(p) != "."]
            names.append(rel)
        proc = subprocess.run([str(busybox), "cpio", "-o", "-H", "newc"], cwd=tmp,
                              input=("\n".join(dict.fromkeys(names)) + "\n").encode(),
                              capture_output=True, check=False)
        if proc.returncode != 0:
            raise LabError(f"cpio (C-VM overlay) failed: {proc.stderr.decode(errors='replace')}")
    return proc.stdout


def domu_initrd(cvm_initrd: Path, out: Path) -> None:
    """The QEMU lab's initramfs with only its inittab replaced (console hvc0, not ttyS0).

    The kernel unpacks concatenated archives in order, later files winning, so
    every executable stays byte-for-byte the one the baseline hashes.
    """
    inittab = Path(str(resources.files("vims.lab") / "domu/etc/inittab")).read_bytes()
    # One gzip member: libxc's loader (PVH) inflates only the first of several.
    out.write_bytes(gzip.compress(gzip.decompress(cvm_initrd.read_bytes())
                                  + _cpio_overlay({"etc/inittab": inittab}), 6))


def _share_runtime(share: Path) -> None:
    """Put this host's vims package on the share, where dom0's venv finds it, and the
    dom0 helper scripts (kept out of the cached image so that they can change)."""
    import vims

    shutil.copytree(Path(str(resources.files("vims.lab") / "xenshare")), share / "bin")

    src = Path(vims.__file__).parent
    shutil.copytree(src, share / "site" / "vims",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    # Byte-compile here: dom0's Python (Debian's 3.11) takes 3.11 bytecode, and
    # compiling under nested TCG costs a minute on the first `vims` in dom0.
    import compileall

    if sys.version_info[:2] == (3, 11):
        compileall.compile_dir(share / "site", quiet=1, workers=2)


def _ssh_key(ldir: Path, name: str) -> Path:
    key = ldir / "ssh_key"
    proc = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
                           f"vims-lab-{name}", "-f", str(key)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise LabError(f"ssh-keygen failed: {proc.stderr.strip() or 'no output'}")
    return key


def qemu_command(name: str, images: XenImages, ldir: Path, cvms: int, domu_mb: int,
                 ssh_port: int) -> list[str]:
    """The QEMU machine that runs Xen: dom0 console, C-VM console ports, share, SSH port."""
    machine_mb = DOM0_MEMORY_MB + 512 + cvms * (domu_mb + 64)
    xen_args = (f"dom0_mem={DOM0_MEMORY_MB}M,max:{DOM0_MEMORY_MB}M dom0_max_vcpus=2 "
                "console=com1 com1=115200,8n1 noreboot loglvl=warning guest_loglvl=none")
    dom0_args = (f"root=/dev/vda ro console=hvc0 quiet loglevel=3 "
                 f"8250.nr_uarts={FIRST_PCI_TTY + MAX_CVMS}")
    cmd = [
        "qemu-system-x86_64",
        "-name", f"vims-lab-{name},process=vims-lab-{name}",
        "-accel", "tcg",
        "-cpu", "max,-smap,-smep,-la57",
        "-smp", "2",
        "-m", f"{machine_mb}M",
        "-machine", "pc",
        "-kernel", str(images.hypervisor),
        "-append", xen_args,
        # Multiboot modules: dom0's kernel with its command line, then its initrd.
        "-initrd", f"{images.kernel.vmlinuz} {dom0_args},{images.dom0_initrd}",
        "-drive", f"file={ldir / 'dom0.qcow2'},if=virtio,format=qcow2",
        "-virtfs", f"local,path={ldir / 'share'},mount_tag=vims,security_model=none,id=vims",
        "-nic", f"user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{ssh_port}-:22",
        "-display", "none", "-vga", "none", "-no-reboot",
        "-chardev", f"socket,id=ser0,path={ldir / 'serial.sock'},server=on,wait=off,"
                    f"logfile={ldir / 'serial.log'}",
        "-serial", "chardev:ser0",
        "-qmp", f"unix:{ldir / 'qmp.sock'},server=on,wait=off",
    ]
    for i in range(cvms):
        cmd += [
            "-chardev", f"socket,id=cvm{i},path={ldir / f'cvm{i}.sock'},server=on,wait=off,"
                        f"logfile={ldir / f'cvm{i}.log'}",
            "-device", f"pci-serial,chardev=cvm{i},addr={0x10 + i:#x}",
        ]
    return cmd


def _check_paths(*paths: Path) -> None:
    # QEMU splits -initrd on ',' and the module command line on ' '.
    for path in paths:
        if any(c in str(path) for c in ", "):
            raise LabError(f"path {path} holds a comma or space, which QEMU's multiboot "
                           "loader cannot take (set VIMS_CACHE / VIMS_RUN_DIR elsewhere)")


def wait_for_line(proc: subprocess.Popen[bytes], log: Path, mark: str, timeout: float,
                  what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LabError(f"QEMU exited with status {proc.returncode} while {what}")
        try:
            if mark.encode() in log.read_bytes():
                return
        except FileNotFoundError:
            pass
        time.sleep(0.2)
    # The lab directory goes when `up` fails: say here what the console said last.
    tail = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    raise LabError(f"{what}: not ready after {timeout:.0f} s; console tail: "
                   + " | ".join(tail[-3:])[-300:])


def dom0_exec(lab: Lab, command: str, timeout: float = 60.0) -> GuestResult:
    """Run a shell command in dom0 over its serial console."""
    # Paced: Xen's serial input ring drops bytes that come faster than dom0 reads them.
    return run_in_guest(Path(lab.serial_socket), lab.dir / "console.lock", command, timeout,
                        pace=DOM0_PACE)


def dom0_ok(lab: Lab, command: str, timeout: float = 60.0) -> str:
    result = dom0_exec(lab, command, timeout)
    if result.exit_code != 0:
        detail = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()
        raise LabError(f"dom0: '{command[:60]}' failed ({result.exit_code}): {detail[-1]}")
    return result.stdout


def ssh_command(lab: Lab, command: str | None = None) -> list[str]:
    """An ssh command line into dom0 (for people, Ansible and tests)."""
    cmd = ["ssh", "-i", lab.ssh_key, "-p", str(lab.ssh_port), "-o", "BatchMode=yes",
           "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
           "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=20", "root@127.0.0.1"]
    return [*cmd, command] if command is not None else cmd


def create_domain(lab: Lab, index: int, name: str, domu_type: str, memory_mb: int,
                  timeout: float) -> Domain:
    """Create a C-VM domain, bridge its console to the host and wait for its ready line."""
    share = lab.dir / "share"
    (share / f"{name}.cfg").write_text(domu_config(name, domu_type, memory_mb))
    log = lab.dir / f"cvm{index}.log"
    tty = f"/dev/ttyS{FIRST_PCI_TTY + index}"
    start = time.monotonic()
    out = dom0_ok(lab, f"sh {SHARE_MOUNT}/bin/vims-domu-start {name} "
                       f"{SHARE_MOUNT}/{name}.cfg {tty}", timeout=180)
    try:
        domid = int(out.strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        raise LabError(f"vims-domu-start {name}: no domain id in '{out.strip()[:80]}'") from exc
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and CVM_READY.encode() in log.read_bytes():
            break
        time.sleep(0.3)
    else:
        tail = dom0_exec(lab, f"tail -c 600 /var/log/xen/console/guest-{name}.log").stdout
        raise LabError(f"C-VM domain {name} not ready after {timeout:.0f} s; console tail: "
                       + " | ".join(tail.strip().splitlines()[-3:]))
    return Domain(name=name, type=domu_type, memory_mb=memory_mb, domid=domid,
                  console_socket=str(lab.dir / f"cvm{index}.sock"), console_log=str(log),
                  dom0_tty=tty, ready_seconds=round(time.monotonic() - start, 2))


def boot_xen_lab(spec: LabSpec, ldir: Path,
                 lab_factory: Any) -> tuple[Lab, subprocess.Popen[bytes]]:
    """Boot Xen + dom0 under QEMU, then the C-VM domains. Writes ``qemu.pid`` early."""
    types = domu_types(spec.domu_type)
    if not 1 <= spec.cvms <= MAX_CVMS:
        raise LabError(f"--cvms {spec.cvms} out of range (1-{MAX_CVMS})")
    for tool in ("qemu-system-x86_64", "qemu-img", "ssh-keygen", "ssh"):
        if shutil.which(tool) is None:
            raise LabError(f"'{tool}' not found (run scripts/setup.sh)")
    kernel: GuestKernel = ensure_kernel()
    images = ensure_xen_images(kernel)
    cvm_initrd = ensure_initramfs(kernel)
    _check_paths(images.hypervisor, images.kernel.vmlinuz, images.dom0_initrd, ldir)
    share = ldir / "share"
    (share / "ssh").mkdir(parents=True)
    key = _ssh_key(ldir, spec.name)
    shutil.copy2(key.with_suffix(".pub"), share / "ssh/authorized_keys")
    shutil.copy2(kernel.vmlinuz, share / "vmlinuz")
    domu_initrd(cvm_initrd, share / "cvm-initrd.gz")
    _share_runtime(share)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                    str(images.dom0_image), str(ldir / "dom0.qcow2")], check=True,
                   capture_output=True)
    ssh_port = free_port()
    domu_mb = spec.memory >> 20
    cmd = qemu_command(spec.name, images, ldir, spec.cvms, domu_mb, ssh_port)
    start = time.monotonic()
    with (ldir / "qemu.log").open("wb") as qlog:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=qlog,
                                stderr=subprocess.STDOUT, start_new_session=True)
    (ldir / "qemu.pid").write_text(str(proc.pid))
    with ui.step(f"booting Xen 4.17 + dom0 for lab '{spec.name}' (nested TCG)"):
        wait_for_line(proc, ldir / "serial.log", DOM0_READY, spec.boot_timeout,
                      "booting Xen and dom0")
    dom0_seconds = round(time.monotonic() - start, 2)
    lab: Lab = lab_factory(
        name=spec.name, pid=proc.pid, memory=spec.memory, ram_path="",
        qmp_socket=str(ldir / "qmp.sock"), serial_socket=str(ldir / "serial.sock"),
        serial_log=str(ldir / "serial.log"), qemu_log=str(ldir / "qemu.log"), http_port=0,
        kernel=str(kernel.vmlinuz), initrd=str(cvm_initrd), kernel_release=kernel.release,
        kaslr=False, accel="tcg", started_at=time.time(), ready_seconds=dom0_seconds,
        cmdline=cmd, hypervisor="xen", ssh_port=ssh_port, ssh_key=str(key),
        share_dir=str(share), dom0_ready_seconds=dom0_seconds,
    )
    domains = []
    for i in range(spec.cvms):
        name = f"cvm{i + 1}"
        dtype = types[i % len(types)]
        with ui.step(f"creating C-VM domain '{name}' ({dtype.upper()}, {domu_mb} MiB)"):
            domains.append(create_domain(lab, i, name, dtype, domu_mb, spec.boot_timeout))
    lab.domains = [d.__dict__ for d in domains]
    lab.ready_seconds = round(time.monotonic() - start, 2)
    return lab, proc
