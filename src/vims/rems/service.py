"""The REM-S's decisions: reports in, verdicts (EAR) out, fail closed.

Transport-free: the control channel hands reports to ``ingest_reports``; the
HTTP API asks ``decision``. A C-VM is allowed only while it has a verdict that
is trusted under its policy and not expired: no report within the policy's
staleness limit means the verdict lapses and the gate denies.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from vims.rems import ear
from vims.rems.store import NewReport, NewVerdict, Store
from vims.rems.verdict import Appraisal, VerdictPolicy, appraise

DEFAULT_POLICY: dict[str, Any] = {"name": "default", "version": 1}
# (taken at, C-VM -> policy name, policy name -> (version, body))
PolicySnapshot = tuple[float, dict[str, str], dict[str, tuple[int, dict[str, Any]]]]


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    status: str
    ear: str | None = None


class RemsService:
    """Appraisal and decisions over a store; ``clock`` is injectable for tests.

    Policies are cached for ``policy_cache_s`` (several REM-S instances may share
    the store, so a change made through another one is seen within that time;
    this instance's own changes call :meth:`invalidate_policies`). EARs are
    signed when a relying party asks and cached per verdict: signing one per
    stored report would cost more than storing it.
    """

    def __init__(self, store: Store, key: ec.EllipticCurvePrivateKey, verdict_ttl: float = 30.0,
                 clock: Callable[[], float] = time.time, policy_cache_s: float = 1.0) -> None:
        self.store, self.key, self.verdict_ttl, self.clock = store, key, verdict_ttl, clock
        self.policy_cache_s = policy_cache_s
        self._snapshot: PolicySnapshot | None = None
        self._policies: dict[str, tuple[VerdictPolicy, dict[str, Any]]] = {}
        self._ears: dict[str, tuple[tuple[Any, ...], str]] = {}

    def invalidate_policies(self) -> None:
        self._snapshot = None

    def verdict_policy(self, cvm: str) -> tuple[VerdictPolicy, dict[str, Any]]:
        now = time.monotonic()
        if self._snapshot is None or now - self._snapshot[0] >= self.policy_cache_s:
            # All assignments and policies at once: two queries a second, whatever the
            # number of C-VMs, instead of two per report.
            self._snapshot = (now, *self.store.policy_snapshot())
            self._policies = {}
        cached = self._policies.get(cvm)
        if cached is not None:
            return cached
        _, assigned, policies = self._snapshot
        name = assigned.get(cvm)
        stored = policies.get(name) if name else None
        body: dict[str, Any] = stored[1] if stored else dict(DEFAULT_POLICY)
        verdict: dict[str, Any] = body.get("verdict") or {}
        policy = VerdictPolicy.from_dict({"name": body.get("name", name or "default"),
                                          "version": stored[0] if stored else 1, **verdict})
        self._policies[cvm] = (policy, body)
        return policy, body

    def ttl_for(self, body: dict[str, Any]) -> float:
        """Staleness limit: k x the slowest check interval of the policy (fail closed)."""
        intervals = [c.get("interval_s", 10) for c in body.get("checks", [])
                     if isinstance(c, dict)]
        k = body.get("stale_after_intervals", 3)
        return float(max(intervals) * k) if intervals else self.verdict_ttl

    def ingest_reports(self, items: Sequence[NewReport]) -> list[Appraisal]:
        """Appraise verified reports and store them with the new verdicts, in one go."""
        now = self.clock()
        appraisals: list[Appraisal] = []
        verdicts: dict[str, NewVerdict] = {}  # the last report of a C-VM sets its verdict
        for item in items:
            policy, body = self.verdict_policy(item.cvm)
            appraisal = appraise(item.body, policy)
            appraisals.append(appraisal)
            verdicts[item.cvm] = NewVerdict(item.cvm, appraisal.status, appraisal.vector, now,
                                            now + self.ttl_for(body), item.seq)
        self.store.ingest(items, list(verdicts.values()))
        return appraisals

    def ingest_report(self, avm_id: str, cvm: str, seq: int, prev_hash: str,
                      report: dict[str, Any], digest: str | None = None) -> Appraisal:
        """Store one verified report, appraise it and publish the new verdict."""
        return self.ingest_reports([NewReport(cvm, avm_id, seq, prev_hash, report, digest)])[0]

    def _ear(self, cvm: str, verdict: dict[str, Any], policy: VerdictPolicy) -> str:
        """The verdict's EAR, valid from its issue to its expiry; signed once per verdict."""
        key = (verdict["issued_at"], verdict["expires_at"], verdict["report_seq"],
               verdict["status"], policy.id)
        cached = self._ears.get(cvm)
        if cached is not None and cached[0] == key:
            return cached[1]
        issued = int(verdict["issued_at"])
        token = ear.issue(cvm, Appraisal(verdict["vector"], []), policy, self.key, issued,
                          max(1, int(verdict["expires_at"]) - issued))
        self._ears[cvm] = (key, token)
        return token

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
                        self._ear(cvm, verdict, policy))
