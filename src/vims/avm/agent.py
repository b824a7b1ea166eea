"""``vims avm run``: the A-VM agent.

Connects to the REM-S over mutual TLS, proves its launch with a vTPM quote,
receives the policy, then runs the policy's checks on each C-VM at the
policy's intervals and streams the reports (hash-chained, quoted every N).
Reports not yet acknowledged survive a lost connection in the outbox and are
resent on reconnect; a REM-S restart only delays them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vims import baseline as baseline_mod
from vims.avm.config import AvmConfig, CvmConfig
from vims.avm.evidence import VtpmEvidence, launch_items
from vims.checks import ALL_CHECKS, DEFAULT_CHECKS
from vims.checks.base import CheckError
from vims.checks.cli import lab_pauser, lab_vcpus
from vims.checks.runner import run_round
from vims.checks.trace import TraceCheck
from vims.errors import VimsError
from vims.protocol.chain import OutboxFull, ReportOutbox
from vims.protocol.core import AvmConnection
from vims.protocol.events import (
    ConnectionClosed,
    Event,
    PolicyReceived,
    ProtocolError,
    RoundRequested,
)
from vims.protocol.messages import Capabilities, PolicySpec
from vims.protocol.pki import client_context
from vims.protocol.transport import Session, connect
from vims.trace.model import ModelError, find_model, normalise_digest
from vims.trace.session import TraceSession, trace_settings
from vims.vmi.memory import GuestMemory
from vims.vmi.profile import Profile

log = logging.getLogger("vims.avm")


class CvmTarget:
    """What the agent needs to check one C-VM, opened once."""

    def __init__(self, cfg: CvmConfig, models_dir: Path | None = None) -> None:
        self.cfg = cfg
        self.models_dir = models_dir
        self.profile = Profile.load(cfg.profile)
        self.baseline = baseline_mod.load(cfg.baseline) if cfg.baseline else None
        self.policy: dict[str, Any] = json.loads(cfg.policy.read_text()) if cfg.policy else {}
        self.mem: GuestMemory | None = None
        self.lock = threading.Lock()  # one LibVMI user at a time, whatever the intervals
        self.history: dict[str, Any] = {}  # what checks remember between rounds
        self.trace_params: dict[str, Any] | None = None  # what the policy asks to trace
        self.trace: TraceSession | None = None
        self.trace_error: str | None = None
        self._lab_pause: Callable[[], contextlib.AbstractContextManager[object]] | None = None

    def _pause(self) -> contextlib.AbstractContextManager[object]:
        # While traced, the gdbstub owns the VM's run state: QMP stop/cont would race it.
        if self.trace is not None and self.trace.tracer is not None and self.trace.attached:
            return self.trace.tracer.paused()
        assert self._lab_pause is not None
        return self._lab_pause()

    def memory(self) -> GuestMemory:
        if self.mem is None:
            if self.cfg.memory is not None:
                self._lab_pause = lab_pauser(self.cfg.memory)  # None: a snapshot, no lab
                self.mem = GuestMemory(self.profile, path=self.cfg.memory,
                                       pauser=self._pause if self._lab_pause else None,
                                       vcpus=lab_vcpus(self.cfg.memory))
            else:
                self.mem = GuestMemory(self.profile, domain=self.cfg.domain)
        return self.mem

    def _sync_tracing(self) -> None:
        """Start, restart or stop the tracer to match the policy (outside any round)."""
        want = self.trace_params
        key = None
        if want is not None:
            key = (normalise_digest(str(want.get("model", ""))), *trace_settings(want))
        if self.trace is not None and (key is None or self.trace.key != key
                                       or not self.trace.healthy):
            with contextlib.suppress(Exception):
                self.trace.close()
            self.trace = None
        if key is None or self.trace is not None:
            return
        if self.cfg.gdb is None or self.cfg.memory is None:
            raise ModelError(f"C-VM {self.cfg.name} has no gdbstub (gdb in the agent config): "
                             "it cannot be traced")
        if self.models_dir is None:
            raise ModelError("the agent config names no models_dir")
        model = find_model(self.models_dir, key[0])
        self.trace = TraceSession(self.profile, self.cfg.memory, self.cfg.gdb, model, *key[1:],
                                  lock=self.lock)
        log.info("tracing %s on %s with model %s", ", ".join(model.apps), self.cfg.name,
                 model.digest)

    def check(self, ids: list[str], params: dict[str, dict[str, Any]] | None = None
              ) -> dict[str, Any]:
        target = {"cvm": self.cfg.name}
        target.update({"memory": str(self.cfg.memory)} if self.cfg.memory else
                      {"domain": str(self.cfg.domain)})
        try:
            with self.lock:
                tracing: TraceSession | _Broken | None = None
                if TraceCheck.id in ids:
                    try:
                        self._sync_tracing()
                        tracing, self.trace_error = self.trace, None
                    except VimsError as exc:  # the check reports it; the other checks run
                        self.trace_error = str(exc)
                        tracing = _Broken(str(exc))
                return run_round(self.memory(), ids, self.baseline, self.policy, "auto", target,
                                 self.history, params, tracing)
        except Exception as exc:  # noqa: BLE001 - a C-VM we cannot read is reported, not fatal
            self.mem = None
            # Each check of the round is reported as failed to run, so the REM-S judges
            # them now (error tier) instead of only when their results go stale.
            error = f"{type(exc).__name__}: {exc}"[:1000]
            return {"result": "error", "error": error, "findings": [], "target": target,
                    "processes": [], "modules": [],
                    "checks": [{"id": cid, "status": "error", "error": error, "findings": 0,
                                "duration_ms": 0.0, "severity": str(ALL_CHECKS[cid].severity),
                                "category": str(ALL_CHECKS[cid].category)}
                               for cid in dict.fromkeys(ids) if cid in ALL_CHECKS]}

    def close(self) -> None:
        with self.lock:
            self.trace_params = None
            if self.trace is not None:
                with contextlib.suppress(Exception):
                    self.trace.close()
                self.trace = None
            if self.mem is not None:
                with contextlib.suppress(Exception):
                    self.mem.close()
                self.mem = None


class _Broken:
    """Tracing the policy asked for but cannot have: behaviour.trace reports why."""

    def __init__(self, why: str) -> None:
        self.why = why

    def take(self, live_tgids: set[int]) -> list[Any]:
        raise CheckError(self.why)


def _log_crash(task: asyncio.Task[None]) -> None:
    """A check loop must not die silently: the C-VM would just go stale."""
    if not task.cancelled() and task.exception() is not None:
        log.error("check loop stopped: %r", task.exception(), exc_info=task.exception())


class Agent:
    def __init__(self, config: AvmConfig) -> None:
        self.config = config
        self.targets = {c.name: CvmTarget(c, config.models_dir) for c in config.cvms}
        self.outbox = ReportOutbox()
        self.vtpm = VtpmEvidence(config.tpm_tcti)
        self.vtpm.measure_launch(self._launch_items())
        self._tasks: list[asyncio.Task[None]] = []
        self._rounds: set[asyncio.Task[None]] = set()  # on-demand rounds survive policy updates
        self._attested = False  # this connection got through the handshake

    def _launch_items(self) -> list[tuple[str, str, bytes]]:
        return launch_items(self.config)

    def _connection(self) -> AvmConnection:
        return AvmConnection(
            avm_id=self.config.avm_id, cvms=list(self.targets),
            capabilities=Capabilities(checks=[c for c in ALL_CHECKS
                                              if c not in self.config.skip_checks],
                                      backends=["file", "xen"]),
            make_evidence=self.vtpm.make_evidence, quote_report=self.vtpm.quote_report,
            outbox=self.outbox)

    def _schedule(self, session: Session, policy: PolicySpec) -> None:
        """One task per C-VM and interval: checks with equal intervals share a round."""
        self._cancel()
        for name, target in self.targets.items():
            by_interval: dict[float, list[str]] = defaultdict(list)
            params: dict[str, dict[str, Any]] = {}
            for spec in policy.checks:
                if spec.id in ALL_CHECKS and spec.applies_to(name) \
                        and spec.id not in self.config.skip_checks:
                    by_interval[spec.interval_s].append(spec.id)
                    params[spec.id] = dict(spec.params)
            target.trace_params = params.get(TraceCheck.id)
            for interval, ids in by_interval.items():
                task = asyncio.create_task(
                    self._check_loop(session, target, interval, ids, params))
                task.add_done_callback(_log_crash)
                self._tasks.append(task)

    def _cancel(self, rounds: bool = False) -> None:
        for task in [*self._tasks, *(self._rounds if rounds else ())]:
            task.cancel()
        self._tasks.clear()

    async def _check_loop(self, session: Session, target: CvmTarget, interval: float,
                          ids: list[str], params: dict[str, dict[str, Any]]) -> None:
        while True:
            start = time.monotonic()
            report = await asyncio.to_thread(target.check, ids, params)
            try:
                session.send_report(target.cfg.name, report)
            except OutboxFull:
                log.error("REM-S is not acknowledging: outbox full for %s", target.cfg.name)
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - start)))

    async def _requested_round(self, session: Session, event: RoundRequested) -> None:
        """A round the REM-S asked for: every check of the policy, answered at once."""
        policy = session.conn.policy
        specs = [c for c in policy.checks if c.id in ALL_CHECKS and c.applies_to(event.cvm)
                 and c.id not in self.config.skip_checks] if policy else []
        ids = sorted({c.id for c in specs}) if policy else list(DEFAULT_CHECKS)
        params = {c.id: dict(c.params) for c in specs}
        report = await asyncio.to_thread(self.targets[event.cvm].check, ids, params)
        try:
            session.send_report(event.cvm, report, event.request_id)
        except (OutboxFull, ValueError) as exc:
            log.error("cannot answer round request %s: %s", event.request_id, exc)

    def _on_event(self, session: Session, event: Event) -> None:
        if isinstance(event, PolicyReceived):
            self._attested = True
            log.info("policy %s v%s received", event.policy.policy_id, event.policy.version)
            self._schedule(session, event.policy)
        elif isinstance(event, RoundRequested):
            log.info("round requested for %s (%s)", event.cvm, event.request_id)
            task = asyncio.create_task(self._requested_round(session, event))
            self._rounds.add(task)
            task.add_done_callback(self._rounds.discard)
        elif isinstance(event, ProtocolError):
            log.warning("protocol error %s: %s", event.code, event.message)
        elif isinstance(event, ConnectionClosed):
            self._cancel(rounds=True)

    async def run(self, stop: asyncio.Event | None = None) -> None:
        host, port = self.config.rems.rsplit(":", 1)
        ctx = client_context(self.config.cert, self.config.key, self.config.ca)
        delay = 0.2
        while stop is None or not stop.is_set():
            try:
                self._attested = False
                _session, task = await connect(host, int(port), ctx, self._connection(),
                                              self._on_event,
                                              server_hostname=self.config.rems_name)
                log.info("connected to REM-S %s", self.config.rems)
                await task
                if self._attested:  # back off from a REM-S that refuses us, not one that ran
                    delay = 0.2
            except (TimeoutError, OSError) as exc:
                log.warning("REM-S %s unreachable: %s", self.config.rems, exc)
            finally:
                self._cancel(rounds=True)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.config.reconnect_max_s)

    def close(self) -> None:
        self._cancel()
        for t in self.targets.values():
            t.close()
        self.vtpm.close()
