"""Lifecycle of lab C-VMs: up, status, exec, pause, resume, snapshot, down.

Each lab is a QEMU process whose guest RAM is a shared file
(``memory-backend-file,share=on``), so its physical memory can be read live by
LibVMI's FILE driver or an mmap. State lives in ``<run_dir>/labs/<name>/lab.json``;
every command first reaps labs whose QEMU died, so a crash never leaves a RAM
file or socket behind for long.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vims import ui
from vims.errors import GuestCommandError, LabError
from vims.lab.console import GuestResult, run_in_guest
from vims.lab.initramfs import ensure_initramfs
from vims.lab.kernel import GuestKernel, ensure_kernel
from vims.lab.qmp import qmp_command
from vims.net import free_port
from vims.paths import run_dir, shm_dir
from vims.trace.gdbstub import owner_file, release

if TYPE_CHECKING:
    from vims.vmi.cpu import VcpuState

READY_MARK = "VIMS-LAB-READY"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
MIN_MEMORY = 256 << 20
# Below the PC machine's 3.5 GiB PCI hole guest-physical address == RAM file offset.
MAX_MEMORY = 3 << 30
SHM_MARGIN = 64 << 20
PAUSE_OWNER = "pause.owner"  # pid of the process inside a paused() block


def parse_size(text: str) -> int:
    """Parse ``512M``, ``1G``, ``1024k`` or a byte count."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)i?[bB]?\s*", text)
    if not m:
        raise LabError(f"bad memory size '{text}' (use e.g. 512M or 1G)")
    unit = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]
    return int(m.group(1)) * unit


@dataclass(frozen=True)
class LabSpec:
    """What to boot."""

    name: str = "cvm"
    memory: int = 512 << 20
    kaslr: bool = True
    http_port: int | None = None  # None: pick a free port
    kernel: Path | None = None  # None: the Debian kernel package below, fetched once
    kernel_package: str | None = None  # None: what linux-image-amd64 depends on
    initrd: Path | None = None  # None: the built busybox initramfs
    accel: str = "auto"  # auto | tcg | kvm
    churn: bool = False
    smp: int = 1
    boot_timeout: float = 180.0
    hypervisor: str = "qemu"  # qemu: the C-VM is QEMU's guest | xen: a domU of a nested Xen
    cvms: int = 1  # xen: C-VM domains to create (cvm1..cvmN)
    domu_type: str = "pv"  # xen: pv | pvh


@dataclass
class Lab:
    """A running (or recorded) lab C-VM."""

    name: str
    pid: int
    memory: int
    ram_path: str
    qmp_socket: str
    serial_socket: str
    serial_log: str
    qemu_log: str
    http_port: int
    kernel: str
    initrd: str
    kernel_release: str
    kaslr: bool
    accel: str
    started_at: float
    ready_seconds: float = 0.0
    cmdline: list[str] = field(default_factory=list)
    state: str = "running"
    # The Xen lab (hypervisor == "xen"): the QEMU process above runs Xen and dom0;
    # the C-VMs are the domUs below (each a vims.lab.xen.Domain as a dict).
    hypervisor: str = "qemu"
    ssh_port: int = 0
    ssh_key: str = ""
    share_dir: str = ""
    # QEMU's gdbstub (QEMU lab): where the system-call tracer attaches.
    gdb_socket: str = ""
    dom0_ready_seconds: float = 0.0
    domains: list[dict[str, Any]] = field(default_factory=list)

    @property
    def dir(self) -> Path:
        return Path(self.qmp_socket).parent

    def to_public(self) -> dict[str, object]:
        data = asdict(self)
        data.pop("cmdline")
        data["dir"] = str(self.dir)
        return data


def _pid_alive(pid: int, name: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    # Guard against PID reuse: the process must be this lab's QEMU.
    return f"vims-lab-{name}".encode() in cmdline and b"qemu" in cmdline.split(b"\0")[0]


def _orphaned(owner: Path) -> bool:
    """The file ``owner`` names a process that no longer exists."""
    try:
        pid = int(owner.read_text())
    except (OSError, ValueError):
        return False
    return not Path(f"/proc/{pid}").exists()


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def choose_accel(wanted: str) -> str:
    """TCG unless KVM really works: /dev/kvm here may be a PVM device that hangs stock kernels."""
    if wanted == "tcg":
        return "tcg"
    usable = os.access("/dev/kvm", os.R_OK | os.W_OK) and any(
        Path("/sys/module", m).exists() for m in ("kvm_intel", "kvm_amd")
    )
    if wanted == "kvm" and not usable:
        raise LabError("--accel kvm: /dev/kvm is missing or not a kvm_intel/kvm_amd device")
    return "kvm" if usable else "tcg"


def _up_in_progress(ldir: Path) -> bool:
    """Whether the ``vims lab up`` that made ``ldir`` is still running (its pid is in
    ``starting``); one killed mid-boot leaves the directory to be reaped."""
    try:
        pid = int((ldir / "starting").read_text().strip() or 0)
    except (OSError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LabManager:
    """Creates and controls lab C-VMs on this host."""

    def __init__(self, root: Path | None = None, ram_dir: Path | None = None) -> None:
        self.root = (root or run_dir()) / "labs"
        self.root.mkdir(parents=True, exist_ok=True)
        self.ram_dir = ram_dir or shm_dir()

    # ----------------------------------------------------------------- state
    def _dir(self, name: str) -> Path:
        return self.root / name

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        lock_path = self.root / f".{name}.lock"
        with lock_path.open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def _load(self, name: str) -> Lab | None:
        path = self._dir(name) / "lab.json"
        try:
            data = json.loads(path.read_text())
            return Lab(**data)
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            raise LabError(f"corrupt lab state {path}: {exc}") from exc

    def _save(self, lab: Lab) -> None:
        path = lab.dir / "lab.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(lab), indent=2) + "\n")
        tmp.replace(path)

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    def reap(self) -> list[str]:
        """Clean up labs whose QEMU is gone (crashed or killed). Returns their names."""
        reaped = []
        for name in self.names():
            with self._locked(name):
                lab = self._load(name)
                if lab is not None and _pid_alive(lab.pid, name):
                    continue
                if lab is None and _up_in_progress(self._dir(name)):
                    continue
                pid_file = self._dir(name) / "qemu.pid"
                if lab is None and pid_file.exists():  # an `up` killed before it finished
                    with contextlib.suppress(ValueError, OSError):
                        self._kill(int(pid_file.read_text()), name)
                self._cleanup(name, lab)
                reaped.append(name)
        for name in reaped:
            ui.note(f"lab '{name}': QEMU was gone; cleaned up its RAM file and sockets")
        return reaped

    def _cleanup(self, name: str, lab: Lab | None) -> None:
        # A Xen lab's RAM is QEMU's own (anonymous) memory: there is no file.
        if lab is None or lab.ram_path:
            ram = Path(lab.ram_path) if lab else self.ram_dir / f"vims-{name}.ram"
            ram.unlink(missing_ok=True)
        shutil.rmtree(self._dir(name), ignore_errors=True)

    def get(self, name: str) -> Lab:
        """A running lab by name, with its current run state."""
        self._check_name(name)
        self.reap()
        lab = self._load(name)
        if lab is None:
            known = ", ".join(self.names()) or "none"
            raise LabError(f"no lab named '{name}' (running: {known})")
        try:
            status = qmp_command(Path(lab.qmp_socket), "query-status", timeout=5)
            lab.state = "paused" if status.get("status") == "paused" else str(status.get("status"))
        except LabError:
            lab.state = "unresponsive"
        # No owner file: paused by an operator (vims lab pause), left alone.
        if lab.state == "paused" and _orphaned(lab.dir / PAUSE_OWNER):
            # An A-VM died inside its consistent read: do not leave the C-VM frozen.
            qmp_command(Path(lab.qmp_socket), "cont")
            (lab.dir / PAUSE_OWNER).unlink(missing_ok=True)
            ui.note(f"lab '{name}': resumed; the process that paused it (an A-VM) is gone")
            lab.state = "running"
        if lab.gdb_socket and _orphaned(owner_file(Path(lab.gdb_socket))):
            # A tracer died attached: its breakpoints would freeze the C-VM at the next hit.
            release(Path(lab.gdb_socket))
            ui.note(f"lab '{name}': removed the breakpoints of a tracer that is gone")
        return lab

    def list(self) -> list[Lab]:
        self.reap()
        return [self.get(n) for n in self.names() if self._load(n) is not None]

    @staticmethod
    def _check_name(name: str) -> None:
        if not NAME_RE.match(name):
            raise LabError(
                f"bad lab name '{name}': use 1-32 of a-z, 0-9 and '-', "
                "starting with a letter or digit"
            )

    # --------------------------------------------------------------------- up
    def up(self, spec: LabSpec) -> Lab:
        """Boot a lab C-VM and wait for its ready line."""
        self._check_name(spec.name)
        if spec.hypervisor not in ("qemu", "xen"):
            raise LabError(f"bad hypervisor '{spec.hypervisor}' (qemu or xen)")
        if not MIN_MEMORY <= spec.memory <= MAX_MEMORY:
            raise LabError(
                f"memory {spec.memory >> 20} MiB out of range "
                f"({MIN_MEMORY >> 20} MiB - {MAX_MEMORY >> 20} MiB)"
            )
        self.reap()
        ldir = self._dir(spec.name)
        with self._locked(spec.name):
            if ldir.exists():
                raise LabError(f"lab '{spec.name}' is already running (vims lab down {spec.name})")
            ldir.mkdir(parents=True)
            (ldir / "starting").write_text(f"{os.getpid()}\n")
        try:
            lab = self._boot(spec, ldir)
        except BaseException:
            with self._locked(spec.name):
                pid_file = ldir / "qemu.pid"
                if pid_file.exists():
                    self._kill(int(pid_file.read_text()), spec.name)
                self._cleanup(spec.name, None)
            raise
        (ldir / "starting").unlink(missing_ok=True)
        return lab

    def _preflight(self, spec: LabSpec) -> tuple[int, Path]:
        port = spec.http_port
        if port is not None:
            if not 1 <= port <= 65535:
                raise LabError(f"bad http port {port}")
            if not _port_free(port):
                raise LabError(f"http port {port} on 127.0.0.1 is already in use")
        else:
            port = free_port()
        if not self.ram_dir.is_dir():
            raise LabError(f"RAM directory {self.ram_dir} does not exist")
        st = os.statvfs(self.ram_dir)
        free = st.f_bavail * st.f_frsize
        if free < spec.memory + SHM_MARGIN:
            raise LabError(
                f"{self.ram_dir} has {free >> 20} MiB free; a {spec.memory >> 20} MiB guest needs "
                f"{(spec.memory + SHM_MARGIN) >> 20} MiB (free some, or set VIMS_SHM_DIR)"
            )
        ram = self.ram_dir / f"vims-{spec.name}.ram"
        if ram.exists():
            raise LabError(f"RAM file {ram} exists but no lab owns it; remove it first")
        if shutil.which("qemu-system-x86_64") is None:
            raise LabError("qemu-system-x86_64 not found (install qemu-system-x86)")
        for what, path in (("kernel", spec.kernel), ("initrd", spec.initrd)):
            if path is not None and not path.is_file():
                raise LabError(f"{what} {path} does not exist")
        return port, ram

    def _boot(self, spec: LabSpec, ldir: Path) -> Lab:
        if spec.hypervisor == "xen":
            from vims.lab.xen import boot_xen_lab

            lab, _ = boot_xen_lab(spec, ldir, Lab)
            self._save(lab)
            return lab
        port, ram = self._preflight(spec)
        release = "unknown"
        if spec.kernel is None:
            kernel: GuestKernel = ensure_kernel(spec.kernel_package)
            kernel_path, release = kernel.vmlinuz, kernel.release
            initrd = spec.initrd or ensure_initramfs(kernel)
        else:
            kernel_path = spec.kernel
            if spec.initrd is None:
                raise LabError(
                    "--kernel needs --initrd (the built initramfs matches the Debian kernel)"
                )
            initrd = spec.initrd
        accel = choose_accel(spec.accel)
        append = ["console=ttyS0", "quiet", "loglevel=1", "panic=-1"]
        if not spec.kaslr:
            append.append("nokaslr")
        if spec.churn:
            append.append("vims.churn=1")
        qmp, serial, gdb = ldir / "qmp.sock", ldir / "serial.sock", ldir / "gdb.sock"
        serial_log, qemu_log = ldir / "serial.log", ldir / "qemu.log"
        mb = spec.memory >> 20
        cmd = [
            "qemu-system-x86_64",
            "-name", f"vims-lab-{spec.name},process=vims-lab-{spec.name}",
            "-accel", accel,
            # 4-level paging, as on most servers (and what introspection tools expect).
            "-cpu", "max,-la57" if accel == "tcg" else "host",
            "-smp", str(spec.smp),
            "-m", f"{mb}M",
            "-object", f"memory-backend-file,id=mem,size={mb}M,mem-path={ram},share=on",
            "-machine", "pc,memory-backend=mem",
            "-kernel", str(kernel_path),
            "-initrd", str(initrd),
            "-append", " ".join(append),
            "-display", "none", "-vga", "none", "-no-reboot",
            "-nic", f"user,model=e1000,hostfwd=tcp:127.0.0.1:{port}-:80",
            "-chardev", f"socket,id=ser0,path={serial},server=on,wait=off,logfile={serial_log}",
            "-serial", "chardev:ser0",
            "-qmp", f"unix:{qmp},server=on,wait=off",
            # Costs nothing until a client attaches: the tracer (vims behaviour trace).
            "-gdb", f"unix:{gdb},server=on,wait=off",
            "-device", "vmcoreinfo",
        ]
        start = time.monotonic()
        with qemu_log.open("wb") as log:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # `down` and Ctrl-C of the CLI must not race
            )
        (ldir / "qemu.pid").write_text(str(proc.pid))
        with ui.step(f"booting lab C-VM '{spec.name}' ({accel.upper()}, {mb} MiB)"):
            self._wait_ready(proc, serial_log, qemu_log, spec.boot_timeout)
        lab = Lab(
            name=spec.name, pid=proc.pid, memory=spec.memory, ram_path=str(ram),
            qmp_socket=str(qmp), serial_socket=str(serial), serial_log=str(serial_log),
            gdb_socket=str(gdb),
            qemu_log=str(qemu_log), http_port=port, kernel=str(kernel_path), initrd=str(initrd),
            kernel_release=release, kaslr=spec.kaslr, accel=accel, started_at=time.time(),
            ready_seconds=round(time.monotonic() - start, 2), cmdline=cmd,
        )
        self._save(lab)
        return lab

    @staticmethod
    def _wait_ready(proc: subprocess.Popen[bytes], serial_log: Path, qemu_log: Path,
                    timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rc = proc.poll()
            if rc is not None:
                lines = qemu_log.read_text(errors="replace").strip().splitlines()
                tail = lines[-1:] or ["no output"]
                raise LabError(f"QEMU exited with status {rc} while booting: {tail[0]}")
            try:
                with serial_log.open("rb") as f:
                    if READY_MARK.encode() in f.read():
                        return
            except FileNotFoundError:
                pass
            time.sleep(0.1)
        raise LabError(f"guest not ready after {timeout:.0f} s (see {serial_log})")

    # ----------------------------------------------------------- operations
    def exec(self, name: str, command: str, timeout: float = 30.0,
             pause_grace: float = 2.0, *, dom0: bool = False,
             domain: str | None = None) -> GuestResult:
        """Run a command in the guest. A short pause (an A-VM's consistent read) is
        waited out; a guest paused for longer than ``pause_grace`` is an error.

        On a Xen lab the command runs in a C-VM domain (``domain``, else the first)
        through its bridged console, or in dom0 with ``dom0=True``."""
        lab = self.get(name)
        if lab.hypervisor == "xen":
            from vims.lab.xen import dom0_exec, domain_problem

            if dom0:
                return dom0_exec(lab, command, timeout)
            dom = self.domain(lab, domain)
            try:
                return run_in_guest(Path(dom["console_socket"]),
                                    lab.dir / f"console-{dom['name']}.lock", command, timeout)
            except GuestCommandError as exc:
                # A silent console most often means a dead domain: say so, with its tail.
                problem = domain_problem(lab, dom["name"])
                if problem is None:
                    raise
                raise GuestCommandError(f"{exc}: {problem}") from exc
        if dom0 or domain is not None:
            raise LabError(f"lab '{name}' is a QEMU lab: it has no dom0 or domains")
        deadline = time.monotonic() + min(pause_grace, timeout)
        while lab.state == "paused" and time.monotonic() < deadline:
            time.sleep(0.05)
            lab = self.get(name)
        if lab.state == "paused":
            raise LabError(f"lab '{name}' is paused (vims lab resume {name})")
        return run_in_guest(Path(lab.serial_socket), lab.dir / "console.lock", command, timeout)

    @staticmethod
    def domain(lab: Lab, name: str | None) -> dict[str, Any]:
        """A C-VM domain of a Xen lab by name (the first one when None)."""
        if not lab.domains:
            raise LabError(f"lab '{lab.name}' has no C-VM domains")
        if name is None:
            return lab.domains[0]
        for dom in lab.domains:
            if dom["name"] == name:
                return dom
        known = ", ".join(d["name"] for d in lab.domains)
        raise LabError(f"lab '{lab.name}' has no domain '{name}' (domains: {known})")

    def _xl(self, lab: Lab, verb: str, domain: str | None) -> None:
        from vims.lab.xen import dom0_ssh

        names = [self.domain(lab, domain)["name"]] if domain else [
            d["name"] for d in lab.domains]
        for dom in names:
            # SSH, not dom0's serial console: under load that console lost the end
            # marker of an `xl unpause` and the domain stayed paused.
            proc = dom0_ssh(lab, f"xl {verb} {dom}", timeout=60)
            if proc.returncode != 0:
                detail = (proc.stderr.strip() or proc.stdout.strip() or "no output")
                raise LabError(f"dom0: xl {verb} {dom} failed ({proc.returncode}): "
                               f"{detail.splitlines()[-1]}")

    def recreate_domain(self, name: str, domain: str, timeout: float = 300.0) -> Lab:
        """Xen lab: destroy a C-VM domain and create it again (after a crash, say)."""
        from vims.lab.xen import recreate_domain

        lab = self.get(name)
        if lab.hypervisor != "xen":
            raise LabError(f"lab '{name}' is a QEMU lab: it has no domains")
        self.domain(lab, domain)  # a one-line error for an unknown name
        with self._locked(name):  # get() reaps under the same lock: take it only now
            # The state as it is now, not as get() read it: another command may have
            # recreated another domain meanwhile, and saving a stale copy would undo it.
            current = self._load(name)
            if current is None:
                raise LabError(f"lab '{name}' went down")
            fresh = recreate_domain(current, domain, timeout)
            current.domains = [fresh.__dict__ if d["name"] == domain else d
                               for d in current.domains]
            self._save(current)
        current.state = lab.state
        return current

    def pause(self, name: str, domain: str | None = None) -> Lab:
        """Stop the C-VM: QMP stop, or `xl pause` of its domains on a Xen lab."""
        lab = self.get(name)
        if lab.hypervisor == "xen":
            self._xl(lab, "pause", domain)
            return lab
        if domain is not None:
            raise LabError(f"lab '{name}' is a QEMU lab: it has no domains")
        qmp_command(Path(lab.qmp_socket), "stop")
        lab.state = "paused"
        return lab

    def resume(self, name: str, domain: str | None = None) -> Lab:
        lab = self.get(name)
        if lab.hypervisor == "xen":
            self._xl(lab, "unpause", domain)
            return lab
        if domain is not None:
            raise LabError(f"lab '{name}' is a QEMU lab: it has no domains")
        qmp_command(Path(lab.qmp_socket), "cont")
        lab.state = "running"
        return lab

    @contextlib.contextmanager
    def paused(self, name: str) -> Iterator[Lab]:
        """Keep the guest stopped inside the block; leave it as it was found."""
        lab = self.get(name)
        was_paused = lab.state == "paused"
        owner = lab.dir / PAUSE_OWNER
        if not was_paused:
            owner.write_text(str(os.getpid()))  # so a crash mid-read can be undone
            qmp_command(Path(lab.qmp_socket), "stop")
        try:
            yield lab
        finally:
            if not was_paused:
                qmp_command(Path(lab.qmp_socket), "cont")
                owner.unlink(missing_ok=True)

    def vcpu_state(self, name: str) -> builtins.list[VcpuState]:
        """The guest's vCPU control registers, from QEMU's monitor."""
        from vims.vmi.cpu import parse_info_registers

        lab = self.get(name)
        if lab.hypervisor == "xen":
            raise LabError(f"lab '{name}' is a Xen lab: read its domains' vCPUs through LibVMI")
        args: dict[str, Any] = {"command-line": "info registers -a"}
        text = qmp_command(Path(lab.qmp_socket), "human-monitor-command", **args)
        try:
            return parse_info_registers(str(text))
        except ValueError as exc:
            raise LabError(str(exc)) from None

    def snapshot(self, name: str, out: Path) -> int:
        """Copy the guest's physical memory, taken while paused, to ``out``; returns its size."""
        if out.exists() and out.is_dir():
            raise LabError(f"{out} is a directory")
        if not out.parent.is_dir():
            raise LabError(f"directory {out.parent} does not exist")
        tmp = out.with_name(out.name + ".partial")
        if self.get(name).hypervisor == "xen":
            raise LabError(f"lab '{name}' is a Xen lab: its C-VMs' memory is Xen's, not a file "
                           "(xl dump-core in dom0 writes a domain's core)")
        with self.paused(name) as lab:
            try:
                with open(lab.ram_path, "rb") as src, tmp.open("wb") as dst:
                    shutil.copyfileobj(src, dst, 16 << 20)
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                raise LabError(f"snapshot to {out}: {exc.strerror}") from exc
        tmp.replace(out)  # never a half-written snapshot under the final name
        return out.stat().st_size

    def down(self, name: str) -> bool:
        """Stop a lab and remove everything it left. False when it was not running."""
        self._check_name(name)
        self.reap()
        with self._locked(name):
            lab = self._load(name)
            if lab is None:
                return False
            if _pid_alive(lab.pid, name):
                with contextlib.suppress(LabError):
                    qmp_command(Path(lab.qmp_socket), "quit", timeout=5)
                self._kill(lab.pid, name)
            self._cleanup(name, lab)
        return True

    @staticmethod
    def _kill(pid: int, name: str, grace: float = 5.0) -> None:
        deadline = time.monotonic() + grace
        while _pid_alive(pid, name) and time.monotonic() < deadline:
            time.sleep(0.05)
            _reap_child(pid)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not _pid_alive(pid, name):
                return
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            end = time.monotonic() + 3
            while _pid_alive(pid, name) and time.monotonic() < end:
                _reap_child(pid)
                time.sleep(0.05)
        if _pid_alive(pid, name):
            raise LabError(f"QEMU pid {pid} of lab '{name}' does not die")


def _reap_child(pid: int) -> None:
    """Collect a zombie if QEMU is our own child (it is, right after `up` in-process)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    except OSError as exc:  # pragma: no cover
        if exc.errno != errno.ECHILD:
            raise
