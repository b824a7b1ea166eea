"""Verdicts from reports: the default mapping and JMESPath rules (EARs: test_ear.py)."""

from __future__ import annotations

from typing import Any

import pytest

from vims.rems.verdict import PolicyError, VerdictPolicy, appraise, tier_name


def report(findings: list[dict[str, Any]] | None = None, error: str | None = None,
           ) -> dict[str, Any]:
    checks = [
        {"id": "kernel.syscall_table", "status": "pass", "category": "executables"},
        {"id": "process.allowlist", "status": "pass", "category": "configuration"},
        {"id": "process.hidden", "status": "error" if error else "pass",
         "category": "executables", "error": error},
    ]
    for f in findings or []:
        next(c for c in checks if c["id"] == f["check"])["status"] = "fail"
    return {"checks": checks, "findings": findings or [],
            "processes": [{"pid": 1, "comm": "init"}, {"pid": 99, "comm": "httpd"}]}


HOOK = {"check": "kernel.syscall_table", "severity": "critical", "summary": "syscall 39 hooked"}
STRAY = {"check": "process.allowlist", "severity": "medium", "summary": "process 7 (nc)"}
POLICY = VerdictPolicy.from_dict({"name": "lab", "version": 3})


def test_clean_report_is_affirming() -> None:
    a = appraise(report(), POLICY)
    assert a.status == "affirming"
    assert a.vector["executables"] == 2
    assert a.vector["configuration"] == 2
    assert a.vector["hardware"] == 0  # not appraised by introspection
    assert a.trusted(POLICY)


def test_hooked_syscall_contraindicates_executables() -> None:
    a = appraise(report([HOOK]), POLICY)
    assert (a.vector["executables"], a.status) == (96, "contraindicated")
    assert not a.trusted(POLICY)
    assert any("syscall 39" in r for r in a.reasons)


def test_unexpected_process_is_a_configuration_warning() -> None:
    a = appraise(report([STRAY]), POLICY)
    assert (a.vector["configuration"], a.status) == (32, "warning")
    assert not a.trusted(POLICY)
    assert a.trusted(VerdictPolicy.from_dict({"name": "lax", "allow_warning": True}))


def test_check_error_is_not_a_pass() -> None:
    a = appraise(report(error="WalkError: cycle in list"), POLICY)
    assert a.status == "warning"
    strict = VerdictPolicy.from_dict({"name": "strict", "error_tier": "contraindicated"})
    assert appraise(report(error="x"), strict).status == "contraindicated"


def test_jmespath_rules_fire_on_the_report() -> None:
    policy = VerdictPolicy.from_dict({"name": "no-httpd", "rules": [
        {"name": "httpd", "when": "length(processes[?comm=='httpd']) > `0`",
         "category": "configuration", "tier": "contraindicated"}]})
    a = appraise(report(), policy)
    assert (a.vector["configuration"], a.status) == (96, "contraindicated")
    quiet = VerdictPolicy.from_dict({"name": "no-nc", "rules": [
        {"name": "nc", "when": "processes[?comm=='nc']", "category": "configuration",
         "tier": "warning"}]})
    assert appraise(report(), quiet).status == "affirming"


@pytest.mark.parametrize("bad", [
    {"name": "x", "rules": [{"name": "r", "when": "processes[?", "category": "configuration",
                             "tier": "warning"}]},
    {"name": "x", "rules": [{"name": "r", "when": "a", "category": "nonsense",
                             "tier": "warning"}]},
    {"name": "x", "rules": [{"name": "r", "when": "a", "category": "configuration",
                             "tier": "affirming"}]},
    {"name": "x", "rules": [{"when": "a", "category": "configuration", "tier": "warning",
                             "extra": 1}]},
    {"name": "bad name!"},
    {"name": "x", "version": 0},
])
def test_malformed_policies_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(PolicyError):
        VerdictPolicy.from_dict(bad)


def test_tiers() -> None:
    assert [tier_name(v) for v in (0, 1, 2, 31, 32, 95, 96, 127)] == [
        "none", "none", "affirming", "affirming", "warning", "warning", "contraindicated",
        "contraindicated"]


