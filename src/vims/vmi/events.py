"""Hypervisor events through LibVMI: CR3 writes of a live Xen domain.

Every write to CR3 is an address-space switch, so counting them (and the
distinct page-table roots seen) shows which processes run without polling the
task list. Xen's monitor (vm_event) delivers it only for HVM and PVH domains:
on a PV domain the guest's page-table switches are hypercalls, and LibVMI's
registration fails. This is the mechanism the behaviour tracer builds on;
``measure_cr3`` also reports what the interception costs.

It needs dom0 (only dom0 may attach a monitor ring on Debian's Xen, which has
no XSM policy to grant it to another domain).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from vims.errors import VimsError

MAX_SECONDS = 600.0


class EventError(VimsError):
    """Events cannot be set up on this domain."""


class EventsNotDelivered(EventError):
    """The hypervisor does not deliver these events for this kind of domain (Xen PV)."""


@dataclass
class Cr3Stats:
    """What a CR3-write monitor saw in a time window."""

    domain: str
    seconds: float
    events: int = 0
    callback_seconds: float = 0.0  # time spent in our handler, all events together
    roots: Counter[int] = field(default_factory=Counter)
    interrupted: str | None = None  # the signal that ended the window early
    observer_errors: int = 0

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    def public(self) -> dict[str, Any]:
        top = self.roots.most_common(8)
        return {
            "domain": self.domain, "seconds": round(self.seconds, 3), "events": self.events,
            "events_per_second": round(self.events_per_second, 1),
            "distinct_roots": len(self.roots),
            "handler_us_per_event": round(self.callback_seconds / self.events * 1e6, 1)
            if self.events else None,
            "top_roots": [{"cr3": f"0x{cr3:x}", "writes": n} for cr3, n in top],
            "interrupted": self.interrupted, "observer_errors": self.observer_errors,
        }


MAX_DRAIN_ROUNDS = 1000


def _drain(vmi: Any) -> None:
    """Answer every request on the ring (bounded); a failure means an unanswered vCPU."""
    for _ in range(MAX_DRAIN_ROUNDS):
        if vmi.are_events_pending() <= 0:
            return
        vmi.listen(0)


def _detach(vmi: Any, event: Any, libvmi_error: type[Exception]) -> None:
    """Stop monitoring without leaving a vCPU behind.

    A vCPU that trapped on a CR3 write stays paused (Xen's ``vm_event_pause_count``;
    ``xl list`` shows neither ``p`` nor ``b``) until the monitor answers, and
    tearing the ring down does not release it. So: pause the domain (no new
    requests), answer what is queued *while the handler is still registered*, and
    only then clear the event. Clearing first was the old order, and the cause of
    a PVH domU hung for good in ``load_new_mm_cr3``: LibVMI consumes a request
    whose register handler is gone, fails it, and never posts the response
    (LibVMI's process_register; libvmi#899 and #573 say the same).
    If the domain cannot be paused, ``vmi.destroy()`` still pauses, drains and
    disables in this order itself.
    """
    try:
        vmi.pause_vm()
    except libvmi_error:
        return
    try:
        _drain(vmi)
        vmi.clear_event(event)
        _drain(vmi)
    finally:
        vmi.resume_vm()


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass
class Stop:
    """A request to end a listen loop early, and the signal that made it."""

    flag: threading.Event = field(default_factory=threading.Event)
    signal: str | None = None

    def set(self, why: str) -> None:
        self.signal = why
        self.flag.set()


@contextlib.contextmanager
def stop_on_signals() -> Iterator[Stop]:
    """While monitoring, SIGINT/SIGTERM/SIGHUP only ask the listen loop to end.

    Raising from the signal handler (Python's Ctrl-C) would most often land inside a
    LibVMI callback, where cffi prints and swallows it, and the monitor would run on;
    killed outright, it would leave its ring attached and a vCPU waiting on it. So the
    loop sees a flag, and the monitor detaches as at the end of its window; the
    signals stay caught until it has, so a second one cannot cut that short.
    """
    stop = Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop  # signals reach the main thread only: the caller stops us itself
        return

    def ask(signum: int, _frame: object) -> None:
        stop.set(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, ask) for sig in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def listen_until(vmi: Any, seconds: float, stop: Stop) -> float:
    """Deliver events for ``seconds`` or until ``stop``; the time actually listened."""
    start = time.monotonic()
    while not stop.flag.is_set():
        left = seconds - (time.monotonic() - start)
        if left <= 0:
            break
        vmi.listen(min(500, max(1, int(left * 1000))))
    return time.monotonic() - start


class Cr3Observer(Protocol):
    def switch(self, value: int, vcpu: int) -> None: ...


def measure_cr3(domain: str, seconds: float, mode: str = "xen",
                on_attached: Callable[[], None] | None = None,
                observer: Cr3Observer | None = None) -> Cr3Stats:
    """Count CR3 writes of ``domain`` for ``seconds`` (bounded) through a LibVMI register event.

    A SIGINT/SIGTERM/SIGHUP ends the window early (``interrupted`` names it), after
    which the monitor detaches as usual. ``on_attached`` runs once events flow;
    ``observer`` sees every write while its vCPU waits (keep it short).
    """
    if not 0 < seconds <= MAX_SECONDS:
        raise EventError(f"seconds {seconds} out of range (0-{MAX_SECONDS:.0f})")
    from libvmi import INIT_DOMAINNAME, INIT_EVENTS, Libvmi, LibvmiError, VMIMode, X86Reg
    from libvmi.event import EventResponse, RegAccess, RegEvent

    from vims.vmi.memory import _stdout_to_stderr

    vmi_mode = {"xen": VMIMode.XEN, "kvm": VMIMode.KVM}[mode]
    stats = Cr3Stats(domain=domain, seconds=seconds)

    def on_cr3(_vmi: object, event: RegEvent) -> EventResponse:
        t0 = time.perf_counter()
        stats.events += 1
        stats.roots[int(event.value) & ~0xFFF] += 1
        if observer is not None:
            try:
                observer.switch(int(event.value), int(event.vcpu_id))
            except Exception:  # noqa: BLE001 - cffi would swallow it; the write is counted
                stats.observer_errors += 1
        stats.callback_seconds += time.perf_counter() - t0
        return EventResponse.NONE

    with stop_on_signals() as stop:
        try:
            with _stdout_to_stderr():
                # partial: no OS look-ups; raw CR3 values need no profile.
                vmi = Libvmi(domain, INIT_DOMAINNAME | INIT_EVENTS, mode=vmi_mode, partial=True)
        except LibvmiError as exc:
            raise EventError(
                f"LibVMI could not attach events to domain {domain} ({exc}): events need "
                "dom0, a running domain, and its monitor ring free (Xen allows one monitor; "
                "the ring of one killed outright stays until the domain is recreated)"
            ) from exc
        event = RegEvent(X86Reg.CR3, RegAccess.W, on_cr3)
        try:
            try:
                vmi.register_event(event)
            except LibvmiError as exc:
                raise EventsNotDelivered(
                    f"cannot monitor CR3 writes of {domain} ({exc}): Xen delivers register "
                    "events for HVM/PVH domains only, not PV") from exc
            try:
                if on_attached is not None:
                    on_attached()
                stats.seconds = listen_until(vmi, seconds, stop)
            finally:
                stats.interrupted = stop.signal
                try:
                    _detach(vmi, event, LibvmiError)
                except LibvmiError as exc:
                    raise EventError(f"detaching the CR3 monitor from {domain} failed ({exc}): "
                                     "a vCPU may still wait for an answer") from exc
        finally:
            with contextlib.suppress(Exception), _stdout_to_stderr():
                vmi.destroy()
    return stats
