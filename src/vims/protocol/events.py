"""Events the sans-IO connections hand to the application (``next_event()``).

Plain frozen dataclasses: the application pattern-matches on their type, and
nothing in them refers back to the connection, so they can be queued, logged or
sent to another task freely.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vims.protocol.messages import Hello, PolicySpec

__all__ = [
    "ConnectionClosed",
    "Event",
    "HandshakeComplete",
    "HeartbeatDue",
    "HeartbeatReceived",
    "PeerTimeout",
    "PolicyAcked",
    "PolicyReceived",
    "ProtocolError",
    "ReportAcked",
    "ReportReceived",
    "RoundRequested",
]


@dataclass(frozen=True, slots=True)
class HandshakeComplete:
    """Both sides: the A-VM is authenticated and the policy is acknowledged."""

    avm_id: str
    cvms: tuple[str, ...]
    policy_id: str
    policy_version: int
    hello: Hello | None = None  # REM-S side only: the A-VM's hello, for the store


@dataclass(frozen=True, slots=True)
class PolicyReceived:
    """A-VM: a policy (initial or update) is now in force; schedule checks from it."""

    policy: PolicySpec
    digest: str
    update: bool


@dataclass(frozen=True, slots=True)
class PolicyAcked:
    """REM-S: the A-VM acknowledged a policy; reports are now judged against it."""

    policy_id: str
    policy_version: int
    digest: str


@dataclass(frozen=True, slots=True)
class ReportReceived:
    """REM-S: a report passed sequence, chain and quote checks and was acknowledged."""

    avm_id: str
    cvm: str
    seq: int
    digest: str
    quoted: bool
    body: dict[str, Any] = field(repr=False)
    request_id: str | None = None  # set when it answers this connection's RoundRequest


@dataclass(frozen=True, slots=True)
class RoundRequested:
    """A-VM: the REM-S wants a fresh full round of *cvm* now (answer with its request_id)."""

    request_id: str
    cvm: str


@dataclass(frozen=True, slots=True)
class ReportAcked:
    """A-VM: the REM-S stored this report; it is dropped from the outbox."""

    cvm: str
    seq: int


@dataclass(frozen=True, slots=True)
class HeartbeatDue:
    """The channel was idle for a heartbeat period: a heartbeat frame was queued."""


@dataclass(frozen=True, slots=True)
class HeartbeatReceived:
    """The peer sent a heartbeat."""


@dataclass(frozen=True, slots=True)
class PeerTimeout:
    """Nothing came from the peer within the allowed idle time; the channel closes."""

    idle_s: float


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """A protocol violation: ``remote`` when the peer reported it in an error frame."""

    code: str
    message: str
    remote: bool = False


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The connection reached CLOSED; the transport may close the socket after flushing."""

    reason: str


Event = (
    HandshakeComplete
    | PolicyReceived
    | PolicyAcked
    | ReportReceived
    | ReportAcked
    | RoundRequested
    | HeartbeatDue
    | HeartbeatReceived
    | PeerTimeout
    | ProtocolError
    | ConnectionClosed
)
