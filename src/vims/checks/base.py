"""The check framework: stable ids, findings with evidence, per-check status.

A check never raises on bad guest data: the runner turns walker and memory
errors into an ``error`` status with the reason, so a corrupted or tampered
structure can neither crash the A-VM nor pass silently.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

from vims.vmi.cpu import VcpuState
from vims.vmi.linux import KernelView, Linux, Module, Task
from vims.vmi.memory import GuestMemory


class Severity(StrEnum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"


class Category(StrEnum):
    """AR4SI trust-vector categories (draft-ietf-rats-ar4si)."""

    INSTANCE_IDENTITY = "instance-identity"
    CONFIGURATION = "configuration"
    EXECUTABLES = "executables"
    FILE_SYSTEM = "file-system"
    HARDWARE = "hardware"
    RUNTIME_OPAQUE = "runtime-opaque"
    STORAGE_OPAQUE = "storage-opaque"
    SOURCED_DATA = "sourced-data"


class Status(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    ERROR = "error"
    # The check cannot say anything about this kind of guest (e.g. the IDT of a
    # Xen PV domain, whose real trap table lives in Xen): reported, never a pass.
    NOT_APPLICABLE = "not_applicable"


@dataclass(frozen=True)
class Finding:
    """One violation, with the evidence an analyst needs to confirm it."""

    check: str
    severity: Severity
    summary: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def key(self) -> tuple[str, str]:
        return (self.check, self.summary)

    def public(self) -> dict[str, Any]:
        return {"check": self.check, "severity": str(self.severity), "summary": self.summary,
                "evidence": self.evidence}


@dataclass
class CheckResult:
    id: str
    status: Status
    duration_ms: float
    findings: list[Finding] = field(default_factory=list)
    error: str | None = None


class CheckError(Exception):
    """A check cannot run (missing baseline or policy input), said in one line."""


class NotApplicable(CheckError):
    """The check does not apply to this guest; the message says why."""


class Context:
    """What checks share in one round: memory, walkers, baseline, policy, cached views."""

    def __init__(self, mem: GuestMemory, baseline: dict[str, Any] | None = None,
                 policy: dict[str, Any] | None = None,
                 history: dict[str, Any] | None = None,
                 params: dict[str, dict[str, Any]] | None = None,
                 tracing: Any = None) -> None:
        self.mem = mem
        # Per-check parameters from the REM-S policy (check id -> params).
        self.params: dict[str, dict[str, Any]] = params or {}
        # The A-VM's system-call tracing for this C-VM (vims.trace.session), if any.
        self.tracing = tracing
        # What a check computes once per round, kept across a retried round's attempts.
        self.memo: dict[str, Any] = {}
        # What checks remember between rounds of one C-VM (the A-VM keeps it per C-VM;
        # a single `vims check` starts empty): state over time, e.g. credentials. Checks
        # read it and put their new state in ``updates``, which the runner commits once
        # per round (a retried round must compare with the previous round, not itself).
        self.history: dict[str, Any] = history if history is not None else {}
        self.updates: dict[str, Any] = {}
        self.linux = Linux(mem)
        self.profile = mem.profile
        self.baseline = baseline
        self.policy = policy or {}
        self._view: KernelView | None = None

    @property
    def view(self) -> KernelView:
        """Task and module lists, walked once per round and shared by all checks."""
        if self._view is None:
            self._view = KernelView(tasks=self.linux.tasks(with_threads=True),
                                    modules=self.linux.modules())
        return self._view

    @property
    def tasks(self) -> list[Task]:
        return self.view.tasks

    @property
    def processes(self) -> list[Task]:
        """User processes: thread-group leaders with an address space (no kernel
        threads, no process past exit_mm)."""
        return [t for t in self.tasks if t.mm and t.pid == t.tgid]

    @property
    def modules(self) -> list[Module]:
        return self.view.modules

    def vcpus(self) -> list[VcpuState] | None:
        """The vCPUs' control state, asked of the hypervisor once per round."""
        if "vcpus" not in self.memo:
            self.memo["vcpus"] = self.mem.vcpus()
        found: list[VcpuState] | None = self.memo["vcpus"]
        return found

    def idtr_bases(self) -> list[tuple[int, int]]:
        """``(cpu, IDTR base)`` of each vCPU whose IDTR the hypervisor gives; none when
        the vCPU state cannot be read (cpu.state reports that; the tables in memory
        are still judged by the checks that ask)."""
        from vims.vmi.memory import GuestMemoryError

        try:
            vcpus = self.vcpus() or []
        except GuestMemoryError:
            return []
        return [(v.cpu, v.idtr_base) for v in vcpus if v.idtr_base is not None]

    def need_baseline(self, section: str) -> Any:
        if self.baseline is None or section not in self.baseline:
            raise CheckError(f"needs a baseline with '{section}' (vims baseline build)")
        return self.baseline[section]

    def reset(self) -> None:
        self._view = None


class Check(ABC):
    """One consistency check on the guest."""

    id: ClassVar[str]
    description: ClassVar[str]
    severity: ClassVar[Severity]
    category: ClassVar[Category]
    default: ClassVar[bool] = True  # part of "all checks" when none are named
    # Walks linked, changing structures: a paused round runs it with the guest stopped.
    # Checks of memory that does not move (kernel text, tables) run after the pause.
    needs_pause: ClassVar[bool] = True
    # Its run consumes something (a window of events, the tracer's violations): a
    # retried round's later attempts reuse the first attempt's findings.
    once_per_round: ClassVar[bool] = False

    @abstractmethod
    def run(self, ctx: Context) -> list[Finding]:
        """Inspect the guest; return findings (empty = pass)."""

    def finding(self, summary: str, severity: Severity | None = None,
                **evidence: Any) -> Finding:
        return Finding(self.id, severity or self.severity, summary, evidence)

    def execute(self, ctx: Context) -> CheckResult:
        start = time.perf_counter()
        try:
            kept: list[Finding] | None = ctx.memo.get(self.id) if self.once_per_round else None
            findings = kept if kept is not None else self.run(ctx)
            if self.once_per_round:
                ctx.memo[self.id] = findings
            status = Status.FAIL if findings else Status.PASS
            error = None
        except NotApplicable as exc:
            findings, status, error = [], Status.NOT_APPLICABLE, str(exc)
        except Exception as exc:  # noqa: BLE001 - guest data is hostile: never crash
            findings, status = [], Status.ERROR
            error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, CheckError) else str(exc)
        return CheckResult(self.id, status, round((time.perf_counter() - start) * 1000, 3),
                           findings, error)
