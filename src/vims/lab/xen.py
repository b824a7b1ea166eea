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
import re
import shlex
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
# The CPU QEMU emulates for Xen. SMAP off: with it on, dom0 dies at its first
# instruction. XSAVE and the AVX family off: under nested Xen, guests' FPU state went
# wrong now and then (a PVH domU triple fault in XRSTOR; glibc's loader in dom0
# failing its CPU-feature assertion), and QEMU 7.2 is the first release whose TCG
# emulates AVX. Without them Xen and its guests use FXSAVE and SSE code paths, which
# QEMU has emulated for many years. See also spec-ctrl=eager-fpu below.
XEN_LAB_CPU = "max,-smap,-smep,-la57,-xsave,-avx,-avx2,-fma,-f16c,-vaes,-vpclmulqdq"


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
        # A dead domain stays for a post-mortem (xl list shows it, xl dump-core reads
        # it): Xen turns a PVH domU's triple fault into a reboot ("Triple fault -
        # invoking HVM shutdown action 1", then "Dumping DomN vcpu#0 state").
        'on_crash = "preserve"',
        'on_reboot = "preserve"',
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
    # eager-fpu: Xen restores a vCPU's FPU state at every switch instead of trapping its
    # first FPU use (CR0.TS, #NM), Xen's default on AMD and so on this emulated SVM CPU:
    # one nested path fewer for the FPU-state failures named at XEN_LAB_CPU. It does not
    # cure the domU crash that NESTED_TCG_CRASH in the Xen tests reruns (measured).
    xen_args = (f"dom0_mem={DOM0_MEMORY_MB}M,max:{DOM0_MEMORY_MB}M dom0_max_vcpus=2 "
                "console=com1 com1=115200,8n1 noreboot loglvl=warning guest_loglvl=none "
                "spec-ctrl=eager-fpu")
    dom0_args = (f"root=/dev/vda ro console=hvc0 quiet loglevel=3 "
                 f"8250.nr_uarts={FIRST_PCI_TTY + MAX_CVMS}")
    cmd = [
        "qemu-system-x86_64",
        "-name", f"vims-lab-{name},process=vims-lab-{name}",
        "-accel", "tcg",
        "-cpu", XEN_LAB_CPU,
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
    """An ssh command line into dom0 (for people, Ansible and tests).

    Keep-alives end the session when dom0 stops answering (a hung or dead QEMU)
    instead of leaving ssh waiting on a socket that never closes.
    """
    cmd = ["ssh", "-i", lab.ssh_key, "-p", str(lab.ssh_port), "-o", "BatchMode=yes",
           "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
           "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=20",
           "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4", "root@127.0.0.1"]
    return [*cmd, command] if command is not None else cmd


def _short(command: str) -> str:
    line = " ".join(command.split())
    return line if len(line) <= 70 else line[:67] + "..."


# ssh's words when the session never started (so the command never ran and may be
# sent again): under load, QEMU's user-mode network accepts the connection on the
# host and then drops it before dom0's sshd answers.
_NOT_STARTED = ("kex_exchange_identification", "Connection refused", "Connection reset",
                "Connection closed", "Connection timed out", "banner exchange")
SSH_ATTEMPTS = 4


def dom0_ssh(lab: Lab, command: str, timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
    """Run ``command`` in dom0 over SSH, bounded by ``timeout`` seconds on both ends.

    dom0's ``timeout`` ends the command there a little earlier than ssh is given
    up here, so a command stuck in dom0 (a LibVMI call on a dead domain) does not
    live on; it gets SIGTERM first, so that it can resume a domain it paused. A
    session that never started is tried again (a few times, within ``timeout``).
    A timeout, or ssh failing, is a one-line :class:`LabError`; the command's own
    failure is the caller's to judge (its status and output).
    """
    deadline = time.monotonic() + timeout
    for attempt in range(1, SSH_ATTEMPTS + 1):
        left = deadline - time.monotonic()
        remote = f"timeout -k 10 {max(1, int(left) - 15)} sh -c {shlex.quote(command)}"
        try:
            proc = subprocess.run(ssh_command(lab, remote), stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, timeout=left, check=False)
        except subprocess.TimeoutExpired:
            raise LabError(f"dom0 (ssh): '{_short(command)}' gave no answer within "
                           f"{timeout:.0f} s") from None
        if proc.returncode != 255 or proc.stdout:
            break
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        if not any(w in last for w in _NOT_STARTED) or attempt == SSH_ATTEMPTS \
                or deadline - time.monotonic() < 30:
            raise LabError(f"dom0 (ssh): '{_short(command)}' failed: {last}"
                           + (f" ({attempt} attempts)" if attempt > 1 else ""))
        time.sleep(3 * attempt)
    if proc.returncode == 124:
        raise LabError(f"dom0: '{_short(command)}' timed out after {timeout - 15:.0f} s "
                       "(stopped by timeout in dom0)")
    return proc


# xl list's state column: r running, b blocked, p paused, s shut down, c crashed, d dying.
_BAD_STATES = {"c": "crashed", "s": "shut down", "d": "dying"}
# What Xen prints when it crashes a domain (domain_crash(): "Domain 2 (vcpu#0) crashed
# on cpu#1:", then "*** Dumping Dom2 vcpu#0 state: ***"; a triple fault names d2v0).
_XEN_CRASH = re.compile(rb"Dumping Dom(\d+) vcpu|Domain (\d+) .{0,40}crashed"
                        rb"|d(\d+)v\d+ [Tt]riple fault")


_XEN_KEY = re.compile(r"Triple fault|crashed|domain_crash|Dumping Dom|RIP:")


def xen_console_tail(lab: Lab, lines: int = 6) -> list[str]:
    """The last lines Xen itself printed (``(XEN)``) on the lab's serial console after boot."""
    try:
        raw = Path(lab.serial_log).read_bytes()
    except OSError:
        return []
    xen = [ln.strip() for ln in raw.decode(errors="replace").splitlines() if "(XEN)" in ln]
    booted = max((i for i, ln in enumerate(xen) if "Freed" in ln and "init memory" in ln),
                 default=-1)
    after = xen[booted + 1:]
    # Of a vCPU dump, what says where the guest died; then Xen's last lines.
    key = [ln for ln in after[:-lines or None] if _XEN_KEY.search(ln)]
    return key[-4:] + after[-lines:]


def crashed_domids(console: bytes) -> set[int]:
    """Domain ids that Xen's console output says crashed or triple-faulted."""
    return {int(next(g for g in m.groups() if g)) for m in _XEN_CRASH.finditer(console)}


def crashed_in_xen_log(lab: Lab) -> set[int]:
    """Domain ids that the lab's Xen console says crashed (host side: no dom0 needed)."""
    try:
        return crashed_domids(Path(lab.serial_log).read_bytes())
    except OSError:
        return set()


# A kernel's last words worth naming even when a register dump follows them.
_LAST_WORDS = re.compile(r"Kernel panic|BUG:|Oops|general protection|Fatal exception"
                         r"|segfault|double linked list corrupted")


def console_tail(console: bytes, lines: int = 4) -> list[str]:
    """The last lines a C-VM's console printed, without the exec framing (markers, prompts).

    A panic or oops line further up (a stack dump follows it) comes first.
    """
    text = []
    for raw in console.decode(errors="replace").splitlines():
        line = raw.strip()
        while line.startswith("cvm# "):
            line = line[5:].lstrip()
        if line and line != "cvm#" and "__VIMS_" not in line and "base64 -d" not in line:
            text.append(line)
    tail = text[-lines:]
    cause = [ln for ln in text[-80:-lines or None] if _LAST_WORDS.search(ln)]
    return cause[:1] + tail if lines else tail


def domain_console_tail(dom: dict[str, Any], lines: int = 4) -> list[str]:
    """The last lines of a C-VM's own console (a panic lands there), read on the host."""
    try:
        return console_tail(Path(dom["console_log"]).read_bytes()[-(64 << 10):], lines)
    except OSError:
        return []


def domain_states(lab: Lab, timeout: float = 45.0) -> dict[str, str]:
    """``xl list`` in dom0: domain name -> state flags (``-b----``)."""
    proc = dom0_ssh(lab, "xl list", timeout)
    if proc.returncode != 0:
        raise LabError(f"dom0: xl list failed: {(proc.stderr.strip() or 'no output')[-200:]}")
    states = {}
    for line in proc.stdout.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 6:
            states[fields[0]] = fields[4]
    return states


def domain_problems(lab: Lab, timeout: float = 45.0) -> list[str]:
    """What is wrong with the lab's C-VM domains, one line each (empty: all running).

    Xen's own console is read on the host, so a crash is seen even when dom0 does
    not answer; ``xl list`` then tells a crashed, missing or paused domain.
    """
    problems = []
    crashed = crashed_in_xen_log(lab)
    try:
        states: dict[str, str] | None = domain_states(lab, timeout)
    except LabError as exc:
        states = None
        problems.append(str(exc))
    for dom in lab.domains:
        name = dom["name"]
        why = []
        if dom["domid"] in crashed:
            why.append(f"Xen dumped its vCPU state (domain {dom['domid']} crashed)")
        if states is not None:
            flags = states.get(name)
            if flags is None:
                why.append("not in xl list")
            else:
                bad = [text for flag, text in _BAD_STATES.items() if flag in flags]
                if bad:
                    why.append(f"xl list says {', '.join(bad)} ({flags})")
        if why:
            tail = domain_console_tail(dom)
            problems.append(f"C-VM domain {name}: " + "; ".join(why)
                            + ("; its console: " + " | ".join(tail) if tail else ""))
    if problems:
        xen = xen_console_tail(lab)
        if xen:
            problems.append("Xen console: " + " | ".join(xen))
    return problems


def domain_problem(lab: Lab, name: str, timeout: float = 45.0) -> str | None:
    """One line on what is wrong with domain ``name`` (None: it runs)."""
    lines = [p for p in domain_problems(lab, timeout)
             if p.startswith((f"C-VM domain {name}:", "dom0", "Xen console"))]
    if not any(p.startswith(("C-VM", "dom0")) for p in lines):
        return None
    return "; ".join(lines)


def create_domain(lab: Lab, index: int, name: str, domu_type: str, memory_mb: int,
                  timeout: float) -> Domain:
    """Create a C-VM domain, bridge its console to the host and wait for its ready line."""
    share = lab.dir / "share"
    (share / f"{name}.cfg").write_text(domu_config(name, domu_type, memory_mb))
    log = lab.dir / f"cvm{index}.log"
    seen = log.stat().st_size if log.exists() else 0  # a recreated domain: its new lines
    tty = f"/dev/ttyS{FIRST_PCI_TTY + index}"
    start = time.monotonic()
    # Over SSH rather than dom0's serial console: under load Xen's console loses bytes
    # of dom0's output, and a lost end marker costs the whole timeout.
    proc = dom0_ssh(lab, f"sh {SHARE_MOUNT}/bin/vims-domu-start {name} "
                         f"{SHARE_MOUNT}/{name}.cfg {tty}", timeout=180)
    out = proc.stdout
    if proc.returncode != 0:
        detail = (out.strip() or proc.stderr.strip() or "no output").splitlines()[-1]
        raise LabError(f"vims-domu-start {name} failed ({proc.returncode}): {detail}")
    try:
        domid = int(out.strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        raise LabError(f"vims-domu-start {name}: no domain id in '{out.strip()[:80]}'") from exc
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and CVM_READY.encode() in log.read_bytes()[seen:]:
            break
        if domid in crashed_in_xen_log(lab):
            raise LabError(f"C-VM domain {name} crashed while booting; Xen console: "
                           + " | ".join(xen_console_tail(lab, 3)))
        time.sleep(0.3)
    else:
        tail = dom0_ssh(lab, f"tail -c 600 /var/log/xen/console/guest-{name}.log", 60).stdout
        raise LabError(f"C-VM domain {name} not ready after {timeout:.0f} s; console tail: "
                       + " | ".join(tail.strip().splitlines()[-3:]))
    return Domain(name=name, type=domu_type, memory_mb=memory_mb, domid=domid,
                  console_socket=str(lab.dir / f"cvm{index}.sock"), console_log=str(log),
                  dom0_tty=tty, ready_seconds=round(time.monotonic() - start, 2))


def recreate_domain(lab: Lab, name: str, timeout: float) -> Domain:
    """Destroy C-VM domain ``name`` (crashed, hung or running) and create it afresh.

    The same config, console port and share; Xen gives it a new domain id.
    """
    index = next((i for i, d in enumerate(lab.domains) if d["name"] == name), None)
    if index is None:
        raise LabError(f"lab '{lab.name}' has no domain '{name}'")
    old = Domain.from_dict(lab.domains[index])
    # The old console bridge and domain go first; either may already be gone.
    dom0_ssh(lab, f"kill $(cat /run/vims/bridge-{name}.pid) 2>/dev/null; "
                  f"xl destroy {name} 2>/dev/null; true", timeout=60)
    return create_domain(lab, index, name, old.type, old.memory_mb, timeout)


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
    dom0_ok(lab, f"sh {SHARE_MOUNT}/bin/vims-dom0-sshd", timeout=120)
    domains = []
    for i in range(spec.cvms):
        name = f"cvm{i + 1}"
        dtype = types[i % len(types)]
        with ui.step(f"creating C-VM domain '{name}' ({dtype.upper()}, {domu_mb} MiB)"):
            domains.append(create_domain(lab, i, name, dtype, domu_mb, spec.boot_timeout))
    lab.domains = [d.__dict__ for d in domains]
    lab.ready_seconds = round(time.monotonic() - start, 2)
    return lab, proc
