"""behaviour.*: what running applications do, sampled from outside each round.

Each check compares the state introspection reads (process tree, open files,
sockets, memory maps; see :mod:`vims.vmi.behaviour`) with per-application
invariants from the policy's ``behaviour`` section::

    "behaviour": {
      "apps": [
        {"comm": "httpd", "exe": "/bin/busybox",          # which processes (globs)
         "children": [{"comm": "httpd"}],                 # what it may spawn
         "files": ["/dev/null", "/www/**", "socket:"],    # what it may hold open
         "listen": ["tcp:80"], "connect": []}             # its sockets (proto:[addr:]port)
      ],
      "memory": {"allow_wx": [], "allow_anon_exec": []}  # comm globs exempted
    }

A process matches the first app whose ``comm``, ``exe`` and ``parent`` globs
all match. The checks judge only what a policy describes: without a
``behaviour`` section, ``behaviour.children``, ``.files``, ``.sockets`` and
``.memory`` report ``not_applicable: no behaviour policy`` (a workload VIMS has
never seen has daemons, ports and JITs no default can know). With one, the
policy describes the whole network surface: every inet listener and outbound
connection must be allowed by its process's app, so a listener or connection of
a program no rule names is a finding. Memory invariants then hold for every
process, with the policy's exemptions.
"""

from __future__ import annotations

import fnmatch
import weakref
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
from vims.vmi.behaviour import VM_EXEC, VM_WRITE, Behaviour, Sock
from vims.vmi.linux import Task

__all__ = ["ChildrenCheck", "CredsChangeCheck", "FilesCheck", "MemoryCheck", "SocketsCheck"]


_READERS: weakref.WeakKeyDictionary[Context, Behaviour] = weakref.WeakKeyDictionary()


def _behaviour(ctx: Context) -> Behaviour:
    """One reader per round's context, shared by the behaviour checks."""
    if ctx not in _READERS:
        _READERS[ctx] = Behaviour(ctx.linux)
    return _READERS[ctx]


def _behaviour_policy(ctx: Context) -> dict[str, Any]:
    """The policy's ``behaviour`` section; without one there is nothing to judge against."""
    section = ctx.policy.get("behaviour")
    if section is None:
        raise NotApplicable("no behaviour policy")
    if not isinstance(section, dict):
        raise CheckError("policy behaviour must be an object")
    return section


def _processes(ctx: Context) -> Iterator[tuple[Task, Task | None, dict[str, Any] | None]]:
    """User processes (thread-group leaders), their parent, and their app rule if any."""
    apps = _behaviour_policy(ctx).get("apps", [])
    if not isinstance(apps, list):
        raise CheckError("policy behaviour.apps must be a list")
    by_pid = {t.pid: t for t in ctx.tasks}
    for t in ctx.processes:
        parent = by_pid.get(t.ppid)
        yield t, parent, next((a for a in apps if matches(a, t, parent)), None)


def _who(t: Task) -> dict[str, Any]:
    return {"pid": t.pid, "comm": t.comm, "exe": t.exe, "uid": t.euid}


class ChildrenCheck(Check):
    id: ClassVar[str] = "behaviour.children"
    description: ClassVar[str] = "Applications spawn only the children their policy names."
    severity = Severity.HIGH
    category = Category.RUNTIME_OPAQUE

    def run(self, ctx: Context) -> list[Finding]:
        out = []
        procs = list(_processes(ctx))
        rules = {t.pid: app for t, _, app in procs}
        beh = _behaviour(ctx)
        for t, parent, _ in procs:
            if parent is None:
                continue
            app = rules.get(parent.pid)
            if app is None or "children" not in app:
                continue
            if not any(matches(c, t, parent) for c in app["children"]):
                out.append(self.finding(
                    f"{parent.comm} ({parent.pid}) spawned {t.comm} ({t.pid}, {t.exe or '?'})",
                    parent=_who(parent), child=_who(t), child_syscall=beh.blocked_syscall(t)))
        return out


class FilesCheck(Check):
    id: ClassVar[str] = "behaviour.files"
    description: ClassVar[str] = "Applications hold open only the files their policy allows."
    severity = Severity.HIGH
    category = Category.RUNTIME_OPAQUE

    def run(self, ctx: Context) -> list[Finding]:
        out = []
        beh = _behaviour(ctx)
        for t, _, app in _processes(ctx):
            if app is None or "files" not in app:
                continue
            for f in beh.files(t):
                if not glob_any(f.path, app["files"]):
                    out.append(self.finding(f"{t.comm} ({t.pid}) has {f.path} open (fd {f.fd})",
                                            process=_who(t), fd=f.fd, path=f.path))
        return out


def _allowed(sock: Sock, patterns: list[str], *, remote: bool) -> bool:
    """``proto:port`` or ``proto:addr:port`` (globs) against a socket's local or remote end."""
    addr, port = (sock.remote, sock.remote_port) if remote else (sock.local, sock.local_port)
    for pattern in patterns:
        parts = str(pattern).split(":", 1)
        if len(parts) != 2:
            continue
        proto, rest = parts
        where, _, want_port = rest.rpartition(":")
        if (fnmatch.fnmatchcase(sock.kind, proto) and fnmatch.fnmatchcase(str(port), want_port)
                and (not where or fnmatch.fnmatchcase(addr, where))):
            return True
    return False


class SocketsCheck(Check):
    id: ClassVar[str] = "behaviour.sockets"
    description: ClassVar[str] = (
        "Every inet listener and outbound connection is one its application may have.")
    severity = Severity.HIGH
    category = Category.RUNTIME_OPAQUE

    def run(self, ctx: Context) -> list[Finding]:
        out = []
        beh = _behaviour(ctx)
        for t, _, app in _processes(ctx):
            listen = (app or {}).get("listen", [])
            socks = [s for s in beh.sockets(t) if s.family in ("inet", "inet6")]
            # Connections on a port this process listens on were accepted, not made.
            serving = {(s.kind, s.local_port) for s in socks if s.listening}
            for sock in socks:
                if sock.listening:
                    if not _allowed(sock, listen, remote=False):
                        out.append(self.finding(
                            f"{t.comm} ({t.pid}) listens on {sock.kind} port {sock.local_port}",
                            process=_who(t), socket=sock.public()))
                # A connection on a port the app may listen on was accepted, not made.
                # A closed TCP socket connects nothing any more; its port is released
                # (0) a moment before its state says so, which a pause can fall between.
                elif sock.remote_port and sock.local_port and sock.state != "close" and \
                        (sock.kind, sock.local_port) not in serving and \
                        not _allowed(sock, listen, remote=False) and \
                        not _allowed(sock, (app or {}).get("connect", []), remote=True):
                    out.append(self.finding(
                        f"{t.comm} ({t.pid}) connected from port {sock.local_port} to "
                        f"{sock.remote}:{sock.remote_port}", process=_who(t),
                        socket=sock.public()))
        return out


class MemoryCheck(Check):
    id: ClassVar[str] = "behaviour.memory"
    description: ClassVar[str] = (
        "No process maps memory writable and executable, or executable without a file.")
    severity = Severity.CRITICAL
    category = Category.RUNTIME_OPAQUE

    def run(self, ctx: Context) -> list[Finding]:
        mem_policy = _behaviour_policy(ctx).get("memory", {})
        allow_wx = mem_policy.get("allow_wx", [])
        allow_anon = mem_policy.get("allow_anon_exec", [])
        out = []
        beh = _behaviour(ctx)
        for t, _, _ in _processes(ctx):
            for vma in beh.vmas(t):
                if not vma.flags & VM_EXEC:
                    continue
                if vma.flags & VM_WRITE and not glob_any(t.comm, allow_wx):
                    out.append(self.finding(
                        f"{t.comm} ({t.pid}) maps {vma.start:#x}-{vma.end:#x} writable and "
                        "executable", process=_who(t), vma=vma.public()))
                elif not vma.path and not vma.special and not glob_any(t.comm, allow_anon):
                    out.append(self.finding(
                        f"{t.comm} ({t.pid}) executes anonymous memory at {vma.start:#x}",
                        Severity.HIGH, process=_who(t), vma=vma.public()))
        return out


class CredsChangeCheck(Check):
    id: ClassVar[str] = "behaviour.creds"
    description: ClassVar[str] = (
        "No process gained privileges between rounds without executing a new program.")
    severity = Severity.CRITICAL
    category = Category.EXECUTABLES

    def run(self, ctx: Context) -> list[Finding]:
        """Compare each process (pid + start time) with the previous round's reading.

        Dropping privileges (setuid to a user) is what daemons do; gaining them
        in place, with the same executable, is what a kernel exploit or a
        credential overwrite does. Needs the history the A-VM keeps per C-VM:
        the first round only records.
        """
        start_off = ctx.profile.offset("task_struct", "start_time")
        before: dict[str, list[Any]] = ctx.history.get(self.id, {})
        now: dict[str, list[Any]] = {}
        out = []
        for t in ctx.processes:
            key = f"{t.pid}:{ctx.mem.u64(t.address + start_off)}"
            now[key] = [t.uid, t.euid, t.exe]
            prev = before.get(key)
            if prev is None or prev[2] != t.exe:
                continue  # new, or it ran execve since: the exec is what other checks judge
            if (t.euid == 0 and prev[1] != 0) or (t.uid == 0 and prev[0] != 0):
                out.append(self.finding(
                    f"{t.comm} ({t.pid}) became root (uid {prev[0]}->{t.uid}, euid "
                    f"{prev[1]}->{t.euid}) without executing a new program",
                    process=_who(t), before={"uid": prev[0], "euid": prev[1]}))
                now[key] = prev  # keep judging against what it was: the finding stays
        ctx.updates[self.id] = now
        return out
