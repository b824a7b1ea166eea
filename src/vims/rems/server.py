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
import json
import logging
import time
from pathlib import Path

import httpx
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from vims.protocol.chain import GENESIS as CHAIN_GENESIS
from vims.protocol.core import RemsConnection, VerificationResult
from vims.protocol.events import ConnectionClosed, Event, HandshakeComplete, ReportReceived
from vims.protocol.messages import (
    ChainHead,
    CheckSpec,
    Evidence,
    Hello,
    PolicySpec,
    Quote,
    quote_qualifying_data,
)
from vims.protocol.pki import server_context
from vims.protocol.transport import Session, serve
from vims.rems.api import AttestFailed, create_app
from vims.rems.config import RemsConfig
from vims.rems.service import RemsService
from vims.rems.store import Store
from vims.tpm.eventlog import AGENT_PCR, EventLog, EventLogError, replay
from vims.tpm.verifier import QuoteError, verify_quote

log = logging.getLogger("vims.rems")
LAUNCH_PCR = 17


def load_or_create_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The EAR signing key (EC P-256), created with 0600 on first start."""
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{path} is not an EC private key")
        return key
    key = ec.generate_private_key(ec.SECP256R1())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.touch(mode=0o600)
    tmp.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    tmp.replace(path)
    return key


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
        self.sessions: dict[str, Session] = {}  # C-VM -> the channel of the A-VM guarding it
        self._trusted: dict[str, bool] = {}
        self._rounds: dict[str, asyncio.Future[ReportReceived]] = {}  # request_id -> answer

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
        """The policy of the A-VM's first C-VM (one policy per channel)."""
        name = self.store.policy_of(hello.cvms[0]) or "default"
        found = self.store.get_policy(name)
        version, body = found if found else (1, {})
        checks = [CheckSpec(id=c["id"], interval_s=float(c.get("interval_s", 10)))
                  for c in body.get("checks", []) if c.get("id") in hello.capabilities.checks]
        if not checks:
            checks = [CheckSpec(id=c, interval_s=10.0) for c in hello.capabilities.checks]
        return PolicySpec(policy_id=name, version=version, checks=checks,
                          quote_every=int(body.get("quote_every", 5)),
                          heartbeat_s=float(body.get("heartbeat_s", 5.0)))

    # ------------------------------------------------------------ channel
    def make_connection(self, peer_avm_id: str | None, now: float) -> RemsConnection:
        avm = peer_avm_id or ""  # transport.serve guarantees the certificate's identity
        return RemsConnection(
            verify_evidence=self.verify_evidence,
            policy_for=self.policy_for,
            verify_report_quote=lambda n, d, q: self.verify_report_quote(n, d, q, avm),
            ledger=self.ledger, now=now, peer_avm_id=peer_avm_id)

    def on_event(self, session: Session, event: Event) -> None:
        if isinstance(event, HandshakeComplete):
            for cvm in event.cvms:
                self.sessions[cvm] = session
        elif isinstance(event, ConnectionClosed):
            for cvm in [c for c, s in self.sessions.items() if s is session]:
                del self.sessions[cvm]
        elif isinstance(event, ReportReceived):
            try:
                prev = self.ledger.previous.get((event.avm_id, event.cvm), CHAIN_GENESIS).digest
                appraisal = self.service.ingest_report(event.avm_id, event.cvm, event.seq,
                                                       prev, event.body, event.digest)
            except Exception:  # keep serving other A-VMs; the audit log has what was stored
                log.exception("storing report %s#%s", event.cvm, event.seq)
                return
            self._notify_if_changed(event.cvm, appraisal.trusted(
                self.service.verdict_policy(event.cvm)[0]), appraisal.status)
            waiter = self._rounds.pop(event.request_id or "", None)
            if waiter is not None and not waiter.done():
                waiter.set_result(event)  # after storing: the caller reads the new verdict
        else:
            log.debug("event %s", event)

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
            for cvm in self.store.cvms():
                d = self.service.decision(cvm)
                if not d.allowed and self._trusted.get(cvm):
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
        api = uvicorn.Server(uvicorn.Config(
            create_app(self.service, self.config.admin_token(), self.attest), host=http_host,
            port=int(http_port), log_level="warning", lifespan="off"))
        log.info("REM-S: channel on %s, HTTP on %s", self.config.channel_listen,
                 self.config.http_listen)
        watcher = asyncio.create_task(self._stale_watch())
        try:
            await api.serve()
        finally:
            watcher.cancel()
            channel.close()
            await channel.wait_closed()

