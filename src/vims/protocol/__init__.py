"""The VIMS control channel between the A-VM agent and the REM-S.

A sans-IO core (:mod:`.core`: :class:`AvmConnection`, :class:`RemsConnection`)
over typed, strictly validated messages (:mod:`.messages`) in length-prefixed
frames (:mod:`.framing`), a thin asyncio adapter (:mod:`.transport`) and the
mTLS certificate authority (:mod:`.pki`). See docs/protocol.md.
"""

from vims.protocol.chain import ChainLedger, MemoryLedger, OutboxFull, ReportOutbox
from vims.protocol.core import (
    AvmConnection,
    RemsConnection,
    Role,
    State,
    VerificationResult,
)
from vims.protocol.messages import PROTOCOL_VERSION, PolicySpec

__all__ = [
    "PROTOCOL_VERSION",
    "AvmConnection",
    "ChainLedger",
    "MemoryLedger",
    "OutboxFull",
    "PolicySpec",
    "RemsConnection",
    "ReportOutbox",
    "Role",
    "State",
    "VerificationResult",
]
