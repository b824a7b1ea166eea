"""Test doubles for the control channel: a fake vTPM and an in-memory A-VM/REM-S pair.

The fake vTPM signs with HMAC-SHA256 instead of an attestation key: it exercises
every binding the protocol makes (nonce in the handshake quote, SHA256(nonce ||
report digest) in report quotes) without the TPM layer, which this package must
not import. Used by the unit tests and the benchmark; never by production code.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Any

from vims.protocol.chain import MemoryLedger, ReportOutbox
from vims.protocol.core import AvmConnection, RemsConnection, VerificationResult
from vims.protocol.events import Event
from vims.protocol.messages import (
    Capabilities,
    CheckSpec,
    EventLogEntry,
    Evidence,
    Hello,
    PolicySpec,
    Quote,
    quote_qualifying_data,
)

__all__ = ["FakeVtpm", "ManualClock", "Pair", "default_policy"]

_MAGIC = b"FAKEQUOTE"


class FakeVtpm:
    """Quotes bound to qualifying data, 'signed' with an HMAC key standing in for the AK."""

    def __init__(self, key: bytes = b"fake-ak") -> None:
        self.key = key
        self.quotes = 0

    def quote(self, qualifying_data: bytes) -> Quote:
        self.quotes += 1
        attest = _MAGIC + qualifying_data
        sig = hmac.new(self.key, attest, hashlib.sha256).digest()
        return Quote(
            attest_b64=base64.b64encode(attest).decode(),
            signature_b64=base64.b64encode(sig).decode(),
            pcrs={"sha256": {"17": "11" * 32}},
        )

    def make_evidence(self, nonce: bytes) -> Evidence:
        return Evidence(
            quote=self.quote(nonce),
            event_log=[EventLogEntry(pcr=17, digest="11" * 32, type="EV_TBOOT")],
            ak_name="000b" + hashlib.sha256(self.key).hexdigest(),
        )

    def check(self, quote: Quote, qualifying_data: bytes) -> VerificationResult:
        attest = quote.attest
        expected = hmac.new(self.key, attest, hashlib.sha256).digest()
        if not hmac.compare_digest(expected, quote.signature):
            return VerificationResult(False, "bad signature")
        if attest != _MAGIC + qualifying_data:
            return VerificationResult(False, "qualifying data mismatch")
        return VerificationResult(True)

    def verify_evidence(self, hello: Hello, nonce: bytes, evidence: Evidence) -> VerificationResult:
        del hello
        return self.check(evidence.quote, nonce)

    def verify_report_quote(self, nonce: bytes, digest: bytes, quote: Quote) -> VerificationResult:
        return self.check(quote, quote_qualifying_data(nonce, digest))


def default_policy(*, quote_every: int = 3, heartbeat_s: float = 10.0, version: int = 1
                   ) -> PolicySpec:
    return PolicySpec(
        policy_id="lab-default",
        version=version,
        checks=[CheckSpec(id="kernel.text", interval_s=5.0),
                CheckSpec(id="process.hidden", interval_s=2.0)],
        quote_every=quote_every,
        heartbeat_s=heartbeat_s,
        thresholds={"max_findings": 0},
    )


@dataclass
class ManualClock:
    """A clock the test moves by hand."""

    now: float = 1000.0

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def report_body(**extra: Any) -> dict[str, Any]:
    """The smallest report body the REM-S accepts (no checks ran), plus *extra* keys."""
    return {"result": "pass", "checks": [], "findings": [], **extra}


@dataclass
class Pair:
    """One A-VM and one REM-S connection wired back to back in memory.

    ``outbox`` and ``ledger`` survive :meth:`reconnect`, as they would survive a
    real reconnect; every event of either side is recorded in order.
    """

    avm_id: str = "avm-1"
    cvms: tuple[str, ...] = ("web", "db")
    policy: PolicySpec = field(default_factory=default_policy)
    vtpm: FakeVtpm = field(default_factory=FakeVtpm)
    clock: ManualClock = field(default_factory=ManualClock)
    outbox: ReportOutbox = field(default_factory=ReportOutbox)
    ledger: MemoryLedger = field(default_factory=MemoryLedger)
    peer_avm_id: str | None = None
    avm_events: list[Event] = field(default_factory=list)
    rems_events: list[Event] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.avm, self.rems = self._new()

    def _new(self) -> tuple[AvmConnection, RemsConnection]:
        avm = AvmConnection(
            avm_id=self.avm_id,
            cvms=list(self.cvms),
            capabilities=Capabilities(checks=["kernel.text", "process.hidden"],
                                      backends=["file", "xen"]),
            make_evidence=self.vtpm.make_evidence,
            quote_report=self.vtpm.quote,
            outbox=self.outbox,
        )
        rems = RemsConnection(
            verify_evidence=self.vtpm.verify_evidence,
            policy_for=lambda hello: self.policy,
            verify_report_quote=self.vtpm.verify_report_quote,
            ledger=self.ledger,
            now=self.clock.now,
            peer_avm_id=self.peer_avm_id,
        )
        return avm, rems

    def pump(self) -> None:
        """Deliver bytes both ways until neither side has anything to send."""
        while True:
            a = self.avm.data_to_send()
            if a:
                self.rems.receive_data(a, self.clock.now)
            r = self.rems.data_to_send()
            if r:
                self.avm.receive_data(r, self.clock.now)
            self.avm_events.extend(self.avm.events())
            self.rems_events.extend(self.rems.events())
            if not a and not r:
                return

    def handshake(self) -> None:
        self.avm.connect(self.clock.now)
        self.pump()

    def report(self, cvm: str, body: dict[str, Any] | None = None) -> None:
        self.avm.send_report(cvm, body if body is not None else report_body(), self.clock.now)
        self.pump()

    def drop(self) -> None:
        """Lose the transport: both sides see the connection go, in-flight bytes vanish."""
        self.avm.data_to_send()
        self.rems.data_to_send()
        self.avm.connection_lost(self.clock.now)
        self.rems.connection_lost(self.clock.now)
        self.avm_events.extend(self.avm.events())
        self.rems_events.extend(self.rems.events())

    def reconnect(self) -> None:
        self.avm, self.rems = self._new()
        self.handshake()
