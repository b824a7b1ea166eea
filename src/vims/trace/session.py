"""The A-VM's system-call tracing of one C-VM, for the ``behaviour.trace`` check.

The tracer runs between rounds on its own thread and its own LibVMI handle
(rounds read memory at the same time); each event goes through the model's
enforcer at once, so nothing but violations is kept. A round takes the
violations seen since the last one; a process's violations are reported again
each round while it lives — a reverse shell stays a finding until it is gone.

Tracing costs the guest dearly (see the README's figures), so a policy can
bound it in time: with ``duty`` < 1 the tracer is attached for ``duty`` of every
``period_s`` and detached otherwise. Which processes belong to an application
is remembered across windows, so a shell started by the server between two
windows is still judged as the server's.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vims.trace.model import Enforcer, Model, Violation
from vims.trace.tracer import SyscallEvent, SyscallTracer, TraceError, TraceStats
from vims.vmi.memory import GuestMemory
from vims.vmi.profile import Profile

MAX_PENDING = 1000
# Per process: a shell that went off-model produces many unseen windows; they must not
# crowd out the calls and arguments that say what it did (exec, connect, open).
MAX_SEQUENCES_PER_PROCESS = 8
MAX_PER_PROCESS = 64


def trace_settings(params: dict[str, Any]) -> tuple[bool, float, float]:
    """(gate, duty, period_s) from a policy's check params, validated."""
    try:
        gate = bool(params.get("gate", False))
        duty = float(params.get("duty", 1.0))
        period = float(params.get("period_s", 10.0))
    except (TypeError, ValueError) as exc:
        raise TraceError(f"bad tracing parameters: {exc}") from exc
    if not 0.01 <= duty <= 1.0:
        raise TraceError(f"duty must be within 0.01..1, not {duty}")
    if not 1.0 <= period <= 3600.0:
        raise TraceError(f"period_s must be within 1..3600, not {period}")
    return gate, duty, period


class TraceSession:
    def __init__(self, profile: Profile, ram: Path, gdb: Path, model: Model,
                 gate: bool = False, duty: float = 1.0, period_s: float = 10.0,
                 lock: threading.Lock | None = None) -> None:
        self.key = (model.digest, gate, duty, period_s)
        self.enforcer = Enforcer(model)
        self.gdb, self.gate, self.duty, self.period_s = gdb, gate, duty, period_s
        self.dropped = 0
        self.stats = TraceStats()  # of the windows that ended
        self.error: str | None = None
        self.tracer: SyscallTracer | None = None
        # Held while attaching or detaching; the A-VM holds it for a whole round, so a
        # round never sees the tracer come or go under it.
        self.lock = lock or threading.Lock()
        self._found_lock = threading.Lock()
        self._pending: list[Violation] = []
        self._open: dict[int, list[Violation]] = {}
        self._tracked: OrderedDict[tuple[int, int], str] = OrderedDict()
        self._stop = threading.Event()
        self._cycle_thread: threading.Thread | None = None
        self.mem = GuestMemory(profile, path=ram)
        try:
            if duty >= 1.0:
                self._attach()
            else:
                self._cycle_thread = threading.Thread(target=self._cycle, daemon=True,
                                                      name="vims-trace-cycle")
                self._cycle_thread.start()
        except BaseException:
            self.mem.close()
            raise

    # ------------------------------------------------------------- windows
    def _attach(self) -> None:
        self.enforcer.gap()
        tracer = SyscallTracer(self.mem, self.gdb, self.enforcer.apps, self._on_event,
                               gate=self.gate, tracked=self._tracked)
        tracer.start()
        self.tracer = tracer

    def _detach(self) -> None:
        tracer, self.tracer = self.tracer, None
        if tracer is not None:
            stats = tracer.stop()
            for name, value in stats.__dict__.items():
                setattr(self.stats, name, getattr(self.stats, name) + value)

    def _locked(self, action: Callable[[], None]) -> bool:
        """Run ``action`` between rounds; False once the session is closing."""
        while not self._stop.is_set():
            if self.lock.acquire(timeout=0.2):
                try:
                    if self._stop.is_set():
                        return False
                    action()
                    return True
                finally:
                    self.lock.release()
        return False

    def _cycle(self) -> None:
        window = self.duty * self.period_s
        try:
            while (self._locked(self._attach) and not self._stop.wait(window)
                   and self._locked(self._detach)
                   and not self._stop.wait(self.period_s - window)):
                pass
        except Exception as exc:  # noqa: BLE001 - reported by take() and the check
            self.error = str(exc)

    @property
    def attached(self) -> bool:
        return self.tracer is not None and self.tracer.alive

    @property
    def healthy(self) -> bool:
        if self.error is not None:
            return False
        if self._cycle_thread is not None:
            return self._cycle_thread.is_alive() and (self.tracer is None
                                                      or self.tracer.error is None)
        return self.attached

    # ---------------------------------------------------------- violations
    def _on_event(self, event: SyscallEvent) -> None:
        found = self.enforcer.feed(event)
        if found:
            with self._found_lock:
                room = MAX_PENDING - len(self._pending)
                self._pending.extend(found[:max(0, room)])
                self.dropped += max(0, len(found) - room)

    def take(self, live_tgids: set[int]) -> list[Violation]:
        """Violations to report this round: new ones, and those of processes still alive."""
        if not self.healthy:
            why = self.error or (self.tracer.error if self.tracer else None) or "detached"
            raise TraceError(f"the tracer stopped: {why}")
        with self._found_lock:
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
        """Detach for good (callable with ``lock`` held: the cycle never waits on it)."""
        self._stop.set()
        try:
            if self._cycle_thread is not None:
                self._cycle_thread.join(10)
            self._detach()
        finally:
            self.mem.close()
