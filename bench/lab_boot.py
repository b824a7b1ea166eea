"""Benchmark: lab C-VM boot-to-ready time (median of N boots), and exec round-trip.

Run with `make bench` (or `.venv/bin/python bench/lab_boot.py --runs 3`);
the figures go into the README's performance section.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

from vims.lab import LabManager, LabSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--memory", type=int, default=512, help="MiB")
    args = parser.parse_args()

    mgr = LabManager()
    boots, execs = [], []
    for i in range(args.runs):
        name = f"bench-boot-{os.getpid()}-{i}"
        start = time.monotonic()
        lab = mgr.up(LabSpec(name=name, memory=args.memory << 20))
        boots.append(time.monotonic() - start)
        try:
            for _ in range(5):
                t0 = time.perf_counter()
                mgr.exec(name, "true")
                execs.append(time.perf_counter() - t0)
        finally:
            mgr.down(lab.name)
    result = {
        "machine": f"{platform.node()} {os.cpu_count()} cores",
        "accel": lab.accel,
        "memory_mib": args.memory,
        "boot_to_ready_s": [round(b, 2) for b in boots],
        "boot_to_ready_median_s": round(statistics.median(boots), 2),
        "exec_roundtrip_median_ms": round(statistics.median(execs) * 1000, 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
