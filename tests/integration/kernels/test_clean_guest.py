"""Every default check on a clean lab guest, on each lab kernel: no finding, no error.

The second kernel (6.12) lays its structures out differently from 6.1 (module
memory in ``module.mem[]``, threads on ``signal->thread_head``, vmalloc areas per
``vmap_node``, IBT's ENDBR64 before every fentry site, ``x64_sys_call``, LSM hooks
through static calls): a check that cannot read one says so as an error here.
"""

from __future__ import annotations

from typing import Any

import pytest

from vims.checks import DEFAULT_CHECKS
from vims.checks.runner import run_round
from vims.lab import Lab
from vims.vmi.memory import GuestMemory

pytestmark = [pytest.mark.lab, pytest.mark.slow]


def test_a_clean_guest_passes_every_default_check(lab: Lab, mem: GuestMemory,
                                                 baseline_path: Any,
                                                 policy: dict[str, Any]) -> None:
    from vims.baseline import load

    report = run_round(mem, list(DEFAULT_CHECKS), load(baseline_path), policy, "auto",
                       {"memory": "lab"})
    statuses = {c["id"]: (c["status"], c["error"]) for c in report["checks"]}
    assert {c: s for c, s in statuses.items() if s[0] != "pass"} == {}
    assert report["findings"] == []
    # The walks saw the guest: its workload's processes and the modules it loads.
    assert {"init", "httpd", "crond"} <= {p["comm"] for p in report["processes"]}
    assert {"e1000", "qemu_fw_cfg"} <= {m["name"] for m in report["modules"]}
