"""The A-VM's system-call tracing of one C-VM, for the ``behaviour.trace`` check.

The tracer runs between rounds on its own thread and its own LibVMI handle
(rounds read memory at the same time); each event goes through the model's
enforcer at once, so nothing but violations is kept. A round takes the
violations seen since the last one; a process's violations are reported again
each round while it lives — a reverse shell stays a finding until it is gone.
"""

from __future__ import annotations

import threading
from pathlib import Path

from vims.trace.model import Enforcer, Model, Violation
from vims.trace.tracer import SyscallEvent, SyscallTracer, TraceError
from vims.vmi.memory import GuestMemory
from vims.vmi.profile import Profile

MAX_PENDING = 1000
# Per process: a shell that went off-model produces many unseen windows; they must not
# crowd out the calls and arguments that say what it did (exec, connect, open).
MAX_SEQUENCES_PER_PROCESS = 8
MAX_PER_PROCESS = 64


class TraceSession:
    def __init__(self, profile: Profile, ram: Path, gdb: Path, model: Model,
                 gate: bool = False) -> None:
        self.key = (model.digest, gate)
        self.enforcer = Enforcer(model)
        self.dropped = 0
        self._lock = threading.Lock()
        self._pending: list[Violation] = []
        self._open: dict[int, list[Violation]] = {}
        self.mem = GuestMemory(profile, path=ram)
        try:
            self.tracer = SyscallTracer(self.mem, gdb, self.enforcer.apps, self._on_event,
                                        gate=gate)
            self.tracer.start()
        except BaseException:
            self.mem.close()
            raise

    def _on_event(self, event: SyscallEvent) -> None:
        found = self.enforcer.feed(event)
        if found:
            with self._lock:
                room = MAX_PENDING - len(self._pending)
                self._pending.extend(found[:max(0, room)])
                self.dropped += max(0, len(found) - room)

    def take(self, live_tgids: set[int]) -> list[Violation]:
        """Violations to report this round: new ones, and those of processes still alive."""
        if not self.tracer.alive:
            raise TraceError(f"the tracer stopped: {self.tracer.error or 'detached'}")
        with self._lock:
            new, self._pending = self._pending, []
        for v in new:
            kept = self._open.setdefault(v.event.tgid, [])
            sequences = sum(k.kind == "sequence" for k in kept)
            if len(kept) < MAX_PER_PROCESS and (v.kind != "sequence"
                                                or sequences < MAX_SEQUENCES_PER_PROCESS):
                kept.append(v)
        out = [v for kept in self._open.values() for v in kept]
        self._open = {t: kept for t, kept in self._open.items() if t in live_tgids}
        return out

    def close(self) -> None:
        try:
            self.tracer.stop()
        finally:
            self.mem.close()
