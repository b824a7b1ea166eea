"""behaviour.* on the real lab guest: the guest kernel's own view is the oracle, and
real misbehaviour (a shell spawned by httpd, a listener, an outbound connection, a
file outside its paths, W+X memory) is found; each attack is undone afterwards."""

from __future__ import annotations

import copy
import socket
import struct
import subprocess
import threading
import time
import urllib.request
from typing import Any

import pytest

from tests.attacks import patched
from tests.conftest import sh
from vims.checks.runner import run_round
from vims.lab import Lab, LabManager
from vims.vmi.behaviour import VM_EXEC, Behaviour
from vims.vmi.linux import Linux, Task
from vims.vmi.memory import GuestMemory

pytestmark = [pytest.mark.lab, pytest.mark.slow]
BEHAVIOUR = ["behaviour.children", "behaviour.files", "behaviour.sockets", "behaviour.memory"]


def behaviour_findings(mem: GuestMemory, policy: dict[str, Any]) -> list[dict[str, Any]]:
    report = run_round(mem, BEHAVIOUR, None, policy, "pause", {"memory": "lab"})
    errors = [c["error"] for c in report["checks"] if c["error"]]
    assert not errors, errors
    found: list[dict[str, Any]] = report["findings"]
    return found


def wait_findings(mem: GuestMemory, policy: dict[str, Any], check: str,
                  timeout: float = 10.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        found = [f for f in behaviour_findings(mem, policy) if f["check"] == check]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.3)


def task_named(mem: GuestMemory, comm: str) -> Task:
    return next(t for t in Linux(mem).tasks() if t.comm == comm and t.pid == t.tgid)


# --- the guest kernel's own view is the oracle ---------------------------------------


def test_files_maps_and_syscalls_agree_with_proc(mem: GuestMemory, lab: Lab,
                                                 lab_manager: LabManager) -> None:
    """/proc/PID/fd, /proc/PID/maps and /proc/PID/syscall of long-lived daemons."""
    beh = Behaviour(Linux(mem))
    for comm in ("httpd", "syslogd", "klogd", "crond"):  # idle daemons: their state holds
        task = task_named(mem, comm)
        proc = sh(lab_manager, lab, f"for f in /proc/{task.pid}/fd/*; do echo ${{f##*/}} "
                  f"$(readlink $f); done; echo ===; cat /proc/{task.pid}/maps; echo ===; "
                  f"cat /proc/{task.pid}/syscall")
        fds_txt, maps_txt, syscall_txt = proc.split("===\n")
        kernel_fds = {int(line.split()[0]): line.split()[1] for line in fds_txt.splitlines()}
        ours = {f.fd: f.path for f in beh.files(task)}
        assert set(ours) == set(kernel_fds), comm
        for fd, path in ours.items():
            assert path == kernel_fds[fd] or (path == "socket:"
                                              and kernel_fds[fd].startswith("socket:")), fd
        kernel_maps = [[range_.split("-"), perms] for range_, perms, *_ in
                       (line.split() for line in maps_txt.splitlines())]
        kernel_maps = [[f"{int(lo, 16):x}-{int(hi, 16):x}", perms]
                       for (lo, hi), perms in kernel_maps]
        our_maps = [[f"{v.start:x}-{v.end:x}", v.perms] for v in beh.vmas(task)]
        assert [m[0] for m in our_maps] == [m[0] for m in kernel_maps], comm
        assert [m[1] for m in our_maps] == [m[1][:3] for m in kernel_maps], comm
        # Blocked in the same system call as the kernel says (`running` while we looked).
        nr = syscall_txt.split()[0]
        if nr.isdigit():
            assert beh.blocked_syscall(task) == int(nr), comm


def test_httpd_listens_where_the_kernel_says(mem: GuestMemory) -> None:
    socks = Behaviour(Linux(mem)).sockets(task_named(mem, "httpd"))
    assert [(s.kind, s.state, s.local_port) for s in socks] == [("tcp", "listen", 80)]


def test_clean_workload_has_no_behaviour_findings(mem: GuestMemory,
                                                  policy: dict[str, Any]) -> None:
    for _ in range(5):
        assert behaviour_findings(mem, policy) == []
        time.sleep(0.5)


def test_busy_web_server_has_no_behaviour_findings(mem: GuestMemory, policy: dict[str, Any],
                                                   lab: Lab) -> None:
    """httpd forking per request, connections opening and closing (httperf): no findings.

    Caught earlier: accepted connections read as outbound ones, and closed sockets
    whose port the kernel had already released."""
    load = subprocess.Popen(["httperf", "--hog", "--server", "127.0.0.1", "--port",
                             str(lab.http_port), "--uri", "/", "--num-conns", "400",
                             "--timeout", "5"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        rounds = 0
        while load.poll() is None and rounds < 60:
            report = run_round(mem, [*BEHAVIOUR, "process.allowlist"], None, policy, "pause",
                               {"memory": "lab"})
            assert report["result"] == "pass", (report["findings"][:3], [
                c["error"] for c in report["checks"] if c["error"]])
            rounds += 1
        assert rounds >= 5  # the rounds did overlap the load
    finally:
        load.kill()
        load.wait()


# --- attacks -------------------------------------------------------------------------


def test_httpd_spawning_a_shell(mem: GuestMemory, policy: dict[str, Any], lab: Lab,
                                lab_manager: LabManager) -> None:
    """A CGI (a shell script) run by the web server: what a web shell looks like."""
    sh(lab_manager, lab, "mkdir -p /www/cgi-bin && printf '#!/bin/sh\\necho Content-Type: "
       "text/plain\\necho\\nsleep 6\\necho pwned\\n' > /www/cgi-bin/shell.cgi && "
       "chmod 755 /www/cgi-bin/shell.cgi")
    url = f"http://127.0.0.1:{lab.http_port}/cgi-bin/shell.cgi"
    fetch = threading.Thread(target=lambda: urllib.request.urlopen(url, timeout=20).read())
    fetch.start()
    try:
        found = wait_findings(mem, policy, "behaviour.children")
        assert found, "httpd's shell child was not found"
        assert found[0]["evidence"]["parent"]["comm"] == "httpd"
        assert found[0]["evidence"]["child"]["comm"] == "shell.cgi"
        assert found[0]["evidence"]["child"]["uid"] == 33
    finally:
        fetch.join()
        sh(lab_manager, lab, "rm -rf /www/cgi-bin")
    assert behaviour_findings(mem, policy) == []


def test_unexpected_listener(mem: GuestMemory, policy: dict[str, Any], lab: Lab,
                             lab_manager: LabManager) -> None:
    sh(lab_manager, lab, "(nc -l -p 4444 </dev/null >/dev/null 2>&1 &); true")
    try:
        found = wait_findings(mem, policy, "behaviour.sockets")
        assert [(f["evidence"]["process"]["comm"], f["evidence"]["socket"]["local"])
                for f in found] in ([("nc", "0.0.0.0:4444")], [("nc", ":::4444")])
    finally:
        sh(lab_manager, lab, "killall nc; true")


def test_outbound_connection(mem: GuestMemory, policy: dict[str, Any], lab: Lab,
                             lab_manager: LabManager) -> None:
    """A reverse shell's first step: the C-VM connects out to an address nobody allowed."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True).start()
    sh(lab_manager, lab, f"(sleep 15 | nc 10.0.2.2 {port} >/dev/null 2>&1 &); true")
    try:
        found = wait_findings(mem, policy, "behaviour.sockets")
        assert len(found) == 1
        assert found[0]["evidence"]["socket"]["remote"] == f"10.0.2.2:{port}"
        assert found[0]["evidence"]["socket"]["state"] in ("syn_sent", "established")
    finally:
        sh(lab_manager, lab, "killall nc sleep; true")
        for s in accepted:
            s.close()
        listener.close()


def test_file_outside_allowed_paths(mem: GuestMemory, policy: dict[str, Any], lab: Lab,
                                    lab_manager: LabManager) -> None:
    """A daemon allowed /dev/* and its own script holds /etc/passwd open."""
    strict = copy.deepcopy(policy)
    strict["behaviour"]["apps"].insert(0, {"comm": "vims-victim",
                                           "files": ["/dev/*", "/tmp/vims-victim"]})
    sh(lab_manager, lab, "printf '#!/bin/sh\\nexec 3</dev/null\\nsleep 20\\n' > /tmp/vims-victim"
       " && chmod 755 /tmp/vims-victim && (/tmp/vims-victim </dev/null >/dev/null 2>&1 &); true")
    try:
        time.sleep(0.5)
        assert [f for f in behaviour_findings(mem, strict) if f["check"] == "behaviour.files"] \
            == []  # its allowed files only
        sh(lab_manager, lab, "killall vims-victim sleep; sed -i s,/dev/null,/etc/passwd, "
           "/tmp/vims-victim && (/tmp/vims-victim </dev/null >/dev/null 2>&1 &); true")
        found = wait_findings(mem, strict, "behaviour.files")
        # (Twice when the round catches its fork for `sleep`, before the exec.)
        assert {(f["evidence"]["process"]["comm"], f["evidence"]["fd"], f["evidence"]["path"])
                for f in found} == {("vims-victim", 3, "/etc/passwd")}
    finally:
        sh(lab_manager, lab, "killall vims-victim sleep; rm -f /tmp/vims-victim; true")


def test_writable_executable_memory_injected(mem: GuestMemory, policy: dict[str, Any], lab: Lab,
                                             lab_manager: LabManager) -> None:
    """httpd's heap made executable in its VMA, as code injection leaves it."""
    httpd = task_named(mem, "httpd")
    heap = next(v for v in Behaviour(Linux(mem)).vmas(httpd)
                if v.perms == "rw-" and not v.path and not v.special)
    flags_at = vma_flags_address(mem, httpd, heap.start)
    with lab_manager.paused(lab.name), patched(mem, flags_at,
                                               struct.pack("<Q", heap.flags | VM_EXEC)):
        found = [f for f in behaviour_findings(mem, policy) if f["check"] == "behaviour.memory"]
    assert [(f["evidence"]["process"]["pid"], f["evidence"]["vma"]["perms"]) for f in found] == [
        (httpd.pid, "rwx")]
    assert found[0]["severity"] == "critical"
    assert behaviour_findings(mem, policy) == []


def test_corrupt_memory_map_is_an_error_not_a_hang(mem: GuestMemory, policy: dict[str, Any],
                                                   lab: Lab, lab_manager: LabManager) -> None:
    """httpd's maple tree root pointed at itself: bounded walk, an error with its address."""
    httpd = task_named(mem, "httpd")
    p = mem.profile
    root_at = httpd.mm + p.offset("mm_struct", "mm_mt") + p.offset("maple_tree", "ma_root")
    root = mem.u64(root_at)
    node = root & ~0xFF
    slot0 = node + p.offset("maple_range_64", "slot")
    loop = struct.pack("<Q", (root & ~0x2) | (2 << 3))  # an internal node's child: itself
    with lab_manager.paused(lab.name), patched(mem, root_at, struct.pack(
            "<Q", (root & ~(0xF << 3)) | (2 << 3))), patched(mem, slot0, loop):
        start = time.monotonic()
        report = run_round(mem, BEHAVIOUR, None, policy, "none", {"memory": "lab"})
        assert time.monotonic() - start < 5
    status = {c["id"]: c for c in report["checks"]}
    assert status["behaviour.memory"]["status"] == "error"
    assert "maple tree node" in status["behaviour.memory"]["error"]
    assert status["behaviour.sockets"]["status"] == "pass"  # the other readers are unaffected
    assert behaviour_findings(mem, policy) == []


def test_privileges_gained_in_place_between_rounds(mem: GuestMemory, policy: dict[str, Any],
                                                   lab: Lab, lab_manager: LabManager) -> None:
    """httpd (uid 33) made root by overwriting its cred, as a kernel exploit does."""
    history: dict[str, Any] = {}

    def creds_findings() -> list[dict[str, Any]]:
        report = run_round(mem, ["behaviour.creds"], None, policy, "pause", {}, history)
        assert report["checks"][0]["error"] is None
        found: list[dict[str, Any]] = report["findings"]
        return found

    assert creds_findings() == []  # the first round records
    httpd = task_named(mem, "httpd")
    euid = httpd.cred + mem.profile.offset("cred", "euid")
    with lab_manager.paused(lab.name), patched(mem, euid, struct.pack("<I", 0)):
        for _ in range(2):  # and it stays found while the process keeps the privilege
            found = creds_findings()
            assert [(f["evidence"]["process"]["pid"], f["evidence"]["before"]["euid"])
                    for f in found] == [(httpd.pid, 33)]
    assert creds_findings() == []  # back to www: nothing gained any more
    one_shot = run_round(mem, ["behaviour.creds"], None, policy, "pause", {})
    assert one_shot["result"] == "pass"  # without history a single round cannot compare


def vma_flags_address(mem: GuestMemory, task: Task, start: int) -> int:
    """Address of ``vm_flags`` of the task's VMA that starts at *start*."""
    beh = Behaviour(Linux(mem))
    p = mem.profile
    root = mem.u64(task.mm + p.offset("mm_struct", "mm_mt") + p.offset("maple_tree", "ma_root"))
    for vma in beh._maple_entries(root):
        if mem.u64(vma + p.offset("vm_area_struct", "vm_start")) == start:
            return vma + p.offset("vm_area_struct", "vm_flags")
    raise AssertionError(f"no VMA at {start:#x}")
