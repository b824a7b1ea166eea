"""The REM-S's decisions: reports in, verdicts (EAR) out, fail closed.

Transport-free: the control channel hands reports to :meth:`RemsService.ingest`;
the HTTP API asks :meth:`RemsService.decision`. Both go through one appraisal
(:func:`vims.rems.verdict.appraise_cvm`) over every check the C-VM's policy
assigns: a C-VM is allowed only while each of those checks has a fresh result,
none of them failed, and its A-VM's evidence holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from vims.rems import ear
from vims.rems.policy import DEFAULT_POLICY, PolicyDocument, parse_policy
from vims.rems.store import Ingested, NewReport, Store, TpmCounters
from vims.rems.verdict import (
    TIERS,
    CheckResult,
    PolicyError,
    Verdict,
    VerdictPolicy,
    appraise_cvm,
)

# (taken at, C-VM -> policy name, policy name -> (version, body))
PolicySnapshot = tuple[float, dict[str, str], dict[str, tuple[int, dict[str, Any]]]]


@dataclass(frozen=True)
class CvmPolicy:
    """The policy a C-VM is judged by, or why its stored policy cannot be used."""

    verdict: VerdictPolicy
    document: PolicyDocument | None
    error: str | None = None


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    status: str
    ear: str | None = None
    verdict: Verdict | None = None
    checks: dict[str, str] = field(default_factory=dict)  # per-check status now
    insecure_lab: bool = False


class RemsService:
    """Appraisal and decisions over a store; ``clock`` is injectable for tests.

    Policies are cached for ``policy_cache_s`` (several REM-S instances may share
    the store, so a change made through another one is seen within that time;
    this instance's own changes call :meth:`invalidate_policies`). EARs are
    signed when a relying party asks and cached per verdict: signing one per
    stored report would cost more than storing it.
    """

    def __init__(self, store: Store, key: ec.EllipticCurvePrivateKey, verdict_ttl: float = 30.0,
                 clock: Callable[[], float] = time.time, policy_cache_s: float = 1.0,
                 issuer: str = "vims-rems", insecure_lab: bool = False) -> None:
        self.store, self.key, self.verdict_ttl, self.clock = store, key, verdict_ttl, clock
        self.policy_cache_s = policy_cache_s
        self.issuer, self.insecure_lab = issuer, insecure_lab
        self._snapshot: PolicySnapshot | None = None
        self._policies: dict[str, CvmPolicy] = {}
        # Parsed once per (name, version): validating a policy costs more than a report.
        self._parsed: dict[tuple[str, int], CvmPolicy] = {}
        self._ears: dict[str, tuple[tuple[Any, ...], str]] = {}

    def invalidate_policies(self) -> None:
        self._snapshot = None

    def policy(self, cvm: str) -> CvmPolicy:
        """The C-VM's assigned policy (the default one when none is assigned)."""
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
        # Unassigned: the stored policy named "default" if the operator wrote one.
        name = assigned.get(cvm, "default")
        stored = policies.get(name)
        if stored is None:
            found = self._parsed.get(("", 0))
            if found is None:
                found = self._parsed[("", 0)] = CvmPolicy(DEFAULT_POLICY.verdict_policy(1),
                                                          DEFAULT_POLICY)
        else:
            version, body = stored
            found = self._parsed.get((name, version))
            if found is None:
                try:
                    doc = parse_policy(body, name)
                    found = CvmPolicy(doc.verdict_policy(version), doc)
                except PolicyError as exc:  # stored by an older REM-S: judge nothing by it
                    found = CvmPolicy(VerdictPolicy(name=str(name), version=version), None,
                                      f"policy {name} v{version} is invalid: {exc}")
                if len(self._parsed) > 4096:
                    self._parsed.clear()
                self._parsed[(name, version)] = found
        self._policies[cvm] = found
        return found

    def verdict_policy(self, cvm: str) -> VerdictPolicy:
        return self.policy(cvm).verdict

    # ------------------------------------------------------------ appraisal
    def judge(self, cvm: str, results: Mapping[str, CheckResult],
              view: Mapping[str, Any] | None, now: float) -> Verdict:
        """The C-VM's verdict over its whole policy (the store calls it while ingesting)."""
        p = self.policy(cvm)
        if p.document is None:
            vector = {"configuration": TIERS["contraindicated"]}
            return Verdict("contraindicated", vector, [p.error or "no usable policy"], {}, now,
                           None, p.verdict.id)
        return appraise_cvm(p.verdict, p.document.expected(),
                            p.document.stale_after_intervals, results, view, now)

    def ingest(self, reports: Sequence[NewReport], results: Sequence[tuple[str, CheckResult]] = (),
               audits: Sequence[tuple[str, str, dict[str, Any]]] = (),
               counters: Mapping[str, TpmCounters] | None = None) -> Ingested:
        """Store verified reports (and evidence results), with each C-VM's new verdict."""
        return self.store.ingest(reports, self.judge, results, self.clock(), audits, counters)

    def ingest_reports(self, items: Sequence[NewReport]) -> list[Verdict]:
        """Store verified reports; each report's C-VM verdict after the batch, in order."""
        done = self.ingest(items)
        return [done.verdicts[item.cvm] for item in items]

    def ingest_report(self, avm_id: str, cvm: str, seq: int, prev_hash: str,
                      report: dict[str, Any], digest: str | None = None) -> Verdict:
        """Store one verified report; the C-VM's new verdict."""
        return self.ingest_reports([NewReport(cvm, avm_id, seq, prev_hash, report, digest)])[0]

    def verdict(self, cvm: str) -> Verdict | None:
        """The C-VM's verdict under its *current* policy.

        The stored verdict was judged when its last result arrived; if the
        policy changed since, the C-VM is judged again over its stored results
        (not written back: the next ingest stores its own).
        """
        row = self.store.verdict(cvm)
        if row is None:
            return None
        stored = self.store.verdict_of(row)
        if stored.policy_id == self.policy(cvm).verdict.id:
            return stored
        return self.judge(cvm, self.store.check_results(cvm), self.store.latest_view(cvm),
                          float(row["issued_at"]))

    # ------------------------------------------------------------- decisions
    def _ear(self, cvm: str, v: Verdict, issued_at: float, now: float,
             nonce: str | None) -> str:
        """The verdict's EAR, valid from its issue to its expiry; signed once per verdict."""
        checks = v.states_at(now)
        key = (issued_at, v.expires_at, v.report_seq, v.status, v.policy_id,
               tuple(sorted(checks.items())))
        cached = self._ears.get(cvm)
        if nonce is None and cached is not None and cached[0] == key:
            return cached[1]
        iat = int(issued_at)
        token = ear.issue(cvm, status=v.status, vector=v.vector, policy_id=v.policy_id,
                          checks=checks, key=self.key, iat=iat,
                          exp=max(iat + 1, int(v.expires_at)), issuer=self.issuer,
                          nonce=nonce, insecure_lab=self.insecure_lab)
        if nonce is None:
            self._ears[cvm] = (key, token)
        return token

    def decision(self, cvm: str, nonce: str | None = None) -> Decision:
        """May *cvm* pass the gate now? With its EAR when it may (``nonce``: eat_nonce)."""
        row = self.store.verdict(cvm)
        lab = self.insecure_lab
        if row is None:
            return Decision(False, "unknown C-VM: no verdict", "none", insecure_lab=lab)
        v = self.verdict(cvm)
        assert v is not None
        now = self.clock()
        checks = v.states_at(now)
        policy = self.policy(cvm)
        if policy.error:
            return Decision(False, f"untrusted: {policy.error}", v.status, None, v, checks, lab)
        if v.expires_at <= now:
            stale = sorted(c for c, st in checks.items() if st == "stale")
            what = (f"{', '.join(stale[:4])}{' ...' if len(stale) > 4 else ''} "
                    f"{'has' if len(stale) == 1 else 'have'} no fresh result" if stale
                    else (v.reasons[0] if v.reasons else "no fresh result"))
            return Decision(False, f"stale: {what}", v.status, None, v, checks, lab)
        trusted = v.trusted(policy.verdict)
        if not trusted:
            why = "; ".join(r for r in v.reasons if "not applicable" not in r)[:300]
            return Decision(False, f"untrusted: {v.status}: {why}" if why else
                            f"untrusted: {v.status}", v.status, None, v, checks, lab)
        return Decision(True, "trusted", v.status,
                        self._ear(cvm, v, float(row["issued_at"]), now, nonce), v, checks, lab)
