"""What a process is doing, read from outside: open files, sockets, memory maps, syscall.

Walkers named after the kernel's own structures (``files_struct``/``fdtable``,
``socket``/``sock_common``, the ``mm_struct.mm_mt`` maple tree of
``vm_area_struct``, the saved ``pt_regs``). Guest memory is attacker-controlled:
every walk is bounded, pointers are checked before they are followed, and an
inconsistent structure raises :class:`~vims.vmi.linux.WalkError`.

The maple tree reader is written here by hand: no maintained Python library
parses the kernel's in-memory maple tree (drgn has one, but drgn cannot read
LibVMI's view of a live guest). It reads node layouts (pivot and slot counts)
from the profile, never from a kernel version.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from vims.vmi.linux import Linux, Struct, Task, WalkError, is_kernel_pointer
from vims.vmi.memory import MemoryReadError

MAX_FDS = 4096  # descriptors looked at per process
MAX_VMAS = 65536  # the kernel's default vm.max_map_count
MAX_TREE_DEPTH = 16
THREAD_SIZE = 16384  # x86-64 kernel stacks without KASAN: 4 pages
USER_CS = 0x33  # __USER_CS: a pt_regs saved from 64-bit user mode

VM_READ, VM_WRITE, VM_EXEC = 0x1, 0x2, 0x4
# include/linux/maple_tree.h: node pointers carry their type in bits 3..6.
MAPLE_NODE_MASK = 0xFF
MAPLE_LEAF_64, MAPLE_RANGE_64, MAPLE_ARANGE_64 = 1, 2, 3
AF_INET, AF_INET6, AF_UNIX = 2, 10, 1
SOCK_STREAM, SOCK_DGRAM = 1, 2
TCP_LISTEN = 10
TCP_STATES = {1: "established", 2: "syn_sent", 3: "syn_recv", 4: "fin_wait1", 5: "fin_wait2",
              6: "time_wait", 7: "close", 8: "close_wait", 9: "last_ack", 10: "listen",
              11: "closing", 12: "new_syn_recv"}


@dataclass(frozen=True)
class OpenFile:
    fd: int
    path: str  # d_path of f_path; "socket:" for sockets

    def public(self) -> dict[str, object]:
        return {"fd": self.fd, "path": self.path}


@dataclass(frozen=True)
class Sock:
    fd: int
    family: str  # inet, inet6, unix, or the number
    kind: str  # tcp, udp, raw, ...
    state: str
    local: str
    local_port: int
    remote: str
    remote_port: int

    @property
    def listening(self) -> bool:
        return self.state == "listen" or (self.kind == "udp" and self.remote_port == 0
                                          and self.local_port != 0)

    def public(self) -> dict[str, object]:
        return {"fd": self.fd, "family": self.family, "kind": self.kind, "state": self.state,
                "local": f"{self.local}:{self.local_port}",
                "remote": f"{self.remote}:{self.remote_port}"}


@dataclass(frozen=True)
class Vma:
    start: int
    end: int
    flags: int
    path: str  # backing file, "" for anonymous memory
    special: str = ""  # "vdso" for the kernel's own mapping

    @property
    def perms(self) -> str:
        return "".join(c if self.flags & bit else "-"
                       for c, bit in (("r", VM_READ), ("w", VM_WRITE), ("x", VM_EXEC)))

    def public(self) -> dict[str, object]:
        return {"start": f"0x{self.start:x}", "end": f"0x{self.end:x}", "perms": self.perms,
                "path": self.path or f"[{self.special or 'anon'}]"}


def _address6(raw: bytes) -> str:
    """An IPv6 address; an IPv4-mapped one (a dual-stack socket's IPv4 peer) as IPv4."""
    addr = ipaddress.IPv6Address(raw)
    return str(addr.ipv4_mapped or addr)


def _array_len(type_name: str) -> int:
    match = re.search(r"\[(\d+)\]$", type_name)
    if match is None:
        raise WalkError(f"profile type {type_name!r} is not an array")
    return int(match[1])


class Behaviour:
    """Per-process readers over one guest (shares :class:`Linux`'s memory and profile)."""

    def __init__(self, linux: Linux) -> None:
        self.linux, self.mem, self.p = linux, linux.mem, linux.p
        p = self.p
        self._range = (p.offset("maple_range_64", "pivot"), p.offset("maple_range_64", "slot"),
                       _array_len(p.member("maple_range_64", "slot").type))
        self._arange = (p.offset("maple_arange_64", "pivot"),
                        p.offset("maple_arange_64", "slot"),
                        _array_len(p.member("maple_arange_64", "slot").type))
        self._socket_fops = (self.mem.sym("socket_file_ops")
                             if p.has_symbol("socket_file_ops") else 0)

    # -------------------------------------------------------------- files
    def open_files(self, task: Task) -> Iterator[tuple[int, int]]:
        """(fd, ``struct file *``) of a process's open descriptors, lowest first."""
        files = self.mem.u64(task.address + self.p.offset("task_struct", "files"))
        if files == 0:
            return
        if not is_kernel_pointer(files):
            raise WalkError("task files is not a kernel pointer", task.address)
        fdt = self.mem.u64(files + self.p.offset("files_struct", "fdt"))
        if not is_kernel_pointer(fdt):
            raise WalkError("files_struct fdt is not a kernel pointer", files)
        table = Struct(self.mem, "fdtable", fdt)
        count = min(table.u32("max_fds"), MAX_FDS)
        array = table.ptr("fd")
        if not is_kernel_pointer(array):
            raise WalkError("fdtable fd is not a kernel pointer", fdt)
        for fd, file in enumerate(struct.unpack(f"<{count}Q", self.mem.read(array, 8 * count))):
            if file == 0:
                continue
            if not is_kernel_pointer(file):
                raise WalkError(f"fd {fd} is not a kernel pointer", array + 8 * fd)
            yield fd, file

    def files(self, task: Task) -> list[OpenFile]:
        out = []
        f_path = self.p.offset("file", "f_path")
        for fd, file in self.open_files(task):
            if self._is_socket(file):
                out.append(OpenFile(fd, "socket:"))
                continue
            try:
                path = self.linux.d_path(file + f_path)
            except (WalkError, MemoryReadError) as exc:
                path = f"<unreadable: {exc}>"
            out.append(OpenFile(fd, path))
        return out

    def _is_socket(self, file: int) -> bool:
        return bool(self._socket_fops) and self.mem.u64(
            file + self.p.offset("file", "f_op")) == self._socket_fops

    # ------------------------------------------------------------ sockets
    def sockets(self, task: Task) -> list[Sock]:
        out = []
        for fd, file in self.open_files(task):
            if not self._is_socket(file):
                continue
            socket = self.mem.u64(file + self.p.offset("file", "private_data"))
            if not is_kernel_pointer(socket):
                raise WalkError("socket file without a struct socket", file)
            sk = self.mem.u64(socket + self.p.offset("socket", "sk"))
            if sk == 0:
                continue  # not yet bound to a protocol
            if not is_kernel_pointer(sk):
                raise WalkError("socket sk is not a kernel pointer", socket)
            out.append(self._sock(fd, sk))
        return out

    def _sock(self, fd: int, sk: int) -> Sock:
        p, mem = self.p, self.mem
        common = sk + p.offset("sock", "__sk_common")

        def off(member: str) -> int:
            return common + p.offset("sock_common", member)

        family = mem.read(off("skc_family"), 2)
        fam = struct.unpack("<H", family)[0]
        state = mem.read(off("skc_state"), 1)[0]
        sk_type = struct.unpack("<H", mem.read(sk + p.offset("sock", "sk_type"), 2))[0]
        proto = struct.unpack("<H", mem.read(sk + p.offset("sock", "sk_protocol"), 2))[0]
        local_port = struct.unpack("<H", mem.read(off("skc_num"), 2))[0]  # host order
        remote_port = struct.unpack(">H", mem.read(off("skc_dport"), 2))[0]  # network order
        if fam == AF_INET:
            local = str(ipaddress.IPv4Address(mem.read(off("skc_rcv_saddr"), 4)))
            remote = str(ipaddress.IPv4Address(mem.read(off("skc_daddr"), 4)))
        elif fam == AF_INET6:
            local = _address6(mem.read(off("skc_v6_rcv_saddr"), 16))
            remote = _address6(mem.read(off("skc_v6_daddr"), 16))
        else:
            local = remote = ""
        kind = {6: "tcp", 17: "udp", 1: "icmp", 255: "raw"}.get(proto, f"proto{proto}")
        if fam == AF_UNIX:
            kind = {SOCK_STREAM: "stream", SOCK_DGRAM: "dgram"}.get(sk_type, f"type{sk_type}")
        return Sock(fd, {AF_INET: "inet", AF_INET6: "inet6", AF_UNIX: "unix"}.get(fam, str(fam)),
                    kind, TCP_STATES.get(state, str(state)) if kind == "tcp" else str(state),
                    local, local_port, remote, remote_port)

    # ------------------------------------------------------------- memory
    def vmas(self, task: Task) -> list[Vma]:
        """The process's memory map, from the ``mm_struct.mm_mt`` maple tree."""
        if task.mm == 0:
            return []
        p, mem = self.p, self.mem
        root = mem.u64(task.mm + p.offset("mm_struct", "mm_mt") + p.offset("maple_tree",
                                                                            "ma_root"))
        vdso = mem.u64(task.mm + p.offset("mm_struct", "context.vdso"))
        f_path = p.offset("file", "f_path")
        out: list[Vma] = []
        last_end = 0
        for vma in self._maple_entries(root):
            v = Struct(mem, "vm_area_struct", vma)
            start, end = v.ptr("vm_start"), v.ptr("vm_end")
            if v.ptr("vm_mm") != task.mm or not start < end or start < last_end:
                raise WalkError("vm_area_struct out of order or of another mm", vma)
            last_end = end
            file = v.ptr("vm_file")
            path = ""
            if file:
                try:
                    path = self.linux.d_path(file + f_path)
                except (WalkError, MemoryReadError) as exc:
                    path = f"<unreadable: {exc}>"
            out.append(Vma(start, end, v.ptr("vm_flags"), path,
                           "vdso" if start == vdso and not file else ""))
        return out

    def _maple_entries(self, root: int) -> Iterator[int]:
        """Leaf entries (``vm_area_struct *``) of a maple tree, in index order."""
        if root == 0:
            return
        if not (root & 3 == 2 and root > 4096):  # not a node: a single entry
            yield root
            return
        seen = 0
        stack = [(root, 0, (1 << 64) - 1)]  # (encoded node, depth, highest index it holds)
        visited: set[int] = set()
        while stack:
            enode, depth, node_max = stack.pop()
            node = enode & ~MAPLE_NODE_MASK
            kind = (enode >> 3) & 0xF
            if depth > MAX_TREE_DEPTH or not is_kernel_pointer(node) or node in visited:
                raise WalkError("maple tree node out of bounds or revisited", node)
            visited.add(node)
            if kind in (MAPLE_LEAF_64, MAPLE_RANGE_64):
                pivot_off, slot_off, slots = self._range
            elif kind == MAPLE_ARANGE_64:
                pivot_off, slot_off, slots = self._arange
            else:
                raise WalkError(f"maple node of unexpected type {kind}", node)
            raw = self.mem.read(node + pivot_off, slot_off - pivot_off + 8 * slots)
            pivots = struct.unpack_from(f"<{slots - 1}Q", raw, 0)
            entries = struct.unpack_from(f"<{slots}Q", raw, slot_off - pivot_off)
            # Slot i covers up to pivot[i]; the node ends at the slot reaching its maximum,
            # or before a zero pivot (the rest, even the last slot, may be metadata).
            limits = []
            for i in range(slots):
                pivot = pivots[i] if i < slots - 1 else node_max
                if i and pivot == 0:
                    break
                limits.append(min(pivot, node_max))
                if pivot >= node_max:
                    break
            children = []
            for entry, limit in zip(entries, limits, strict=False):
                if entry == 0:
                    continue
                if kind == MAPLE_LEAF_64:
                    seen += 1
                    if seen > MAX_VMAS:
                        raise WalkError(f"more than {MAX_VMAS} memory areas", node)
                    if not is_kernel_pointer(entry):
                        raise WalkError("maple leaf entry is not a kernel pointer", node)
                    yield entry
                else:
                    children.append((entry, depth + 1, limit))
            stack.extend(reversed(children))  # depth first, lowest index first

    # ------------------------------------------------------------ syscall
    def blocked_syscall(self, task: Task) -> int | None:
        """The system call a user task is blocked in (saved ``orig_ax``), else None."""
        if task.mm == 0:
            return None
        stack = self.mem.u64(task.address + self.p.offset("task_struct", "stack"))
        if not is_kernel_pointer(stack):
            raise WalkError("task stack is not a kernel pointer", task.address)
        regs = Struct(self.mem, "pt_regs", stack + THREAD_SIZE - self.p.size("pt_regs"))
        if regs.ptr("cs") != USER_CS:
            return None  # not entered from user mode (or the stack size differs)
        nr = regs.ptr("orig_ax")
        return None if nr >= 1 << 63 else nr  # -1: entered by an interrupt, not a syscall
