"""Volatility 3 reads the live lab C-VM with our BTF-built ISF and agrees with the guest.

The ISF is validated the hard way: the reference forensic tool walks the real
kernel's task list, module list and syscall table with it, and the results are
compared with what the guest itself reports (``ps``, ``/proc/modules``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vims.lab import Lab, LabManager
from vims.vmi.isf import write_isf
from vims.vmi.profile import analyze_kernel

pytestmark = [pytest.mark.lab, pytest.mark.slow]

VOL = Path(sys.executable).with_name("vol")


@pytest.fixture(scope="module")
def volatility(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The vol command line for the lab's RAM file, with an ISF built from the lab's kernel."""
    if not VOL.exists() and shutil.which("vol") is None:
        pytest.skip("volatility3 (vol) is not installed")
    base = tmp_path_factory.mktemp("volatility")
    symbols, cache = base / "symbols", base / "cache"
    cache.mkdir()
    write_isf(analyze_kernel(Path(lab.kernel)), symbols / "linux" / "vims-lab.json.xz")
    return [str(VOL if VOL.exists() else "vol"), "-q", "--offline", "--cache-path", str(cache),
            "-s", str(symbols), "-f", str(lab.ram_path)]


def run(volatility: list[str], plugin: str) -> list[list[str]]:
    """Rows of a plugin's tab-separated output (header and banner lines dropped)."""
    proc = subprocess.run([*volatility, plugin], capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if "\t" in line)
    return [line.split("\t") for line in lines[header + 1:] if line.strip()]


def guest(mgr: LabManager, lab: Lab, cmd: str) -> str:
    result = mgr.exec(lab.name, cmd)
    assert result.exit_code == 0, result.stderr
    return result.stdout


def test_pslist_matches_the_guests_ps(lab_manager: LabManager, lab: Lab,
                                      volatility: list[str]) -> None:
    rows = run(volatility, "linux.pslist")  # OFFSET PID TID PPID COMM ...
    by_pid = {int(r[1]): r[4] for r in rows}
    ps = [line.split(None, 2) for line in guest(lab_manager, lab, "ps").splitlines()[1:]]
    assert by_pid[1] == "init"
    assert by_pid[2] == "kthreadd"
    for pid, _user, command in ps:
        name = command.strip("[]").split()[0].split("/")[-1].strip("{}")
        if name in ("syslogd", "klogd", "httpd", "crond", "vims-heartbeat", "kthreadd", "init"):
            assert by_pid.get(int(pid), "").startswith(name[:15]), (pid, command)
    # Kernel threads other than kworkers live as long as the guest.
    kernel_threads = {int(pid) for pid, _, command in ps
                      if command.startswith("[") and "kworker" not in command}
    assert kernel_threads <= set(by_pid)


def test_lsmod_matches_proc_modules(lab_manager: LabManager, lab: Lab,
                                    volatility: list[str]) -> None:
    rows = run(volatility, "linux.lsmod")  # Offset Name Size ...
    found = {r[1]: int(r[2], 16) for r in rows}
    proc_modules = {line.split()[0]: int(line.split()[1])
                    for line in guest(lab_manager, lab, "cat /proc/modules").splitlines()}
    assert found == proc_modules


def test_check_syscall_reads_the_table(volatility: list[str]) -> None:
    rows = run(volatility, "linux.malware.check_syscall")  # Table Name Index Handler Symbol
    handlers = {int(r[2]): r[4] for r in rows if r[1] == "64bit"}
    # volatility sizes the table itself (min of __syscall_meta__ count and symbol gap)
    assert len(handlers) > 400
    assert handlers[0] == "__x64_sys_read"
    assert handlers[1] == "__x64_sys_write"
    assert "UNKNOWN" not in handlers.values()
