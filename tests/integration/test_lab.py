"""The lab C-VM's lifecycle against real QEMU guests."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import vims
from vims.lab import Lab, LabManager, LabSpec

pytestmark = [pytest.mark.lab, pytest.mark.slow]


def guest(mgr: LabManager, lab: Lab, cmd: str) -> str:
    result = mgr.exec(lab.name, cmd)
    assert result.exit_code == 0, result.stderr
    return result.stdout


def test_exec_returns_the_guests_real_process_list(lab_manager: LabManager, lab: Lab) -> None:
    proc = vims("lab", "exec", lab.name, "--", "ps")
    assert proc.returncode == 0, proc.stderr
    rows = [line.split(None, 2) for line in proc.stdout.splitlines()[1:]]
    by_pid = {int(r[0]): r[2] for r in rows}
    assert by_pid[1] == "init"
    commands = " ".join(by_pid.values())
    for daemon in ("syslogd", "klogd", "httpd", "crond", "vims-heartbeat", "vims-churn"):
        assert daemon in commands
    # ps agrees with the guest's own /proc at the same moment (both taken in one exec).
    both = guest(lab_manager, lab, "echo $$; echo --; ps | tail -n +2 | awk '{print $1}'; echo --;"
                 " ls /proc | grep -E '^[0-9]+$'")
    me, ps_out, proc_out = both.split("--")

    def settled(pids: str) -> set[int]:  # drop the pipelines' own processes, started after us
        return {int(p) for p in pids.split() if int(p) < int(me)}

    assert 1 in settled(ps_out)
    assert len(settled(ps_out)) > 40
    assert settled(ps_out) == settled(proc_out)


def test_exec_reports_exit_status_and_separates_streams(lab: Lab) -> None:
    proc = vims("lab", "exec", lab.name, "--", "echo out; echo err >&2; exit 3")
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "out\n", "err\n")
    proc = vims("lab", "exec", lab.name, "--format", "json", "--", "printf 'a\\tb é'")
    assert proc.returncode == 0
    assert '"stdout": "a\\tb \\u00e9"' in proc.stdout


def test_exec_sees_a_process_started_in_the_guest(lab_manager: LabManager, lab: Lab) -> None:
    guest(lab_manager, lab, "sleep 3210 >/dev/null 2>&1 &")
    try:
        assert "sleep 3210" in guest(lab_manager, lab, "ps")
    finally:
        # init reaps the killed sleep asynchronously: give it a moment.
        guest(lab_manager, lab,
              "for p in $(pidof sleep); do grep -q 3210 /proc/$p/cmdline && kill $p; done;"
              " for i in 1 2 3 4 5 6 7 8 9 10; do ps | grep -q '[s]leep 3210' || break;"
              " sleep 0.2; done")
    assert "sleep 3210" not in guest(lab_manager, lab, "ps")


def test_exec_times_out_and_the_console_survives(lab_manager: LabManager, lab: Lab) -> None:
    proc = vims("lab", "exec", lab.name, "--timeout", "2", "--", "sleep 30")
    assert proc.returncode == 2
    assert "timed out" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert guest(lab_manager, lab, "echo alive") == "alive\n"


def test_httpd_answers_on_the_forwarded_port(lab: Lab) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{lab.http_port}/", timeout=30) as resp:
        assert resp.status == 200
        assert b"VIMS lab C-VM" in resp.read()


def test_pause_stops_the_guest_and_resume_continues(lab_manager: LabManager, lab: Lab) -> None:
    up0 = float(guest(lab_manager, lab, "cut -d' ' -f1 /proc/uptime"))
    assert vims("lab", "pause", lab.name).returncode == 0
    try:
        assert lab_manager.get(lab.name).state == "paused"
        digests = []
        for _ in range(2):
            digests.append(hashlib.sha256(Path(lab.ram_path).read_bytes()).hexdigest())
            time.sleep(1.5)
        assert digests[0] == digests[1]  # no vCPU runs: memory does not change
        refused = vims("lab", "exec", lab.name, "--", "true")
        assert refused.returncode == 2
        assert "paused" in refused.stderr
    finally:
        assert vims("lab", "resume", lab.name).returncode == 0
    up1 = float(guest(lab_manager, lab, "cut -d' ' -f1 /proc/uptime"))
    # The guest's clock stood still for the ~3 s it was paused.
    assert up1 - up0 < 3.0
    assert lab_manager.get(lab.name).state == "running"


def test_a_pause_whose_owner_died_is_undone(lab_manager: LabManager, lab: Lab) -> None:
    """An A-VM killed inside its consistent read must not leave the C-VM frozen."""
    code = ("import sys, time; from vims.lab import LabManager\n"
            f"with LabManager().paused({lab.name!r}):\n"
            "    print('paused', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "paused"
        assert lab_manager.get(lab.name).state == "paused"  # its owner is alive: respected
    finally:
        holder.kill()
        holder.wait()
    status = vims("lab", "status", lab.name, "--format", "json")
    assert '"state": "running"' in status.stdout
    assert "resumed" in status.stderr
    assert guest(lab_manager, lab, "echo alive") == "alive\n"


def test_snapshot_is_the_guests_physical_memory(lab: Lab, tmp_path: Path) -> None:
    out = tmp_path / "snap.raw"
    proc = vims("lab", "snapshot", lab.name, "--out", str(out), "--format", "json")
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size == lab.memory
    data = out.read_bytes()
    # The kernel's VMCOREINFO note is in guest memory: this is that kernel's RAM.
    assert f"OSRELEASE={lab.kernel_release}\n".encode() in data
    assert not list(tmp_path.glob("*.partial"))


def test_churn_generator_switches_on_and_off(lab_manager: LabManager, lab: Lab) -> None:
    def forks_per_second() -> float:
        out = guest(lab_manager, lab, "a=$(cut -d' ' -f5 /proc/loadavg); sleep 2;"
                    " b=$(cut -d' ' -f5 /proc/loadavg); echo $a $b")
        a, b = map(int, out.split())
        return (b - a) / 2

    assert vims("lab", "churn", lab.name, "on").returncode == 0
    try:
        busy = forks_per_second()
    finally:
        assert vims("lab", "churn", lab.name, "off").returncode == 0
    time.sleep(1)
    quiet = forks_per_second()
    assert busy >= 5, busy
    assert quiet < 3, quiet


def test_two_labs_at_once_and_cleanup_after_kill(lab_manager: LabManager, lab: Lab) -> None:
    second = lab_manager.up(LabSpec(name=f"{lab.name}-b", kaslr=False))
    try:
        assert second.http_port != lab.http_port
        assert second.ram_path != lab.ram_path
        assert "nokaslr" in guest(lab_manager, second, "cat /proc/cmdline")
        assert "nokaslr" not in guest(lab_manager, lab, "cat /proc/cmdline")
        listed = vims("lab", "status", "--format", "json")
        assert {lab.name, second.name} <= set(re.findall(r'"name": "([^"]+)"', listed.stdout))
    finally:
        os.kill(second.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{second.pid}/cmdline").exists() and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):  # our child when booted in-process
            os.waitpid(second.pid, os.WNOHANG)
        time.sleep(0.1)
    # The next command notices the dead QEMU and removes what it left.
    status = vims("lab", "status", "--format", "json")
    assert status.returncode == 0
    assert second.name in status.stderr
    assert "cleaned up" in status.stderr
    assert not Path(second.ram_path).exists()
    assert not second.dir.exists()
    assert lab_manager.exec(lab.name, "true").exit_code == 0  # the other lab is untouched


def test_down_leaves_nothing_behind(lab_manager: LabManager, lab: Lab) -> None:
    name = f"{lab.name}-c"
    booted = vims("lab", "up", "--name", name, "--memory", "256M", "--format", "json")
    assert booted.returncode == 0, booted.stderr
    pid = int(re.search(r'"pid": (\d+)', booted.stdout).group(1))  # type: ignore[union-attr]
    down = vims("lab", "down", name)
    assert down.returncode == 0, down.stderr
    assert not Path(f"/proc/{pid}").exists() or b"qemu" not in Path(
        f"/proc/{pid}/cmdline").read_bytes()
    assert not Path(f"/dev/shm/vims-{name}.ram").exists()
    assert not (lab_manager.root / name).exists()
    assert vims("lab", "down", name).returncode == 2  # already gone: clear error


# --------------------------------------------------------------- bad input
def _one_line_error(proc: subprocess.CompletedProcess[str], needle: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("vims: error:")]
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0], proc.stderr


def test_unknown_lab_name(lab: Lab) -> None:
    _one_line_error(vims("lab", "exec", "no-such-lab", "--", "true"), "no lab named 'no-such-lab'")
    _one_line_error(vims("lab", "pause", "no-such-lab"), "no lab named")


def test_name_in_use(lab: Lab) -> None:
    _one_line_error(vims("lab", "up", "--name", lab.name), "already running")
    assert Path(lab.ram_path).exists()  # the running lab is untouched


def test_missing_kernel(tmp_path: Path) -> None:
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"x")
    proc = vims("lab", "up", "--name", "nokernel", "--kernel", str(tmp_path / "vmlinuz"),
                "--initrd", str(initrd))
    _one_line_error(proc, "does not exist")
    assert not Path("/dev/shm/vims-nokernel.ram").exists()


def test_port_in_use(lab: Lab) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        _one_line_error(vims("lab", "up", "--name", "busyport", "--http-port", str(port)),
                        f"port {port}")


def test_bad_name_and_memory() -> None:
    _one_line_error(vims("lab", "up", "--name", "Bad_Name"), "bad lab name")
    _one_line_error(vims("lab", "up", "--name", "x", "--memory", "lots"), "bad memory size")
    _one_line_error(vims("lab", "up", "--name", "x", "--memory", "64M"), "out of range")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_too_little_shm(tmp_path: Path) -> None:
    small = tmp_path / "shm"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(small)], check=True)
    try:
        proc = vims("lab", "up", "--name", "smallshm", env={"VIMS_SHM_DIR": str(small)})
        _one_line_error(proc, "MiB free")
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)
