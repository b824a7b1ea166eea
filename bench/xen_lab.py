"""Benchmark: the Xen lab (nested TCG) and a check round over LibVMI's XEN vs FILE driver.

Boots a Xen lab with one PVH C-VM domain and reports:

- Xen + dom0 boot to dom0's ready line, and the domU's boot (``xl create`` to
  its workload's ready line);
- in dom0: LibVMI init and the median of N full rounds (all nine checks) over
  the XEN driver (domain paused per round), then the same on a raw copy of the
  same domain's memory through the FILE driver (bench/xen_dom0_rounds.py).

These are NESTED figures: Xen and dom0 run inside QEMU TCG (no KVM here), so
every hypercall and page mapping is emulated; on hardware they are far lower.
Run with ``.venv/bin/python bench/xen_lab.py [--rounds N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

from vims.lab import LabManager, LabSpec
from vims.lab.kernel import ensure_kernel
from vims.lab.xen import dom0_ssh

BENCH = Path(__file__).parent
VENV_BIN = Path(sys.executable).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    mgr = LabManager()
    name = f"xenbench{os.getpid()}"
    t0 = time.monotonic()
    lab = mgr.up(LabSpec(name=name, hypervisor="xen", cvms=1, domu_type="pvh",
                         memory=256 << 20, boot_timeout=600))
    up_s = time.monotonic() - t0
    try:
        share = Path(lab.share_dir)
        with tempfile.TemporaryDirectory(prefix="vims-xenbench-") as tmp:
            prof = Path(tmp) / "profile.json"
            subprocess.run([str(VENV_BIN / "vims"), "profile", "build", "--kernel",
                            str(ensure_kernel().vmlinuz), "--out", str(prof)],
                           check=True, capture_output=True)
            shutil.copy2(prof, share / "profile.json")
        shutil.copy2(Path(str(resources.files("vims.lab") / "policy.json")),
                     share / "policy.json")
        shutil.copy2(BENCH / "xen_dom0_rounds.py", share / "xen_dom0_rounds.py")
        dom = lab.domains[0]["name"]

        def dom0(cmd: str) -> str:
            proc = dom0_ssh(lab, cmd, timeout=1800)  # bounded in dom0 too
            if proc.returncode != 0:
                raise SystemExit(f"dom0: '{cmd[:60]}' exited {proc.returncode}: "
                                 f"{proc.stderr.strip()[-300:]}")
            return proc.stdout

        # The domU's own clock (10 ms resolution): 300 fork/execs take seconds.
        loop = ("t0=$(cut -d' ' -f1 /proc/uptime); i=0; while [ $i -lt 300 ]; do /bin/true; "
                "i=$((i+1)); done; t1=$(cut -d' ' -f1 /proc/uptime); "
                "awk -v a=$t0 -v b=$t1 'BEGIN { printf \"%d\\n\", (b - a) * 1000 }'")

        def domu_loop_ms() -> int:
            res = mgr.exec(name, loop, timeout=300)
            lines = res.stdout.strip().splitlines()
            if res.exit_code or not lines:
                raise SystemExit(f"domU loop failed: {res.stderr.strip()[-200:]}")
            return int(lines[-1])

        dom0(f"vims baseline build --profile /vims/profile.json --initramfs "
             f"/vims/cvm-initrd.gz --domain {dom} --out /vims/baseline-{dom}.json")
        rounds = json.loads(dom0(f"cd /vims && /opt/vims/bin/python xen_dom0_rounds.py {dom} "
                                 f"{args.rounds}"))
        print(json.dumps({"rounds": rounds}), file=sys.stderr)  # kept if a later step fails
        cr3 = json.loads(dom0(f"vims events cr3 --domain {dom} --seconds 5 --format json"))
        print(json.dumps({"cr3": cr3}), file=sys.stderr)
        # Cost of interception: the same fork/exec loop in the domU (its own clock)
        # without and with a CR3-write monitor attached from dom0.
        plain = [domu_loop_ms() for _ in range(3)]
        with ThreadPoolExecutor(1) as pool:
            watched = pool.submit(dom0, f"vims events cr3 --domain {dom} --seconds 150 "
                                        "--format json")
            time.sleep(45)  # dom0's Python import + LibVMI init, then the monitor is on
            monitored = [domu_loop_ms() for _ in range(3)]
            during = json.loads(watched.result())
    finally:
        mgr.down(name)
    result = {
        "nested_tcg": True,
        "xen_dom0_boot_s": lab.dom0_ready_seconds,
        "domu_boot_s": lab.domains[0]["ready_seconds"],
        "lab_up_total_s": round(up_s, 1),
        "rounds": rounds,
        "cr3_events": cr3,
        "cr3_cost": {"loop_300_forks_ms_plain": plain, "loop_300_forks_ms_monitored": monitored,
                     "monitor_window": during},
    }
    print(json.dumps(result, indent=2))
    x, f = rounds["xen"], rounds["file"]
    print(f"\n{'':28}{'XEN driver':>14}{'FILE driver':>14}   (nested TCG)")
    print(f"{'LibVMI init (ms)':28}{x['libvmi_init_ms']:>14}{f['libvmi_init_ms']:>14}")
    print(f"{'full round, median (ms)':28}{x['round_median_ms']:>14}{f['round_median_ms']:>14}")
    print(f"{'full round, min (ms)':28}{x['round_min_ms']:>14}{f['round_min_ms']:>14}")
    print(f"300 fork/execs in the domU: {min(plain)} ms plain, {min(monitored)} ms with CR3 "
          f"monitoring ({during['events']} events in the window)")
    print(f"Xen + dom0 boot {lab.dom0_ready_seconds} s, PVH domU boot "
          f"{lab.domains[0]['ready_seconds']} s; CR3 events {cr3['events_per_second']}/s, "
          f"handler {cr3['handler_us_per_event']} us/event")


if __name__ == "__main__":
    main()
