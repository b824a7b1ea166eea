"""Policy-complete appraisal: a verdict is judged over every check the policy assigns.

Each of these fails on the REM-S of before (one report set the verdict alone).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from vims.checks import DEFAULT_CHECKS as RUNTIME_DEFAULT_CHECKS
from vims.rems.service import RemsService
from vims.rems.store import GENESIS, Store
from vims.rems.verdict import (
    DEFAULT_CHECKS,
    EVIDENCE_CHECK,
    CheckResult,
    VerdictPolicy,
    appraise,
    results_from_report,
)

KEY = ec.generate_private_key(ec.SECP256R1())
CATEGORY = {"kernel.syscall_table": "executables", "kernel.text": "executables",
            "process.hidden": "configuration", "process.allowlist": "configuration"}


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def report(*checks: str, findings: dict[str, str] | None = None,
           processes: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A report of *checks*; ``findings``: check -> severity of one finding."""
    findings = findings or {}
    return {"result": "fail" if findings else "pass",
            "checks": [{"id": c, "category": CATEGORY.get(c, "executables"),
                        "status": "fail" if c in findings else "pass"} for c in checks],
            "findings": [{"check": c, "severity": sev, "summary": f"{c} found something",
                          "evidence": {}} for c, sev in findings.items()],
            "processes": processes or [], "modules": []}


@pytest.fixture
def rems(tmp_path: Path) -> tuple[RemsService, Clock]:
    clock = Clock()
    service = RemsService(Store(f"sqlite:///{tmp_path / 'r.db'}"), KEY, clock=clock)
    service.store.put_policy("tiered", {
        "name": "tiered", "stale_after_intervals": 3,
        "checks": [{"id": "process.hidden", "interval_s": 1},
                   {"id": "process.allowlist", "interval_s": 1},
                   {"id": "kernel.syscall_table", "interval_s": 10}]})
    service.store.assign("cvm1", "tiered")
    return service, clock


class Chain:
    """Reports of one C-VM in sequence."""

    def __init__(self, service: RemsService) -> None:
        self.service, self.seq = service, 0

    def send(self, body: dict[str, Any]) -> None:
        self.seq += 1
        self.service.ingest_report("avm1", "cvm1", self.seq, GENESIS, body)


FAST = ("process.hidden", "process.allowlist")


def test_a_finding_of_a_slow_check_is_not_forgotten_by_fast_rounds(
        rems: tuple[RemsService, Clock]) -> None:
    service, clock = rems
    chain = Chain(service)
    chain.send(report(*FAST))
    chain.send(report("kernel.syscall_table"))
    assert service.decision("cvm1").allowed
    chain.send(report("kernel.syscall_table", findings={"kernel.syscall_table": "critical"}))
    for _ in range(20):  # twenty fast rounds pass, for twenty seconds
        clock.now += 1
        chain.send(report(*FAST))
        d = service.decision("cvm1")
        assert not d.allowed, d
        assert d.status == "contraindicated"
        assert d.checks["kernel.syscall_table"] == "fail"  # stale or not, it failed
    chain.send(report("kernel.syscall_table"))  # the hook is gone
    assert service.decision("cvm1").allowed


def test_a_check_that_stops_reporting_makes_the_verdict_lapse_naming_it(
        rems: tuple[RemsService, Clock]) -> None:
    service, clock = rems
    chain = Chain(service)
    chain.send(report(*FAST, "kernel.syscall_table"))
    assert service.decision("cvm1").allowed
    for _ in range(29):  # only the fast group keeps reporting
        clock.now += 1
        chain.send(report(*FAST))
        assert service.decision("cvm1").allowed
    clock.now += 1.5  # 3 x 10 s after the syscall table's last result
    chain.send(report(*FAST))
    d = service.decision("cvm1")
    assert not d.allowed
    assert d.reason == "stale: kernel.syscall_table has no fresh result"
    assert d.checks == {"process.hidden": "pass", "process.allowlist": "pass",
                        "kernel.syscall_table": "stale"}


def test_a_check_never_reported_keeps_the_cvm_out(rems: tuple[RemsService, Clock]) -> None:
    service, _ = rems
    Chain(service).send(report(*FAST))  # the A-VM never runs the syscall-table check
    d = service.decision("cvm1")
    assert not d.allowed
    assert "kernel.syscall_table" in d.reason
    assert d.checks["kernel.syscall_table"] == "stale"


def test_a_policy_change_is_judged_at_once(rems: tuple[RemsService, Clock]) -> None:
    service, _ = rems
    Chain(service).send(report(*FAST, "kernel.syscall_table"))
    assert service.decision("cvm1").allowed
    service.store.put_policy("tiered", {
        "name": "tiered", "checks": [{"id": "kernel.text", "interval_s": 5},
                                     *({"id": c, "interval_s": 1} for c in FAST)]})
    service.invalidate_policies()
    d = service.decision("cvm1")  # judged again over the stored results, under the new policy
    assert not d.allowed
    assert "kernel.text" in d.reason


def test_the_a_vms_evidence_failure_contraindicates_until_it_passes_again(
        rems: tuple[RemsService, Clock]) -> None:
    service, clock = rems
    chain = Chain(service)
    chain.send(report(*FAST, "kernel.syscall_table"))

    def evidence(ok: bool) -> None:
        service.ingest([], [("cvm1", CheckResult(EVIDENCE_CHECK, "pass" if ok else "fail",
                                                 "hardware", None if ok else "PCR 23 changed",
                                                 (), "avm1", None, clock.now))])

    evidence(True)
    d = service.decision("cvm1")
    assert d.allowed
    assert d.verdict is not None
    assert d.verdict.vector["hardware"] == 2
    evidence(False)
    d = service.decision("cvm1")
    assert not d.allowed
    assert d.status == "contraindicated"
    assert "PCR 23 changed" in d.reason
    chain.send(report(*FAST, "kernel.syscall_table"))  # clean reports do not undo it
    assert not service.decision("cvm1").allowed
    evidence(True)  # a new handshake verified
    assert service.decision("cvm1").allowed


def test_verdict_rules_see_the_latest_result_of_every_check(
        rems: tuple[RemsService, Clock]) -> None:
    """A rule over check results is judged over the composite of all of them."""
    service, _ = rems
    service.store.put_policy("tiered", {
        "name": "tiered", "checks": [{"id": c, "interval_s": 1} for c in FAST]
        + [{"id": "kernel.syscall_table", "interval_s": 10}],
        "verdict": {"rules": [{"name": "no-nc", "category": "configuration",
                               "tier": "contraindicated",
                               "when": "length(processes[?comm=='nc']) > `0`"},
                              {"name": "table-must-pass", "category": "executables",
                               "tier": "contraindicated",
                               "when": "checks[?id=='kernel.syscall_table' && "
                                       "status!='pass'] | length(@) > `0`"}]}})
    service.invalidate_policies()
    chain = Chain(service)
    chain.send(report("kernel.syscall_table"))
    chain.send(report(*FAST))
    assert service.decision("cvm1").allowed
    chain.send(report(*FAST, processes=[{"pid": 9, "comm": "nc"}]))
    d = service.decision("cvm1")
    assert not d.allowed
    assert "rule no-nc" in d.reason
    chain.send(report(*FAST))
    assert service.decision("cvm1").allowed


def test_a_report_cannot_hide_a_finding_behind_its_claimed_status() -> None:
    body = report("kernel.syscall_table")
    body["findings"] = [{"check": "kernel.syscall_table", "severity": "critical",
                         "summary": "hooked", "evidence": {}}]  # status still says pass
    assert results_from_report(body, "a", 1, 0.0)["kernel.syscall_table"].status == "fail"
    orphan = report("process.hidden")
    orphan["findings"] = [{"check": "kernel.idt", "severity": "high", "summary": "gate 3",
                           "evidence": {}}]
    results = results_from_report(orphan, "a", 1, 0.0)
    assert results["kernel.idt"].status == "fail"
    assert appraise(orphan, VerdictPolicy("p")).status == "contraindicated"


def test_an_invalid_stored_policy_denies_with_its_reason(
        rems: tuple[RemsService, Clock]) -> None:
    service, _ = rems
    Chain(service).send(report(*FAST, "kernel.syscall_table"))
    service.store.put_policy("tiered", {"checks": [{"id": "kernel.text",
                                                    "interval_s": -1}]})  # an old REM-S
    service.invalidate_policies()
    d = service.decision("cvm1")
    assert not d.allowed
    assert "invalid" in d.reason


def test_the_default_policy_is_the_runtimes_default_checks() -> None:
    assert list(DEFAULT_CHECKS) == list(RUNTIME_DEFAULT_CHECKS)
