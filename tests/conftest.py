"""Shared fixtures: one booted lab C-VM per test session.

Tests run in their own run-state directory, so they never touch an operator's
labs, and every lab they start is torn down at the end, even on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

_RUN_DIR = tempfile.mkdtemp(prefix="vims-test-run-")
os.environ["VIMS_RUN_DIR"] = _RUN_DIR

from vims.lab import Lab, LabManager, LabSpec  # noqa: E402 - after VIMS_RUN_DIR is set

if TYPE_CHECKING:
    from vims.lab.deploy import LabDeployment
    from vims.vmi.memory import GuestMemory

SESSION_LAB = f"pt{os.getpid()}"


def sh(mgr: LabManager, lab: Lab, cmd: str) -> str:
    """A command in the lab guest that must succeed; its stdout."""
    result = mgr.exec(lab.name, cmd)
    assert result.exit_code == 0, (cmd, result.stderr)
    return result.stdout


def start_bg(mgr: LabManager, lab: Lab, cmd: str, comm: str, mark: str) -> None:
    """Start *cmd* in the background in the guest and wait until a process named *comm*
    with *mark* in its command line runs (a round taken earlier would see the fork)."""
    sh(mgr, lab, f"{cmd} &")
    sh(mgr, lab, f"for i in $(seq 100); do for p in $(grep -l {mark} /proc/[0-9]*/cmdline "
       "2>/dev/null); do read c < ${p%/cmdline}/comm 2>/dev/null && "
       f"[ \"$c\" = {comm} ] && exit 0; done; sleep 0.05; done; exit 1")


GUEST_TOOLS = Path(__file__).parent / "guest"


def guest_tool(name: str, out_dir: Path) -> bytes:
    """tests/guest/<name>.c built on the host, static and without libc (the lab guest
    has busybox and nothing else): the program's bytes."""
    out = out_dir / name
    if not out.exists():
        subprocess.run(["gcc", "-static", "-nostdlib", "-O2", "-fno-stack-protector",
                        "-fno-builtin", "-no-pie", "-Wall", "-Werror", "-s", "-o", str(out),
                        str(GUEST_TOOLS / f"{name}.c")], check=True)
    return out.read_bytes()


def push(mgr: LabManager, lab: Lab, data: bytes, path: str, mode: str = "755") -> None:
    """Copy ``data`` to ``path`` in the guest over the serial console, gzip'd in
    console-sized base64 pieces."""
    import base64
    import gzip

    blob = base64.b64encode(gzip.compress(data, 9)).decode()
    sh(mgr, lab, f"rm -f {path}.gz")
    for i in range(0, len(blob), 1000):
        sh(mgr, lab, f"echo {blob[i:i + 1000]} | base64 -d >> {path}.gz")
    sh(mgr, lab, f"gunzip -f {path}.gz && chmod {mode} {path}")


def wait_for(cond: Callable[[], bool], timeout: float, step: float = 0.1) -> float:
    """Seconds until ``cond()`` holds; fails after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if cond():
            return time.monotonic() - start
        time.sleep(step)
    raise AssertionError(f"condition not met within {timeout} s")


@contextlib.contextmanager
def lab_deployment(prefix: str, **kwargs: Any) -> Iterator[LabDeployment]:
    """A REM-S + A-VM deployment (vims.lab.deploy) in a temporary root; on the way out
    its processes stop and their logs' tails go to stderr, where a failure shows them."""
    from vims.lab.deploy import deploy

    root = Path(tempfile.mkdtemp(prefix=prefix))
    dep = deploy(root / "vims", **kwargs)
    try:
        yield dep
    finally:
        dep.close()
        for name in ("rems", "avm"):
            log = root / "vims" / f"{name}.log"
            if log.exists():
                sys.stderr.write(f"--- {name}.log (tail)\n{log.read_text()[-3000:]}\n")
        shutil.rmtree(root, ignore_errors=True)


def findings_of(report: dict[str, Any], check: str) -> list[dict[str, Any]]:
    """The findings of one check in a report; that check must not have errored."""
    status = {c["id"]: c for c in report["checks"]}[check]
    assert status["error"] is None, status["error"]
    return [f for f in report["findings"] if f["check"] == check]


def vims(*args: str, env: dict[str, str] | None = None, timeout: float = 300,
         ) -> subprocess.CompletedProcess[str]:
    """Run the real CLI as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "vims.cli", *args], capture_output=True, text=True,
        timeout=timeout, env={**os.environ, **(env or {})}, check=False,
    )


@pytest.fixture(scope="session")
def lab_manager() -> Iterator[LabManager]:
    mgr = LabManager()
    yield mgr
    for name in mgr.names():
        mgr.down(name)
    shutil.rmtree(_RUN_DIR, ignore_errors=True)


@dataclass(frozen=True)
class Guest:
    """A booted lab C-VM with its kernel's profile and its clean baseline."""

    lab: Lab
    profile: Path
    baseline: Path


def boot_guest(mgr: LabManager, name: str, tmp: Path, kernel_package: str | None = None,
               ) -> Guest:
    """Boot a lab C-VM, then build its profile and, while it is clean, its baseline,
    with the real CLI."""
    lab = mgr.up(LabSpec(name=name, kernel_package=kernel_package))
    profile, baseline = tmp / "profile.json", tmp / "baseline.json"
    proc = vims("profile", "build", "--kernel", lab.kernel, "--out", str(profile))
    assert proc.returncode == 0, proc.stderr
    proc = vims("baseline", "build", "--profile", str(profile), "--initramfs", lab.initrd,
                "--memory", lab.ram_path, "--out", str(baseline))
    assert proc.returncode == 0, proc.stderr
    return Guest(lab, profile, baseline)


@pytest.fixture(scope="session")
def first_guest(lab_manager: LabManager, tmp_path_factory: pytest.TempPathFactory) -> Guest:
    """The session's lab C-VM (the current Debian 12 kernel, KASLR on, 512 MiB)."""
    return boot_guest(lab_manager, SESSION_LAB, tmp_path_factory.mktemp("first-guest"))


#: Debian 12's newer kernel: tests of kernel structures run on it too.
SECOND_KERNEL = "linux-image-6.12-amd64"


@pytest.fixture(scope="session")
def second_guest(lab_manager: LabManager, tmp_path_factory: pytest.TempPathFactory) -> Guest:
    """A second lab C-VM booting Debian 12's 6.12 kernel, booted on first use."""
    return boot_guest(lab_manager, f"k2{os.getpid()}", tmp_path_factory.mktemp("second-guest"),
                      SECOND_KERNEL)


@pytest.fixture(scope="session")
def lab(first_guest: Guest) -> Lab:
    return first_guest.lab


@pytest.fixture(scope="session")
def profile_path(first_guest: Guest) -> Path:
    """The lab kernel's profile, built once per session with the real CLI."""
    return first_guest.profile


@pytest.fixture(scope="session")
def baseline_path(first_guest: Guest) -> Path:
    """Known-good baseline: the lab's initramfs and its freshly booted, clean memory."""
    return first_guest.baseline


@pytest.fixture(scope="session")
def lab_policy() -> Path:
    from importlib import resources

    return Path(str(resources.files("vims.lab") / "policy.json"))


@pytest.fixture(scope="module")
def mem(lab: Lab, lab_manager: LabManager, profile_path: Path) -> Iterator[GuestMemory]:
    """The session guest's memory through LibVMI, paused through the lab for rounds."""
    from vims.vmi.memory import GuestMemory
    from vims.vmi.profile import Profile

    with GuestMemory(Profile.load(profile_path), path=Path(lab.ram_path),
                     pauser=lambda: lab_manager.paused(lab.name),
                     vcpus=lambda: lab_manager.vcpu_state(lab.name)) as m:
        yield m


@pytest.fixture(scope="module")
def policy(lab_policy: Path) -> dict[str, Any]:
    """The lab workload's policy (src/vims/lab/policy.json)."""
    data: dict[str, Any] = json.loads(lab_policy.read_text())
    return data


# The collection's own unit tests need ansible-core, which lives in the controller
# venv; scripts/ansible-checks.sh units runs them there.
collect_ignore = ["unit/plugins"]


# --------------------------------------------------------------- volatility3 oracle
VOL = Path(sys.executable).with_name("vol")


@pytest.fixture(scope="module")
def vol_base(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """vol with the ISF that `vims profile build --isf` wrote (one cache for the module)."""
    if not VOL.exists() and shutil.which("vol") is None:
        pytest.skip("volatility3 (vol) is not installed")
    base = tmp_path_factory.mktemp("volatility")
    symbols, cache = base / "symbols", base / "cache"
    cache.mkdir()
    proc = vims("profile", "build", "--kernel", lab.kernel, "--out", str(base / "p.json"),
                "--isf", str(symbols / "linux" / "vims-lab.json.xz"))
    assert proc.returncode == 0, proc.stderr
    return [str(VOL if VOL.exists() else "vol"), "-q", "--offline", "--cache-path", str(cache),
            "-s", str(symbols)]


def vol_rows(volatility: list[str], plugin: str) -> list[list[str]]:
    """Rows of a plugin's tab-separated output (header and banner lines dropped)."""
    proc = subprocess.run([*volatility, plugin], capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if "\t" in line)
    return [line.split("\t") for line in lines[header + 1:] if line.strip()]
