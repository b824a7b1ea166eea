"""Run in dom0 by tests/integration/test_xen_lab.py: a process hidden while it runs, seen by CR3.

``python xen_dom0_cr3_hide.py DOMAIN SECONDS PID`` unlinks task PID from the
domU's task list (``list_del_init``, as DKOM rootkits do) while ``xl list`` shows
the domain paused, lets it run hidden, and runs a round of ``process.address_spaces``
with a window of SECONDS (src/vims/vmi/crossview.py). Prints the report as JSON.

The task is not linked back: with its entry pointing at itself, its exit unlinks
nothing else, so the test ends it with ``kill`` (the PID IDR still finds it).
"""

from __future__ import annotations

import json
import signal
import sys
from types import FrameType

from attacks import list_del_init  # tests/, copied next to this file
from vims.checks.runner import run_round
from vims.vmi.linux import Linux
from xen_dom0_attack import opened, xl_state  # tests/, copied next to this file


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(f"stopped by signal {signum}")


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    domain, seconds, pid = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    with opened(domain) as mem:
        with mem.paused():
            state = xl_state(domain)
            if "p" not in state:
                raise SystemExit(f"{domain} is not paused ({state}): no write into it")
            victim = next(t for t in Linux(mem).tasks() if t.pid == pid)
            list_del_init(mem, victim.address + mem.profile.offset("task_struct", "tasks"))
            mem.flush()
            if any(t.pid == pid for t in Linux(mem).tasks()):
                raise SystemExit(f"task {pid} is still listed after the unlink")
        report = run_round(mem, ["process.address_spaces"], None, None, "auto", {"domain": domain},
                           params={"process.address_spaces": {"window_s": seconds}})
    print(json.dumps(report))

if __name__ == "__main__":
    main()
