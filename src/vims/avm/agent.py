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
from pathlib import Path
from typing import Any

from vims import baseline as baseline_mod
from vims.avm.config import AvmConfig, CvmConfig
from vims.avm.evidence import VtpmEvidence, agent_code_digest
from vims.checks import ALL_CHECKS
from vims.checks.cli import lab_pauser
from vims.checks.runner import run_round
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
from vims.vmi.memory import GuestMemory
from vims.vmi.profile import Profile

log = logging.getLogger("vims.avm")


class CvmTarget:
    """What the agent needs to check one C-VM, opened once."""

    def __init__(self, cfg: CvmConfig) -> None:
        self.cfg = cfg
        self.profile = Profile.load(cfg.profile)
        self.baseline = baseline_mod.load(cfg.baseline) if cfg.baseline else None
        self.policy: dict[str, Any] = json.loads(cfg.policy.read_text()) if cfg.policy else {}
        self.mem: GuestMemory | None = None
        self.lock = threading.Lock()  # one LibVMI user at a time, whatever the intervals
        self.history: dict[str, Any] = {}  # what checks remember between rounds

    def memory(self) -> GuestMemory:
        if self.mem is None:
            if self.cfg.memory is not None:
                self.mem = GuestMemory(self.profile, path=self.cfg.memory,
                                       pauser=lab_pauser(self.cfg.memory))
            else:
                self.mem = GuestMemory(self.profile, domain=self.cfg.domain)
        return self.mem

    def check(self, ids: list[str]) -> dict[str, Any]:
        target = {"cvm": self.cfg.name}
        target.update({"memory": str(self.cfg.memory)} if self.cfg.memory else
                      {"domain": str(self.cfg.domain)})
        try:
            with self.lock:
                return run_round(self.memory(), ids, self.baseline, self.policy, "auto", target,
                                 self.history)
        except Exception as exc:  # noqa: BLE001 - a C-VM we cannot read is reported, not fatal
            self.mem = None
            return {"result": "error", "error": str(exc), "checks": [], "findings": [],
                    "target": target, "processes": [], "modules": []}


class Agent:
    def __init__(self, config: AvmConfig) -> None:
        self.config = config
        self.targets = {c.name: CvmTarget(c) for c in config.cvms}
        self.outbox = ReportOutbox()
        self.vtpm = VtpmEvidence(config.tpm_tcti)
        self.vtpm.measure_launch(self._launch_items())
        self._tasks: list[asyncio.Task[None]] = []
        self._rounds: set[asyncio.Task[None]] = set()  # on-demand rounds survive policy updates
        self._attested = False  # this connection got through the handshake

    def _launch_items(self) -> list[tuple[str, str, bytes]]:
        items = [("agent-code", "vims runtime sources", agent_code_digest()),
                 ("agent-config", "agent configuration",
                  self.config.model_dump_json().encode())]
        for c in self.config.cvms:
            for kind, path in (("profile", c.profile), ("baseline", c.baseline),
                               ("local-policy", c.policy)):
                if path is not None:
                    items.append((kind, f"{c.name}: {Path(path).name}", Path(path).read_bytes()))
        return items

    def _connection(self) -> AvmConnection:
        return AvmConnection(
            avm_id=self.config.avm_id, cvms=list(self.targets),
            capabilities=Capabilities(checks=list(ALL_CHECKS),
                                      backends=["file", "xen"]),
            make_evidence=self.vtpm.make_evidence, quote_report=self.vtpm.quote_report,
            outbox=self.outbox)

    def _schedule(self, session: Session, policy: PolicySpec) -> None:
        """One task per C-VM and interval: checks with equal intervals share a round."""
        self._cancel()
        for name, target in self.targets.items():
            by_interval: dict[float, list[str]] = defaultdict(list)
            for spec in policy.checks:
                if spec.id in ALL_CHECKS and spec.applies_to(name):
                    by_interval[spec.interval_s].append(spec.id)
            for interval, ids in by_interval.items():
                self._tasks.append(asyncio.create_task(
                    self._check_loop(session, target, interval, ids)))

    def _cancel(self, rounds: bool = False) -> None:
        for task in [*self._tasks, *(self._rounds if rounds else ())]:
            task.cancel()
        self._tasks.clear()

    async def _check_loop(self, session: Session, target: CvmTarget, interval: float,
                          ids: list[str]) -> None:
        while True:
            start = time.monotonic()
            report = await asyncio.to_thread(target.check, ids)
            try:
                session.send_report(target.cfg.name, report)
            except OutboxFull:
                log.error("REM-S is not acknowledging: outbox full for %s", target.cfg.name)
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - start)))

    async def _requested_round(self, session: Session, event: RoundRequested) -> None:
        """A round the REM-S asked for: every check of the policy, answered at once."""
        policy = session.conn.policy
        ids = sorted({c.id for c in policy.checks if c.id in ALL_CHECKS
                      and c.applies_to(event.cvm)}) if policy else list(ALL_CHECKS)
        report = await asyncio.to_thread(self.targets[event.cvm].check, ids)
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
            if t.mem is not None:
                with contextlib.suppress(Exception):
                    t.mem.close()
        self.vtpm.close()
