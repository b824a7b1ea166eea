"""The jmespath filters over reports and verdicts."""

from __future__ import annotations

import pytest
from ansible.errors import AnsibleFilterError
from ansible_collections.vims.attestation.plugins.filter import vims as f

REPORT = {
    "result": "fail",
    "checks": [{"id": "kernel.text", "status": "pass"},
               {"id": "kernel.syscall_table", "status": "fail"},
               {"id": "process.code", "status": "error"}],
    "findings": [{"check": "kernel.syscall_table", "severity": "critical", "summary": "hook"},
                 {"check": "process.allowlist", "severity": "medium", "summary": "odd"}],
}


def test_failed_checks_from_report_or_module_result() -> None:
    assert f.failed_checks(REPORT) == ["kernel.syscall_table", "process.code"]
    assert f.failed_checks({"changed": False, "report": REPORT}) == [
        "kernel.syscall_table", "process.code"]
    assert f.failed_checks({"checks": [{"id": "kernel.idt", "status": "pass"}]}) == []


def test_failed_checks_of_an_attest_result_come_from_its_findings() -> None:
    attest_result = {"trusted": False, "report": {"seq": 3, "result": "fail", "findings": [
        {"check": "process.hidden", "severity": "critical", "summary": "a"},
        {"check": "kernel.syscall_table", "severity": "critical", "summary": "b"},
        {"check": "process.hidden", "severity": "critical", "summary": "c"}]}}
    assert f.failed_checks(attest_result) == ["kernel.syscall_table", "process.hidden"]
    assert f.failed_checks({"report": {"seq": 4, "result": "pass", "findings": []}}) == []


def test_failed_checks_of_an_attest_result_with_the_policys_checks() -> None:
    """A C-VM is judged over every check of its policy: a stale or failed one counts,
    though the fresh report's findings name none."""
    result = {"trusted": False, "report": {"seq": 9, "result": "pass", "findings": []},
              "checks": {"kernel.text": "stale", "kernel.syscall_table": "fail",
                         "process.hidden": "pass", "kernel.idt": "not_applicable",
                         "avm.evidence": "pass"}}
    assert f.failed_checks(result) == ["kernel.syscall_table", "kernel.text"]


def test_findings_by_severity() -> None:
    assert [x["summary"] for x in f.findings_by_severity(REPORT)] == ["hook"]
    assert [x["summary"] for x in f.findings_by_severity(REPORT, "medium")] == ["odd"]
    assert f.findings_by_severity(REPORT, "low") == []
    with pytest.raises(AnsibleFilterError, match="severity must be one of"):
        f.findings_by_severity(REPORT, "`]|@")


@pytest.mark.parametrize(("vector", "tier"), [
    ({}, "none"),
    ({"executables": 2, "configuration": 2}, "affirming"),
    ({"executables": 2, "configuration": 32}, "warning"),
    ({"executables": 96, "configuration": 32}, "contraindicated"),
    ({"executables": 99, "hardware": 0}, "contraindicated"),
])
def test_trust_tier_is_the_worst_claim(vector: dict[str, int], tier: str) -> None:
    assert f.trust_tier(vector) == tier
    assert f.trust_tier({"trusted": True, "vector": vector}) == tier


def test_bad_input_is_one_clear_error() -> None:
    with pytest.raises(AnsibleFilterError, match="expects a dict"):
        f.failed_checks(["not", "a", "report"])
    with pytest.raises(AnsibleFilterError, match="integers"):
        f.trust_tier({"executables": "high"})


def test_untrusted_from_looped_results() -> None:
    results = [{"cvm": "cvm1", "trusted": True}, {"cvm": "cvm2", "trusted": False},
               {"item": "cvm3", "failed": True, "msg": "unreachable"}]
    assert f.untrusted(results) == ["cvm2", "cvm3"]


def test_filters_are_registered() -> None:
    assert set(f.FilterModule().filters()) == {
        "failed_checks", "findings_by_severity", "trust_tier", "untrusted", "verdict_table"}


def test_verdict_table_from_rows_and_from_hostvars() -> None:
    trusted = {"trusted": True, "status": "affirming", "vector": {"executables": 2},
               "report": {"result": "pass", "findings": []}}
    attacked = {"trusted": False, "status": "contraindicated", "vector": {"executables": 96},
                "report": {"result": "fail", "findings": [
                    {"check": "kernel.syscall_table", "severity": "critical", "summary": "hook"}]}}
    lines = f.verdict_table([
        {"cvm": "cvm1", "verdict": trusted, "gate": 200},
        {"inventory_hostname": "cvm2", "cvm_verdict": attacked, "cvm_gate": {"status": 403}},
        {"cvm": "cvm3", "verdict": {"failed": True, "msg": "HTTP 503 no A-VM"}},
    ])
    assert lines[0].split() == ["C-VM", "verdict", "tier", "gate", "failed", "checks"]
    assert lines[1].split() == ["cvm1", "TRUSTED", "(affirming)", "affirming", "200", "-"]
    assert lines[2].split() == ["cvm2", "UNTRUSTED", "(contraindicated)", "contraindicated",
                                "403", "kernel.syscall_table"]
    assert lines[3].split()[:4] == ["cvm3", "NO", "VERDICT", "-"]
    assert "HTTP 503" in lines[3]
    with pytest.raises(AnsibleFilterError, match="list"):
        f.verdict_table({"cvm": "x"})
