"""Walkers over a Linux guest's kernel structures, read from outside.

Names follow the kernel's own helpers (``list_for_each``, ``for_each_process``,
``d_path``). Guest memory is attacker-controlled: every walk is bounded, checks
pointers before following them, detects cycles, and raises ``WalkError`` with
the address where it gave up instead of looping or trusting garbage.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from vims.vmi.memory import GuestMemory, MemoryReadError

MAX_TASKS = 32768
MAX_THREADS = 4096
MAX_MODULES = 4096
MAX_PATH_DEPTH = 64
MAX_RB_NODES = 65536
KERNEL_SPACE = 0xFFFF800000000000
PIDTYPE_PID = 0


IDT_ENTRIES = 256


def idt_gates(mem: GuestMemory, base: int | None = None) -> list[tuple[int, int, int]]:
    """``(handler, selector, attributes)`` of the 256 gates of the IDT at ``base``
    (default ``idt_table``); attributes are the gate's IST, type, DPL and P bits
    (``struct idt_bits``), runtime addresses."""
    raw = mem.read(mem.sym("idt_table") if base is None else base, IDT_ENTRIES * 16)
    out = []
    for i in range(IDT_ENTRIES):
        low, seg, bits, mid, high, _res = struct.unpack_from("<HHHHII", raw, i * 16)
        out.append((low | mid << 16 | high << 32, seg, bits))
    return out


def idt_handlers(mem: GuestMemory) -> list[int]:
    """Handler addresses of the 256 gates of ``idt_table`` (runtime addresses)."""
    return [handler for handler, _, _ in idt_gates(mem)]


XEN_DOMAIN_TYPES = {0: "native", 1: "pv", 2: "hvm"}  # enum xen_domain_type


def xen_guest_type(mem: GuestMemory) -> str:
    """How the guest kernel runs: native, pv, hvm or pvh (from its own xen_domain_type).

    Feature-detected by symbol: a kernel built without Xen support is native.
    """
    if not mem.profile.has_symbol("xen_domain_type"):
        return "native"
    kind = XEN_DOMAIN_TYPES.get(mem.u32(mem.sym("xen_domain_type")), "unknown")
    if kind == "hvm" and mem.profile.has_symbol("xen_pvh") and mem.read(mem.sym("xen_pvh"), 1)[0]:
        return "pvh"
    return kind


class WalkError(Exception):
    """A kernel structure is inconsistent or unreadable (corrupt or tampered)."""

    def __init__(self, what: str, address: int | None = None) -> None:
        where = f" at 0x{address:x}" if address is not None else ""
        super().__init__(f"{what}{where}")
        self.address = address


def is_kernel_pointer(value: int) -> bool:
    return KERNEL_SPACE <= value < 1 << 64 and value & 7 == 0


class Struct:
    """A struct read in one go, with members looked up by the profile's layout."""

    def __init__(self, mem: GuestMemory, name: str, address: int, raw: bytes | None = None):
        self.mem, self.name, self.address = mem, name, address
        self.raw = raw if raw is not None else mem.read(address, mem.profile.size(name))

    def off(self, member: str) -> int:
        return self.mem.profile.offset(self.name, member)

    def _unpack(self, fmt: str, member: str) -> int:
        o = self.off(member)
        value: int = struct.unpack_from(fmt, self.raw, o)[0]
        return value

    def ptr(self, member: str) -> int:
        return self._unpack("<Q", member)

    def u32(self, member: str) -> int:
        return self._unpack("<I", member)

    def i32(self, member: str) -> int:
        return self._unpack("<i", member)

    def u8(self, member: str) -> int:
        return self._unpack("<B", member)

    def cstr(self, member: str, size: int) -> str:
        o = self.off(member)
        return self.raw[o:o + size].split(b"\0", 1)[0].decode("utf-8", errors="replace")

    def addr_of(self, member: str) -> int:
        return self.address + self.off(member)


def list_for_each(mem: GuestMemory, head: int, limit: int) -> Iterator[int]:
    """Yield each ``struct list_head *`` of the list at ``head`` (the head excluded).

    Checks the ``prev`` back-link of every node, so a half-unlinked (torn or
    tampered) list is reported rather than silently followed.
    """
    seen: set[int] = set()
    prev = head
    node = mem.u64(head)
    while node != head:
        if not is_kernel_pointer(node):
            raise WalkError("list pointer outside kernel space", prev)
        if node in seen:
            raise WalkError("cycle in list", node)
        if len(seen) >= limit:
            raise WalkError(f"list longer than {limit} entries", head)
        if mem.u64(node + 8) != prev:
            raise WalkError("list back-link mismatch", node)
        seen.add(node)
        yield node
        prev, node = node, mem.u64(node)


# include/linux/sched.h; macros, so not in BTF. Unchanged since Linux 2.6.27.
PF_EXITING = 0x00000004
PF_KTHREAD = 0x00200000


@dataclass
class Task:
    """A task as the A-VM sees it."""

    address: int
    pid: int
    tgid: int
    ppid: int
    comm: str
    uid: int
    euid: int
    gid: int
    cred: int
    real_cred: int
    mm: int
    pgd: int = 0
    exe: str = ""
    exe_file: int = 0
    flags: int = 0  # task_struct.flags (PF_*)

    # Without a user address space (mm) a task runs no user code, so the process
    # checks pass over it; flags only say which kind it is. A task that has an mm is
    # judged as a process whatever its flags claim (a flag is one bit to flip).
    @property
    def kernel_thread(self) -> bool:
        return self.mm == 0 and not self.exited

    @property
    def exited(self) -> bool:
        """A zombie, or a process past exit_mm(): no code of its own runs any more."""
        return self.mm == 0 and self.flags & (PF_EXITING | PF_KTHREAD) == PF_EXITING

    def public(self) -> dict[str, object]:
        return {"pid": self.pid, "ppid": self.ppid, "comm": self.comm, "exe": self.exe,
                "uid": self.uid, "euid": self.euid, "kernel_thread": self.kernel_thread,
                "exited": self.exited}


@dataclass
class Module:
    """A loaded kernel module."""

    address: int
    name: str
    base: int
    size: int
    text_size: int
    state: int = 0

    def public(self) -> dict[str, object]:
        return {"name": self.name, "base": f"0x{self.base:x}", "size": self.size}


@dataclass
class KernelView:
    """One consistent reading of the guest's process and module state."""

    tasks: list[Task] = field(default_factory=list)
    modules: list[Module] = field(default_factory=list)


class Linux:
    """Kernel-structure readers for one guest (memory + profile)."""

    def __init__(self, mem: GuestMemory) -> None:
        self.mem = mem
        self.p = mem.profile
        self._cred_uid = self.p.offset("cred", "uid")

    # ---------------------------------------------------------------- tasks
    def read_task(self, address: int) -> Task:
        t = Struct(self.mem, "task_struct", address)
        parent = t.ptr("real_parent")
        ppid = 0
        if parent and parent != address:
            if not is_kernel_pointer(parent):
                raise WalkError("task real_parent is not a kernel pointer", address)
            ppid = self.mem.i32(parent + t.off("tgid"))
        cred = t.ptr("cred")
        if not is_kernel_pointer(cred):
            raise WalkError("task cred is not a kernel pointer", address)
        ids = self.mem.read(cred + self._cred_uid, 24)  # uid gid suid sgid euid egid
        uid, gid, _suid, _sgid, euid, _egid = struct.unpack("<6I", ids)
        mm = t.ptr("mm")
        task = Task(address=address, pid=t.i32("pid"), tgid=t.i32("tgid"), ppid=ppid,
                    comm=t.cstr("comm", 16), uid=uid, euid=euid, gid=gid, cred=cred,
                    real_cred=t.ptr("real_cred"), mm=mm, flags=t.u32("flags"))
        if mm:
            if not is_kernel_pointer(mm):
                raise WalkError("task mm is not a kernel pointer", address)
            mms = Struct(self.mem, "mm_struct", mm, self.mem.read(mm, self.p.size("mm_struct")))
            pgd = mms.ptr("pgd")
            try:
                task.pgd = self.mem.kv2p(pgd)
            except MemoryReadError:
                task.pgd = 0
            task.exe_file = mms.ptr("exe_file")
            if task.exe_file:
                try:
                    task.exe = self.d_path(task.exe_file + self.p.offset("file", "f_path"))
                except (WalkError, MemoryReadError) as exc:
                    task.exe = f"<unreadable: {exc}>"
        return task

    def for_each_process(self) -> Iterator[int]:
        """Thread-group leaders, from ``init_task.tasks`` (what ``ps`` shows)."""
        init = self.mem.sym("init_task")
        off = self.p.offset("task_struct", "tasks")
        yield init
        for node in list_for_each(self.mem, init + off, MAX_TASKS):
            yield node - off

    def threads_of(self, leader: int) -> Iterator[int]:
        """Other threads of a thread group: ``task_struct.thread_group`` before 6.7,
        then ``signal->thread_head``, which lists every thread, the leader too."""
        if self.p.has_member("task_struct", "thread_group"):
            off = self.p.offset("task_struct", "thread_group")
            for node in list_for_each(self.mem, leader + off, MAX_THREADS):
                yield node - off
            return
        signal = self.mem.u64(leader + self.p.offset("task_struct", "signal"))
        if not is_kernel_pointer(signal):
            raise WalkError("task signal is not a kernel pointer", leader)
        off = self.p.offset("task_struct", "thread_node")
        for node in list_for_each(self.mem, signal + self.p.offset("signal_struct",
                                                                   "thread_head"), MAX_THREADS):
            if node - off != leader:
                yield node - off

    def tasks(self, with_threads: bool = False) -> list[Task]:
        out = []
        for addr in self.for_each_process():
            out.append(self.read_task(addr))
            if with_threads:
                out.extend(self.read_task(t) for t in self.threads_of(addr))
        return out

    # ---------------------------------------------------------------- paths
    def d_path(self, path_addr: int) -> str:
        """Absolute path of a ``struct path *`` (follows mounts up to the root)."""
        p = self.p
        mnt = self.mem.u64(path_addr + p.offset("path", "mnt"))
        dentry = self.mem.u64(path_addr + p.offset("path", "dentry"))
        mount = mnt - p.offset("mount", "mnt")
        parts: list[str] = []
        for _ in range(MAX_PATH_DEPTH):
            if not (is_kernel_pointer(dentry) and is_kernel_pointer(mount)):
                raise WalkError("path component is not a kernel pointer", dentry)
            mnt_root = self.mem.u64(mount + p.offset("mount", "mnt") + p.offset("vfsmount",
                                                                               "mnt_root"))
            parent = self.mem.u64(dentry + p.offset("dentry", "d_parent"))
            if dentry in (mnt_root, parent):
                if dentry != mnt_root:  # a pseudo file (memfd): its own root, named alone
                    parts.append(self._dentry_name(dentry))
                    return "/" + "/".join(reversed(parts))
                parent_mount = self.mem.u64(mount + p.offset("mount", "mnt_parent"))
                if parent_mount in (mount, 0):
                    return "/" + "/".join(reversed(parts))
                dentry = self.mem.u64(mount + p.offset("mount", "mnt_mountpoint"))
                mount = parent_mount
                continue
            parts.append(self._dentry_name(dentry))
            dentry = parent
        raise WalkError(f"path deeper than {MAX_PATH_DEPTH}", path_addr)

    def _dentry_name(self, dentry: int) -> str:
        q = dentry + self.p.offset("dentry", "d_name")
        length = self.mem.u32(q + self.p.offset("qstr", "len"))
        name = self.mem.u64(q + self.p.offset("qstr", "name"))
        if length > 255:
            raise WalkError("dentry name longer than NAME_MAX", dentry)
        return self.mem.read(name, length).decode("utf-8", errors="replace")

    # -------------------------------------------------------------- modules
    def modules(self) -> list[Module]:
        head = self.mem.sym("modules")
        off = self.p.offset("module", "list")
        name_size = 56  # MODULE_NAME_LEN on 64-bit
        out = []
        for node in list_for_each(self.mem, head, MAX_MODULES):
            out.append(self.read_module(node - off, name_size))
        return out

    def read_module(self, address: int, name_size: int = 56) -> Module:
        m = Struct(self.mem, "module", address)
        if self.p.has_member("module", "core_layout"):
            base = m.ptr("core_layout.base")
            size = m.u32("core_layout.size")
            text = m.u32("core_layout.text_size")
        else:  # 6.4+: struct module_memory mem[MOD_MEM_NUM_TYPES], mem[0] is MOD_TEXT
            base = m.ptr("mem")
            size = text = self.mem.u32(m.addr_of("mem") + 8)
        return Module(address=address, name=m.cstr("name", name_size), base=base, size=size,
                      text_size=text, state=m.u32("state"))
