"""Consistency checks on a C-VM, one module per family; ids are stable."""

from vims.checks.base import Category, Check, CheckResult, Context, Finding, Severity, Status
from vims.checks.behaviour import (
    ChildrenCheck,
    CredsChangeCheck,
    FilesCheck,
    MemoryCheck,
    SocketsCheck,
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
    CredsCheck,
    HiddenProcessCheck,
)

ALL_CHECKS: dict[str, type[Check]] = {
    c.id: c
    for c in (KernelTextCheck, SyscallTableCheck, IdtCheck, ModulesCheck, HiddenModulesCheck,
              HiddenProcessCheck, CodeCheck, AllowlistCheck, CredsCheck,
              ChildrenCheck, FilesCheck, SocketsCheck, MemoryCheck, CredsChangeCheck)
}

__all__ = ["ALL_CHECKS", "Category", "Check", "CheckResult", "Context", "Finding", "Severity",
           "Status"]
