"""Retry consistency: findings the guest's own churn produced do not survive."""

from __future__ import annotations

from vims.checks.base import CheckResult, Finding, Severity, Status
from vims.checks.runner import _only


def finding(pid: int) -> Finding:
    return Finding("process.hidden", Severity.CRITICAL, f"task {pid} hidden", {"pid": pid})


def test_only_keeps_what_every_attempt_saw() -> None:
    result = CheckResult("process.hidden", Status.FAIL, 1.0, [finding(7), finding(8)])
    kept = _only(result, {finding(7).key()})
    assert [f.evidence["pid"] for f in kept.findings] == [7]
    assert kept.status is Status.FAIL
    gone = _only(result, set())
    assert (gone.findings, gone.status) == ([], Status.PASS)
    error = CheckResult("process.hidden", Status.ERROR, 1.0, [], "torn list")
    assert _only(error, set()).status is Status.ERROR  # an error is not made a pass
