"""Which address spaces ran, against the task list: hidden processes seen through CR3 events.

A process hidden from the task list (DKOM) must still run to do anything, and a
CPU runs it on its own page tables: every switch to it writes its page-table root
into CR3, which Xen's monitor reports. The run-queue view of ``process.hidden``
sees a hidden task only if it is runnable at the instant of the pause; this view
sees it if it ran at all during the window, e.g. a backdoor that wakes once a
second to beacon.

Each root written is attributed to an ``mm_struct`` at the *next* CR3 write on
the same vCPU, when the task that ran on it is being switched out (per-CPU
``current_task``; a kernel thread runs on the ``active_mm`` it borrowed), and only
if that mm's ``pgd`` is the root (with PTI, the user copy is the next page).
Page-table pages are reused by the next process, so an address space is a
(root, mm) pair. At
the end of the window, with the domain paused, an mm that no listed task (threads
included) owns is reported if it is still in use (``mm_users`` > 0, same pgd)
and the task that ran on it has not exited; short-lived processes that came and
went within the window are counted, not reported.

All reads are of untrusted guest memory: bounded tables, failures counted.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

from vims.errors import VimsError
from vims.vmi.linux import Linux, WalkError
from vims.vmi.memory import GuestMemory, MemoryReadError

MAX_SPACES = 4096  # address spaces tracked per window; more are counted as overflow
PTI_USER = 0x1000  # with PTI, the user half's root is the kernel pgd's next page
ROOT_MASK = ~0xFFF & ((1 << 63) - 1)  # PCID bits and the no-flush bit are not the root


class CrossViewError(VimsError):
    """The cross-view cannot judge what it saw (the task list did not read)."""


@dataclass
class AddressSpace:
    root: int
    switches: int = 0
    mm: int = 0
    task: int = 0  # the last task seen running on it as its own mm (0: only borrowed)


@dataclass
class CrossViewResult:
    address_spaces: int = 0
    listed: int = 0
    exited: int = 0
    kernel_switches: int = 0  # the kernel's own tables (idle, a task past exit_mm)
    # Switches whose task had moved to other tables by the next write (exec, exit) or
    # ran on tables that are not its mm's (text patching's temporary mm).
    unattributed_switches: int = 0
    overflow: int = 0
    read_errors: int = 0
    hidden: list[dict[str, Any]] = field(default_factory=list)

    def public(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Cr3CrossView:
    """A CR3-write observer for :func:`vims.vmi.events.measure_cr3`, then :meth:`finish`."""

    def __init__(self, mem: GuestMemory) -> None:
        self.mem = mem
        p = mem.profile
        self._off = {
            "mm": p.offset("task_struct", "mm"), "active_mm": p.offset("task_struct", "active_mm"),
            "exit_state": p.offset("task_struct", "exit_state"),
            "pid": p.offset("task_struct", "pid"), "comm": p.offset("task_struct", "comm"),
            "pgd": p.offset("mm_struct", "pgd"), "mm_users": p.offset("mm_struct", "mm_users"),
        }
        self._current_task = p.symbol("current_task")  # a per-CPU offset: not relocated
        self._per_cpu = mem.sym("__per_cpu_offset")
        self._kernel_roots = (mem.kernel_dtb, mem.kernel_dtb | PTI_USER)
        self.spaces: dict[tuple[int, int], AddressSpace] = {}
        self._last: dict[int, int] = {}  # vCPU -> root it switched to last
        self.result = CrossViewResult()

    # ------------------------------------------------------------ in the callback
    def switch(self, value: int, vcpu: int) -> None:
        """A CR3 write of ``value`` on ``vcpu`` (its vCPU is paused until we return).

        The task being switched out ran on the root this vCPU loaded last: name that
        space now. Page-table pages are freed and reused by the next process, so a
        space is a (root, mm) pair, not a root.
        """
        previous = self._last.get(vcpu)
        self._last[vcpu] = value & ROOT_MASK
        if previous is not None:
            self._attribute(previous, vcpu)

    def _attribute(self, root: int, vcpu: int) -> None:
        if root in self._kernel_roots:
            self.result.kernel_switches += 1
            return
        mem, off = self.mem, self._off
        try:
            task = mem.u64(mem.u64(self._per_cpu + 8 * vcpu) + self._current_task)
            own = mem.u64(task + off["mm"])
            # A kernel thread runs on the mm it borrowed: that names the space, not its owner.
            mm = own or mem.u64(task + off["active_mm"])
        except MemoryReadError:
            self.result.read_errors += 1
            return
        space = self.spaces.get((root, mm))
        if space is None:
            if len(self.spaces) >= MAX_SPACES:
                self.result.overflow += 1
                return
            try:
                pgd = mem.kv2p(mem.u64(mm + off["pgd"])) if mm else -1
            except MemoryReadError:
                self.result.read_errors += 1
                return
            if root not in (pgd, pgd | PTI_USER):
                self.result.unattributed_switches += 1
                return
            space = self.spaces[(root, mm)] = AddressSpace(root, mm=mm)
        space.switches += 1
        if own:
            space.task = task  # the latest: an earlier one may be a process long gone

    # ------------------------------------------------------------- afterwards
    def finish(self) -> CrossViewResult:
        """With the domain paused: attribute the roots still running, judge each space."""
        mem, res = self.mem, self.result
        with mem.paused():
            for vcpu, root in self._last.items():
                self._attribute(root, vcpu)
            try:
                owned = {t.mm for t in Linux(mem).tasks(with_threads=True) if t.mm}
            except (WalkError, MemoryReadError) as exc:
                raise CrossViewError(f"the task list is unreadable ({exc}): no cross-view "
                                     "without it") from exc
            res.address_spaces = len(self.spaces)
            for space in self.spaces.values():
                if space.mm in owned:
                    res.listed += 1
                elif self._gone(space):
                    res.exited += 1
                else:
                    res.hidden.append(self._describe(space))
        return res

    def _gone(self, space: AddressSpace) -> bool:
        """The mm was released, or its task has exited: a process that came and went."""
        mem, off = self.mem, self._off
        try:
            if mem.u32(space.mm + off["mm_users"]) == 0:
                return True
            if mem.kv2p(mem.u64(space.mm + off["pgd"])) not in (space.root,
                                                                 space.root & ~PTI_USER):
                return True
            if not space.task:
                return False  # in use, and no listed task owns it
            return bool(mem.u32(space.task + off["exit_state"])) or \
                mem.u64(space.task + off["mm"]) != space.mm
        except MemoryReadError:
            self.result.read_errors += 1
            return True  # freed and unmapped: nothing running there any more

    def _describe(self, space: AddressSpace) -> dict[str, Any]:
        mem, off = self.mem, self._off
        pid, comm = -1, "?"
        with contextlib.suppress(MemoryReadError):
            pid = mem.i32(space.task + off["pid"])
            comm = mem.cstr(space.task + off["comm"], 16)
        return {"cr3": f"0x{space.root:x}", "mm": f"0x{space.mm:x}",
                "task": f"0x{space.task:x}", "pid": pid, "comm": comm,
                "switches": space.switches}
