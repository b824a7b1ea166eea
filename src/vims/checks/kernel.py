"""Kernel integrity checks: text, syscall table, IDT, modules, hidden modules."""

from __future__ import annotations

import hashlib
import struct
from typing import Any, ClassVar

from vims.checks.base import Category, Check, CheckError, Context, Finding, Severity
from vims.vmi.linux import MAX_MODULES, Struct, is_kernel_pointer, list_for_each

IDT_ENTRIES = 256
PAGE = 4096


def symbolize(ctx: Context, addr: int) -> str:
    """``name+0xoff`` for a runtime address, from the profile's symbols."""
    return ctx.profile.symbolize(addr - ctx.mem.kaslr_offset) if addr else "NULL"


def read_idt(ctx: Context) -> list[int]:
    """Handler addresses of the 256 IDT gates (runtime addresses)."""
    raw = ctx.mem.read(ctx.mem.sym("idt_table"), IDT_ENTRIES * 16)
    out = []
    for i in range(IDT_ENTRIES):
        low, _seg, _bits, mid, high, _res = struct.unpack_from("<HHHHII", raw, i * 16)
        out.append(low | mid << 16 | high << 32)
    return out


class SyscallTableCheck(Check):
    id: ClassVar[str] = "kernel.syscall_table"
    description: ClassVar[str] = (
        "Each sys_call_table entry points at the handler the profile expects.")
    severity = Severity.CRITICAL
    category = Category.EXECUTABLES

    def run(self, ctx: Context) -> list[Finding]:
        expected = ctx.profile.syscall_table
        if not expected:
            raise CheckError("the profile has no sys_call_table contents (rebuild the profile)")
        slide = ctx.mem.kaslr_offset
        raw = ctx.mem.read(ctx.mem.sym("sys_call_table"), 8 * len(expected))
        found = struct.unpack(f"<{len(expected)}Q", raw)
        out = []
        for nr, (want, got) in enumerate(zip(expected, found, strict=True)):
            if got != want + slide:
                out.append(self.finding(
                    f"syscall {nr} hooked: points at {symbolize(ctx, got)}",
                    nr=nr, expected=f"0x{want + slide:x}", found=f"0x{got:x}",
                    expected_symbol=symbolize(ctx, want + slide),
                    found_symbol=symbolize(ctx, got)))
        return out


class IdtCheck(Check):
    id: ClassVar[str] = "kernel.idt"
    description: ClassVar[str] = "IDT gates point at the handlers of the clean baseline."
    severity = Severity.CRITICAL
    category = Category.EXECUTABLES

    def run(self, ctx: Context) -> list[Finding]:
        baseline: list[int] = ctx.need_baseline("idt")
        slide = ctx.mem.kaslr_offset
        out = []
        for vec, (want, got) in enumerate(zip(baseline, read_idt(ctx), strict=True)):
            want_rt = want + slide if want else 0
            if got != want_rt:
                out.append(self.finding(
                    f"IDT vector {vec} points at {symbolize(ctx, got)}",
                    vector=vec, expected=f"0x{want_rt:x}", found=f"0x{got:x}",
                    expected_symbol=symbolize(ctx, want_rt), found_symbol=symbolize(ctx, got)))
        return out


class ModulesCheck(Check):
    id: ClassVar[str] = "kernel.modules"
    description: ClassVar[str] = "Loaded modules are allowed by the policy and match the baseline."
    severity = Severity.HIGH
    category = Category.EXECUTABLES

    def run(self, ctx: Context) -> list[Finding]:
        allow = ctx.policy.get("modules", {}).get("allow")
        known: dict[str, Any] = (ctx.baseline or {}).get("modules", {})
        if allow is None and not known:
            raise CheckError("needs a policy module allowlist or a baseline with modules")
        out = []
        for mod in ctx.modules:
            if allow is not None and mod.name not in allow:
                out.append(self.finding(f"module {mod.name} is not allowlisted",
                                        module=mod.name, base=f"0x{mod.base:x}", size=mod.size))
            elif known and mod.name not in known:
                out.append(self.finding(f"module {mod.name} is not in the baseline",
                                        module=mod.name, size=mod.size))
            elif known and known[mod.name].get("size") not in (None, mod.size):
                out.append(self.finding(f"module {mod.name} has an unexpected size",
                                        module=mod.name, expected=known[mod.name]["size"],
                                        found=mod.size))
        return out


class HiddenModulesCheck(Check):
    id: ClassVar[str] = "kernel.hidden_modules"
    description: ClassVar[str] = (
        "Cross-view of the module list against the module kset (sysfs kobjects).")
    severity = Severity.CRITICAL
    category = Category.EXECUTABLES

    def run(self, ctx: Context) -> list[Finding]:
        p = ctx.profile
        listed = {m.address for m in ctx.modules}
        kset = ctx.mem.u64(ctx.mem.sym("module_kset"))
        if not is_kernel_pointer(kset):
            raise CheckError("module_kset is not a kernel pointer")
        head = kset + p.offset("kset", "list")
        entry_off = p.offset("kobject", "entry")
        kobj_off = p.offset("module_kobject", "kobj")
        out = []
        for node in list_for_each(ctx.mem, head, MAX_MODULES * 4):
            kobj = node - entry_off
            mk = Struct(ctx.mem, "module_kobject", kobj - kobj_off)
            mod = mk.ptr("mod")
            # Built-in modules have kobjects with mod == NULL: only loaded ones count.
            if mod and mod not in listed:
                name = ctx.mem.cstr(mod + p.offset("module", "name"), 56)
                out.append(self.finding(f"module {name} is loaded but unlinked from the list",
                                        module=name, address=f"0x{mod:x}", view="module_kset"))
        return out


class KernelTextCheck(Check):
    id: ClassVar[str] = "kernel.text"
    description: ClassVar[str] = (
        "Kernel text equals the clean baseline outside the runtime patch sites.")
    severity = Severity.CRITICAL
    category = Category.EXECUTABLES

    def run(self, ctx: Context) -> list[Finding]:
        from vims.vmi.ktext import compare_text, expected_text, read_text

        layout = ctx.profile.text_layout
        try:
            expected = expected_text(ctx.need_baseline("kernel_text"), layout,
                                     ctx.mem.kaslr_offset)
        except ValueError as exc:
            raise CheckError(str(exc)) from exc
        start = ctx.mem.sym("_stext")
        out = []
        for diff in compare_text(read_text(ctx.mem), expected, layout):
            addr = start + diff.offset
            out.append(self.finding(
                f"kernel text modified at {symbolize(ctx, addr)}",
                address=f"0x{addr:x}", symbol=symbolize(ctx, addr), page=f"0x{addr & ~0xFFF:x}",
                expected=diff.expected.hex(), found=diff.found.hex()))
        return out


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
