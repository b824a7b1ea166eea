"""Process checks: hidden tasks, code integrity, allowlist, credentials."""

from __future__ import annotations

import hashlib
import struct
from collections import defaultdict
from collections.abc import Iterator
from typing import Any, ClassVar

from vims.checks.base import (
    Category,
    Check,
    CheckError,
    Context,
    Finding,
    NotApplicable,
    Severity,
)
from vims.checks.rules import glob_any, matches
from vims.vmi.linux import (
    MAX_RB_NODES,
    MAX_TASKS,
    Struct,
    WalkError,
    is_kernel_pointer,
    list_for_each,
)
from vims.vmi.memory import MemoryReadError

XA_CHUNK_SIZE = 64
MAX_CPUS = 256
PAGE = 4096
CAP_FULL = (1 << 41) - 1  # CAP_LAST_CAP is 40 on 6.1


# ------------------------------------------------------------------ other views
def pid_idr_tasks(ctx: Context) -> set[int]:
    """Tasks reachable from the init pid namespace's PID IDR (an XArray)."""
    p, mem = ctx.profile, ctx.mem
    idr = mem.sym("init_pid_ns") + p.offset("pid_namespace", "idr")
    head = mem.u64(idr + p.offset("idr", "idr_rt") + p.offset("xarray", "xa_head"))
    slots_off = p.offset("xa_node", "slots")
    links_off = p.offset("task_struct", "pid_links")
    first_off = p.offset("pid", "tasks")  # tasks[PIDTYPE_PID].first
    found: set[int] = set()
    budget = [MAX_TASKS * 2]

    def entries(entry: int, depth: int) -> Iterator[int]:
        if entry == 0:
            return
        if entry & 3 == 2 and entry > 4096:  # internal entry: an xa_node
            if depth > 12:
                raise WalkError("XArray deeper than possible", entry)
            node = entry - 2
            slots = mem.read(node + slots_off, 8 * XA_CHUNK_SIZE)
            for i in range(XA_CHUNK_SIZE):
                yield from entries(int.from_bytes(slots[i * 8:i * 8 + 8], "little"), depth + 1)
            return
        budget[0] -= 1
        if budget[0] < 0:
            raise WalkError("PID IDR holds more entries than allowed")
        if entry & 3 == 0 and is_kernel_pointer(entry):
            yield entry

    for pid in entries(head, 0):
        first = mem.u64(pid + first_off)
        if first:  # NULL while a fork has reserved but not attached the pid
            if not is_kernel_pointer(first):
                raise WalkError("pid->tasks is not a kernel pointer", pid)
            found.add(first - links_off)
    return found


def runqueue_tasks(ctx: Context, running: set[int] | None = None) -> set[int]:
    """Tasks on each CPU's run queue: the running one and the CFS tree's.

    ``running`` receives the task each CPU is running."""
    p, mem = ctx.profile, ctx.mem
    ncpu = min(mem.u32(mem.sym("nr_cpu_ids")), MAX_CPUS)
    per_cpu = mem.read(mem.sym("__per_cpu_offset"), 8 * ncpu)
    run_node = p.offset("sched_entity", "run_node")
    se_off = p.offset("task_struct", "se")
    my_q = p.offset("sched_entity", "my_q")
    timeline = p.offset("cfs_rq", "tasks_timeline")
    left, right = p.offset("rb_node", "rb_left"), p.offset("rb_node", "rb_right")
    found: set[int] = set()
    budget = [MAX_RB_NODES]

    def walk_cfs(cfs_rq: int, depth: int) -> None:
        if depth > 8:
            raise WalkError("CFS group nesting too deep", cfs_rq)
        stack = [mem.u64(cfs_rq + timeline)]  # rb_root_cached.rb_root.rb_node
        while stack:
            node = stack.pop()
            if not node:
                continue
            budget[0] -= 1
            if budget[0] < 0 or not is_kernel_pointer(node):
                raise WalkError("run-queue tree corrupt", node)
            se = node - run_node
            group = mem.u64(se + my_q)
            if group:
                walk_cfs(group, depth + 1)
            else:
                found.add(se - se_off)
            stack += [mem.u64(node + left), mem.u64(node + right)]

    for cpu in range(ncpu):
        # runqueues is a per-CPU variable: its "address" is an offset, not slid by KASLR.
        rq = ctx.profile.symbol("runqueues") + int.from_bytes(per_cpu[cpu * 8:cpu * 8 + 8],
                                                               "little")
        r = Struct(mem, "rq", rq, mem.read(rq, p.size("rq")))
        found.add(r.ptr("curr"))
        if running is not None:
            running.add(r.ptr("curr"))
        walk_cfs(r.addr_of("cfs"), 0)
    found.discard(0)
    return found


EXIT_DEAD = 0x10  # include/linux/sched.h


class HiddenProcessCheck(Check):
    id: ClassVar[str] = "process.hidden"
    description: ClassVar[str] = (
        "Cross-view of the task list against the PID IDR and the per-CPU run queues.")
    severity = Severity.CRITICAL
    category = Category.EXECUTABLES

    def run(self, ctx: Context) -> list[Finding]:
        listed = {t.address for t in ctx.tasks}
        seen = {ctx.mem.sym("init_task")}  # the idle task is not on the task list
        running: set[int] = set()
        exit_state = ctx.profile.offset("task_struct", "exit_state")
        out = []
        for view, tasks in (("pid_idr", pid_idr_tasks(ctx)),
                            ("runqueue", runqueue_tasks(ctx, running))):
            for addr in sorted(tasks - listed - seen):
                seen.add(addr)  # one finding per hidden task even when both views see it
                try:
                    t = ctx.linux.read_task(addr)
                    dead = ctx.mem.u32(addr + exit_state) == EXIT_DEAD
                except (WalkError, MemoryReadError):
                    continue  # a task that exited between the views: not a hidden one
                if t.pid == 0:
                    continue  # per-CPU idle tasks are not on the task list
                if view == "runqueue" and addr in running and dead:
                    # A self-reaping task (its parent ignores SIGCHLD) leaves the lists in
                    # exit_notify and runs on to its last schedule(): a pause can fall
                    # between. Only the task a CPU is running is excused, and only while
                    # it is EXIT_DEAD; the next round no longer sees it at all.
                    continue
                out.append(self.finding(
                    f"task {t.pid} ({t.comm}) is hidden from the task list",
                    pid=t.pid, comm=t.comm, task=f"0x{addr:x}", seen_in=view))
        return out


class AllowlistCheck(Check):
    id: ClassVar[str] = "process.allowlist"
    description: ClassVar[str] = (
        "Every process (exe or comm, parent, uid) is allowed by the policy.")
    severity = Severity.MEDIUM
    category = Category.CONFIGURATION

    def run(self, ctx: Context) -> list[Finding]:
        rules: list[dict[str, Any]] | None = ctx.policy.get("processes", {}).get("allow")
        if rules is None:
            raise NotApplicable("no process policy (processes.allow)")
        allow_kthreads = ctx.policy.get("processes", {}).get("kernel_threads", True)
        by_pid = {t.pid: t for t in ctx.tasks}
        out = []
        for t in ctx.tasks:
            if t.pid == 0 or t.exited or (t.kernel_thread and allow_kthreads):
                continue
            if t.pid != t.tgid:
                continue  # threads follow their leader
            parent = by_pid.get(t.ppid)
            if not any(matches(rule, t, parent) for rule in rules):
                out.append(self.finding(
                    f"process {t.pid} ({t.comm}, {t.exe or '?'}) is not allowed",
                    pid=t.pid, comm=t.comm, exe=t.exe, uid=t.uid, euid=t.euid,
                    parent=parent.comm if parent else None))
        return out


class CredsCheck(Check):
    id: ClassVar[str] = "process.creds"
    description: ClassVar[str] = (
        "No task became root without root ancestry; no cred shared in ways the kernel never does.")
    severity = Severity.CRITICAL
    category = Category.EXECUTABLES

    def run(self, ctx: Context) -> list[Finding]:
        p, mem = ctx.profile, ctx.mem
        setuid_ok = set(ctx.policy.get("creds", {}).get("setuid_executables", []))
        by_pid = {t.pid: t for t in ctx.tasks}
        cap_off = p.offset("cred", "cap_effective")
        owners: dict[int, set[int]] = defaultdict(set)
        out = []
        for t in ctx.tasks:
            owners[t.cred].add(t.tgid)
            if t.pid == 0:
                continue
            root = t.uid == 0 or t.euid == 0
            parent = by_pid.get(t.ppid)
            if root and parent is not None and parent.euid != 0 and parent.uid != 0 \
                    and t.exe not in setuid_ok:
                out.append(self.finding(
                    f"task {t.pid} ({t.comm}) is root under non-root parent {parent.pid} "
                    f"({parent.comm})", pid=t.pid, comm=t.comm, uid=t.uid, euid=t.euid,
                    parent_pid=parent.pid, parent_uid=parent.uid))
            if t.euid == 0 and t.mm:
                caps = mem.u64(t.cred + cap_off)
                ids = mem.read(t.cred + p.offset("cred", "uid"), 32)
                if caps == 0 and any(ids[i:i + 4] == b"\0\0\0\0" for i in (0, 16)) and \
                        ctx.policy.get("creds", {}).get("root_without_caps", False) is False:
                    out.append(self.finding(
                        f"task {t.pid} ({t.comm}) has euid 0 but no capabilities: "
                        "credentials edited in place", pid=t.pid, comm=t.comm,
                        cred=f"0x{t.cred:x}", cap_effective="0x0"))
        init_cred = mem.sym("init_cred") if p.has_symbol("init_cred") else None
        for cred, tgids in owners.items():
            users = sorted(tgids)
            if len(users) > 1:
                out.append(self.finding(
                    f"cred 0x{cred:x} shared by thread groups {users}",
                    cred=f"0x{cred:x}", tgids=users))
            elif init_cred is not None and cred == init_cred and users != [0]:
                out.append(self.finding(
                    f"task group {users[0]} uses init_cred (the kernel's own credentials)",
                    cred=f"0x{cred:x}", tgids=users))
        return out


class CodeCheck(Check):
    id: ClassVar[str] = "process.code"
    description: ClassVar[str] = (
        "Resident pages of each process's executable text match the known-good ELF text.")
    severity = Severity.CRITICAL
    category = Category.EXECUTABLES

    def run(self, ctx: Context) -> list[Finding]:
        known: dict[str, Any] = ctx.need_baseline("executables")
        p, mem = ctx.profile, ctx.mem
        out = []
        checked: set[tuple[int, str]] = set()
        digests: dict[int, str] = {}  # physical page -> digest: page-cache pages are shared
        for t in ctx.tasks:
            if not t.mm or not t.exe or t.pid != t.tgid:
                continue
            entry = known.get(t.exe)
            if entry is None:
                out.append(self.finding(f"process {t.pid} runs {t.exe}, not in the baseline",
                                        pid=t.pid, comm=t.comm, exe=t.exe))
                continue
            mm = Struct(mem, "mm_struct", t.mm, mem.read(t.mm, p.size("mm_struct")))
            start, end = mm.ptr("start_code"), mm.ptr("end_code")
            if (t.pgd, t.exe) in checked:
                continue
            checked.add((t.pgd, t.exe))
            bias = start - entry["text_start"]
            pages: dict[str, str] = entry["pages"]
            if end - start > entry["text_end"] - entry["text_start"] or bias & (PAGE - 1):
                out.append(self.finding(f"process {t.pid} ({t.exe}) has an unexpected text range",
                                        pid=t.pid, start=f"0x{start:x}", end=f"0x{end:x}"))
                continue
            # Pages not resident have nothing in memory to be wrong.
            for vpage, paddr in mem.user_pages(t.pgd, start, end):
                want = pages.get(str(vpage - bias))
                got = digests.get(paddr)
                if got is None:
                    got = hashlib.sha256(mem.read_pa(paddr, PAGE)).hexdigest()[:32]
                    digests[paddr] = got
                if want is None:
                    # Text the golden ELF has no page for: nothing vouches for it.
                    out.append(self.finding(
                        f"process {t.pid} ({t.comm}) code page 0x{vpage:x} has no page in "
                        f"{t.exe}'s baseline", pid=t.pid, comm=t.comm, exe=t.exe,
                        page=f"0x{vpage:x}", found_sha256=got))
                elif got != want:
                    out.append(self.finding(
                        f"process {t.pid} ({t.comm}) code page 0x{vpage:x} differs from {t.exe}",
                        pid=t.pid, comm=t.comm, exe=t.exe, page=f"0x{vpage:x}",
                        expected_sha256=want, found_sha256=got))
        return out


MAX_WINDOW_S = 60.0


class Cr3ViewCheck(Check):
    """The hypervisor's view of what ran, against the task list (vims.vmi.crossview).

    Opt-in: every round listens to CR3 writes for ``window_s`` seconds (params;
    5 by default, 1-60) with the guest running, and each intercepted switch costs
    the guest a round trip through the hypervisor and the A-VM.
    """

    id: ClassVar[str] = "process.address_spaces"
    description: ClassVar[str] = (
        "Address spaces the hypervisor saw run (CR3 writes) all belong to listed tasks.")
    severity = Severity.CRITICAL
    category = Category.EXECUTABLES
    default = False
    needs_pause = False  # events flow only while the guest runs
    once_per_round = True  # one window per round is enough

    def run(self, ctx: Context) -> list[Finding]:
        # A policy's bad window is an error whatever the target: it would be on the next.
        window = ctx.params.get(self.id, {}).get("window_s", 5.0)
        if (isinstance(window, bool) or not isinstance(window, (int, float))
                or not 1.0 <= window <= MAX_WINDOW_S):  # True is an int to Python
            raise CheckError(f"window_s must be a number of seconds within 1..{MAX_WINDOW_S:g}")
        domain, mode = ctx.mem.domain, ctx.mem.mode
        if domain is None or mode is None:
            raise NotApplicable("needs a live domain: CR3-write events come from the "
                                "hypervisor's monitor, not from a memory image")
        from vims.vmi.crossview import Cr3CrossView
        from vims.vmi.events import EventError, EventsNotDelivered, measure_cr3

        view = Cr3CrossView(ctx.mem)
        try:
            stats = measure_cr3(domain, float(window), mode, observer=view)
        except EventsNotDelivered as exc:
            raise NotApplicable(str(exc)) from exc
        except EventError as exc:
            raise CheckError(str(exc)) from exc
        if stats.interrupted:
            raise CheckError(f"the CR3 window was cut short by {stats.interrupted}")
        result = view.finish()
        return [self.finding(
            f"process {h['pid']} ({h['comm']}) ran on its own page tables "
            f"({h['switches']} switches in {stats.seconds:.1f} s) but is not on the task list",
            **h) for h in result.hidden]


# ------------------------------------------------------------------ fileless code
MAX_ENV = 128 << 10  # a process's environment block, read at most this far
MAX_CHILDREN = 1 << 16
PRELOAD_FILE = ("etc", "ld.so.preload")


def _unlinked(ctx: Context, file: int) -> bool:
    """The file's dentry is unhashed: deleted, or never had a name in any directory
    (O_TMPFILE; a memfd, whose pseudo dentry is its own parent)."""
    p = ctx.profile
    dentry = ctx.mem.u64(file + p.offset("file", "f_path") + p.offset("path", "dentry"))
    if not is_kernel_pointer(dentry):
        raise WalkError("exe dentry is not a kernel pointer", file)
    pprev = ctx.mem.u64(dentry + p.offset("dentry", "d_hash") + p.offset("hlist_bl_node",
                                                                         "pprev"))
    return pprev == 0


def _child(ctx: Context, dentry: int, name: str) -> int:
    """A child dentry by name from the dcache (0 if none is cached)."""
    p, mem = ctx.profile, ctx.mem
    if p.has_member("dentry", "d_subdirs"):  # up to 6.7: list_head d_subdirs / d_child
        link = p.offset("dentry", "d_child")
        nodes: Iterator[int] = list_for_each(mem, dentry + p.offset("dentry", "d_subdirs"),
                                             MAX_CHILDREN)
    else:  # 6.8+: hlist d_children / d_sib
        link = p.offset("dentry", "d_sib")
        nodes = _hlist(ctx, mem.u64(dentry + p.offset("dentry", "d_children")))
    for node in nodes:
        child = node - link
        if ctx.linux._dentry_name(child) == name:
            return child
    return 0


def _hlist(ctx: Context, first: int) -> Iterator[int]:
    node, seen = first, 0
    while node:
        if not is_kernel_pointer(node) or seen > MAX_CHILDREN:
            raise WalkError("dentry child list corrupt", node)
        seen += 1
        yield node
        node = ctx.mem.u64(node)


def preload_file_present(ctx: Context) -> bool:
    """Whether the guest's /etc/ld.so.preload exists, from the dcache of init's root.

    The dynamic loader opens it for every program it starts, so it is in the dcache
    whenever it exists and anything ran since it was written; a negative dentry (no
    inode) means it does not exist.
    """
    p, mem = ctx.profile, ctx.mem
    fs = mem.u64(mem.sym("init_task") + p.offset("task_struct", "fs"))
    if not is_kernel_pointer(fs):
        raise WalkError("init's fs_struct is not a kernel pointer", fs)
    dentry = mem.u64(fs + p.offset("fs_struct", "root") + p.offset("path", "dentry"))
    for name in PRELOAD_FILE:
        dentry = _child(ctx, dentry, name)
        if not dentry:
            return False
    return mem.u64(dentry + p.offset("dentry", "d_inode")) != 0


def _environment_preload(ctx: Context, t: Any) -> str | None:
    """The value of LD_PRELOAD in a process's environment block, if set."""
    p = ctx.profile
    start, end = struct.unpack("<QQ", ctx.mem.read(t.mm + p.offset("mm_struct", "env_start"),
                                                   16))
    if not t.pgd or not 0 < end - start <= MAX_ENV:
        return None
    try:
        env = ctx.mem.read_user(start, end - start, t.pgd)
    except MemoryReadError:
        return None  # swapped out or not yet faulted in: nothing to judge
    for entry in env.split(b"\0"):
        if entry.startswith(b"LD_PRELOAD="):
            return entry[len(b"LD_PRELOAD="):].decode("utf-8", errors="backslashreplace")
    return None


class FilelessCheck(Check):
    id: ClassVar[str] = "process.fileless"
    description: ClassVar[str] = (
        "No process runs a deleted or memory-only file; no LD_PRELOAD or /etc/ld.so.preload "
        "the policy does not allow.")
    severity = Severity.CRITICAL
    category = Category.EXECUTABLES

    def run(self, ctx: Context) -> list[Finding]:
        rules = ctx.policy.get("fileless", {})
        allow_deleted = rules.get("allow_deleted", [])
        allow_preload = rules.get("allow_preload", [])
        out = []
        for t in ctx.processes:
            if t.exe_file and _unlinked(ctx, t.exe_file) and not glob_any(t.comm,
                                                                          allow_deleted):
                memfd = t.exe.lstrip("/").startswith("memfd:")
                out.append(self.finding(
                    f"process {t.pid} ({t.comm}) runs "
                    + (f"memory-only code from {t.exe}" if memfd else f"{t.exe}, deleted"),
                    pid=t.pid, comm=t.comm, exe=t.exe, memfd=memfd, uid=t.uid))
            preload = _environment_preload(ctx, t)
            if preload is not None and not glob_any(t.comm, allow_preload):
                out.append(self.finding(
                    f"process {t.pid} ({t.comm}) runs with LD_PRELOAD={preload}",
                    Severity.HIGH, pid=t.pid, comm=t.comm, exe=t.exe, ld_preload=preload))
        if not rules.get("allow_preload_file") and preload_file_present(ctx):
            out.append(self.finding("/etc/ld.so.preload exists: every dynamically linked "
                                    "program loads what it names", path="/etc/ld.so.preload"))
        return out
