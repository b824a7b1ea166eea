"""Consistency checks on a C-VM, one module per family; ids are stable."""

from vims.checks.base import Category, Check, CheckResult, Context, Finding, Severity, Status
from vims.checks.behaviour import (
    ChildrenCheck,
    CredsChangeCheck,
    FilesCheck,
    MemoryCheck,
    SocketsCheck,
)
from vims.checks.hooks import (
    BpfCheck,
    CpuStateCheck,
    FtraceCheck,
    KernelDataCheck,
    KprobesCheck,
    NetfilterCheck,
)
from vims.checks.kernel import (
    HiddenModulesCheck,
    IdtCheck,
    KernelTextCheck,
    ModulesCheck,
    SyscallTableCheck,
)
from vims.checks.process import (
    AllowlistCheck,
    CodeCheck,
    Cr3ViewCheck,
    CredsCheck,
    FilelessCheck,
    HiddenProcessCheck,
)
from vims.checks.trace import TraceCheck

ALL_CHECKS: dict[str, type[Check]] = {
    c.id: c
    for c in (KernelTextCheck, SyscallTableCheck, IdtCheck, ModulesCheck, HiddenModulesCheck,
              FtraceCheck, KprobesCheck, BpfCheck, NetfilterCheck, KernelDataCheck, CpuStateCheck,
              HiddenProcessCheck, CodeCheck, FilelessCheck, AllowlistCheck, CredsCheck,
              ChildrenCheck, FilesCheck, SocketsCheck, MemoryCheck, CredsChangeCheck,
              TraceCheck, Cr3ViewCheck)
}
# What "every check" means when none are named: those that need no more than memory.
# behaviour.trace needs the A-VM's tracer and a model, process.address_spaces a window of
# hypervisor events each round: a policy must select them.
DEFAULT_CHECKS: list[str] = [cid for cid, c in ALL_CHECKS.items() if c.default]

__all__ = ["ALL_CHECKS", "DEFAULT_CHECKS", "Category", "Check", "CheckResult", "Context",
           "Finding", "Severity", "Status"]
