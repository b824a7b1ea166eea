"""Appraisal of introspection reports into an AR4SI trust vector.

A verdict policy is data: default rules map each finding to its check's trust
vector category by severity, and operators add rules as JMESPath expressions
over the report (library ``jmespath``), e.g. ``length(processes[?comm=='nc']) >
`0``` -> configuration = contraindicated. The worst tier of the vector is the
verdict's status.
"""

from __future__ import annotations

import re
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
        name = data.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise PolicyError(f"bad policy name {name!r}")
        version = data.get("version", 1)
        if not isinstance(version, int) or version < 1:
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
            rules.append(Rule(str(r.get("name", f"rule-{i}")), expr, r["category"], r["tier"],
                              compiled))
        error_tier = data.get("error_tier", "warning")
        if error_tier not in ("warning", "contraindicated"):
            raise PolicyError("error_tier must be warning or contraindicated")
        return cls(name=name, version=version, rules=tuple(rules), error_tier=error_tier,
                   allow_warning=bool(data.get("allow_warning", False)))


@dataclass
class Appraisal:
    """The trust vector of one C-VM from one report, and why."""

    vector: dict[str, int]
    reasons: list[str]

    @property
    def status(self) -> str:
        return tier_name(max(self.vector.values(), default=0))

    def trusted(self, policy: VerdictPolicy) -> bool:
        return self.status == "affirming" or (self.status == "warning" and policy.allow_warning)


def appraise(report: dict[str, Any], policy: VerdictPolicy) -> Appraisal:
    """Trust vector from a report: categories the checks cover start affirming."""
    vector = {c: TIERS["none"] for c in CATEGORIES}
    reasons: list[str] = []
    categories: dict[str, str] = {}
    for check in report.get("checks", []):
        cat = check.get("category")
        if check.get("status") == "not_applicable":
            # Covers nothing: must not make its category affirming.
            reasons.append(f"{check.get('id')}: not applicable: {check.get('error')}")
            continue
        if cat in vector:
            categories[check.get("id", "")] = cat
            vector[cat] = max(vector[cat], TIERS["affirming"])
            if check.get("status") == "error":
                vector[cat] = max(vector[cat], TIERS[policy.error_tier])
                reasons.append(f"{check.get('id')}: error: {check.get('error')}")
    for finding in report.get("findings", []):
        cat = categories.get(finding.get("check", ""))
        if cat is None:
            continue
        vector[cat] = max(vector[cat], SEVERITY_TIER.get(finding.get("severity", ""), 96))
        reasons.append(f"{finding.get('check')}: {finding.get('summary')}")
    for rule in policy.rules:
        if rule.fires(report):
            vector[rule.category] = max(vector[rule.category], TIERS[rule.tier])
            reasons.append(f"rule {rule.name}: {rule.expression}")
    return Appraisal(vector=vector, reasons=reasons)
