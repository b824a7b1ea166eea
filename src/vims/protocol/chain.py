"""Report hash chains that outlive a connection: the A-VM's outbox, the REM-S's ledger.

A report is forgotten by the A-VM only once the REM-S acknowledged it, and the
REM-S acknowledges only after its ledger advanced, so across any number of
reconnects every report is delivered exactly once and in order; a report that
is lost, reordered or replayed breaks ``seq`` or ``prev_hash`` and is detected.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from vims.protocol.messages import ZERO_HASH, ChainHead, Report, report_digest

__all__ = ["ChainLedger", "MemoryLedger", "OutboxFull", "ReportOutbox", "ResumeError"]

GENESIS = ChainHead(seq=0, digest=ZERO_HASH)


class ChainLedger(Protocol):
    """Where the REM-S keeps each C-VM's chain head (persist it for durability)."""

    def head(self, avm_id: str, cvm: str) -> ChainHead:
        """The last accepted report's seq and digest, or seq 0 and zeros."""
        ...

    def advance(self, avm_id: str, cvm: str, head: ChainHead) -> None:
        """Record an accepted report; called before its ack is sent."""
        ...


class MemoryLedger:
    """A ChainLedger in a dict: enough for tests and a REM-S without persistence."""

    def __init__(self) -> None:
        self._heads: dict[tuple[str, str], ChainHead] = {}

    def head(self, avm_id: str, cvm: str) -> ChainHead:
        return self._heads.get((avm_id, cvm), GENESIS)

    def advance(self, avm_id: str, cvm: str, head: ChainHead) -> None:
        self._heads[(avm_id, cvm)] = head


class OutboxFull(RuntimeError):
    """Too many unacknowledged reports for one C-VM: back-pressure the checks."""


class ResumeError(ValueError):
    """The REM-S's chain head cannot be reconciled with the A-VM's outbox."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class _Pending:
    report: Report
    digest: bytes


@dataclass(slots=True)
class _CvmChain:
    next_seq: int = 1
    last_digest: bytes = bytes(32)  # digest of the newest report made
    acked_digest: bytes = bytes(32)  # digest of the newest report acknowledged
    unacked: deque[_Pending] = field(default_factory=deque)

    @property
    def acked_seq(self) -> int:
        return self.next_seq - 1 - len(self.unacked)


class ReportOutbox:
    """The A-VM's per-C-VM chains and unacknowledged reports (kept across connections)."""

    def __init__(self, max_unacked: int = 10_000) -> None:
        self.max_unacked = max_unacked
        self._chains: dict[str, _CvmChain] = {}

    def _chain(self, cvm: str) -> _CvmChain:
        return self._chains.setdefault(cvm, _CvmChain())

    def append(self, cvm: str, body: dict[str, Any], request_id: str | None = None) -> Report:
        """Give *body* the next seq and the chain's prev_hash; keep it until acked.

        Raises pydantic's ValidationError for an invalid cvm or body, and
        :class:`OutboxFull` when the REM-S has not kept up.
        """
        chain = self._chain(cvm)
        if len(chain.unacked) >= self.max_unacked:
            raise OutboxFull(f"{len(chain.unacked)} unacknowledged reports for {cvm}")
        report = Report(
            cvm=cvm, seq=chain.next_seq, prev_hash=chain.last_digest.hex(), body=body,
            request_id=request_id,
        )
        digest = report_digest(report)
        chain.unacked.append(_Pending(report, digest))
        chain.next_seq += 1
        chain.last_digest = digest
        return report

    def unacked(self, cvm: str) -> list[tuple[Report, bytes]]:
        """Unacknowledged reports of *cvm*, oldest first, with their digests."""
        chain = self._chains.get(cvm)
        return [(p.report, p.digest) for p in chain.unacked] if chain else []

    def unacked_after(self, cvm: str, seq: int) -> list[tuple[Report, bytes]]:
        """Unacknowledged reports of *cvm* with a seq above *seq*, oldest first.

        Walks from the newest end, so sending one new report costs O(1) however
        many reports await their ack.
        """
        chain = self._chains.get(cvm)
        if not chain:
            return []
        newer: list[tuple[Report, bytes]] = []
        for pending in reversed(chain.unacked):
            if pending.report.seq <= seq:
                break
            newer.append((pending.report, pending.digest))
        newer.reverse()
        return newer

    def oldest_unacked_seq(self, cvm: str) -> int | None:
        chain = self._chains.get(cvm)
        return chain.unacked[0].report.seq if chain and chain.unacked else None

    def acked_head(self, cvm: str) -> int:
        """The last seq the REM-S acknowledged, as far as this A-VM knows."""
        chain = self._chains.get(cvm)
        return chain.acked_seq if chain else 0

    def ack(self, cvm: str, seq: int) -> bool:
        """Drop the oldest unacked report if it is *seq*; False for any other ack."""
        chain = self._chains.get(cvm)
        if not chain or not chain.unacked or chain.unacked[0].report.seq != seq:
            return False
        chain.acked_digest = chain.unacked.popleft().digest
        return True

    def resume(self, cvm: str, head: ChainHead) -> None:
        """Reconcile with the REM-S's head: drop what it has, keep the rest to resend.

        The REM-S may have stored reports whose acks were lost with the old
        connection; those are dropped here (after checking their digest), so
        they are neither resent as replays nor lost.
        """
        chain = self._chain(cvm)
        made = chain.next_seq - 1
        if head.seq > made:
            if made == 0:
                # A fresh A-VM (no persisted outbox) continues the REM-S's chain.
                chain.next_seq = head.seq + 1
                chain.last_digest = chain.acked_digest = bytes.fromhex(head.digest)
                return
            raise ResumeError(
                "resume_diverged", f"{cvm}: REM-S has seq {head.seq}, this A-VM made {made}"
            )
        if head.seq < chain.acked_seq:
            raise ResumeError(
                "resume_gap",
                f"{cvm}: REM-S is at seq {head.seq} but acknowledged {chain.acked_seq}",
            )
        expected = chain.acked_digest
        while chain.unacked and chain.unacked[0].report.seq <= head.seq:
            expected = chain.unacked.popleft().digest
        if head.seq > 0 and expected.hex() != head.digest:
            raise ResumeError("resume_diverged", f"{cvm}: chain digest differs at seq {head.seq}")
        chain.acked_digest = expected
