"""IMA-style event log of what the A-VM agent measured into its PCR (pure Python).

The agent measures its own code, configuration, policy, profile and baseline
into :data:`AGENT_PCR` before it reports; the REM-S replays the log and checks
that the result equals the quoted PCR value and that every entry is golden.

Why PCR 23: the PC Client platform profile reserves PCR 23 for application
support and allows reset and extend from locality 0, so an unprivileged-TPM
agent can start from a known zero value on each agent (re)start without a
reboot. PCR 16 has the same properties but is the *debug* PCR. The price of a
resettable PCR is that anyone with TPM access in the A-VM could reset it and
replay a forged history; the REM-S therefore also requires the DRTM PCRs
(17/18) in the same quote, which bind the A-VM's measured launch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

AGENT_PCR = 23
_ZERO = b"\0" * 32


class EventLogError(Exception):
    """The event log was rejected; ``reason`` is a stable code."""

    reason: ClassVar[str] = "event-log-error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


class MalformedEventLog(EventLogError):
    """The log does not parse (bad JSON, bad digest, bad PCR index)."""

    reason = "malformed-event-log"


class ReplayMismatch(EventLogError):
    """Replaying the log does not give the quoted PCR value: log and TPM disagree."""

    reason = "replay-mismatch"


class NotGolden(EventLogError):
    """An entry's digest is not the reference value for its description."""

    reason = "not-golden"


@dataclass(frozen=True)
class EventLogEntry:
    """One measurement: sha256 ``digest`` (hex) extended into ``pcr``."""

    pcr: int
    digest: str
    type: str
    description: str

    def __post_init__(self) -> None:
        if not 0 <= self.pcr < 24:
            raise MalformedEventLog(f"PCR index {self.pcr} out of range")
        try:
            raw = bytes.fromhex(self.digest)
        except (ValueError, TypeError):
            raise MalformedEventLog(f"digest {self.digest!r} is not hex") from None
        if len(raw) != 32:
            raise MalformedEventLog(f"digest of {self.description!r} is not 32 bytes")


@dataclass
class EventLog:
    """Ordered measurements; order matters because PCR extension is not commutative."""

    entries: list[EventLogEntry] = field(default_factory=list)

    def add(self, data: bytes, type: str, description: str, pcr: int = AGENT_PCR) -> bytes:
        """Record SHA256(data); return the digest the caller must extend into ``pcr``."""
        digest = hashlib.sha256(data).digest()
        self.entries.append(EventLogEntry(pcr, digest.hex(), type, description))
        return digest

    def to_json(self) -> str:
        return json.dumps({"entries": [asdict(e) for e in self.entries]}, indent=1)

    @classmethod
    def from_json(cls, text: str | bytes) -> EventLog:
        try:
            doc: Any = json.loads(text)
            raw = doc["entries"]
            if not isinstance(raw, list):
                raise TypeError("entries is not a list")
            return cls(
                [
                    EventLogEntry(
                        int(e["pcr"]), str(e["digest"]), str(e["type"]), str(e["description"])
                    )
                    for e in raw
                ]
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise MalformedEventLog(f"event log JSON: {exc}") from None


def replay(
    log: EventLog,
    quoted_pcrs: Mapping[int, bytes],
    golden: Mapping[str, str] | None = None,
) -> dict[int, bytes]:
    """Replay ``log`` from zeroed PCRs and compare with the quoted values.

    ``quoted_pcrs`` must come from a *verified* quote. Every PCR the log
    touches must be quoted. With ``golden`` (description -> hex digest), each
    entry must match its reference value. Returns the replayed values.
    """
    if golden is not None:
        for e in log.entries:
            want = golden.get(e.description)
            if want is None or want.lower() != e.digest.lower():
                raise NotGolden(f"{e.description!r} digest {e.digest} is not the reference value")
    values: dict[int, bytes] = {}
    for e in log.entries:
        values[e.pcr] = hashlib.sha256(values.get(e.pcr, _ZERO) + bytes.fromhex(e.digest)).digest()
    for pcr, value in values.items():
        if pcr not in quoted_pcrs:
            raise ReplayMismatch(f"log extends PCR {pcr} but the quote does not cover it")
        if quoted_pcrs[pcr] != value:
            raise ReplayMismatch(
                f"PCR {pcr}: log replays to {value.hex()}, quote has {quoted_pcrs[pcr].hex()}"
            )
    return values
