"""The A-VM's vTPM evidence: its measured launch and its quotes.

At start the agent measures what decides its behaviour — its own code, its
configuration, and each C-VM's profile, baseline and local policy — into PCR 23
with an event log (IMA-style). The handshake quote covers PCR 17 (the DRTM /
tboot launch measurement) and PCR 23, so the REM-S can replay the log against
the quoted value and its golden digests; report quotes bind each report to the
vTPM through their qualifying data.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import vims
from vims.avm.config import AvmConfig
from vims.errors import VimsError
from vims.protocol.messages import EventLogEntry, Evidence, Quote
from vims.tpm.eventlog import AGENT_PCR, EventLog

LAUNCH_PCR = 17
QUOTED_PCRS = [LAUNCH_PCR, AGENT_PCR]


def agent_code_digest() -> bytes:
    """SHA-256 over the runtime's Python sources, in a stable order."""
    root = Path(vims.__file__).parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        h.update(path.read_bytes())
    return h.digest()


def launch_items(config: AvmConfig) -> list[tuple[str, str, bytes]]:
    """What the agent measures into PCR 23 at start, as (kind, subject, data).

    The subject is the A-VM for its code and configuration and the C-VM for its
    profile, baseline and local policy: the REM-S compares each event with the
    digest the operator approved for that (kind, subject).
    """
    items = [("agent-code", config.avm_id, agent_code_digest()),
             ("agent-config", config.avm_id, config.model_dump_json().encode())]
    for c in config.cvms:
        for kind, path in (("profile", c.profile), ("baseline", c.baseline),
                           ("local-policy", c.policy)):
            if path is None:
                continue
            try:
                items.append((kind, c.name, Path(path).read_bytes()))
            except OSError as exc:
                raise VimsError(f"C-VM {c.name}: {kind} {path}: {exc.strerror}") from exc
    return items


def measurements(config: AvmConfig) -> list[dict[str, str]]:
    """The PCR 23 events the agent will log (what ``vims avm measure`` prints)."""
    return [{"kind": kind, "subject": subject, "digest": hashlib.sha256(data).hexdigest(),
             "scope": "avm" if kind.startswith("agent-") else "cvm"}
            for kind, subject, data in launch_items(config)]


class VtpmEvidence:
    """Measured launch + quotes through one attester (swtpm in the lab, /dev/tpmrm0 else)."""

    def __init__(self, tcti: str) -> None:
        # tpm2-pytss only where a TPM is used, not for `vims avm measure`.
        from vims.tpm.attester import Attester

        self.attester = Attester(tcti)
        self.attester.create_ak()
        self.log = EventLog()

    def measure_launch(self, items: list[tuple[str, str, bytes]]) -> None:
        """Reset PCR 23 and extend it with (type, description, data) items, logged."""
        self.attester.pcr_reset(AGENT_PCR)
        self.log = EventLog()
        for kind, description, data in items:
            digest = self.log.add(data, kind, description)
            self.attester.extend(AGENT_PCR, digest)

    def _quote(self, qualifying_data: bytes) -> Quote:
        q = self.attester.quote(qualifying_data, QUOTED_PCRS)
        return Quote(attest_b64=base64.b64encode(q.attest).decode(),
                     signature_b64=base64.b64encode(q.signature).decode(),
                     pcrs={"sha256": {str(i): v.hex() for i, v in q.pcr_values.items()}})

    def make_evidence(self, nonce: bytes) -> Evidence:
        return Evidence(
            quote=self._quote(nonce),
            event_log=[EventLogEntry(pcr=e.pcr, digest=e.digest, type=e.type,
                                     description=e.description[:128])
                       for e in self.log.entries],
            ak_name=self.attester.ak_name.hex(),
        )

    def quote_report(self, qualifying_data: bytes) -> Quote:
        return self._quote(qualifying_data)

    def close(self) -> None:
        self.attester.close()
