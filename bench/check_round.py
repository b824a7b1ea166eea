"""Benchmark: one full VIMS check round vs volatility3 on the same guest memory.

Boots a lab C-VM (512 MiB, ~50 tasks), builds its profile, ISF and baseline,
then measures on a paused snapshot of that guest (so both tools read the same
bytes):

- ``vims``: median of N full rounds (all nine checks), the kernel text
  read+normalize+hash step alone, LibVMI init;
- ``volatility3``: ``linux.pslist`` + ``linux.lsmod`` + ``linux.check_syscall``
  run as separate commands (what an investigator types), and the ratio.

Run with ``make bench`` or ``.venv/bin/python bench/check_round.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

from vims.baseline import load as load_baseline
from vims.checks.runner import run_round
from vims.lab import LabManager, LabSpec
from vims.vmi.ktext import compare_text, expected_text, read_text
from vims.vmi.memory import GuestMemory
from vims.vmi.profile import Profile

VENV_BIN = Path(sys.executable).parent


def vims(*args: str) -> None:
    subprocess.run([str(VENV_BIN / "vims"), *args], check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--vol-runs", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vims-bench-"))
    mgr = LabManager()
    name = f"bench-check-{os.getpid()}"
    lab = mgr.up(LabSpec(name=name))
    try:
        profile_path, isf = work / "profile.json", work / "isf" / "linux.json.xz"
        isf.parent.mkdir()
        t0 = time.perf_counter()
        vims("profile", "build", "--kernel", lab.kernel, "--out", str(profile_path),
             "--isf", str(isf))
        profile_s = time.perf_counter() - t0
        base_path = work / "baseline.json"
        vims("baseline", "build", "--profile", str(profile_path), "--initramfs", lab.initrd,
             "--memory", lab.ram_path, "--out", str(base_path))
        policy = json.loads((resources.files("vims.lab") / "policy.json").read_text())
        snap = work / "snap.raw"
        mgr.snapshot(name, snap)
    finally:
        mgr.down(name)

    profile = Profile.load(profile_path)
    baseline = load_baseline(base_path)
    t0 = time.perf_counter()
    mem = GuestMemory(profile, path=snap)
    init_ms = (time.perf_counter() - t0) * 1000
    t0 = time.perf_counter()
    first = run_round(mem, [], baseline, policy, "none", {"memory": str(snap)})
    first_ms = (time.perf_counter() - t0) * 1000
    assert first["result"] == "pass", first["findings"]
    rounds, text = [], []
    report = {}
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        report = run_round(mem, [], baseline, policy, "none", {"memory": str(snap)})
        rounds.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        expected = expected_text(baseline["kernel_text"], profile.text_layout, mem.kaslr_offset)
        assert compare_text(read_text(mem), expected, profile.text_layout) == ([], [])
        text.append((time.perf_counter() - t0) * 1000)
    per_check = {c["id"]: c["duration_ms"] for c in report["checks"]}
    mem.close()

    vol = shutil.which("vol", path=str(VENV_BIN)) or "vol"
    # Volatility validates and caches a new ISF on first use (~60 s): warm it up untimed.
    subprocess.run([vol, "-q", "-s", str(isf.parent), "-f", str(snap), "linux.pslist"],
                   check=True, capture_output=True)
    vol_times = []
    for _ in range(args.vol_runs):
        t0 = time.perf_counter()
        for plugin in ("linux.pslist", "linux.lsmod", "linux.check_syscall"):
            subprocess.run([vol, "-q", "-s", str(isf.parent), "-f", str(snap), plugin],
                           check=True, capture_output=True)
        vol_times.append(time.perf_counter() - t0)
    vims_ms = statistics.median(rounds)
    vol_ms = statistics.median(vol_times) * 1000
    print(json.dumps({
        "guest": {"memory_mib": lab.memory >> 20, "processes": len(report["processes"]),
                  "modules": len(report["modules"])},
        "profile_build_s": round(profile_s, 2),
        "libvmi_init_ms": round(init_ms, 1),
        "first_round_ms": round(first_ms, 1),
        "round_median_ms": round(vims_ms, 2),
        "round_p90_ms": round(sorted(rounds)[int(len(rounds) * 0.9) - 1], 2),
        "kernel_text_median_ms": round(statistics.median(text), 2),
        "per_check_ms_last_round": per_check,
        "result": report["result"],
        "volatility3_pslist_lsmod_check_syscall_ms": round(vol_ms, 1),
        "ratio_volatility_over_vims": round(vol_ms / vims_ms, 1),
    }, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
