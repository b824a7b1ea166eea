"""``vims rems serve``: the REM-S process.

One asyncio loop runs the control channel (mutual TLS 1.3, one sans-IO
connection per A-VM) and the HTTP API (uvicorn, TLS by default; plain HTTP only
on loopback for a local gate). An A-VM is believed only when:

- it speaks only for C-VMs the operator bound to it (checked on hello, before
  any chain head is revealed, and again for every report stored);
- its handshake quote, made over the REM-S nonce bound to this TLS channel,
  verifies against its enrolled AK, with ``safe`` set and TPM counters that
  never go back, PCR 17 equal to the golden launch value, and a PCR 23 event
  log that replays to the quote with every event's digest approved;
- every report quote does the same and shows the handshake's PCR values.

Accepted reports are stored and appraised over each C-VM's whole policy; a
failure of the A-VM's own evidence is recorded as the ``avm.evidence`` result of
its C-VMs, so their verdict turns untrusted with that reason at once.
"""

from __future__ import annotations

import asyncio
import asyncio.constants as asyncio_constants
import contextlib
import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI

from vims.protocol.chain import GENESIS as CHAIN_GENESIS
from vims.protocol.core import RemsConnection, VerificationResult
from vims.protocol.events import (
    ConnectionClosed,
    Event,
    HandshakeComplete,
    ProtocolError,
    ReportReceived,
)
from vims.protocol.messages import (
    OPT_IN_CHECKS,
    ChainHead,
    CheckSpec,
    Evidence,
    Hello,
    PolicySpec,
    Quote,
    policy_digest,
    quote_qualifying_data,
)
from vims.protocol.pki import CertificateAuthority, load_or_create_key, server_context
from vims.protocol.transport import Session, serve
from vims.rems import audit
from vims.rems.api import AttestFailed, create_app
from vims.rems.config import RemsConfig
from vims.rems.enroll import Enroller
from vims.rems.evidence import EvidenceRefused, check_event_log, counter_step
from vims.rems.httpguard import guarded_protocol
from vims.rems.policy import DEFAULT_POLICY, PolicyDocument, parse_policy
from vims.rems.service import RemsService
from vims.rems.store import NewReport, Store, StoreError, TpmCounters
from vims.rems.verdict import EVIDENCE_CHECK, CheckResult, PolicyError, Verdict
from vims.rems.webhooks import WebhookSender
from vims.tpm.eventlog import AGENT_PCR, EventLog, EventLogError, replay
from vims.tpm.verifier import QuoteError, QuoteResult, verify_quote

log = logging.getLogger("vims.rems")
LAUNCH_PCR = 17
QUOTED_PCRS = (LAUNCH_PCR, AGENT_PCR)
MAX_BATCH = 2000  # reports per storage transaction


def _pcrs(quote: Quote) -> dict[str, dict[int, bytes]]:
    return {bank: {int(i): bytes.fromhex(v) for i, v in values.items()}
            for bank, values in quote.pcrs.items()}


def _counters(result: QuoteResult) -> TpmCounters:
    ci = result.clock_info
    return TpmCounters(ci.reset_count, ci.restart_count, ci.clock)


class StoreLedger:
    """Chain heads from the store, so a restarted REM-S resumes where it stopped."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.heads: dict[tuple[str, str], ChainHead] = {}
        # The head each accepted report extended: what the store records as its prev_hash.
        self.previous: dict[tuple[str, str], ChainHead] = {}

    def head(self, avm_id: str, cvm: str) -> ChainHead:
        if (avm_id, cvm) not in self.heads:
            last = self.store.reports(cvm, 1)
            self.heads[(avm_id, cvm)] = (ChainHead(seq=last[0]["seq"], digest=last[0]["digest"])
                                         if last else CHAIN_GENESIS)
        return self.heads[(avm_id, cvm)]

    def advance(self, avm_id: str, cvm: str, head: ChainHead) -> None:
        self.previous[(avm_id, cvm)] = self.head(avm_id, cvm)
        self.heads[(avm_id, cvm)] = head


@dataclass
class Attestation:
    """What one connection's handshake established about its A-VM."""

    avm_id: str
    cvms: tuple[str, ...] = ()
    pcrs: dict[int, bytes] = field(default_factory=dict)  # sha256 PCR 17 and 23
    counters: TpmCounters | None = None
    verified: bool = False
    ak: str | None = None  # the enrolled AK (PEM) the handshake quote verified with


class RemsServer:
    def __init__(self, config: RemsConfig) -> None:
        self.config = config
        self.store = Store(config.database)
        self.key = load_or_create_key(config.signing_key)
        self.service = RemsService(self.store, self.key,
                                   verdict_ttl=config.verdict_ttl_s, issuer=config.ear_issuer,
                                   insecure_lab=config.insecure_lab)
        self.webhooks = WebhookSender(config.webhooks, self.key, config.ear_issuer,
                                      max_attempts=config.webhook_max_attempts,
                                      queue_size=config.webhook_queue_size)
        self.ledger = StoreLedger(self.store)
        self.enroller = Enroller(self.store, config.ek_ca_certs, CertificateAuthority.load(
            config.tls.ca_cert, config.tls.ca_key) if config.tls else None)
        self.sessions: dict[str, Session] = {}  # C-VM -> the channel of the A-VM guarding it
        self._attestations: dict[int, Attestation] = {}  # id(connection) -> its A-VM
        self._trusted: dict[str, bool] = {}
        self._rounds: dict[str, asyncio.Future[ReportReceived]] = {}  # request_id -> answer
        # Awaiting the writer: verified reports (with the prev_hash each extended),
        # evidence results, audit entries and report quotes' TPM counters.
        self._incoming: list[tuple[Session, ReportReceived, str]] = []
        self._evidence: list[tuple[str, CheckResult]] = []
        self._audits: list[tuple[str, str, dict[str, object]]] = []
        self._counters: dict[str, TpmCounters] = {}
        self._wake_writer = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._bindings: tuple[float, dict[str, str]] | None = None  # (read at, C-VM -> A-VM)
        if not config.insecure_lab and str(LAUNCH_PCR) not in config.golden_pcrs:
            log.warning("no golden PCR %d configured: no A-VM will be trusted (set golden_pcrs, "
                        "or insecure_lab for a lab)", LAUNCH_PCR)
        if config.insecure_lab:
            log.warning("insecure_lab: A-VMs are trusted without golden values; every decision "
                        "and EAR says so")

    # ------------------------------------------------------- A-VM evidence
    def _record_evidence(self, avm_id: str, cvms: tuple[str, ...] | list[str], ok: bool,
                         reason: str, code: str = "") -> None:
        """The ``avm.evidence`` result of each C-VM this A-VM guards (bound to it)."""
        now = time.time()
        bound = set(cvms)
        for cvm in sorted(bound):
            self._evidence.append((cvm, CheckResult(
                EVIDENCE_CHECK, "pass" if ok else "fail", "hardware",
                None if ok else reason[:400], (), avm_id, None, now)))
        if not ok:
            self._audits.append(("evidence-refused", avm_id, {"code": code, "reason": reason[:400],
                                                              "cvms": sorted(bound)}))
        self._wake_writer.set()

    def authorize(self, hello: Hello) -> VerificationResult:
        """A hello may name only C-VMs bound to its (certified) A-VM; nothing else is said."""
        bindings = self.store.bindings()
        foreign = [cvm for cvm in hello.cvms if bindings.get(cvm) != hello.avm_id]
        if not foreign:
            return VerificationResult(True, "ok")
        log.warning("A-VM %s named C-VMs not bound to it: %s", hello.avm_id, ", ".join(foreign))
        self._audits.append(("refused", hello.avm_id, {"code": "not_bound", "cvms": foreign}))
        self._wake_writer.set()
        return VerificationResult(False, f"C-VMs not bound to A-VM {hello.avm_id}: "
                                         f"{', '.join(foreign[:8])}")

    def _launch_golden(self, pcrs: dict[int, bytes]) -> str | None:
        golden = self.config.golden_pcrs.get(str(LAUNCH_PCR))
        if golden is None:
            return None if self.config.insecure_lab else (
                f"no golden PCR {LAUNCH_PCR} configured: cannot trust any launch")
        if pcrs[LAUNCH_PCR].hex() != golden:
            return f"launch PCR {LAUNCH_PCR} is not the golden value"
        return None

    def verify_evidence(self, att: Attestation, hello: Hello, nonce: bytes,
                        evidence: Evidence) -> VerificationResult:
        ak = self.store.ak_of(hello.avm_id)
        if ak is None:
            return VerificationResult(False, f"A-VM {hello.avm_id} is not enrolled")
        code = "evidence"
        try:
            pcrs = _pcrs(evidence.quote)
            result = verify_quote(ak.encode(), evidence.quote.attest, evidence.quote.signature,
                                  nonce, pcrs, expected_pcrs=list(QUOTED_PCRS))
            quoted = result.pcrs["sha256"]
            problem = self._launch_golden(quoted)
            if problem:
                raise EvidenceRefused("launch", problem)
            entries = EventLog.from_json(json.dumps(
                {"entries": [e.model_dump() for e in evidence.event_log]}))
            replay(entries, quoted)
            notes = check_event_log(entries.entries, hello.avm_id, hello.cvms,
                                    self.store.references_for(hello.avm_id, hello.cvms),
                                    self.config.insecure_lab)
            new = _counters(result)
            steps: list[str] = []

            def accept(stored: TpmCounters | None, new: TpmCounters) -> None:
                step = counter_step(stored, new, result.clock_info.safe, in_session=False)
                if step.reset or step.restart:
                    steps.append("reset" if step.reset else "restart")

            self.store.advance_counters(hello.avm_id, new, accept)
        except EvidenceRefused as exc:
            code, reason = exc.code, str(exc)
        except (QuoteError, EventLogError, KeyError, ValueError, StoreError) as exc:
            reason = f"evidence rejected: {exc}"
        else:
            att.cvms, att.pcrs, att.counters, att.verified, att.ak = (
                tuple(hello.cvms), dict(quoted), new, True, ak)
            for what in steps:  # a reboot of the A-VM's TPM: believed, and on the record
                self._audits.append((f"tpm-{what}", hello.avm_id, {
                    "reset_count": new.reset_count, "restart_count": new.restart_count}))
            for note in notes:
                log.warning("A-VM %s: %s", hello.avm_id, note)
            self._record_evidence(hello.avm_id, hello.cvms, True, "")
            log.info("A-VM %s attested", hello.avm_id)
            return VerificationResult(True, "ok")
        self._record_evidence(hello.avm_id, hello.cvms, False, reason, code)
        log.warning("A-VM %s refused: %s", hello.avm_id, reason)
        return VerificationResult(False, reason)

    def verify_report_quote(self, att: Attestation, nonce: bytes, digest: bytes,
                            quote: Quote) -> VerificationResult:
        ak = att.ak  # the AK the handshake verified: one lookup per session, not per quote
        code = "quote_invalid"
        try:
            if ak is None or not att.verified:
                raise EvidenceRefused("not_enrolled", "A-VM not enrolled or not attested")
            result = verify_quote(ak.encode(), quote.attest, quote.signature,
                                  quote_qualifying_data(nonce, digest), _pcrs(quote),
                                  expected_pcrs=list(QUOTED_PCRS))
            if result.pcrs["sha256"] != att.pcrs:
                changed = sorted(i for i in QUOTED_PCRS
                                 if result.pcrs["sha256"].get(i) != att.pcrs.get(i))
                raise EvidenceRefused("pcr_changed", f"PCR {', '.join(map(str, changed))} "
                                                     "changed since the handshake")
            new = _counters(result)
            counter_step(att.counters, new, result.clock_info.safe, in_session=True)
        except EvidenceRefused as exc:
            code, reason = exc.code, str(exc)
        except (QuoteError, ValueError) as exc:
            reason = f"report quote rejected: {exc}"
        else:
            att.counters = self._counters[att.avm_id] = new
            return VerificationResult(True, "ok")
        att.verified = False  # whatever comes next on this channel is not believed
        self._record_evidence(att.avm_id, att.cvms, False, reason, code)
        log.warning("A-VM %s: %s", att.avm_id, reason)
        return VerificationResult(False, reason)

    # -------------------------------------------------------------- policy
    def _policy_document(self, cvm: str) -> tuple[int, PolicyDocument]:
        name = self.store.policy_of(cvm) or "default"  # as the service judges it
        found = self.store.get_policy(name)
        if found is None:
            return 1, DEFAULT_POLICY
        try:
            return found[0], parse_policy(found[1], name)
        except PolicyError:  # judged untrusted by the service; still give the A-VM work
            return found[0], DEFAULT_POLICY

    def policy_for(self, hello: Hello) -> PolicySpec:
        """The channel policy: each C-VM's assigned policy, its checks tagged with the C-VM.

        Checks the A-VM cannot run are left out (their results never come, so
        the C-VM's verdict lapses, naming them); a C-VM whose policy names none
        it can run gets every default check the A-VM offers (never an empty
        round). Quotes and heartbeats follow the strictest of the policies.
        """
        names: list[str] = []
        wanted: dict[tuple[str, float, str], list[str]] = {}
        quote_every, heartbeat = [], []
        version = 1
        for cvm in hello.cvms:
            v, doc = self._policy_document(cvm)
            names.append(doc.name)
            version = max(version, v)
            quote_every.append(doc.quote_every)
            heartbeat.append(doc.heartbeat_s)
            checks = [(c.id, c.interval_s, json.dumps(c.params, sort_keys=True))
                      for c in doc.checks if c.id in hello.capabilities.checks]
            for key in checks or [(c, 10.0, "{}") for c in hello.capabilities.checks
                                  if c not in OPT_IN_CHECKS]:
                wanted.setdefault(key, []).append(cvm)
        every_cvm = len(hello.cvms)
        specs = [CheckSpec(id=cid, interval_s=interval, params=json.loads(params),
                           cvms=None if len(cvms) == every_cvm else cvms)
                 for (cid, interval, params), cvms in sorted(wanted.items())]
        unique = sorted(set(names))
        policy_id = unique[0] if len(unique) == 1 else "multi-" + hashlib.sha256(
            ",".join(unique).encode()).hexdigest()[:12]
        return PolicySpec(policy_id=policy_id, version=version, checks=specs,
                          quote_every=min(quote_every), heartbeat_s=min(heartbeat))

    # ------------------------------------------------------------ channel
    def make_connection(self, peer_avm_id: str | None, now: float) -> RemsConnection:
        att = Attestation(peer_avm_id or "")  # transport.serve guarantees the identity
        conn = RemsConnection(
            verify_evidence=lambda h, n, e: self.verify_evidence(att, h, n, e),
            policy_for=self.policy_for,
            verify_report_quote=lambda n, d, q: self.verify_report_quote(att, n, d, q),
            authorize=self.authorize, ledger=self.ledger, now=now, peer_avm_id=peer_avm_id,
            defer_acks=True)
        self._attestations[id(conn)] = att
        return conn

    def on_event(self, session: Session, event: Event) -> None:
        if isinstance(event, HandshakeComplete):
            for cvm in event.cvms:
                self.sessions[cvm] = session
        elif isinstance(event, ProtocolError):
            conn = session.conn
            who = conn.hello.avm_id if isinstance(conn, RemsConnection) and conn.hello else "?"
            log.warning("A-VM %s: %s%s: %s", who, "peer reported " if event.remote else "",
                        event.code, event.message)
        elif isinstance(event, ConnectionClosed):
            for cvm in [c for c, s in self.sessions.items() if s is session]:
                del self.sessions[cvm]
            self._attestations.pop(id(session.conn), None)
        elif isinstance(event, ReportReceived):
            # prev_hash now: the ledger moves on with the next report before this is stored.
            prev = self.ledger.previous.get((event.avm_id, event.cvm), CHAIN_GENESIS).digest
            self._incoming.append((session, event, prev))
            self._wake_writer.set()
        else:
            log.debug("event %s", event)

    def references_changed(self, scope: str, subject: str) -> None:
        """An approved digest changed: the A-VMs it concerns attest again, under it.

        Evidence is appraised at the handshake; a session must not outlive the
        approval it was believed under.
        """
        for session in set(self.sessions.values()):
            conn = session.conn
            if not isinstance(conn, RemsConnection) or conn.hello is None:
                continue
            hello = conn.hello
            if (scope == "avm" and hello.avm_id == subject) or \
                    (scope == "cvm" and subject in hello.cvms):
                session.close("an approved digest changed: attest again")

    def bindings_changed(self) -> None:
        """The operator moved or unbound C-VMs: channels may no longer speak for them."""
        bindings = self.store.bindings()
        self._bindings = (time.monotonic(), bindings)
        for cvm, session in list(self.sessions.items()):
            conn = session.conn
            avm = conn.hello.avm_id if isinstance(conn, RemsConnection) and conn.hello else None
            if bindings.get(cvm) != avm:
                del self.sessions[cvm]
                session.close(f"C-VM {cvm} is no longer bound to this A-VM")

    async def _writer(self) -> None:
        """Store what arrived while the previous batch was written, then ack it.

        One transaction per batch, run off the event loop, so the loop keeps
        reading and verifying while the database commits. Acks go out only after
        the commit (an ack promises the report is stored). A batch that fails is
        stored again report by report: only the reports that fail on their own
        are dropped (their sessions closed, their A-VMs resend), never another
        A-VM's.
        """
        self._loop = asyncio.get_running_loop()
        while True:
            await self._wake_writer.wait()
            self._wake_writer.clear()
            while self._incoming or self._evidence or self._audits or self._counters:
                batch = self._incoming[:MAX_BATCH]
                del self._incoming[:MAX_BATCH]
                evidence, self._evidence = self._evidence, []
                audits, self._audits = self._audits, []
                counters, self._counters = self._counters, {}
                batch = await self._only_bound(batch, audits)
                try:
                    done = await asyncio.to_thread(self._store, batch, evidence, audits, counters)
                except Exception:  # one A-VM's bad report must not cost the others theirs
                    log.exception("storing %d reports; retrying them one by one", len(batch))
                    done = await self._store_each(batch, evidence, audits, counters)
                for session, event, _ in done:
                    conn = session.conn
                    if isinstance(conn, RemsConnection):
                        conn.ack_report(event.cvm, event.seq, session.now())
                        session.poke()
                    waiter = self._rounds.pop(event.request_id or "", None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(event)  # stored: the caller reads the new verdict

    def _store(self, batch: list[tuple[Session, ReportReceived, str]],
               evidence: list[tuple[str, CheckResult]],
               audits: list[tuple[str, str, dict[str, object]]],
               counters: dict[str, TpmCounters]) -> list[tuple[Session, ReportReceived, str]]:
        items = [NewReport(e.cvm, e.avm_id, e.seq, prev, e.body, e.digest)
                 for _, e, prev in batch]
        done = self.service.ingest(items, evidence, audits, counters)
        self._notify_verdicts(done.verdicts)
        return batch

    async def _store_each(self, batch: list[tuple[Session, ReportReceived, str]],
                          evidence: list[tuple[str, CheckResult]],
                          audits: list[tuple[str, str, dict[str, object]]],
                          counters: dict[str, TpmCounters]
                          ) -> list[tuple[Session, ReportReceived, str]]:
        stored: list[tuple[Session, ReportReceived, str]] = []
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self._store, [], evidence, audits, counters)
        for item in batch:
            try:
                stored += await asyncio.to_thread(self._store, [item], [], [], {})
            except Exception as exc:  # noqa: BLE001 - this report alone fails: drop it
                log.error("A-VM %s: report %s#%d cannot be stored: %s", item[1].avm_id,
                          item[1].cvm, item[1].seq, exc)
                self._abandon([item])
        return stored

    async def _only_bound(self, batch: list[tuple[Session, ReportReceived, str]],
                          audits: list[tuple[str, str, dict[str, object]]]
                          ) -> list[tuple[Session, ReportReceived, str]]:
        """Reports of C-VMs no longer bound to their A-VM are refused, not stored."""
        if not batch:
            return batch
        now = time.monotonic()
        if self._bindings is None or now - self._bindings[0] >= 1.0:
            # Once a second, not per batch: this instance's own changes drop the copy at
            # once (bindings_changed); another instance's are seen within the second.
            self._bindings = (now, await asyncio.to_thread(self.store.bindings))
        bindings = self._bindings[1]
        kept: list[tuple[Session, ReportReceived, str]] = []
        refused: list[tuple[Session, ReportReceived, str]] = []
        for item in batch:
            (kept if bindings.get(item[1].cvm) == item[1].avm_id else refused).append(item)
        for _session, event, _ in refused:
            audits.append(("refused", event.avm_id, {"code": "not_bound", "cvm": event.cvm,
                                                     "seq": event.seq}))
        if refused:
            self._abandon(refused, f"C-VM {refused[0][1].cvm} is not bound to this A-VM")
        return kept

    def _abandon(self, batch: list[tuple[Session, ReportReceived, str]],
                 reason: str = "report storage failed; resend") -> None:
        """Unstored reports: forget their chain heads and drop their (and later) sessions."""
        sessions = {id(session): session for session, _, _ in batch}
        for _, event, _ in batch:
            self.ledger.heads.pop((event.avm_id, event.cvm), None)
        for session in sessions.values():
            session.close(reason)
        self._incoming = [item for item in self._incoming if id(item[0]) not in sessions]

    async def attest(self, cvm: str, timeout_s: float) -> ReportReceived:
        """A fresh round of *cvm* on demand: new nonce, full report, quote over both.

        Returns once the answering report is verified, stored and appraised, so
        the caller's next decision reflects it. Raises :class:`AttestFailed`.
        """
        session = self.sessions.get(cvm)
        if session is None:
            if cvm not in self.store.cvms():
                raise AttestFailed(404, f"unknown C-VM {cvm}")
            raise AttestFailed(503, f"no A-VM connected for C-VM {cvm}")
        try:
            request_id = session.request_round(cvm)
        except (RuntimeError, ValueError) as exc:
            raise AttestFailed(503, str(exc)) from exc
        waiter: asyncio.Future[ReportReceived] = asyncio.get_running_loop().create_future()
        self._rounds[request_id] = waiter
        try:
            return await asyncio.wait_for(waiter, timeout_s)
        except TimeoutError as exc:
            raise AttestFailed(504, f"no fresh report of {cvm} within {timeout_s:g} s") from exc
        finally:
            self._rounds.pop(request_id, None)
            conn = session.conn
            if isinstance(conn, RemsConnection):
                conn.cancel_round(request_id)  # a timed-out round gives its slot back

    def push_policies(self) -> None:
        """Send every connected A-VM whose policy changed its new policy (policy_update)."""
        self.service.invalidate_policies()  # verdicts follow the new rules from now on
        for session in set(self.sessions.values()):
            conn = session.conn
            if not isinstance(conn, RemsConnection) or conn.hello is None or conn.closed:
                continue
            spec = self.policy_for(conn.hello)
            latest = conn.latest_policy
            if latest is None or policy_digest(spec) == policy_digest(latest):
                continue
            try:
                conn.update_policy(spec, session.now())
            except RuntimeError:  # not ACTIVE (yet): it gets the policy in its handshake
                continue
            session.poke()
            log.info("policy %s v%s pushed to A-VM %s", spec.policy_id, spec.version,
                     conn.hello.avm_id)

    # ----------------------------------------------------------- webhooks
    def _notify_verdicts(self, verdicts: dict[str, Verdict]) -> None:
        """Called from the writer thread: revocations go to the webhooks."""
        now, loop = time.time(), self._loop
        for cvm, v in verdicts.items():
            trusted = v.expires_at > now and v.trusted(self.service.verdict_policy(cvm))
            reason = "; ".join(r for r in v.reasons if "not applicable" not in r)[:300]
            if loop is not None:
                loop.call_soon_threadsafe(self._notify_if_changed, cvm, trusted, v.status,
                                          reason)

    def _notify_if_changed(self, cvm: str, trusted: bool, status: str, reason: str) -> None:
        """A revocation is news only for a C-VM that was trusted (before a restart too)."""
        before = self._trusted.get(cvm)
        self._trusted[cvm] = trusted
        if before and not trusted:
            self.webhooks.notify("revoked", cvm, status, reason or status)

    def _seed_trusted(self) -> None:
        """Which C-VMs are trusted now, so a restarted REM-S still notices revocations."""
        for cvm in self.store.cvms():
            self._trusted[cvm] = self.service.decision(cvm).allowed

    async def _stale_watch(self) -> None:
        """Fail closed: a verdict that lapses revokes like a failing one."""
        while True:
            await asyncio.sleep(1.0)
            lapsed = await asyncio.to_thread(self.store.expired_verdicts, time.time())
            for cvm in lapsed:
                if self._trusted.get(cvm):
                    self._notify_if_changed(cvm, False, "stale", "no fresh result")

    # --------------------------------------------------------------- run
    async def run(self) -> None:
        tls = self.config.tls
        if tls is None:
            raise ValueError("the control channel needs [rems.tls] certificates")
        self._loop = asyncio.get_running_loop()
        # uvicorn creates its TLS listener without a handshake timeout, so asyncio's
        # default (60 s) would let a silent TCP connection hold a file that long; asyncio
        # reads this default whenever it wraps a connection.
        setattr(asyncio_constants, "SSL_HANDSHAKE_TIMEOUT",  # noqa: B010 - typeshed: Final
                self.config.handshake_timeout_s)
        ctx = server_context(tls.server_cert, tls.server_key, tls.ca_cert)
        host, port = self.config.channel_listen.rsplit(":", 1)
        http_cap, gate_cap, channel_cap = self._connection_caps()
        channel = await serve(host, int(port), ctx, self.make_connection, self.on_event,
                              max_connections=channel_cap,
                              handshake_timeout_s=self.config.handshake_timeout_s)
        loop = self._loop

        def policies_changed() -> None:  # called from the API's worker threads
            loop.call_soon_threadsafe(self.push_policies)

        def bindings_changed() -> None:
            loop.call_soon_threadsafe(self.bindings_changed)

        def references_changed(scope: str, subject: str) -> None:
            loop.call_soon_threadsafe(self.references_changed, scope, subject)

        app = create_app(self.service, self.config, self.attest, self.enroller,
                         policies_changed, bindings_changed, references_changed)
        servers = [uvicorn.Server(self._uvicorn_config(
            app, self.config.http_listen, self.config.http_tls, http_cap))]
        gate = None
        if self.config.gate_listen:
            # The gate's listener runs its own event loop in its own thread: a flood on
            # the API or the channel (TLS handshakes, which OpenSSL does without the
            # GIL) cannot starve the gate's decisions. It attests nothing (that needs
            # the channel's loop).
            gate_app = create_app(self.service, self.config, None, None, policies_changed,
                                  bindings_changed, references_changed)
            gate = uvicorn.Server(self._uvicorn_config(
                gate_app, self.config.gate_listen, False, gate_cap))
            gate_thread = threading.Thread(target=lambda: asyncio.run(gate.serve()),
                                           name="gate-listener", daemon=True)
            gate_thread.start()
        log.info("REM-S: channel on %s, HTTP%s on %s%s", self.config.channel_listen,
                 "S" if self.config.http_tls else "", self.config.http_listen,
                 f", gate HTTP on {self.config.gate_listen}" if self.config.gate_listen else "")
        self.webhooks.start()
        await asyncio.to_thread(self._seed_trusted)
        tasks = [asyncio.create_task(self._stale_watch()), asyncio.create_task(self._writer()),
                 asyncio.create_task(_memory_hygiene()),
                 asyncio.create_task(audit.checkpoint_loop(
                     self.store, self.key, self.config.ear_issuer,
                     self.config.audit_checkpoint_file, self.config.audit_checkpoint_s))]
        try:
            await asyncio.gather(*(s.serve() for s in servers))
        finally:
            for s in servers:
                s.should_exit = True
            if gate is not None:
                gate.should_exit = True
                await asyncio.to_thread(gate_thread.join, 5)
            for task in tasks:
                task.cancel()
            channel.close()
            await channel.wait_closed()
            await self.webhooks.close(timeout_s=3.0)
            try:  # the head as it is at shutdown, signed: a later truncation shows
                await asyncio.to_thread(audit.checkpoint, self.store, self.key,
                                        self.config.ear_issuer, self.config.audit_checkpoint_file)
            except (audit.AuditBroken, StoreError) as exc:
                log.error("no audit checkpoint at shutdown: %s", exc)

    def _connection_caps(self) -> tuple[int, int, int]:
        """The listeners' connection caps, scaled down to fit the open-file limit.

        Caps above what the process may open would let a flood exhaust its files
        (and the gate's listener with them) before any cap bites: the caps and the
        limit (systemd's LimitNOFILE) must be set together, and this keeps them so.
        """
        import resource

        caps = (self.config.http_max_connections, self.config.gate_max_connections,
                self.config.channel_max_connections)
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        budget = max(3, soft - 64) if soft != resource.RLIM_INFINITY else sum(caps)
        if sum(caps) <= budget:
            return caps
        scaled = tuple(max(1, cap * budget // sum(caps)) for cap in caps)
        log.warning("connection caps %s exceed the open-file limit %d: using %s",
                    caps, soft, scaled)
        return scaled[0], scaled[1], scaled[2]

    def _uvicorn_config(self, app: FastAPI, listen: str, tls: bool,
                        max_connections: int) -> uvicorn.Config:
        host, port = listen.rsplit(":", 1)
        extra: dict[str, object] = {}
        if tls:
            assert self.config.tls is not None  # RemsConfig requires it for http_tls
            extra = {"ssl_certfile": str(self.config.tls.server_cert),
                     "ssl_keyfile": str(self.config.tls.server_key)}
        return uvicorn.Config(
            app, host=host.strip("[]"), port=int(port), log_level="warning", lifespan="off",
            timeout_graceful_shutdown=3,  # a stop is not held up by a waiting attest
            http=guarded_protocol(max_connections, self.config.http_request_timeout_s),
            h11_max_incomplete_event_size=64 * 1024,  # request head: 64 KiB at most
            **extra)  # type: ignore[arg-type]


async def _memory_hygiene(interval_s: float = 5.0, grown_mb: int = 32) -> None:
    """Give back the memory that connection floods leave behind.

    Measured here: 10,000 bare TCP connects to a TLS listener left ~60 MB of
    asyncio SSL transports in reference cycles (freed only by a full collection)
    and the freed memory with glibc's allocator, not the system. When the
    process grew by ``grown_mb`` since the last look, a full collection and
    malloc_trim bound that; a steady REM-S pays nothing.
    """
    import ctypes
    import ctypes.util
    import gc

    libc_name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(libc_name), "malloc_trim", None) if libc_name else None
    # What exists once the REM-S runs (modules, the app, the store) lives as long as it
    # does: kept out of every collection, a full one holds the GIL (and so the gate's
    # thread) for a few milliseconds instead of tens.
    gc.freeze()
    base = _rss_mb()
    while True:
        await asyncio.sleep(interval_s)
        if _rss_mb() - base >= grown_mb:
            gc.collect()
            if trim is not None:
                trim(0)
            base = _rss_mb()


def _rss_mb() -> int:
    try:
        pages = int(open("/proc/self/statm").read().split()[1])  # noqa: SIM115 - one read
    except (OSError, ValueError, IndexError):
        return 0
    return pages * 4096 // (1024 * 1024)
