"""The sans-IO control channel, A-VM and REM-S paired in memory (no sockets)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from vims.protocol.core import (
    MAX_PENDING_ROUNDS,
    RemsConnection,
    Role,
    State,
    VerificationResult,
    next_state,
)
from vims.protocol.events import (
    ConnectionClosed,
    HandshakeComplete,
    HeartbeatDue,
    HeartbeatReceived,
    PeerTimeout,
    PolicyAcked,
    PolicyReceived,
    ProtocolError,
    ReportAcked,
    ReportReceived,
    RoundRequested,
)
from vims.protocol.framing import HEADER, FrameDecoder, FrameError, encode_frame
from vims.protocol.messages import (
    ZERO_HASH,
    ChainHead,
    ErrorMessage,
    Report,
    RoundRequest,
    canonical_json,
    decode_message,
    encode_message,
    quote_qualifying_data,
    report_digest,
)
from vims.protocol.testing import FakeVtpm, Pair, default_policy, report_body


def received(events: list[Any]) -> list[tuple[str, int]]:
    return [(e.cvm, e.seq) for e in events if isinstance(e, ReportReceived)]


def errors(events: list[Any]) -> list[str]:
    return [e.code for e in events if isinstance(e, ProtocolError)]


def raw(obj: dict[str, Any]) -> bytes:
    return encode_frame(canonical_json(obj))


def sent_messages(data: bytes) -> list[Any]:
    return [decode_message(p) for p in FrameDecoder().feed(data)]


def active_pair(**kwargs: Any) -> Pair:
    pair = Pair(**kwargs)
    pair.handshake()
    assert pair.avm.state is State.ACTIVE
    assert pair.rems.state is State.ACTIVE
    return pair


def assert_refused(pair: Pair, code: str) -> None:
    """The REM-S sent an error frame with *code*, closed, and reported it."""
    out = sent_messages(pair.rems.data_to_send())
    pair.rems_events.extend(pair.rems.events())
    assert pair.rems.state is State.CLOSED
    assert isinstance(out[-1], ErrorMessage)
    assert out[-1].code == code
    assert code in errors(pair.rems_events)
    assert isinstance(pair.rems_events[-1], ConnectionClosed)


# --- (a) flows -------------------------------------------------------------------


def test_handshake_completes_on_both_sides() -> None:
    pair = active_pair()
    assert any(isinstance(e, HandshakeComplete) for e in pair.avm_events)
    done = [e for e in pair.rems_events if isinstance(e, HandshakeComplete)]
    assert done[0].avm_id == "avm-1"
    assert done[0].hello is not None
    assert done[0].hello.cvms == ["web", "db"]
    policy = [e for e in pair.avm_events if isinstance(e, PolicyReceived)]
    assert policy[0].policy == default_policy()
    assert pair.avm.policy == pair.rems.policy == default_policy()


def test_reports_are_chained_acked_and_quoted_every_n() -> None:
    pair = active_pair(policy=default_policy(quote_every=3))
    for i in range(7):
        pair.report("web", report_body(i=i))
    got = [e for e in pair.rems_events if isinstance(e, ReportReceived)]
    assert [e.seq for e in got] == [1, 2, 3, 4, 5, 6, 7]
    assert [e.quoted for e in got] == [False, False, True, False, False, True, False]
    assert [e.body["i"] for e in got] == list(range(7))
    acked = [(e.cvm, e.seq) for e in pair.avm_events if isinstance(e, ReportAcked)]
    assert acked == [("web", s) for s in range(1, 8)]
    assert pair.outbox.unacked("web") == []
    assert pair.ledger.head("avm-1", "web").seq == 7
    assert pair.ledger.head("avm-1", "web").digest == got[-1].digest


def test_seq_is_per_cvm() -> None:
    pair = active_pair()
    pair.report("web")
    pair.report("db")
    pair.report("web")
    assert received(pair.rems_events) == [("web", 1), ("db", 1), ("web", 2)]


def test_policy_update_is_pushed_acked_and_enforced_after_ack() -> None:
    pair = active_pair(policy=default_policy(quote_every=5))
    pair.report("web")
    new = default_policy(quote_every=1, version=2)
    pair.rems.update_policy(new, pair.clock.now)
    pair.pump()
    update = [e for e in pair.avm_events if isinstance(e, PolicyReceived) and e.update]
    assert update[0].policy == new
    assert [e.policy_version for e in pair.rems_events if isinstance(e, PolicyAcked)] == [1, 2]
    assert pair.rems.policy == new
    pair.report("web")
    pair.report("web")
    assert [e.quoted for e in pair.rems_events if isinstance(e, ReportReceived)] == [
        False, True, True,
    ]


def test_reports_queued_before_handshake_are_sent_after_it() -> None:
    pair = Pair()
    pair.avm.send_report("web", report_body(early=True), pair.clock.now)
    pair.handshake()
    assert received(pair.rems_events) == [("web", 1)]


def test_heartbeats_when_idle_and_peer_timeout() -> None:
    pair = active_pair(policy=default_policy(heartbeat_s=10))
    assert pair.avm.get_timer() == pytest.approx(pair.clock.now + 10)
    pair.clock.advance(10)
    pair.avm.handle_timer(pair.clock.now)
    pair.rems.handle_timer(pair.clock.now)
    pair.pump()
    assert any(isinstance(e, HeartbeatDue) for e in pair.avm_events)
    assert any(isinstance(e, HeartbeatReceived) for e in pair.rems_events)
    assert pair.rems.state is State.ACTIVE
    # The A-VM goes silent (no pump): the REM-S times it out after 3 periods.
    for _ in range(3):
        pair.clock.advance(10)
        pair.rems.handle_timer(pair.clock.now)
    events = list(pair.rems.events())
    assert any(isinstance(e, PeerTimeout) for e in events)
    assert pair.rems.closed
    assert sent_messages(pair.rems.data_to_send())[-1].code == "timeout"


def test_handshake_timeout() -> None:
    pair = Pair()
    pair.clock.advance(31)
    pair.rems.handle_timer(pair.clock.now)
    assert pair.rems.state is State.CLOSED
    assert any(isinstance(e, PeerTimeout) for e in pair.rems.events())


def test_reconnect_resumes_without_loss_or_duplicates() -> None:
    pair = active_pair(policy=default_policy(quote_every=2))
    for i in range(3):
        pair.report("web", report_body(i=i))
    # Two more reach the REM-S but their acks are lost with the connection,
    # and two more never leave the A-VM.
    pair.avm.send_report("web", report_body(i=3), pair.clock.now)
    pair.avm.send_report("web", report_body(i=4), pair.clock.now)
    pair.rems.receive_data(pair.avm.data_to_send(), pair.clock.now)
    pair.rems_events.extend(pair.rems.events())
    pair.drop()
    pair.avm.send_report("web", report_body(i=5), pair.clock.now)
    pair.avm.send_report("db", report_body(i=0), pair.clock.now)
    assert [r.seq for r, _ in pair.outbox.unacked("web")] == [4, 5, 6]
    pair.reconnect()
    pair.report("web", report_body(i=6))
    assert received(pair.rems_events) == [("web", s) for s in range(1, 6)] + [
        ("web", 6), ("db", 1), ("web", 7),
    ]
    bodies = [e.body["i"] for e in pair.rems_events
              if isinstance(e, ReportReceived) and e.cvm == "web"]
    assert bodies == list(range(7))
    assert pair.outbox.unacked("web") == []
    assert errors(pair.rems_events) == []


def test_fresh_avm_continues_the_rems_chain() -> None:
    pair = active_pair()
    pair.report("web")
    pair.report("web")
    pair.drop()
    pair.outbox.__init__()  # type: ignore[misc]  # the A-VM lost its state
    pair.reconnect()
    pair.report("web")
    assert received(pair.rems_events)[-1] == ("web", 3)
    assert errors(pair.rems_events) == []


def test_transition_table_is_the_only_authority() -> None:
    assert next_state(Role.REMS, State.POLICY_SENT, "report") is None
    assert next_state(Role.REMS, State.ACTIVE, "report") is State.ACTIVE
    assert next_state(Role.AVM, State.ACTIVE, "challenge") is None


# --- (b) rejections ------------------------------------------------------------------


def test_malformed_json() -> None:
    pair = Pair()
    pair.rems.receive_data(encode_frame(b"{not json"), pair.clock.now)
    assert_refused(pair, "malformed")


def test_unknown_type() -> None:
    pair = Pair()
    pair.rems.receive_data(raw({"type": "gimme_root", "version": 1}), pair.clock.now)
    assert_refused(pair, "unknown_type")


def test_unknown_field() -> None:
    pair = active_pair()
    pair.avm.send_report("web", report_body(), pair.clock.now)
    report = json.loads(pair.avm.data_to_send()[HEADER.size:])
    report["extra"] = 1
    pair.rems.receive_data(raw(report), pair.clock.now)
    assert_refused(pair, "invalid_message")
    assert received(pair.rems_events) == []


def test_unsupported_version() -> None:
    pair = Pair()
    pair.rems.receive_data(raw({"type": "heartbeat", "version": 2}), pair.clock.now)
    assert_refused(pair, "unsupported_version")


def test_oversized_frame_refused_from_its_header() -> None:
    pair = Pair()
    pair.rems.receive_data(HEADER.pack(2 * 1024 * 1024 + 1), pair.clock.now)
    assert_refused(pair, "frame_too_large")
    decoder = FrameDecoder(max_frame=100)
    with pytest.raises(FrameError):
        decoder.feed(HEADER.pack(101) + b"x" * 50)
    assert decoder.buffered == 0


def test_oversized_report_body_refused() -> None:
    pair = active_pair()
    with pytest.raises(ValueError, match="limit"):
        pair.avm.send_report("web", report_body(blob="x" * (1024 * 1024)), pair.clock.now)


def test_report_before_policy_ack() -> None:
    fresh = Pair()
    fresh.avm.connect(fresh.clock.now)
    fresh.rems.receive_data(fresh.avm.data_to_send(), fresh.clock.now)  # hello
    fresh.avm.receive_data(fresh.rems.data_to_send(), fresh.clock.now)  # challenge
    fresh.rems.receive_data(fresh.avm.data_to_send(), fresh.clock.now)  # evidence
    assert fresh.rems.state is State.POLICY_SENT
    fresh.rems.data_to_send()
    early = Report(cvm="web", seq=1, prev_hash=ZERO_HASH, body=report_body())
    fresh.rems.receive_data(encode_frame(encode_message(early)), fresh.clock.now)
    assert_refused(fresh, "unexpected_message")
    assert received(fresh.rems_events) == []


def test_evidence_twice() -> None:
    pair = Pair()
    pair.avm.connect(pair.clock.now)
    pair.rems.receive_data(pair.avm.data_to_send(), pair.clock.now)
    pair.avm.receive_data(pair.rems.data_to_send(), pair.clock.now)
    evidence = pair.avm.data_to_send()
    pair.rems.receive_data(evidence + evidence, pair.clock.now)
    assert_refused(pair, "unexpected_message")


def _tampered_report(pair: Pair, **changes: Any) -> bytes:
    pair.avm.send_report("web", report_body(n=1), pair.clock.now)
    frame = pair.avm.data_to_send()
    report = decode_message(frame[HEADER.size:])
    assert isinstance(report, Report)
    return encode_frame(encode_message(report.model_copy(update=changes)))


def test_replayed_report() -> None:
    pair = active_pair()
    pair.avm.send_report("web", report_body(), pair.clock.now)
    frame = pair.avm.data_to_send()
    pair.rems.receive_data(frame, pair.clock.now)
    pair.rems_events.extend(pair.rems.events())
    pair.rems.data_to_send()
    pair.rems.receive_data(frame, pair.clock.now)
    assert_refused(pair, "replay")
    assert received(pair.rems_events) == [("web", 1)]


def test_gap_in_seq() -> None:
    pair = active_pair()
    pair.rems.receive_data(_tampered_report(pair, seq=2), pair.clock.now)
    assert_refused(pair, "seq_gap")
    assert received(pair.rems_events) == []


def test_broken_prev_hash() -> None:
    pair = active_pair()
    pair.report("web")
    pair.rems.receive_data(_tampered_report(pair, prev_hash="ab" * 32), pair.clock.now)
    assert_refused(pair, "chain_broken")
    assert received(pair.rems_events) == [("web", 1)]


def test_missing_quote_after_n_reports() -> None:
    pair = active_pair(policy=default_policy(quote_every=2))
    pair.report("web")
    pair.rems.receive_data(_tampered_report(pair, quote=None), pair.clock.now)
    assert_refused(pair, "quote_missing")
    assert received(pair.rems_events) == [("web", 1)]


def test_quote_bound_to_another_report_is_refused() -> None:
    pair = active_pair(policy=default_policy(quote_every=1))
    forged = FakeVtpm().quote(b"\x00" * 32)
    pair.rems.receive_data(_tampered_report(pair, quote=forged), pair.clock.now)
    assert_refused(pair, "quote_invalid")
    assert received(pair.rems_events) == []


def test_report_for_unannounced_cvm() -> None:
    pair = active_pair()
    frame = encode_frame(encode_message(Report(cvm="other", seq=1, prev_hash=ZERO_HASH,
                                               body=report_body())))
    pair.rems.receive_data(frame, pair.clock.now)
    assert_refused(pair, "unknown_cvm")


def test_verify_evidence_failure_closes() -> None:
    pair = Pair()
    pair.rems._verify_evidence = lambda h, n, e: VerificationResult(False, "PCR17 mismatch")
    pair.handshake()
    assert pair.rems.state is State.CLOSED
    assert pair.avm.state is State.CLOSED
    assert errors(pair.rems_events) == ["attestation_failed"]
    remote = [e for e in pair.avm_events if isinstance(e, ProtocolError)]
    assert remote[0].remote
    assert "PCR17" in remote[0].message
    pair.avm.send_report("web", report_body(), pair.clock.now)
    pair.pump()
    assert received(pair.rems_events) == []


def test_evidence_for_another_nonce_fails() -> None:
    pair = Pair()
    pair.avm._make_evidence = lambda nonce: pair.vtpm.make_evidence(b"\x01" * 32)
    pair.handshake()
    assert errors(pair.rems_events) == ["attestation_failed"]


def test_identity_mismatch() -> None:
    pair = Pair(peer_avm_id="avm-2")
    pair.handshake()
    assert errors(pair.rems_events) == ["identity_mismatch"]
    assert pair.rems.state is State.CLOSED


def test_forged_ack_is_refused_by_the_avm() -> None:
    pair = active_pair()
    pair.avm.send_report("web", report_body(), pair.clock.now)
    pair.avm.data_to_send()
    pair.avm.receive_data(raw({"type": "report_ack", "version": 1, "cvm": "web", "seq": 2}),
                          pair.clock.now)
    assert pair.avm.state is State.CLOSED
    assert [r.seq for r, _ in pair.outbox.unacked("web")] == [1]


def test_diverged_chain_on_resume() -> None:
    pair = active_pair()
    pair.report("web")
    pair.drop()
    other = Report(cvm="web", seq=1, prev_hash=ZERO_HASH, body=report_body(forged=True))
    pair.ledger.advance("avm-1", "web", ChainHead(seq=1, digest=report_digest(other).hex()))
    pair.reconnect()
    assert "resume_diverged" in errors(pair.avm_events)


# --- on-demand rounds (RoundRequest) ---------------------------------------------


def _requested(pair: Pair) -> list[RoundRequested]:
    return [e for e in pair.avm_events if isinstance(e, RoundRequested)]


def test_requested_round_is_quoted_over_its_own_nonce() -> None:
    pair = active_pair(policy=default_policy(quote_every=100))
    request_id = pair.rems.request_round("db", pair.clock.now)
    pair.pump()
    assert _requested(pair) == [RoundRequested(request_id, "db")]
    quotes_before = pair.vtpm.quotes
    pair.avm.send_report("db", report_body(fresh=True), pair.clock.now, request_id=request_id)
    pair.pump()
    got = [e for e in pair.rems_events if isinstance(e, ReportReceived)]
    assert [(e.cvm, e.request_id, e.quoted) for e in got] == [("db", request_id, True)]
    assert pair.vtpm.quotes == quotes_before + 1
    # The next ordinary report is not quoted again (quote_every=100) and is no answer.
    pair.report("db")
    last = [e for e in pair.rems_events if isinstance(e, ReportReceived)][-1]
    assert (last.seq, last.quoted, last.request_id) == (2, False, None)


@pytest.mark.parametrize(("cvm", "quoted_over", "code"), [
    ("web", "session_nonce", "quote_invalid"),  # proves nothing about this request
    ("web", None, "quote_missing"),
    ("db", "request_nonce", "round_mismatch"),
])
def test_bad_answers_to_a_round_request_are_refused(cvm: str, quoted_over: str | None,
                                                      code: str) -> None:
    pair = active_pair(policy=default_policy(quote_every=100))
    request_id = pair.rems.request_round("web", pair.clock.now)
    pair.pump()
    report = Report(cvm=cvm, seq=1, prev_hash=ZERO_HASH, body=report_body(), request_id=request_id)
    if quoted_over is not None:
        nonce = pair.rems._nonce if quoted_over == "session_nonce" else pair.rems._rounds[
            request_id][1]
        quote = pair.vtpm.quote(quote_qualifying_data(nonce, report_digest(report)))
        report = report.model_copy(update={"quote": quote})
    pair.rems.receive_data(encode_frame(encode_message(report)), pair.clock.now)
    assert_refused(pair, code)


def test_round_requests_are_bounded_and_checked() -> None:
    pair = active_pair()
    with pytest.raises(ValueError, match="not guarded"):
        pair.rems.request_round("other", pair.clock.now)
    with pytest.raises(ValueError, match="no pending round request"):
        pair.avm.send_report("web", report_body(), pair.clock.now, request_id="00" * 8)
    for _ in range(MAX_PENDING_ROUNDS):
        pair.rems.request_round("web", pair.clock.now)
    with pytest.raises(RuntimeError, match="already pending"):
        pair.rems.request_round("web", pair.clock.now)
    pair.pump()
    assert len(_requested(pair)) == MAX_PENDING_ROUNDS
    # A REM-S that floods the A-VM anyway is cut off by the A-VM.
    flood = RoundRequest(request_id="ff" * 8, cvm="web", nonce="11" * 32)
    pair.avm.receive_data(encode_frame(encode_message(flood)), pair.clock.now)
    assert pair.avm.state is State.CLOSED
    assert "too_many_rounds" in errors(list(pair.avm.events()))


def test_request_from_a_lost_connection_is_an_ordinary_report_after_reconnect() -> None:
    pair = active_pair(policy=default_policy(quote_every=100))
    request_id = pair.rems.request_round("web", pair.clock.now)
    pair.pump()
    pair.drop()
    pair.avm.send_report("web", report_body(late=True), pair.clock.now, request_id=request_id)
    pair.reconnect()
    got = [e for e in pair.rems_events if isinstance(e, ReportReceived)]
    assert [(e.seq, e.request_id, e.quoted) for e in got] == [(1, None, False)]
    assert pair.rems.state is State.ACTIVE


def test_round_request_before_active_is_refused_by_the_avm() -> None:
    pair = Pair()
    pair.avm.connect(pair.clock.now)
    flood = RoundRequest(request_id="ab" * 8, cvm="web", nonce="11" * 32)
    pair.avm.receive_data(encode_frame(encode_message(flood)), pair.clock.now)
    assert pair.avm.state is State.CLOSED
    assert "unexpected_message" in errors(list(pair.avm.events()))
    with pytest.raises(RuntimeError, match="ACTIVE"):
        Pair().rems.request_round("web", 0.0)


def test_deferred_acks_wait_for_the_application() -> None:
    """A REM-S that stores asynchronously acks only once the report is stored."""
    pair = Pair()
    pair.rems = RemsConnection(
        verify_evidence=pair.vtpm.verify_evidence, policy_for=lambda hello: pair.policy,
        verify_report_quote=pair.vtpm.verify_report_quote, ledger=pair.ledger,
        now=pair.clock.now, defer_acks=True)
    pair.handshake()
    pair.report("web")
    pair.report("web")
    assert received(pair.rems_events) == [("web", 1), ("web", 2)]
    assert [r.seq for r, _ in pair.outbox.unacked("web")] == [1, 2]  # not acked yet
    pair.rems.ack_report("web", 1, pair.clock.now)
    pair.pump()
    assert [r.seq for r, _ in pair.outbox.unacked("web")] == [2]
    pair.drop()  # the connection goes before the second report is stored
    pair.rems.ack_report("web", 2, pair.clock.now)  # after a close: nobody to tell
    assert pair.rems.data_to_send() == b""
