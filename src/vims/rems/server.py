"""``vims rems serve``: the REM-S process.

One asyncio loop runs the control channel (mutual TLS 1.3, one sans-IO
connection per A-VM) and the HTTP API (uvicorn). Evidence is appraised with
the pure-Python quote verifier against the A-VM's enrolled AK: the handshake
quote must cover the launch PCR 17 (golden value from the config when set) and
the agent PCR 23, whose event log must replay to the quoted value; report
quotes must carry SHA256(nonce || report digest). Accepted reports are stored,
appraised into an EAR, and the decision API follows; verdicts that turn
untrusted or stale are pushed to the configured webhooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time

import httpx
import uvicorn

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
from vims.rems.api import AttestFailed, create_app
from vims.rems.config import RemsConfig
from vims.rems.enroll import Enroller
from vims.rems.service import RemsService
from vims.rems.store import NewReport, Store
from vims.tpm.eventlog import AGENT_PCR, EventLog, EventLogError, replay
from vims.tpm.verifier import QuoteError, verify_quote

log = logging.getLogger("vims.rems")
LAUNCH_PCR = 17
MAX_BATCH = 2000  # reports per storage transaction


def _pcrs(quote: Quote) -> dict[str, dict[int, bytes]]:
    return {bank: {int(i): bytes.fromhex(v) for i, v in values.items()}
            for bank, values in quote.pcrs.items()}


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


class RemsServer:
    def __init__(self, config: RemsConfig) -> None:
        self.config = config
        self.store = Store(config.database)
        self.service = RemsService(self.store, load_or_create_key(config.signing_key),
                                   verdict_ttl=config.verdict_ttl_s)
        self.ledger = StoreLedger(self.store)
        self.enroller = Enroller(self.store, config.ek_ca_certs, CertificateAuthority.load(
            config.tls.ca_cert, config.tls.ca_key) if config.tls else None)
        self.sessions: dict[str, Session] = {}  # C-VM -> the channel of the A-VM guarding it
        self._trusted: dict[str, bool] = {}
        self._rounds: dict[str, asyncio.Future[ReportReceived]] = {}  # request_id -> answer
        # Verified reports awaiting storage, with the prev_hash each extended.
        self._incoming: list[tuple[Session, ReportReceived, str]] = []
        self._wake_writer = asyncio.Event()

    # ------------------------------------------------------- appraisal hooks
    def verify_evidence(self, hello: Hello, nonce: bytes, evidence: Evidence,
                        ) -> VerificationResult:
        ak = self.store.ak_of(hello.avm_id)
        if ak is None:
            return VerificationResult(False, f"A-VM {hello.avm_id} is not enrolled")
        try:
            pcrs = _pcrs(evidence.quote)
            verify_quote(ak.encode(), evidence.quote.attest, evidence.quote.signature, nonce,
                         pcrs, expected_pcrs=[LAUNCH_PCR, AGENT_PCR])
            golden = self.config.golden_pcrs.get(str(LAUNCH_PCR))
            if golden and pcrs["sha256"][LAUNCH_PCR].hex() != golden.lower():
                return VerificationResult(False, "launch PCR 17 is not the golden value")
            entries = EventLog.from_json(json.dumps(
                {"entries": [e.model_dump() for e in evidence.event_log]}))
            replay(entries, pcrs["sha256"])
        except (QuoteError, EventLogError, KeyError, ValueError) as exc:
            return VerificationResult(False, f"evidence rejected: {exc}")
        log.info("A-VM %s attested", hello.avm_id)
        return VerificationResult(True, "ok")

    def verify_report_quote(self, nonce: bytes, digest: bytes, quote: Quote,
                            avm_id: str) -> VerificationResult:
        ak = self.store.ak_of(avm_id)
        if ak is None:
            return VerificationResult(False, "A-VM not enrolled")
        try:
            verify_quote(ak.encode(), quote.attest, quote.signature,
                         quote_qualifying_data(nonce, digest), _pcrs(quote),
                         expected_pcrs=[LAUNCH_PCR, AGENT_PCR])
        except (QuoteError, ValueError) as exc:
            return VerificationResult(False, f"report quote rejected: {exc}")
        return VerificationResult(True, "ok")

    def policy_for(self, hello: Hello) -> PolicySpec:
        """The channel policy: each C-VM's assigned policy, its checks tagged with the C-VM.

        Checks the A-VM cannot run are left out; a C-VM whose policy names none
        it can run gets every check the A-VM offers (never an empty round).
        Quotes and heartbeats follow the strictest of the policies involved.
        """
        names: list[str] = []
        wanted: dict[tuple[str, float, str], list[str]] = {}
        quote_every, heartbeat = [], []
        version = 1
        for cvm in hello.cvms:
            name = self.store.policy_of(cvm) or "default"
            found = self.store.get_policy(name)
            v, body = found if found else (1, {})
            names.append(name)
            version = max(version, v)
            quote_every.append(int(body.get("quote_every", 5)))
            heartbeat.append(float(body.get("heartbeat_s", 5.0)))
            checks = [(str(c["id"]), float(c.get("interval_s", 10)),
                       json.dumps(c.get("params", {}), sort_keys=True))
                      for c in body.get("checks", []) if c.get("id") in hello.capabilities.checks]
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
        avm = peer_avm_id or ""  # transport.serve guarantees the certificate's identity
        return RemsConnection(
            verify_evidence=self.verify_evidence,
            policy_for=self.policy_for,
            verify_report_quote=lambda n, d, q: self.verify_report_quote(n, d, q, avm),
            ledger=self.ledger, now=now, peer_avm_id=peer_avm_id, defer_acks=True)

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
        elif isinstance(event, ReportReceived):
            # prev_hash now: the ledger moves on with the next report before this is stored.
            prev = self.ledger.previous.get((event.avm_id, event.cvm), CHAIN_GENESIS).digest
            self._incoming.append((session, event, prev))
            self._wake_writer.set()
        else:
            log.debug("event %s", event)

    async def _writer(self) -> None:
        """Store what arrived while the previous batch was written, then ack it.

        One transaction per batch, run off the event loop, so the loop keeps
        reading and verifying while the database commits. Acks go out only after
        the commit (an ack promises the report is stored); if storing fails, the
        sessions concerned are closed and their A-VMs resend from the stored head.
        """
        while True:
            await self._wake_writer.wait()
            self._wake_writer.clear()
            while self._incoming:
                batch = self._incoming[:MAX_BATCH]
                del self._incoming[:MAX_BATCH]
                items = [NewReport(e.cvm, e.avm_id, e.seq, prev, e.body, e.digest)
                         for _, e, prev in batch]
                try:
                    appraisals = await asyncio.to_thread(self.service.ingest_reports, items)
                except Exception:  # keep serving; these A-VMs resend (nothing was acked)
                    log.exception("storing %d reports", len(batch))
                    self._abandon(batch)
                    continue
                for (session, event, _), appraisal in zip(batch, appraisals, strict=True):
                    conn = session.conn
                    if isinstance(conn, RemsConnection):
                        conn.ack_report(event.cvm, event.seq, session.now())
                        session.poke()
                    self._notify_if_changed(event.cvm, appraisal.trusted(
                        self.service.verdict_policy(event.cvm)[0]), appraisal.status)
                    waiter = self._rounds.pop(event.request_id or "", None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(event)  # stored: the caller reads the new verdict

    def _abandon(self, batch: list[tuple[Session, ReportReceived, str]]) -> None:
        """Unstored reports: forget their chain heads and drop their (and later) sessions."""
        sessions = {id(session): session for session, _, _ in batch}
        for _, event, _ in batch:
            self.ledger.heads.pop((event.avm_id, event.cvm), None)
        for session in sessions.values():
            session.close("report storage failed; resend")
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
    def _notify_if_changed(self, cvm: str, trusted: bool, status: str) -> None:
        before = self._trusted.get(cvm)
        self._trusted[cvm] = trusted
        if before is not False and not trusted:
            asyncio.get_running_loop().create_task(self._webhook(cvm, status))

    async def _webhook(self, cvm: str, status: str) -> None:
        payload = {"event": "revoked", "cvm": cvm, "status": status, "time": time.time()}
        async with httpx.AsyncClient() as client:
            for hook in self.config.webhooks:
                with contextlib.suppress(httpx.HTTPError):
                    await client.post(hook.url, json=payload, timeout=hook.timeout_s)

    async def _stale_watch(self) -> None:
        """Fail closed: a verdict that lapses revokes like a failing one."""
        while True:
            await asyncio.sleep(1.0)
            lapsed = await asyncio.to_thread(self.store.expired_verdicts, time.time())
            for cvm in lapsed:
                if self._trusted.get(cvm):
                    self._notify_if_changed(cvm, False, "stale")

    # --------------------------------------------------------------- run
    async def run(self) -> None:
        tls = self.config.tls
        if tls is None:
            raise ValueError("the control channel needs [rems.tls] certificates")
        ctx = server_context(tls.server_cert, tls.server_key, tls.ca_cert)
        host, port = self.config.channel_listen.rsplit(":", 1)
        channel = await serve(host, int(port), ctx, self.make_connection, self.on_event)
        http_host, http_port = self.config.http_listen.rsplit(":", 1)
        loop = asyncio.get_running_loop()

        def policies_changed() -> None:  # called from the API's worker threads
            loop.call_soon_threadsafe(self.push_policies)

        app = create_app(self.service, self.config.admin_token(), self.attest, self.enroller,
                         policies_changed)
        api = uvicorn.Server(uvicorn.Config(
            app, host=http_host,
            port=int(http_port), log_level="warning", lifespan="off"))
        log.info("REM-S: channel on %s, HTTP on %s", self.config.channel_listen,
                 self.config.http_listen)
        watcher = asyncio.create_task(self._stale_watch())
        writer = asyncio.create_task(self._writer())
        try:
            await api.serve()
        finally:
            watcher.cancel()
            writer.cancel()
            channel.close()
            await channel.wait_closed()

