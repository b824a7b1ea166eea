"""Appraisal of an A-VM's own evidence: its quotes' counters and its PCR 23 event log.

What the pure quote verifier (``vims.tpm.verifier``) proves is that a quote is
genuine and fresh. This module decides whether the REM-S may *believe* it:

- TPM counters: ``safe`` must be set; per AK, resetCount and restartCount never
  go down and the clock never goes back, across resets too: a TPM shut down in
  order (TPM2_Shutdown) keeps its clock running, and one that was not reports
  ``safe = 0`` (measured on swtpm 0.7.1: its clock falls back to the last value
  saved). A higher resetCount or restartCount is a TPM reset or restart
  (a reboot, a DRTM launch): accepted in a handshake (and recorded as such),
  never in the middle of a session, where it ends the session and needs a new
  handshake.
- The event log: every PCR 23 event must be a known kind, about this A-VM or one
  of the C-VMs it named, and carry the digest the operator approved for it
  (agent code and configuration per A-VM; profile, baseline and local policy
  per C-VM). Nothing may be missing: the agent's code and configuration and
  each C-VM's profile are always measured, and so is everything else the
  operator approved (a C-VM with an approved baseline is not believed from an
  A-VM that runs it without one). Without approvals nothing is believed,
  unless the REM-S runs ``insecure_lab``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from vims.errors import VimsError
from vims.rems.store import TpmCounters
from vims.tpm.eventlog import AGENT_PCR, EventLogEntry

AVM_KINDS = ("agent-code", "agent-config")
CVM_KINDS = ("profile", "baseline", "local-policy")
REQUIRED_CVM_KINDS = ("profile",)  # baseline, local-policy: when one is approved


class EvidenceRefused(VimsError):
    """The A-VM's evidence is genuine but not believable; ``code`` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class CounterStep:
    """How a quote's counters relate to the AK's previous ones."""

    reset: bool = False  # resetCount went up: the TPM was reset (a reboot)
    restart: bool = False  # restartCount went up: TPM2_Startup(STATE) after a shutdown


def counter_step(stored: TpmCounters | None, new: TpmCounters, safe: bool,
                 in_session: bool) -> CounterStep:
    """Accept or refuse a quote's counters (see module doc); raise :class:`EvidenceRefused`."""
    if not safe:
        raise EvidenceRefused("clock_unsafe", "the quote's clock is not safe (safe = 0): the "
                                              "TPM was not shut down in order and its clock "
                                              "may have gone back")
    if stored is None:
        return CounterStep()
    if new.reset_count < stored.reset_count:
        raise EvidenceRefused("counter_regression",
                              f"resetCount went back {stored.reset_count} -> {new.reset_count}: "
                              "an old quote, or another TPM")
    if new.reset_count == stored.reset_count and new.restart_count < stored.restart_count:
        raise EvidenceRefused("counter_regression",
                              f"restartCount went back {stored.restart_count} -> "
                              f"{new.restart_count}: an old quote, or another TPM")
    step = CounterStep(reset=new.reset_count > stored.reset_count,
                       restart=(new.reset_count == stored.reset_count
                                and new.restart_count > stored.restart_count))
    if new.clock < stored.clock:
        raise EvidenceRefused("counter_regression",
                              f"the TPM clock went back {stored.clock} -> {new.clock} ms")
    if in_session and (step.reset or step.restart):
        what = "reset" if step.reset else "restart"
        raise EvidenceRefused(f"tpm_{what}",
                              f"TPM {what} in the middle of a session (resetCount "
                              f"{stored.reset_count} -> {new.reset_count}, restartCount "
                              f"{stored.restart_count} -> {new.restart_count}): "
                              "a new handshake is needed")
    return step


def check_event_log(entries: Sequence[EventLogEntry], avm_id: str, cvms: Sequence[str],
                    references: Mapping[tuple[str, str, str], str],
                    insecure_lab: bool = False) -> list[str]:
    """Compare every PCR 23 event with its approved digest; returns notes on what was
    taken without a reference (``insecure_lab`` only). Raises :class:`EvidenceRefused`."""
    notes: list[str] = []
    seen: set[tuple[str, str, str]] = set()
    for e in entries:
        if e.pcr != AGENT_PCR:
            raise EvidenceRefused("event_log", f"event {e.type!r} extends PCR {e.pcr}, "
                                               f"not the agent's PCR {AGENT_PCR}")
        if e.type in AVM_KINDS:
            key = ("avm", e.description, e.type)
            if e.description != avm_id:
                raise EvidenceRefused("event_log", f"{e.type} event names {e.description!r}, "
                                                   f"not this A-VM {avm_id!r}")
        elif e.type in CVM_KINDS:
            key = ("cvm", e.description, e.type)
            if e.description not in cvms:
                raise EvidenceRefused("event_log", f"{e.type} event of C-VM {e.description!r}, "
                                                   "which the A-VM did not name")
        else:
            raise EvidenceRefused("event_log", f"unknown event type {e.type[:64]!r}")
        if key in seen:
            raise EvidenceRefused("event_log", f"{e.type} of {e.description} measured twice")
        seen.add(key)
        want = references.get(key)
        if want is None:
            if not insecure_lab:
                raise EvidenceRefused("no_reference", f"no approved {e.type} digest for "
                                                      f"{key[0].upper()}-VM {e.description}")
            notes.append(f"{e.type} of {e.description} taken without a reference (insecure_lab)")
        elif want.lower() != e.digest.lower():
            raise EvidenceRefused("not_approved", f"{e.type} of {e.description} is not the "
                                                  f"approved one (digest {e.digest[:16]}...)")
    required = [("avm", avm_id, k) for k in AVM_KINDS] + [
        ("cvm", cvm, k) for cvm in cvms for k in REQUIRED_CVM_KINDS]
    required += [key for key in references if key[0] == "cvm" and key[1] in cvms
                 and key[2] not in REQUIRED_CVM_KINDS]
    for key in required:
        if key not in seen:
            if insecure_lab and key not in references:
                notes.append(f"no {key[2]} measured for {key[1]} (insecure_lab)")
                continue
            raise EvidenceRefused("not_measured", f"the A-VM did not measure the {key[2]} of "
                                                  f"{key[1]}")
    return notes
