"""Benchmark: many full rounds on a live, churning lab guest; findings and per-check cost.

Boots a lab C-VM, builds its profile and baseline, starts the guest's process
churn (a fork/exec/exit loop) and runs N rounds of every default check
(``auto`` consistency: the guest is paused for the walks that need it) with
the lab policy. Reports how many rounds had any finding or error (the goal is
none: a clean guest under churn is clean), the round's median and p90, and each
check's median and p90 cost, so a new check's price is visible.

Run with ``make bench`` or ``.venv/bin/python bench/churn_rounds.py --rounds 1000``.
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
from collections import defaultdict
from importlib import resources
from pathlib import Path

from rich.progress import Progress

from vims.baseline import load as load_baseline
from vims.checks.cli import lab_vcpus
from vims.checks.runner import run_round
from vims.lab import LabManager, LabSpec
from vims.vmi.memory import GuestMemory
from vims.vmi.profile import Profile

VENV_BIN = Path(sys.executable).parent


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * q))], 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=1000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vims-bench-"))
    mgr = LabManager()
    name = f"bench-churn-{os.getpid()}"
    lab = mgr.up(LabSpec(name=name))
    try:
        profile_path, base_path = work / "profile.json", work / "baseline.json"
        for cmd in (["profile", "build", "--kernel", lab.kernel, "--out", str(profile_path)],
                    ["baseline", "build", "--profile", str(profile_path), "--initramfs",
                     lab.initrd, "--memory", lab.ram_path, "--out", str(base_path)]):
            subprocess.run([str(VENV_BIN / "vims"), *cmd], check=True, capture_output=True)
        policy = json.loads((resources.files("vims.lab") / "policy.json").read_text())
        baseline = load_baseline(base_path)
        mgr.exec(name, "touch /run/churn")
        rounds: list[float] = []
        per_check: dict[str, list[float]] = defaultdict(list)
        dirty: list[dict[str, object]] = []
        with GuestMemory(Profile.load(profile_path), path=Path(lab.ram_path),
                         pauser=lambda: mgr.paused(name), vcpus=lab_vcpus(Path(lab.ram_path)),
                         ) as mem, Progress(transient=True) as bar:
            task = bar.add_task("rounds", total=args.rounds)
            for i in range(args.rounds):
                t0 = time.perf_counter()
                report = run_round(mem, [], baseline, policy, "auto", {"memory": "lab"})
                rounds.append((time.perf_counter() - t0) * 1000)
                for c in report["checks"]:
                    per_check[c["id"]].append(c["duration_ms"])
                bad = [c["id"] for c in report["checks"] if c["status"] not in ("pass",)]
                if report["findings"] or bad:
                    dirty.append({"round": i, "checks": bad,
                                  "findings": [f["summary"] for f in report["findings"]][:5]})
                bar.advance(task)
        mgr.exec(name, "rm -f /run/churn")
    finally:
        mgr.down(name)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({
        "rounds": len(rounds),
        "rounds_with_a_finding_or_error": len(dirty),
        "first_dirty_rounds": dirty[:5],
        "round_median_ms": round(statistics.median(rounds), 2),
        "round_p90_ms": pct(rounds, 0.9),
        "per_check_median_p90_ms": {cid: [round(statistics.median(v), 2), pct(v, 0.9)]
                                    for cid, v in per_check.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
