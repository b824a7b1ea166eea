"""Run in dom0 by bench/xen_lab.py: check rounds over LibVMI's XEN driver vs its FILE driver.

``python xen_dom0_rounds.py DOMAIN ROUNDS`` times LibVMI init and full rounds on
the live domain (paused per round through the Xen driver), then copies the
domain's physical memory to a raw file (domain paused: the same bytes) and
times the same on that file. A PVH domain's guest-physical space is its own
(a PV domain's page tables hold machine frames, so it has no raw image).
Prints JSON.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from vims.baseline import load
from vims.checks.runner import run_round
from vims.vmi.memory import GuestMemory
from vims.vmi.profile import Profile

SHARE = Path("/vims")
CHUNK = 1 << 20


def timed_rounds(mem: GuestMemory, n: int, consistency: str, baseline: dict[str, Any],
                 policy: dict[str, Any]) -> tuple[list[float], dict[str, Any]]:
    out: list[float] = []
    report: dict[str, Any] = {}
    for _ in range(n):
        t0 = time.perf_counter()
        report = run_round(mem, [], baseline, policy, consistency, {"bench": True})
        out.append((time.perf_counter() - t0) * 1000)
    return out, report


def dump(mem: GuestMemory, out: Path, size: int) -> None:
    with out.open("wb") as f:
        for pa in range(0, size, CHUNK):
            try:
                f.write(mem.read_pa(pa, CHUNK))
            except Exception:  # noqa: BLE001 - a hole in guest-physical space reads as zeros
                f.write(bytes(CHUNK))


def main() -> None:
    domain, rounds = sys.argv[1], int(sys.argv[2])
    profile = Profile.load(SHARE / "profile.json")
    baseline = load(SHARE / f"baseline-{domain}.json")
    policy = json.loads((SHARE / "policy.json").read_text())
    raw = Path("/root") / f"{domain}.raw"
    t0 = time.perf_counter()
    with GuestMemory(profile, domain=domain, mode="xen") as mem:
        xen_init = (time.perf_counter() - t0) * 1000
        xen_rounds, report = timed_rounds(mem, rounds, "pause", baseline, policy)
        size = int(mem.vmi.get_memsize())
        with mem.paused():
            dump(mem, raw, min(size, 4 << 30) & ~(CHUNK - 1))
            t0 = time.perf_counter()
            with GuestMemory(profile, path=raw) as fmem:
                file_init = (time.perf_counter() - t0) * 1000
                file_rounds, freport = timed_rounds(fmem, rounds, "none", baseline, policy)
    raw.unlink()
    print(json.dumps({
        "domain": domain, "rounds": rounds,
        "xen": {"libvmi_init_ms": round(xen_init, 1),
                "round_median_ms": round(statistics.median(xen_rounds), 1),
                "round_min_ms": round(min(xen_rounds), 1), "result": report["result"],
                "per_check_ms": {c["id"]: c["duration_ms"] for c in report["checks"]}},
        "file": {"libvmi_init_ms": round(file_init, 1),
                 "round_median_ms": round(statistics.median(file_rounds), 1),
                 "round_min_ms": round(min(file_rounds), 1), "result": freport["result"],
                 "per_check_ms": {c["id"]: c["duration_ms"] for c in freport["checks"]}},
    }))


if __name__ == "__main__":
    main()
