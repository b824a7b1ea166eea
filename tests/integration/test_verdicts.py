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
from sqlalchemy import select

from tests.conftest import lab_deployment, vims, wait_for
from tests.integration.test_e2e import kexec_load_hooked
from vims.lab import Lab, LabManager
from vims.lab.deploy import LabDeployment
from vims.rems import schema
from vims.rems.store import Store

pytestmark = [pytest.mark.lab, pytest.mark.slow]
FAST = ["process.hidden", "process.allowlist", "kernel.modules", "process.creds"]
SLOW = ["kernel.syscall_table", "kernel.text"]
SLOW_S = 6.0


def tiered_policy() -> bytes:
    checks = [{"id": c, "interval_s": 1} for c in FAST] + [
        {"id": c, "interval_s": SLOW_S} for c in SLOW]
    return json.dumps({"checks": checks, "stale_after_intervals": 3, "quote_every": 3}).encode()


@pytest.fixture
def undeployed(lab: Lab, profile_path: Path, baseline_path: Path,
               lab_policy: Path) -> Iterator[LabDeployment]:
    """REM-S up with the tiered policy assigned; the A-VM not started yet."""
    with lab_deployment("vims-verdicts-", ram=Path(lab.ram_path), profile=profile_path,
                        baseline=baseline_path, local_policy=lab_policy) as dep:
        dep.start_rems()
        assert dep.put("/v1/policies/tiered", tiered_policy()) == 200
        assert dep.put(f"/v1/cvms/{dep.cvm}/policy", b'{"policy": "tiered"}') == 200
        yield dep


@pytest.fixture
def deployment(undeployed: LabDeployment) -> LabDeployment:
    undeployed.start_avm()
    wait_for(lambda: undeployed.decision() == 200, 90, step=0.3)
    return undeployed


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


def test_a_check_the_a_vm_stops_running_makes_the_verdict_lapse_naming_it(
        undeployed: LabDeployment) -> None:
    """The agent is told to drop kernel.text: every other check passes, still denied."""
    dep = undeployed
    config = dep.avm_config.read_text()
    dep.avm_config.write_text(config.replace("[[avm.cvms]]",
                                             'skip_checks = ["kernel.text"]\n\n[[avm.cvms]]'))
    dep.start_avm()

    def detail() -> dict[str, object]:
        status, body = dep.call("GET", f"/v1/cvms/{dep.cvm}", b"")
        assert status == 200, body
        result: dict[str, object] = json.loads(body)
        return result

    # Every other check reports and passes ...
    wait_for(lambda: all(detail()["checks"].get(c) == "pass"  # type: ignore[attr-defined]
                         for c in [*FAST, "kernel.syscall_table"]), 60, step=0.5)
    # ... and the C-VM stays denied, the missing check named.
    seen = polled(dep, 3)
    assert set(seen) == {403}, seen
    now = detail()
    assert now["checks"]["kernel.text"] == "stale"  # type: ignore[index]
    assert now["allowed"] is False
    assert "kernel.text" in str(now["reason"])


def test_a_second_a_vm_cannot_speak_for_another_a_vms_cvm(
        lab: Lab, lab_manager: LabManager, profile_path: Path, baseline_path: Path,
        lab_policy: Path, deployment: LabDeployment, tmp_path: Path) -> None:
    """A legitimately enrolled second A-VM claims cvm1 and would report it clean from a
    clean copy of its memory: refused at its hello, audited, nothing of it stored, and
    the real C-VM's verdict is the real A-VM's alone."""
    dep = deployment
    clean = tmp_path / "clean.ram"
    snap = vims("lab", "snapshot", lab.name, "--out", str(clean))
    assert snap.returncode == 0, snap.stderr
    rogue = dep.add_avm("avm2", dep.cvm, ram=clean, profile=profile_path,
                        baseline=baseline_path, local_policy=lab_policy)
    try:
        # Enrolled, its own code and configuration approved; the operator bound no C-VM
        # to it, so cvm1 stays avm1's.
        for e in rogue.measurements():
            if e["scope"] == "avm":
                rogue._ok("PUT", f"/v1/avms/avm2/references/{e['kind']}",
                          {"digest": e["digest"]})
        rogue.start_avm(register=False)
        rems_log = dep.root / "rems.log"
        wait_for(lambda: "A-VM avm2 named C-VMs not bound to it: cvm1" in rems_log.read_text(),
                 60)
        status, body = dep.call("POST", f"/v1/attest/{dep.cvm}", b'{"timeout_s": 30}',
                                timeout=40)
        assert status == 200, body  # on-demand rounds still go to the real A-VM
        with kexec_load_hooked(lab, lab_manager, profile_path):
            wait_for(lambda: dep.decision() == 403, SLOW_S * 2 + 5, step=0.5)
            seen = polled(dep, 4)  # the rogue keeps trying meanwhile
            assert set(seen) == {403}, seen
        status, body = dep.call("GET", f"/v1/cvms/{dep.cvm}/reports?limit=500", b"")
        assert {r["avm"] for r in json.loads(body)} == {"avm1"}
        assert "attested" not in (dep.root / "avm-avm2.log").read_text()
        store = Store(f"sqlite:///{dep.root / 'rems.db'}")
        with store.engine.connect() as conn:
            refused = conn.execute(select(schema.audit).where(
                schema.audit.c.kind == "refused", schema.audit.c.subject == "avm2")).all()
        assert refused, "the refusal is on the audit record"
        assert json.loads(refused[0].payload) == {"code": "not_bound", "cvms": ["cvm1"]}
    finally:
        rogue.close()


def test_a_baseline_the_rems_did_not_approve_makes_the_cvm_untrusted_with_that_reason(
        deployment: LabDeployment) -> None:
    """The operator approves another baseline digest than the A-VM measures: the running
    session ends at once, the next handshake is refused, and the C-VM is denied naming
    its baseline; approving the measured digest again brings it back."""
    dep = deployment
    measured = next(e["digest"] for e in dep.measurements() if e["kind"] == "baseline")
    dep._ok("PUT", f"/v1/cvms/{dep.cvm}/references/baseline", {"digest": "ab" * 32})

    def reason() -> str:
        status, body = dep.call("GET", f"/v1/cvms/{dep.cvm}", b"")
        assert status == 200, body
        return str(json.loads(body)["reason"])

    wait_for(lambda: "baseline of cvm1 is not the approved one" in reason(), 30, step=0.5)
    assert dep.decision() == 403
    dep._ok("PUT", f"/v1/cvms/{dep.cvm}/references/baseline", {"digest": measured})
    wait_for(lambda: dep.decision() == 200, 60, step=0.5)
