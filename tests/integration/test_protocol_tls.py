"""The control channel over real mTLS 1.3 sockets on 127.0.0.1 (ephemeral ports)."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from pathlib import Path
from typing import Any

import pytest

from vims.protocol.chain import MemoryLedger
from vims.protocol.core import AvmConnection, RemsConnection
from vims.protocol.events import (
    ConnectionClosed,
    Event,
    HandshakeComplete,
    ProtocolError,
    ReportAcked,
    ReportReceived,
)
from vims.protocol.messages import Capabilities
from vims.protocol.pki import CertificateAuthority, client_context, server_context
from vims.protocol.testing import FakeVtpm, default_policy, report_body
from vims.protocol.transport import Session, connect, serve

pytestmark = pytest.mark.slow


def _write(tmp: Path, name: str, issued: Any) -> tuple[Path, Path]:
    cert, key = tmp / f"{name}.pem", tmp / f"{name}.key"
    issued.write(cert, key)
    return cert, key


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Any]:
    ca = CertificateAuthority.create()
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    server = _write(tmp_path, "server", ca.issue_server(["127.0.0.1", "localhost"]))
    return {"ca": ca, "dir": tmp_path, "server": server, "ca_path": tmp_path / "ca.pem"}


def _client_ctx(pki: dict[str, Any], avm_id: str = "avm-1", ca: CertificateAuthority | None = None,
                **issue: Any) -> ssl.SSLContext:
    issued = (ca or pki["ca"]).issue_client(avm_id, **issue)
    cert, key = _write(pki["dir"], f"client-{avm_id}", issued)
    return client_context(cert, key, pki["ca_path"])


async def _run(pki: dict[str, Any], cctx: ssl.SSLContext, avm_id: str = "avm-1",
               reports: int = 0) -> tuple[list[Event], list[Event]]:
    vtpm = FakeVtpm()
    rems_events: list[Event] = []

    def make(peer: str, now: float) -> RemsConnection:
        return RemsConnection(
            verify_evidence=vtpm.verify_evidence, policy_for=lambda h: default_policy(),
            verify_report_quote=vtpm.verify_report_quote, ledger=MemoryLedger(), now=now,
            peer_avm_id=peer,
        )

    sctx = server_context(pki["server"][0], pki["server"][1], pki["ca_path"])
    server = await serve("127.0.0.1", 0, sctx, make, lambda s, e: rems_events.append(e))
    port = server.sockets[0].getsockname()[1]
    avm = AvmConnection(
        avm_id=avm_id, cvms=["web"],
        capabilities=Capabilities(checks=["kernel.text"], backends=["file"]),
        make_evidence=vtpm.make_evidence, quote_report=vtpm.quote,
    )
    avm_events: list[Event] = []
    try:
        session, task = await connect("127.0.0.1", port, cctx, avm)
        await _collect(session, avm_events, reports)
        session.close("done")
        await asyncio.wait_for(task, 10)
    except (ssl.SSLError, ConnectionError) as exc:
        avm_events.append(ProtocolError("tls", str(exc)))
    finally:
        server.close()
        await server.wait_closed()
    return avm_events, rems_events


async def _collect(session: Session, events: list[Event], reports: int) -> None:
    while True:
        try:
            event = await session.next_event(5)
        except TimeoutError:
            return
        events.append(event)
        if isinstance(event, HandshakeComplete):
            for i in range(reports):
                session.send_report("web", report_body(i=i))
        if session.conn.closed or (
            isinstance(event, ReportAcked) and event.seq == reports
        ):
            return


def test_handshake_and_reports_over_mtls13(pki: dict[str, Any]) -> None:
    avm_events, rems_events = asyncio.run(_run(pki, _client_ctx(pki), reports=20))
    assert any(isinstance(e, HandshakeComplete) for e in avm_events)
    got = [e.seq for e in rems_events if isinstance(e, ReportReceived)]
    assert got == list(range(1, 21))
    assert [e.seq for e in avm_events if isinstance(e, ReportAcked)] == list(range(1, 21))


def _refused(avm_events: list[Event], rems_events: list[Event]) -> None:
    assert not any(isinstance(e, HandshakeComplete) for e in avm_events + rems_events)
    assert not any(isinstance(e, ReportReceived) for e in rems_events)
    # The A-VM saw its channel end (TLS alert, reset or an error frame), not a timeout.
    assert avm_events
    assert all(isinstance(e, ConnectionClosed | ProtocolError) for e in avm_events)


def test_client_cert_from_another_ca_refused(pki: dict[str, Any]) -> None:
    rogue = CertificateAuthority.create("rogue CA")
    avm_events, rems_events = asyncio.run(_run(pki, _client_ctx(pki, ca=rogue)))
    _refused(avm_events, rems_events)


def test_expired_client_cert_refused(pki: dict[str, Any]) -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    avm_events, rems_events = asyncio.run(_run(pki, _client_ctx(pki, not_before=past, days=1)))
    _refused(avm_events, rems_events)


def test_tls12_only_client_refused(pki: dict[str, Any]) -> None:
    cctx = _client_ctx(pki)
    cctx.minimum_version = ssl.TLSVersion.TLSv1_2
    cctx.maximum_version = ssl.TLSVersion.TLSv1_2
    avm_events, rems_events = asyncio.run(_run(pki, cctx))
    _refused(avm_events, rems_events)
    assert any(isinstance(e, ProtocolError) and e.code == "tls" for e in avm_events)


def test_avm_id_mismatch_with_cert_refused(pki: dict[str, Any]) -> None:
    avm_events, rems_events = asyncio.run(_run(pki, _client_ctx(pki, "avm-2"), avm_id="avm-1"))
    _refused(avm_events, rems_events)
    assert any(isinstance(e, ProtocolError) and e.code == "identity_mismatch"
               for e in rems_events)
    assert any(isinstance(e, ProtocolError) and e.remote and e.code == "identity_mismatch"
               for e in avm_events)
