# -*- coding: utf-8 -*-
# Copyright: VIMS developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Filters over VIMS reports (vims.attestation.vmi_check) and verdicts (attest).

The selections are JMESPath expressions, the same language the REM-S's verdict
rules use, so a play and a REM-S policy can say the same thing the same way.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from ansible.errors import AnsibleFilterError
from ansible.module_utils.common.text.converters import to_native

try:
    import jmespath
except ImportError:
    HAS_JMESPATH = False
else:
    HAS_JMESPATH = True

# AR4SI tiers (draft-ietf-rats-ar4si): the worst claim decides the tier.
TIERS = ((96, "contraindicated"), (32, "warning"), (2, "affirming"))
SEVERITIES = ("critical", "high", "medium", "low", "info")

FAILED_CHECKS = "checks[?status != 'pass'].id"
# An attest result's report carries findings but no per-check statuses.
FINDING_CHECKS = "findings[].check"
FINDINGS_BY_SEVERITY = "findings[?severity == `{0}`]"


def _search(expression, data, what):
    if not HAS_JMESPATH:
        raise AnsibleFilterError("the vims.attestation filters need the Python library "
                                 "jmespath on the controller")
    if isinstance(data, Mapping) and not isinstance(data, dict):
        data = dict(data)
    if not isinstance(data, dict):
        raise AnsibleFilterError("%s expects a dict (a VIMS %s), got %s"
                                 % (what, "report" if what != "trust_tier" else "verdict",
                                    type(data).__name__))
    try:
        # Plain types: jmespath checks exact types, and ansible-core's templating hands
        # filters tagged/lazy subclasses of dict, list and str.
        data = json.loads(json.dumps(data, default=to_native))
        return jmespath.search(expression, data)
    except (TypeError, ValueError) as exc:
        raise AnsibleFilterError("%s: not JSON data: %s" % (what, to_native(exc)))
    except jmespath.exceptions.JMESPathError as exc:
        raise AnsibleFilterError("%s: %s" % (what, to_native(exc)))


def _report(data):
    """A vmi_check result, an attest result or a bare report: the report inside."""
    if isinstance(data, dict) and isinstance(data.get("report"), dict):
        return data["report"]
    return data


def failed_checks(data):
    """Ids of the checks whose status is not pass: of an attest result, every check of
    the C-VM's policy that failed, erred or went stale (its ``checks`` map); of a
    report, its checks (or, without per-check statuses, those its findings name)."""
    if isinstance(data, Mapping) and isinstance(data.get("checks"), Mapping):
        return sorted(str(k) for k, v in data["checks"].items()
                      if v not in ("pass", "not_applicable"))
    report = _report(data)
    if isinstance(report, Mapping) and "checks" not in report:
        found = _search(FINDING_CHECKS, report, "failed_checks") or []
        return sorted(set(str(c) for c in found if c is not None))
    return _search(FAILED_CHECKS, report, "failed_checks") or []


def findings_by_severity(data, severity="critical"):
    """The findings of one severity (critical, high, medium, low, info)."""
    if severity not in SEVERITIES:
        raise AnsibleFilterError("findings_by_severity: severity must be one of %s, got %r"
                                 % (", ".join(SEVERITIES), severity))
    return _search(FINDINGS_BY_SEVERITY.format(_json_literal(severity)),
                   _report(data), "findings_by_severity") or []


def trust_tier(data):
    """The AR4SI tier of a verdict or trust vector: affirming, warning, contraindicated
    or none (no claim made)."""
    if isinstance(data, dict) and "vector" in data:
        data = data["vector"]
    values = _search("values(@)", data if isinstance(data, dict) else None, "trust_tier") or []
    try:
        worst = max([int(v) for v in values if v is not None] or [0])
    except (TypeError, ValueError):
        raise AnsibleFilterError("trust_tier: trust vector values must be integers")
    for floor, name in TIERS:
        if worst >= floor:
            return name
    return "none"


def untrusted(results):
    """From a list of attest results (a looped task's .results), the untrusted C-VMs."""
    if not isinstance(results, list):
        raise AnsibleFilterError("untrusted expects a list of attest results")
    return [r.get("cvm") or r.get("item") for r in results
            if isinstance(r, dict) and r.get("trusted") is not True]


def verdict_table(rows):
    """Lines of a fixed-width table, one per C-VM, from a list of dicts with ``cvm``,
    ``verdict`` (an attest result) and optionally ``gate`` (an HTTP status); or of
    the C-VMs' hostvars after playbooks/attest.yml (``cvm_verdict``, ``cvm_gate``)."""
    if not isinstance(rows, list):
        raise AnsibleFilterError("verdict_table expects a list of {cvm, verdict, gate}")
    lines = ["%-10s %-28s %-16s %-5s %s" % ("C-VM", "verdict", "tier", "gate", "failed checks")]
    for row in rows:
        if not isinstance(row, Mapping):
            raise AnsibleFilterError("verdict_table: each row must be a dict")
        if "verdict" not in row and "inventory_hostname" in row:
            gate_result = row.get("cvm_gate") or {}
            row = {"cvm": row["inventory_hostname"], "verdict": row.get("cvm_verdict"),
                   "gate": gate_result.get("status") if isinstance(gate_result, Mapping) else None}
        verdict = row.get("verdict") or {}
        known = isinstance(verdict, Mapping) and isinstance(verdict.get("trusted"), bool)
        if known:
            word = "TRUSTED" if verdict["trusted"] else "UNTRUSTED"
            status = "%s (%s)" % (word, verdict.get("status"))
            tier = trust_tier(verdict) if isinstance(verdict.get("vector"), dict) else "-"
            failed = ",".join(failed_checks(verdict)) \
                if isinstance(verdict.get("report"), Mapping) \
                or isinstance(verdict.get("checks"), Mapping) else ""
        else:
            status, tier, failed = "NO VERDICT", "-", to_native(verdict.get("msg", ""))[:60] \
                if isinstance(verdict, Mapping) else ""
        gate = row.get("gate")
        lines.append("%-10s %-28s %-16s %-5s %s" % (
            to_native(row.get("cvm")), status, tier, "-" if gate is None else gate, failed or "-"))
    return lines


def _json_literal(text):
    return json.dumps(text)


class FilterModule(object):
    def filters(self):
        return {
            "failed_checks": failed_checks,
            "findings_by_severity": findings_by_severity,
            "trust_tier": trust_tier,
            "untrusted": untrusted,
            "verdict_table": verdict_table,
        }
