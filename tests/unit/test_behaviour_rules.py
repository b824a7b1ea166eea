"""Pure logic of behaviour.* rules: socket patterns and app matching."""

from __future__ import annotations

import pytest

from vims.checks.behaviour import _allowed
from vims.checks.rules import matches as _matches
from vims.vmi.behaviour import Sock, Vma
from vims.vmi.linux import Task


def sock(kind: str = "tcp", local: str = "0.0.0.0", lport: int = 80, remote: str = "0.0.0.0",
         rport: int = 0, state: str = "listen") -> Sock:
    return Sock(3, "inet", kind, state, local, lport, remote, rport)


@pytest.mark.parametrize(("patterns", "s", "remote", "ok"), [
    (["tcp:80"], sock(), False, True),
    (["tcp:8080"], sock(), False, False),
    (["udp:80"], sock(), False, False),
    (["tcp:127.0.0.1:80"], sock(local="0.0.0.0"), False, False),  # binds wider than allowed
    (["tcp:*:80"], sock(local="::"), False, True),
    (["tcp:10.0.2.2:*"], sock(remote="10.0.2.2", rport=8443, state="established"), True, True),
    (["tcp:10.0.2.2:*"], sock(remote="10.0.2.3", rport=8443, state="established"), True, False),
    (["nonsense"], sock(), False, False),
    ([], sock(), False, False),
])
def test_socket_patterns(patterns: list[str], s: Sock, remote: bool, ok: bool) -> None:
    assert _allowed(s, patterns, remote=remote) is ok


def test_udp_bound_without_peer_counts_as_listening() -> None:
    assert sock(kind="udp", state="7").listening
    assert not sock(kind="udp", rport=53, state="1").listening
    assert not sock(state="established", rport=5555).listening


def task(comm: str, exe: str = "/bin/busybox", pid: int = 10) -> Task:
    return Task(address=0, pid=pid, tgid=pid, ppid=1, comm=comm, uid=0, euid=0, gid=0, cred=0,
                real_cred=0, mm=1, exe=exe)


def test_app_rules_match_on_every_key_they_name() -> None:
    rule = {"comm": "nc", "parent": "vims-fetch"}
    assert _matches(rule, task("nc"), task("vims-fetch"))
    assert not _matches(rule, task("nc"), task("sh"))
    assert not _matches(rule, task("nc"), None)
    assert _matches({"comm": ["syslogd", "klogd"], "exe": "/bin/*"}, task("klogd"), None)
    assert not _matches({"exe": "/usr/*"}, task("klogd"), None)


def test_vma_permissions() -> None:
    assert Vma(0x1000, 0x2000, 0x7, "").perms == "rwx"
    assert Vma(0x1000, 0x2000, 0x5, "/bin/busybox").public()["perms"] == "r-x"
    assert Vma(0x1000, 0x2000, 0x5, "", "vdso").public()["path"] == "[vdso]"
