"""Appraisal of a C-VM into an AR4SI trust vector, over every check its policy assigns.

A C-VM's verdict is judged over the latest result of *each* check of its
policy, not over the last report: the A-VM runs checks in interval groups (the
syscall table every 10 s, process lists every second), each report holds only
its group's checks, and a finding of one group must not be forgotten when the
next round of another group passes. So:

- each check's latest result stands until a later round of that same check
  replaces it; a failed check stays failed, however old, until it passes again;
- a passing result is fresh for ``stale_after_intervals`` x that check's own
  interval; a check of the policy with no fresh result makes the verdict lapse
  (fail closed), and the reason names the check;
- the pseudo-check ``avm.evidence`` holds the A-VM's own attestation (handshake
  quote, report quotes, TPM counters): a failure there contraindicates the
  hardware claim of every C-VM it guards until a new handshake verifies.

A verdict policy is data: default rules map each finding to its check's trust
vector category by severity, and operators add rules as JMESPath expressions
(library ``jmespath``), evaluated over the *composite* report — the latest
result of every check, their findings, and the latest process and module view
— e.g. ``length(processes[?comm=='nc']) > `0``` -> configuration =
contraindicated. The worst tier of the vector is the verdict's status.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jmespath
from jmespath.exceptions import JMESPathError

from vims.errors import VimsError

CATEGORIES = ("instance-identity", "configuration", "executables", "file-system", "hardware",
              "runtime-opaque", "storage-opaque", "sourced-data")
TIERS = {"none": 0, "affirming": 2, "warning": 32, "contraindicated": 96}
SEVERITY_TIER = {"critical": 96, "high": 96, "medium": 32, "low": 32}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_RULES = 256
# Result statuses as the REM-S records them; "stale" is what a decision calls a
# result (or its absence) that is too old to count.
RESULT_STATUSES = ("pass", "fail", "error", "not_applicable")
EVIDENCE_CHECK = "avm.evidence"
# The checks of a C-VM that has no policy assigned (the runtime's default checks;
# tests/unit/test_appraisal.py keeps the two lists equal) and their interval.
DEFAULT_CHECKS = ("kernel.text", "kernel.syscall_table", "kernel.idt", "kernel.modules",
                  "kernel.hidden_modules", "kernel.ftrace", "kernel.kprobes", "kernel.bpf",
                  "kernel.netfilter", "kernel.data", "cpu.state",
                  "process.hidden", "process.code", "process.fileless",
                  "process.allowlist", "process.creds", "behaviour.children",
                  "behaviour.files", "behaviour.sockets", "behaviour.memory",
                  "behaviour.creds")
DEFAULT_INTERVAL_S = 10.0
DEFAULT_STALE_AFTER = 3


class PolicyError(VimsError):
    """A verdict policy is malformed."""


def tier_name(value: int) -> str:
    """AR4SI tier of a trust claim value (0 none, 2-31 affirming, 32-95 warning, 96+)."""
    if value >= 96:
        return "contraindicated"
    if value >= 32:
        return "warning"
    if value >= 2:
        return "affirming"
    return "none"


@dataclass(frozen=True)
class Rule:
    """When ``expression`` is truthy on a report, ``category`` gets at least ``tier``."""

    name: str
    expression: str
    category: str
    tier: str
    compiled: Any = field(repr=False, compare=False, default=None)

    def fires(self, report: dict[str, Any]) -> bool:
        try:
            result = self.compiled.search(report)
        except JMESPathError:
            return True  # an expression that cannot be evaluated must not pass silently
        return bool(result) if not isinstance(result, (int, float)) else result != 0


@dataclass(frozen=True)
class VerdictPolicy:
    name: str
    version: int = 1
    rules: tuple[Rule, ...] = ()
    error_tier: str = "warning"  # a check that could not run
    allow_warning: bool = False  # may a C-VM whose status is "warning" pass the gate?

    @property
    def id(self) -> str:
        return f"policy:{self.name}@{self.version}"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VerdictPolicy:
        if not isinstance(data, dict):
            raise PolicyError("a verdict policy must be a JSON object")
        unknown = set(data) - {"name", "version", "rules", "error_tier", "allow_warning"}
        if unknown:
            raise PolicyError(f"unknown verdict keys: {', '.join(sorted(unknown))}")
        name = data.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise PolicyError(f"bad policy name {name!r}")
        version = data.get("version", 1)
        if type(version) is not int or version < 1:
            raise PolicyError("policy version must be a positive integer")
        raw_rules = data.get("rules", [])
        if not isinstance(raw_rules, list) or len(raw_rules) > MAX_RULES:
            raise PolicyError(f"rules must be a list of at most {MAX_RULES}")
        rules = []
        for i, r in enumerate(raw_rules):
            if not isinstance(r, dict) or set(r) - {"name", "when", "category", "tier"}:
                raise PolicyError(f"rule {i}: needs exactly name, when, category, tier")
            if r.get("category") not in CATEGORIES:
                raise PolicyError(f"rule {i}: unknown category {r.get('category')!r}")
            if r.get("tier") not in ("warning", "contraindicated"):
                raise PolicyError(f"rule {i}: tier must be warning or contraindicated")
            expr = r.get("when")
            if not isinstance(expr, str) or len(expr) > 1024:
                raise PolicyError(f"rule {i}: 'when' must be a JMESPath expression")
            try:
                compiled = jmespath.compile(expr)
            except JMESPathError as exc:
                raise PolicyError(f"rule {i} ({r.get('name')}): bad JMESPath: {exc}") from exc
            rules.append(Rule(str(r.get("name", f"rule-{i}"))[:64], expr, r["category"],
                              r["tier"], compiled))
        error_tier = data.get("error_tier", "warning")
        if error_tier not in ("warning", "contraindicated"):
            raise PolicyError("error_tier must be warning or contraindicated")
        allow_warning = data.get("allow_warning", False)
        if not isinstance(allow_warning, bool):
            raise PolicyError("allow_warning must be true or false")
        return cls(name=name, version=version, rules=tuple(rules), error_tier=error_tier,
                   allow_warning=allow_warning)


@dataclass(frozen=True)
class ExpectedCheck:
    """A check the C-VM's policy assigns, and how often it must report."""

    id: str
    interval_s: float


@dataclass(frozen=True)
class CheckResult:
    """The latest result of one check of one C-VM, as the REM-S recorded it."""

    check_id: str
    status: str  # one of RESULT_STATUSES
    category: str
    error: str | None
    findings: tuple[dict[str, Any], ...]
    avm_id: str
    report_seq: int | None
    reported_at: float

    def entry(self) -> dict[str, Any]:
        """The result as a report's check entry (what verdict rules see)."""
        return {"id": self.check_id, "status": self.status, "category": self.category,
                "error": self.error, "findings": len(self.findings)}


def _category(value: Any) -> str:
    # A result whose category is not one of AR4SI's still counts: as runtime-opaque.
    return value if value in CATEGORIES else "runtime-opaque"


def results_from_report(body: Mapping[str, Any], avm_id: str, seq: int | None,
                        now: float) -> dict[str, CheckResult]:
    """Each check's result in one report, judged by the REM-S itself.

    A check with findings failed, whatever status the report claims; a finding
    of a check the report does not list still counts (as a failed result of its
    own). The protocol refuses such reports at the edge; this stays fail-closed
    for bodies that reach it some other way.
    """
    findings: dict[str, list[dict[str, Any]]] = {}
    for f in body.get("findings") or []:
        if isinstance(f, dict):
            findings.setdefault(str(f.get("check", "")), []).append(f)
    results: dict[str, CheckResult] = {}
    for c in body.get("checks") or []:
        if not isinstance(c, dict) or not isinstance(c.get("id"), str):
            continue
        cid = c["id"]
        mine = tuple(findings.pop(cid, ()))
        claimed = c.get("status")
        error = c.get("error") if isinstance(c.get("error"), str) else None
        if mine:
            status = "fail"
        elif claimed == "error":
            status = "error"
        elif claimed == "not_applicable":
            status = "not_applicable"
        elif claimed in ("pass", "fail"):
            status = "pass" if claimed == "pass" else "error"  # "fail" without findings
            if claimed == "fail":
                error = "reported failed without findings"
        else:
            status, error = "error", f"unknown status {str(claimed)[:32]!r}"
        results[cid] = CheckResult(cid, status, _category(c.get("category")), error, mine,
                                   avm_id, seq, now)
    for cid, orphans in findings.items():
        results[cid] = CheckResult(cid or "unknown", "fail", "runtime-opaque",
                                   "findings of a check the report does not list",
                                   tuple(orphans), avm_id, seq, now)
    return results


@dataclass(frozen=True)
class CheckState:
    """A check as a verdict sees it: its result's status, or stale."""

    status: str  # pass, fail, error, not_applicable or stale
    category: str
    expires_at: float | None  # a passing result's freshness limit; None: does not expire


@dataclass
class Verdict:
    """A C-VM's appraisal over its whole policy at one moment."""

    status: str
    vector: dict[str, int]
    reasons: list[str]
    checks: dict[str, CheckState]
    expires_at: float  # the verdict lapses then (the earliest expiry of a check)
    stale_check: str | None  # the check that expires first (or has no result)
    policy_id: str
    report_seq: int | None = None

    def trusted(self, policy: VerdictPolicy) -> bool:
        return self.status == "affirming" or (self.status == "warning" and policy.allow_warning)

    def states_at(self, now: float) -> dict[str, str]:
        """Per-check status at *now*: a passing result past its expiry is stale."""
        return {cid: ("stale" if s.expires_at is not None and s.expires_at <= now
                      and s.status != "fail" else s.status)
                for cid, s in self.checks.items()}


def appraise_cvm(policy: VerdictPolicy, expected: Iterable[ExpectedCheck],
                 stale_after: float, results: Mapping[str, CheckResult],
                 view: Mapping[str, Any] | None, now: float) -> Verdict:
    """The verdict of one C-VM over every check its policy assigns (see module doc)."""
    vector = {c: TIERS["none"] for c in CATEGORIES}
    reasons: list[str] = []
    states: dict[str, CheckState] = {}
    expires_at, stale_check = math.inf, None
    considered: list[CheckResult] = []

    def judge(r: CheckResult) -> None:
        considered.append(r)
        cat = r.category
        if r.status == "not_applicable":
            reasons.append(f"{r.check_id}: not applicable: {r.error}")  # covers nothing
            return
        vector[cat] = max(vector[cat], TIERS["affirming"])
        if r.status == "error":
            vector[cat] = max(vector[cat], TIERS[policy.error_tier])
            reasons.append(f"{r.check_id}: error: {r.error}")
        for f in r.findings:
            vector[cat] = max(vector[cat], SEVERITY_TIER.get(str(f.get("severity")), 96))
            reasons.append(f"{r.check_id}: {str(f.get('summary'))[:200]}")
        if r.status == "fail" and not r.findings:
            vector[cat] = max(vector[cat], TIERS["contraindicated"])
            reasons.append(f"{r.check_id}: {r.error}")

    for e in expected:
        r = results.get(e.id)
        limit = stale_after * e.interval_s
        if r is None:
            states[e.id] = CheckState("stale", "runtime-opaque", now)
            reasons.append(f"{e.id}: no result yet")
            if now < expires_at:
                expires_at, stale_check = now, e.id
            continue
        expiry = r.reported_at + limit
        # A failure stays in force until the check passes again; anything else counts
        # only while fresh.
        if r.status == "fail" or expiry > now:
            judge(r)
        else:
            reasons.append(f"{e.id}: no result newer than {limit:g} s "
                           f"({stale_after:g} x {e.interval_s:g} s)")
        states[e.id] = CheckState(r.status, r.category, None if r.status == "fail" else expiry)
        if r.status != "fail" and expiry < expires_at:
            expires_at, stale_check = expiry, e.id
    evidence = results.get(EVIDENCE_CHECK)
    if evidence is not None:
        judge(evidence)
        states[EVIDENCE_CHECK] = CheckState(evidence.status, evidence.category, None)
    composite = {**(view or {}), "checks": [r.entry() for r in considered],
                 "findings": [f for r in considered for f in r.findings]}
    for rule in policy.rules:
        if rule.fires(composite):
            vector[rule.category] = max(vector[rule.category], TIERS[rule.tier])
            reasons.append(f"rule {rule.name}: {rule.expression}")
    seq = max((r.report_seq for r in considered if r.report_seq is not None), default=None)
    return Verdict(status=tier_name(max(vector.values(), default=0)), vector=vector,
                   reasons=reasons, checks=states,
                   expires_at=expires_at if expires_at != math.inf else now,
                   stale_check=stale_check, policy_id=policy.id, report_seq=seq)


def appraise(report: dict[str, Any], policy: VerdictPolicy, now: float = 0.0) -> Verdict:
    """One report on its own: the verdict over exactly the checks it holds.

    For tools and tests that judge a single report; the REM-S judges C-VMs with
    :func:`appraise_cvm` over their whole policy.
    """
    results = results_from_report(report, "", None, now)
    expected = [ExpectedCheck(cid, math.inf) for cid in results]
    return appraise_cvm(policy, expected, 1.0, results, report, now)
