"""Retry consistency: findings the guest's own churn produced do not survive."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, ClassVar

from vims.checks.base import (
    Category,
    Check,
    CheckError,
    CheckResult,
    Context,
    Finding,
    Severity,
    Status,
)
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


class _Consuming(Check):
    """Takes something each run (as a window of events or the tracer's violations do)."""

    id: ClassVar[str] = "test.consuming"
    description: ClassVar[str] = "a check whose run consumes its input"
    severity = Severity.HIGH
    category = Category.RUNTIME_OPAQUE
    once_per_round = True

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches

    def run(self, ctx: Context) -> list[Finding]:
        if not self.batches:
            raise CheckError("nothing left to take")
        return [finding(pid) for pid in self.batches.pop(0)]


def _context() -> Context:
    fake_mem: Any = SimpleNamespace(profile=SimpleNamespace(offset=lambda struct, field: 0))
    return Context(fake_mem)


def test_a_consuming_check_runs_once_per_round_and_again_the_next() -> None:
    check = _Consuming([[7], [8]])
    ctx = _context()
    first, retried = check.execute(ctx), check.execute(ctx)  # two attempts of one round
    assert [f.evidence["pid"] for f in first.findings] == [7]
    assert retried.findings == first.findings
    assert check.batches == [[8]]  # the retry took nothing
    assert [f.evidence["pid"] for f in check.execute(_context()).findings] == [8]  # next round


def test_a_failed_consuming_run_is_not_kept() -> None:
    check = _Consuming([])
    ctx = _context()
    assert check.execute(ctx).status is Status.ERROR
    check.batches.append([9])
    assert [f.evidence["pid"] for f in check.execute(ctx).findings] == [9]
