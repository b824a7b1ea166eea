"""System-call tracing of selected C-VM processes from outside, through QEMU's gdbstub.

The tracer stops the guest at the kernel's system-call dispatch (``x64_sys_call``
where the kernel has it, else ``do_syscall_64``: RDI is the saved ``pt_regs``,
RSI the call number), reads the current task and the arguments, and resumes.
Each stop costs milliseconds of host time under TCG, so tracing can be *gated*
by context switches: a breakpoint in ``switch_mm_irqs_off`` (reached only when
the CPU switches to a user address space; RDX = the next task) inserts the
system-call breakpoint only while a monitored process runs. Unmonitored load
then costs one stop per switch into it instead of one per system call; which is
cheaper depends on the load (see the README's tracing figures).

Monitored processes: those whose ``comm`` matches an application's globs, and
(``follow_children``) every descendant of one — a CGI or a shell an exploited
server spawns is traced as part of that server's behaviour.

Resuming from a breakpoint would hit it again, so the instruction under it is
executed by the tracer: a NOP is skipped, a ``push`` is done on the guest's
stack, and anything else is single-stepped (one more stop).

The guest is untrusted: its strings and socket addresses are read with bounds,
and a task that cannot be read is reported as such, never followed.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vims.errors import VimsError
from vims.trace.gdbstub import GdbError, Gdbstub, StopReply, owner_file
from vims.vmi.memory import GuestMemory, MemoryReadError

log = logging.getLogger("vims.trace")

MAX_TRACKED = 4096
KERNEL_HALF = 0xFFFF_8000_0000_0000  # canonical kernel addresses start here
MAX_ANCESTRY = 8
MAX_STRING = 256
HOLD_TIMEOUT = 30.0

# Instructions the tracer can perform itself instead of single-stepping (x86-64).
NOPS = (bytes.fromhex("f30f1efa"),  # endbr64 (a NOP without IBT enforcement)
        bytes.fromhex("0f1f440000"), bytes.fromhex("660f1f440000"),
        bytes.fromhex("0f1f8000000000"), bytes.fromhex("660f1f840000000000"),
        bytes.fromhex("0f1f4000"), bytes.fromhex("0f1f00"), bytes.fromhex("6690"),
        bytes.fromhex("90"))
PUSH = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi")
PUSH_EXT = ("r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")

# Calls whose arguments the models assert on (x86-64 argument registers in pt_regs).
PATH_ARG = {"open": 0, "creat": 0, "openat": 1, "openat2": 1, "execve": 0, "execveat": 1}
SOCKADDR_ARG = {"connect", "bind", "sendto"}
ARG_REGS = ("di", "si", "dx", "r10", "r8", "r9")
AF_UNIX, AF_INET, AF_INET6 = 1, 2, 10


class TraceError(VimsError):
    """The tracer cannot attach to or keep up with the C-VM."""


@dataclass(frozen=True)
class Instruction:
    """What the tracer does for the instruction under one of its breakpoints."""

    length: int
    push: str | None = None  # register pushed; None with length 0 means single-step

    @classmethod
    def decode(cls, code: bytes) -> Instruction:
        for nop in NOPS:
            if code.startswith(nop):
                return cls(len(nop))
        if code and 0x50 <= code[0] <= 0x57:
            return cls(1, PUSH[code[0] - 0x50])
        if len(code) > 1 and code[0] == 0x41 and 0x50 <= code[1] <= 0x57:
            return cls(2, PUSH_EXT[code[1] - 0x50])
        return cls(0)


@dataclass(frozen=True)
class SyscallEvent:
    """One system call a monitored process entered."""

    time: float
    app: str
    pid: int
    tgid: int
    comm: str
    nr: int
    name: str
    args: tuple[int, ...]
    arg: str | None = None  # the decoded path or address, when the call has one

    def public(self) -> dict[str, Any]:
        out: dict[str, Any] = {"app": self.app, "pid": self.pid, "tgid": self.tgid,
                               "comm": self.comm, "syscall": self.name, "nr": self.nr,
                               "args": [f"0x{a:x}" for a in self.args]}
        if self.arg is not None:
            out["arg"] = self.arg
        return out


@dataclass
class TraceStats:
    stops: int = 0
    switch_stops: int = 0
    syscall_stops: int = 0
    steps: int = 0
    events: int = 0
    unreadable: int = 0
    seconds: float = 0.0
    host_seconds_stopped: float = 0.0

    def public(self) -> dict[str, Any]:
        return {**self.__dict__, "seconds": round(self.seconds, 3),
                "host_seconds_stopped": round(self.host_seconds_stopped, 3)}


@dataclass
class _Task:
    app: str | None
    pid: int
    tgid: int
    comm: str
    mm: int


@dataclass
class _Layout:
    """Offsets and runtime addresses the tracer needs, from the C-VM's profile."""

    current_task: int
    comm: int
    pid: int
    tgid: int
    real_parent: int
    group_leader: int
    mm: int
    pgd: int
    regs: dict[str, int]
    pt_regs_size: int
    names: list[str] = field(default_factory=list)


def kernel_gs_base(regs: dict[str, int]) -> int | None:
    """The kernel's per-CPU base among a vCPU's GS bases, or None.

    Which of GS_BASE and KERNEL_GS_BASE holds it depends on where the vCPU
    stopped, and ring 0 is not enough to tell: between SYSCALL and the entry's
    SWAPGS (and back on exit) the kernel runs with the user's GS. The per-CPU
    base is the one in the kernel half of the address space.
    """
    for name in ("gs_base", "k_gs_base"):
        value = regs.get(name, 0)
        if value >= KERNEL_HALF:
            return value
    return None


def syscall_names(mem: GuestMemory) -> list[str]:
    """Name of each system call number, from the profile's table as linked."""
    out: list[str] = []
    for handler in mem.profile.syscall_table:
        sym = mem.profile.symbolize(handler)
        for prefix in ("__x64_sys_", "__x64_compat_sys_", "sys_"):
            if sym.startswith(prefix):
                sym = sym[len(prefix):]
                break
        out.append(sym if "+" not in sym else f"nr{len(out)}")
    if not out:
        raise TraceError("the profile has no system-call table (rebuild it with vims profile "
                         "build)")
    return out


def app_globs(apps: dict[str, Any]) -> dict[str, list[str]]:
    """Application name -> comm globs (a bare name selects itself)."""
    out = {}
    for name, globs in apps.items():
        pats = globs if isinstance(globs, list) else [globs] if globs else [name]
        out[str(name)] = [str(p) for p in pats]
    if not out:
        raise TraceError("no application selected for tracing")
    return out


class SyscallTracer:
    """Trace the selected applications of one QEMU C-VM until ``stop()``.

    ``on_event`` runs on the tracer's thread for every system call of a
    monitored process, while the guest is stopped; keep it short.
    ``paused()`` gives other readers (the A-VM's rounds) a stopped guest:
    while a tracer is attached, QMP stop/cont would race its breakpoints.
    """

    def __init__(self, mem: GuestMemory, gdb: Path, apps: dict[str, Any],
                 on_event: Callable[[SyscallEvent], None], *, gate: bool = True,
                 follow_children: bool = True,
                 tracked: OrderedDict[tuple[int, int], str] | None = None) -> None:
        self.mem = mem
        self.gdb_path = gdb
        self.apps = app_globs(apps)
        self.on_event = on_event
        self.gate = gate
        self.follow_children = follow_children
        self.stats = TraceStats()
        self.error: str | None = None
        # (tgid, leader) -> application: survives re-attaching when the caller keeps it,
        # so a shell whose parent exited is still known as the server's.
        self._tracked: OrderedDict[tuple[int, int], str] = (
            tracked if tracked is not None else OrderedDict())
        self._gdb: Gdbstub | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._state = "detached"  # running | handling | held | external | detached
        self._pauses = 0
        self._interrupted = False
        self._armed = False
        self._layout = self._read_layout()
        self._sites: dict[int, tuple[str, Instruction]] = {}

    # ------------------------------------------------------------- set-up
    def _read_layout(self) -> _Layout:
        p = self.mem.profile
        regs = {r: p.offset("pt_regs", r) for r in (*ARG_REGS, "orig_ax")}
        return _Layout(
            current_task=p.symbol("current_task"), comm=p.offset("task_struct", "comm"),
            pid=p.offset("task_struct", "pid"), tgid=p.offset("task_struct", "tgid"),
            real_parent=p.offset("task_struct", "real_parent"),
            group_leader=p.offset("task_struct", "group_leader"),
            mm=p.offset("task_struct", "mm"), pgd=p.offset("mm_struct", "pgd"), regs=regs,
            pt_regs_size=p.size("pt_regs"),
            names=syscall_names(self.mem))

    def _site(self, gdb: Gdbstub, symbol: str) -> int:
        address = self.mem.sym(symbol)
        code = gdb.read_memory(address, 16)
        self._sites[address] = (symbol, Instruction.decode(code))
        return address

    def start(self) -> None:
        """Attach (the guest stops), set the breakpoints and let it run."""
        gdb = Gdbstub(self.gdb_path)
        with contextlib.suppress(OSError):
            owner_file(self.gdb_path).write_text(str(os.getpid()))
        try:
            self._vcpus = gdb.threads()
            if self.gate and len(self._vcpus) > 1:
                raise TraceError(f"gating needs a C-VM with one vCPU ({len(self._vcpus)} here): "
                                 "a breakpoint armed for one vCPU's task stops them all")
            self._vcpu = self._vcpus[0] if self._vcpus else "p1.1"
            entry = "x64_sys_call" if self.mem.profile.has_symbol("x64_sys_call") \
                else "do_syscall_64"
            self._syscall_site = self._site(gdb, entry)
            self._switch_site = self._site(gdb, "switch_mm_irqs_off") if self.gate else 0
            current = self._current(gdb.read_registers())
            if self.gate:  # a task we cannot name is armed for: the next switch decides
                gdb.insert_breakpoint(self._switch_site)
                self._arm(gdb, current is None or current.app is not None)
            else:
                self._arm(gdb, True)
        except BaseException:
            gdb.detach()
            owner_file(self.gdb_path).unlink(missing_ok=True)
            raise
        self._gdb = gdb
        self._t0 = time.monotonic()
        with self._cond:
            self._state = "running"
            gdb.cont()
        self._thread = threading.Thread(target=self._loop, name="vims-tracer", daemon=True)
        self._thread.start()

    def _arm(self, gdb: Gdbstub, on: bool) -> None:
        if on and not self._armed:
            gdb.insert_breakpoint(self._syscall_site)
        elif not on and self._armed:
            gdb.remove_breakpoint(self._syscall_site)
        self._armed = on

    # ----------------------------------------------------------------- loop
    def _loop(self) -> None:
        gdb = self._gdb
        assert gdb is not None
        try:
            while not self._stop.is_set():
                reply = gdb.wait(0.2)
                if reply is None:
                    continue
                stopped = time.monotonic()
                with self._cond:
                    external = reply.signal == 2 and not self._interrupted
                    self._interrupted = False
                    self._state = "handling"
                if reply.exited:
                    raise TraceError("the C-VM exited while traced")
                if external:
                    # Someone else stopped the VM (QMP stop, vims lab pause): it is
                    # theirs to resume; the next breakpoint reports itself.
                    with self._cond:
                        self._state = "external"
                        self._cond.notify_all()
                    continue
                if reply.trap:
                    self._handle(gdb, reply)
                with self._cond:
                    if self._pauses:
                        self._state = "held"
                        self._cond.notify_all()
                        while self._pauses and not self._stop.is_set():
                            self._cond.wait(0.5)
                    self.stats.host_seconds_stopped += time.monotonic() - stopped
                    if self._stop.is_set():
                        break
                    self._state = "running"
                    gdb.cont()
        except Exception as exc:  # noqa: BLE001 - reported through .error and the check
            self.error = str(exc)
            log.error("tracer stopped: %s", exc)
        finally:
            with self._cond:
                self._state = "detached"
                self._cond.notify_all()
            with contextlib.suppress(Exception):
                gdb.detach()
            owner_file(self.gdb_path).unlink(missing_ok=True)
            self.stats.seconds = time.monotonic() - self._t0

    def _handle(self, gdb: Gdbstub, reply: StopReply) -> None:
        if reply.thread and reply.thread != self._vcpu:  # another vCPU hit it
            gdb.select_thread(reply.thread)
            self._vcpu = reply.thread
        regs = gdb.read_registers()
        rip = regs["rip"]
        site = self._sites.get(rip)
        if site is None:
            return  # not ours (a step's trap): nothing to skip
        self.stats.stops += 1
        if rip == self._switch_site and self.gate:
            self.stats.switch_stops += 1
            nxt = self._task(regs["rdx"])  # switch_mm_irqs_off(prev, next_mm, tsk)
            self._arm(gdb, nxt is not None and nxt.app is not None)
        elif rip == self._syscall_site:
            self.stats.syscall_stops += 1
            self._syscall(regs)
        self._execute(gdb, rip, site[1], regs)

    def _execute(self, gdb: Gdbstub, rip: int, insn: Instruction, regs: dict[str, int]) -> None:
        """Do the instruction under the breakpoint so that ``c`` does not hit it again."""
        if insn.length == 0:
            self.stats.steps += 1
            gdb.remove_breakpoint(rip)
            gdb.step()
            gdb.insert_breakpoint(rip)
            return
        if insn.push is not None:
            rsp = regs["rsp"] - 8
            gdb.write_memory(rsp, struct.pack("<Q", regs[insn.push]))
            gdb.write_register("rsp", rsp)
        gdb.write_register("rip", rip + insn.length)

    # -------------------------------------------------------------- reading
    def _task(self, address: int) -> _Task | None:
        """The task at ``address`` and the application it belongs to (None: unreadable)."""
        lay, mem = self._layout, self.mem
        try:
            raw = mem.read(address + lay.comm, 16)
            comm = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
            pid, tgid = mem.u32(address + lay.pid), mem.u32(address + lay.tgid)
            mm = mem.u64(address + lay.mm)
            if mm == 0:
                return _Task(None, pid, tgid, comm, 0)  # a kernel thread
            leader = mem.u64(address + lay.group_leader)
            key = (tgid, leader)
            app = self._tracked.get(key)
            if app is None:
                app = self._match(comm)
            if app is None and self.follow_children:
                app = self._ancestry(leader)
        except MemoryReadError as exc:
            log.debug("task 0x%x unreadable: %s", address, exc)
            self.stats.unreadable += 1
            return None
        if app is not None:
            self._tracked[key] = app
            self._tracked.move_to_end(key)
            while len(self._tracked) > MAX_TRACKED:
                self._tracked.popitem(last=False)
        return _Task(app, pid, tgid, comm, mm)

    def _match(self, comm: str) -> str | None:
        return next((a for a, globs in self.apps.items()
                     if any(fnmatch.fnmatchcase(comm, g) for g in globs)), None)

    def _ancestry(self, leader: int) -> str | None:
        """The application of the nearest ancestor that belongs to one (bounded walk)."""
        lay, mem = self._layout, self.mem
        task = leader
        for _ in range(MAX_ANCESTRY):
            parent = mem.u64(mem.u64(task + lay.real_parent) + lay.group_leader)
            if parent == task:
                return None  # the idle task is its own parent
            tgid = mem.u32(parent + lay.tgid)
            if tgid <= 1:
                return None  # init adopts orphans: no application above it
            app = self._tracked.get((tgid, parent))
            if app is None:
                app = self._match(mem.read(parent + lay.comm, 16).split(b"\0", 1)[0].decode(
                    "utf-8", "replace"))
            if app is not None:
                return app
            task = parent
        return None

    def _current(self, regs: dict[str, int]) -> _Task | None:
        """The task running on the stopped vCPU (None: not readable at this instant)."""
        gs = kernel_gs_base(regs)
        current = None
        try:
            if gs is not None:
                current = self.mem.u64(gs + self._layout.current_task)
        except MemoryReadError as exc:
            log.debug("current task unreadable: %s", exc)
        if current is None:
            self.stats.unreadable += 1
            return None
        return self._task(current)

    def _syscall(self, regs: dict[str, int]) -> None:
        lay, mem = self._layout, self.mem
        task = self._current(regs)
        if task is None or task.app is None:
            return
        nr = regs["rsi"] & 0xFFFFFFFF
        name = lay.names[nr] if nr < len(lay.names) else f"nr{nr}"
        try:
            raw = mem.read(regs["rdi"], lay.pt_regs_size)  # ends where the kernel stack does
        except MemoryReadError as exc:
            log.debug("pt_regs unreadable: %s", exc)
            self.stats.unreadable += 1
            return
        args = tuple(struct.unpack_from("<Q", raw, lay.regs[r])[0] for r in ARG_REGS)
        event = SyscallEvent(time.time(), task.app, task.pid, task.tgid, task.comm, nr, name,
                             args, self._decode(name, args, task))
        self.stats.events += 1
        self.on_event(event)

    def _decode(self, name: str, args: tuple[int, ...], task: _Task) -> str | None:
        if name not in PATH_ARG and name not in SOCKADDR_ARG:
            return None
        try:
            # The guest ran since the last stop: cached user translations may be stale.
            self.mem.flush()
            dtb = self.mem.kv2p(self.mem.u64(task.mm + self._layout.pgd))
            if name in PATH_ARG and len(args) > PATH_ARG[name]:
                return self._user_string(args[PATH_ARG[name]], dtb)
            if name in SOCKADDR_ARG and len(args) > 2:
                return self._sockaddr(args[1], min(args[2], 128), dtb)
        except MemoryReadError:
            return "?"  # not mapped yet (the kernel would fault it in): unknown, not absent
        return None

    def _user_string(self, vaddr: int, dtb: int) -> str:
        out = b""
        while len(out) < MAX_STRING:
            chunk = min(MAX_STRING - len(out), 4096 - (vaddr + len(out)) % 4096)
            data = self.mem.read_user(vaddr + len(out), chunk, dtb)
            if b"\0" in data:
                return (out + data.split(b"\0", 1)[0]).decode("utf-8", "replace")
            out += data
        return out.decode("utf-8", "replace") + "..."

    def _sockaddr(self, vaddr: int, size: int, dtb: int) -> str | None:
        if size < 2:
            return None
        raw = self.mem.read_user(vaddr, size, dtb)
        family = struct.unpack_from("<H", raw)[0]
        if family == AF_INET and size >= 8:
            port = struct.unpack_from(">H", raw, 2)[0]
            return f"inet:{'.'.join(str(b) for b in raw[4:8])}:{port}"
        if family == AF_INET6 and size >= 24:
            import ipaddress
            port = struct.unpack_from(">H", raw, 2)[0]
            return f"inet6:[{ipaddress.IPv6Address(raw[8:24])}]:{port}"
        if family == AF_UNIX:
            return "unix:" + raw[2:].split(b"\0", 1)[0].decode("utf-8", "replace")
        return f"family{family}"

    # --------------------------------------------------------------- control
    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hold the guest stopped (through the gdbstub) for the block."""
        with self._cond:
            if self._state == "detached":
                raise TraceError(f"tracer is not attached ({self.error or 'stopped'})")
            self._pauses += 1
            try:
                if self._state == "running" and self._gdb is not None:
                    self._interrupted = True
                    self._gdb.interrupt()
                deadline = time.monotonic() + HOLD_TIMEOUT
                while self._state not in ("held", "external", "detached"):
                    if not self._cond.wait(max(0.0, deadline - time.monotonic())):
                        raise TraceError("the traced C-VM did not stop in time")
                if self._state == "detached":
                    raise TraceError(f"tracer stopped: {self.error or 'detached'}")
            except BaseException:
                self._pauses -= 1
                self._cond.notify_all()
                raise
        try:
            yield
        finally:
            with self._cond:
                self._pauses -= 1
                self._cond.notify_all()

    def stop(self, timeout: float = 10.0) -> TraceStats:
        """Detach: breakpoints removed, the guest left running."""
        self._stop.set()
        with self._cond:
            if self._state == "running" and self._gdb is not None:
                self._interrupted = True
                with contextlib.suppress(GdbError):
                    self._gdb.interrupt()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TraceError("tracer did not detach in time")
        return self.stats

    def __enter__(self) -> SyscallTracer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
