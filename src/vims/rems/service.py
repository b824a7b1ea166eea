"""The REM-S's decisions: reports in, verdicts (EAR) out, fail closed.

Transport-free: the control channel hands reports to ``ingest_report``; the
HTTP API asks ``decision``. A C-VM is allowed only while it has a verdict that
is trusted under its policy and not expired: no report within the policy's
staleness limit means the verdict lapses and the gate denies.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from vims.rems import ear
from vims.rems.store import Store
from vims.rems.verdict import Appraisal, VerdictPolicy, appraise

DEFAULT_POLICY: dict[str, Any] = {"name": "default", "version": 1}


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    status: str
    ear: str | None = None


class RemsService:
    """Appraisal and decisions over a store; ``clock`` is injectable for tests."""

    def __init__(self, store: Store, key: ec.EllipticCurvePrivateKey, verdict_ttl: float = 30.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.store, self.key, self.verdict_ttl, self.clock = store, key, verdict_ttl, clock

    def verdict_policy(self, cvm: str) -> tuple[VerdictPolicy, dict[str, Any]]:
        name = self.store.policy_of(cvm)
        stored = self.store.get_policy(name) if name else None
        body: dict[str, Any] = stored[1] if stored else dict(DEFAULT_POLICY)
        verdict: dict[str, Any] = body.get("verdict") or {}
        policy = VerdictPolicy.from_dict({"name": body.get("name", name or "default"),
                                          "version": stored[0] if stored else 1, **verdict})
        return policy, body

    def ttl_for(self, body: dict[str, Any]) -> float:
        """Staleness limit: k x the slowest check interval of the policy (fail closed)."""
        intervals = [c.get("interval_s", 10) for c in body.get("checks", [])
                     if isinstance(c, dict)]
        k = body.get("stale_after_intervals", 3)
        return float(max(intervals) * k) if intervals else self.verdict_ttl

    def ingest_report(self, avm_id: str, cvm: str, seq: int, prev_hash: str,
                      report: dict[str, Any], digest: str | None = None) -> Appraisal:
        """Store a verified report, appraise it and publish the new verdict."""
        self.store.add_report(cvm, avm_id, seq, prev_hash, report, digest)
        policy, body = self.verdict_policy(cvm)
        appraisal = appraise(report, policy)
        now = self.clock()
        ttl = self.ttl_for(body)
        token = ear.issue(cvm, appraisal, policy, self.key, int(now), int(ttl) or 1)
        self.store.put_verdict(cvm, appraisal.status, appraisal.vector, token, now, now + ttl,
                               seq)
        return appraisal

    def decision(self, cvm: str) -> Decision:
        verdict = self.store.verdict(cvm)
        if verdict is None:
            return Decision(False, "unknown C-VM: no verdict", "none")
        if verdict["expires_at"] <= self.clock():
            return Decision(False, "stale: no fresh report within the staleness limit",
                            verdict["status"])
        policy, _ = self.verdict_policy(cvm)
        status = verdict["status"]
        trusted = status == "affirming" or (status == "warning" and policy.allow_warning)
        return Decision(trusted, "trusted" if trusted else f"untrusted: {status}", status,
                        verdict["ear"])
