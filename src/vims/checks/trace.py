"""behaviour.trace: system calls of selected applications against a learned model.

The REM-S policy selects the check and names the model by digest
(``params: {"model": "sha256:..."}``; ``"gate": true`` arms the system-call
breakpoint only while a monitored process runs). The A-VM traces the C-VM
between rounds (:mod:`vims.trace.session`); each round reports the
violations seen since the last one, and again while the offending process lives.
"""

from __future__ import annotations

from typing import Any, ClassVar

from vims.checks.base import Category, Check, CheckError, Context, Finding, Severity
from vims.trace.model import Violation

__all__ = ["TraceCheck"]

KIND_SEVERITY = {"exec": Severity.CRITICAL, "connect": Severity.CRITICAL,
                 "bind": Severity.HIGH, "open": Severity.HIGH, "syscall": Severity.HIGH,
                 "sequence": Severity.MEDIUM}


class TraceCheck(Check):
    id: ClassVar[str] = "behaviour.trace"
    description: ClassVar[str] = (
        "Applications make only the system calls, sequences and arguments their model allows.")
    severity = Severity.HIGH
    category = Category.RUNTIME_OPAQUE
    default = False
    once_per_round = True  # the violations are taken from the tracer once per round

    def run(self, ctx: Context) -> list[Finding]:
        if ctx.tracing is None:
            raise CheckError("needs the A-VM's tracer: a C-VM with a gdbstub (gdb in the agent "
                             "config) and a model named in the REM-S policy")
        live = {t.tgid for t in ctx.tasks if t.pid == t.tgid}
        return [self._finding(v) for v in ctx.tracing.take(live)]

    def _finding(self, v: Violation) -> Finding:
        evidence: dict[str, Any] = v.public()
        return self.finding(v.summary(), KIND_SEVERITY.get(v.kind, self.severity), **evidence)
