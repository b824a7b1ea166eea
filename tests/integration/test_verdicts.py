"""Sound verdicts on the real lab: a finding is not forgotten by other checks' rounds.

A tiered policy (list checks every second, the syscall table and kernel text
every few seconds) is what the README recommends for low guest overhead. A
rootkit hook found by the slow group must keep the C-VM denied while the fast
group keeps passing, until the hook is gone and the slow group passes again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import lab_deployment, wait_for
from tests.integration.test_e2e import kexec_load_hooked
from vims.lab import Lab, LabManager
from vims.lab.deploy import LabDeployment

pytestmark = [pytest.mark.lab, pytest.mark.slow]
FAST = ["process.hidden", "process.allowlist", "kernel.modules", "process.creds"]
SLOW = ["kernel.syscall_table", "kernel.text"]
SLOW_S = 6.0


def tiered_policy() -> bytes:
    checks = [{"id": c, "interval_s": 1} for c in FAST] + [
        {"id": c, "interval_s": SLOW_S} for c in SLOW]
    return json.dumps({"checks": checks, "stale_after_intervals": 3, "quote_every": 3}).encode()


@pytest.fixture
def deployment(lab: Lab, profile_path: Path, baseline_path: Path,
               lab_policy: Path) -> Iterator[LabDeployment]:
    with lab_deployment("vims-verdicts-", ram=Path(lab.ram_path), profile=profile_path,
                        baseline=baseline_path, local_policy=lab_policy) as dep:
        dep.start_rems()
        assert dep.put("/v1/policies/tiered", tiered_policy()) == 200
        assert dep.put(f"/v1/cvms/{dep.cvm}/policy", b'{"policy": "tiered"}') == 200
        dep.start_avm()
        wait_for(lambda: dep.decision() == 200, 90, step=0.3)
        yield dep


def polled(dep: LabDeployment, seconds: float) -> list[int]:
    """The gate's decision every 0.5 s for *seconds*."""
    seen = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        seen.append(dep.decision())
        time.sleep(0.5)
    return seen


def test_a_slow_check_finding_is_not_forgotten_by_fast_rounds(
        lab: Lab, lab_manager: LabManager, profile_path: Path,
        deployment: LabDeployment) -> None:
    dep = deployment
    with kexec_load_hooked(lab, lab_manager, profile_path):
        wait_for(lambda: dep.decision() == 403, SLOW_S * 2 + 5, step=0.5)
        # Several fast rounds pass meanwhile, and a slow one finds the hook again.
        seen = polled(dep, SLOW_S * 2)
        assert set(seen) == {403}, seen
    wait_for(lambda: dep.decision() == 200, SLOW_S * 2 + 10, step=0.5)


def test_an_attested_finding_is_not_forgotten_by_fast_rounds(
        lab: Lab, lab_manager: LabManager, profile_path: Path,
        deployment: LabDeployment) -> None:
    """The same through POST /v1/attest: its fresh round's finding stands."""
    dep = deployment
    with kexec_load_hooked(lab, lab_manager, profile_path):
        status, body = dep.call("POST", f"/v1/attest/{dep.cvm}", b'{"timeout_s": 30}',
                                timeout=40)
        assert status == 200, body
        assert json.loads(body)["trusted"] is False
        seen = polled(dep, 4)  # fast rounds only: the slow group runs every 6 s
        assert set(seen) == {403}, seen
    status, body = dep.call("POST", f"/v1/attest/{dep.cvm}", b'{"timeout_s": 30}', timeout=40)
    assert json.loads(body)["trusted"] is True, body
    assert dep.decision() == 200
