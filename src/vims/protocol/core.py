"""Sans-IO state machines of the control channel: :class:`AvmConnection`, :class:`RemsConnection`.

Neither class touches a socket or a clock. Bytes go in with ``receive_data``,
bytes come out of ``data_to_send``, time comes in as ``now`` and through
``handle_timer``, and what happened comes out of ``next_event``. That keeps every
protocol rule testable in memory, deterministically, and lets one core serve
asyncio, threads or a test harness alike.

All state changes go through :func:`next_state` and the single
:data:`TRANSITIONS` table, so the allowed message order is readable in one place
(and rendered in docs/protocol.md).
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from vims.protocol.chain import ChainLedger, ReportOutbox, ResumeError
from vims.protocol.events import (
    ConnectionClosed,
    Event,
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
from vims.protocol.framing import DEFAULT_MAX_FRAME, FrameDecoder, FrameError, encode_frame
from vims.protocol.messages import (
    NONCE_BYTES,
    Bye,
    Capabilities,
    ChainHead,
    Challenge,
    ErrorMessage,
    Evidence,
    Heartbeat,
    Hello,
    Message,
    MessageDecodeError,
    Policy,
    PolicyAck,
    PolicySpec,
    PolicyUpdate,
    Quote,
    Report,
    ReportAck,
    RoundRequest,
    decode_message,
    encode_message,
    policy_digest,
    quote_qualifying_data,
    report_digest,
)

__all__ = [
    "TRANSITIONS",
    "AvmConnection",
    "EvidenceProvider",
    "EvidenceVerifier",
    "HelloAuthorizer",
    "PolicyProvider",
    "RemsConnection",
    "ReportQuoteVerifier",
    "ReportQuoter",
    "Role",
    "State",
    "VerificationResult",
    "bind_nonce",
    "next_state",
]

DEFAULT_HANDSHAKE_TIMEOUT = 30.0
# Round requests awaiting their report, per connection: each costs the A-VM a full
# round, so a REM-S (or a peer) cannot queue unbounded work.
MAX_PENDING_ROUNDS = 16
DEFAULT_TIMEOUT_FACTOR = 3.0


class Role(Enum):
    AVM = "avm"
    REMS = "rems"


class State(Enum):
    IDLE = "idle"  # A-VM: created, hello not sent yet
    AWAIT_HELLO = "await_hello"  # REM-S: accepted, nothing received
    HELLO_SENT = "hello_sent"  # A-VM
    CHALLENGE_SENT = "challenge_sent"  # REM-S
    EVIDENCE_SENT = "evidence_sent"  # A-VM
    POLICY_SENT = "policy_sent"  # REM-S: evidence verified, waiting for policy_ack
    ACTIVE = "active"  # both: reports flow
    CLOSED = "closed"


# Local triggers (not message types) used in the table.
CONNECT = "<connect>"
CLOSE = "<close>"  # local close, protocol error, timeout or lost transport

_OPEN = tuple(s for s in State if s is not State.CLOSED)


def _build_table() -> dict[tuple[Role, State, str], State]:
    a, r, s = Role.AVM, Role.REMS, State
    table = {
        (a, s.IDLE, CONNECT): s.HELLO_SENT,
        (a, s.HELLO_SENT, "challenge"): s.EVIDENCE_SENT,
        (a, s.EVIDENCE_SENT, "policy"): s.ACTIVE,
        (a, s.ACTIVE, "policy_update"): s.ACTIVE,
        (a, s.ACTIVE, "report_ack"): s.ACTIVE,
        (a, s.ACTIVE, "round_request"): s.ACTIVE,
        (r, s.AWAIT_HELLO, "hello"): s.CHALLENGE_SENT,
        (r, s.CHALLENGE_SENT, "evidence"): s.POLICY_SENT,
        (r, s.POLICY_SENT, "policy_ack"): s.ACTIVE,
        (r, s.ACTIVE, "policy_ack"): s.ACTIVE,  # ack of a policy_update
        (r, s.ACTIVE, "report"): s.ACTIVE,
    }
    for role in Role:
        for state in _OPEN:
            table[(role, state, "error")] = s.CLOSED
            table[(role, state, "bye")] = s.CLOSED
            table[(role, state, CLOSE)] = s.CLOSED
            if state not in (s.IDLE, s.AWAIT_HELLO):
                # Heartbeats are legal once the peer has spoken; they change nothing.
                table[(role, state, "heartbeat")] = state
    return table


TRANSITIONS: dict[tuple[Role, State, str], State] = _build_table()


def next_state(role: Role, state: State, trigger: str) -> State | None:
    """The state after *trigger* (a message type or local trigger), None if illegal."""
    return TRANSITIONS.get((role, state, trigger))


@dataclass(frozen=True, slots=True)
class VerificationResult:
    """Outcome of an injected verifier: ``reason`` goes into the error frame and logs."""

    ok: bool
    reason: str = ""


HelloAuthorizer = Callable[[Hello], VerificationResult]
"""REM-S: ``authorize(hello)``: may this A-VM speak for every C-VM it names? Asked
before the challenge, which reveals the C-VMs' chain heads."""
EvidenceVerifier = Callable[[Hello, bytes, Evidence], VerificationResult]
"""REM-S: ``verify_evidence(hello, nonce, evidence)`` appraises the handshake quote."""
PolicyProvider = Callable[[Hello], PolicySpec]
"""REM-S: ``policy_for(hello)`` chooses the policy for an authenticated A-VM."""
ReportQuoteVerifier = Callable[[bytes, bytes, Quote], VerificationResult]
"""REM-S: ``verify_report_quote(nonce, report_digest, quote)``; the quote's qualifying
data must be ``quote_qualifying_data(nonce, report_digest)``."""
EvidenceProvider = Callable[[bytes], Evidence]
"""A-VM: ``make_evidence(nonce)`` quotes the vTPM over the challenge nonce."""
ReportQuoter = Callable[[bytes], Quote]
"""A-VM: ``quote_report(qualifying_data)`` quotes the vTPM over the given 32 bytes."""


CHANNEL_BINDING_LABEL = b"vims-channel-binding/1\0"


def bind_nonce(nonce: bytes, channel_binding: bytes) -> bytes:
    """What a quote must carry for *nonce* on a channel with *channel_binding*.

    SHA256(label || nonce || binding): the REM-S's nonce proves freshness, the
    TLS channel binding proves the quote was made for this very connection, so
    evidence cannot be relayed from another session (a relay terminating TLS
    twice sees two different bindings).
    """
    return hashlib.sha256(CHANNEL_BINDING_LABEL + nonce + channel_binding).digest()


class _ProtocolViolation(Exception):
    """Internal: unwinds a handler to the single place that sends error + closes."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Endpoint:
    """What both sides share: framing, event queue, state changes, idle timers."""

    role: Role

    def __init__(
        self,
        state: State,
        *,
        max_frame: int,
        handshake_timeout: float,
        timeout_factor: float,
    ) -> None:
        self._state = state
        self._decoder = FrameDecoder(max_frame)
        self._max_frame = max_frame
        self._out = bytearray()
        self._events: deque[Event] = deque()
        self._handshake_timeout = handshake_timeout
        self._timeout_factor = timeout_factor
        self._heartbeat_s: float | None = None
        self._started = 0.0
        self._last_rx = 0.0
        self._last_tx = 0.0
        self._channel_binding = b""

    # -- public API ---------------------------------------------------------

    def bind_channel(self, channel_binding: bytes) -> None:
        """The transport's channel binding (TLS); set before any message flows."""
        if self._state not in (State.IDLE, State.AWAIT_HELLO):
            raise RuntimeError("the channel binding is set before the handshake")
        self._channel_binding = bytes(channel_binding)

    @property
    def channel_binding(self) -> bytes:
        return self._channel_binding

    @property
    def state(self) -> State:
        return self._state

    @property
    def closed(self) -> bool:
        return self._state is State.CLOSED

    def data_to_send(self) -> bytes:
        """Bytes the transport must write, in order; empties the buffer."""
        data = bytes(self._out)
        self._out.clear()
        return data

    def next_event(self) -> Event | None:
        """The oldest pending event, or None."""
        return self._events.popleft() if self._events else None

    def events(self) -> Iterable[Event]:
        """Drain all pending events."""
        while self._events:
            yield self._events.popleft()

    def receive_data(self, data: bytes, now: float) -> None:
        """Feed bytes read from the transport. Never raises on peer input."""
        if self.closed or not data:
            return
        self._last_rx = now
        try:
            payloads = self._decoder.feed(data)
        except FrameError as exc:
            self._fail(exc.code, str(exc), now)
            return
        for payload in payloads:
            if self.closed:
                return  # whatever follows a fatal frame is not looked at
            try:
                msg = decode_message(payload)
                self._dispatch(msg, now)
            except MessageDecodeError as exc:
                self._fail(exc.code, str(exc), now)
            except _ProtocolViolation as exc:
                self._fail(exc.code, exc.message, now)

    def get_timer(self) -> float | None:
        """When ``handle_timer`` must next be called (absolute time), None if closed."""
        if self.closed:
            return None
        if self._heartbeat_s is None:
            return self._started + self._handshake_timeout
        return min(
            self._last_tx + self._heartbeat_s,
            self._last_rx + self._heartbeat_s * self._timeout_factor,
        )

    def handle_timer(self, now: float) -> None:
        """Send due heartbeats; close on a peer that went silent or a stuck handshake."""
        if self.closed:
            return
        if self._heartbeat_s is None:
            if now >= self._started + self._handshake_timeout:
                self._events.append(PeerTimeout(now - self._started))
                self._fail("timeout", "handshake not completed in time", now)
            return
        idle = now - self._last_rx
        if idle >= self._heartbeat_s * self._timeout_factor:
            self._events.append(PeerTimeout(idle))
            self._fail("timeout", f"no traffic from peer for {idle:.1f} s", now)
            return
        if now - self._last_tx >= self._heartbeat_s:
            self._send(Heartbeat(), now)
            self._events.append(HeartbeatDue())

    def close(self, now: float, reason: str = "") -> None:
        """Orderly close: send bye, go CLOSED."""
        if self.closed:
            return
        self._send(Bye(reason=reason[:256]), now)
        self._transition(CLOSE)
        self._events.append(ConnectionClosed(reason or "closed"))

    def connection_lost(self, now: float, reason: str = "transport closed") -> None:
        """The transport went away (EOF, TLS error): go CLOSED without sending."""
        del now
        if self.closed:
            return
        self._transition(CLOSE)
        self._events.append(ConnectionClosed(reason))

    # -- for subclasses -------------------------------------------------------

    def _handlers(self) -> dict[str, Callable[[Any, float], None]]:
        raise NotImplementedError

    def _dispatch(self, msg: Message, now: float) -> None:
        target = next_state(self.role, self._state, msg.type)
        if target is None:
            raise _ProtocolViolation(
                "unexpected_message", f"{msg.type} not allowed in state {self._state.value}"
            )
        if isinstance(msg, ErrorMessage):
            self._state = target
            self._events.append(ProtocolError(msg.code, msg.message, remote=True))
            self._events.append(ConnectionClosed(f"peer error: {msg.code}"))
            return
        if isinstance(msg, Bye):
            self._state = target
            self._events.append(ConnectionClosed(f"peer closed: {msg.reason}" if msg.reason
                                                 else "peer closed"))
            return
        if isinstance(msg, Heartbeat):
            self._events.append(HeartbeatReceived())
            return
        # Enter the target first: a handler that fails moves on from it to CLOSED.
        self._state = target
        self._handlers()[msg.type](msg, now)

    def _transition(self, trigger: str) -> None:
        target = next_state(self.role, self._state, trigger)
        if target is None:  # a bug in this module, not a peer's doing
            raise RuntimeError(f"no transition {self.role.value}:{self._state.value}:{trigger}")
        self._state = target

    def _send(self, msg: Any, now: float) -> None:
        self._out += encode_frame(encode_message(msg), self._max_frame)
        self._last_tx = now

    def _fail(self, code: str, message: str, now: float) -> None:
        """Report a local protocol error to the app and the peer, then close."""
        if self.closed:
            return
        self._events.append(ProtocolError(code, message, remote=False))
        self._send(ErrorMessage(code=code, message=message[:512]), now)
        self._transition(CLOSE)
        self._events.append(ConnectionClosed(f"protocol error: {code}"))


class AvmConnection(_Endpoint):
    """The A-VM side of one connection; its :class:`ReportOutbox` outlives it.

    Reports handed to :meth:`send_report` go into the outbox at once, whatever
    the state; they are transmitted when ACTIVE, and on a new connection every
    report the REM-S had not stored is resent after the handshake.
    """

    role = Role.AVM

    def __init__(
        self,
        *,
        avm_id: str,
        cvms: list[str],
        capabilities: Capabilities,
        make_evidence: EvidenceProvider,
        quote_report: ReportQuoter,
        outbox: ReportOutbox | None = None,
        max_frame: int = DEFAULT_MAX_FRAME,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        timeout_factor: float = DEFAULT_TIMEOUT_FACTOR,
    ) -> None:
        super().__init__(
            State.IDLE,
            max_frame=max_frame,
            handshake_timeout=handshake_timeout,
            timeout_factor=timeout_factor,
        )
        self.outbox = outbox if outbox is not None else ReportOutbox()
        # Validate now: a bad id is the caller's bug and must not reach the wire.
        self._hello = Hello(
            avm_id=avm_id,
            cvms=cvms,
            capabilities=capabilities,
            resume_from={cvm: self.outbox.acked_head(cvm) for cvm in cvms},
        )
        self._make_evidence = make_evidence
        self._quote_report = quote_report
        self._nonce = b""
        self._policy: PolicySpec | None = None
        self._sent_upto: dict[str, int] = {}
        self._unquoted: dict[str, int] = {}
        self._rounds: dict[str, bytes] = {}  # request_id -> nonce, asked on this connection

    @property
    def policy(self) -> PolicySpec | None:
        return self._policy

    def connect(self, now: float) -> None:
        """Start the handshake: queue the hello."""
        self._transition(CONNECT)
        self._started = self._last_rx = now
        self._send(self._hello, now)

    def send_report(self, cvm: str, body: dict[str, Any], now: float,
                    request_id: str | None = None) -> Report:
        """Chain *body* into *cvm*'s outbox and transmit it if the channel is ACTIVE.

        ``request_id`` marks the report that answers a :class:`RoundRequested`;
        it is then quoted over that request's nonce. Raises ValueError for a
        C-VM not named in the hello (the REM-S would refuse it) or a request
        this connection was not asked, pydantic's ValidationError for an
        invalid body and :class:`~vims.protocol.chain.OutboxFull` when acks
        stopped coming.
        """
        if cvm not in self._hello.cvms:
            raise ValueError(f"C-VM {cvm!r} is not guarded by this A-VM")
        if request_id is not None and request_id not in self._rounds:
            raise ValueError(f"no pending round request {request_id!r} on this connection")
        report = self.outbox.append(cvm, body, request_id)
        if self._state is State.ACTIVE:
            self._flush_reports(now)
        return report

    def _handlers(self) -> dict[str, Callable[[Any, float], None]]:
        return {
            "challenge": self._on_challenge,
            "policy": self._on_policy,
            "policy_update": self._on_policy_update,
            "report_ack": self._on_report_ack,
            "round_request": self._on_round_request,
        }

    def _on_round_request(self, msg: RoundRequest, now: float) -> None:
        del now
        if msg.cvm not in self._hello.cvms:
            raise _ProtocolViolation("unknown_cvm", f"{msg.cvm} was not named in the hello")
        if msg.request_id in self._rounds or len(self._rounds) >= MAX_PENDING_ROUNDS:
            raise _ProtocolViolation("too_many_rounds", "duplicate or too many round requests")
        self._rounds[msg.request_id] = bind_nonce(bytes.fromhex(msg.nonce), self._channel_binding)
        self._events.append(RoundRequested(msg.request_id, msg.cvm))

    def _on_challenge(self, msg: Challenge, now: float) -> None:
        for cvm in self._hello.cvms:
            head = msg.resume.get(cvm)
            if head is None:
                raise _ProtocolViolation("resume_missing", f"no chain head for {cvm}")
            try:
                self.outbox.resume(cvm, head)
            except ResumeError as exc:
                raise _ProtocolViolation(exc.code, str(exc)) from None
        self._nonce = bind_nonce(bytes.fromhex(msg.nonce), self._channel_binding)
        try:
            evidence = self._make_evidence(self._nonce)
        except Exception as exc:  # noqa: BLE001 - a vTPM failure ends this session only
            raise _ProtocolViolation(
                "evidence_unavailable", f"{type(exc).__name__}: {exc}"
            ) from None
        self._send(evidence, now)

    def _adopt(self, spec: PolicySpec, digest: str, now: float, *, update: bool) -> None:
        self._policy = spec
        self._heartbeat_s = spec.heartbeat_s
        self._send(
            PolicyAck(policy_id=spec.policy_id, policy_version=spec.version, digest=digest), now
        )
        self._events.append(PolicyReceived(spec, digest, update=update))

    def _on_policy(self, msg: Policy, now: float) -> None:
        self._adopt(msg.policy, msg.digest, now, update=False)
        self._events.append(
            HandshakeComplete(
                avm_id=self._hello.avm_id,
                cvms=tuple(self._hello.cvms),
                policy_id=msg.policy.policy_id,
                policy_version=msg.policy.version,
            )
        )
        self._flush_reports(now)  # after the ack: the REM-S judges them by this policy

    def _on_policy_update(self, msg: PolicyUpdate, now: float) -> None:
        self._adopt(msg.policy, msg.digest, now, update=True)

    def _on_report_ack(self, msg: ReportAck, now: float) -> None:
        del now
        if msg.seq > self._sent_upto.get(msg.cvm, 0) or not self.outbox.ack(msg.cvm, msg.seq):
            raise _ProtocolViolation("bad_ack", f"unexpected ack for {msg.cvm} seq {msg.seq}")
        self._events.append(ReportAcked(msg.cvm, msg.seq))

    def _flush_reports(self, now: float) -> None:
        """Transmit every outbox report not yet sent on this connection, in seq order."""
        assert self._policy is not None
        for cvm in self._hello.cvms:
            sent = self._sent_upto.get(cvm, 0)
            for stored, digest in self.outbox.unacked_after(cvm, sent):
                report = stored
                unquoted = self._unquoted.get(cvm, 0)
                # A requested round is quoted over its own nonce; otherwise the same
                # counter rule as the REM-S: every quote_every-th report is quoted.
                round_nonce = self._rounds.pop(report.request_id or "", None)
                if round_nonce is not None or unquoted + 1 >= self._policy.quote_every:
                    try:
                        quote = self._quote_report(
                            quote_qualifying_data(round_nonce or self._nonce, digest))
                    except Exception as exc:  # noqa: BLE001 - the report stays in the outbox
                        self._fail("quote_unavailable", f"{type(exc).__name__}: {exc}", now)
                        return
                    report = report.model_copy(update={"quote": quote})
                    self._unquoted[cvm] = 0
                else:
                    self._unquoted[cvm] = unquoted + 1
                self._send(report, now)
                self._sent_upto[cvm] = report.seq


class RemsConnection(_Endpoint):
    """The REM-S side of one connection: appraises the A-VM, then judges its reports.

    ``peer_avm_id`` is the identity the transport authenticated (client
    certificate); when set, a hello naming another A-VM is refused.
    """

    role = Role.REMS

    def __init__(
        self,
        *,
        verify_evidence: EvidenceVerifier,
        policy_for: PolicyProvider,
        verify_report_quote: ReportQuoteVerifier,
        ledger: ChainLedger,
        now: float,
        peer_avm_id: str | None = None,
        authorize: HelloAuthorizer | None = None,
        defer_acks: bool = False,
        nonce_source: Callable[[int], bytes] = os.urandom,
        max_frame: int = DEFAULT_MAX_FRAME,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        timeout_factor: float = DEFAULT_TIMEOUT_FACTOR,
    ) -> None:
        super().__init__(
            State.AWAIT_HELLO,
            max_frame=max_frame,
            handshake_timeout=handshake_timeout,
            timeout_factor=timeout_factor,
        )
        self.peer_avm_id = peer_avm_id
        self._authorize = authorize
        # Deferred: the application acks (ack_report) once the report is durably stored.
        self._defer_acks = defer_acks
        self._verify_evidence = verify_evidence
        self._policy_for = policy_for
        self._verify_report_quote = verify_report_quote
        self._ledger = ledger
        self._nonce_source = nonce_source
        self._started = self._last_rx = self._last_tx = now
        self._hello: Hello | None = None
        self._nonce = b""
        self._policy: PolicySpec | None = None  # the acknowledged policy
        self._pending: deque[tuple[PolicySpec, str]] = deque()  # sent, not acked
        self._unquoted: dict[str, int] = {}
        self._rounds: dict[str, tuple[str, bytes]] = {}  # request_id -> (cvm, nonce)

    @property
    def hello(self) -> Hello | None:
        return self._hello

    @property
    def policy(self) -> PolicySpec | None:
        """The policy the A-VM acknowledged last (reports are judged against it)."""
        return self._policy

    def ack_report(self, cvm: str, seq: int, now: float) -> None:
        """With ``defer_acks``: the report is stored, tell the A-VM it may forget it.

        Acks must follow the order the reports were received in; after a close
        there is nobody to tell (the A-VM resends on its next connection).
        """
        if not self.closed:
            self._send(ReportAck(cvm=cvm, seq=seq), now)

    @property
    def latest_policy(self) -> PolicySpec | None:
        """The policy sent last, acknowledged or not: what the A-VM will run."""
        return self._pending[-1][0] if self._pending else self._policy

    def update_policy(self, spec: PolicySpec, now: float) -> None:
        """Push a new policy; it applies to reports after the A-VM's ack of it."""
        if self._state is not State.ACTIVE:
            raise RuntimeError("policy updates need an ACTIVE connection")
        digest = policy_digest(spec)
        self._pending.append((spec, digest))
        self._send(PolicyUpdate(policy=spec, digest=digest), now)

    def request_round(self, cvm: str, now: float) -> str:
        """Ask the A-VM for a fresh, quoted round of *cvm*; returns the request id.

        The answer arrives as a :class:`ReportReceived` carrying that id. Raises
        RuntimeError when the channel is not ACTIVE or too many requests are
        pending, ValueError for a C-VM this A-VM does not guard.
        """
        if self._state is not State.ACTIVE or self._hello is None:
            raise RuntimeError("round requests need an ACTIVE connection")
        if cvm not in self._hello.cvms:
            raise ValueError(f"C-VM {cvm!r} is not guarded by A-VM {self._hello.avm_id}")
        if len(self._rounds) >= MAX_PENDING_ROUNDS:
            raise RuntimeError(f"{MAX_PENDING_ROUNDS} round requests already pending")
        request_id = self._nonce_source(8).hex()
        nonce = self._nonce_source(NONCE_BYTES)
        self._rounds[request_id] = (cvm, bind_nonce(nonce, self._channel_binding))
        self._send(RoundRequest(request_id=request_id, cvm=cvm, nonce=nonce.hex()), now)
        return request_id

    def cancel_round(self, request_id: str) -> None:
        """Forget a round nobody waits for any more; a late answer is just a report."""
        self._rounds.pop(request_id, None)

    def _handlers(self) -> dict[str, Callable[[Any, float], None]]:
        return {
            "hello": self._on_hello,
            "evidence": self._on_evidence,
            "policy_ack": self._on_policy_ack,
            "report": self._on_report,
        }

    def _on_hello(self, msg: Hello, now: float) -> None:
        if self.peer_avm_id is not None and msg.avm_id != self.peer_avm_id:
            raise _ProtocolViolation(
                "identity_mismatch",
                f"hello names {msg.avm_id!r}, certificate names {self.peer_avm_id!r}",
            )
        if self._authorize is not None:
            try:
                allowed = self._authorize(msg)
            except Exception as exc:  # noqa: BLE001 - a failing check is a refusal
                allowed = VerificationResult(False, f"authorizer error: {type(exc).__name__}")
            if not allowed.ok:
                raise _ProtocolViolation("not_bound", allowed.reason or "C-VMs not bound")
        self._hello = msg
        nonce = self._nonce_source(NONCE_BYTES)
        if len(nonce) != NONCE_BYTES:
            raise RuntimeError("nonce_source returned the wrong length")
        self._nonce = bind_nonce(nonce, self._channel_binding)
        resume = {cvm: self._ledger.head(msg.avm_id, cvm) for cvm in msg.cvms}
        self._send(Challenge(nonce=nonce.hex(), resume=resume), now)

    def _on_evidence(self, msg: Evidence, now: float) -> None:
        assert self._hello is not None
        try:
            result = self._verify_evidence(self._hello, self._nonce, msg)
        except Exception as exc:  # noqa: BLE001 - a verifier crash on crafted input is a refusal
            result = VerificationResult(False, f"verifier error: {type(exc).__name__}: {exc}")
        if not result.ok:
            raise _ProtocolViolation("attestation_failed", result.reason or "evidence rejected")
        spec = self._policy_for(self._hello)
        digest = policy_digest(spec)
        self._pending.append((spec, digest))
        self._heartbeat_s = spec.heartbeat_s
        self._send(Policy(policy=spec, digest=digest), now)

    def _on_policy_ack(self, msg: PolicyAck, now: float) -> None:
        del now
        if not self._pending:
            raise _ProtocolViolation("unexpected_message", "policy_ack without a pending policy")
        spec, digest = self._pending[0]
        if (msg.policy_id, msg.policy_version, msg.digest) != (
            spec.policy_id,
            spec.version,
            digest,
        ):
            raise _ProtocolViolation("policy_mismatch", "policy_ack does not match the policy sent")
        self._pending.popleft()
        first = self._policy is None
        self._policy = spec
        self._heartbeat_s = spec.heartbeat_s
        self._events.append(PolicyAcked(spec.policy_id, spec.version, digest))
        if first:
            assert self._hello is not None
            self._events.append(
                HandshakeComplete(
                    avm_id=self._hello.avm_id,
                    cvms=tuple(self._hello.cvms),
                    policy_id=spec.policy_id,
                    policy_version=spec.version,
                    hello=self._hello,
                )
            )

    def _on_report(self, msg: Report, now: float) -> None:
        assert self._hello is not None
        assert self._policy is not None
        avm_id, cvm = self._hello.avm_id, msg.cvm
        if cvm not in self._hello.cvms:
            raise _ProtocolViolation("unknown_cvm", f"{cvm} was not named in the hello")
        head = self._ledger.head(avm_id, cvm)
        if msg.seq <= head.seq:
            raise _ProtocolViolation("replay", f"{cvm} seq {msg.seq} already received")
        if msg.seq != head.seq + 1:
            raise _ProtocolViolation("seq_gap", f"{cvm} seq {msg.seq}, expected {head.seq + 1}")
        if msg.prev_hash != head.digest:
            raise _ProtocolViolation("chain_broken", f"{cvm} seq {msg.seq}: prev_hash mismatch")
        digest = report_digest(msg)
        # A report answering one of this connection's round requests must be quoted
        # over that request's nonce; an id from an earlier connection is just a report.
        round_ = self._rounds.get(msg.request_id or "")
        if round_ is not None:
            if round_[0] != cvm:
                raise _ProtocolViolation("round_mismatch", f"round request was for {round_[0]}")
            if msg.quote is None:
                raise _ProtocolViolation("quote_missing", "a requested round must be quoted")
            del self._rounds[msg.request_id or ""]
        if msg.quote is not None:
            try:
                result = self._verify_report_quote(
                    round_[1] if round_ else self._nonce, digest, msg.quote)
            except Exception as exc:  # noqa: BLE001 - see _on_evidence
                result = VerificationResult(False, f"verifier error: {type(exc).__name__}: {exc}")
            if not result.ok:
                raise _ProtocolViolation("quote_invalid", result.reason or "report quote rejected")
            self._unquoted[cvm] = 0
        else:
            unquoted = self._unquoted.get(cvm, 0) + 1
            if unquoted >= self._policy.quote_every:
                raise _ProtocolViolation(
                    "quote_missing",
                    f"{cvm} seq {msg.seq}: a quote is due every {self._policy.quote_every} reports",
                )
            self._unquoted[cvm] = unquoted
        # Ledger first, ack second: an ack promises the report is stored.
        self._ledger.advance(avm_id, cvm, ChainHead(seq=msg.seq, digest=digest.hex()))
        self._events.append(
            ReportReceived(
                avm_id=avm_id,
                cvm=cvm,
                seq=msg.seq,
                digest=digest.hex(),
                quoted=msg.quote is not None,
                body=msg.body,
                request_id=msg.request_id if round_ is not None else None,
            )
        )
        if not self._defer_acks:
            self._send(ReportAck(cvm=cvm, seq=msg.seq), now)
